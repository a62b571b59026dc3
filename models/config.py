"""Typed model configuration shared by every architecture in models/.

One dataclass describes every family: `family="bert"` (post-LN encoder, exact GELU, token types,
pooler), `family="roberta"` (the BERT encoder with RoBERTa's padding-offset positions and
first-token classification head; models.bert.RobertaEncoder), `family="gpt2"` (pre-LN decoder,
tanh GELU, causal attention, tied LM head) and
`family="t5"` (encoder-decoder with relative position buckets and RMS norms; models.t5). The YAML
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

FAMILIES = ("bert", "gpt2", "t5", "roberta")


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
    # jax.nn.dot_product_attention's implementation: None (on CPU flaxen's explicit attention, elsewhere
    # XLA's choice), "xla" or "cudnn" (NVIDIA GPUs, bfloat16/float16 compute: cuDNN's fused kernel)
    attention_implementation: Optional[str] = None
    # family "t5" only (models.t5; Hugging Face T5Config's names): the per-head size (None:
    # hidden_size // num_heads), decoder depth (None: num_layers), relative position buckets and the
    # distance where the last bucket starts, the feed-forward ('relu': T5 v1.0; 'gated-gelu': v1.1),
    # and whether the output layer is the shared embedding (scaled by hidden_size**-0.5) or its own
    # lm_head. T5 has no biases and no absolute positions: use_bias, max_position_embeddings and
    # type_vocab_size are not read; hidden_dropout is T5's dropout_rate.
    d_kv: Optional[int] = None
    num_decoder_layers: Optional[int] = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r}: expected one of {', '.join(FAMILIES)}")
        check_t5_fields(self)
        if self.d_kv is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
        if self.attention_implementation not in (None, "xla", "cudnn"):
            raise ConfigError(f"model.attention_implementation={self.attention_implementation!r}: expected null, "
                              "'xla' or 'cudnn'")
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
        return self.d_kv if self.d_kv is not None else self.hidden_size // self.num_heads

    @property
    def decoder_layers(self) -> int:
        """T5's decoder depth: num_decoder_layers, else num_layers."""
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

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


T5_FIELDS = ("d_kv", "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance",
             "feed_forward_proj", "tie_word_embeddings")
FEED_FORWARD_PROJ = ("relu", "gated-gelu")


def check_t5_fields(config: "ModelConfig"):
    """ConfigError naming the key for a T5 field out of range, or set on a family without it."""
    if config.family != "t5":
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        changed = [name for name in T5_FIELDS if getattr(config, name) != defaults[name]]
        if changed:
            raise ConfigError(f"model.{changed[0]}={getattr(config, changed[0])!r} applies to model.family='t5' only "
                              f"(model.family={config.family!r})")
        return
    for name in ("d_kv", "num_decoder_layers"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"model.{name}={value!r}: expected a positive integer or null")
    if config.feed_forward_proj not in FEED_FORWARD_PROJ:
        raise ConfigError(f"model.feed_forward_proj={config.feed_forward_proj!r}: expected one of "
                          f"{', '.join(repr(p) for p in FEED_FORWARD_PROJ)}")
    buckets, distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
    if buckets < 4:
        raise ConfigError(f"model.relative_attention_num_buckets={buckets}: expected at least 4")
    if distance <= buckets // 2:
        raise ConfigError(f"model.relative_attention_max_distance={distance}: expected more than "
                          f"model.relative_attention_num_buckets // 2 = {buckets // 2}")
    if config.pruned_heads:
        raise ConfigError("model.pruned_heads: head pruning is not available for model.family='t5'")


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
