"""LoRA export in Hugging Face PEFT format, for PyTorch `peft.PeftModel.from_pretrained(base, path)`.

Why: a LoRA trained in flaxen should serve where PyTorch users are, on the same base model
directory (one saved with `models.save_pretrained`, or the Hugging Face original).

Writes adapter_config.json (peft_type LORA; target_modules are the exact Hugging Face module
names) and adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight`
[rank, in] and `.lora_B.weight` [out, rank]; the trained task head (and any `modules_to_save`)
is saved whole under its Hugging Face name and listed in `modules_to_save`. Names and layouts
come from models.hf.weight_layout.

GPT-2 fuses query/key/value into one `c_attn` layer [embed, 3 embed]; flaxen's separate LoRA
factors on them become one LoRA of rank r_q + r_k + r_v on c_attn: A stacked, B block-diagonal.
Each module's scaling is folded into its B (B_hf = B · scaling / scaling_hf), so the exported
update equals flaxen's whatever rank the module gets (`rank_pattern` records fused ranks).
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from models import hf
from models.errors import ConfigError
from models.heads import HEADS
from models.peft.checkpoint import trainable_variables, write_directory
from models.peft.config import LoRAConfig
from models.peft.lora import lora_layers
from models.peft.variables import PeftParam

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _hf_scaling(config: LoRAConfig, rank: int) -> float:
    return config.alpha / (math.sqrt(rank) if config.rslora else rank)


def _lora_tensors(model, config: LoRAConfig, entry_of: dict) -> tuple[dict, list, dict]:
    """LoRA factors per Hugging Face module -> (tensors, target module names, rank_pattern)."""
    layers = {path + ("kernel",): layer for path, layer in lora_layers(model)}
    tensors, modules, rank_pattern = {}, [], {}
    for entry in {id(entry_of[p]): entry_of[p] for p in layers}.values():
        module = entry.name.removesuffix(".weight")
        parts = [layers.get(p) for p in entry.params]
        present = [layer for layer in parts if layer is not None]
        rank = sum(layer.lora_a.shape[-1] for layer in present)
        fan_in = math.prod(present[0].in_shape)
        fan_out = [math.prod(entry_out) for entry_out in (_out_shape(model, p) for p in entry.params)]
        a_rows, b = [], np.zeros((sum(fan_out), rank), np.float32)
        column = 0
        for i, layer in enumerate(parts):
            if layer is None:
                continue
            r = layer.lora_a.shape[-1]
            a_rows.append(np.asarray(layer.lora_a[...], np.float32).reshape(fan_in, r).T)
            row = sum(fan_out[:i])
            block = np.asarray(layer.lora_b[...], np.float32).reshape(r, fan_out[i]).T
            b[row:row + fan_out[i], column:column + r] = block * (layer.scaling / _hf_scaling(config, rank))
            column += r
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.concatenate(a_rows, axis=0))
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        modules.append(module)
        if rank != config.rank:
            rank_pattern[re.escape(module)] = rank
    return tensors, sorted(modules), rank_pattern


def _out_shape(model, kernel_path: tuple) -> tuple:
    node = model
    for key in kernel_path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node.out_shape


def _saved_modules(model, entry_of: dict) -> tuple[dict, list]:
    """Trained base parameters (task head, modules_to_save) -> (tensors, Hugging Face module names)."""
    trained = {path: v for path, v in trainable_variables(model).items() if not isinstance(v, PeftParam)}
    tensors, modules = {}, set()
    for path in trained:
        entry = entry_of.get(path)
        if entry is None:
            raise ConfigError(f"export_hf_peft: trained parameter {'.'.join(map(str, path))} has no Hugging Face "
                              "counterpart; remove it from peft.modules_to_save to export")
        missing = [p for p in entry.params if p not in trained]
        if missing:
            raise ConfigError(f"export_hf_peft: {entry.name} needs {'.'.join(map(str, missing[0]))} trained too")
        arrays = [np.asarray(trained[p][...], np.float32) for p in entry.params]
        tensors[PREFIX + entry.name] = hf.from_flaxen(entry, arrays)
        modules.add(entry.name.rsplit(".", 1)[0])
    return tensors, sorted(modules)


def export_hf_peft(model, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> str:
    """Writes a LoRA model's adapter in Hugging Face PEFT format to directory `path`; returns it.

    The base model for PyTorch is the flaxen model without LoRA in Hugging Face layout (e.g. the
    directory it was loaded from). Heads: none (task_type null) and those with a
    models.heads.HeadSpec.peft_task_type (seq_cls, token_cls, causal_lm).
    """
    from safetensors.numpy import save_file

    config = getattr(model, "peft_config", None)
    if not isinstance(config, LoRAConfig):
        name = getattr(config, "name", "none")
        raise ConfigError(f"export_hf_peft: peft.name={name!r}; only LoRA models export to Hugging Face PEFT format")
    exportable = [name for name, spec in HEADS.items() if name is None or spec.peft_task_type is not None]
    if model.head_name not in exportable:
        raise ConfigError(f"export_hf_peft: head={model.head_name!r} is not supported; expected one of "
                          f"{', '.join(repr(h) for h in exportable)}")
    layout = hf.weight_layout(model.config, model.head_name)
    entry_of = {p: entry for entry in layout for p in entry.params}
    tensors, target_modules, rank_pattern = _lora_tensors(model, config, entry_of)
    head_tensors, modules_to_save = _saved_modules(model, entry_of)
    tensors.update(head_tensors)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": HEADS[model.head_name].peft_task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "fan_in_fan_out": model.config.family == "gpt2",
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }

    def write(staging):
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            f.write("\n")

    return write_directory(path, write)

