"""Autoregressive generation with an explicit key/value cache: greedy, sampling and beam search, for
GPT-2-family decoders and encoder-decoders.

Why: recomputing the whole sequence for every new token costs O(length²) per token; with a cache
each step runs the decoder on one token. The loop is one compiled program: a first call (the
prompt for a decoder-only model; the encoder, then the decoder start token, for an
encoder-decoder) fills a cache sized for every new token, then a `jax.lax.while_loop` runs one
decode step per new token and stops early once nothing can change any more. It compiles once
per (model, input shape, max_new_tokens, num_beams, do_sample, top_k, whether top_p is used);
token values, temperature, the top_p value, length_penalty, early_stopping, EOS/pad ids and the
RNG key are traced, so new inputs reuse the compiled loop.

The decoding strategies see a model only through a small step interface (`_DecoderOnlySteps`,
`_EncoderDecoderSteps`): `start()` -> (next-token logits [rows, vocab], cache), `step(token, t,
cache)` feeds the token chosen at step t (0-based) and returns the next logits and cache, and
`reorder(cache, rows)` gathers the cache's rows when beams are reordered. The greedy/sampling loop
and the beam-search loop are written once over that interface.

Decoder-only prompts of different lengths are left-padded (attention_mask 0 on the left);
positions come from the mask (cumsum - 1), so a padded row generates what it would alone.
Token choice per step, as in Hugging Face: greedy argmax, or sampling from
softmax(logits / temperature) after top-k then top-p (nucleus) filtering.

Beam search (num_beams > 1) follows Hugging Face's vectorised beam search: each row keeps
num_beams running beams (beam 0 starts at log-probability 0, the others at -1e9 so the first step
expands beam 0 only); each step adds log_softmax(logits) to the beams' running sums and keeps the
2·num_beams best (beam, token) candidates of the row. Candidates ending in EOS, or reaching
max_new_tokens, have finished; those among the first num_beams candidates enter the row's buffer
of num_beams finished hypotheses, scored sum_logprobs / new_length ** length_penalty (new_length:
the tokens generated, EOS included). The num_beams best unfinished candidates run on; the cache
rows follow their source beams. A row closes (its buffer no longer changes) when early_stopping is
True and its buffer holds num_beams hypotheses; otherwise once its buffer is full and the best
running beam, scored at its current length (False) or at max_new_tokens when length_penalty > 0
("never": an exact bound), cannot beat the worst buffered hypothesis. The loop ends when every row
is closed or every candidate has ended; each row's best buffered hypothesis is returned, pad tokens
after its EOS.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.errors import ConfigError
from models.heads import HEADS

# Hugging Face's stand-in for "impossible" in beam scores (kept, not -inf, so that sums stay finite).
_NEG = -1.0e9
_EARLY_STOPPING = {False: 0, True: 1, "never": 2}


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


class _Settings(NamedTuple):
    """What the compiled loop is specialised on (hashable, a static jit argument)."""
    max_new_tokens: int
    num_beams: int
    do_sample: bool
    top_k: Optional[int]
    use_top_p: bool


class _Knobs(NamedTuple):
    """Traced scalars: changing them reuses the compiled loop."""
    temperature: jax.Array
    top_p: jax.Array
    eos_token_id: jax.Array  # -1: none
    pad_token_id: jax.Array
    length_penalty: jax.Array
    early_stopping: jax.Array  # _EARLY_STOPPING code


def _repeat_rows(tree, copies: int):
    """Every array of `tree` [rows, ...] -> [rows * copies, ...], each row repeated `copies` times in place."""
    return tree if copies == 1 else jax.tree.map(lambda x: jnp.repeat(x, copies, axis=0), tree)


def _take_rows(tree, rows):
    """Every array of `tree` [n, ...] -> [len(rows), ...] with the given rows."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


class _DecoderOnlySteps:
    """The step interface over a GPT-2-family `Model` with the 'causal_lm' head, for left-padded
    prompts [batch, prompt_len], each row repeated `copies` times (beams)."""

    def __init__(self, model, input_ids, attention_mask, max_new_tokens: int, copies: int):
        batch, self.prompt_len = input_ids.shape
        self.model, self.input_ids, self.copies = model, input_ids, copies
        self.mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), attention_mask.dtype)], axis=1)
        self.positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        self.rows_mask = _repeat_rows(self.mask, copies)
        self.next_position = _repeat_rows(self.positions[:, -1] + 1, copies)

    def start(self):
        """The prompt runs once per row; its cache and last logits are then repeated per beam."""
        batch = self.input_ids.shape[0]
        cache = self.model.backbone.init_cache(batch, self.mask.shape[1])
        out = self.model(self.input_ids, self.mask, position_ids=self.positions, cache=cache, cache_index=0)
        return _repeat_rows(out.logits[:, -1], self.copies), _repeat_rows(out.cache, self.copies)

    def step(self, token, t, cache):
        out = self.model(token[:, None], self.rows_mask, position_ids=(self.next_position + t)[:, None], cache=cache,
                         cache_index=self.prompt_len + t)
        return out.logits[:, 0], out.cache

    def reorder(self, cache, rows):
        return _take_rows(cache, rows)


