"""GPT-2-family decoder: learned positions, pre-LN blocks, tanh GELU, causal attention.

input_ids [batch, seq] -> token + position embeddings -> N x (x + attn(LN(x)); x + mlp(LN(x)))
-> final LayerNorm -> hidden [batch, seq, embed]. The LM head is the token embedding transposed
(models.heads). With a key/value cache (one (k, v) pair per block, each
[batch, max_len, heads, head_dim]) the same call processes a prompt or one new token.

`inputs_embeds` [batch, seq, embed] replaces the token-embedding lookup (positions are still
added). `output_hidden_states` (static bool) adds, as Hugging Face's GPT2Model does, N + 1 arrays
[batch, seq, embed]: the embedding output, the outputs of blocks 1 .. N-1, and last the final
LayerNorm's output (in place of block N's raw output). `output_attentions` adds each block's
attention probabilities [batch, heads, seq, k_len] (k_len: the cache length with a cache).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import SelfAttention, causal_mask
from models.bert import ACTIVATION, check_inputs, extras, run_block
from models.config import ModelConfig
from models.layers import Dense, Embed, LayerNorm, constrain, dropout, gelu_tanh


class GPT2Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        e, m, std, dt = config.hidden_size, config.intermediate_size, config.initializer_range, config.compute_dtype
        residual_std = std / math.sqrt(2 * config.num_layers)
        self.attention_norm = LayerNorm(e, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.attention = SelfAttention(config, rngs=rngs, out_init_std=residual_std,
                                       num_heads=config.heads_in_layer(layer))
        self.mlp_norm = LayerNorm(e, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.intermediate = Dense(e, m, ("embed", "mlp"), rngs=rngs, init_std=std, dtype=dt, use_bias=config.use_bias)
        self.output = Dense(m, e, ("mlp", "embed"), rngs=rngs, init_std=residual_std, dtype=dt,
                            use_bias=config.use_bias)
        self.dropout_rate = config.hidden_dropout

    def __call__(self, x, mask, dropout_rng=None, cache=None, cache_index=None, output_attentions: bool = False):
        """x [batch, seq, embed] -> x, (x, cache) with a cache; with output_attentions the attention
        probabilities follow: (x, probs) or (x, cache, probs)."""
        rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        h, cache, *probs = self.attention(self.attention_norm(x), mask, dropout_rng=rngs[0], cache=cache,
                                          cache_index=cache_index, output_attentions=output_attentions)
        x = x + dropout(h, self.dropout_rate, rngs[1])
        h = self.output(constrain(gelu_tanh(self.intermediate(self.mlp_norm(x))), ("batch", "length", "mlp")))
        x = x + dropout(h, self.dropout_rate, rngs[2])
        out = (x,) if cache is None else (x, cache)
        out = out + tuple(probs)
        return out[0] if len(out) == 1 else out


class GPT2Decoder(nnx.Module):
    """Returns (hidden [batch, seq, embed], None) or, with a cache, (hidden, None, new_cache); then,
    when asked, the hidden-states tuple and the attention-probabilities tuple, in that order."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        std, dt = config.initializer_range, config.compute_dtype
        self.config = config
        self.word = Embed(config.vocab_size, config.hidden_size, ("vocab", "embed"), rngs=rngs, init_std=std, dtype=dt)
        self.position = Embed(
            config.max_position_embeddings, config.hidden_size, ("position", "embed"), rngs=rngs, init_std=std, dtype=dt
        )
        self.layers = nnx.List([GPT2Block(config, rngs=rngs, layer=i) for i in range(config.num_layers)])
        self.final_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.dropout_rate = config.hidden_dropout

    def init_cache(self, batch: int, max_len: int):
        """Zeroed key/value cache: one (k, v) pair [batch, max_len, heads, head_dim] per block (the
        block's own number of heads)."""
        c = self.config
        shapes = [(batch, max_len, c.heads_in_layer(i), c.head_dim) for i in range(len(self.layers))]
        return tuple((jnp.zeros(s, c.compute_dtype), jnp.zeros(s, c.compute_dtype)) for s in shapes)

    def embed_tokens(self, input_ids):
        """The token-embedding lookup [batch, seq, embed] that `inputs_embeds` replaces."""
        return self.word(input_ids)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 dropout_rng=None, cache=None, cache_index=None, inputs_embeds=None,
                 output_hidden_states: bool = False, output_attentions: bool = False):
        """attention_mask covers the cache length when a cache is given ([batch, max_len])."""
        batch, seq = check_inputs(input_ids, inputs_embeds)
        offset = 0 if cache is None else cache_index
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq if cache is None else cache[0][0].shape[1]), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(offset + jnp.arange(seq), (batch, seq))
        rng = (lambda i: None) if dropout_rng is None else (lambda i: jax.random.fold_in(dropout_rng, i))
        words = self.word(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.word.dtype)
        x = dropout(words + self.position(position_ids), self.dropout_rate, rng(0))
        x = constrain(x, ACTIVATION)
        mask = causal_mask(attention_mask, offset + jnp.arange(seq))
        new_cache, hidden_states, attentions = [], [x], []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = run_block(layer, x, mask, rng(i + 1), remat=self.config.remat, output_attentions=output_attentions)
                x, *probs = x if output_attentions else (x,)
                x = constrain(x, ACTIVATION)
            else:
                x, layer_cache, *probs = layer(x, mask, None, cache[i], cache_index, output_attentions=output_attentions)
                new_cache.append(layer_cache)
            attentions.extend(probs)
            hidden_states.append(x)
        x = self.final_norm(x)
        hidden_states[-1] = x
        out = (x, None) if cache is None else (x, None, tuple(new_cache))
        return out + extras(hidden_states, attentions, output_hidden_states, output_attentions)
