"""Parameter-efficient fine-tuning for flaxen models: LoRA, Houlsby adapters, prefix tuning, BitFit, AdaLoRA,
prompt tuning, IA³.

Why: fine-tuning a model fully costs a copy of it in optimizer state; these methods train a few
percent of the weights (plus the task head) while the base model stays frozen.

    from models import peft
    model = peft.apply(model, cfg, rngs=nnx.Rngs(0))   # cfg: configs/peft/*.yaml mapping or a config dataclass
    trainable = peft.trainable_filter(model)            # nnx filter: PEFT params + task head (+ biases, norms)
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    peft.parameter_counts(model, trainable)            # {'trainable', 'total', 'trainable_percent'}
    merged = peft.merge(model)                          # LoRA / IA³ folded into a plain models.Model
    peft.save_adapter(model, path); peft.load_adapter(base_model, path)
    peft.export_hf_peft(model, path)                    # adapter_config.json + adapter_model.safetensors

`apply` changes the model in place (and returns it): adapted layers become subclasses of the
layers they replace, holding the same base parameters under the same paths, plus new
`PeftParam` variables (models.peft.variables) named with the logical axes of the layer they
adapt. The config is kept on the model as `model.peft_config`. Prompt tuning makes the backbone a
subclass of its own class in the same way (models.peft.prompt); its text initialisation needs the
run's tokenizer: `peft.apply(model, cfg, tokenizer=...)`.
"""
from __future__ import annotations

import math
from typing import Any

from flax import nnx

from models.errors import ConfigError
from models import quant
from models.layers import LayerNorm
from models.peft import targets
from models.peft.adalora import AdaLoRADense, AdaLoRAParam, adalora_layers, apply_adalora
from models.peft.adapter import AdapterDense, apply_adapters
from models.peft.checkpoint import load_adapter, save_adapter
from models.peft.config import (
    AdaLoRAConfig,
    AdapterConfig,
    BitFitConfig,
    LoRAConfig,
    NoPeftConfig,
    PeftConfig,
    IA3Config,
    PrefixConfig,
    PromptTuningConfig,
    for_run,
    from_dict,
    to_dict,
)
from models.peft.hf_export import export_hf_peft
from models.peft.ia3 import IA3Dense, apply_ia3
from models.peft.lora import LoRADense, QLoRADense, apply_lora, quantize_base
from models.peft.merge import merge
from models.peft.prefix import PrefixSelfAttention, apply_prefix
from models.peft.prompt import PromptBackbone, apply_prompt
from models.peft.variables import AdapterParam, IA3Param, LoRAParam, PeftParam, PrefixParam, PromptParam

__all__ = [
    "apply", "trainable_filter", "parameter_counts", "config_of", "merge", "save_adapter", "load_adapter",
    "export_hf_peft", "from_dict", "to_dict", "PeftConfig", "NoPeftConfig", "LoRAConfig", "AdapterConfig",
    "PrefixConfig", "BitFitConfig", "PeftParam", "LoRAParam", "AdapterParam", "PrefixParam", "LoRADense",
    "QLoRADense",
    "AdapterDense", "PrefixSelfAttention",
    "AdaLoRAConfig", "AdaLoRADense", "AdaLoRAParam", "adalora_layers", "for_run",
    "PromptTuningConfig", "IA3Config", "PromptParam", "IA3Param", "PromptBackbone", "IA3Dense",
]


def config_of(model) -> PeftConfig:
    """The PEFT config applied to `model` (NoPeftConfig for a plain model)."""
    return getattr(model, "peft_config", None) or NoPeftConfig()


def apply(model, config: Any, *, rngs: nnx.Rngs | None = None, seed: int = 0, tokenizer: Any = None,
          restoring: bool = False):
    """Adds the PEFT method of `config` to `model` in place and returns the model.

    config: a configs/peft/*.yaml mapping (dict or OmegaConf) or a config dataclass; None = none.
    rngs: initialises the new parameters (default nnx.Rngs(seed)). A model gets one method once.
    tokenizer: text -> token ids (a callable returning ids, or a Hugging Face tokenizer), for
    prompt tuning's `prompt_tuning_init: text`. restoring: the new parameters' values are about to
    be replaced (a checkpoint or adapter restore, an abstract model), so an initialisation that
    needs outside input (the text's ids) is skipped for random values of the same shape.
    """
    config = from_dict(config)
    current = config_of(model)
    if not isinstance(current, NoPeftConfig):
        raise ConfigError(
            f"peft.name={config.name!r}: the model already has peft.name={current.name!r} applied; "
            "apply PEFT to a plain model"
        )
    if not hasattr(model, "backbone") or not hasattr(model.backbone, "layers"):
        raise ConfigError(f"peft.apply expects a models.Model, got {type(model).__name__}")
    targets.module_paths(model, getattr(config, "modules_to_save", ()), "modules_to_save")
    rngs = rngs if rngs is not None else nnx.Rngs(seed)
    if isinstance(config, LoRAConfig):
        apply_lora(model, config, rngs)
        if config.base_quantization != "none":
            quantize_base(model, config)
    elif isinstance(config, AdapterConfig):
        apply_adapters(model, config, rngs)
    elif isinstance(config, PrefixConfig):
        apply_prefix(model, config, rngs)
    elif isinstance(config, AdaLoRAConfig):
        apply_adalora(model, config, rngs)
    elif isinstance(config, PromptTuningConfig):
        apply_prompt(model, config, rngs, tokenizer=tokenizer, restoring=restoring)
    elif isinstance(config, IA3Config):
        apply_ia3(model, config, rngs)
    model.peft_config = config
    return model


def _norm_paths(model) -> set[tuple]:
    return {tuple(path) for path, module in model.iter_modules() if isinstance(module, LayerNorm)}


def trainable_filter(model, config: Any = None):
    """An nnx filter (path, variable) -> bool selecting the parameters that train.

    none: every nnx.Param. Otherwise: PeftParam variables, the task head, modules matched by
    `modules_to_save`, and per method: LayerNorms (adapter with train_layer_norm), biases
    (bitfit; LayerNorm biases only with include_layer_norm). `config` defaults to the one applied.
    """
    config = config_of(model) if config is None else from_dict(config)
    if isinstance(config, NoPeftConfig):
        return nnx.Param
    full = [("head",)] + targets.module_paths(model, config.modules_to_save, "modules_to_save")
    norms = _norm_paths(model)
    train_norms = isinstance(config, AdapterConfig) and config.train_layer_norm
    bitfit = isinstance(config, BitFitConfig)
    bitfit_norms = bitfit and config.include_layer_norm

    def is_trainable(path, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        if isinstance(variable, PeftParam):
            return True
        path = tuple(path)
        if any(path[: len(prefix)] == prefix for prefix in full):
            return True
        in_norm = path[:-1] in norms
        if train_norms and in_norm:
            return True
        return bitfit and path[-1] == "bias" and (bitfit_norms or not in_norm)

    return is_trainable


def parameter_counts(model, trainable: Any = None) -> dict:
    """{'trainable': n, 'total': n, 'trainable_percent': 100 n/N} over the model's nnx.Param values.

    Totals include the PEFT parameters; a parameter shared by several layers counts once. A
    quantized frozen base (QLoRA, models.quant) counts the float weights its codes encode.
    """
    trainable = trainable_filter(model) if trainable is None else trainable
    predicate = nnx.filterlib.to_predicate(trainable)
    total, count = quant.encoded_parameter_count(model), 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = math.prod(variable.shape)
        total += size
        if predicate(path, variable):
            count += size
    return {"trainable": count, "total": total, "trainable_percent": 100.0 * count / max(total, 1)}
