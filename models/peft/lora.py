"""LoRA: a trainable low-rank update beside frozen Dense layers (Hu et al. 2021).

    y = x · W + b + scaling · (dropout(x) · A) · B        A [*in, rank], B [rank, *out]

x [..., *in] contracts the layer's input axes (query: [embed]; attention output: [heads,
head_dim]). A starts like PyTorch's Linear (uniform ±1/sqrt(fan_in), as Hugging Face PEFT) and B
at zero, so the adapted model starts equal to the base model. A carries the input axes' logical
names plus 'lora_rank', B 'lora_rank' plus the output axes' names.

Dropout on the LoRA input needs a PRNG key, but a Dense layer is called with `x` only. Each
block of a LoRA model is therefore wrapped in a subclass of its own class (same attributes, same
parameter paths) whose call scopes a key derived from the block's `dropout_rng` over the block;
the LoRA layers inside read it (`fold_in(key, stream)`, one stream per layer). Without a key
(deterministic calls) there is no dropout.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import types

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Dense, dropout, matmul
from models.quant import QuantConfig, QuantizedDense, check_scheme, quantize_in_place
from models.peft import targets
from models.peft.config import LoRAConfig
from models.peft.variables import LoRAParam, axis_names, peft_param

LORA_DROPOUT_STREAM = 0x4C6F5241

_dropout_key: contextvars.ContextVar = contextvars.ContextVar("flaxen_lora_dropout_key", default=None)


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x · a) · b for x [tokens, in], a [in, rank], b [rank, out], through `models.layers.matmul`,
    whose written-out backward pass keeps XLA on CPU from recomputing the incoming gradient inside
    a transpose (left to autodiff, LoRA on every linear layer of all-MiniLM-L6-v2 made the training
    step 2.6x slower than full fine-tuning)."""
    return matmul(matmul(x, a), b)


def low_rank_update(layer, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """layer.scaling · (dropout(x) · a) · b [..., *out] in the layer's compute dtype, for a low-rank
    layer (LoRADense, AdaLoRADense): x [..., *in], a [in, rank], b [rank, out] (flattened factors,
    in the compute dtype). Dropout reads the key its block scoped, in the layer's own stream."""
    h = x.astype(layer.dtype)
    key = _dropout_key.get()
    if key is not None:
        h = dropout(h, layer.dropout_rate, jax.random.fold_in(key, layer.stream))
    batch = h.shape[:h.ndim - len(layer.in_shape)]
    h = low_rank(h.reshape(math.prod(batch), -1), a, b).reshape(batch + layer.out_shape)
    return h * jnp.asarray(layer.scaling, layer.dtype)


@contextlib.contextmanager
def dropout_key_scope(key: jax.Array | None):
    """Makes `key` the LoRA dropout key of the LoRA layers called inside the block."""
    token = _dropout_key.set(key)
    try:
        yield
    finally:
        _dropout_key.reset(token)


class LoRADense(Dense):
    """A Dense layer (the base layer's own kernel and bias Variables) plus LoRA factors."""

    def __init__(self, base: Dense, *, rank: int, scaling: float, dropout_rate: float, stream: int,
                 rngs: nnx.Rngs):
        self.in_shape, self.out_shape, self.dtype = base.in_shape, base.out_shape, base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        names = axis_names(base.kernel)
        n_in = len(self.in_shape)
        bound = 1.0 / math.sqrt(math.prod(self.in_shape))
        a = jax.random.uniform(rngs.params(), self.in_shape + (rank,), jnp.float32, -bound, bound)
        self.lora_a = peft_param(LoRAParam, a, names[:n_in] + ("lora_rank",))
        self.lora_b = peft_param(LoRAParam, jnp.zeros((rank,) + self.out_shape, jnp.float32),
                                 ("lora_rank",) + names[n_in:])
        self.scaling = float(scaling)
        self.dropout_rate = float(dropout_rate)
        self.stream = int(stream)

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x) + self.lora_update(x)

    def lora_update(self, x: jax.Array) -> jax.Array:
        """scaling · (dropout(x) · A) · B [..., *out] in the compute dtype."""
        a = self.lora_a[...].astype(self.dtype).reshape(-1, self.lora_a.shape[-1])
        b = self.lora_b[...].astype(self.dtype).reshape(self.lora_b.shape[0], -1)
        return low_rank_update(self, x, a, b)

    def delta(self) -> jax.Array:
        """scaling · A · B in float32, shaped like the kernel [*in, *out]."""
        a = self.lora_a[...].reshape(-1, self.lora_a.shape[-1])
        b = self.lora_b[...].reshape(self.lora_b.shape[0], -1)
        return (self.scaling * (a @ b)).reshape(self.in_shape + self.out_shape)

    def base_kernel(self) -> jax.Array:
        """The frozen base kernel [*in, *out], float32."""
        return self.kernel[...]


