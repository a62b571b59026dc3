"""Hugging Face model directories in and out: the shared machinery and the family registry.

Why: researchers start from public checkpoints and hand results back to PyTorch users, so a local
Hugging Face directory (config.json + model.safetensors, or pytorch_model.bin when torch is
installed) must load into a flaxen `Model` with the same numbers, and `save_pretrained` must write a
directory that `transformers.AutoModel...from_pretrained` loads with no missing or unexpected keys.
No PyTorch is needed at run time: safetensors are read and written through numpy.

This file holds what every model family shares: reading and writing directories, config.json
handling, the `Entry` transforms, fresh initialisation of absent head weights, error messages. Each
family keeps its weight names and config translation beside its model file (models/bert_hf.py,
models/gpt2_hf.py, models/roberta_hf.py) and registers them with `register(HFFamily(...))`; the
family modules are imported at the bottom of this file, one line each. Nothing here tests a
family's name.

Layout (HF tensor -> flaxen parameter): Linear weights [out, in] are transposed into kernels
[*in, *out] (attention kernels keep heads explicit: query [embed, heads, head_dim], output
[heads, head_dim, embed]); GPT-2's Conv1D weights are already [in, out] and its fused `c_attn`
[embed, 3 * embed] splits into query/key/value. The conversions are reshapes, transposes and
slices only, so load -> save -> load is bit-identical.

Config fields that the architecture does not use but the Hugging Face world does (bos/eos/pad token
ids, id2label) are kept on the model as `model.hf_metadata`, a tuple of (key, value) pairs, and
written back by `save_pretrained`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.errors import CheckpointError, ConfigError
from models.heads import HEADS, lookup
from models.model import Model, build_model

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"

OVERRIDABLE = ("dtype", "remat", "hidden_dropout", "attention_dropout", "classifier_dropout", "initializer_range",
               "attention_implementation")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


# ----------------------------------------------------------------------------- weight layout


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor and the flaxen parameter(s) it fills.

    kind: 'copy' (same layout), 'linear' (torch Linear [out, in]), 'conv1d' (GPT-2 Conv1D [in, out]);
    several `params` split the tensor's last axis equally (GPT-2's fused c_attn). `aliases` are older
    names for the same tensor (LayerNorm gamma/beta).
    """

    name: str
    params: tuple
    kind: str = "copy"
    required: bool = True
    aliases: tuple = ()


def dense_entries(name: str, path: tuple, required: bool = True, kind: str = "linear", bias: bool = True) -> list[Entry]:
    """A Dense layer: Hugging Face `name`.weight (and `name`.bias) -> flaxen `path`.kernel (and .bias)."""
    entries = [Entry(f"{name}.weight", (path + ("kernel",),), kind, required)]
    if bias:
        entries.append(Entry(f"{name}.bias", (path + ("bias",),), "copy", required))
    return entries


def norm_entries(name: str, path: tuple, required: bool = True) -> list[Entry]:
    """A LayerNorm: `name`.weight / .bias (or the older .gamma / .beta) -> `path`.scale / .bias."""
    return [
        Entry(f"{name}.weight", (path + ("scale",),), "copy", required, (f"{name}.gamma",)),
        Entry(f"{name}.bias", (path + ("bias",),), "copy", required, (f"{name}.beta",)),
    ]


