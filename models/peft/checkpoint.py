"""Adapter-only checkpoints: the trained weights of a PEFT model, without the frozen base model.

Why: a LoRA checkpoint of a 110M-parameter model is a few hundred kilobytes; many task adapters
can share one base model directory.

A checkpoint is a directory with
    adapter.json          {"format": "flaxen-peft", "version": 1, "peft": {...}, "model": ModelConfig,
                           "head": ..., "num_labels": ..., "parameters": {name: shape}}
    adapter.safetensors   every trainable parameter (PEFT weights, task head, BitFit biases, ...),
                          float32, named by its dotted path in the model (e.g. backbone.layers.0.attention.query.lora_a)
`load_adapter(base, path)` applies the recorded method to a plain base model (or fills a model
that already carries the same method) after checking the architecture and head agree.
Directories are written to a temporary sibling and renamed, so a failure leaves an earlier
checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.errors import CheckpointError
from models.peft import config as peft_config

FORMAT = "flaxen-peft"
VERSION = 1
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
SHAPE_FREE_FIELDS = ("dtype", "remat", "hidden_dropout", "attention_dropout", "classifier_dropout",
                     "initializer_range")


def write_directory(path: str, write) -> str:
    """Calls write(staging_dir), then moves the staging directory to `path` (replacing it)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        write(staging)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "previous"))
            os.rename(staging, path)
            shutil.rmtree(old)
        else:
            os.rename(staging, path)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return path


def trainable_variables(model) -> dict[tuple, nnx.Variable]:
    """Path -> Variable of every trainable parameter (see peft.trainable_filter)."""
    from models.peft import trainable_filter

    predicate = nnx.filterlib.to_predicate(trainable_filter(model))
    return {
        tuple(path): variable
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if predicate(path, variable)
    }


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _variable_map(model) -> dict[str, nnx.Variable]:
    """Like trainable_variables but with the model's own Variable objects (to assign into)."""
    wanted = set(trainable_variables(model))
    return {dotted(path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable) and tuple(path) in wanted}


def save_adapter(model, path: str | os.PathLike) -> str:
    """Writes the model's trainable parameters and PEFT config to directory `path`; returns it."""
    from safetensors.numpy import save_file

    from models.peft import config_of

    config = config_of(model)
    if isinstance(config, peft_config.NoPeftConfig):
        raise CheckpointError(
            "save_adapter: the model has no PEFT method applied (peft.name='none'); save the whole model with "
            "models.save_pretrained"
        )
    tensors = {dotted(path): np.ascontiguousarray(np.asarray(v[...], np.float32))
               for path, v in trainable_variables(model).items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "peft": peft_config.to_dict(config),
        "model": model.config.to_dict(),
        "head": model.head_name,
        "num_labels": model.num_labels,
        "parameters": {name: list(t.shape) for name, t in sorted(tensors.items())},
    }

    def write(staging):
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": FORMAT})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")

    return write_directory(path, write)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The adapter.json of an adapter checkpoint, checked for format and version."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"adapter checkpoint {path} does not exist or is not a directory")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; expected a flaxen adapter checkpoint (peft.save_adapter)")
    try:
        with open(file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format={meta.get('format') if isinstance(meta, dict) else None!r}; "
                              f"expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{file}: version={meta.get('version')!r}; this flaxen reads version {VERSION}")
    for key in ("peft", "model", "head", "num_labels"):
        if key not in meta:
            raise CheckpointError(f"{file}: required key {key!r} is missing")
    return meta


def _check_model(model, meta: dict, file: str) -> None:
    saved = meta["model"]
    current = model.config.to_dict()
    for key, value in current.items():
        if key in SHAPE_FREE_FIELDS or key not in saved:
            continue
        if saved[key] != value:
            raise CheckpointError(
                f"{file}: the adapter was trained on a model with {key}={saved[key]!r}, but the base model has "
                f"{key}={value!r}"
            )
    if meta["head"] != model.head_name:
        raise CheckpointError(f"{file}: the adapter was trained with head={meta['head']!r}, but the base model has "
                              f"head={model.head_name!r}")
    if meta["num_labels"] != model.num_labels:
        raise CheckpointError(f"{file}: the adapter's head has num_labels={meta['num_labels']}, but the base model's "
                              f"has num_labels={model.num_labels}")


def load_adapter(model, path: str | os.PathLike):
    """Puts an adapter checkpoint onto `model` (in place) and returns the model.

    model: a plain base model (the method recorded in the checkpoint is applied first) or a
    model that already carries the same PEFT config. Mismatching architecture, head, config,
    parameter names or shapes raise CheckpointError.
    """
    from safetensors.numpy import load_file

    from models.peft import apply, config_of

    meta = read_adapter_config(path)
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    weights_file = os.path.join(os.fspath(path), WEIGHTS_FILE)
    _check_model(model, meta, file)
    try:
        config = peft_config.from_dict(meta["peft"])
    except Exception as error:
        raise CheckpointError(f"{file}: invalid 'peft' entry ({error})") from error
    current = config_of(model)
    if isinstance(current, peft_config.NoPeftConfig):
        apply(model, config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), restoring=True)
    elif current != config:
        raise CheckpointError(
            f"{file}: the adapter's config {peft_config.to_dict(config)} differs from the model's "
            f"{peft_config.to_dict(current)}"
        )
    if not os.path.isfile(weights_file):
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(weights_file)
    except Exception as error:
        raise CheckpointError(f"{weights_file}: cannot read safetensors file ({error})") from error
    slots = _variable_map(model)
    missing = sorted(set(slots) - set(tensors))
    extra = sorted(set(tensors) - set(slots))
    if missing or extra:
        raise CheckpointError(
            f"{weights_file}: parameter names do not match the model with this PEFT config"
            + (f"; missing: {', '.join(missing[:5])}" if missing else "")
            + (f"; unexpected: {', '.join(extra[:5])}" if extra else "")
        )
    for name, slot in slots.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(slot.shape):
            raise CheckpointError(f"{weights_file}: parameter {name} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(slot.shape)}")
        old = slot[...]
        new = jnp.asarray(value, old.dtype)
        sharding = getattr(old, "sharding", None)
        slot.set_value(jax.device_put(new, sharding) if sharding is not None else new)
    return model
