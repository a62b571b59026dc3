"""Folding LoRA into the base weights: a plain models.Model with the PEFT model's outputs.

Why: a merged model runs at the base model's speed, needs no flaxen PEFT code to use, and saves
with `models.save_pretrained` into a directory PyTorch transformers loads.

kernel' = kernel + scaling · A · B for every LoRA layer (float32); other parameters (a trained
head, BitFit biases) are copied. Adapters and prefixes add computation that no base weight can
express, so those models cannot be merged.
"""
from __future__ import annotations

from flax import nnx

from models.errors import ConfigError
from models.model import Model
from models.peft.config import AdapterConfig, PrefixConfig
from models.peft.lora import lora_layers
from models.peft.variables import PeftParam


def _params(model) -> dict[tuple, nnx.Variable]:
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


def merge(model) -> Model:
    """A new plain Model whose outputs equal `model`'s; `model` itself is left unchanged.

    Works for LoRA, BitFit and no PEFT; adapter and prefix models raise ConfigError.
    """
    config = getattr(model, "peft_config", None)
    if isinstance(config, (AdapterConfig, PrefixConfig)):
        raise ConfigError(
            f"peft.name={config.name!r}: only LoRA (and BitFit) models can be merged into plain weights; "
            "adapters and prefixes add computation that the base layers cannot express"
        )
    values = {path: v[...] for path, v in _params(model).items() if not isinstance(v, PeftParam)}
    for path, layer in lora_layers(model):
        values[path + ("kernel",)] = layer.kernel[...] + layer.delta()
    num_labels = model.num_labels if model.num_labels is not None else 2
    plain = nnx.eval_shape(lambda: Model(model.config, model.head_name, num_labels, rngs=nnx.Rngs(0)))
    slots = _params(plain)
    if set(slots) != set(values):
        raise ValueError(f"merge: parameter paths differ from a plain model's: {sorted(set(slots) ^ set(values))}")
    for path, slot in slots.items():
        slot.set_value(values[path])
    if hasattr(model, "hf_metadata"):
        plain.hf_metadata = model.hf_metadata
    return plain