@dataclasses.dataclass(frozen=True)
class HFWeight:
    """One module or tensor of a head in Hugging Face layout, filling the head's parameters under `path`.

    kind: 'dense' (a torch Linear: `name`.weight [out, in], and `name`.bias unless bias=False),
    'norm' (a LayerNorm: `name`.weight, `name`.bias) or 'vector' (the one tensor `name`, also
    read under its `aliases`).
    """

    kind: str
    name: str
    path: tuple[str, ...]
    bias: bool = True
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class HFHead:
    """A head (models.heads.HEADS name) in one family's Hugging Face layout.

    architecture: the transformers class `save_pretrained` names in config.json.
    weights: the head's own tensors (never required: those absent from a checkpoint are fresh).
    """

    architecture: str
    weights: tuple[HFWeight, ...] = ()


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """One model family's Hugging Face mapping, registered with `register`.

    family: the ModelConfig.family it serves. model_types: the config.json `model_type` values read
        as this family.
    config_from_hf(hf: dict, source: str) -> ModelConfig: config.json -> config; CheckpointError
        naming `source` and the key for anything flaxen cannot build.
    config_to_hf(config) -> dict: the architecture part of config.json (model_type included; no
        head, labels or token ids).
    backbone(config, prefix, head) -> list[Entry]: every backbone tensor, names starting with
        `prefix` ('' or `prefix` below), for a model with `head`.
    prefix: the backbone's key prefix in transformers' classes with a head ('bert.').
    heads: head name (None: the bare backbone) -> HFHead; the heads saved and loaded for this family.
    word_embedding: the token embedding's name without prefix; it tells a prefixed checkpoint from
        a bare one and is the tensor tied output layers must equal.
    tied: output-layer tensors that are the token embedding in flaxen (checked equal, not read).
    ignored: regex (full match) of checkpoint tensors neither read nor reported as unused.
    input_names: what the family's tokenizer returns (a tokenizer config's model_input_names).
    """

    family: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict, str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    backbone: Callable[[ModelConfig, str, Optional[str]], list[Entry]]
    prefix: str
    heads: Mapping[Optional[str], HFHead]
    word_embedding: str
    tied: tuple[str, ...] = ()
    ignored: str = ""
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")


FAMILIES: dict[str, HFFamily] = {}  # ModelConfig.family -> its mapping
MODEL_TYPES: dict[str, HFFamily] = {}  # config.json model_type -> its family's mapping


def register(family: HFFamily) -> HFFamily:
    """Makes `family` loadable and savable; returns it. A family or model_type registered twice is an error."""
    if family.family in FAMILIES:
        raise ConfigError(f"Hugging Face mapping of family {family.family!r} is registered twice")
    taken = [t for t in family.model_types if t in MODEL_TYPES]
    if taken:
        raise ConfigError(f"model_type {taken[0]!r} is already registered for family {MODEL_TYPES[taken[0]].family!r}")
    FAMILIES[family.family] = family
    MODEL_TYPES.update({t: family for t in family.model_types})
    return family


def family_of(config: ModelConfig) -> HFFamily:
    """The registered mapping of `config.family`; ConfigError if it has none."""
    if config.family not in FAMILIES:
        raise ConfigError(f"family {config.family!r} has no Hugging Face mapping; registered families: "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[config.family]


def hf_head(config: ModelConfig, head: Optional[str]) -> HFHead:
    """`head` in the Hugging Face layout of `config.family`; ConfigError if the family has no such class."""
    lookup(head, config.family)
    family = family_of(config)
    if head not in family.heads:
        raise ConfigError(f"head={head!r} has no Hugging Face class for family {config.family!r}; expected one of "
                          f"{', '.join(repr(h) for h in family.heads)}")
    return family.heads[head]


def architecture(config: ModelConfig, head: Optional[str]) -> str:
    """The transformers class of a `config.family` model with `head` (what config.json's architectures names)."""
    return hf_head(config, head).architecture


# ----------------------------------------------------------------------------- config.json


def require(hf: dict, key: str, source: str):
    """hf[key], or CheckpointError naming `source` and the key."""
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{source}: required key {key!r} is missing")
    return hf[key]


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A Hugging Face config.json mapping (a registered model_type) -> ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type={model_type!r} is not supported; supported model types: "
            f"{', '.join(MODEL_TYPES)}"
        )
    if hf.get("add_cross_attention"):
        raise CheckpointError(f"{source}: add_cross_attention=true is not supported (flaxen has no cross-attention)")
    return MODEL_TYPES[model_type].config_from_hf(hf, source)


