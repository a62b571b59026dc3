"""`Model`: a backbone (BertEncoder or GPT2Decoder) with an optional task head.

The one callable flaxen trains and evaluates:
    out = model(input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                deterministic=True, dropout_rng=None)
    out.last_hidden_state [batch, seq, embed]; out.pooler_output [batch, embed] | None;
    out.logits (per head) | None.
Dropout is explicit and functional: no RNG state lives in the model; a training step passes
`dropout_rng` (e.g. fold_in(key, step)) with `deterministic=False`.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models.bert import BertEncoder
from models.config import HEADS, ModelConfig
from models.gpt2 import GPT2Decoder
from models.heads import CausalLMHead, MaskedLMHead, SequenceClassifier, TokenClassifier, last_token

SUPPORTED_HEADS = {
    "bert": (None, "mlm", "seq_cls", "token_cls"),
    "gpt2": (None, "causal_lm", "seq_cls", "token_cls"),
}


@struct.dataclass
class ModelOutput:
    last_hidden_state: jax.Array
    pooler_output: Optional[jax.Array] = None
    logits: Optional[jax.Array] = None
    cache: Any = None


class Model(nnx.Module):
    def __init__(self, config: ModelConfig, head: str | None = None, num_labels: int = 2, *, rngs: nnx.Rngs):
        from flaxen.errors import ConfigError

        if head not in SUPPORTED_HEADS[config.family]:
            supported = ", ".join(repr(h) for h in SUPPORTED_HEADS[config.family])
            raise ConfigError(f"head={head!r} is not available for family {config.family!r}; expected one of {supported}")
        self.config = config
        self.head_name = head
        self.num_labels = num_labels if head in ("seq_cls", "token_cls") else None
        if config.family == "bert":
            self.backbone = BertEncoder(config, add_pooler=head in (None, "seq_cls"), rngs=rngs)
        else:
            self.backbone = GPT2Decoder(config, rngs=rngs)
        if head == "mlm":
            self.head = MaskedLMHead(config, rngs=rngs)
        elif head == "causal_lm":
            self.head = CausalLMHead()
        elif head == "seq_cls":
            self.head = SequenceClassifier(config, num_labels, use_bias=config.family == "bert", rngs=rngs)
        elif head == "token_cls":
            self.head = TokenClassifier(config, num_labels, rngs=rngs)
        else:
            self.head = None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 deterministic: bool = True, dropout_rng=None, cache=None, cache_index=None) -> ModelOutput:
        if not deterministic and dropout_rng is None:
            raise ValueError("deterministic=False needs a dropout_rng")
        rng = None if deterministic else dropout_rng
        backbone_rng = None if rng is None else jax.random.fold_in(rng, 0)
        head_rng = None if rng is None else jax.random.fold_in(rng, 1)
        extra = {} if cache is None else {"cache": cache, "cache_index": cache_index}
        hidden, pooled, *new_cache = self.backbone(
            input_ids, attention_mask, token_type_ids, position_ids, dropout_rng=backbone_rng, **extra
        )
        logits = None
        if self.head_name in ("mlm", "causal_lm"):
            logits = self.head(hidden, self.backbone.embeddings.word if self.config.family == "bert" else self.backbone.word)
        elif self.head_name == "seq_cls":
            if pooled is None:
                mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
                pooled_in = last_token(hidden, mask)
            else:
                pooled_in = pooled
            logits = self.head(pooled_in, head_rng)
        elif self.head_name == "token_cls":
            logits = self.head(hidden, head_rng)
        if logits is not None:
            logits = logits.astype(jnp.float32)
        return ModelOutput(hidden, pooled, logits, new_cache[0] if new_cache else None)


def build_model(config: ModelConfig, head: str | None = None, num_labels: int = 2, *, rngs: nnx.Rngs | None = None,
                seed: int = 0) -> Model:
    """A randomly initialised model of `config` with the given head ('mlm', 'causal_lm', 'seq_cls', 'token_cls')."""
    return Model(config, head, num_labels, rngs=rngs if rngs is not None else nnx.Rngs(seed))
