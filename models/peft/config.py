"""Typed configs of the parameter-efficient fine-tuning methods (configs/peft/*.yaml).

Why: one frozen dataclass per method names exactly the knobs that method reads, so a key meant
for another method (or misspelled) fails at start-up naming `peft.<key>`, and the config can sit
on the model as hashable static metadata (`model.peft_config`) that adapter checkpoints record.

`name` selects the method: none | lora | adapter | prefix | bitfit | adalora | prompt | ia3. Every method but `none`
trains the task head in full; `modules_to_save` adds base modules trained in full (name patterns
as for LoRA targets, e.g. `pooler`). Name patterns match a module's dotted path: `query` (a
suffix at a dot boundary), `attention.out` or a glob such as `layers.1.*`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Union

from models.errors import ConfigError

METHODS = ("none", "lora", "adapter", "prefix", "bitfit", "adalora", "prompt", "ia3")
PROMPT_INITS = ("random", "text")
ACTIVATIONS = ("gelu", "relu", "tanh", "swish")
BASE_QUANTIZATIONS = ("int8", "int4", "nf4")  # models.quant.SCHEMES


@dataclasses.dataclass(frozen=True)
class NoPeftConfig:
    """Full fine-tuning: every parameter trains."""

    name: str = "none"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA (Hu et al. 2021): W x + scaling · B A dropout(x) on the targeted Dense layers of every block.

    scaling = alpha / rank, or alpha / sqrt(rank) with `rslora` (Kalajdzievski 2023).
    target_modules: Dense layers inside a block: attention.query, attention.key, attention.value,
    attention.out, intermediate, output (name patterns, see the module docstring).
    """

    name: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    # QLoRA (Dettmers et al. 2023): the frozen base's block Dense kernels held quantized
    # (models.quant: none | int8 | int4 | nf4), dequantized in the forward; LoRA factors stay float32.
    # Group size (int4, nf4): 0 = the scheme's default (128 for int4, 64 for nf4).
    base_quantization: str = "none"
    base_quantization_group_size: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Houlsby adapters (Houlsby et al. 2019): a residual bottleneck embed -> size -> embed after the
    attention output projection and after the MLP output projection of every block.

    The up-projection starts at zero, so the adapted model starts equal to the base model;
    `train_layer_norm` also trains the LayerNorms, as in the paper.
    """

    name: str = "adapter"
    size: int = 64
    activation: str = "gelu"
    init_std: float = 0.01
    train_layer_norm: bool = True
    modules_to_save: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning (Li & Liang 2021): `length` learned key/value vectors prepended in every layer.

    With `reparameterize`, one MLP shared by all layers (embedding [length, embed] -> `hidden`
    -> tanh -> [length, layers, 2, embed]) produces the prefixes, as in the paper; otherwise
    they are free parameters [length, heads, head_dim] per layer. Initial prefixes have a
    standard deviation of about `init_std`.
    """

    name: str = "prefix"
    length: int = 20
    reparameterize: bool = False
    hidden: int = 512
    init_std: float = 0.02
    modules_to_save: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BitFitConfig:
    """BitFit (Ben Zaken et al. 2022): only bias terms train (and the task head).

    `include_layer_norm`: also the LayerNorm biases (the paper's setting); False keeps to the
    biases of Dense layers.
    """

    name: str = "bitfit"
    include_layer_norm: bool = True
    modules_to_save: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning (Lester et al. 2021; Hugging Face PEFT's PROMPT_TUNING): `num_virtual_tokens`
    learned embeddings prepended to the input embeddings (models.peft.prompt).

    prompt_tuning_init: `random` (N(0, init_std²); 1.0 is PEFT's default) or `text`: the word
    embeddings of `prompt_tuning_init_text` as the run's tokenizer encodes it (special tokens
    included), its ids repeated or cut to num_virtual_tokens.
    """

    name: str = "prompt"
    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "random"
    prompt_tuning_init_text: Optional[str] = None
    init_std: float = 1.0
    modules_to_save: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """IA³ (Liu et al. 2022; Hugging Face PEFT's IA3): learned vectors, starting at one, that rescale
    the output features of the targeted Dense layers of every block, or, for those also matched by
    `feedforward_modules`, their input features (the MLP output layer's input: the activation).

    Patterns as for LoRA targets (attention.query, attention.key, attention.value, attention.out,
    intermediate, output). Defaults: keys, values and the feed-forward activation, as in the paper.
    Every feedforward module must be a target. The vectors fold into the weights (peft.merge).
    """

    name: str = "ia3"
    target_modules: tuple[str, ...] = ("key", "value", "output")
    feedforward_modules: tuple[str, ...] = ("output",)
    modules_to_save: tuple[str, ...] = ()


def _validate_prompt(config: PromptTuningConfig) -> None:
    _check("num_virtual_tokens", _is_int(config.num_virtual_tokens) and config.num_virtual_tokens >= 1,
           "a positive integer", config.num_virtual_tokens)
    _check("prompt_tuning_init", config.prompt_tuning_init in PROMPT_INITS, f"one of {', '.join(PROMPT_INITS)}",
           config.prompt_tuning_init)
    text = config.prompt_tuning_init_text
    if config.prompt_tuning_init == "text":
        _check("prompt_tuning_init_text", isinstance(text, str) and text.strip() != "",
               "a non-empty text with prompt_tuning_init=text", text)
    else:
        _check("prompt_tuning_init_text", text is None, "null unless prompt_tuning_init=text", text)
    _check("init_std", _is_number(config.init_std) and config.init_std > 0, "a positive number", config.init_std)


def _validate_ia3(config: IA3Config) -> None:
    _check("target_modules", len(config.target_modules) > 0, "at least one module name pattern",
           list(config.target_modules))


@dataclasses.dataclass(frozen=True)
class AdaLoRAConfig:
    """AdaLoRA (Zhang et al. 2023) with Hugging Face PEFT's AdaLoraConfig semantics: the SVD-form
    update W x + B (A ⊙ E) dropout(x) · lora_alpha / (init_r + 1e-5) on the targeted Dense layers,
    whose rank budget shrinks from init_r to target_r per layer on average during training.

    The budget (init_r · layers) holds for `tinit` steps, falls along a cubic to target_r · layers
    at step total_step - tfinal, and every `deltaT` steps on the way the singular values of lowest
    importance (sensitivity |w·g| smoothed with beta1, times its uncertainty smoothed with beta2)
    are set to zero; after that the final allocation stays fixed. orth_reg_weight weighs the
    orthogonality regulariser of the singular vectors. total_step: null = the run's `steps`.
    The training rules live in flaxen's AdaLoRA update rule; the model holds the SVD-form layers.
    """

    name: str = "adalora"
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    modules_to_save: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        """lora_alpha / (init_r + 1e-5): Hugging Face PEFT's scaling / (ranknum + 1e-5)."""
        return self.lora_alpha / (self.init_r + 1e-5)


def _validate_adalora(config: AdaLoRAConfig) -> None:
    _check("init_r", _is_int(config.init_r) and config.init_r >= 2, "an integer >= 2", config.init_r)
    _check("target_r", _is_int(config.target_r) and 1 <= config.target_r < config.init_r,
           f"an integer in [1, init_r={config.init_r})", config.target_r)
    for key in ("tinit", "tfinal"):
        value = getattr(config, key)
        _check(key, _is_int(value) and value >= 0, "a non-negative integer (steps)", value)
    _check("deltaT", _is_int(config.deltaT) and config.deltaT >= 1, "a positive integer (steps)", config.deltaT)
    for key in ("beta1", "beta2"):
        value = getattr(config, key)
        _check(key, _is_number(value) and 0 < value < 1, "a number in (0, 1)", value)
    _check("orth_reg_weight", _is_number(config.orth_reg_weight) and config.orth_reg_weight >= 0,
           "a non-negative number", config.orth_reg_weight)
    _check("lora_alpha", _is_number(config.lora_alpha) and config.lora_alpha > 0, "a positive number",
           config.lora_alpha)
    _check("lora_dropout", _is_number(config.lora_dropout) and 0 <= config.lora_dropout < 1, "a rate in [0, 1)",
           config.lora_dropout)
    _check("target_modules", len(config.target_modules) > 0, "at least one module name pattern",
           list(config.target_modules))
    total = config.total_step
    _check("total_step", total is None or (_is_int(total) and total >= 1),
           "a positive integer, or null for the run's steps", total)
    if total is not None and config.tinit >= total - config.tfinal:
        raise ConfigError(f"peft.tinit={config.tinit}, peft.tfinal={config.tfinal}: expected tinit < total_step - "
                          f"tfinal = {total - config.tfinal} (total_step={total}), so that the rank budget has steps "
                          "to fall in; lower tinit or tfinal, or train longer")


def for_run(values: Any, steps: int) -> Any:
    """The config of a training run of `steps` updates: settings that default to the run's length
    (AdaLoRA's total_step) are filled in, then checked against it. Raises ConfigError."""
    config = from_dict(values)
    if isinstance(config, AdaLoRAConfig) and config.total_step is None:
        config = validate(dataclasses.replace(config, total_step=int(steps)))
    return config


PeftConfig = Union[NoPeftConfig, LoRAConfig, AdapterConfig, PrefixConfig, BitFitConfig, AdaLoRAConfig,
                   PromptTuningConfig, IA3Config]
CONFIG_CLASSES = {
    "none": NoPeftConfig,
    "lora": LoRAConfig,
    "adapter": AdapterConfig,
    "prefix": PrefixConfig,
    "bitfit": BitFitConfig,
    "adalora": AdaLoRAConfig,
    "prompt": PromptTuningConfig,
    "ia3": IA3Config,
}


def _plain(value: Any) -> Any:
    """OmegaConf containers (or any mapping / sequence) -> plain Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def _check(key: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"peft.{key}={value!r}: expected {expected}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _patterns(key: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    _check(key, isinstance(value, list) and all(isinstance(v, str) and v for v in value),
           "a list of module name patterns", value)
    return tuple(value)


def validate(config: PeftConfig) -> PeftConfig:
    """Range and type checks beyond the field names; raises ConfigError naming `peft.<key>`."""
    if isinstance(config, LoRAConfig):
        _check("rank", _is_int(config.rank) and config.rank >= 1, "a positive integer", config.rank)
        _check("alpha", _is_number(config.alpha) and config.alpha > 0, "a positive number", config.alpha)
        _check("dropout", _is_number(config.dropout) and 0 <= config.dropout < 1, "a rate in [0, 1)", config.dropout)
        _check("target_modules", len(config.target_modules) > 0, "at least one module name pattern",
               list(config.target_modules))
        _check("rslora", isinstance(config.rslora, bool), "true or false", config.rslora)
        _check("base_quantization", config.base_quantization in ("none",) + BASE_QUANTIZATIONS,
               f"one of none, {', '.join(BASE_QUANTIZATIONS)}", config.base_quantization)
        group = config.base_quantization_group_size
        _check("base_quantization_group_size", _is_int(group) and group >= 0 and group % 2 == 0,
               "0 (the scheme's default) or an even positive integer", group)
        _check("base_quantization_group_size", group == 0 or config.base_quantization in ("int4", "nf4"),
               "0 unless peft.base_quantization is int4 or nf4 (int8 has one scale per output channel)", group)
    elif isinstance(config, AdapterConfig):
        _check("size", _is_int(config.size) and config.size >= 1, "a positive integer", config.size)
        _check("activation", config.activation in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}", config.activation)
        _check("init_std", _is_number(config.init_std) and config.init_std >= 0, "a non-negative number",
               config.init_std)
        _check("train_layer_norm", isinstance(config.train_layer_norm, bool), "true or false",
               config.train_layer_norm)
    elif isinstance(config, PrefixConfig):
        _check("length", _is_int(config.length) and config.length >= 1, "a positive integer", config.length)
        _check("reparameterize", isinstance(config.reparameterize, bool), "true or false", config.reparameterize)
        _check("hidden", _is_int(config.hidden) and config.hidden >= 1, "a positive integer", config.hidden)
        _check("init_std", _is_number(config.init_std) and config.init_std > 0, "a positive number",
               config.init_std)
    elif isinstance(config, BitFitConfig):
        _check("include_layer_norm", isinstance(config.include_layer_norm, bool), "true or false",
               config.include_layer_norm)
    elif isinstance(config, AdaLoRAConfig):
        _validate_adalora(config)
    elif isinstance(config, PromptTuningConfig):
        _validate_prompt(config)
    elif isinstance(config, IA3Config):
        _validate_ia3(config)
    return config


def from_dict(values: Mapping | PeftConfig | None) -> PeftConfig:
    """A config mapping (dict, OmegaConf DictConfig, a configs/peft/*.yaml) -> its dataclass.

    None means full fine-tuning. Unknown keys raise ConfigError listing the method's keys.
    """
    if values is None:
        return NoPeftConfig()
    if isinstance(values, tuple(CONFIG_CLASSES.values())):
        return validate(values)
    if not isinstance(values, Mapping):
        raise ConfigError(f"peft: expected a mapping with a 'name' key (one of {', '.join(METHODS)}), "
                          f"got {type(values).__name__}")
    values = _plain(values)
    name = values.get("name", "none")
    if name not in CONFIG_CLASSES:
        raise ConfigError(f"peft.name={name!r}: expected one of {', '.join(METHODS)}")
    cls = CONFIG_CLASSES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"peft.{unknown[0]} is not a setting of peft.name={name!r}; its settings are: {', '.join(sorted(fields))}"
        )
    for key in ("target_modules", "modules_to_save", "feedforward_modules"):
        if key in values:
            values[key] = _patterns(key, values[key])
    for field in dataclasses.fields(cls):  # YAML writes 16 for 16.0: float settings hold floats
        if field.type == "float" and _is_int(values.get(field.name)):
            values[field.name] = float(values[field.name])
    return validate(cls(**values))


def to_dict(config: PeftConfig) -> dict:
    """The config as JSON-ready plain values (lists for patterns)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
