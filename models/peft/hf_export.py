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

AdaLoRA (peft_type ADALORA): keys `<module>.lora_A` [k, in], `.lora_E` [k, 1], `.lora_B` [out, k]
holding the k singular values each module kept (the non-zero E; pruning sets E to exactly 0), and
`rank_pattern` {"<module>.lora_E": [kept?] * init_r} as Hugging Face PEFT writes it after its
budget allocation. On GPT-2's c_attn the query/key/value factors are stacked as for LoRA; the
exported init_r is then the most singular values of any module, E absorbing the scaling change.

Prompt tuning (PROMPT_TUNING): `prompt_embeddings` [num_virtual_tokens, embed] and the trained
modules under `base_model.<name>`. IA³ (IA3): `<module>.ia3_l`, [out, 1] or, for
`feedforward_modules`, [1, in]; on GPT-2's c_attn the query/key/value vectors are concatenated.
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
from models.peft.adalora import adalora_layers
from models.peft.config import AdaLoRAConfig, IA3Config, LoRAConfig, PromptTuningConfig
from models.peft.ia3 import ia3_layers
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
    """Writes a LoRA, AdaLoRA, prompt-tuning or IA³ model's adapter in Hugging Face PEFT format to
    directory `path`; returns it.

    The base model for PyTorch is the flaxen model without its PEFT method in Hugging Face layout (e.g. the
    directory it was loaded from). Heads: none (task_type null) and those with a
    models.heads.HeadSpec.peft_task_type (seq_cls, token_cls, causal_lm).
    """
    config = getattr(model, "peft_config", None)
    if not isinstance(config, (LoRAConfig, AdaLoRAConfig, PromptTuningConfig, IA3Config)):
        name = getattr(config, "name", "none")
        raise ConfigError(f"export_hf_peft: peft.name={name!r}; only LoRA, AdaLoRA, prompt tuning and IA³ models "
                          "export to Hugging Face PEFT format")
    exportable = [name for name, spec in HEADS.items() if name is None or spec.peft_task_type is not None]
    if model.head_name not in exportable:
        raise ConfigError(f"export_hf_peft: head={model.head_name!r} is not supported; expected one of "
                          f"{', '.join(repr(h) for h in exportable)}")
    layout = hf.weight_layout(model.config, model.head_name)
    entry_of = {p: entry for entry in layout for p in entry.params}
    if isinstance(config, (PromptTuningConfig, IA3Config)):
        build = _prompt_tuning_export if isinstance(config, PromptTuningConfig) else _ia3_export
        tensors, adapter_config = build(model, config, entry_of, base_model_name_or_path)
        return _write_adapter(path, tensors, adapter_config)
    if isinstance(config, AdaLoRAConfig):
        tensors, fields = _adalora_config(model, config, entry_of)
        head_tensors, modules_to_save = _saved_modules(model, entry_of)
        tensors.update(head_tensors)
        return _write_adapter(path, tensors, {"task_type": HEADS[model.head_name].peft_task_type,
                                              "base_model_name_or_path": base_model_name_or_path,
                                              "modules_to_save": modules_to_save or None, **fields})
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
    return _write_adapter(path, tensors, adapter_config)


# ----------------------------------------------------------------------------------------- AdaLoRA

def _adalora_tensors(model, config: AdaLoRAConfig, entry_of: dict) -> tuple[dict, list, dict | None, int]:
    """AdaLoRA factors per Hugging Face module -> (tensors, target module names, rank_pattern, init_r).

    A module's slots are its singular values (init_r, or the sum over query/key/value on GPT-2's
    fused c_attn); the exported init_r is the most slots of any module, and E is rescaled by
    scaling / scaling_hf so the update is unchanged. A slot is kept when its E is not zero
    (pruning sets E to exactly 0); an adapter whose E are all zero (untrained) keeps every slot.
    rank_pattern is None when every module keeps all of init_r slots."""
    layers = {path + ("kernel",): layer for path, layer in adalora_layers(model)}
    untrained = not any(np.any(np.asarray(layer.lora_e[...])) for layer in layers.values())
    modules = []
    for entry in {id(entry_of[p]): entry_of[p] for p in layers}.values():
        parts = [layers.get(p) for p in entry.params]
        present = [layer for layer in parts if layer is not None]
        fan_in = math.prod(present[0].in_shape)
        fan_out = [math.prod(_out_shape(model, p)) for p in entry.params]
        a_rows, e_values, b_cols, keep = [], [], [], []
        for i, layer in enumerate(parts):
            if layer is None:
                continue
            r = layer.rank
            a_rows.append(np.asarray(layer.lora_a[...], np.float32).reshape(fan_in, r).T)
            e = np.asarray(layer.lora_e[...], np.float32)
            e_values.append(e * np.float32(layer.scaling))
            block = np.zeros((sum(fan_out), r), np.float32)
            row = sum(fan_out[:i])
            block[row:row + fan_out[i]] = np.asarray(layer.lora_b[...], np.float32).reshape(r, fan_out[i]).T
            b_cols.append(block)
            keep.append(np.ones(r, bool) if untrained else e != 0)
        modules.append((entry.name.removesuffix(".weight"), np.concatenate(a_rows, axis=0),
                        np.concatenate(e_values), np.concatenate(b_cols, axis=1), np.concatenate(keep)))
    init_r = max(len(keep) for *_, keep in modules)
    scaling_hf = config.lora_alpha / (init_r + 1e-5)
    pruned = any(len(keep) != init_r or not keep.all() for *_, keep in modules)
    tensors, rank_pattern = {}, {}
    for module, a, e, b, keep in modules:
        e = e / np.float32(scaling_hf)
        if pruned:
            a, e, b = a[keep], e[keep], b[:, keep]
            rank_pattern[f"{module}.lora_E"] = keep.tolist() + [False] * (init_r - len(keep))
        tensors[f"{PREFIX}{module}.lora_A"] = np.ascontiguousarray(a)
        tensors[f"{PREFIX}{module}.lora_E"] = np.ascontiguousarray(e.reshape(-1, 1))
        tensors[f"{PREFIX}{module}.lora_B"] = np.ascontiguousarray(b)
    return tensors, sorted(name for name, *_ in modules), (rank_pattern if pruned else None), init_r


