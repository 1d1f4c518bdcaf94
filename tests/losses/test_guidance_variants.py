"""The guidance variants of TOPD.md section 5 ("other readings"): each against a hand-written
reference, its gradient direction, and 0 (or plain suppressed OPD) when nothing is divergent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.losses import TopdConfig, near_future_return, topd_loss, trajectory_loss
from tests.losses.test_topd import hand_inputs

# hand_inputs: d = [2, 0, 1, 0.2, 0, (pad)], candidates t=0 (divergent, OT 0.9) and t=2 (not,
# OT 0.2; tau 0.4), windows [-1, -2, (pad)] and [-5, -5, -5]; N = 5 valid rollout tokens.


@pytest.mark.parametrize("norm, expected", [
    ("window", (1 + 2) / 2),          # the one divergent window's token mean
    ("token", (1 + 2) / 2),           # its two guided tokens
    ("rollout_token", (1 + 2) / 5),   # summed, over the batch's 5 rollout tokens
])
def test_trajectory_norms_hand_computed(norm, expected):
    _, metrics = topd_loss(hand_inputs(), TopdConfig.preset("topd", guidance_options={"norm": norm}))
    np.testing.assert_allclose(metrics["loss_traj"], expected, rtol=1e-6)


def test_window_and_token_norms_differ_with_two_windows_of_unequal_length():
    step = jnp.array([[[1.0, 2.0, 0.0], [4.0, 4.0, 4.0]]])
    mask = jnp.array([[[1, 1, 0], [1, 1, 1]]])
    both = jnp.array([[True, True]])
    window, count = trajectory_loss(step, mask, both, norm="window")
    token, _ = trajectory_loss(step, mask, both, norm="token")
    rollout, _ = trajectory_loss(step, mask, both, norm="rollout_token", rollout_tokens=10)
    np.testing.assert_allclose([window, token, rollout], [(1.5 + 4) / 2, 15 / 5, 15 / 10], rtol=1e-6)
    assert int(count) == 2
    # gamma = 0.5 under token norm: weights [1, .5] and [1, .5, .25], sum 3.25.
    gamma, _ = trajectory_loss(step, mask, both, gamma=0.5, norm="token")
    np.testing.assert_allclose(gamma, (1 + 1 + 4 * 1.75) / 3.25, rtol=1e-6)
    with pytest.raises(ValueError, match="rollout_tokens"):
        trajectory_loss(step, mask, both, norm="rollout_token")


@pytest.mark.parametrize("norm", ["window", "token", "rollout_token"])
def test_window_guidance_raises_the_teachers_window_tokens_and_is_zero_without_divergence(norm):
    config = TopdConfig.preset("topd", guidance_options={"norm": norm})
    grad = jax.grad(lambda w: topd_loss(hand_inputs(window_logprobs=w), config)[0])(
        hand_inputs().window_logprobs)
    assert np.all(np.asarray(grad[0, 0, :2]) < 0)  # the divergent window's valid tokens: pushed up
    assert not np.asarray(grad[0, 0, 2]).any() and not np.asarray(grad[0, 1]).any()  # pad, non-divergent
    quiet = hand_inputs(ot=jnp.array([[0.1, 0.2]]))  # nothing reaches tau
    _, metrics = topd_loss(quiet, config)
    assert float(metrics["loss_traj"]) == 0.0 and float(metrics["num_divergent"]) == 0.0


def test_near_future_return_hand_computed():
    d = jnp.array([[2.0, 0.0, 1.0, 0.2, 0.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0]])
    # F_t = sum_{k=1}^{2} gamma^k d_{t+k} (K = 3), the padded 9 never counts.
    np.testing.assert_allclose(near_future_return(d, mask, window=3, gamma=0.5),
                               [[0 + 0.25, 0.5 + 0.05, 0.1, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(near_future_return(d, mask, window=1), np.zeros((1, 6)))


def test_return_form_credits_the_divergent_state_with_its_future_drift():
    # K = 3, lambda = 0.5, gamma = 1: at the divergent t = 0, A = -(2 + 0.5 (0 + 1)) = -2.5;
    # t = 2 is suppressed; others keep A = -d. L = -(sum_t w_t A_t) / N at rho = 1.
    config = TopdConfig.preset("topd", guidance="return", traj_weight=0.5, window=3)
    inputs = hand_inputs(window_logprobs=None, window_mask=None)
    loss, metrics = topd_loss(inputs, config)
    np.testing.assert_allclose(loss, (2.5 + 0 + 0 + 0.2 + 0) / 5, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_traj"], 1.0, rtol=1e-6)  # F at the divergent state
    grad = jax.grad(lambda s: topd_loss(hand_inputs(student_logprobs=s, window_logprobs=None,
                                                    window_mask=None), config)[0])(inputs.student_logprobs)
    # dL/ds_t = w_t A_t / N: the fork's token is pushed down harder than by its own d alone.
    np.testing.assert_allclose(grad, [[2.5 / 5, 0, 0, 0.2 / 5, 0, 0]], rtol=1e-6)


def test_return_form_without_divergence_is_suppressed_opd():
    quiet = hand_inputs(ot=jnp.array([[0.1, 0.2]]), window_logprobs=None, window_mask=None)
    ret, _ = topd_loss(quiet, TopdConfig.preset("topd", guidance="return", window=3))
    suppress, _ = topd_loss(quiet, TopdConfig.preset("opd_suppress", window=3))
    np.testing.assert_allclose(ret, suppress, rtol=1e-6)


def test_variant_keys_need_no_windows_only_where_they_should():
    assert not TopdConfig.preset("topd", guidance="return", locator="window_kl").uses_windows
    assert TopdConfig.preset("topd", guidance="return").uses_windows  # the ot locator still branches
    assert TopdConfig.preset("topd", guidance_options={"window_tokens": "greedy"}, locator="oracle").uses_windows
    for values, key in (({"guidance": "spread"}, "guidance"),
                        ({"guidance_options": {"window_tokens": "beam"}}, "guidance_options.window_tokens"),
                        ({"guidance_options": {"norm": "sum"}}, "guidance_options.norm")):
        with pytest.raises(Exception, match=key):
            TopdConfig.preset("topd", **values)
