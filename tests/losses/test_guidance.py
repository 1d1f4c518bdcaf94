"""The GUIDANCE table (topd_jax/losses/guidance.py, docs/method.md sections 7b-7e): each reading's
equations against hand-written numpy references, their gradient directions, no extra signal
when nothing is divergent, relay's loss side, the table's option checks, and pins of the
paper's form against the numbers of the code before the table existed (commit 210336e)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.configuration import ConfigError
from topd_jax.losses import (GUIDANCE, TopdConfig, TopdInputs, bounded_reward, mean_future, near_future_return,
                             prefix_likelihood, topd_loss)
from topd_jax.losses.guidance import get_guidance, zscore
from tests.losses.test_topd import hand_inputs

# ------------------------------------------------------------------------ shared inputs

# B = 2, T = 6, on-policy (s = b); row 0 has 5 valid tokens, row 1 has 4 (N = 9).
B_LOGP = np.array([[-1.0, -0.5, -2.0, -1.5, -0.3, -1.0], [-0.7, -1.2, -0.4, -2.5, -1.0, -1.0]], np.float32)
Q_LOGP = np.array([[-3.0, -0.6, -1.0, -2.5, -0.2, -4.0], [-0.5, -3.2, -0.9, -1.5, -2.0, -1.0]], np.float32)
MASK = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
POSITIONS = np.array([[0, 2], [1, 3]])
# tau 0.5 (absolute): the divergent states R are (0, 0) at t = 0 and (1, 1) at t = 3; the
# candidates at (0, t=2) and (1, t=1) are suppressed.
OT = np.array([[0.9, 0.2], [0.3, 0.8]], np.float32)
DIVERGENT_TOKENS = np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], bool)
SUPPRESSED_TOKENS = np.array([[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], bool)
WINDOW_LOGP = np.array([[[-1.0, -2.0, -3.0], [-5.0, -5.0, -5.0]],
                        [[-4.0, -4.0, -4.0], [-0.5, -1.5, -2.5]]], np.float32)
WINDOW_MASK = np.array([[[1, 1, 0], [1, 1, 1]], [[1, 1, 1], [1, 1, 1]]])
N = MASK.sum()


def two_inputs(**overrides):
    fields = dict(
        student_logprobs=jnp.asarray(B_LOGP),
        behaviour_logprobs=jnp.asarray(B_LOGP),
        teacher_logprobs=jnp.asarray(Q_LOGP),
        mask=jnp.asarray(MASK),
        positions=jnp.asarray(POSITIONS),
        valid=jnp.ones((2, 2), bool),
        ot=jnp.asarray(OT),
        window_logprobs=jnp.asarray(WINDOW_LOGP),
        window_mask=jnp.asarray(WINDOW_MASK),
    )
    fields.update(overrides)
    return TopdInputs(**fields)


def config(guidance, tau=0.5, **overrides):
    return TopdConfig.preset("topd", guidance=guidance, threshold_mode="absolute", tau=tau, **overrides)


# ------------------------------------------------------------------------ numpy references

def np_bounded_reward(s, q, alpha):
    return np.log(alpha * np.exp(q.astype(np.float64) - s) + 1 - alpha)


def np_mean_future(v, m, window):
    out = np.zeros(v.shape)
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            future = [v[b, u] for u in range(t + 1, min(t + window, v.shape[1])) if m[b, u]]
            out[b, t] = np.mean(future) if future else 0.0
    return out


def np_zscore(v, where):
    x = v[where > 0].astype(np.float64)
    return np.where(where > 0, (v - x.mean()) / max(x.std(), 1e-6), 0.0)


def np_prefix_likelihood(q, m, positions, tau):
    out = np.zeros(positions.shape)
    for b in range(positions.shape[0]):
        for j, t in enumerate(positions[b]):
            prefix = [q[b, s] for s in range(t) if m[b, s]]
            out[b, j] = np.exp(np.mean(prefix) / tau) if prefix else 1.0
    return out


def np_near_future_return(d, m, window, gamma):
    out = np.zeros(d.shape)
    for b in range(d.shape[0]):
        for t in range(d.shape[1]):
            out[b, t] = sum(gamma ** k * d[b, t + k] * m[b, t + k] for k in range(1, window) if t + k < d.shape[1])
    return out


def np_opd_on_policy(advantage, weights=None):
    """OPD on-policy, token_mean: L = -sum_t m_t w_t A_t / N (rho = 1)."""
    w = np.ones(MASK.shape) if weights is None else weights
    return -np.sum(MASK * w * advantage) / MASK.sum()


def np_forward_kl_topk(student, teacher):
    p = np.exp(teacher - np.log(np.sum(np.exp(teacher), axis=-1, keepdims=True)))
    return np.sum(p * (np.log(p) - student), axis=-1)


SUPPRESS_W = np.where(SUPPRESSED_TOKENS, 0.0, 1.0)
D = (B_LOGP - Q_LOGP).astype(np.float64)


# ------------------------------------------------------------------------ 1. equations

def test_bounded_reward_matches_numpy_and_its_floor():
    for alpha in (0.2, 0.5, 0.9):
        np.testing.assert_allclose(bounded_reward(jnp.asarray(B_LOGP), jnp.asarray(Q_LOGP), alpha=alpha),
                                   np_bounded_reward(B_LOGP, Q_LOGP, alpha), rtol=1e-5, atol=1e-6)
    # The floor: a token the teacher rules out costs log(1 - alpha), finite; agreement gives 0.
    r = bounded_reward(jnp.array([[0.0, -1.0]]), jnp.array([[-1e4, -1.0]]), alpha=0.5)
    np.testing.assert_allclose(r, [[np.log(0.5), 0.0]], atol=1e-7)
    with pytest.raises(ValueError, match="alpha must be in"):
        bounded_reward(jnp.zeros((1, 1)), jnp.zeros((1, 1)), alpha=1.0)


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_mean_future_matches_numpy(window):
    values = np.array([[1.0, 2.0, -3.0, 4.0, 0.5, 99.0], [0.3, -1.0, 2.0, 5.0, 99.0, 99.0]], np.float32)
    # the 99s are padding: never averaged in; a token with no valid future gets 0
    np.testing.assert_allclose(mean_future(jnp.asarray(values), jnp.asarray(MASK), window=window),
                               np_mean_future(values, MASK, window), rtol=1e-6, atol=1e-7)


def test_zscore_matches_numpy_and_is_zero_outside():
    values = np.array([[1.0, 2.0, -3.0, 4.0, 0.5, 99.0], [0.3, -1.0, 2.0, 5.0, 99.0, 99.0]], np.float32)
    z = np.asarray(zscore(jnp.asarray(values), jnp.asarray(MASK)))
    np.testing.assert_allclose(z, np_zscore(values, MASK), rtol=1e-5, atol=1e-6)
    assert not z[MASK == 0].any()
    # constant values: std 0 is floored, every z is 0 (not nan)
    np.testing.assert_array_equal(zscore(jnp.full((2, 6), 3.0), jnp.asarray(MASK)), np.zeros((2, 6)))


def test_prefix_likelihood_matches_numpy_and_is_one_at_t0():
    positions = np.array([[0, 3, 5], [1, 4, 0]])  # (0, 5) and (1, 4): the prefix stops at the padding
    for tau in (1.0, 2.5):
        c = np.asarray(prefix_likelihood(jnp.asarray(Q_LOGP), jnp.asarray(MASK), jnp.asarray(positions), tau=tau))
        np.testing.assert_allclose(c, np_prefix_likelihood(Q_LOGP, MASK, positions, tau), rtol=1e-6)
        assert c[0, 0] == 1.0 and c[1, 2] == 1.0 and np.all((c > 0) & (c <= 1))


def test_near_future_return_with_discount_matches_numpy():
    d = np.where(MASK > 0, D, 9.0)  # padded entries hold garbage: never credited
    for window, gamma in ((3, 0.5), (4, 0.8), (20, 0.9)):
        np.testing.assert_allclose(near_future_return(jnp.asarray(d), jnp.asarray(MASK), window=window, gamma=gamma),
                                   np_near_future_return(d, MASK, window, gamma), rtol=1e-5, atol=1e-6)


def bounded_return_advantage(alpha, lam, window, at_every):
    r = np.where(MASK > 0, np_bounded_reward(B_LOGP, Q_LOGP, alpha), 0.0)
    g = np_zscore(r + lam * np_mean_future(r, MASK, window), MASK)
    at = MASK > 0 if at_every else DIVERGENT_TOKENS
    return np.where(at, g, -D)


@pytest.mark.parametrize("at", ["divergent", "every"])
def test_bounded_return_loss_hand_computed(at):
    alpha, lam, window = 0.3, 0.7, 3
    cfg = config("bounded_return", traj_weight=lam, window=window, guidance_options={"alpha": alpha, "at": at})
    loss, metrics = topd_loss(two_inputs(), cfg)
    advantage = bounded_return_advantage(alpha, lam, window, at == "every")
    np.testing.assert_allclose(loss, np_opd_on_policy(advantage, SUPPRESS_W), rtol=1e-5)
    # loss_traj reports the mean future reward where the return is applied
    r = np.where(MASK > 0, np_bounded_reward(B_LOGP, Q_LOGP, alpha), 0.0)
    where = MASK > 0 if at == "every" else DIVERGENT_TOKENS
    np.testing.assert_allclose(metrics["loss_traj"], np_mean_future(r, MASK, window)[where].mean(), rtol=1e-5)


def test_clean_window_loss_hand_computed():
    lam, tau = 0.5, 2.0
    loss, metrics = topd_loss(two_inputs(), config("clean_window", traj_weight=lam, guidance_options={"tau": tau}))
    c = np_prefix_likelihood(Q_LOGP, MASK, POSITIONS, tau)
    per_window = np.sum(-WINDOW_LOGP * WINDOW_MASK, axis=-1) / WINDOW_MASK.sum(axis=-1)  # norm window, gamma 1
    # R = {(0, 0), (1, 1)}: L_traj = (c_00 l_00 + c_11 l_11) / 2
    traj = (c[0, 0] * per_window[0, 0] + c[1, 1] * per_window[1, 1]) / 2
    assert c[0, 0] == 1.0 and c[1, 1] < 0.5  # the t = 3 window continues a prefix the teacher finds unlikely
    np.testing.assert_allclose(metrics["loss_traj"], traj, rtol=1e-5)
    np.testing.assert_allclose(loss, np_opd_on_policy(-D, SUPPRESS_W) + lam * traj, rtol=1e-5)
    np.testing.assert_allclose(metrics["window_weight_mean"], (c[0, 0] + c[1, 1]) / 2, rtol=1e-5)


def test_return_loss_with_discount_hand_computed():
    lam, gamma, window = 0.8, 0.5, 3
    loss, metrics = topd_loss(two_inputs(), config("return", traj_weight=lam, window=window,
                                                   guidance_options={"gamma": gamma}))
    future = np_near_future_return(D, MASK, window, gamma)
    advantage = np.where(DIVERGENT_TOKENS, -(D + lam * future), -D)
    np.testing.assert_allclose(loss, np_opd_on_policy(advantage, SUPPRESS_W), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_traj"], future[DIVERGENT_TOKENS].mean(), rtol=1e-5)


# ------------------------------------------------------------------------ 2. gradient direction

def test_bounded_return_gradient_at_a_divergent_state_has_the_sign_of_minus_its_advantage():
    alpha, lam, window = 0.3, 0.7, 3
    cfg = config("bounded_return", traj_weight=lam, window=window, guidance_options={"alpha": alpha})
    grad = np.asarray(jax.grad(lambda s: topd_loss(two_inputs(student_logprobs=s), cfg)[0])(jnp.asarray(B_LOGP)))
    advantage = bounded_return_advantage(alpha, lam, window, at_every=False)
    at = advantage[DIVERGENT_TOKENS]
    assert np.all(at != 0)
    np.testing.assert_array_equal(np.sign(grad[DIVERGENT_TOKENS]), -np.sign(at))
    # on-policy, dL/ds_t = -w_t A_t / N exactly
    np.testing.assert_allclose(grad, -MASK * SUPPRESS_W * advantage / N, rtol=1e-5, atol=1e-7)


def test_clean_window_pushes_a_window_with_an_unlikely_prefix_less():
    # Two rollouts identical but for the teacher's log-probs of the prefix before the divergent
    # state at t = 2: row 0's prefix is likely (-0.1), row 1's unlikely (-3.0).
    q = jnp.array([[-0.1, -0.1, -2.0, -1.0, -1.0, -1.0], [-3.0, -3.0, -2.0, -1.0, -1.0, -1.0]])
    inputs = dict(student_logprobs=jnp.full((2, 6), -1.0), behaviour_logprobs=jnp.full((2, 6), -1.0),
                  teacher_logprobs=q, mask=jnp.ones((2, 6), int), positions=jnp.array([[2], [2]]),
                  valid=jnp.ones((2, 1), bool), ot=jnp.array([[0.9], [0.9]]), window_mask=jnp.ones((2, 1, 3), int))
    windows = jnp.full((2, 1, 3), -2.0)

    def grad_of(guidance):
        cfg = config(guidance)
        return np.asarray(jax.grad(lambda w: topd_loss(TopdInputs(window_logprobs=w, **inputs), cfg)[0])(windows))

    clean, plain = grad_of("clean_window"), grad_of("window")
    assert np.all(clean < 0)  # both windows' tokens are pushed up
    assert np.all(np.abs(clean[1]) < np.abs(clean[0]))  # the broken prefix's window less
    np.testing.assert_allclose(plain[0], plain[1])  # without the prefix weight they are the same


# ------------------------------------------------------------------------ 3. no divergence, no signal

QUIET = 10.0  # an absolute threshold above every OT score: nothing is divergent


@pytest.mark.parametrize("guidance", ["window", "clean_window", "return", "bounded_return"])
def test_nothing_divergent_gives_exactly_suppressed_opd(guidance):
    inputs = two_inputs()
    loss, metrics = topd_loss(inputs, config(guidance, tau=QUIET, window=3))
    suppressed, _ = topd_loss(inputs, TopdConfig.preset("opd_suppress", threshold_mode="absolute", tau=QUIET))
    assert float(metrics["num_divergent"]) == 0.0
    np.testing.assert_array_equal(loss, suppressed)
    assert float(metrics["loss_traj"]) == 0.0


@pytest.mark.parametrize("guidance", ["window", "clean_window", "return", "bounded_return"])
def test_nothing_divergent_without_suppression_is_opd(guidance):
    inputs = two_inputs()
    cfg = config(guidance, tau=QUIET, window=3, suppress_weight=1.0)
    loss, _ = topd_loss(inputs, cfg)
    opd, _ = topd_loss(inputs, TopdConfig.preset("opd", threshold_mode="absolute", tau=QUIET))
    np.testing.assert_array_equal(loss, opd)
    np.testing.assert_allclose(loss, np_opd_on_policy(-D), rtol=1e-6)
    grad = jax.grad(lambda s: topd_loss(two_inputs(student_logprobs=s), cfg)[0])(jnp.asarray(B_LOGP))
    np.testing.assert_allclose(grad, MASK * D / N, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ 4. relay's loss

# Row 0: the teacher wrote t = 1..2 (a segment from position 1); row 1: t = 2 (from position 2).
WRITTEN = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]], bool)
SEGMENT_MASK = np.array([[[1, 1, 0]], [[1, 0, 0]]])
_rng = np.random.default_rng(3)
SEG_STUDENT = np.log(_rng.dirichlet(np.ones(4), size=(2, 1, 3)))[..., :3].astype(np.float32)  # top-3 of 4
SEG_TEACHER = np.log(_rng.dirichlet(np.ones(4), size=(2, 1, 3)))[..., :3].astype(np.float32)


def relay_inputs(**overrides):
    fields = dict(student_logprobs=jnp.asarray(B_LOGP), behaviour_logprobs=jnp.asarray(B_LOGP),
                  teacher_logprobs=jnp.asarray(Q_LOGP), mask=jnp.asarray(MASK),
                  positions=jnp.array([[1], [2]]), valid=jnp.ones((2, 1), bool), window_mask=jnp.asarray(SEGMENT_MASK),
                  window_student_topk_logprobs=jnp.asarray(SEG_STUDENT),
                  window_teacher_topk_logprobs=jnp.asarray(SEG_TEACHER), teacher_written=jnp.asarray(WRITTEN))
    fields.update(overrides)
    return TopdInputs(**fields)


def relay(**options):
    return TopdConfig.preset("topd", guidance="relay", suppress_weight=1.0, traj_weight=0.5,
                             guidance_options=options)


def test_relay_advantage_is_plain_opd_over_every_token_the_teachers_included():
    loss, metrics = topd_loss(relay_inputs(), relay(loss="advantage"))
    np.testing.assert_allclose(loss, np_opd_on_policy(Q_LOGP - B_LOGP), rtol=1e-6)
    np.testing.assert_array_equal(loss, topd_loss(relay_inputs(), TopdConfig.preset("opd"))[0])
    np.testing.assert_allclose(metrics["teacher_token_share"], 3 / N, rtol=1e-6)
    grad = jax.grad(lambda s: topd_loss(relay_inputs(student_logprobs=s), relay())[0])(jnp.asarray(B_LOGP))
    assert np.all(np.asarray(grad)[WRITTEN] != 0)  # the teacher's tokens are trained too


def test_relay_fkl_trains_the_segment_with_topk_forward_kl_not_opd():
    lam = 0.5
    loss, metrics = topd_loss(relay_inputs(), relay(loss="fkl"))
    opd = np_opd_on_policy(Q_LOGP - B_LOGP, np.where(WRITTEN, 0.0, 1.0))  # N still counts every token
    kl = np_forward_kl_topk(SEG_STUDENT.astype(np.float64), SEG_TEACHER.astype(np.float64))  # [B, 1, K]
    traj = np.sum(kl * SEGMENT_MASK) / SEGMENT_MASK.sum()  # token mean over the segments' tokens
    np.testing.assert_allclose(metrics["loss_traj"], traj, rtol=1e-5)
    np.testing.assert_allclose(loss, opd + lam * traj, rtol=1e-5)
    grad = jax.grad(lambda s: topd_loss(relay_inputs(student_logprobs=s), relay(loss="fkl"))[0])(jnp.asarray(B_LOGP))
    np.testing.assert_array_equal(np.asarray(grad)[WRITTEN], 0.0)  # no OPD weight on the teacher's tokens
    assert np.all(np.asarray(grad)[~WRITTEN & (MASK > 0) & (D != 0)] != 0)


def test_relay_needs_suppress_weight_one():
    with pytest.raises(ConfigError, match=r"suppress_weight must be 1.0 with guidance 'relay'") as err:
        TopdConfig.preset("topd", guidance="relay")
    assert "\n" not in str(err.value)


def test_relay_without_teacher_written_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"teacher_written is required") as err:
        topd_loss(relay_inputs(teacher_written=None), relay())
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------ 5. the table

def _extra(name):
    return {"suppress_weight": 1.0} if name == "relay" else {}


@pytest.mark.parametrize("name", list(GUIDANCE))
def test_every_entrys_defaults_pass_its_own_checks(name):
    reading = GUIDANCE[name]
    defaults = {key: option.default for key, option in reading.options.items()}
    assert all(ok for _, ok, _, _ in reading.check(defaults))
    cfg = TopdConfig.preset("topd", guidance=name, guidance_options=defaults, **_extra(name))
    assert all(cfg.option(key) == value for key, value in defaults.items())


# A value each kind of check refuses, beside the common bad string.
BAD_VALUES = {"gamma": [0.0, -1.0, float("nan"), float("inf"), True], "tau": [0.0, -2.0, float("nan")],
              "alpha": [0.0, 1.0, 1.5, -0.1], "top_k": [0, 2.5, True], "max_segments": [0, -1],
              "segment": [0, 1.0], "fkl_top_k": [0, False], "at": ["all"], "norm": ["sum"],
              "step_loss": ["kl"], "window_tokens": ["beam"], "trigger": ["always"], "loss": ["kl"],
              "stop": ["yes"]}


@pytest.mark.parametrize("name, key", [(n, k) for n, g in GUIDANCE.items() for k in g.options])
def test_every_option_rejects_a_bad_value_naming_its_key(name, key):
    assert key in BAD_VALUES, f"add a bad value of guidance_options.{key} to BAD_VALUES"
    for bad in ["not-a-value", None, *BAD_VALUES[key]]:
        with pytest.raises(ConfigError, match=rf"guidance_options\.{key} must be") as err:
            TopdConfig.preset("topd", guidance=name, guidance_options={key: bad}, **_extra(name))
        assert "\n" not in str(err.value), bad


@pytest.mark.parametrize("name", list(GUIDANCE))
def test_an_unknown_option_key_is_a_one_line_error(name):
    other = "alpha" if name != "bounded_return" else "gamma"  # a key of another reading
    for key in ("bogus", other):
        with pytest.raises(ConfigError, match=rf"guidance_options\.{key} must be a key of guidance '{name}'") as err:
            TopdConfig.preset("topd", guidance=name, guidance_options={key: 1}, **_extra(name))
        assert "\n" not in str(err.value)


def test_an_unknown_reading_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"guidance must be one of .*'bounded_return'.*got 'spread'") as err:
        TopdConfig(guidance="spread")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown guidance 'spread'") as err:
        get_guidance("spread")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="guidance_options must be a mapping") as err:
        TopdConfig(guidance_options=[("gamma", 0.5)])
    assert "\n" not in str(err.value)


def test_configs_with_options_are_hashable_and_equal_configs_hash_equal():
    a = TopdConfig.preset("topd", guidance="return", guidance_options={"gamma": 0.5})
    b = TopdConfig.preset("topd", guidance="return", guidance_options={"gamma": 0.5})
    assert a == b and hash(a) == hash(b)
    c = TopdConfig.preset("topd", guidance="return", guidance_options={"gamma": 0.25})
    assert a != c
    two = TopdConfig(guidance_options={"gamma": 0.5, "norm": "token"})
    assert hash(two) == hash(TopdConfig(guidance_options={"norm": "token", "gamma": 0.5}))  # order-free
    with pytest.raises(TypeError, match="frozen"):
        a.guidance_options["gamma"] = 0.9
    # a static jit argument: the same config reuses the trace, a different one retraces
    traces = []
    step = jax.jit(lambda inputs, cfg: (traces.append(cfg), topd_loss(inputs, cfg)[0])[1], static_argnums=1)
    inputs = hand_inputs(window_logprobs=None, window_mask=None)
    step(inputs, a), step(inputs, b), step(inputs, c)
    assert len(traces) == 2


def test_option_returns_the_given_value_or_the_entrys_default():
    cfg = TopdConfig.preset("topd", guidance="bounded_return", guidance_options={"alpha": 0.2})
    assert cfg.option("alpha") == 0.2
    assert cfg.option("at") == GUIDANCE["bounded_return"].options["at"].default == "divergent"
    assert TopdConfig().option("gamma") == 1.0 and TopdConfig().option("norm") == "window"
    with pytest.raises(KeyError, match="has no option 'alpha'"):
        TopdConfig().option("alpha")


# ------------------------------------------------------------------------ 6. pins (commit 210336e)

def random_inputs():
    """B=2, T=8, M=3, K=4, k=3, off-policy (s != b), from a seeded numpy generator."""
    rng = np.random.default_rng(0)
    b, t, m, k, kk = 2, 8, 3, 4, 3
    lp = lambda *shape: jnp.asarray(-rng.random(shape) * 3, jnp.float32)  # noqa: E731
    return TopdInputs(
        student_logprobs=lp(b, t), behaviour_logprobs=lp(b, t), teacher_logprobs=lp(b, t),
        mask=jnp.asarray(np.array([[1] * 8, [1] * 6 + [0] * 2])),
        positions=jnp.asarray(np.array([[0, 3, 5], [1, 2, 4]]), jnp.int32),
        valid=jnp.asarray(np.array([[True, True, True], [True, False, True]])),
        ot=jnp.asarray(np.array([[0.9, 0.2, 0.6], [0.7, 0.1, 0.3]]), jnp.float32),
        reference_ot=jnp.asarray(np.array([[0.5, 0.3], [0.4, 0.45]]), jnp.float32),
        window_logprobs=lp(b, m, k),
        window_mask=jnp.asarray(np.array([[[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]],
                                          [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]])),
        window_student_topk_logprobs=lp(b, m, k, kk),
        window_teacher_topk_logprobs=lp(b, m, k, kk),
    )


def topk_hand_inputs():
    student = jnp.broadcast_to(jnp.log(jnp.array([0.5, 0.1])), (1, 2, 3, 2))
    teacher = jnp.broadcast_to(jnp.log(jnp.array([0.6, 0.2])), (1, 2, 3, 2))
    return hand_inputs(window_student_topk_logprobs=student, window_teacher_topk_logprobs=teacher)


# (loss, loss_traj) printed with repr by the code at commit 210336e (before GUIDANCE), whose
# configs were: TopdConfig.preset("topd"); traj_form="return"; traj_form="return", window=3,
# traj_gamma=0.5, traj_weight=0.5; traj_loss="topk_fkl"; and on random_inputs window=4 with
# traj_norm="token", traj_gamma=0.7 / traj_form="return", traj_gamma=0.5 / traj_loss="topk_fkl".
PINS = [
    ("topd", hand_inputs, {}, 1.940000057220459, 1.5),
    ("return", hand_inputs, {"guidance": "return"}, 0.6800000071525574, 1.2000000476837158),
    ("return_k3_gamma", hand_inputs, {"guidance": "return", "window": 3, "traj_weight": 0.5,
                                      "guidance_options": {"gamma": 0.5}}, 0.4650000035762787, 0.25),
    ("topk_fkl", topk_hand_inputs, {"guidance_options": {"step_loss": "topk_fkl"}},
     0.9731715321540833, 0.533171534538269),
    ("random_topd", random_inputs, {"window": 4}, -0.9879804849624634, 1.5097886323928833),
    ("random_token_gamma", random_inputs, {"window": 4, "guidance_options": {"norm": "token", "gamma": 0.7}},
     -1.1678556203842163, 1.3299134969711304),
    ("random_return", random_inputs, {"guidance": "return", "window": 4, "guidance_options": {"gamma": 0.5}},
     -2.457010269165039, -0.2071969360113144),
    ("random_topk_fkl", random_inputs, {"window": 4, "guidance_options": {"step_loss": "topk_fkl"}},
     -1.6265361309051514, 0.8712330460548401),
]


@pytest.mark.parametrize("case, make, overrides, loss, loss_traj", PINS, ids=[p[0] for p in PINS])
def test_pinned_to_the_code_before_the_guidance_table(case, make, overrides, loss, loss_traj):
    # clip_eps=None: the pins predate the clipped default (random_inputs are off-policy, s != b).
    got, metrics = topd_loss(make(), TopdConfig.preset("topd", clip_eps=None, **overrides))
    np.testing.assert_allclose(float(got), loss, rtol=1e-6, err_msg=case)
    np.testing.assert_allclose(float(metrics["loss_traj"]), loss_traj, rtol=1e-6, err_msg=case)


def test_a_mask_without_valid_tokens_is_said_not_silent():
    import warnings

    from topd_jax.losses import TopdConfig, TopdInputs, topd_loss

    zeros = jnp.zeros((2, 3))
    inputs = TopdInputs(zeros, zeros, zeros, jnp.zeros((2, 3), bool))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _ = topd_loss(inputs, TopdConfig.preset("opd"))
    assert float(loss) == 0.0
    assert [str(w.message) for w in caught] == [
        "TopdInputs.mask (2, 3) has no valid token: the loss is 0 with zero gradients"]