def config_to_hf(config: ModelConfig) -> dict:
    """ModelConfig -> the architecture part of a Hugging Face config.json (no head, no labels).

    A head-pruned config (models.prune.prune_heads) adds `pruned_heads` {"layer": [heads]} with
    the smaller attention weights, Hugging Face's layout for pruned models. transformers 5 no
    longer builds pruned models (it dropped `pruned_heads`): for PyTorch, save
    `models.prune.expand_pruned_heads(model)` instead, the same function at full size."""
    hf = family_of(config).config_to_hf(config)
    if config.pruned_heads:
        hf["pruned_heads"] = {str(layer): list(heads) for layer, heads in config.pruned_heads}
    return hf


# ----------------------------------------------------------------------------- layout of a model


def _head_entry(weight: HFWeight) -> list[Entry]:
    """A head's Hugging Face tensor(s); never required: absent ones are fresh."""
    path = ("head",) + weight.path
    if weight.kind == "dense":
        return dense_entries(weight.name, path, required=False, bias=weight.bias)
    if weight.kind == "norm":
        return norm_entries(weight.name, path, required=False)
    return [Entry(weight.name, (path,), "copy", False, weight.aliases)]


def weight_layout(config: ModelConfig, head: Optional[str], prefix: Optional[str] = None) -> list[Entry]:
    """Every Hugging Face tensor of `config` with `head`, and the flaxen parameters it fills.

    prefix: the backbone's key prefix ('bert.' / 'transformer.'); by default the one
    transformers uses for that head ('' for the bare backbone).
    """
    family = family_of(config)
    spec = hf_head(config, head)
    if prefix is None:
        prefix = "" if head is None else family.prefix
    return family.backbone(config, prefix, head) + [e for w in spec.weights for e in _head_entry(w)]


def _input_axes(kernel_path: tuple) -> int:
    """Input axes of a Dense kernel: two for attention's output projection [heads, head_dim, embed]."""
    return 2 if kernel_path[-2] == "out" else 1


def _split_in_out(path: tuple, shape: tuple) -> tuple[int, int]:
    """(fan_in, fan_out) of a Dense kernel."""
    n_in = _input_axes(path)
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def expected_hf_shape(entry: Entry, shapes: Sequence[tuple]) -> tuple:
    """The shape Hugging Face stores for `entry`, given the flaxen parameter shapes it fills."""
    if entry.kind == "copy":
        if len(entry.params) == 1 and len(shapes[0]) == 2 and entry.params[0][-1] == "embedding":
            return shapes[0]
        return (sum(math.prod(s) for s in shapes),)
    fan_in, fan_out = _split_in_out(entry.params[0], shapes[0])
    fan_out *= len(shapes)
    return (fan_out, fan_in) if entry.kind == "linear" else (fan_in, fan_out)


def to_flaxen(entry: Entry, tensor: np.ndarray, shapes: Sequence[tuple]) -> list[np.ndarray]:
    """A Hugging Face tensor -> the flaxen parameter arrays of `entry` (shapes already checked)."""
    if entry.kind == "linear":
        tensor = tensor.T
    pieces = np.split(tensor, len(shapes), axis=-1) if len(shapes) > 1 else [tensor]
    return [np.ascontiguousarray(piece).reshape(shape) for piece, shape in zip(pieces, shapes)]


