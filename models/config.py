"""Typed model configuration shared by every architecture in models/.

One dataclass describes both families: `family="bert"` (post-LN encoder, exact GELU, token types,
pooler) and `family="gpt2"` (pre-LN decoder, tanh GELU, causal attention, tied LM head). The YAML
files in configs/model/ fill it; `models.hf` maps it to and from Hugging Face `config.json`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

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

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r}: expected one of {', '.join(FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")

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
        return dataclasses.asdict(self)
