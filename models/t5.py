"""T5 encoder-decoder (family "t5"): relative position buckets, RMS norms, ReLU or gated-GELU MLPs.

Both stacks are pre-norm: x + attn(norm(x)); (decoder) x + cross_attn(norm(x), encoder); x +
mlp(norm(x)); a final RMS norm (scale only, no mean subtraction, no bias). There are no absolute
positions: each stack has one table [buckets, heads] of relative position biases (`position_bias`;
Hugging Face keeps it in the stack's first block), looked up once per call from bucketed key - query
distances (bidirectional in the encoder, causal in the decoder) and added to every layer's
self-attention logits, as T5 shares the first layer's bias across layers. The query·key product is
not scaled by 1/sqrt(d_kv) (T5 folds the scale into the initialisation); d_kv may differ from
hidden_size / num_heads. No projection has a bias. The token embedding `shared` feeds both stacks;
the 'seq2seq_lm' head (models.heads) is either that embedding transposed after scaling the decoder
output by hidden_size**-0.5 (tie_word_embeddings, T5 v1.0) or its own lm_head (v1.1).

Calls (Hugging Face's meanings; shapes: b batch, s source length, t target length, d hidden_size):
    out = model(input_ids [b, s], attention_mask [b, s] | None, decoder_input_ids [b, t],
                decoder_attention_mask [b, t] | None, *, deterministic=True, dropout_rng=None)
        -> Seq2SeqOutput: logits [b, t, vocab] float32, last_hidden_state [b, t, d] (decoder),
           encoder_last_hidden_state [b, s, d]
    hidden = model.encode(input_ids, attention_mask, *, deterministic=True, dropout_rng=None)  [b, s, d]
    cache = model.init_cache(batch, max_length, encoder_hidden, attention_mask)
    out = model.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask=None, *,
                       cache=None, cache_index=None, deterministic=True, dropout_rng=None)
        -> Seq2SeqOutput with logits, last_hidden_state and (with a cache) .cache

The key/value cache is a tuple with one dict per decoder layer: 'self_key', 'self_value' [b,
max_length, heads, d_kv] (zeros from init_cache, filled by decode) and 'cross_key', 'cross_value'
[b, s, heads, d_kv], projected from the encoder output once by init_cache. Every leaf has the batch
first, so beam search reorders or tiles a cache with `jax.tree.map`. With a cache, decode's
decoder_input_ids are the tokens at positions cache_index, cache_index + 1, ...; their keys and
values are written there, they attend to every earlier slot, and the relative position bias uses
these absolute positions. decoder_attention_mask then covers the cache ([b, max_length]; None: all
ones).

Dropout is explicit (`deterministic=False` with a `dropout_rng`); `hidden_dropout` is T5's
dropout_rate (after the embedding, on every residual branch, inside the MLP, after the final norm)
and `attention_dropout` applies to the attention probabilities. `remat` rematerialises each block
in the backward pass of a call without a cache. Random initialisation follows T5's (normal with
std 1 for embeddings and lm_head, d**-0.5 for input projections, fan-in**-0.5 for output ones).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models.attention import causal_mask, padding_mask
from models.config import ModelConfig
from models.errors import ConfigError
from models.heads import HEADS, lookup
from models.layers import Dense, Embed, constrain, dropout, gelu_tanh, param
from models.model import ModelOutput

ACTIVATION = ("batch", "length", "embed")
IGNORE_INDEX = -100


@struct.dataclass
class Seq2SeqOutput(ModelOutput):
    """ModelOutput of an encoder-decoder: last_hidden_state is the decoder's, and the encoder's
    final hidden states [batch, src_len, embed] come as encoder_last_hidden_state (None from decode)."""

    encoder_last_hidden_state: Optional[jax.Array] = None


def shift_right(labels, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> jax.Array:
    """Decoder inputs for teacher forcing from labels [batch, tgt]: decoder_start_token_id, then
    labels[:, :-1], with the ignored label -100 replaced by pad_token_id (Hugging Face's _shift_right)."""
    labels = jnp.asarray(labels)
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == IGNORE_INDEX, jnp.asarray(pad_token_id, labels.dtype), shifted)


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket [0, num_buckets) of each relative position (key - query), int32.

    Half the buckets (per direction when bidirectional) hold distances 0 .. max_exact - 1 exactly;
    the rest are logarithmically wider up to max_distance, beyond which all distances share the
    last bucket. Causal buckets see only keys at or before the query (later keys fall in bucket 0).
    Computed in float32 exactly as Mesh TensorFlow and transformers do, so the buckets agree.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(relative_position.dtype), num_buckets - 1)
    return (buckets + jnp.where(is_small, distance, large)).astype(jnp.int32)


