"""Typed configs of the parameter-efficient fine-tuning methods (configs/peft/*.yaml).

Why: one frozen dataclass per method names exactly the knobs that method reads, so a key meant
for another method (or misspelled) fails at start-up naming `peft.<key>`, and the config can sit
on the model as hashable static metadata (`model.peft_config`) that adapter checkpoints record.

`name` selects the method: none | lora | adapter | prefix | bitfit. Every method but `none`
trains the task head in full; `modules_to_save` adds base modules trained in full (name patterns
as for LoRA targets, e.g. `pooler`). Name patterns match a module's dotted path: `query` (a
suffix at a dot boundary), `attention.out` or a glob such as `layers.1.*`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Union

from models.errors import ConfigError

METHODS = ("none", "lora", "adapter", "prefix", "bitfit")
ACTIVATIONS = ("gelu", "relu", "tanh", "swish")


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


PeftConfig = Union[NoPeftConfig, LoRAConfig, AdapterConfig, PrefixConfig, BitFitConfig]
CONFIG_CLASSES = {
    "none": NoPeftConfig,
    "lora": LoRAConfig,
    "adapter": AdapterConfig,
    "prefix": PrefixConfig,
    "bitfit": BitFitConfig,
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
    for key in ("target_modules", "modules_to_save"):
        if key in values:
            values[key] = _patterns(key, values[key])
    if isinstance(values.get("alpha"), int) and not isinstance(values.get("alpha"), bool):
        values["alpha"] = float(values["alpha"])
    return validate(cls(**values))


def to_dict(config: PeftConfig) -> dict:
    """The config as JSON-ready plain values (lists for patterns)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