def _adalora_config(model, config: AdaLoRAConfig, entry_of: dict) -> tuple[dict, dict]:
    """(tensors, adapter_config fields) of an AdaLoRA model, Hugging Face PEFT's AdaLoraConfig."""
    if config.total_step is None:
        raise ConfigError("export_hf_peft: peft.total_step is null; Hugging Face PEFT's AdaLoRA needs the run's "
                          "length: set peft.total_step (a training run fills it in from `steps`)")
    tensors, target_modules, rank_pattern, init_r = _adalora_tensors(model, config, entry_of)
    fields = {
        "peft_type": "ADALORA",
        "init_r": init_r,
        "target_r": config.target_r,
        "tinit": config.tinit,
        "tfinal": config.tfinal,
        "deltaT": config.deltaT,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "total_step": config.total_step,
        "rank_pattern": rank_pattern,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target_modules,
        "fan_in_fan_out": model.config.family == "gpt2",
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return tensors, fields


def _write_adapter(path, tensors: dict, adapter_config: dict) -> str:
    from safetensors.numpy import save_file

    def write(staging):
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            f.write("\n")

    return write_directory(path, write)


# ------------------------------------------------------------------------------ prompt tuning, IA³

def _prompt_tuning_export(model, config: PromptTuningConfig, entry_of: dict,
                          base_model_name_or_path: str | None) -> tuple[dict, dict]:
    """PROMPT_TUNING: `prompt_embeddings` [V, embed]; trained modules under `base_model.<name>` (a
    prompt-learning PeftModel wraps the transformers model directly). A text initialisation is
    recorded as TEXT with the base model as its tokenizer when `base_model_name_or_path` is given
    (PEFT refuses TEXT without a tokenizer name), else as RANDOM: loading never re-initialises."""
    from models.peft.prompt import prompt_backbone

    backbone = prompt_backbone(model)
    head_tensors, modules_to_save = _saved_modules(model, entry_of)
    tensors = {"base_model." + name.removeprefix(PREFIX): value for name, value in head_tensors.items()}
    tensors["prompt_embeddings"] = np.ascontiguousarray(np.asarray(backbone.prompt_embeddings[...], np.float32))
    text = config.prompt_tuning_init == "text" and base_model_name_or_path is not None
    c = model.config
    adapter_config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": HEADS[model.head_name].peft_task_type or "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": c.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": c.num_heads,
        "num_layers": c.num_layers,
        "prompt_tuning_init": "TEXT" if text else "RANDOM",
        "prompt_tuning_init_text": config.prompt_tuning_init_text if text else None,
        "tokenizer_name_or_path": base_model_name_or_path if text else None,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
    }
    return tensors, adapter_config


def _ia3_export(model, config: IA3Config, entry_of: dict, base_model_name_or_path: str | None) -> tuple[dict, dict]:
    """IA3: `<module>.ia3_l` [out, 1] (output scaling) or [1, in] (feed-forward input scaling) per
    Hugging Face module. GPT-2's fused c_attn takes the query/key/value vectors concatenated (ones
    for an unscaled part); input scaling cannot be fused there, since each part would need its own."""
    layers = {path + ("kernel",): layer for path, layer in ia3_layers(model)}
    tensors, modules, feedforward = {}, [], []
    for entry in {id(entry_of[p]): entry_of[p] for p in layers}.values():
        module = entry.name.removesuffix(".weight")
        parts = [layers.get(p) for p in entry.params]
        present = [layer for layer in parts if layer is not None]
        if len(entry.params) > 1 and any(layer.feedforward for layer in present):
            raise ConfigError(f"export_hf_peft: {module} fuses {len(entry.params)} flaxen layers; IA³ exports there only "
                              "as output scaling: remove them from peft.feedforward_modules to export")
        if present[0].feedforward:
            tensors[f"{PREFIX}{module}.ia3_l"] = np.asarray(present[0].ia3_scale[...], np.float32).reshape(1, -1)
            feedforward.append(module)
        else:
            vectors = [np.ones(math.prod(_out_shape(model, p)), np.float32) if layer is None
                       else np.asarray(layer.ia3_scale[...], np.float32).reshape(-1)
                       for p, layer in zip(entry.params, parts)]
            tensors[f"{PREFIX}{module}.ia3_l"] = np.concatenate(vectors).reshape(-1, 1)
        modules.append(module)
    head_tensors, modules_to_save = _saved_modules(model, entry_of)
    tensors.update(head_tensors)
    adapter_config = {
        "peft_type": "IA3",
        "task_type": HEADS[model.head_name].peft_task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(modules),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": model.config.family == "gpt2",
        "init_ia3_weights": True,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
    }
    return tensors, adapter_config
