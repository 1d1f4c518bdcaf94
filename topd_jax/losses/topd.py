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
from topd_jax.losses.divergence import divergence_threshold
from topd_jax.losses.opd import AGGREGATIONS, opd_loss
from topd_jax.losses.ot import DEFAULT_EPSILON, DEFAULT_NUM_ITERS
from topd_jax.losses.stats import masked_histogram, spearman

Array = jax.Array
OT_HISTOGRAM_BINS = 20
PRESETS = ("opd", "opd_suppress", "topd")


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
        checks = [
            (self.clip_eps is None or self.clip_eps > 0, "clip_eps must be > 0 or None"),
            (self.agg in AGGREGATIONS, f"agg must be one of {AGGREGATIONS}"),
            (0.0 <= self.candidate_quantile < 1.0, "candidate_quantile must be in [0, 1)"),
            (self.max_candidates >= 0, "max_candidates must be >= 0"),
            (self.window >= 1, "window must be >= 1"),
            (self.window_temperature is None or self.window_temperature >= 0, "window_temperature must be >= 0 or None"),
            (self.num_reference >= 0, "num_reference must be >= 0"),
            (self.locator in ("ot", "window_kl"), "locator must be 'ot' or 'window_kl'"),
            (self.threshold_mode in ("reference", "quantile", "absolute"), "threshold_mode must be reference, quantile or absolute"),
            (0.0 <= self.threshold_quantile <= 1.0, "threshold_quantile must be in [0, 1]"),
            (self.threshold_mode != "absolute" or self.tau is not None, "threshold_mode='absolute' needs tau"),
            (self.threshold_mode != "reference" or self.num_reference > 0, "threshold_mode='reference' needs num_reference > 0"),
            (0.0 <= self.suppress_weight <= 1.0, "suppress_weight must be in [0, 1]"),
            (self.traj_weight >= 0.0, "traj_weight must be >= 0"),
            (self.traj_gamma > 0.0, "traj_gamma must be > 0"),
            (self.traj_loss in ("sampled", "topk_fkl"), "traj_loss must be 'sampled' or 'topk_fkl'"),
            (self.traj_top_k >= 1, "traj_top_k must be >= 1"),
            (self.ot_epsilon > 0.0, "ot_epsilon must be > 0"),
            (self.ot_num_iters >= 1, "ot_num_iters must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise configuration.ConfigError(f"TopdConfig: {message}")

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
    t = jax.lax.stop_gradient(teacher_topk_logprobs).astype(jnp.float32)
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
    # l_r is invariant to rescaling w, so use gamma^(k-1) / max_k gamma^(k-1): finite for any gamma.
    log_w = jnp.arange(k, dtype=jnp.float32) * jnp.log(jnp.asarray(gamma, jnp.float32))
    w = jnp.exp(log_w - jnp.max(log_w)) * mask
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


def _locator_scores(inputs: TopdInputs, config: TopdConfig, divergence: Array, positions: Array):
    """D at the candidates [B, M] and at the references [B, R] (or None)."""
    if config.locator == "window_kl":
        proxy = window_kl_proxy(divergence, inputs.mask, window=config.window)
        reference = None
        if config.threshold_mode == "reference":
            ref_positions = _require(inputs.reference_positions, "reference_positions", "for locator='window_kl' with reference thresholds")
            reference = gather_tokens(proxy, ref_positions)
        return gather_tokens(proxy, positions), reference
    ot = _require(inputs.ot, "ot", "for locator='ot' when candidates are used")
    reference = None
    if config.threshold_mode == "reference":
        reference = _require(inputs.reference_ot, "reference_ot", "for threshold_mode='reference'")
    return ot, reference


def topd_loss(inputs: TopdInputs, config: TopdConfig) -> tuple[Array, dict[str, Array]]:
    """The TOPD loss and its diagnostics; pure and jittable (config is static).

        d_t    = b_t - q_t;  C = select_candidates(d) (or inputs.positions/valid)
        D      = OT distances (locator 'ot') or window-KL proxy (locator 'window_kl') at C
        R      = {c in C : D_c >= tau}                                (`divergent_mask`)
        w_t    = alpha if t in C \\ R else 1
        L      = L_OPD(w) + lambda * L_traj(R)

    Metrics (TOPD.md section 6): loss, loss_opd, loss_traj, reverse_kl_sampled,
    importance_ratio, clip_fraction, rollout_length_mean, and when candidates are scored:
    num_candidates, num_divergent, low_divergence_share (share of valid candidates below tau),
    loss_ot_spearman (Spearman of d vs D over candidates), suppressed_fraction (of valid tokens),
    divergence_threshold, ot_candidates_mean, ot_reference_mean, ot_hist_candidates,
    ot_hist_reference (counts in 20 bins over [0, 2]), window_length_mean; eos_rate and
    teacher_agreement when `finished` / `teacher_agrees` are given.
    """
    mask = inputs.mask
    divergence = inputs.behaviour_logprobs - inputs.teacher_logprobs
    scored = config.uses_candidates or inputs.ot is not None
    valid_tokens = mask > 0
    metrics: dict[str, Array] = {"suppressed_fraction": jnp.zeros((), jnp.float32)}
    weights = None
    loss_traj = jnp.zeros((), jnp.float32)

    if scored:
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
        rows = jnp.arange(mask.shape[0])[:, None]
        suppressed = jnp.zeros(mask.shape, bool).at[rows, positions].max(low) & valid_tokens
        if config.suppress_weight != 1.0:
            weights = jnp.where(suppressed, config.suppress_weight, 1.0)

        if config.traj_weight != 0.0:
            window_mask = _require(inputs.window_mask, "window_mask", "when traj_weight > 0")
            if config.traj_loss == "topk_fkl":
                step_loss = forward_kl_topk(
                    _require(inputs.window_student_topk_logprobs, "window_student_topk_logprobs", "for traj_loss='topk_fkl'"),
                    _require(inputs.window_teacher_topk_logprobs, "window_teacher_topk_logprobs", "for traj_loss='topk_fkl'"),
                )
            else:
                step_loss = -_require(inputs.window_logprobs, "window_logprobs", "when traj_weight > 0")
            loss_traj, _ = trajectory_loss(step_loss, window_mask, divergent, gamma=config.traj_gamma)

        num_valid = jnp.sum(valid)
        metrics.update(
            num_candidates=num_valid.astype(jnp.float32),
            num_divergent=jnp.sum(divergent).astype(jnp.float32),
            low_divergence_share=jnp.sum(low) / jnp.maximum(num_valid, 1),
            loss_ot_spearman=spearman(gather_tokens(divergence, positions), scores, valid),
            suppressed_fraction=jnp.sum(suppressed) / jnp.maximum(jnp.sum(valid_tokens), 1),
            divergence_threshold=jnp.where(tau_defined, tau, 0.0),
            ot_candidates_mean=jnp.sum(jnp.where(valid, scores, 0.0)) / jnp.maximum(num_valid, 1),
            ot_hist_candidates=masked_histogram(scores, valid, bins=OT_HISTOGRAM_BINS, low=0.0, high=2.0),
        )
        if reference is not None:
            metrics.update(
                ot_reference_mean=jnp.sum(jnp.where(reference_valid, reference, 0.0)) / jnp.maximum(jnp.sum(reference_valid), 1),
                ot_hist_reference=masked_histogram(reference, reference_valid, bins=OT_HISTOGRAM_BINS, low=0.0, high=2.0),
            )
        if inputs.window_mask is not None:
            lengths = jnp.sum(inputs.window_mask > 0, axis=-1)
            metrics["window_length_mean"] = jnp.sum(jnp.where(valid, lengths, 0)) / jnp.maximum(num_valid, 1)

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
    rollouts = jnp.maximum(jnp.sum(lengths > 0), 1)
    metrics["rollout_length_mean"] = jnp.sum(lengths) / rollouts
    if inputs.finished is not None:
        metrics["eos_rate"] = jnp.sum((inputs.finished > 0) & (lengths > 0)) / rollouts
    if inputs.teacher_agrees is not None:
        metrics["teacher_agreement"] = jnp.sum((inputs.teacher_agrees > 0) & valid_tokens) / jnp.maximum(jnp.sum(valid_tokens), 1)
    return loss, metrics