def from_flaxen(entry: Entry, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The flaxen parameter arrays of `entry` -> the Hugging Face tensor."""
    if entry.kind == "copy":
        if len(arrays) == 1 and entry.params[0][-1] == "embedding":
            return np.ascontiguousarray(arrays[0])
        return np.ascontiguousarray(np.concatenate([a.reshape(-1) for a in arrays]))
    fan_in, fan_out = _split_in_out(entry.params[0], arrays[0].shape)
    tensor = np.concatenate([a.reshape(fan_in, fan_out) for a in arrays], axis=-1)
    return np.ascontiguousarray(tensor.T if entry.kind == "linear" else tensor)


# ----------------------------------------------------------------------------- reading a directory


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error


def read_weights(path: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of a model directory as numpy arrays, and the file(s) they came from."""
    single = os.path.join(path, SAFETENSORS_FILE)
    index = os.path.join(path, SAFETENSORS_INDEX_FILE)
    torch_file = os.path.join(path, TORCH_FILE)
    from safetensors.numpy import load_file

    if os.path.isfile(single):
        try:
            return load_file(single), single
        except Exception as error:
            raise CheckpointError(f"{single}: cannot read safetensors file ({error})") from error
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object naming the shard of every tensor")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index}: shard file {shard_path} does not exist")
            tensors.update(load_file(shard_path))
        return tensors, index
    if os.path.isfile(torch_file):
        try:
            import torch
        except ImportError as error:
            raise CheckpointError(
                f"{torch_file}: reading pytorch_model.bin needs PyTorch, which is not installed; install torch "
                f"(pip install -e \".[pretrained]\") or convert the checkpoint to {SAFETENSORS_FILE}"
            ) from error
        try:
            state = torch.load(torch_file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{torch_file}: cannot read PyTorch checkpoint ({error})") from error
        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}, torch_file
    raise CheckpointError(
        f"{path}: no weights found; expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE} or {TORCH_FILE}"
    )


