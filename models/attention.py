"""Multi-head self-attention, the one implementation both families share.

Shapes: x [batch, seq, embed]; q/k/v [batch, seq, heads, head_dim]; mask [batch, 1, q_len, k_len]
(True = attend). Two paths compute the same product, and a test holds them equal:
- explicit: q, k and v moved to [batch, heads, seq, head_dim], scores in float32, a written-out
  softmax (with attention dropout on the probabilities when training), p·v. On CPU this is the
  only path: XLA compiles it faster than jax.nn.dot_product_attention's own lowering (forward +
  backward of one layer, 2-core CPU, interleaved: 2.4x faster at gpt_nano's 12 x 64 x 4 heads,
  1.5x at MiniLM's 32 x 128 x 12 heads; docs/performance.md);
- fused: `jax.nn.dot_product_attention`, which picks a fused kernel where the backend has one
  (GPU, TPU; `attention_implementation="cudnn"` asks for cuDNN's), used on accelerators when no
  probabilities or dropout are needed.

`output_attentions=True` (a static Python bool) also returns the attention probabilities
[batch, heads, q_len, k_len] in float32, always from the explicit path; a call that does not ask
for them is traced exactly as before. With attention dropout (training) the probabilities
returned are those before dropout.

A decoder's key/value cache is an explicit pair of arrays [batch, max_len, heads, head_dim]
passed in and returned, so a generation loop carries it as plain state.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import Dense, dropout


def _heads_first(x):
    """[batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim]."""
    return jnp.transpose(x, (0, 2, 1, 3))


def attention_probabilities(q, k, mask):
    """softmax(q·kᵀ/√d + mask) [batch, heads, q_len, k_len] in float32, from q [batch, q_len,
    heads, head_dim], k [batch, k_len, heads, head_dim] and mask [batch, 1, q_len, k_len]."""
    logits = jnp.einsum("bnth,bnsh->bnts", _heads_first(q), _heads_first(k), preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits * (1.0 / math.sqrt(q.shape[-1])), jnp.finfo(jnp.float32).min)
    # softmax written out: the row maximum is a constant for the gradient (softmax does not depend
    # on it), which XLA's CPU backend compiles to fewer passes than jax.nn.softmax
    shifted = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    return shifted * (1.0 / shifted.sum(-1, keepdims=True))


@jax.named_scope("attention")
def dot_product_attention(q, k, v, mask, *, dropout_rate: float = 0.0, dropout_rng=None,
                          output_attentions: bool = False, implementation: str | None = None):
    """softmax(q·kᵀ/√d + mask)·v over [batch, seq, heads, head_dim] inputs.

    With `output_attentions`, returns (output, probabilities [batch, heads, q_len, k_len] float32,
    before attention dropout). `implementation`: None (on CPU the explicit path below, elsewhere
    jax.nn.dot_product_attention's choice), or jax.nn.dot_product_attention's "xla" / "cudnn"."""
    fused = implementation is not None or jax.default_backend() != "cpu"
    if fused and not output_attentions and (dropout_rng is None or dropout_rate == 0.0):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    probs = attention_probabilities(q, k, mask)
    kept = dropout(probs, dropout_rate, dropout_rng).astype(v.dtype)
    y = jnp.transpose(jnp.einsum("bnts,bnsh->bnth", kept, _heads_first(v)), (0, 2, 1, 3))
    return (y, probs) if output_attentions else y


class SelfAttention(nnx.Module):
    """Query/key/value projections, scaled dot-product attention, output projection.

    `num_heads`: this layer's number of heads (ModelConfig.heads_in_layer: fewer than
    config.num_heads after head pruning; the head size stays config.head_dim)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, out_init_std: float | None = None,
                 num_heads: int | None = None):
        e, n, h = config.hidden_size, config.num_heads if num_heads is None else num_heads, config.head_dim
        std, dt, bias = config.initializer_range, config.compute_dtype, config.use_bias
        self.query = Dense(e, (n, h), ("embed", "heads", "head_dim"), rngs=rngs, init_std=std, dtype=dt, use_bias=bias)
        self.key = Dense(e, (n, h), ("embed", "heads", "head_dim"), rngs=rngs, init_std=std, dtype=dt, use_bias=bias)
        self.value = Dense(e, (n, h), ("embed", "heads", "head_dim"), rngs=rngs, init_std=std, dtype=dt, use_bias=bias)
        self.out = Dense(
            (n, h), e, ("heads", "head_dim", "embed"), rngs=rngs, init_std=out_init_std or std, dtype=dt, use_bias=bias
        )
        self.dropout_rate = config.attention_dropout
        self.implementation = config.attention_implementation

    def project(self, x, cache=None, cache_index=None, query_length: int | None = None):
        """Queries, keys and values [batch, seq, heads, head_dim] of x (queries of the first
        `query_length` positions only, when given); with a cache, the keys and values are written
        into it at `cache_index` and the whole cache is returned as k, v."""
        q = self.query(x if query_length is None else x[:, :query_length])
        k, v = self.key(x), self.value(x)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)
        return q, k, v, cache

    def __call__(self, x, mask, *, dropout_rng=None, cache=None, cache_index=None, output_attentions: bool = False,
                 query_length: int | None = None):
        """x [batch, seq, embed] -> ([batch, seq, embed], updated cache or None), plus the attention
        probabilities [batch, heads, seq, k_len] (float32, before dropout) with `output_attentions`.

        With `cache=(k, v)` the new keys/values are written at `cache_index` and attention runs
        over the whole cache; `mask` must then cover the cache length. `query_length`: only the
        first positions attend (their outputs [batch, query_length, embed]), to every key.
        """
        q, k, v, cache = self.project(x, cache, cache_index, query_length)
        return self.attend(q, k, v, query_rows(mask, query_length), cache, dropout_rng, output_attentions)

    def attend(self, q, k, v, mask, cache, dropout_rng, output_attentions: bool):
        """Attention of projected q/k/v, the output projection, and the (y, cache[, probs]) result."""
        y = dot_product_attention(q, k, v, mask, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
                                  output_attentions=output_attentions, implementation=self.implementation)
        if output_attentions:
            y, probs = y
            return self.out(y), cache, probs
        return self.out(y), cache


def query_rows(mask: jax.Array, query_length: int | None) -> jax.Array:
    """A mask [batch, 1, q_len, k_len] for the first `query_length` queries (a padding mask, whose
    q_len is 1, applies to any)."""
    return mask if query_length is None or mask.shape[2] == 1 else mask[:, :, :query_length]


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[batch, k_len] of 1/0 -> [batch, 1, 1, k_len] boolean (True = attend)."""
    return attention_mask.astype(bool)[:, None, None, :]


def causal_mask(attention_mask: jax.Array, query_positions: jax.Array) -> jax.Array:
    """Causal and padding mask [batch, 1, q_len, k_len].

    attention_mask [batch, k_len] marks real key slots; query_positions [q_len] are the slot
    indices of the queries (arange(seq) without a cache, offset by the cache index with one).
    """
    key_positions = jnp.arange(attention_mask.shape[1])
    causal = key_positions[None, :] <= query_positions[:, None]
    return causal[None, None, :, :] & attention_mask.astype(bool)[:, None, None, :]
