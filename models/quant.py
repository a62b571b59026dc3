"""Weight-only quantization: int8 per output channel, int4 and NF4 group-wise, dequantized in the forward.

Why: a trained model's Dense kernels are most of its weights outside the embedding table; stored
as 8- or 4-bit codes with float32 scales they take about 1/4 or 1/8 of the memory and disk of
float32, and weight-only schemes leave activations in float, so no calibration data is needed.

    from models import quant
    small = quant.quantize(model, "int4", group_size=128)     # a new model; `model` is unchanged
    small(input_ids, attention_mask=...)                       # the usual models.Model call
    quant.save_quantized(small, path); small = quant.load_quantized(path)
    plain = quant.dequantize(small)                            # a float models.Model with ŵ

Schemes (all symmetric, no zero point; one scale per group of weights that share it):
- int8: q = round(w / s) in [-127, 127], s = max|w| / 127 per output channel (per row of an
  embedding table). Codes int8 in the kernel's own shape [*in, *out], scales [*out].
- int4: q = round(w / s) in [-7, 7], s = max|w| / 7 per group of `group_size` consecutive inputs
  (default 128) of one output channel. Stored as the unsigned nibble q + 8, two per byte along the
  input dimension (low nibble first): codes uint8 [out, in / 2], scales [out, in / group_size]
  (the [out, in] layout of a PyTorch Linear, as bitsandbytes and GPTQ store it).
- nf4: QLoRA's NormalFloat 4 (Dettmers et al. 2023): the nibble indexes `NF4_CODEBOOK`, 16 values
  in [-1, 1] at quantiles of a normal distribution (bitsandbytes' table), times the block's
  max|w| (absmax); blocks of `group_size` inputs (default 64, as in the paper). Same layout as
  int4. The paper's double quantization (8-bit codes for the absmax scales) is not done: scales
  stay float32, 0.5 bit per weight at block 64.
A group size larger than a layer's input size shrinks to it; it must divide the input size.

What is quantized: every Dense kernel inside the Transformer blocks (attention query/key/value/out,
intermediate, output). With `embeddings=True` also the word-embedding table (int8 per row; int4 /
nf4 in groups along the feature axis); position and token-type embeddings, LayerNorms, biases,
the pooler and the task head stay float32 (they are small, and the head's few weights decide every
prediction). Quantized layers are `QuantizedDense` / `QuantizedEmbed` modules at the replaced
layers' paths; their codes and scales are `QuantizedWeight` variables (not `nnx.Param`, so no
optimizer ever trains them), which hold the small form in memory: dequantization happens inside
the jitted forward, per call.

Why not Google's qwix (0.1.8, which installs beside jax 0.10.2 / flax 0.12.8 without changing them):
`qwix.quantize_model(model, qwix.PtqProvider(rules), x)` works on `nnx.Linear` but fails on
models.layers.Dense with `flax.errors.TraceContextError: Cannot mutate 'Dense' from different trace
level`: qwix intercepts the dot_general inside Dense's custom-VJP `matmul` (the written-out
backward pass that keeps XLA on CPU from recomputing gradients) and tries to create the quantized
parameter on the module from inside that inner trace. Its PTQ also holds int4 as jnp.int4, which
safetensors cannot store, and has no packed on-disk format.

Checkpoint directory (`save_quantized`): `quantized.safetensors` (codes int8 / uint8, scales and
the float parameters, named by dotted path) and `quantized.json` (format, scheme, one entry per
quantized layer, the model's config, head and labels, and every tensor's dtype and shape).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.errors import CheckpointError, ConfigError
from models.layers import Dense, Embed, contract

SCHEMES = ("int8", "int4", "nf4")
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 128, "nf4": 64}
INT8_MAX = 127
INT4_MAX = 7
INT4_OFFSET = 8
FORMAT = "flaxen-quantized"
VERSION = 1
CONFIG_FILE = "quantized.json"
WEIGHTS_FILE = "quantized.safetensors"

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")): create_normal_map(0.9677083) of the
# QLoRA paper, eight quantiles of N(0, 1) on the positive side, seven on the negative side and an exact
# zero, normalised to [-1, 1].
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)


class QuantizedWeight(nnx.Variable):
    """Codes or scales of a quantized weight: frozen storage, never an optimizer's parameter."""


