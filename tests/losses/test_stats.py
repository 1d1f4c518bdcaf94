"""Masked quantile, Spearman and histogram against NumPy/SciPy."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

from topd_jax.losses.stats import masked_histogram, masked_quantile, spearman


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.77, 1.0])
def test_masked_quantile_equals_numpy(q):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9)).astype(np.float32)
    valid = rng.random((4, 9)) < 0.6
    got, defined = masked_quantile(jnp.asarray(x), jnp.asarray(valid), q)
    assert bool(defined)
    np.testing.assert_allclose(got, np.quantile(x[valid], q), rtol=1e-5)


def test_masked_quantile_of_nothing_is_undefined_and_finite():
    got, defined = masked_quantile(jnp.ones(3), jnp.zeros(3, bool), 0.5)
    assert not bool(defined) and float(got) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_spearman_equals_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=30).astype(np.float32)
    y = (x + rng.integers(0, 3, size=30)).astype(np.float32)
    valid = rng.random(30) < 0.7
    expected = spearmanr(x[valid], y[valid]).statistic
    np.testing.assert_allclose(spearman(jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid)), expected, rtol=1e-5)


def test_spearman_is_zero_when_undefined():
    assert float(spearman(jnp.ones(5), jnp.arange(5.0), jnp.ones(5, bool))) == 0.0
    assert float(spearman(jnp.arange(5.0), jnp.arange(5.0), jnp.zeros(5, bool))) == 0.0


def test_masked_histogram_counts_valid_values_only():
    x = jnp.array([0.05, 0.15, 0.15, 1.99, 5.0, 0.5])
    valid = jnp.array([True, True, True, True, True, False])
    hist = masked_histogram(x, valid, bins=4, low=0.0, high=2.0)
    np.testing.assert_array_equal(hist, [3, 0, 0, 2])  # 5.0 is clipped into the last bin