class QLoRADense(QuantizedDense):
    """QLoRA (Dettmers et al. 2023): LoRA factors beside a quantized frozen base layer.

    The base is a models.quant.QuantizedDense (codes and scales, dequantized in the forward); the
    factors, their scaling, dropout stream and `delta` are a LoRADense's, taken over unchanged.
    """

    def __init__(self, quantized: QuantizedDense, lora: LoRADense):
        targets.adopt(self, quantized)
        self.lora_a, self.lora_b = lora.lora_a, lora.lora_b
        self.scaling, self.dropout_rate, self.stream = lora.scaling, lora.dropout_rate, lora.stream

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x) + self.lora_update(x)

    lora_update = LoRADense.lora_update
    delta = LoRADense.delta

    def base_kernel(self) -> jax.Array:
        """The dequantized base kernel ŵ [*in, *out], float32."""
        return self.kernel_value()


class LoRABlock:
    """Mixin for a Transformer block class: scopes the LoRA dropout key over the block's call.

    Built by `lora_block_class`; `__init__` adopts an existing block's attributes (its modules
    and parameters, unchanged), so nothing is re-initialised and parameter paths stay the same.
    """

    def __init__(self, block: nnx.Module):
        targets.adopt(self, block)

    def __call__(self, x, mask, dropout_rng=None, *args, **kwargs):
        key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, LORA_DROPOUT_STREAM)
        with dropout_key_scope(key):
            return super().__call__(x, mask, dropout_rng, *args, **kwargs)


_block_classes: dict[type, type] = {}


def lora_block_class(cls: type) -> type:
    """`LoRA<Block>`: the block class `cls` with the LoRABlock mixin (one class per block class)."""
    if issubclass(cls, LoRABlock):
        return cls
    if cls not in _block_classes:
        _block_classes[cls] = types.new_class(
            f"LoRA{cls.__name__}", (LoRABlock, cls), {},
            lambda ns: ns.update({"__module__": __name__, "__doc__": f"{cls.__name__} with LoRA dropout keys."}),
        )
    return _block_classes[cls]


def base_block_class(cls: type) -> type:
    """The block class a LoRA block class was made from."""
    return next(c for c in cls.__mro__[1:] if not issubclass(c, LoRABlock)) if issubclass(cls, LoRABlock) else cls


def adapt_block_dense(model, target_modules, make) -> None:
    """Replaces the Dense layers inside the blocks that `target_modules` (peft.target_modules) match
    with `make(dense, stream)` (stream: the layer's dropout stream, 0, 1, ... in model order), and
    makes every block a LoRA block that scopes the dropout key; in place."""
    chosen = targets.select(model, Dense, target_modules, "target_modules")
    for stream, (index, path, dense) in enumerate(chosen):
        targets.replace(targets.blocks(model)[index], path, make(dense, stream))
    layers = targets.blocks(model)
    for index in range(len(layers)):
        layers[index] = lora_block_class(type(layers[index]))(layers[index])


def apply_lora(model, config: LoRAConfig, rngs: nnx.Rngs) -> None:
    """Replaces the targeted Dense layers of every block with LoRADense, in place."""
    adapt_block_dense(model, config.target_modules, lambda dense, stream: LoRADense(
        dense, rank=config.rank, scaling=config.scaling, dropout_rate=config.dropout, stream=stream, rngs=rngs))


def lora_layers(model) -> list[tuple[tuple, LoRADense | QLoRADense]]:
    """(path from the model root, layer) of every LoRADense (and QLoRADense) of a model."""
    return [(tuple(path), m) for path, m in model.iter_modules() if isinstance(m, (LoRADense, QLoRADense))]


def quantize_base(model, config: LoRAConfig) -> None:
    """QLoRA: quantizes the frozen block Dense kernels of a LoRA model in place, with
    `config.base_quantization` (models.quant); LoRADense layers become QLoRADense. Modules in
    `modules_to_save` train in full, so they stay float."""
    scheme, group_size = check_scheme(config.base_quantization, config.base_quantization_group_size or None,
                                      "peft.base_quantization")
    keep = targets.module_paths(model, config.modules_to_save, "modules_to_save")
    quantize_in_place(model, QuantConfig(scheme, group_size), skip=keep,
                      convert=lambda old, new: QLoRADense(new, old) if isinstance(old, LoRADense) else new)
