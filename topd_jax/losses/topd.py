"""The TOPD objective: suppressed OPD plus near-future guidance (TOPD.md sections 2-6).

    L = L_OPD(w) + lambda * L_traj

w_bt = alpha at high-loss candidates whose future does not diverge (C \\ R), 1 elsewhere;
L_traj supervises the student along the teacher's K-token window from each real divergent
state in R. Shapes: B rollouts, T tokens, M candidates, K window tokens, R reference positions,
k teacher top-k.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp

from topd_jax import configuration
from topd_jax.losses.candidates import gather_tokens, select_candidates, window_kl_proxy
from topd_jax.losses.divergence import THRESHOLD_MODES, divergence_threshold
from topd_jax.losses.opd import AGGREGATIONS, opd_loss
from topd_jax.losses.ot import DEFAULT_EPSILON, DEFAULT_NUM_ITERS
from topd_jax.losses.stats import masked_histogram, spearman

Array = jax.Array
OT_HISTOGRAM_BINS = 20
PRESETS = ("opd", "opd_suppress", "topd")
_LOG_ZERO = -1e30


@dataclasses.dataclass(frozen=True)
class TopdConfig:
    """Every knob of the method; `configs/topd_loss.yaml` documents the same keys and defaults.

    symbol (TOPD.md)  key
    PPO clip e        clip_eps            None = no clipping
    agg               agg                 token_mean | sequence_mean
    rho = 1 - q       candidate_quantile  0.8: candidates are the top 20% of d_t per rollout
    M                 max_candidates      candidates per rollout (compute budget)
    K                 window              look-ahead tokens per branch
    window temp.      window_temperature  None = the rollout's temperature
    R                 num_reference       reference branches per rollout (reference mode)
    locator           locator             ot (branch + OT) | window_kl (zero-branch proxy)
    threshold mode    threshold_mode      reference | quantile | absolute
    q                 threshold_quantile  quantile of the reference/candidate distances
    tau               tau                 fixed threshold (absolute mode)
    alpha             suppress_weight     OPD weight of non-divergent candidates; 1 = none
    lambda            traj_weight         weight of L_traj; 0 = no guidance
    gamma             traj_gamma          w_k = gamma^(k-1) along a window
    L_traj form       traj_loss           sampled (teacher tokens) | topk_fkl
    k                 traj_top_k          teacher support of topk_fkl
    Sinkhorn eps      ot_epsilon
    Sinkhorn iters    ot_num_iters
    """

    clip_eps: float | None = None
    agg: Literal["token_mean", "sequence_mean"] = "token_mean"
    candidate_quantile: float = 0.8
    max_candidates: int = 8
    window: int = 50
    window_temperature: float | None = None
    num_reference: int = 2
    locator: Literal["ot", "window_kl"] = "ot"
    threshold_mode: Literal["reference", "quantile", "absolute"] = "reference"
    threshold_quantile: float = 0.5
    tau: float | None = None
    suppress_weight: float = 0.0
    traj_weight: float = 1.0
    traj_gamma: float = 1.0
    traj_loss: Literal["sampled", "topk_fkl"] = "sampled"
    traj_top_k: int = 20
    ot_epsilon: float = DEFAULT_EPSILON
    ot_num_iters: int = DEFAULT_NUM_ITERS

    def __post_init__(self):
        # (field, ok, requirement): each failure is one line naming the field and its value.
        checks = [
            ("clip_eps", self.clip_eps is None or self.clip_eps > 0, "> 0 or None"),
            ("agg", self.agg in AGGREGATIONS, f"one of {AGGREGATIONS}"),
            ("candidate_quantile", 0.0 <= self.candidate_quantile <= 1.0, "in [0, 1]"),
            ("max_candidates", self.max_candidates >= 0, ">= 0"),
            ("window", self.window >= 1, ">= 1"),
            ("window_temperature", self.window_temperature is None or self.window_temperature >= 0, ">= 0 or None"),
            ("num_reference", self.num_reference >= 0, ">= 0"),
            ("locator", self.locator in ("ot", "window_kl"), "'ot' or 'window_kl'"),
            ("threshold_mode", self.threshold_mode in THRESHOLD_MODES, f"one of {THRESHOLD_MODES}"),
            ("threshold_quantile", 0.0 <= self.threshold_quantile <= 1.0, "in [0, 1]"),
            ("tau", self.threshold_mode != "absolute" or self.tau is not None, "set when threshold_mode='absolute'"),
            ("num_reference", self.threshold_mode != "reference" or self.num_reference > 0, "> 0 when threshold_mode='reference'"),
            ("suppress_weight", 0.0 <= self.suppress_weight <= 1.0, "in [0, 1]"),
            ("traj_weight", self.traj_weight >= 0.0, ">= 0"),
            ("traj_gamma", self.traj_gamma > 0.0, "> 0"),
            ("traj_loss", self.traj_loss in ("sampled", "topk_fkl"), "'sampled' or 'topk_fkl'"),
            ("traj_top_k", self.traj_top_k >= 1, ">= 1"),
            ("ot_epsilon", self.ot_epsilon > 0.0, "> 0"),
            ("ot_num_iters", self.ot_num_iters >= 1, ">= 1"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                raise configuration.ConfigError(f"TopdConfig.{name} must be {requirement}, got {getattr(self, name)!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TopdConfig":
        """opd (section 1 only), opd_suppress (candidates, OT, suppression), topd (everything)."""
        presets = {
            "opd": {"suppress_weight": 1.0, "traj_weight": 0.0},
            "opd_suppress": {"suppress_weight": 0.0, "traj_weight": 0.0},
            "topd": {},
        }
        if name not in presets:
            raise configuration.ConfigError(f"unknown preset {name!r}; choose one of {PRESETS}")
        return cls.from_dict({**presets[name], **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TopdConfig":
        """Typed construction; unknown keys and wrong types are one-line errors naming the key."""
        return configuration.from_dict(cls, values)

    @property
    def uses_candidates(self) -> bool:
        """Whether the loss needs candidates: suppression or guidance is on."""
        return self.suppress_weight != 1.0 or self.traj_weight != 0.0

    @property
    def uses_windows(self) -> bool:
        """Whether both models must branch K-token windows from the candidates."""
        return self.uses_candidates and (self.locator == "ot" or self.traj_weight != 0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopdInputs:
    """Arrays for `topd_loss`. Only the first four are always needed.

    rollout:     student_logprobs, behaviour_logprobs, teacher_logprobs [B, T] float; mask [B, T]
    candidates:  positions [B, M] int, valid [B, M] bool (selected from d if omitted)
    divergence:  ot [B, M]; reference_ot [B, R], reference_valid [B, R]; reference_positions
                 [B, R] (the window_kl locator scores references there)
    guidance:    window_logprobs [B, M, K]: student log pi_s(v_k | x, y_<t, v_<k) of the
                 teacher's window tokens; window_mask [B, M, K];
                 topk_fkl: window_student_topk_logprobs / window_teacher_topk_logprobs
                 [B, M, K, k], both at the teacher's top-k tokens of each window step
    diagnostics: teacher_agrees [B, T] (teacher argmax == sampled token), finished [B] (EOS)
    """

    student_logprobs: Array
    behaviour_logprobs: Array
    teacher_logprobs: Array
    mask: Array
    positions: Array | None = None
    valid: Array | None = None
    ot: Array | None = None
    reference_ot: Array | None = None
    reference_valid: Array | None = None
    reference_positions: Array | None = None
    window_logprobs: Array | None = None
    window_mask: Array | None = None
    window_student_topk_logprobs: Array | None = None
    window_teacher_topk_logprobs: Array | None = None
    teacher_agrees: Array | None = None
    finished: Array | None = None


def forward_kl_topk(student_topk_logprobs: Array, teacher_topk_logprobs: Array) -> Array:
    """KL(p~_T || pi_s) on the teacher's top-k support S: [..., k] x2 -> [...].

        p~_T(v) = pi_T(v) / sum_{u in S} pi_T(u),
        KL = sum_{v in S} p~_T(v) (log p~_T(v) - log pi_s(v))

    The student keeps its full-vocabulary log-probs (not renormalised), so KL >= 0 and is 0 only
    when the student puts exactly p~_T on S.
    """
    # A -inf teacher entry (a zero-probability token in the support) contributes exactly 0.
    t = jnp.maximum(jax.lax.stop_gradient(teacher_topk_logprobs).astype(jnp.float32), _LOG_ZERO)
    t = t - jax.nn.logsumexp(t, axis=-1, keepdims=True)
    return jnp.sum(jnp.exp(t) * (t - student_topk_logprobs.astype(jnp.float32)), axis=-1)


def trajectory_loss(
    step_loss: Array, window_mask: Array, divergent: Array, *, gamma: float = 1.0
) -> tuple[Array, Array]:
    """Near-future guidance [reconstruction]: [B, M, K], [B, M, K], [B, M] -> (L_traj, |R|).

        l_r    = sum_k w_k m_k ell_k / sum_k w_k m_k,    w_k = gamma^(k-1)
        L_traj = sum_{r in R} l_r / max(1, |R|)

    ell_k is -log pi_s(v_k | ...) for the sampled form or the top-k forward KL; windows with no
    valid token do not count in |R|.
    """
    k = step_loss.shape[-1]
    mask = window_mask.astype(jnp.float32)
    # l_r is invariant to rescaling w: divide by the largest valid weight, finite for any gamma.
    log_w = jnp.arange(k, dtype=jnp.float32) * jnp.log(jnp.asarray(gamma, jnp.float32))
    log_w_max = jnp.max(jnp.where(mask > 0, log_w, -jnp.inf), axis=-1, keepdims=True)
    w = jnp.exp(jnp.where(mask > 0, log_w - log_w_max, -jnp.inf))
    total_w = jnp.sum(w, axis=-1)
    per_window = jnp.sum(w * jnp.where(mask > 0, step_loss, 0.0), axis=-1) / jnp.where(total_w > 0, total_w, 1.0)
    counted = (divergent > 0) & (total_w > 0)
    count = jnp.sum(counted)
    loss = jnp.sum(jnp.where(counted, per_window, 0.0)) / jnp.maximum(count, 1)
    return loss, count


def _require(value: Array | None, name: str, why: str) -> Array:
    if value is None:
        raise ValueError(f"TopdInputs.{name} is required {why}")
    return value


# The named axes of every TopdInputs field, in order (shapes as in the module docstring).
FIELD_AXES = {
    "student_logprobs": "BT",
    "behaviour_logprobs": "BT",
    "teacher_logprobs": "BT",
    "mask": "BT",
    "positions": "BM",
    "valid": "BM",
    "ot": "BM",
    "reference_ot": "BR",
    "reference_valid": "BR",
    "reference_positions": "BR",
    "window_logprobs": "BMK",
    "window_mask": "BMK",
    "window_student_topk_logprobs": "BMKk",
    "window_teacher_topk_logprobs": "BMKk",
    "teacher_agrees": "BT",
    "finished": "B",
}


def check_shapes(inputs: TopdInputs) -> dict[str, int]:
    """The named sizes {B, T, M, K, R, k} of `inputs`, or a one-line error naming the first field
    whose shape disagrees with the others."""
    sizes: dict[str, int] = {}
    for name, axes in FIELD_AXES.items():
        value = getattr(inputs, name)
        if value is None:
            continue
        if value.ndim != len(axes):
            raise ValueError(f"TopdInputs.{name} must be [{', '.join(axes)}], got shape {tuple(value.shape)}")
        for axis, size in zip(axes, value.shape):
            if sizes.setdefault(axis, size) != size:
                raise ValueError(
                    f"TopdInputs.{name} has {axis}={size} but earlier fields have {axis}={sizes[axis]} "
                    f"(shape {tuple(value.shape)})"
                )
    if (inputs.positions is None) != (inputs.valid is None):
        raise ValueError("TopdInputs.positions and TopdInputs.valid must be given together")
    return sizes


def _locator_scores(inputs: TopdInputs, config: TopdConfig, divergence: Array, positions: Array):
    """D at the candidates [B, M], and at the references [B, R] when they are available."""
    needs_reference = config.threshold_mode == "reference"
    if config.locator == "window_kl":
        proxy = window_kl_proxy(divergence, inputs.mask, window=config.window)
        ref_positions = inputs.reference_positions
        if needs_reference:
            ref_positions = _require(ref_positions, "reference_positions", "for locator='window_kl' with threshold_mode='reference'")
        reference = None if ref_positions is None else gather_tokens(proxy, ref_positions)
        return gather_tokens(proxy, positions), reference
    ot = _require(inputs.ot, "ot", "for locator='ot' when candidates are used")
    if needs_reference:
        _require(inputs.reference_ot, "reference_ot", "for threshold_mode='reference'")
    return ot, inputs.reference_ot


def _window_step_loss(inputs: TopdInputs, config: TopdConfig, window_mask: Array) -> Array:
    """ell_k [B, M, K]: -log pi_s(v_k | ...) or the top-k forward KL at each window step."""
    if config.traj_loss == "sampled":
        return -_require(inputs.window_logprobs, "window_logprobs", "when traj_weight > 0")
    why = "for traj_loss='topk_fkl'"
    student = _require(inputs.window_student_topk_logprobs, "window_student_topk_logprobs", why)
    teacher = _require(inputs.window_teacher_topk_logprobs, "window_teacher_topk_logprobs", why)
    # Steps past a window's end may hold anything (e.g. -inf); keep them out of the arithmetic.
    step_valid = (window_mask > 0)[..., None]
    return forward_kl_topk(jnp.where(step_valid, student, 0.0), jnp.where(step_valid, teacher, 0.0))


def _mean_where(values: Array, where: Array) -> Array:
    return jnp.sum(jnp.where(where, values, 0.0)) / jnp.maximum(jnp.sum(where), 1)


def topd_loss(inputs: TopdInputs, config: TopdConfig) -> tuple[Array, dict[str, Array]]:
    """The TOPD loss and its diagnostics; pure and jittable (config is static).

        d_t    = b_t - q_t;  C = select_candidates(d) (or inputs.positions/valid)
        D      = OT distances (locator 'ot') or window-KL proxy (locator 'window_kl') at C
        R      = {c in C : D_c >= tau}                                (`divergent_mask`)
        w_t    = alpha if t in C \\ R else 1
        L      = L_OPD(w) + lambda * L_traj(R)

    Metrics (TOPD.md section 6): loss, loss_opd, loss_traj, reverse_kl_sampled,
    importance_ratio, clip_fraction, suppressed_fraction (share of valid tokens whose OPD weight
    is alpha < 1), rollout_length_mean; when candidates are scored: num_candidates,
    num_divergent, low_divergence_share (share of the valid candidates, at most M per rollout,
    with D < tau), loss_ot_spearman (Spearman of d vs D over candidates), divergence_threshold,
    ot_candidates_mean, ot_hist_candidates, window_length_mean, and with references
    ot_reference_mean, ot_hist_reference (histograms: counts in 20 bins over [0, 2]; with the
    window_kl locator the ot_* names hold proxy scores); eos_rate and teacher_agreement when
    `finished` / `teacher_agrees` are given.
    """
    check_shapes(inputs)
    mask = inputs.mask
    valid_tokens = mask > 0
    divergence = inputs.behaviour_logprobs - inputs.teacher_logprobs
    metrics: dict[str, Array] = {"suppressed_fraction": jnp.zeros((), jnp.float32)}
    weights = None
    loss_traj = jnp.zeros((), jnp.float32)

    if config.uses_candidates or inputs.ot is not None:
        if inputs.positions is None:
            positions, valid = select_candidates(
                divergence, mask, quantile=config.candidate_quantile, max_candidates=config.max_candidates
            )
        else:
            positions, valid = inputs.positions, inputs.valid > 0
        scores, reference = _locator_scores(inputs, config, divergence, positions)
        reference_valid = None
        if reference is not None:
            reference_valid = jnp.ones(reference.shape, bool) if inputs.reference_valid is None else inputs.reference_valid > 0
        tau, tau_defined = divergence_threshold(
            scores,
            valid,
            mode=config.threshold_mode,
            reference_ot=reference,
            reference_valid=reference_valid,
            quantile=config.threshold_quantile,
            tau=config.tau,
        )
        divergent = valid & (scores >= tau)
        low = valid & ~divergent

        # A [B, M, T] one-hot rather than a scatter: elementwise, so it shards along B as is.
        at_position = positions[..., None] == jnp.arange(mask.shape[-1])
        suppressed = jnp.any(at_position & low[..., None], axis=1) & valid_tokens
        weights = jnp.where(suppressed, config.suppress_weight, 1.0)
        if config.suppress_weight != 1.0:
            metrics["suppressed_fraction"] = _mean_where(suppressed.astype(jnp.float32), valid_tokens)

        if config.traj_weight != 0.0:
            window_mask = _require(inputs.window_mask, "window_mask", "when traj_weight > 0")
            step_loss = _window_step_loss(inputs, config, window_mask)
            loss_traj, _ = trajectory_loss(step_loss, window_mask, divergent, gamma=config.traj_gamma)

        num_valid = jnp.sum(valid)
        metrics.update(
            num_candidates=num_valid.astype(jnp.float32),
            num_divergent=jnp.sum(divergent).astype(jnp.float32),
            low_divergence_share=jnp.sum(low) / jnp.maximum(num_valid, 1),
            loss_ot_spearman=spearman(gather_tokens(divergence, positions), scores, valid),
            divergence_threshold=jnp.where(tau_defined, tau, 0.0),
            ot_candidates_mean=_mean_where(scores, valid),
            ot_hist_candidates=masked_histogram(scores, valid, bins=OT_HISTOGRAM_BINS, low=0.0, high=2.0),
        )
        if reference is not None:
            metrics.update(
                ot_reference_mean=_mean_where(reference, reference_valid),
                ot_hist_reference=masked_histogram(reference, reference_valid, bins=OT_HISTOGRAM_BINS, low=0.0, high=2.0),
            )
        if inputs.window_mask is not None:
            lengths = jnp.sum(inputs.window_mask > 0, axis=-1)
            metrics["window_length_mean"] = _mean_where(lengths.astype(jnp.float32), valid)

    loss_opd, opd_metrics = opd_loss(
        inputs.student_logprobs,
        inputs.behaviour_logprobs,
        inputs.teacher_logprobs,
        mask,
        weights=weights,
        clip_eps=config.clip_eps,
        agg=config.agg,
    )
    loss = loss_opd + config.traj_weight * loss_traj
    metrics.update(opd_metrics)
    metrics.update(loss=loss, loss_traj=loss_traj)
    # Per-rollout diagnostics count only rollouts with tokens, so padded rows change nothing.
    lengths = jnp.sum(valid_tokens, axis=-1)
    has_tokens = lengths > 0
    metrics["rollout_length_mean"] = _mean_where(lengths.astype(jnp.float32), has_tokens)
    if inputs.finished is not None:
        metrics["eos_rate"] = _mean_where((inputs.finished > 0).astype(jnp.float32), has_tokens)
    if inputs.teacher_agrees is not None:
        metrics["teacher_agreement"] = _mean_where((inputs.teacher_agrees > 0).astype(jnp.float32), valid_tokens)
    return loss, metrics