class _EncoderDecoderSteps:
    """The step interface over an encoder-decoder (models.t5.T5: encode / init_cache / decode) for
    source ids [batch, src_len] (padding anywhere, marked 0 in attention_mask), each row repeated
    `copies` times (beams). The encoder runs once and the cross-attention keys/values are projected
    once (init_cache); each step runs the decoder on one token with the self-attention cache."""

    def __init__(self, model, input_ids, attention_mask, decoder_start_token_id, max_new_tokens: int, copies: int):
        self.model, self.copies, self.attention_mask = model, copies, attention_mask
        self.decoder_start_token_id = decoder_start_token_id
        # slot 0 holds the start token, slot 1 + t the token chosen at step t; the last one is never fed
        self.max_length = max_new_tokens
        self.encoder_hidden = model.encode(input_ids, attention_mask)
        self.rows_hidden = _repeat_rows(self.encoder_hidden, copies)
        self.rows_mask = _repeat_rows(attention_mask, copies)

    def start(self):
        """The start token runs once per row; its cache (cross-attention included) and logits are
        then repeated per beam."""
        batch = self.encoder_hidden.shape[0]
        cache = self.model.init_cache(batch, self.max_length, self.encoder_hidden, self.attention_mask)
        start = jnp.full((batch, 1), self.decoder_start_token_id, jnp.int32)
        out = self.model.decode(start, self.encoder_hidden, self.attention_mask, cache=cache, cache_index=0)
        return _repeat_rows(out.logits[:, -1], self.copies), _repeat_rows(out.cache, self.copies)

    def step(self, token, t, cache):
        out = self.model.decode(token[:, None], self.rows_hidden, self.rows_mask, cache=cache, cache_index=1 + t)
        return out.logits[:, 0], out.cache

    def reorder(self, cache, rows):
        """Only the self-attention keys/values: the cross-attention ones are equal across a row's
        beams, and beams never move between rows."""
        return tuple({**layer, "self_key": jnp.take(layer["self_key"], rows, axis=0),
                      "self_value": jnp.take(layer["self_value"], rows, axis=0)} for layer in cache)