class RMSNorm(nnx.Module):
    """T5's layer norm: x / sqrt(mean(x²) + eps) · scale, in float32, no mean subtraction, no bias."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.ones((features,), jnp.float32), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(self.dtype)


class RelativePositionBias(nnx.Module):
    """The bias table [buckets, heads] of one stack and its lookup [1, heads, q_len, k_len] (float32)."""

    def __init__(self, config: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embedding = Embed(self.num_buckets, config.num_heads, ("relpos_buckets", "heads"), rngs=rngs,
                               init_std=config.hidden_size ** -0.5, dtype=jnp.float32)

    def __call__(self, query_positions: jax.Array, key_length: int) -> jax.Array:
        """query_positions [q_len] (absolute, traced or not) against keys 0 .. key_length - 1."""
        relative = jnp.arange(key_length, dtype=jnp.int32)[None, :] - query_positions.astype(jnp.int32)[:, None]
        bucket = relative_position_bucket(relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                          max_distance=self.max_distance)
        return jnp.transpose(self.embedding(bucket), (2, 0, 1))[None]


def attend(q, k, v, bias, mask, *, dropout_rate: float = 0.0, dropout_rng=None):
    """softmax(q·kᵀ + bias, masked)·v without the 1/sqrt(d) scale: q [b, q_len, heads, d_kv], k/v
    [b, k_len, heads, d_kv], bias [1, heads, q_len, k_len] float32 or None, mask [b, 1, q_len | 1,
    k_len] (True = attend). Logits and softmax in float32."""
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, dropout_rng).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


class T5Attention(nnx.Module):
    """Query/key/value [embed, heads, d_kv] and output [heads, d_kv, embed] projections, no biases."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, h, dt = config.hidden_size, config.num_heads, config.head_dim, config.compute_dtype
        axes = ("embed", "heads", "head_dim")
        self.query = Dense(d, (n, h), axes, rngs=rngs, use_bias=False, init_std=(d * h) ** -0.5, dtype=dt)
        self.key = Dense(d, (n, h), axes, rngs=rngs, use_bias=False, init_std=d ** -0.5, dtype=dt)
        self.value = Dense(d, (n, h), axes, rngs=rngs, use_bias=False, init_std=d ** -0.5, dtype=dt)
        self.out = Dense((n, h), d, ("heads", "head_dim", "embed"), rngs=rngs, use_bias=False,
                         init_std=(n * h) ** -0.5, dtype=dt)
        self.dropout_rate = config.attention_dropout

    def __call__(self, x, k, v, bias, mask, dropout_rng=None):
        """Queries of x [b, q_len, embed] attend to k, v [b, k_len, heads, d_kv] -> [b, q_len, embed]."""
        y = attend(self.query(x), k, v, bias, mask, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
        return self.out(y)


class T5MLP(nnx.Module):
    """wo(dropout(relu(wi(x)))) (feed_forward_proj 'relu') or wo(dropout(gelu_tanh(wi_0(x)) · wi_1(x)))
    ('gated-gelu')."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, dt = config.hidden_size, config.intermediate_size, config.compute_dtype
        self.gated = config.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = Dense(d, f, ("embed", "mlp"), rngs=rngs, use_bias=False, init_std=d ** -0.5, dtype=dt)
            self.wi_1 = Dense(d, f, ("embed", "mlp"), rngs=rngs, use_bias=False, init_std=d ** -0.5, dtype=dt)
        else:
            self.wi = Dense(d, f, ("embed", "mlp"), rngs=rngs, use_bias=False, init_std=d ** -0.5, dtype=dt)
        self.wo = Dense(f, d, ("mlp", "embed"), rngs=rngs, use_bias=False, init_std=f ** -0.5, dtype=dt)
        self.dropout_rate = config.hidden_dropout

    def __call__(self, x, dropout_rng=None):
        h = gelu_tanh(self.wi_0(x)) * self.wi_1(x) if self.gated else jax.nn.relu(self.wi(x))
        h = constrain(h, ("batch", "length", "mlp"))
        return self.wo(dropout(h, self.dropout_rate, dropout_rng))


class T5Block(nnx.Module):
    """Self-attention, (decoder) cross-attention and MLP sublayers, each x + dropout(f(norm(x)))."""

    def __init__(self, config: ModelConfig, *, decoder: bool, rngs: nnx.Rngs):
        d, eps, dt = config.hidden_size, config.layer_norm_eps, config.compute_dtype
        self.attention_norm = RMSNorm(d, eps=eps, dtype=dt)
        self.attention = T5Attention(config, rngs=rngs)
        if decoder:
            self.cross_attention_norm = RMSNorm(d, eps=eps, dtype=dt)
            self.cross_attention = T5Attention(config, rngs=rngs)
        self.decoder = decoder
        self.mlp_norm = RMSNorm(d, eps=eps, dtype=dt)
        self.mlp = T5MLP(config, rngs=rngs)
        self.dropout_rate = config.hidden_dropout

    def __call__(self, x, bias, mask, encoder_hidden=None, cross_kv=None, cross_mask=None, dropout_rng=None,
                 cache_kv=None, cache_index=None):
        """x [b, t, embed] -> (x, (k, v)): the self-attention keys/values [b, k_len, heads, d_kv], with
        `cache_kv` the cache with this call's written at `cache_index`. The decoder's cross-attention
        uses `cross_kv` (cached) or projects `encoder_hidden`; cross_mask [b, 1, 1, src_len]."""
        rngs = [None] * 7 if dropout_rng is None else list(jax.random.split(dropout_rng, 7))
        h = self.attention_norm(x)
        k, v = self.attention.key(h), self.attention.value(h)
        if cache_kv is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), start)
        x = x + dropout(self.attention(h, k, v, bias, mask, rngs[0]), self.dropout_rate, rngs[1])
        if self.decoder:
            h = self.cross_attention_norm(x)
            if cross_kv is None:
                cross_kv = (self.cross_attention.key(encoder_hidden), self.cross_attention.value(encoder_hidden))
            y = self.cross_attention(h, cross_kv[0], cross_kv[1], None, cross_mask, rngs[2])
            x = x + dropout(y, self.dropout_rate, rngs[3])
        x = x + dropout(self.mlp(self.mlp_norm(x), rngs[4]), self.dropout_rate, rngs[5])
        return constrain(x, ACTIVATION), (k, v)


def _run_block(block: T5Block, remat: bool, *args):
    """block(*args), rematerialised in the backward pass when `remat` (jax.checkpoint over the block as
    a pure function of its variables, as models.bert.run_block does)."""
    if not remat:
        return block(*args)
    graphdef, variables = nnx.split(block)

    def apply(variables, *args):
        return nnx.merge(graphdef, variables)(*args)

    return jax.checkpoint(apply)(variables, *args)


class T5Stack(nnx.Module):
    """The relative position bias table, the blocks and the final norm of the encoder or the decoder."""

    def __init__(self, config: ModelConfig, *, decoder: bool, rngs: nnx.Rngs):
        depth = config.decoder_layers if decoder else config.num_layers
        self.position_bias = RelativePositionBias(config, bidirectional=not decoder, rngs=rngs)
        self.layers = nnx.List([T5Block(config, decoder=decoder, rngs=rngs) for _ in range(depth)])
        self.final_norm = RMSNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=config.compute_dtype)
        self.dropout_rate = config.hidden_dropout
        self.remat = config.remat

    def __call__(self, x, bias, mask, *, encoder_hidden=None, cross_mask=None, cache=None, cache_index=None,
                 dropout_rng=None):
        """Embedded tokens x [b, t, embed] -> (final hidden [b, t, embed], new cache or None)."""
        rng = (lambda i: None) if dropout_rng is None else (lambda i: jax.random.fold_in(dropout_rng, i))
        x = constrain(dropout(x, self.dropout_rate, rng(0)), ACTIVATION)
        new_cache = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x, _ = _run_block(layer, self.remat, x, bias, mask, encoder_hidden, None, cross_mask, rng(i + 1))
            else:
                c = cache[i]
                x, (k, v) = layer(x, bias, mask, None, (c["cross_key"], c["cross_value"]), cross_mask, rng(i + 1),
                                  (c["self_key"], c["self_value"]), cache_index)
                new_cache.append({**c, "self_key": k, "self_value": v})
        x = dropout(self.final_norm(x), self.dropout_rate, rng(len(self.layers) + 1))
        return x, (tuple(new_cache) if cache is not None else None)


def _rngs(deterministic: bool, dropout_rng):
    if not deterministic and dropout_rng is None:
        raise ValueError("deterministic=False needs a dropout_rng")
    return None if deterministic else dropout_rng


def _ones_mask(mask, batch: int, length: int, name: str):
    if mask is None:
        return jnp.ones((batch, length), jnp.int32)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {(batch, length)}")
    return mask


class T5(nnx.Module):
    """T5 encoder-decoder with the 'seq2seq_lm' head; built by models.build_model(config, 'seq2seq_lm')."""

    def __init__(self, config: ModelConfig, head: Optional[str] = "seq2seq_lm", num_labels: int = 2, *,
                 rngs: nnx.Rngs):
        if config.family != "t5":
            raise ConfigError(f"model.family={config.family!r}: the T5 model needs model.family='t5'")
        spec = lookup(head, config.family)
        self.config = config
        self.head_name = head
        self.num_labels = num_labels if spec.takes_labels else None
        self.shared = Embed(config.vocab_size, config.hidden_size, ("vocab", "embed"), rngs=rngs, init_std=1.0,
                            dtype=config.compute_dtype)
        self.encoder = T5Stack(config, decoder=False, rngs=rngs)
        self.decoder = T5Stack(config, decoder=True, rngs=rngs)
        self.head = spec.build(config, num_labels, rngs)

    @property
    def decoder_start_token_id(self) -> int:
        """The token that starts every decoder input: T5's pad token."""
        return self.config.pad_token_id

    def shift_right(self, labels) -> jax.Array:
        """Teacher-forcing decoder inputs from labels [batch, tgt] (-100 = ignored) -> [batch, tgt]."""
        return shift_right(labels, self.decoder_start_token_id, self.config.pad_token_id)

    def embed_tokens(self, input_ids):
        """The shared token embedding [batch, len, embed] of input_ids [batch, len]."""
        return self.shared(input_ids)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
                 deterministic: bool = True, dropout_rng=None) -> Seq2SeqOutput:
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (e.g. model.shift_right(labels))")
        rng = _rngs(deterministic, dropout_rng)
        fold = (lambda i: None) if rng is None else (lambda i: jax.random.fold_in(rng, i))
        encoder_hidden = self.encode(input_ids, attention_mask, deterministic=deterministic, dropout_rng=fold(0))
        out = self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask,
                          deterministic=deterministic, dropout_rng=fold(1))
        return out.replace(encoder_last_hidden_state=encoder_hidden)

    def encode(self, input_ids, attention_mask=None, *, deterministic: bool = True, dropout_rng=None) -> jax.Array:
        """input_ids [b, s] (attention_mask [b, s], 1 = real token; None: all) -> hidden [b, s, embed]."""
        rng = _rngs(deterministic, dropout_rng)
        batch, length = input_ids.shape
        attention_mask = _ones_mask(attention_mask, batch, length, "attention_mask")
        bias = self.encoder.position_bias(jnp.arange(length), length)
        hidden, _ = self.encoder(self.shared(input_ids), bias, padding_mask(attention_mask), dropout_rng=rng)
        return hidden

    def init_cache(self, batch: int, max_length: int, encoder_hidden, attention_mask=None) -> tuple:
        """The decoder cache for `max_length` target positions: per layer, self-attention keys/values
        zeros [batch, max_length, heads, d_kv] and the cross-attention keys/values [batch, src_len,
        heads, d_kv] projected once from encoder_hidden [batch, src_len, embed]. attention_mask
        [batch, src_len], when given, is checked against encoder_hidden (decode takes it each step)."""
        c = self.config
        if encoder_hidden.ndim != 3 or encoder_hidden.shape[0] != batch:
            raise ValueError(f"encoder_hidden has shape {tuple(encoder_hidden.shape)}; expected ({batch}, src_len, "
                             f"{c.hidden_size})")
        if attention_mask is not None:
            _ones_mask(attention_mask, batch, encoder_hidden.shape[1], "attention_mask")
        shape = (batch, max_length, c.num_heads, c.head_dim)
        cache = []
        for layer in self.decoder.layers:
            cross = layer.cross_attention
            # two arrays, not one shared: a jitted generation loop may donate the cache's buffers
            cache.append({"self_key": jnp.zeros(shape, c.compute_dtype),
                          "self_value": jnp.zeros(shape, c.compute_dtype),
                          "cross_key": cross.key(encoder_hidden), "cross_value": cross.value(encoder_hidden)})
        return tuple(cache)

    def decode(self, decoder_input_ids, encoder_hidden, attention_mask=None, decoder_attention_mask=None, *,
               cache=None, cache_index=None, deterministic: bool = True, dropout_rng=None) -> Seq2SeqOutput:
        """Decoder logits [b, t, vocab] (float32) of decoder_input_ids [b, t] given encoder_hidden [b, s,
        embed] and its attention_mask [b, s]. Without a cache the tokens are positions 0 .. t - 1 and
        decoder_attention_mask is [b, t]; with `cache` (init_cache) they are positions cache_index ..
        cache_index + t - 1, decoder_attention_mask is [b, max_length], and `.cache` is the new cache."""
        rng = _rngs(deterministic, dropout_rng)
        fold = (lambda i: None) if rng is None else (lambda i: jax.random.fold_in(rng, i))
        batch, length = decoder_input_ids.shape
        attention_mask = _ones_mask(attention_mask, batch, encoder_hidden.shape[1], "attention_mask")
        if cache is None:
            offset, key_length = 0, length
        else:
            if cache_index is None:
                raise ValueError("decode with a cache needs cache_index (the position of decoder_input_ids[:, 0])")
            offset, key_length = cache_index, cache[0]["self_key"].shape[1]
        decoder_attention_mask = _ones_mask(decoder_attention_mask, batch, key_length, "decoder_attention_mask")
        positions = offset + jnp.arange(length)
        bias = self.decoder.position_bias(positions, key_length)
        hidden, new_cache = self.decoder(
            self.shared(decoder_input_ids), bias, causal_mask(decoder_attention_mask, positions),
            encoder_hidden=encoder_hidden, cross_mask=padding_mask(attention_mask), cache=cache,
            cache_index=cache_index, dropout_rng=fold(0),
        )
        outputs = HEADS[self.head_name].apply(self.head, hidden, None, self, decoder_attention_mask,
                                              decoder_input_ids, fold(1))
        outputs = {name: value.astype(jnp.float32) for name, value in outputs.items()}
        return Seq2SeqOutput(hidden, cache=new_cache, **outputs)
