"""Typed model configuration shared by every architecture in models/.

One dataclass describes both families: `family="bert"` (post-LN encoder, exact GELU, token types,
pooler) and `family="gpt2"` (pre-LN decoder, tanh GELU, causal attention, tied LM head). The YAML
files in configs/model/ fill it; `models.hf` maps it to and from Hugging Face `config.json`.

`pruned_heads` ({layer: [head, ...]}, as Hugging Face's `config.pruned_heads`) names the attention
heads removed from each layer (models.prune.prune_heads), in the original numbering 0 ..
num_heads - 1: layer i keeps `heads_in_layer(i)` heads of `head_dim` each, and its query/key/value
kernels are [embed, heads_in_layer(i), head_dim], its output kernel [heads_in_layer(i), head_dim,
embed]. Every layer keeps at least one head. Stored as a sorted tuple of (layer, heads) pairs so
the config stays hashable; `to_dict` gives the mapping.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional

import jax.numpy as jnp

from models.errors import ConfigError

FAMILIES = ("bert", "gpt2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: Optional[float] = None
    pad_token_id: int = 0
    dtype: str = "float32"
    remat: bool = False
    initializer_range: float = 0.02
    # False: no biases in the Transformer stack's projections and LayerNorms (nanoGPT's bias=False;
    # task heads and BERT's pooler keep theirs). Hugging Face export writes zero biases there,
    # which give the same outputs.
    use_bias: bool = True
    # {layer: [original head indices removed]}; None: every layer has num_heads heads
    pruned_heads: Optional[Dict[int, List[int]]] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r}: expected one of {', '.join(FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
        object.__setattr__(self, "pruned_heads", normalise_pruned_heads(self.pruned_heads, self.num_layers,
                                                                         self.num_heads))

    def pruned_in_layer(self, layer: int) -> tuple[int, ...]:
        """The original indices of the heads removed from `layer` (sorted)."""
        return dict(self.pruned_heads or ()).get(layer, ())

    def kept_heads(self, layer: int) -> tuple[int, ...]:
        """The original indices of the heads `layer` keeps, in order."""
        pruned = set(self.pruned_in_layer(layer))
        return tuple(h for h in range(self.num_heads) if h not in pruned)

    def heads_in_layer(self, layer: int) -> int:
        return self.num_heads - len(self.pruned_in_layer(layer))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Builds a config from a mapping, ignoring keys that are not architecture fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["pruned_heads"] = None if self.pruned_heads is None else {
            layer: list(heads) for layer, heads in self.pruned_heads}
        return values


def normalise_pruned_heads(value, num_layers: int, num_heads: int):
    """`pruned_heads` given as a mapping {layer: heads} (keys may be strings, as in config.json) or
    as (layer, heads) pairs -> a sorted tuple of (layer, sorted tuple of heads) pairs without empty
    layers, or None when no head is pruned. ConfigError for a layer or head out of range, or a layer
    left without heads."""
    if value is None:
        return None
    pairs = value.items() if isinstance(value, Mapping) else value
    merged: dict[int, set[int]] = {}
    try:
        for layer, heads in pairs:
            merged.setdefault(int(layer), set()).update(int(h) for h in heads)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.pruned_heads={value!r}: expected a mapping {{layer: [head, ...]}}") from error
    for layer, heads in merged.items():
        if not 0 <= layer < num_layers:
            raise ConfigError(f"model.pruned_heads: layer {layer} is out of range (the model has {num_layers} layers)")
        bad = sorted(h for h in heads if not 0 <= h < num_heads)
        if bad:
            raise ConfigError(f"model.pruned_heads: head {bad[0]} of layer {layer} is out of range (each layer has "
                              f"{num_heads} heads, 0 .. {num_heads - 1})")
        if len(heads) == num_heads:
            raise ConfigError(f"model.pruned_heads: layer {layer} would keep none of its {num_heads} heads; keep at "
                              "least one head per layer")
    pairs = tuple((layer, tuple(sorted(heads))) for layer, heads in sorted(merged.items()) if heads)
    return pairs or None