def _choose(logits, rng, knobs: _Knobs, settings: _Settings):
    """logits [rows, vocab] -> next tokens [rows] (int32): argmax, or a sample after temperature,
    top-k and top-p."""
    if not settings.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / knobs.temperature
    if settings.top_k is not None:
        logits = top_k_filter(logits, settings.top_k)
    if settings.use_top_p:
        logits = top_p_filter(logits, knobs.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _greedy_or_sample(steps, knobs: _Knobs, settings: _Settings, rng):
    """One sequence per row: -> new tokens [rows, max_new_tokens], pad after each row's EOS."""
    new = settings.max_new_tokens
    logits, cache = steps.start()
    token = _choose(logits, jax.random.fold_in(rng, 0), knobs, settings)
    done = token == knobs.eos_token_id
    tokens = jnp.full((token.shape[0], new), knobs.pad_token_id, jnp.int32).at[:, 0].set(token)

    def unfinished(carry):
        step, *_, done = carry
        return (step < new) & ~jnp.all(done)

    def decode_step(carry):
        step, token, tokens, cache, done = carry
        logits, cache = steps.step(token, step - 1, cache)
        token = jnp.where(done, knobs.pad_token_id, _choose(logits, jax.random.fold_in(rng, step), knobs, settings))
        done = done | (token == knobs.eos_token_id)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        return step + 1, token, tokens, cache, done

    return jax.lax.while_loop(unfinished, decode_step, (jnp.int32(1), token, tokens, cache, done))[2]


class _Beams(NamedTuple):
    """Beam-search state of `batch` rows, `beams` beams each, over `new` new tokens."""
    step: jax.Array               # tokens chosen so far
    running_tokens: jax.Array     # [batch, beams, new] int32 (pad beyond `step`)
    running_scores: jax.Array     # [batch, beams] summed log-probabilities
    finished_tokens: jax.Array    # [batch, beams, new] the buffered hypotheses, best first
    finished_scores: jax.Array    # [batch, beams] their length-penalised scores (-1e9: empty slot)
    finished: jax.Array           # [batch, beams] bool: the slot holds a hypothesis
    improvable: jax.Array         # [batch, 1] bool: the row's buffer can still change
    go_on: jax.Array              # bool: some row can still change


def _gather(x, index):
    """x [batch, n, ...], index [batch, m] -> [batch, m, ...] (x[b, index[b, j]])."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_advance(state: _Beams, logits, knobs: _Knobs, beams: int):
    """One beam-search step from the running beams' next-token logits [batch * beams, vocab]:
    -> (the new state, the source row [batch * beams] of each new running beam, for the cache)."""
    batch, _, new = state.running_tokens.shape
    step = state.step
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, beams, vocab)
    log_probs = (log_probs + state.running_scores[:, :, None]).reshape(batch, beams * vocab)

    # the 2·beams best (beam, token) candidates of each row: enough to keep `beams` unfinished ones
    # even when every beam's best continuation is EOS
    candidate_scores, flat = jax.lax.top_k(log_probs, 2 * beams)
    source, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    candidate_tokens = _gather(state.running_tokens, source)
    candidate_tokens = jax.lax.dynamic_update_slice(candidate_tokens, token[:, :, None], (0, 0, step))
    ends = (token == knobs.eos_token_id) | (step + 1 >= new)

    # the running beams: the best candidates that did not end
    running_candidates = candidate_scores + ends * _NEG
    keep = jax.lax.top_k(running_candidates, beams)[1]
    running_tokens = _gather(candidate_tokens, keep)
    running_scores = _gather(running_candidates, keep)
    rows = (_gather(source, keep) + jnp.arange(batch)[:, None] * beams).reshape(-1)

    # the finished buffer: hypotheses that ended among the first `beams` candidates, unless the row
    # is closed (full under early_stopping=True, or no longer improvable)
    just_finished = ends & (jnp.arange(2 * beams) < beams)[None, :]
    scores = candidate_scores / (step + 1).astype(jnp.float32) ** knobs.length_penalty
    full = jnp.all(state.finished, axis=-1, keepdims=True) & (knobs.early_stopping == _EARLY_STOPPING[True])
    scores = scores + full * _NEG + ~state.improvable * _NEG + ~just_finished * _NEG
    merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
    best = jax.lax.top_k(merged_scores, beams)[1]
    finished_tokens = _gather(jnp.concatenate([state.finished_tokens, candidate_tokens], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    finished = _gather(jnp.concatenate([state.finished, just_finished], axis=1), best)

    # can a running beam still beat the worst buffered hypothesis?
    step = step + 1
    never = (knobs.early_stopping == _EARLY_STOPPING["never"]) & (knobs.length_penalty > 0)
    best_length = jnp.where(never, new, step).astype(jnp.float32)
    best_running = running_scores[:, :1] / best_length ** knobs.length_penalty
    worst_finished = jnp.where(finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
    improvable = state.improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
    all_full = jnp.all(finished) & (knobs.early_stopping == _EARLY_STOPPING[True])
    go_on = jnp.any(improvable) & ~all_full & ~jnp.all(ends)
    return _Beams(step, running_tokens, running_scores, finished_tokens, finished_scores, finished, improvable,
                  go_on), rows


def _beam_search(steps, knobs: _Knobs, settings: _Settings):
    """num_beams beams per row: -> the best finished hypothesis per row [batch, max_new_tokens]."""
    beams, new = settings.num_beams, settings.max_new_tokens
    logits, cache = steps.start()
    batch = logits.shape[0] // beams
    state = _Beams(
        step=jnp.int32(0),
        running_tokens=jnp.full((batch, beams, new), knobs.pad_token_id, jnp.int32),
        running_scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(_NEG),
        finished_tokens=jnp.full((batch, beams, new), knobs.pad_token_id, jnp.int32),
        finished_scores=jnp.full((batch, beams), _NEG, jnp.float32),
        finished=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        go_on=jnp.bool_(True),
    )
    state, rows = _beam_advance(state, logits, knobs, beams)
    cache = steps.reorder(cache, rows)

    def unfinished(carry):
        state, _ = carry
        return state.go_on & (state.step < new)

    def decode_step(carry):
        state, cache = carry
        token = jax.lax.dynamic_index_in_dim(state.running_tokens, state.step - 1, axis=2, keepdims=False)
        logits, cache = steps.step(token.reshape(-1), state.step - 1, cache)
        state, rows = _beam_advance(state, logits, knobs, beams)
        return state, steps.reorder(cache, rows)

    state, _ = jax.lax.while_loop(unfinished, decode_step, (state, cache))
    return state.finished_tokens[:, 0]


def _decode(steps, knobs: _Knobs, settings: _Settings, rng):
    if settings.num_beams > 1:
        return _beam_search(steps, knobs, settings)
    return _greedy_or_sample(steps, knobs, settings, rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def _generate_decoder_only(graphdef, state, input_ids, attention_mask, rng, knobs: _Knobs, *, settings: _Settings):
    model = nnx.merge(graphdef, state)
    steps = _DecoderOnlySteps(model, input_ids, attention_mask, settings.max_new_tokens, settings.num_beams)
    return jnp.concatenate([input_ids, _decode(steps, knobs, settings, rng)], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def _generate_encoder_decoder(graphdef, state, input_ids, attention_mask, decoder_start_token_id, rng, knobs: _Knobs,
                              *, settings: _Settings):
    model = nnx.merge(graphdef, state)
    steps = _EncoderDecoderSteps(model, input_ids, attention_mask, decoder_start_token_id, settings.max_new_tokens,
                                 settings.num_beams)
    start = jnp.full((input_ids.shape[0], 1), decoder_start_token_id, jnp.int32)
    return jnp.concatenate([start, _decode(steps, knobs, settings, rng)], axis=1)


def _is_encoder_decoder(model) -> bool:
    """Whether `model` offers the encoder-decoder calls generation uses (models.t5.T5 does)."""
    return all(callable(getattr(model, name, None)) for name in ("encode", "init_cache", "decode")) \
        and hasattr(model, "decoder_start_token_id")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_options(*, max_new_tokens, num_beams, length_penalty, early_stopping, do_sample, temperature, top_k, top_p,
                   eos_token_id, pad_token_id, decoder_start_token_id, rng, seed, vocab_size: int):
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not _is_int(num_beams) or num_beams < 1:
        raise ConfigError(f"generate: num_beams must be a positive integer, got {num_beams!r}")
    if num_beams > 1 and do_sample:
        raise ConfigError(f"generate: num_beams={num_beams} with do_sample=True (beam sampling) is not supported; "
                          "use do_sample=False for beam search, or num_beams=1 to sample")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float, np.integer, np.floating)) \
            or not math.isfinite(length_penalty):
        raise ConfigError(f"generate: length_penalty must be a finite number, got {length_penalty!r}")
    if not any(early_stopping is value or (isinstance(early_stopping, str) and early_stopping == value)
               for value in _EARLY_STOPPING):
        raise ConfigError(f"generate: early_stopping must be True, False or 'never', got {early_stopping!r}")
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and not (_is_int(value) and value >= 0):
            raise ConfigError(f"generate: {name} must be a non-negative integer or None, got {value!r}")
    if decoder_start_token_id is not None and not (_is_int(decoder_start_token_id)
                                                   and 0 <= decoder_start_token_id < vocab_size):
        raise ConfigError(f"generate: decoder_start_token_id must be a token id in [0, {vocab_size}), got "
                          f"{decoder_start_token_id!r}")
    if rng is not None and seed is not None:
        raise ConfigError("generate: pass either rng or seed, not both")
    if seed is not None and not _is_int(seed):
        raise ConfigError(f"generate: seed must be an integer, got {seed!r}")
    if do_sample:
        if rng is None and seed is None:
            raise ConfigError("generate: do_sample=True needs an rng key (e.g. jax.random.key(0)) or a seed")
        if not temperature > 0:
            raise ConfigError(f"generate: temperature must be > 0, got {temperature!r}")
        if top_k is not None and not (_is_int(top_k) and 1 <= top_k <= vocab_size):
            raise ConfigError(f"generate: top_k must be an integer in [1, {vocab_size}], got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"generate: top_p must be in (0, 1], got {top_p!r}")


def _token_ids(name: str, ids, mask=None):
    """ids (and mask, default all ones) as numpy int arrays [batch, length], checked."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"generate: {name} must be integer token ids [batch, length], got shape {ids.shape} "
                          f"dtype {ids.dtype}")
    mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask)
    if mask.shape != ids.shape:
        raise ConfigError(f"generate: attention_mask shape {mask.shape} != {name} shape {ids.shape}")
    return ids, mask


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None, rng: Optional[jax.Array] = None,
             seed: Optional[int] = None, decoder_start_token_id: Optional[int] = None) -> jax.Array:
    """Generates up to max_new_tokens tokens per row of input_ids [batch, length] (int32 result).

    model: a gpt2-family `Model` with the 'causal_lm' head, or an encoder-decoder (models.t5.T5,
    built with head 'seq2seq_lm').
      decoder-only: input_ids are prompts, left-padded (attention_mask 0 on the left). Returns
        [batch, prompt_len + max_new_tokens]: the prompt, then the new tokens.
      encoder-decoder: input_ids are the encoder's sources (padding marked 0 in attention_mask, on
        either side). Returns [batch, 1 + max_new_tokens]: decoder_start_token_id (default the
        model's), then the new tokens; max_new_tokens does not count the start token.
    After a sequence's EOS (kept; eos_token_id None: no EOS, every sequence runs max_new_tokens)
    come pad tokens: pad_token_id, by default eos_token_id (else 0) for a decoder-only model and
    the model's config.pad_token_id for an encoder-decoder. Positions no sequence of the batch
    reached (the loop stopped early) are pad tokens too.

    num_beams=1, do_sample=False: greedy. do_sample=True samples with `rng` (or
    jax.random.key(seed)) after temperature, top-k and top-p filtering. num_beams > 1: beam search
    (do_sample must be False) returning each row's best hypothesis, scored sum of log-probabilities
    / new_length ** length_penalty (new_length: the new tokens, EOS included; length_penalty > 0
    favours longer, < 0 shorter hypotheses); early_stopping (True, False or 'never') decides when
    a row's search ends, as in Hugging Face (the module docstring says how). length_penalty and
    early_stopping only matter for beam search.
    """
    encoder_decoder = _is_encoder_decoder(model)
    config = getattr(model, "config", None)
    head = HEADS.get(getattr(model, "head_name", None))
    if config is None or not (encoder_decoder or (getattr(config, "family", None) == "gpt2" and head is not None
                                                  and head.generates)):
        raise ConfigError("generate: model must be a gpt2-family Model with head='causal_lm' or an encoder-decoder "
                          "(family 't5' with head 'seq2seq_lm')")
    input_ids, attention_mask = _token_ids("input_ids", input_ids, attention_mask)
    _check_options(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=early_stopping, do_sample=do_sample, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   decoder_start_token_id=decoder_start_token_id, rng=rng, seed=seed, vocab_size=config.vocab_size)
    if encoder_decoder:
        if not attention_mask.any(axis=1).all():
            raise ConfigError("generate: every source row needs at least one token (attention_mask 1)")
        if decoder_start_token_id is None:
            decoder_start_token_id = model.decoder_start_token_id
        if pad_token_id is None:
            pad_token_id = config.pad_token_id
    else:
        if decoder_start_token_id is not None:
            raise ConfigError("generate: decoder_start_token_id applies to encoder-decoder models only")
        if not attention_mask[:, -1].all():
            raise ConfigError("generate: prompts must be left-padded (attention_mask[:, -1] must be 1 in every row)")
        total = input_ids.shape[1] + int(max_new_tokens)
        if total > config.max_position_embeddings:
            raise ConfigError(f"generate: prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = "
                              f"{total} exceeds the model's max_position_embeddings={config.max_position_embeddings}")
    knobs, settings, rng = _prepare(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                                    early_stopping=early_stopping, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                    rng=rng, seed=seed)
    graphdef, state = nnx.split(model)
    ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    if encoder_decoder:
        return _generate_encoder_decoder(graphdef, state, ids, mask, jnp.int32(decoder_start_token_id), rng, knobs,
                                         settings=settings)
    return _generate_decoder_only(graphdef, state, ids, mask, rng, knobs, settings=settings)


def _prepare(*, max_new_tokens, num_beams, length_penalty, early_stopping, do_sample, temperature, top_k, top_p,
             eos_token_id, pad_token_id, rng, seed):
    """The traced knobs, the static settings and the RNG key of one generate call."""
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    if rng is None:
        rng = jax.random.key(seed if seed is not None else 0)
    code = next(c for value, c in _EARLY_STOPPING.items()
                if early_stopping is value or (isinstance(early_stopping, str) and early_stopping == value))
    knobs = _Knobs(
        temperature=jnp.float32(temperature), top_p=jnp.float32(top_p if top_p is not None else 1.0),
        eos_token_id=jnp.int32(eos_token_id if eos_token_id is not None else -1), pad_token_id=jnp.int32(pad_token_id),
        length_penalty=jnp.float32(length_penalty), early_stopping=jnp.int32(code),
    )
    settings = _Settings(
        max_new_tokens=int(max_new_tokens), num_beams=int(num_beams), do_sample=bool(do_sample),
        top_k=int(top_k) if (do_sample and top_k is not None) else None,
        use_top_p=bool(do_sample and top_p is not None),
    )
    return knobs, settings, rng
