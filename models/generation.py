"""Autoregressive generation for GPT-2-family decoders with an explicit key/value cache.

Why: recomputing the whole sequence for every new token costs O(length²) per token; with a cache
each step runs the decoder on one token. The loop is one compiled program: a prefill call on the
prompt [batch, prompt_len] writes keys/values into a cache of [batch, prompt_len + max_new_tokens,
heads, head_dim] per block, then a `jax.lax.while_loop` runs one decode step per new token and stops
early once every sequence has produced EOS. It compiles once per (batch, prompt_len,
max_new_tokens, do_sample, top_k, whether top_p is used); token values, temperature, the top_p
value, EOS/pad ids and the RNG key are traced, so new prompts reuse the compiled loop.

Prompts of different lengths are left-padded (attention_mask 0 on the left); positions come from
the mask (cumsum - 1), so a padded row generates what it would alone. Token choice per step, as
in Hugging Face: greedy argmax, or sampling from softmax(logits / temperature) after top-k then
top-p (nucleus) filtering.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.errors import ConfigError
from models.heads import HEADS


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """[..., vocab] -> the same with every logit below the k-th largest of its row set to -inf."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    """[..., vocab] -> the same keeping the smallest set of largest-probability tokens whose
    probabilities sum to at least p (always at least the most likely token); others -inf."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def _choose(logits, rng, temperature, top_p, *, do_sample: bool, top_k: Optional[int], use_top_p: bool):
    """logits [batch, vocab] -> next tokens [batch] (int32)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "do_sample", "top_k", "use_top_p"))
def _generate(graphdef, state, input_ids, attention_mask, rng, temperature, top_p, eos_token_id, pad_token_id, *,
              max_new_tokens: int, do_sample: bool, top_k: Optional[int], use_top_p: bool):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    choose = functools.partial(_choose, temperature=temperature, top_p=top_p, do_sample=do_sample, top_k=top_k,
                               use_top_p=use_top_p)
    mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), attention_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    cache = model.backbone.init_cache(batch, prompt_len + max_new_tokens)
    out = model(input_ids, mask, position_ids=positions, cache=cache, cache_index=0)

    token = choose(out.logits[:, -1], jax.random.fold_in(rng, 0))
    done = token == eos_token_id
    tokens = jnp.concatenate([input_ids, jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)], axis=1)
    tokens = tokens.at[:, prompt_len].set(token)

    def unfinished(carry):
        step, *_, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(carry):
        step, token, tokens, cache, position, done = carry
        out = model(token[:, None], mask, position_ids=position[:, None], cache=cache,
                    cache_index=prompt_len + step - 1)
        token = jnp.where(done, pad_token_id, choose(out.logits[:, 0], jax.random.fold_in(rng, step)))
        done = done | (token == eos_token_id)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, prompt_len + step))
        return step + 1, token, tokens, out.cache, position + 1, done

    carry = (jnp.int32(1), token, tokens, out.cache, positions[:, -1] + 1, done)
    return jax.lax.while_loop(unfinished, decode_step, carry)[2]


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
             pad_token_id: Optional[int] = None, rng: Optional[jax.Array] = None, do_sample: bool = False) -> jax.Array:
    """Continues left-padded prompts input_ids [batch, prompt_len] by max_new_tokens tokens.

    model: a gpt2-family `Model` with the 'causal_lm' head. Returns [batch, prompt_len +
    max_new_tokens] int32: the prompt, then the new tokens; after a sequence's EOS (kept) come
    pad tokens (pad_token_id, default eos_token_id, else 0). do_sample=False is greedy;
    do_sample=True samples with `rng` after temperature, top-k and top-p filtering.
    """
    config = getattr(model, "config", None)
    head = HEADS.get(getattr(model, "head_name", None))
    if config is None or config.family != "gpt2" or head is None or not head.generates:
        raise ConfigError("generate: model must be a gpt2-family Model with head='causal_lm'")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
        raise ConfigError(f"generate: input_ids must be integer token ids [batch, prompt_len], got "
                          f"shape {input_ids.shape} dtype {input_ids.dtype}")
    attention_mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(f"generate: attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if not attention_mask[:, -1].all():
        raise ConfigError("generate: prompts must be left-padded (attention_mask[:, -1] must be 1 in every row)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ConfigError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    total = input_ids.shape[1] + int(max_new_tokens)
    if total > config.max_position_embeddings:
        raise ConfigError(f"generate: prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                          f"exceeds the model's max_position_embeddings={config.max_position_embeddings}")
    if do_sample:
        if rng is None:
            raise ConfigError("generate: do_sample=True needs an rng key (e.g. jax.random.key(0))")
        if not temperature > 0:
            raise ConfigError(f"generate: temperature must be > 0, got {temperature!r}")
        if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= config.vocab_size):
            raise ConfigError(f"generate: top_k must be an integer in [1, {config.vocab_size}], got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
        rng if rng is not None else jax.random.key(0), jnp.float32(temperature),
        jnp.float32(top_p if top_p is not None else 1.0),
        jnp.int32(eos_token_id if eos_token_id is not None else -1), jnp.int32(pad_token_id),
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
        top_k=int(top_k) if (do_sample and top_k is not None) else None, use_top_p=bool(do_sample and top_p is not None),
    )