def _variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    """Path -> parameter Variable of the model, with the model's own (mutable) Variable objects."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            out[tuple(path)] = node
    return out


def _check_tied(tensors: dict, name: str, embedding: np.ndarray, source: str):
    if name in tensors and not np.array_equal(np.asarray(tensors[name], np.float32), embedding):
        raise CheckpointError(
            f"{source}: {name} differs from the token embedding; flaxen's output layer is tied to the "
            "embedding (untied output layers are not supported)"
        )


def _labels(id2label, num_labels: int) -> tuple[str, ...]:
    if id2label is None:
        return tuple(f"LABEL_{i}" for i in range(num_labels))
    if isinstance(id2label, dict):
        try:
            mapping = {int(k): str(v) for k, v in id2label.items()}
        except ValueError as error:
            raise ConfigError(f"id2label keys must be integer label ids, got {sorted(id2label)}") from error
        if sorted(mapping) != list(range(len(mapping))):
            raise ConfigError(f"id2label keys must be 0..{len(mapping) - 1}, got {sorted(mapping)}")
        return tuple(mapping[i] for i in range(len(mapping)))
    return tuple(str(v) for v in id2label)


def _fresh_value(path: tuple, shape: tuple, std: float, rng: np.random.Generator) -> np.ndarray:
    """Initial value of a weight absent from a checkpoint, as transformers initialises it:
    normal(0, initializer_range) kernels, zero biases, unit LayerNorm scales. Drawn with numpy,
    so filling a new head compiles nothing."""
    if path[-1] == "kernel":
        return rng.normal(0.0, std, shape).astype(np.float32)
    return (np.ones if path[-1] == "scale" else np.zeros)(shape, np.float32)


def load_pretrained(path: str | os.PathLike, head: Optional[str] = None, **head_kwargs) -> Model:
    """Loads a local Hugging Face model directory into a flaxen `Model`.

    head: None (bare encoder/decoder) or a models.heads.HEADS name ('mlm', 'causal_lm', 'seq_cls',
    'token_cls', 'qa'). Head weights (and BERT's pooler) absent from the checkpoint are freshly
    initialised and listed in one log line. Keyword arguments: num_labels, id2label (dict or list;
    for the heads that take labels: seq_cls, token_cls), seed (initialisation of absent weights,
    default 0), and the config fields that do not change parameter shapes: dtype, remat,
    hidden_dropout, attention_dropout, classifier_dropout, initializer_range.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"model directory {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory; expected a Hugging Face model directory")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
    hf = _read_json(config_file)
    config = config_from_hf(hf, config_file)

    head_kwargs = dict(head_kwargs)
    num_labels = head_kwargs.pop("num_labels", None)
    id2label = head_kwargs.pop("id2label", None)
    seed = head_kwargs.pop("seed", 0)
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise ConfigError(f"num_labels must be a positive integer, got {num_labels!r}")
    unknown = sorted(set(head_kwargs) - set(OVERRIDABLE))
    if unknown:
        raise ConfigError(
            f"load_pretrained: unknown keyword argument(s) {', '.join(unknown)}; expected num_labels, id2label, "
            f"seed or one of {', '.join(OVERRIDABLE)}"
        )
    config = dataclasses.replace(config, **head_kwargs)
    spec = lookup(head, config.family, kind="model_type")
    family = family_of(config)
    hf_head(config, head)
    if spec.ties_embedding and hf.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{config_file}: tie_word_embeddings=false is not supported (flaxen ties the LM head)")

    labels = None
    if spec.takes_labels:
        stored = _labels(hf["id2label"], 0) if isinstance(hf.get("id2label"), dict) else None
        if id2label is not None:
            labels = _labels(id2label, 0)
            if num_labels is not None and num_labels != len(labels):
                raise ConfigError(f"num_labels={num_labels} but id2label names {len(labels)} labels")
        elif num_labels is not None:
            labels = stored if stored is not None and len(stored) == num_labels else _labels(None, num_labels)
        elif stored is not None:
            labels = stored
        else:
            labels = _labels(None, int(hf.get("num_labels", 2)))
        num_labels = len(labels)
        if num_labels < 1:
            raise ConfigError(f"head={head!r} needs at least one label, got id2label={id2label!r}")
    elif num_labels is not None or id2label is not None:
        labelled = " and ".join(repr(name) for name, s in HEADS.items() if s.takes_labels)
        raise ConfigError(f"num_labels/id2label apply to heads {labelled}, not head={head!r}")

    tensors, source = read_weights(path)
    model = nnx.eval_shape(lambda: build_model(config, head, num_labels if num_labels is not None else 2,
                                               rngs=nnx.Rngs(0)))
    variables = _variables(model)

    prefix = family.prefix if family.prefix + family.word_embedding in tensors else ""
    layout = weight_layout(config, head, prefix)
    used, fresh = set(), []
    for entry in layout:
        name = next((n for n in (entry.name, *entry.aliases) if n in tensors), None)
        targets = [variables[p] for p in entry.params]
        if name is None:
            if entry.required:
                raise CheckpointError(f"{source}: required weight {entry.name!r} is missing from the checkpoint")
            fresh += entry.params
            continue
        shapes = [tuple(t.shape) for t in targets]
        tensor = np.asarray(tensors[name])
        expected = expected_hf_shape(entry, shapes)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)} but the config "
                f"({config_file}) expects {expected}"
            )
        for target, value in zip(targets, to_flaxen(entry, tensor.astype(np.float32, copy=False), shapes)):
            target.set_value(jnp.asarray(value))
        used.add(name)

    if fresh:
        rng = np.random.default_rng(seed)
        for p in fresh:
            variables[p].set_value(jnp.asarray(_fresh_value(p, variables[p].shape, config.initializer_range, rng)))
        logger.warning("%s: freshly initialised (not in the checkpoint): %s", path,
                       ", ".join(".".join(map(str, p)) for p in fresh))
    abstract = [".".join(map(str, p)) for p, v in variables.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    assert not abstract, f"weight layout does not cover {abstract}"
    word = next(e.params[0] for e in layout if e.name == prefix + family.word_embedding)
    embedding = np.asarray(variables[word][...])
    for name in family.tied:
        _check_tied(tensors, name, embedding, source)
    ignored = re.compile(family.ignored) if family.ignored else None
    unused = sorted(k for k in tensors if k not in used and k not in family.tied
                    and not (ignored is not None and ignored.fullmatch(k)))
    if unused:
        logger.info("%s: checkpoint weights not used by head=%r: %s", path, head, ", ".join(unused))

    metadata = {k: tuple(hf[k]) if isinstance(hf[k], list) else hf[k] for k in TOKEN_ID_KEYS if k in hf}
    if labels is not None:
        metadata["id2label"] = labels
    model.hf_metadata = tuple(sorted(metadata.items()))
    return model


# ----------------------------------------------------------------------------- writing a directory


def _hf_config(model: Model, id2label) -> dict:
    config, head = model.config, model.head_name
    spec = HEADS[head]
    hf = {"architectures": [architecture(config, head)], **config_to_hf(config), "dtype": "float32"}
    metadata = dict(getattr(model, "hf_metadata", ()))
    for key in TOKEN_ID_KEYS:
        if key in metadata:
            hf[key] = list(metadata[key]) if isinstance(metadata[key], tuple) else metadata[key]
    if spec.takes_labels:
        labels = _labels(id2label if id2label is not None else metadata.get("id2label"), model.num_labels)
        if len(labels) != model.num_labels:
            raise ConfigError(f"id2label names {len(labels)} labels but the model's head has {model.num_labels}")
        hf["id2label"] = {str(i): name for i, name in enumerate(labels)}
        hf["label2id"] = {name: i for i, name in enumerate(labels)}
    return hf


def _array(variables: dict, path: tuple) -> np.ndarray:
    """A parameter as float32 numpy; an absent bias (model.use_bias=False) as zeros, the identity
    Hugging Face layers hold in its place."""
    if path in variables:
        return np.asarray(variables[path][...], np.float32)
    if path[-1] == "bias" and path[:-1] + ("scale",) in variables:
        return np.zeros(variables[path[:-1] + ("scale",)][...].shape, np.float32)
    kernel = path[:-1] + ("kernel",)
    if path[-1] == "bias" and kernel in variables:
        return np.zeros(variables[kernel][...].shape[_input_axes(kernel):], np.float32)
    raise KeyError(f"the model has no parameter {'.'.join(map(str, path))}")


def state_dict(model: Model) -> dict[str, np.ndarray]:
    """The model's parameters as a Hugging Face state dict (names and layouts of transformers)."""
    variables = _variables(model)
    return {
        entry.name: from_flaxen(entry, [_array(variables, p) for p in entry.params])
        for entry in weight_layout(model.config, model.head_name)
    }


def save_pretrained(model: Model, path: str | os.PathLike, *, id2label=None, tokenizer=None) -> str:
    """Writes config.json + model.safetensors in Hugging Face layout; returns the directory.

    `transformers.AutoModel...from_pretrained(path)` loads the result with no missing or
    unexpected keys. id2label (dict or list) overrides the labels kept from loading; a
    `tokenizer` (transformers tokenizer) is saved alongside. Files are written to a temporary
    directory first and moved into place, so a failure leaves an earlier save untouched.
    """
    from safetensors.numpy import save_file

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"save_pretrained: {path} exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    config = _hf_config(model, id2label)
    tensors = state_dict(model)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        os.chmod(staging, 0o755)
        save_file(tensors, os.path.join(staging, SAFETENSORS_FILE), metadata={"format": "pt"})
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if not os.path.exists(path):
            os.rename(staging, path)
            return path
        for name in sorted(os.listdir(staging), key=lambda n: n == "config.json"):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return path


# ----------------------------------------------------------------------------- the registered families
# Each module calls register(HFFamily(...)) when imported; a new family is its file plus one line here.
from models import bert_hf, gpt2_hf, roberta_hf, t5_hf  # noqa: E402,F401  (registration)
