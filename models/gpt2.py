"""GPT-2-family decoder: learned positions, pre-LN blocks, tanh GELU, causal attention.

input_ids [batch, seq] -> token + position embeddings -> N x (x + attn(LN(x)); x + mlp(LN(x)))
-> final LayerNorm -> hidden [batch, seq, embed]. The LM head is the token embedding transposed
(models.heads). With a key/value cache (one (k, v) pair per block, each
[batch, max_len, heads, head_dim]) the same call processes a prompt or one new token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import SelfAttention, causal_mask
from models.bert import ACTIVATION, run_block
from models.config import ModelConfig
from models.layers import Dense, Embed, LayerNorm, constrain, dropout, gelu_tanh


class GPT2Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, m, std, dt = config.hidden_size, config.intermediate_size, config.initializer_range, config.compute_dtype
        residual_std = std / math.sqrt(2 * config.num_layers)
        self.attention_norm = LayerNorm(e, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.attention = SelfAttention(config, rngs=rngs, out_init_std=residual_std)
        self.mlp_norm = LayerNorm(e, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.intermediate = Dense(e, m, ("embed", "mlp"), rngs=rngs, init_std=std, dtype=dt, use_bias=config.use_bias)
        self.output = Dense(m, e, ("mlp", "embed"), rngs=rngs, init_std=residual_std, dtype=dt,
                            use_bias=config.use_bias)
        self.dropout_rate = config.hidden_dropout

    def __call__(self, x, mask, dropout_rng=None, cache=None, cache_index=None):
        rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        h, cache = self.attention(self.attention_norm(x), mask, dropout_rng=rngs[0], cache=cache,
                                  cache_index=cache_index)
        x = x + dropout(h, self.dropout_rate, rngs[1])
        h = self.output(constrain(gelu_tanh(self.intermediate(self.mlp_norm(x))), ("batch", "length", "mlp")))
        x = x + dropout(h, self.dropout_rate, rngs[2])
        return x if cache is None else (x, cache)


class GPT2Decoder(nnx.Module):
    """Returns (hidden [batch, seq, embed], None) or, with a cache, (hidden, None, new_cache)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        std, dt = config.initializer_range, config.compute_dtype
        self.config = config
        self.word = Embed(config.vocab_size, config.hidden_size, ("vocab", "embed"), rngs=rngs, init_std=std, dtype=dt)
        self.position = Embed(
            config.max_position_embeddings, config.hidden_size, ("position", "embed"), rngs=rngs, init_std=std, dtype=dt
        )
        self.layers = nnx.List([GPT2Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.dropout_rate = config.hidden_dropout

    def init_cache(self, batch: int, max_len: int):
        """Zeroed key/value cache: one (k, v) pair [batch, max_len, heads, head_dim] per block."""
        c = self.config
        shape = (batch, max_len, c.num_heads, c.head_dim)
        return tuple((jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype)) for _ in self.layers)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 dropout_rng=None, cache=None, cache_index=None):
        """attention_mask covers the cache length when a cache is given ([batch, max_len])."""
        batch, seq = input_ids.shape
        offset = 0 if cache is None else cache_index
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq if cache is None else cache[0][0].shape[1]), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(offset + jnp.arange(seq), (batch, seq))
        rng = (lambda i: None) if dropout_rng is None else (lambda i: jax.random.fold_in(dropout_rng, i))
        x = dropout(self.word(input_ids) + self.position(position_ids), self.dropout_rate, rng(0))
        x = constrain(x, ACTIVATION)
        mask = causal_mask(attention_mask, offset + jnp.arange(seq))
        new_cache = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = constrain(run_block(layer, x, mask, rng(i + 1), remat=self.config.remat), ACTIVATION)
            else:
                x, layer_cache = layer(x, mask, None, cache[i], cache_index)
                new_cache.append(layer_cache)
        x = self.final_norm(x)
        return (x, None) if cache is None else (x, None, tuple(new_cache))
