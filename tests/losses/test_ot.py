"""ot_distance against exact optimal transport (TOPD.md section 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment, linprog

from topd_jax.losses import cosine_cost, ot_distance


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def exact_assignment_cost(x, y):
    cost = 1.0 - unit(x) @ unit(y).T
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols].mean()


def exact_lp_cost(x, y):
    """Exact OT between uniform measures of different sizes, as a linear program."""
    cost = 1.0 - unit(x) @ unit(y).T
    n, m = cost.shape
    a_eq = np.concatenate([np.kron(np.eye(n), np.ones((1, m))), np.kron(np.ones((1, n)), np.eye(m))])
    b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
    return linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs").fun


def random_windows(seed, n, k, d, shift=0.3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k, d)).astype(np.float32), (rng.normal(size=(n, k, d)) + shift).astype(np.float32)


@pytest.mark.parametrize("dim", [3, 16, 256])
def test_defaults_within_5_percent_of_exact_assignment(dim):
    x, y = random_windows(dim, 16, 50, dim)
    got = np.asarray(jax.jit(ot_distance)(jnp.asarray(x), jnp.asarray(y)))
    exact = np.array([exact_assignment_cost(a, b) for a, b in zip(x, y)])
    np.testing.assert_array_less(np.abs(got - exact) / exact, 0.05)


def test_small_epsilon_tightens_the_gap():
    x, y = random_windows(7, 8, 20, 8)
    exact = np.array([exact_assignment_cost(a, b) for a, b in zip(x, y)])
    coarse = np.asarray(ot_distance(jnp.asarray(x), jnp.asarray(y), epsilon=0.1))
    fine = np.asarray(ot_distance(jnp.asarray(x), jnp.asarray(y), epsilon=0.003, num_iters=300))
    assert np.max(np.abs(fine - exact) / exact) < 0.01
    assert np.max(np.abs(fine - exact)) < np.max(np.abs(coarse - exact))


def test_masked_windows_of_different_length_match_the_exact_lp():
    x, y = random_windows(1, 6, 12, 8)
    x_len, y_len = [12, 9, 5, 3, 12, 1], [7, 12, 5, 11, 2, 1]
    x_mask = np.arange(12)[None] < np.array(x_len)[:, None]
    y_mask = np.arange(12)[None] < np.array(y_len)[:, None]
    got = np.asarray(ot_distance(jnp.asarray(x), jnp.asarray(y), jnp.asarray(x_mask), jnp.asarray(y_mask)))
    exact = np.array([exact_lp_cost(x[i, :a], y[i, :b]) for i, (a, b) in enumerate(zip(x_len, y_len))])
    np.testing.assert_array_less(np.abs(got - exact), 0.05 * exact + 1e-4)


def test_masked_tokens_carry_no_mass():
    x, y = random_windows(2, 4, 10, 16)
    mask = np.ones((4, 10), bool)
    mask[:, 6:] = False
    padded = ot_distance(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), jnp.asarray(mask))
    trimmed = ot_distance(jnp.asarray(x[:, :6]), jnp.asarray(y[:, :6]))
    np.testing.assert_allclose(padded, trimmed, rtol=1e-5, atol=1e-6)


def test_identical_windows_are_about_zero():
    x, _ = random_windows(3, 8, 50, 64)
    assert float(jnp.max(ot_distance(jnp.asarray(x), jnp.asarray(x)))) < 1e-3


def test_symmetric():
    x, y = random_windows(4, 8, 50, 16)
    xy = ot_distance(jnp.asarray(x), jnp.asarray(y))
    yx = ot_distance(jnp.asarray(y), jnp.asarray(x))
    np.testing.assert_allclose(xy, yx, rtol=1e-3, atol=1e-5)


def test_hand_computed_single_tokens_and_permutations():
    e = np.eye(3, dtype=np.float32)
    # One token each: the cost itself. 1 - cos(e0, (e0 + e1)/sqrt2) = 1 - 1/sqrt2.
    one = ot_distance(jnp.asarray(e[None, :1]), jnp.asarray((e[0] + e[1])[None, None]))
    np.testing.assert_allclose(one, [1 - 1 / np.sqrt(2)], rtol=1e-5)
    # A permuted window transports onto itself at zero cost. Against the negated basis, each
    # token avoids its own opposite (cost 2) and pays 1 for an orthogonal one.
    perm = ot_distance(jnp.asarray(e[None]), jnp.asarray(e[None, ::-1]))
    np.testing.assert_allclose(perm, [0.0], atol=1e-5)
    negated = ot_distance(jnp.asarray(e[None]), jnp.asarray(-e[None]))
    np.testing.assert_allclose(negated, [1.0], rtol=1e-4)
    opposite = ot_distance(jnp.asarray(e[None, :1]), jnp.asarray(-e[None, :1]))
    np.testing.assert_allclose(opposite, [2.0], rtol=1e-5)


def test_batched_over_leading_axes_and_empty_windows_score_zero():
    x, y = random_windows(5, 6, 5, 8)
    x = x.reshape(2, 3, 5, 8)
    y = y.reshape(2, 3, 5, 8)
    x_mask = np.ones((2, 3, 5), bool)
    x_mask[1, 2] = False  # an empty window
    got = np.asarray(ot_distance(jnp.asarray(x), jnp.asarray(y), jnp.asarray(x_mask), None))
    assert got.shape == (2, 3) and np.all(np.isfinite(got))
    assert got[1, 2] == 0.0
    single = ot_distance(jnp.asarray(x[0, 1]), jnp.asarray(y[0, 1]))
    np.testing.assert_allclose(got[0, 1], single, rtol=1e-6)


def test_no_gradient_and_finite_for_degenerate_inputs():
    x = jnp.zeros((2, 4, 3))  # zero vectors: cosine undefined, cost 1
    y = jnp.ones((2, 4, 3)) * 1e4
    out = ot_distance(x, y)
    assert np.all(np.isfinite(np.asarray(out)))
    grad = jax.grad(lambda x: jnp.sum(ot_distance(x, y)))(x)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("num_iters", [1, 2, 3])
def test_few_iterations_stay_a_transport_cost(num_iters):
    x, y = random_windows(8, 4, 10, 8)
    got = np.asarray(ot_distance(jnp.asarray(x), jnp.asarray(y), num_iters=num_iters))
    assert np.all((got >= 0) & (got <= 2)), got


def test_cost_is_one_minus_cosine():
    x, y = random_windows(6, 1, 4, 5)
    np.testing.assert_allclose(cosine_cost(jnp.asarray(x[0]), jnp.asarray(y[0])), 1 - unit(x[0]) @ unit(y[0]).T, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_clear_errors():
    x = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        ot_distance(x, x, epsilon=0.0)
    with pytest.raises(ValueError, match="share batch axes and width"):
        ot_distance(x, jnp.zeros((2, 4, 5)))
