"""Dropout masks from models.layers.keep_mask: rate, independence and determinism.

The reference is the binomial distribution: over n elements the kept fraction has standard
deviation sqrt(p(1-p)/n); every check allows 5 of them.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import dropout, keep_mask

N = 1_000_000


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.8])
def test_keep_fraction_matches_the_rate(keep):
    mask = np.asarray(keep_mask(jax.random.key(3), (1000, 1000), keep))
    assert abs(mask.mean() - keep) < 5 * math.sqrt(keep * (1 - keep) / N)


def test_masks_are_independent_across_keys_positions_and_deterministic_per_key():
    key = jax.random.key(0)
    a = np.asarray(keep_mask(key, (1000, 1000), 0.5), np.float64)
    b = np.asarray(keep_mask(jax.random.fold_in(key, 1), (1000, 1000), 0.5), np.float64)
    bound = 5 / math.sqrt(N)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < bound
    assert abs(np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]) < bound
    assert abs(np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1]) < bound
    np.testing.assert_array_equal(a, np.asarray(keep_mask(key, (1000, 1000), 0.5), np.float64))


def test_dropout_scales_kept_values_and_keeps_the_mean():
    x = jnp.ones((1000, 1000))
    y = np.asarray(dropout(x, 0.1, jax.random.key(7)))
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 1 / 0.9, rtol=1e-6)
    assert abs(y.mean() - 1.0) < 5 * math.sqrt(0.9 * 0.1 / N) / 0.9
    assert dropout(x, 0.1, None) is x
