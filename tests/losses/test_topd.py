"""topd_loss, its config, trajectory guidance and diagnostics (TOPD.md sections 5-6)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from topd_jax.configuration import ConfigError
from topd_jax.losses import TopdConfig, TopdInputs, forward_kl_topk, topd_loss, trajectory_loss


def hand_inputs(**overrides):
    """B=1, T=6 (last token padding), two candidates at t=0 (divergent) and t=2 (not), K=3."""
    b = jnp.full((1, 6), -1.0)
    q = jnp.array([[-3.0, -1.0, -2.0, -1.2, -1.0, -1.0]])  # d = [2, 0, 1, 0.2, 0, 0]
    fields = dict(
        student_logprobs=b,
        behaviour_logprobs=b,
        teacher_logprobs=q,
        mask=jnp.array([[1, 1, 1, 1, 1, 0]]),
        positions=jnp.array([[0, 2]]),
        valid=jnp.array([[True, True]]),
        ot=jnp.array([[0.9, 0.2]]),
        reference_ot=jnp.array([[0.5, 0.3]]),  # tau = median = 0.4
        window_logprobs=jnp.array([[[-1.0, -2.0, -3.0], [-5.0, -5.0, -5.0]]]),
        window_mask=jnp.array([[[1, 1, 0], [1, 1, 1]]]),
    )
    fields.update(overrides)
    return TopdInputs(**fields)


def test_hand_computed_topd():
    # Weights [1, 1, 0, 1, 1]: the non-divergent candidate t=2 is suppressed (alpha = 0).
    # L_OPD = (2 + 0 + 0 + 0.2 + 0) / 5 = 0.44; window 0 is the only real divergence:
    # L_traj = (1 + 2) / 2 = 1.5; L = 0.44 + 1.5.
    loss, metrics = topd_loss(hand_inputs(), TopdConfig.preset("topd"))
    np.testing.assert_allclose(loss, 1.94, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_opd"], 0.44, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_traj"], 1.5, rtol=1e-6)
    expected = {
        "low_divergence_share": 0.5,
        "suppressed_fraction": 0.2,
        "num_candidates": 2,
        "num_divergent": 1,
        "divergence_threshold": 0.4,
        "ot_candidates_mean": 0.55,
        "ot_reference_mean": 0.4,
        "window_length_mean": 2.5,
        "loss_ot_spearman": 1.0,
        "rollout_length_mean": 5,
        "reverse_kl_sampled": 3.2 / 5,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)
    assert float(metrics["ot_hist_candidates"].sum()) == 2.0


def test_hand_computed_presets_and_alpha():
    inputs = hand_inputs()
    # opd: every weight 1 -> (2 + 0 + 1 + 0.2 + 0) / 5.
    np.testing.assert_allclose(topd_loss(inputs, TopdConfig.preset("opd"))[0], 0.64, rtol=1e-6)
    np.testing.assert_allclose(topd_loss(inputs, TopdConfig.preset("opd_suppress"))[0], 0.44, rtol=1e-6)
    half = TopdConfig.preset("opd_suppress", suppress_weight=0.5)
    np.testing.assert_allclose(topd_loss(inputs, half)[0], 0.54, rtol=1e-6)


def test_hand_computed_gamma_discount():
    # w = [1, 0.5]: l = (1 * 1 + 0.5 * 2) / 1.5.
    _, metrics = topd_loss(hand_inputs(), TopdConfig.preset("topd", guidance_options={"gamma": 0.5}))
    np.testing.assert_allclose(metrics["loss_traj"], 2.0 / 1.5, rtol=1e-6)


def test_gradients_equal_the_analytic_ones():
    inputs = hand_inputs()
    config = TopdConfig.preset("topd", traj_weight=2.0)

    def loss_of(s, w):
        return topd_loss(hand_inputs(student_logprobs=s, window_logprobs=w), config)[0]

    ds, dw = jax.grad(loss_of, argnums=(0, 1))(inputs.student_logprobs, inputs.window_logprobs)
    # dL/ds = -m w A / N with A = -d, w = [1, 1, 0, 1, 1, 1], N = 5.
    np.testing.assert_allclose(ds, [[0.4, 0.0, 0.0, 0.04, 0.0, 0.0]], rtol=1e-5, atol=1e-7)
    # dL/dlogp_k = -lambda w_k m_k / sum(w m) / |R| on the divergent window only.
    np.testing.assert_allclose(dw, [[[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]], rtol=1e-6)
    teacher_grad = jax.grad(lambda q: topd_loss(hand_inputs(teacher_logprobs=q), config)[0])(inputs.teacher_logprobs)
    np.testing.assert_array_equal(teacher_grad, 0.0)


def test_forward_kl_topk_hand_computed_and_gradient():
    teacher = jnp.log(jnp.array([0.6, 0.2]))  # renormalised on S: (0.75, 0.25)
    student = jnp.log(jnp.array([0.5, 0.1]))
    expected = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.1)
    np.testing.assert_allclose(forward_kl_topk(student, teacher), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(forward_kl_topk)(student, teacher), [-0.75, -0.25], rtol=1e-6)


def test_topk_fkl_trajectory_form():
    kl_step = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.1)
    student = jnp.broadcast_to(jnp.log(jnp.array([0.5, 0.1])), (1, 2, 3, 2))
    teacher = jnp.broadcast_to(jnp.log(jnp.array([0.6, 0.2])), (1, 2, 3, 2))
    inputs = hand_inputs(window_student_topk_logprobs=student, window_teacher_topk_logprobs=teacher)
    _, metrics = topd_loss(inputs, TopdConfig.preset("topd", guidance_options={"step_loss": "topk_fkl"}))
    np.testing.assert_allclose(metrics["loss_traj"], kl_step, rtol=1e-5)


def test_trajectory_loss_counts_only_divergent_non_empty_windows():
    step = jnp.array([[[1.0, 3.0], [5.0, 5.0], [7.0, 7.0]]])
    mask = jnp.array([[[1, 1], [0, 0], [1, 0]]])
    loss, count = trajectory_loss(step, mask, jnp.array([[True, True, True]]))
    np.testing.assert_allclose(loss, (2.0 + 7.0) / 2)
    assert int(count) == 2
    loss, count = trajectory_loss(step, mask, jnp.zeros((1, 3), bool))
    assert float(loss) == 0.0 and int(count) == 0
    # Any gamma keeps the weights finite, even over long windows.
    loss, _ = trajectory_loss(jnp.ones((1, 1, 200)), jnp.ones((1, 1, 200)), jnp.ones((1, 1), bool), gamma=50.0)
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    # A short window under a large gamma still counts (weights normalised over valid steps).
    short = jnp.arange(50) < 5
    loss, count = trajectory_loss(jnp.ones((1, 1, 50)), short[None, None], jnp.ones((1, 1), bool), gamma=10.0)
    assert int(count) == 1
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_window_kl_locator_needs_no_branches():
    # Candidates selected inside from d; scores are the mean of d over the 2 tokens after t.
    inputs = hand_inputs(positions=None, valid=None, ot=None, reference_ot=None, window_logprobs=None, window_mask=None)
    config = TopdConfig.preset("opd_suppress", locator="window_kl", window=2, threshold_mode="absolute", tau=0.3, candidate_quantile=0.5)
    # n = 5 -> 3 candidates: t=0 (d=2), t=2 (d=1), t=3 (d=0.2); proxy = 0.5, 0.1, 0.0.
    # Suppressed: t=2 and t=3 -> L = (2 + 0 + 0 + 0 + 0) / 5.
    loss, metrics = topd_loss(inputs, config)
    np.testing.assert_allclose(loss, 0.4, rtol=1e-6)
    np.testing.assert_allclose(metrics["low_divergence_share"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["window_kl_candidates_mean"], 0.2, rtol=1e-6)
    assert "ot_candidates_mean" not in metrics  # proxy scores are not reported as OT distances
    assert not config.uses_windows and TopdConfig.preset("topd").uses_windows


def test_suppressed_fraction_counts_only_real_suppression_and_references_are_always_reported():
    # OPD with OT given for diagnostics: candidates are scored, nothing is suppressed.
    _, metrics = topd_loss(hand_inputs(), TopdConfig.preset("opd"))
    assert float(metrics["suppressed_fraction"]) == 0.0
    np.testing.assert_allclose(metrics["low_divergence_share"], 0.5)
    _, metrics = topd_loss(hand_inputs(), TopdConfig.preset("topd", threshold_mode="quantile"))
    np.testing.assert_allclose(metrics["ot_reference_mean"], 0.4, rtol=1e-6)


def test_masked_top_k_steps_may_hold_minus_infinity():
    student = jnp.broadcast_to(jnp.log(jnp.array([0.5, 0.1])), (1, 2, 3, 2))
    teacher = jnp.broadcast_to(jnp.log(jnp.array([0.6, 0.0])), (1, 2, 3, 2))  # a zero-probability entry
    student = student.at[:, :, 2].set(-jnp.inf)  # masked step of window 0
    teacher = teacher.at[:, :, 2].set(-jnp.inf)
    config = TopdConfig.preset("topd", guidance_options={"step_loss": "topk_fkl"})

    def loss_of(s):
        return topd_loss(hand_inputs(window_student_topk_logprobs=s, window_teacher_topk_logprobs=teacher), config)

    (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(student)
    np.testing.assert_allclose(metrics["loss_traj"], np.log(1 / 0.5), rtol=1e-5)  # all mass on token 0
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_missing_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match=r"TopdInputs\.ot is required"):
        topd_loss(hand_inputs(ot=None), TopdConfig.preset("topd"))
    with pytest.raises(ValueError, match=r"TopdInputs\.reference_ot is required"):
        topd_loss(hand_inputs(reference_ot=None), TopdConfig.preset("topd"))
    with pytest.raises(ValueError, match=r"TopdInputs\.window_logprobs is required"):
        topd_loss(hand_inputs(window_logprobs=None), TopdConfig.preset("topd"))
    with pytest.raises(ValueError, match=r"window_student_topk_logprobs is required"):
        topd_loss(hand_inputs(), TopdConfig.preset("topd", guidance_options={"step_loss": "topk_fkl"}))
    with pytest.raises(ValueError, match="positions and TopdInputs.valid must be given together"):
        topd_loss(hand_inputs(valid=None), TopdConfig.preset("topd"))
    with pytest.raises(ValueError, match=r"TopdInputs\.ot has M=3 but earlier fields have M=2"):
        topd_loss(hand_inputs(ot=jnp.zeros((1, 3))), TopdConfig.preset("topd"))
    with pytest.raises(ValueError, match=r"TopdInputs\.window_mask must be \[B, M, K\], got shape \(1, 2\)"):
        topd_loss(hand_inputs(window_mask=jnp.ones((1, 2))), TopdConfig.preset("topd"))
    # OPD needs none of them.
    topd_loss(hand_inputs(ot=None, reference_ot=None, window_logprobs=None), TopdConfig.preset("opd"))


def test_optional_diagnostics():
    inputs = hand_inputs(finished=jnp.array([True]), teacher_agrees=jnp.array([[1, 0, 1, 1, 0, 1]]))
    _, metrics = topd_loss(inputs, TopdConfig.preset("topd"))
    np.testing.assert_allclose(metrics["eos_rate"], 1.0)
    np.testing.assert_allclose(metrics["teacher_agreement"], 0.6)  # the padded 1 does not count


def test_presets_and_config_errors():
    assert TopdConfig.preset("opd").uses_candidates is False
    assert TopdConfig.preset("opd_suppress").traj_weight == 0.0
    assert TopdConfig.preset("topd") == TopdConfig()
    with pytest.raises(ConfigError, match="unknown preset 'topdd'"):
        TopdConfig.preset("topdd")
    with pytest.raises(ConfigError, match="did you mean 'suppress_weight'"):
        TopdConfig.from_dict({"supress_weight": 0.1})
    with pytest.raises(ConfigError, match="window: expected int, got 'fifty'"):
        TopdConfig.from_dict({"window": "fifty"})
    with pytest.raises(ConfigError, match=r"candidate_quantile must be in \[0, 1\], got 1.5"):
        TopdConfig(candidate_quantile=1.5)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_sharded_over_an_8_device_mesh_equals_single_device(axis_type):
    assert jax.device_count() >= 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    rng = np.random.default_rng(0)
    b, t, m, k, r = 8, 32, 4, 6, 2
    lp = lambda *shape: jnp.asarray(-rng.random(shape) * 3, jnp.float32)  # noqa: E731
    inputs = TopdInputs(
        student_logprobs=lp(b, t),
        behaviour_logprobs=lp(b, t),
        teacher_logprobs=lp(b, t),
        mask=jnp.asarray(rng.random((b, t)) < 0.8),
        positions=jnp.asarray(rng.integers(0, t, (b, m)), jnp.int32),
        valid=jnp.asarray(rng.random((b, m)) < 0.8),
        ot=jnp.asarray(rng.random((b, m)), jnp.float32),
        reference_ot=jnp.asarray(rng.random((b, r)), jnp.float32),
        window_logprobs=lp(b, m, k),
        window_mask=jnp.asarray(rng.random((b, m, k)) < 0.8),
    )
    config = TopdConfig.preset("topd", clip_eps=0.2)
    batch_sharding = jax.tree.map(lambda _: NamedSharding(mesh, P("data")), inputs)
    step = jax.jit(
        functools.partial(topd_loss, config=config),
        in_shardings=(batch_sharding,),
        out_shardings=NamedSharding(mesh, P()),
    )
    with jax.set_mesh(mesh):
        sharded_loss, sharded_metrics = step(jax.device_put(inputs, batch_sharding))
    loss, metrics = jax.jit(topd_loss, static_argnums=1)(inputs, config)
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(sharded_metrics[name], metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_edge_inputs_empty_windows_are_finite():
    # K = 0 (no window token) behaves like M = 0: guidance contributes nothing, all finite.
    inputs = hand_inputs(window_logprobs=jnp.zeros((1, 2, 0)), window_mask=jnp.zeros((1, 2, 0), bool))
    loss, metrics = topd_loss(inputs, TopdConfig.preset("topd"))
    assert float(metrics["loss_traj"]) == 0.0 and np.isfinite(float(loss))
    grad = jax.grad(lambda s: topd_loss(hand_inputs(student_logprobs=s, window_logprobs=jnp.zeros((1, 2, 0)),
                                                    window_mask=jnp.zeros((1, 2, 0), bool)),
                                        TopdConfig.preset("topd"))[0])(jnp.full((1, 6), -1.0))
    assert np.isfinite(np.asarray(grad)).all()


def test_edge_inputs_candidates_at_masked_tokens_do_not_count():
    # An all-masked batch with caller-supplied candidates: no candidate, no guidance, no gradient.
    inputs = hand_inputs(mask=jnp.zeros((1, 6), int))
    loss, metrics = topd_loss(inputs, TopdConfig.preset("topd"))
    assert float(loss) == 0.0 and float(metrics["loss_traj"]) == 0.0 and float(metrics["num_candidates"]) == 0.0
    grad = jax.grad(lambda w: topd_loss(hand_inputs(mask=jnp.zeros((1, 6), int), window_logprobs=w),
                                        TopdConfig.preset("topd"))[0])(hand_inputs().window_logprobs)
    assert not np.asarray(grad).any()


def test_edge_inputs_positions_outside_the_rollout_are_masked_not_clamped():
    # t = 9 and t = -1 are outside [0, T = 6): those slots are not candidates (clamping would have
    # made them the last or first token); the valid t = 2 slot is still scored.
    inputs = hand_inputs(positions=jnp.array([[9, 2]]))
    _, metrics = topd_loss(inputs, TopdConfig.preset("opd_suppress"))
    assert float(metrics["num_candidates"]) == 1.0
    _, metrics = topd_loss(hand_inputs(positions=jnp.array([[-1, 2]])), TopdConfig.preset("opd_suppress"))
    assert float(metrics["num_candidates"]) == 1.0