def _weight(value: jax.Array, axes: Iterable[str | None]) -> QuantizedWeight:
    axes = tuple(axes)
    assert len(axes) == value.ndim, (axes, value.shape)
    return QuantizedWeight(value, out_sharding=axes, eager_sharding=False)


def check_scheme(scheme: str, group_size: int | None, key: str = "scheme") -> tuple[str, int | None]:
    """(scheme, group size) with the scheme's default group size; ConfigError naming `key` otherwise."""
    if scheme not in SCHEMES:
        raise ConfigError(f"{key}={scheme!r}: expected one of {', '.join(SCHEMES)}")
    if scheme == "int8":
        if group_size not in (None, 0):
            raise ConfigError(f"{key}=int8 is per output channel; a group size ({group_size}) applies to int4 and nf4")
        return scheme, None
    if group_size in (None, 0):
        return scheme, DEFAULT_GROUP_SIZE[scheme]
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ConfigError(f"group size {group_size!r} for {key}={scheme}: expected an even integer >= 2")
    return scheme, group_size


def layer_group_size(scheme: str, group_size: int | None, fan_in: int, where: str) -> int | None:
    """The group size one layer uses: `group_size`, shrunk to `fan_in` when larger; it must divide fan_in."""
    scheme, group_size = check_scheme(scheme, group_size)
    if scheme == "int8":
        return None
    size = min(group_size, fan_in)
    if fan_in % size or size % 2:
        raise ConfigError(f"{scheme} group size {group_size} does not divide the input size {fan_in} of {where} "
                          "into groups of an even size; choose a group size that does")
    return size


# --- codes and scales of 2-D arrays: rows [rows, k], groups along k ---------------------------------

