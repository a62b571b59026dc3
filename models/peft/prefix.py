"""Prefix tuning: learned keys and values prepended to every layer's attention (Li & Liang 2021).

Each block's SelfAttention becomes a PrefixSelfAttention (a subclass holding the same
query/key/value/out layers): its keys and values are [batch, length + seq, heads, head_dim],
the first `length` positions being the layer's prefix, and the mask gains `length` True columns
(every query may attend to the prefix; positions of real tokens are unchanged). With a decoder's
key/value cache the prefix is prepended to the cache at attention time, so generation works too.

Prefixes are free parameters [length, heads, head_dim] per layer (key and value), or, with
`reparameterize`, the output of one MLP shared by all layers (the paper's reparameterization,
as in Hugging Face PEFT's `prefix_projection`): embedding [length, embed] -> dense -> tanh ->
dense -> [length, layers, 2, heads, head_dim]. The shared MLP is one module referenced from
every layer (an NNX shared reference: it appears once in the model's state).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import SelfAttention, query_rows
from models.peft import targets
from models.peft.config import PrefixConfig
from models.peft.variables import PrefixParam, Projection, peft_param


class PrefixEncoder(nnx.Module):
    """The reparameterization MLP: () -> prefixes [length, layers, 2, heads, head_dim] (float32)."""

    def __init__(self, *, length: int, embed: int, hidden: int, num_layers: int, num_heads: int, head_dim: int,
                 init_std: float, rngs: nnx.Rngs):
        k1, k2, k3 = rngs.params(), rngs.params(), rngs.params()
        out = (num_layers, 2, num_heads, head_dim)
        self.embedding = peft_param(PrefixParam, jax.random.normal(k1, (length, embed)), ("prefix", "embed"))
        self.hidden = Projection(PrefixParam, jax.random.normal(k2, (embed, hidden)) / math.sqrt(embed),
                                 ("embed", "prefix_hidden"))
        self.output = Projection(PrefixParam, init_std / math.sqrt(hidden) * jax.random.normal(k3, (hidden,) + out),
                                 ("prefix_hidden", None, None, "heads", "head_dim"))

    def __call__(self) -> jax.Array:
        return self.output(jnp.tanh(self.hidden(self.embedding[...])))


class PrefixSelfAttention(SelfAttention):
    """SelfAttention (the base module's own projections) with a learned key/value prefix."""

    def __init__(self, base: SelfAttention, *, layer_index: int, length: int, init_std: float,
                 encoder: PrefixEncoder | None, rngs: nnx.Rngs):
        self.query, self.key, self.value, self.out = base.query, base.key, base.value, base.out
        self.dropout_rate, self.implementation = base.dropout_rate, base.implementation
        self.length = length
        self.layer_index = layer_index
        self.prefix_encoder = encoder
        if encoder is None:
            shape = (length,) + base.key.out_shape
            names = ("prefix", "heads", "head_dim")
            self.prefix_key = peft_param(PrefixParam, init_std * jax.random.normal(rngs.params(), shape), names)
            self.prefix_value = peft_param(PrefixParam, init_std * jax.random.normal(rngs.params(), shape), names)
        else:
            self.prefix_key = self.prefix_value = None

    def prefixes(self) -> tuple[jax.Array, jax.Array]:
        """This layer's (key, value) prefixes, each [length, heads, head_dim] float32."""
        if self.prefix_encoder is None:
            return self.prefix_key[...], self.prefix_value[...]
        both = self.prefix_encoder()[:, self.layer_index]
        return both[:, 0], both[:, 1]

    def __call__(self, x, mask, *, dropout_rng=None, cache=None, cache_index=None, output_attentions: bool = False,
                 query_length: int | None = None):
        """As SelfAttention; with `output_attentions` the probabilities' key axis is the prefix
        followed by the keys: [batch, heads, seq, length + k_len]."""
        q, k, v, cache = self.project(x, cache, cache_index, query_length)
        mask = query_rows(mask, query_length)
        prefix_k, prefix_v = self.prefixes()
        batch = x.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(prefix_k.astype(k.dtype), (batch,) + prefix_k.shape), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix_v.astype(v.dtype), (batch,) + prefix_v.shape), v], axis=1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (self.length,), bool), mask.astype(bool)], axis=-1)
        return self.attend(q, k, v, mask, cache, dropout_rng, output_attentions)


def apply_prefix(model, config: PrefixConfig, rngs: nnx.Rngs) -> None:
    """Replaces every block's SelfAttention with a PrefixSelfAttention, in place."""
    c = model.config
    encoder = None
    if config.reparameterize:
        encoder = PrefixEncoder(length=config.length, embed=c.hidden_size, hidden=config.hidden,
                                num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.head_dim,
                                init_std=config.init_std, rngs=rngs)
    for index, path, attention in list(targets.modules_in_blocks(model, SelfAttention)):
        prefixed = PrefixSelfAttention(attention, layer_index=index, length=config.length,
                                       init_std=config.init_std, encoder=encoder, rngs=rngs)
        targets.replace(targets.blocks(model)[index], path, prefixed)
