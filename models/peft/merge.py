"""Folding LoRA into the base weights: a plain models.Model with the PEFT model's outputs.

Why: a merged model runs at the base model's speed, needs no flaxen PEFT code to use, and saves
with `models.save_pretrained` into a directory PyTorch transformers loads.

kernel' = kernel + scaling · A · B for every LoRA layer and kernel + scaling · (A ⊙ E) · B for every
AdaLoRA layer (float32, as Hugging Face PEFT merges them); other parameters (a trained head,
BitFit biases) are copied; a quantized base (QLoRA) contributes its dequantized kernels. IA³ vectors scale the kernel's output columns and the bias (keys,
values) or the kernel's input rows (feed-forward modules), as Hugging Face PEFT merges them.
Adapters, prefixes and prompts add computation (or input positions) that no base weight can
express, so those models cannot be merged.
"""
from __future__ import annotations

from flax import nnx

from models import quant
from models.errors import ConfigError
from models.model import Model
from models.peft.config import AdapterConfig, PrefixConfig, PromptTuningConfig
from models.peft.ia3 import ia3_layers
from models.peft.adalora import adalora_layers
from models.peft.lora import lora_layers
from models.peft.variables import PeftParam


def _params(model) -> dict[tuple, nnx.Variable]:
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


def merge(model) -> Model:
    """A new plain Model whose outputs equal `model`'s; `model` itself is left unchanged.

    Works for LoRA, AdaLoRA, IA³, BitFit and no PEFT; adapter, prefix and prompt models raise ConfigError.
    """
    config = getattr(model, "peft_config", None)
    if isinstance(config, (AdapterConfig, PrefixConfig, PromptTuningConfig)):
        raise ConfigError(
            f"peft.name={config.name!r}: only LoRA, AdaLoRA, IA³ (and BitFit) models can be merged into plain "
            "weights; adapters, prefixes and prompts add computation that the base layers cannot express"
        )
    values = {path: v[...] for path, v in _params(model).items() if not isinstance(v, PeftParam)}
    values = quant.float_values(model, values)  # a quantized base (QLoRA): its dequantized kernels
    for path, layer in lora_layers(model) + adalora_layers(model):
        values[path + ("kernel",)] = values[path + ("kernel",)] + layer.delta()
    for path, layer in ia3_layers(model):
        kernel, bias = layer.merged_weights()
        values[path + ("kernel",)] = kernel
        if bias is not None:
            values[path + ("bias",)] = bias
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
