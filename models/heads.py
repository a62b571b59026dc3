"""Task heads on top of an encoder or decoder's hidden states.

- MaskedLMHead: BERT's transform (dense, GELU, LayerNorm), then the tied word embedding plus an
  output bias: [batch, seq, embed] -> [batch, seq, vocab].
- CausalLMHead: the tied token embedding: [batch, seq, embed] -> [batch, seq, vocab].
- SequenceClassifier: dropout + dense on one vector per sequence (BERT's pooled output, or a
  decoder's last real token) -> [batch, num_labels]; num_labels=1 is regression.
- TokenClassifier: dropout + dense at every position -> [batch, seq, num_labels].
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import Dense, Embed, LayerNorm, dropout, gelu_exact, param


class MaskedLMHead(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, dt = config.hidden_size, config.compute_dtype
        self.transform = Dense(e, e, ("embed", "embed_out"), rngs=rngs, init_std=config.initializer_range, dtype=dt)
        self.norm = LayerNorm(e, eps=config.layer_norm_eps, dtype=dt)
        self.bias = param(jnp.zeros((config.vocab_size,), jnp.float32), ("vocab",))

    def __call__(self, hidden, embedding: Embed):
        h = self.norm(gelu_exact(self.transform(hidden)))
        return embedding.attend(h) + self.bias[...].astype(h.dtype)


class CausalLMHead(nnx.Module):
    """Holds no parameters: GPT-2 ties its output layer to the token embedding."""

    def __call__(self, hidden, embedding: Embed):
        return embedding.attend(hidden)


class SequenceClassifier(nnx.Module):
    def __init__(self, config: ModelConfig, num_labels: int, *, use_bias: bool = True, rngs: nnx.Rngs):
        self.dense = Dense(config.hidden_size, num_labels, ("embed", "labels"), rngs=rngs, use_bias=use_bias,
                           init_std=config.initializer_range, dtype=config.compute_dtype)
        rate = config.classifier_dropout
        self.dropout_rate = config.hidden_dropout if rate is None else rate

    def __call__(self, vector, dropout_rng=None):
        return self.dense(dropout(vector, self.dropout_rate, dropout_rng))


class TokenClassifier(SequenceClassifier):
    """The same dense layer, applied at every position of [batch, seq, embed]."""


def last_token(hidden, attention_mask):
    """hidden[b, last position where attention_mask[b] is 1] -> [batch, embed] (right padding)."""
    positions = jnp.arange(attention_mask.shape[1])
    last = jnp.max(jnp.where(attention_mask.astype(bool), positions, 0), axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