def pack_int4(codes: jax.Array) -> jax.Array:
    """uint8 codes in [0, 15] [..., k] (k even) -> bytes [..., k / 2], element 2j in the low nibble."""
    codes = codes.astype(jnp.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_int4`: bytes [..., k / 2] -> uint8 codes [..., k]."""
    low, high = packed & jnp.uint8(0x0F), packed >> 4
    return jnp.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize_rows(w: jax.Array, scheme: str, group_size: int | None) -> tuple[jax.Array, jax.Array]:
    """float [rows, k] -> (codes, scales).

    int8: codes int8 [rows, k], scales [rows] (one per row). int4 / nf4: packed codes uint8
    [rows, k / 2], scales [rows, k / group_size]."""
    w = jnp.asarray(w, jnp.float32)
    rows, k = w.shape
    if scheme == "int8":
        absmax = jnp.max(jnp.abs(w), axis=1)
        scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
        codes = jnp.clip(jnp.round(w / scale[:, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return codes, scale
    groups = w.reshape(rows, k // group_size, group_size)
    absmax = jnp.max(jnp.abs(groups), axis=2)
    if scheme == "int4":
        scale = jnp.where(absmax > 0, absmax / INT4_MAX, 1.0)
        q = jnp.clip(jnp.round(groups / scale[..., None]), -INT4_MAX, INT4_MAX)
        codes = (q + INT4_OFFSET).astype(jnp.uint8)
    else:
        scale = jnp.where(absmax > 0, absmax, 1.0)
        x = groups / scale[..., None]
        book = jnp.asarray(NF4_CODEBOOK)
        codes = jnp.searchsorted((book[1:] + book[:-1]) / 2, x).astype(jnp.uint8)  # the nearest value
    return pack_int4(codes.reshape(rows, k)), scale


def dequantize_rows(codes: jax.Array, scale: jax.Array, scheme: str) -> jax.Array:
    """Inverse of `quantize_rows` up to rounding: float32 [..., rows, k]. Leading axes may be
    gathered rows (an embedding lookup): codes [..., k or k / 2], scales [...] or [..., groups]."""
    if scheme == "int8":
        return codes.astype(jnp.float32) * scale[..., None]
    nibbles = unpack_int4(codes)
    if scheme == "int4":
        values = nibbles.astype(jnp.float32) - INT4_OFFSET
    else:
        values = jnp.asarray(NF4_CODEBOOK)[nibbles]
    groups = scale.shape[-1]
    values = values.reshape(values.shape[:-1] + (groups, values.shape[-1] // groups))
    return (values * scale[..., None]).reshape(nibbles.shape)


# --- layers --------------------------------------------------------------------------------------

class QuantizedDense(nnx.Module):
    """A models.layers.Dense whose kernel is held as codes and scales (see the module docstring).

    `qvalue` / `scale`: int8 [*in, *out] / [*out], or packed uint8 [out, in / 2] / [out, groups];
    `bias` stays a float nnx.Param. The call dequantizes the kernel to [*in, *out] and contracts
    exactly like Dense.
    """

    def __init__(self, base: Dense, scheme: str, group_size: int | None, where: str = "a Dense layer"):
        self.in_shape, self.out_shape, self.dtype = base.in_shape, base.out_shape, base.dtype
        self.scheme = scheme
        names = tuple(base.kernel.get_metadata().get("out_sharding") or (None,) * base.kernel[...].ndim)
        in_names, out_names = names[:len(self.in_shape)], names[len(self.in_shape):]
        fan_in, fan_out = math.prod(self.in_shape), math.prod(self.out_shape)
        self.group_size = layer_group_size(scheme, group_size, fan_in, where)
        rows = jnp.asarray(base.kernel[...], jnp.float32).reshape(fan_in, fan_out).T
        codes, scale = quantize_rows(rows, scheme, self.group_size)
        if scheme == "int8":
            self.qvalue = _weight(codes.T.reshape(self.in_shape + self.out_shape), names)
            self.scale = _weight(scale.reshape(self.out_shape), out_names)
        else:
            out_name = out_names[0] if len(out_names) == 1 else None
            in_name = in_names[0] if len(in_names) == 1 else None
            self.qvalue = _weight(codes, (out_name, in_name))
            self.scale = _weight(scale, (out_name, None))
        self.bias = base.bias

    def kernel_value(self) -> jax.Array:
        """The dequantized kernel ŵ [*in, *out], float32."""
        if self.scheme == "int8":
            return self.qvalue[...].astype(jnp.float32) * self.scale[...]
        rows = dequantize_rows(self.qvalue[...], self.scale[...], self.scheme)
        return rows.T.reshape(self.in_shape + self.out_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel_value().astype(self.dtype)
        y = contract(x.astype(self.dtype), kernel, len(self.in_shape))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class QuantizedEmbed(nnx.Module):
    """A models.layers.Embed whose table [num_embeddings, features] is held as codes and scales per
    row (int8) or per group of features of a row (int4 / nf4); a lookup dequantizes only the rows
    it gathers, `attend` (a tied output layer) the whole table."""

    def __init__(self, base: Embed, scheme: str, group_size: int | None, where: str = "an embedding"):
        self.dtype = base.dtype
        self.scheme = scheme
        table = jnp.asarray(base.embedding[...], jnp.float32)
        self.features = table.shape[1]
        names = tuple(base.embedding.get_metadata().get("out_sharding") or (None, None))
        self.group_size = layer_group_size(scheme, group_size, self.features, where)
        codes, scale = quantize_rows(table, scheme, self.group_size)
        self.qvalue = _weight(codes, names)
        self.scale = _weight(scale, names[:1] if scheme == "int8" else (names[0], None))

    def table_value(self) -> jax.Array:
        """The dequantized table [num_embeddings, features], float32."""
        return dequantize_rows(self.qvalue[...], self.scale[...], self.scheme)

    def __call__(self, ids: jax.Array) -> jax.Array:
        codes = jnp.take(self.qvalue[...], ids, axis=0)
        scale = jnp.take(self.scale[...], ids, axis=0)
        return dequantize_rows(codes, scale, self.scheme).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.table_value().astype(self.dtype))


QUANTIZED_LAYERS = (QuantizedDense, QuantizedEmbed)


def dequantized_value(layer: nnx.Module) -> tuple[str, jax.Array]:
    """(name of the float parameter the layer replaced, its dequantized value)."""
    if isinstance(layer, QuantizedDense):
        return "kernel", layer.kernel_value()
    return "embedding", layer.table_value()


# --- models --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized: `scheme` (int8 | int4 | nf4), `group_size` (int4 / nf4; None: 128 /
    64) and whether the word-embedding table is quantized too (`embeddings`)."""

    scheme: str = "int8"
    group_size: int | None = None
    embeddings: bool = False

    def __post_init__(self):
        scheme, group_size = check_scheme(self.scheme, self.group_size)
        object.__setattr__(self, "group_size", group_size)
        if not isinstance(self.embeddings, bool):
            raise ConfigError(f"embeddings={self.embeddings!r}: expected true or false")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def block_dense_layers(model) -> list[tuple[tuple, Dense]]:
    """(path from the model root, layer) of every Dense inside the Transformer blocks."""
    from models.peft import targets

    return [(targets.block_path(index) + path, dense)
            for index, path, dense in targets.modules_in_blocks(model, Dense)]


def word_embedding(model) -> tuple[tuple, Embed] | None:
    """(path, module) of the word-embedding table's Embed (the one `embed_tokens` uses), or None."""
    for path, module in nnx.iter_modules(model.backbone):
        if path and path[-1] == "word" and isinstance(module, Embed):
            return ("backbone",) + tuple(path), module
    return None


def quantize_in_place(model, config: QuantConfig, *, skip: Iterable[tuple] = (),
                      convert: Callable[[Dense, QuantizedDense], nnx.Module] | None = None):
    """Replaces the block Dense layers (and the word embeddings with `config.embeddings`) of `model`
    by quantized layers, in place; returns the model. `skip`: paths left as they are; `convert(old,
    quantized)`: what goes in the old layer's place (default the QuantizedDense itself)."""
    from models.peft import targets

    skip = {tuple(p) for p in skip}
    for path, dense in block_dense_layers(model):
        if any(path[:len(p)] == p for p in skip):
            continue
        quantized = QuantizedDense(dense, config.scheme, config.group_size, targets.dotted(path))
        targets.replace(model, path, convert(dense, quantized) if convert is not None else quantized)
    if config.embeddings:
        found = word_embedding(model)
        if found is None:
            raise ConfigError(f"embeddings=true: {type(model.backbone).__name__} has no word-embedding table")
        path, embed = found
        targets.replace(model, path, QuantizedEmbed(embed, config.scheme, config.group_size, targets.dotted(path)))
    model.quant_config = config
    return model


def quantize(model, scheme: str = "int8", group_size: int | None = None, *, embeddings: bool = False):
    """A copy of `model` (a plain models.Model) with its block Dense kernels (and, with `embeddings`,
    its word embeddings) quantized; `model` itself is left unchanged."""
    config = QuantConfig(scheme, group_size, embeddings)
    if getattr(model, "quant_config", None) is not None:
        raise ConfigError("quantize: the model is already quantized")
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None and getattr(peft_config, "name", "none") != "none":
        raise ConfigError(f"quantize: the model has peft.name={peft_config.name!r}; quantize a plain model "
                          "(merge LoRA first with models.peft.merge), or set peft.base_quantization for QLoRA")
    return quantize_in_place(nnx.clone(model), config)


def quantized_layers(model) -> list[tuple[tuple, nnx.Module]]:
    """(path, layer) of every QuantizedDense / QuantizedEmbed of a model."""
    return [(tuple(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, QUANTIZED_LAYERS)]


def encoded_parameter_count(model) -> int:
    """Number of float weights the model's quantized layers encode (kernel / table elements)."""
    count = 0
    for _, layer in quantized_layers(model):
        if isinstance(layer, QuantizedDense):
            count += math.prod(layer.in_shape + layer.out_shape)
        else:
            count += layer.qvalue.shape[0] * layer.features
    return count


def float_values(model, values: dict[tuple, Any]) -> dict[tuple, Any]:
    """`values` ({variable path: array} of `model`) with each quantized layer's codes and scales
    replaced by the dequantized float parameter they stand for (`kernel` / `embedding`)."""
    values = dict(values)
    for path, layer in quantized_layers(model):
        values.pop(path + ("qvalue",), None)
        values.pop(path + ("scale",), None)
        name, value = dequantized_value(layer)
        values[path + (name,)] = value
    return values


def _variables(model) -> dict[tuple, nnx.Variable]:
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


def dequantize(model):
    """A plain float models.Model whose weights are the quantized model's dequantized ones (ŵ);
    other parameters are copied. Its outputs equal the quantized model's."""
    from models.model import Model

    values = float_values(model, {path: v[...] for path, v in _variables(model).items()})
    num_labels = model.num_labels if model.num_labels is not None else 2
    plain = nnx.eval_shape(lambda: Model(model.config, model.head_name, num_labels, rngs=nnx.Rngs(0)))
    slots = _variables(plain)
    if set(slots) != set(values):
        raise ValueError(f"dequantize: parameter paths differ from a plain model's: {sorted(set(slots) ^ set(values))}")
    for path, slot in slots.items():
        slot.set_value(jnp.asarray(values[path]))
    if hasattr(model, "hf_metadata"):
        plain.hf_metadata = model.hf_metadata
    return plain


# --- checkpoints ---------------------------------------------------------------------------------

def _layer_entry(layer) -> dict:
    if isinstance(layer, QuantizedDense):
        return {"kind": "dense", "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape),
                "group_size": layer.group_size}
    return {"kind": "embedding", "features": layer.features, "group_size": layer.group_size}


def save_quantized(model, path: str | os.PathLike, *, extra: dict | None = None) -> str:
    """Writes a quantized model (from `quantize`) to directory `path` (see the module docstring);
    `extra`: JSON-ready metadata kept under "extra" (e.g. label names). Returns the path."""
    from safetensors.numpy import save_file

    from models.peft.checkpoint import write_directory
    from models.peft.targets import dotted

    config = getattr(model, "quant_config", None)
    if config is None:
        raise ConfigError("save_quantized: the model is not quantized (use models.quant.quantize first)")
    tensors = {dotted(p): np.asarray(v[...]) for p, v in _variables(model).items()}
    description = {
        "format": FORMAT, "version": VERSION,
        "scheme": {**config.to_dict(), "symmetric": True,
                   "int4_packing": "two codes per byte along the input (feature) axis, element 2j in the low nibble; "
                                   "int4 codes are q + 8 with q in [-7, 7], nf4 codes index nf4_codebook",
                   "nf4_codebook": NF4_CODEBOOK.tolist() if config.scheme == "nf4" else None},
        "layers": {dotted(p): _layer_entry(layer) for p, layer in quantized_layers(model)},
        "model": {"config": model.config.to_dict(), "head": model.head_name, "num_labels": model.num_labels},
        "tensors": {name: {"dtype": str(a.dtype), "shape": list(a.shape)} for name, a in sorted(tensors.items())},
        "extra": extra or {},
    }

    def write(staging):
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(staging, WEIGHTS_FILE),
                  metadata={"format": FORMAT})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
            f.write("\n")

    return write_directory(path, write)


def read_description(path: str | os.PathLike) -> dict:
    """The quantized.json of a directory written by `save_quantized`."""
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} not found: {path} is not a flaxen quantized model directory")
    with open(file) as f:
        description = json.load(f)
    if description.get("format") != FORMAT or description.get("version") != VERSION:
        raise CheckpointError(f"{file}: format {description.get('format')!r} version {description.get('version')!r}, "
                              f"expected {FORMAT!r} version {VERSION}")
    return description


def load_quantized(path: str | os.PathLike):
    """The quantized models.Model saved in directory `path`, bit for bit."""
    from safetensors.numpy import load_file

    from models.config import ModelConfig
    from models.model import Model
    from models.peft.targets import dotted

    description = read_description(path)
    spec = description["model"]
    config = QuantConfig(**{k: description["scheme"][k] for k in ("scheme", "group_size", "embeddings")})
    num_labels = spec["num_labels"] if spec["num_labels"] is not None else 2
    model_config = ModelConfig.from_dict(spec["config"])
    model = nnx.eval_shape(lambda: quantize_in_place(
        Model(model_config, spec["head"], num_labels, rngs=nnx.Rngs(0)), config))
    arrays = load_file(os.path.join(os.fspath(path), WEIGHTS_FILE))
    slots = {dotted(p): v for p, v in _variables(model).items()}
    if set(slots) != set(arrays):
        difference = sorted(set(slots) ^ set(arrays))
        raise CheckpointError(f"{path}: tensors differ from the model described in {CONFIG_FILE}: {difference[:5]}")
    for name, slot in slots.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(slot.shape) or array.dtype != np.dtype(slot.dtype):
            raise CheckpointError(f"{path}: tensor {name} is {array.dtype}{list(array.shape)}, the model needs "
                                  f"{np.dtype(slot.dtype)}{list(slot.shape)}")
        slot.set_value(jnp.asarray(array))
    return model
