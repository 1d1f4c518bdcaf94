"""select_candidates, window_kl_proxy, reference_positions (TOPD.md sections 2 and 5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.losses import reference_positions, select_candidates, window_kl_proxy
from topd_jax.losses.candidates import candidate_count


def numpy_candidates(d, mask, quantile, max_candidates):
    """Reference: per rollout, valid positions by d descending (ties: earlier first),
    the first min(M, ceil((1 - q) n - 1e-6)) of them."""
    b = d.shape[0]
    positions = np.zeros((b, max_candidates), np.int64)
    valid = np.zeros((b, max_candidates), bool)
    for i in range(b):
        idx = np.flatnonzero(mask[i] > 0)
        order = idx[np.lexsort((idx, -d[i, idx]))]
        count = min(max_candidates, math.ceil((1 - quantile) * len(idx) - 1e-6))
        positions[i, :count] = order[:count]
        valid[i, :count] = True
    return positions, valid


def test_hand_computed_example():
    d = jnp.array([[0.1, 0.9, 0.3, 0.9, 0.5, 2.0, 0.2, 0.0, 0.4, 0.6]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0, 1, 1, 1, 1]])  # the 2.0 is padding
    # n = 9 valid -> ceil(0.2 * 9) = 2 candidates: the two 0.9s, earlier first.
    positions, valid = select_candidates(d, mask, quantile=0.8, max_candidates=4)
    np.testing.assert_array_equal(positions, [[1, 3, 0, 0]])
    np.testing.assert_array_equal(valid, [[True, True, False, False]])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantile,max_candidates", [(0.8, 8), (0.5, 3), (0.0, 20), (0.95, 1)])
def test_equals_numpy_reference(seed, quantile, max_candidates):
    rng = np.random.default_rng(seed)
    b, t = 5, 17
    # Integer-valued scores make ties common; some rows are empty or nearly so.
    d = rng.integers(-3, 4, size=(b, t)).astype(np.float32)
    mask = (rng.random((b, t)) < rng.random((b, 1))).astype(np.float32)
    mask[0] = 0
    positions, valid = select_candidates(jnp.asarray(d), jnp.asarray(mask), quantile=quantile, max_candidates=max_candidates)
    ref_positions, ref_valid = numpy_candidates(d, mask, quantile, max_candidates)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_array_equal(np.where(ref_valid, positions, 0), ref_positions)


def test_count_rule_tolerates_float_error():
    # (1 - 0.8) * 10 = 2.0000000000000004 in floating point: still 2 candidates, not 3.
    d = jnp.arange(10.0)[None]
    _, valid = select_candidates(d, jnp.ones((1, 10)), quantile=0.8, max_candidates=8)
    assert int(valid.sum()) == 2


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.7, 0.8, 0.95, 1.0])
def test_count_is_exact_for_long_rollouts(quantile):
    # float32 (1 - q) * n drifts with n (0.3 * 170 = 51.000004 in float32); the count must not.
    n = np.arange(0, 20_001)
    expected = [math.ceil(round((1 - quantile) * k, 9)) for k in n]
    np.testing.assert_array_equal(candidate_count(jnp.asarray(n), quantile), expected)


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="quantile must be in"):
        select_candidates(jnp.zeros((1, 3)), jnp.ones((1, 3)), quantile=1.5)
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_kl_proxy(jnp.zeros((1, 3)), jnp.ones((1, 3)), window=0)


def test_window_kl_proxy_hand_computed():
    d = jnp.array([[1.0, 2.0, 3.0, 100.0, 4.0]])
    mask = jnp.array([[1, 1, 1, 0, 1]])
    # window 2 after t: [2,3] -> 2.5, [3,pad] -> 3, [pad,4] -> 4, [4] -> 4, nothing -> 0.
    np.testing.assert_allclose(window_kl_proxy(d, mask, window=2), [[2.5, 3.0, 4.0, 4.0, 0.0]])


def test_window_kl_proxy_equals_loop_reference():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(3, 20)).astype(np.float32)
    mask = (rng.random((3, 20)) < 0.7).astype(np.float32)
    window = 6
    expected = np.zeros_like(d)
    for i in range(3):
        for t in range(20):
            m = mask[i, t + 1 : t + 1 + window]
            expected[i, t] = (m * d[i, t + 1 : t + 1 + window]).sum() / max(m.sum(), 1)
    np.testing.assert_allclose(window_kl_proxy(jnp.asarray(d), jnp.asarray(mask), window=window), expected, rtol=1e-5, atol=1e-6)


def test_reference_positions_are_distinct_valid_tokens():
    mask = jnp.array([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
    positions, valid = reference_positions(jax.random.key(0), mask, 3)
    np.testing.assert_array_equal(valid.sum(-1), [3, 0, 1])
    for row in range(3):
        chosen = np.asarray(positions[row])[np.asarray(valid[row])]
        assert len(set(chosen.tolist())) == len(chosen)
        assert np.all(np.asarray(mask[row])[chosen] == 1)
