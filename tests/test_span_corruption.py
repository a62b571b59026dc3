"""T5 span corruption against the objective's definition (Raffel et al. 2020, 3.1.4; T5's
random_spans_noise_mask): exact noise counts, span counts and alternation per text, every mask
equally likely, mean span length, sentinels in order, exact reconstruction, static lengths."""
import itertools

import numpy as np
import pytest

from flaxen.data import span_corruption as sc
from flaxen.errors import ConfigError

VOCAB = 1000
SENTINELS = list(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> = VOCAB - 1, descending
EOS = 1


def defined_counts(length, density=0.15, mean=3.0):
    """The definition, written out: T5 rounds float32 products half to even, keeps at least one
    noise and one non-noise token, and at least one span (a one-token text counts as two)."""
    n = max(length, 2)
    noise = min(max(int(np.round(np.float32(n) * np.float32(density))), 1), n - 1)
    return noise, max(int(np.round(np.float32(noise) / np.float32(mean))), 1)


def runs(mask):
    """[(is_noise, length), ...] of consecutive equal values."""
    return [(bool(k), len(list(g))) for k, g in itertools.groupby(mask.tolist())]


def reconstruct(inputs, targets):
    """The original ids from (inputs, targets), each ending in EOS: every sentinel of the inputs
    is replaced by what follows the same sentinel in the targets, up to the next sentinel."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    inputs, targets = list(inputs[:-1]), list(targets[:-1])
    sentinel = set(SENTINELS)
    spans, current = {}, None
    for token in targets:
        if token in sentinel:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs:
        out.extend(spans[token] if token in sentinel else [token])
    return out


def test_noise_and_span_counts_are_the_definitions_for_every_length():
    rng = np.random.default_rng(0)
    for length in range(1, 400):
        noise, spans = defined_counts(length)
        for _ in range(3):
            mask = sc.random_spans_noise_mask(length, 0.15, rng)
            assert mask.shape == (length,) and mask.dtype == bool
            if length == 1:
                assert not mask[0]  # the second, padding token took the noise
                continue
            assert mask.sum() == noise, length
            pattern = runs(mask)
            assert [k for k, _ in pattern] == [False, True] * spans  # alternate, non-noise first
            assert sum(n for k, n in pattern if k) / length == noise / length


def test_counts_match_round_half_even_at_exact_halves_and_float32_above_them():
    # exact halves round to even (1.5 -> 2, 4.5 -> 4); 190 * 0.15 is 28.5 in float64 but 28.500002 in
    # float32, T5's arithmetic, which gives 29
    assert sc.noise_counts(10, 0.15) == (2, 1)
    assert sc.noise_counts(30, 0.15) == (4, 1)
    assert sc.noise_counts(190, 0.15) == (29, 10)
    assert sc.noise_counts(100, 0.15) == (15, 5)
    assert sc.noise_counts(3, 0.15) == (1, 1)  # round(0.45) = 0, raised to one noise token


def test_every_segmentation_is_equally_likely():
    from scipy import stats

    # 40 tokens: 6 noise tokens in 2 spans (5 ways) and 34 others in 2 spans (33 ways)
    length, draws = 40, 33000
    rng = np.random.default_rng(1)
    seen = {}
    for _ in range(draws):
        key = np.packbits(sc.random_spans_noise_mask(length, 0.15, rng)).tobytes()
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 5 * 33
    assert stats.chisquare(list(seen.values())).pvalue > 1e-4


def test_mean_noise_span_length_is_three_over_many_texts():
    rng = np.random.default_rng(2)
    span_lengths = []
    for length in rng.integers(8, 600, 3000):
        pattern = runs(sc.random_spans_noise_mask(int(length), 0.15, rng))
        span_lengths += [n for k, n in pattern if k]
    assert abs(np.mean(span_lengths) - 3.0) < 0.05
    # and noise spans are not all of one length: lengths 1..>5 all occur
    assert {1, 2, 3, 4, 5} <= set(span_lengths)


def test_inputs_and_targets_reconstruct_the_text_with_sentinels_in_order():
    rng = np.random.default_rng(3)
    for length in list(range(0, 60)) + [200, 568]:
        ids = rng.integers(3, VOCAB - 100, length)
        inputs, targets = sc.span_corruption(ids, rng, sentinel_ids=SENTINELS, eos_id=EOS)
        assert inputs.dtype == np.int32 and targets.dtype == np.int32
        assert reconstruct(inputs, targets) == ids.tolist()
        in_sentinels = [t for t in inputs if t in SENTINELS]
        out_sentinels = [t for t in targets if t in SENTINELS]
        assert in_sentinels == SENTINELS[:len(in_sentinels)]  # <extra_id_0>, <extra_id_1>, ... descending ids
        assert out_sentinels[:len(in_sentinels)] == in_sentinels
        is_sentinel = np.isin(inputs, SENTINELS)
        assert not np.any(is_sentinel[1:] & is_sentinel[:-1])  # no two adjacent sentinels
        if length >= 2:
            assert targets[0] == SENTINELS[0] and inputs[-2] in SENTINELS  # noise spans close the text
            assert (len(inputs), len(targets)) == sc.corrupted_lengths(length)


def test_deterministic_for_a_seed():
    ids = np.arange(10, 110)
    first = sc.span_corruption(ids, 7, sentinel_ids=SENTINELS, eos_id=EOS)
    again = sc.span_corruption(ids, 7, sentinel_ids=SENTINELS, eos_id=EOS)
    other = sc.span_corruption(ids, 8, sentinel_ids=SENTINELS, eos_id=EOS)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    generator = sc.span_corruption(ids, np.random.default_rng(7), sentinel_ids=SENTINELS, eos_id=EOS)
    assert all(np.array_equal(a, b) for a, b in zip(first, generator))


def test_random_spans_helper_gives_t5s_lengths_and_bounds_every_shorter_chunk():
    # T5's span-corruption setting: 512 input ids come from 568 tokens, with 114 target ids
    assert sc.random_spans_helper(512, 0.15, 3.0) == (568, 114)
    for inputs_length in (16, 64, 128, 512):
        tokens_length, targets_length = sc.random_spans_helper(inputs_length)
        assert sc.corrupted_lengths(tokens_length)[0] <= inputs_length < sc.corrupted_lengths(tokens_length + 1)[0]
        rng = np.random.default_rng(inputs_length)
        for length in range(0, tokens_length + 1):
            inputs, targets = sc.span_corruption(rng.integers(3, 800, length), rng, sentinel_ids=SENTINELS,
                                                 eos_id=EOS)
            assert len(inputs) <= inputs_length and len(targets) <= targets_length


def test_chunks_concatenate_and_cut():
    pieces = sc.chunks([[1, 2, 3], [], [4, 5], [6, 7, 8, 9]], 4)
    assert [p.tolist() for p in pieces] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_mistakes_raise_flaxen_errors():
    with pytest.raises(ConfigError, match="noise_density=1.2"):
        sc.random_spans_noise_mask(10, 1.2)
    with pytest.raises(ConfigError, match="3 sentinel tokens"):
        sc.span_corruption(np.arange(100), 0, sentinel_ids=SENTINELS[:3], eos_id=EOS)
    with pytest.raises(ConfigError, match="lower noise_density"):
        sc.random_spans_noise_mask(10, 0.9, 0, mean_noise_span_length=1.0)
