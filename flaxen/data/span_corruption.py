"""T5's span-corruption objective, in numpy: noise masks of random spans, sentinel inputs and targets,
and the lengths that give span-corrupted batches static shapes.

Why its own module: the objective is a pure function of (token ids, random generator), so a task
calls it from a grain `random_map` (a fresh mask each epoch, exactly reproducible from the seed) and
tests check it against the objective's definition alone.

The definition (T5, Raffel et al. 2020, section 3.1.4; `random_spans_noise_mask`,
`noise_span_to_unique_sentinel` and `random_spans_helper` of t5.data.preprocessors), for a text of
L tokens:

    num_noise_tokens = round(L * noise_density)          at least 1 and at most L - 1
    num_noise_spans  = round(num_noise_tokens / mean_noise_span_length)    at least 1
    the noise tokens and the L - num_noise_tokens other tokens are each cut at random into
    num_noise_spans non-empty spans; spans alternate, starting with a non-noise one (so the text
    ends in noise), and every such segmentation is equally likely.

    inputs  = the text with noise span i replaced by sentinel i, then EOS
    targets = sentinel i followed by noise span i, for every span, then EOS

Sentinel i is `<extra_id_i>`: with flaxen's and T5's vocabularies, id vocab_size - 1 - i
(`Tokenizer.sentinel_ids`). Rounding is T5's: float32 products rounded half to even, so
`num_noise_tokens` is the one T5 computes for every length (float64 differs at lengths such as
190: 190 * 0.15 is 28.5 in float64, rounded to 28, and 28.500002 in float32, rounded to 29).

Example (noise_density 0.15, mean span 3): a 568-token chunk has 85 noise tokens in 28 spans, so
its inputs are 483 + 28 + 1 = 512 ids and its targets 85 + 28 + 1 = 114;
`random_spans_helper(512)` returns (568, 114).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from flaxen.errors import ConfigError

SeedOrGenerator = Union[int, Sequence[int], np.random.Generator]


def _generator(rng: SeedOrGenerator) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ConfigError(f"noise_density={noise_density}: expected a fraction in (0, 1)")
    if not mean_noise_span_length >= 1.0:
        raise ConfigError(f"mean_noise_span_length={mean_noise_span_length}: expected at least 1 token")


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) of a text of `length` tokens, as T5 computes them
    (a text of one token is counted as two, the extra one cut off after masking)."""
    _check(noise_density, mean_noise_span_length)
    length = max(int(length), 2)
    noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    noise = min(max(noise, 1), length - 1)
    spans = max(int(np.round(np.float32(noise) / np.float32(mean_noise_span_length))), 1)
    if spans > length - noise:
        raise ConfigError(f"noise_density={noise_density} with mean_noise_span_length={mean_noise_span_length}: "
                          f"a text of {length} tokens would need {spans} non-noise spans between its noise spans "
                          f"but has only {length - noise} non-noise tokens; lower noise_density")
    return noise, spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """[num_segments] positive lengths summing to `num_items`, every segmentation equally likely."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float = 0.15, rng: SeedOrGenerator = 0,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """[length] bool: True on noise tokens (see the module docstring). Deterministic for a seed:
    `rng` is a numpy Generator (advanced) or a seed for one."""
    rng = _generator(rng)
    original = int(length)
    noise, spans = noise_counts(original, noise_density, mean_noise_span_length)
    length = max(original, 2)
    noise_lengths = _random_segmentation(noise, spans, rng)
    nonnoise_lengths = _random_segmentation(length - noise, spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, np.int64)
    indicator[span_starts] = 1
    is_noise = np.cumsum(indicator) % 2 == 1
    return is_noise[:original]


def _replace_spans(ids: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """`ids` with each run of True in `mask` replaced by the next sentinel (one id per run)."""
    previous = np.concatenate([[False], mask[:-1]])
    first = mask & ~previous
    out = ids.copy()
    out[first] = sentinels[:int(first.sum())]
    return out[~(mask & previous)]


def span_corruption(ids: Sequence[int], rng: SeedOrGenerator, *, sentinel_ids: Sequence[int],
                    eos_id: int | None, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 of T5's span corruption of the token ids of one text (without EOS).

    sentinel_ids: `<extra_id_0>`, `<extra_id_1>`, ... in that order (`Tokenizer.sentinel_ids`);
    eos_id: appended to both (None: nothing appended). A text of no tokens gives ([EOS], [EOS]).
    ConfigError when the text has more noise spans than there are sentinels."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    tail = [] if eos_id is None else [int(eos_id)]
    if ids.size == 0:
        empty = np.asarray(tail, np.int32)
        return empty, empty.copy()
    sentinels = np.asarray(sentinel_ids, np.int32)
    spans = noise_counts(len(ids), noise_density, mean_noise_span_length)[1]
    if spans > len(sentinels):
        raise ConfigError(f"a text of {len(ids)} tokens has {spans} noise spans but the tokenizer has "
                          f"{len(sentinels)} sentinel tokens (data.tokenizer.sentinels); use shorter texts or more "
                          "sentinels")
    mask = random_spans_noise_mask(len(ids), noise_density, rng, mean_noise_span_length)
    inputs = _replace_spans(ids, mask, sentinels)
    targets = _replace_spans(ids, ~mask, sentinels)
    return (np.concatenate([inputs, np.asarray(tail, np.int32)]).astype(np.int32),
            np.concatenate([targets, np.asarray(tail, np.int32)]).astype(np.int32))


def corrupted_lengths(tokens_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                      extra_tokens_per_span_inputs: int = 1, extra_tokens_per_span_targets: int = 1,
                      eos: bool = True) -> tuple[int, int]:
    """(inputs length, targets length) of the span corruption of a text of `tokens_length` tokens
    (with EOS appended to both when `eos`). Non-decreasing in tokens_length."""
    tokens_length = int(tokens_length)
    if tokens_length < 2:  # no token (nothing but EOS), or one token that is never noise
        kept = max(tokens_length, 0)
        return kept + int(eos), kept * extra_tokens_per_span_targets + int(eos)
    noise, spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
    return (tokens_length - noise + spans * extra_tokens_per_span_inputs + int(eos),
            noise + spans * extra_tokens_per_span_targets + int(eos))


def random_spans_helper(inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1, extra_tokens_per_span_targets: int = 1,
                        eos: bool = True) -> tuple[int, int]:
    """(tokens_length, targets_length): the longest text whose span-corrupted inputs fit
    `inputs_length` ids, and the length of its targets (T5's random_spans_helper).

    Pack the token stream into chunks of tokens_length ids: every chunk's inputs then have at most
    inputs_length ids and its targets at most targets_length, so batches pad to these two static
    lengths. (T5's helper also trims one token when noise_density is 0.5 so that the targets are no
    longer than the inputs; flaxen keeps the exact lengths.)"""
    if inputs_length < 2 + int(eos):
        raise ConfigError(f"inputs_length={inputs_length}: expected at least {2 + int(eos)} ids (a token, a sentinel"
                          f"{' and EOS' if eos else ''})")

    def inputs_of(length):
        return corrupted_lengths(length, noise_density, mean_noise_span_length, extra_tokens_per_span_inputs,
                                 extra_tokens_per_span_targets, eos)[0]

    tokens_length = 1
    while inputs_of(tokens_length + 1) <= inputs_length:
        tokens_length += 1
    return tokens_length, corrupted_lengths(tokens_length, noise_density, mean_noise_span_length,
                                            extra_tokens_per_span_inputs, extra_tokens_per_span_targets, eos)[1]


def chunks(sequences: Sequence[Sequence[int]], tokens_length: int) -> list[np.ndarray]:
    """The token ids of `sequences` concatenated and cut into pieces of `tokens_length` ids (the
    last may be shorter), as T5 prepares text for span corruption (reduce_concat_tokens, then
    split_tokens). Sequences carry no EOS between them, as in T5's span-corruption mixtures."""
    if tokens_length < 1:
        raise ConfigError(f"tokens_length={tokens_length}: expected a positive number of tokens")
    pieces = [np.asarray(s, np.int32).reshape(-1) for s in sequences if len(s)]
    if not pieces:
        return []
    stream = np.concatenate(pieces)
    return [stream[start:start + tokens_length] for start in range(0, len(stream), tokens_length)]
