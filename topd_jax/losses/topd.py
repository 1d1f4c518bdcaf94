"""The TOPD objective: suppressed OPD plus near-future guidance (TOPD.md sections 2-6).

    L = L_OPD(w) + lambda * L_traj                  (guidance window, the paper's form)

w_bt = alpha at high-loss candidates whose future does not diverge (C \\ R), 1 elsewhere;
L_traj supervises the student along the teacher's K-token window from each real divergent
state in R. The other readings of guidance (a return in OPD's advantage, a spliced teacher
segment) are entries of `losses.guidance.GUIDANCE`; `topd_objective` composes whichever the
config names. Shapes: B rollouts, T tokens, M candidates, K window tokens, R reference positions,
k teacher top-k.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp

from topd_jax import configuration
from topd_jax.losses.candidates import gather_tokens, select_candidates, tokens_at
from topd_jax.losses.divergence import THRESHOLD_MODES, divergent_states
from topd_jax.losses.guidance import (GUIDANCE, Options, forward_kl_topk, near_future_return,
                                      trajectory_loss)
from topd_jax.losses.locators import LOCATORS, get_locator
from topd_jax.losses.opd import AGGREGATIONS, opd_loss
from topd_jax.losses.ot import DEFAULT_EPSILON, DEFAULT_NUM_ITERS
from topd_jax.losses.checks import FIELD_AXES, check_shapes, warn_without_tokens  # noqa: F401 (public here)
from topd_jax.losses.stats import masked_histogram, mean_where, spearman

Array = jax.Array
OT_HISTOGRAM_BINS = 20
# Each preset is the fields it sets; everything else keeps the TopdConfig default.
PRESETS: dict[str, dict[str, Any]] = {
    "opd": {"suppress_weight": 1.0, "traj_weight": 0.0},
    "opd_suppress": {"suppress_weight": 0.0, "traj_weight": 0.0},
    "topd": {},
}


@dataclasses.dataclass(frozen=True)
class TopdConfig:
    """Every knob of the method, documented once: this list is the reference of each key, and
    `configs/topd_loss.yaml` is generated from it with the defaults (`trainer.config.loss_yaml`). Symbols
    refer to TOPD.md; [reconstruction] marks our design where the paper's choice is unknown.

    -- 1. OPD (the baseline)
    clip_eps            e: PPO-style clip range of rho_t = exp(s_t - b_t), l_t = -w_t min(A_t rho_t,
                        A_t clip(rho_t, 1 - e, 1 + e)). Inert on-policy (rho_t = 1); it bounds the
                        step on tokens an older student drew (rollout.mode continuous carries them:
                        unclipped, OPD learned 12 points of area less on the miniature, docs/
                        trainer.md). Allowed: a float > 0, or null = no clipping.
    agg                 How per-token OPD losses are averaged. Allowed: token_mean (over all valid
                        tokens of the batch) | sequence_mean (mean of each rollout's token mean).
    -- 2. Candidates (high-loss tokens)
    candidate_quantile  q_C: candidates are the top (1 - q_C) share of a rollout's valid tokens by
                        d_t = b_t - q_t, ceil((1 - q_C) n_b) positions (rho = 0.2: "top 20%").
                        Allowed: a float in [0, 1].
    max_candidates      M: at most this many candidates per rollout, highest d_t first (the
                        branches are [B, M, K]). Allowed: an int >= 0.
    -- 3. Look-ahead windows
    window              K: tokens each model decodes from a candidate's prefix y_<t; also the span
                        of the window_kl proxy. Allowed: an int >= 1.
    -- 4. Divergence score and threshold
    num_reference       R: reference branches per rollout at uniform valid positions; their scores
                        set tau in threshold_mode reference. [reconstruction] Allowed: an int >= 0
                        (> 0 in threshold_mode reference).
    locator             How D is scored, a name of `losses.locators.LOCATORS`: ot = both models
                        branch, D = OT distance of the two windows (the paper's) |
                        ot_teacher_embedding = ot in the teacher's embedding space | ot_coupled
                        = the student's window drawn with the teacher's noise | ot_rollout = the
                        student's own continuation vs the teacher's window | window_kl = no
                        branches, mean of d over the rollout's own next K tokens (TOPD.md's
                        addition; its agreement with ot is measured, not assumed) | oracle = the
                        task's fork labels (synthetic task only; suppresses exactly the surface
                        forms, fixed tau 0.5).
    threshold_mode      How tau is set [reconstruction]: reference = quantile q of the batch's
                        reference scores | quantile = quantile q of its candidate scores |
                        absolute = `tau`. Divergent states are the valid candidates with D >= tau;
                        an undefined quantile gives tau = -inf (nothing is suppressed).
    threshold_quantile  q: the quantile (NumPy linear interpolation) of the reference and quantile
                        modes. [reconstruction] Allowed: a float in [0, 1].
    tau                 Fixed threshold of threshold_mode absolute (cosine-cost OT distances lie
                        in [0, 2]). [reconstruction] Allowed: a float, or null.
    -- 5. TOPD loss
    suppress_weight     alpha: OPD weight w_t of non-divergent candidates (C minus R); every other
                        token keeps 1. 0.0 = suppress (the paper's), 1.0 = no suppression.
                        Allowed: a float in [0, 1].
    traj_weight         lambda: weight of the guidance; 0.0 = no guidance. window readings: L =
                        L_OPD(w) + lambda L_traj; return readings: the weight of the future in a
                        divergent state's advantage. Allowed: a float >= 0.
    guidance            How guidance is spread over future tokens, a name of
                        `losses.guidance.GUIDANCE` [reconstruction]: window = supervise the student
                        along the teacher's K-token window from each divergent state (TOPD.md
                        section 5) | clean_window = window weighted by the teacher's prefix
                        likelihood (SCOPE) | return = A_t = -(d_t + lambda sum_k gamma^k d_{t+k})
                        at divergent states | bounded_return = TOP-D's bounded, mean-of-future,
                        z-scored return | relay = Relay-OPD: teacher segments spliced into the
                        rollout, every token trained with OPD's advantage (needs suppress_weight
                        1.0). docs/method.md gives each reading's equation and source.
    guidance_options    The reading's own keys (unknown keys are errors), each with its default:
                        window: window_tokens sampled|greedy, step_loss sampled|topk_fkl, norm
                        window|token|rollout_token, gamma 1.0, top_k 20 | clean_window: window's
                        and tau 1.0 | return: gamma 1.0 | bounded_return: alpha 0.5, at
                        divergent|every | relay: trigger topk|locator, top_k 5, max_segments 2,
                        segment 8, loss advantage|fkl, stop false, fkl_top_k 20. Allowed: a
                        mapping, e.g. {gamma: 0.9}.
    -- OT solver (section 4)
    ot_epsilon          Final entropic regularisation of the log-domain Sinkhorn solver (annealed
                        from 1.0 over the first half of the iterations). Allowed: a float > 0.
    ot_num_iters        Sinkhorn iterations (one f and one g update each). Allowed: an int >= 1.
    """

    clip_eps: float | None = 0.2
    agg: Literal["token_mean", "sequence_mean"] = "token_mean"
    candidate_quantile: float = 0.8
    max_candidates: int = 8
    window: int = 50
    num_reference: int = 2
    locator: str = "ot"
    threshold_mode: Literal["reference", "quantile", "absolute"] = "reference"
    threshold_quantile: float = 0.5
    tau: float | None = None
    suppress_weight: float = 0.0
    traj_weight: float = 1.0
    guidance: str = "window"
    guidance_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    ot_epsilon: float = DEFAULT_EPSILON
    ot_num_iters: int = DEFAULT_NUM_ITERS

    def __post_init__(self):
        if not isinstance(self.guidance_options, Mapping):
            raise configuration.ConfigError(f"guidance_options must be a mapping, got {self.guidance_options!r}")
        object.__setattr__(self, "guidance_options", Options(self.guidance_options))
        configuration.check(
            ("clip_eps", self.clip_eps is None or (math.isfinite(self.clip_eps) and self.clip_eps > 0),
             "finite and > 0, or None", self.clip_eps),
            ("agg", self.agg in AGGREGATIONS, f"one of {AGGREGATIONS}", self.agg),
            ("candidate_quantile", 0.0 <= self.candidate_quantile <= 1.0, "in [0, 1]", self.candidate_quantile),
            ("max_candidates", self.max_candidates >= 0, ">= 0", self.max_candidates),
            ("window", self.window >= 1, ">= 1", self.window),
            ("num_reference", self.num_reference >= 0, ">= 0", self.num_reference),
            ("locator", self.locator in LOCATORS, f"one of {tuple(LOCATORS)}", self.locator),
            ("threshold_mode", self.threshold_mode in THRESHOLD_MODES, f"one of {THRESHOLD_MODES}",
             self.threshold_mode),
            ("threshold_quantile", 0.0 <= self.threshold_quantile <= 1.0, "in [0, 1]", self.threshold_quantile),
            ("tau", self.threshold_mode != "absolute" or self.tau is not None, "set when threshold_mode='absolute'",
             self.tau),
            ("num_reference", self.threshold_mode != "reference" or self.num_reference > 0,
             "> 0 when threshold_mode='reference'", self.num_reference),
            ("suppress_weight", 0.0 <= self.suppress_weight <= 1.0, "in [0, 1]", self.suppress_weight),
            ("traj_weight", math.isfinite(self.traj_weight) and self.traj_weight >= 0.0, "finite and >= 0",
             self.traj_weight),
            ("guidance", self.guidance in GUIDANCE, f"one of {tuple(GUIDANCE)}", self.guidance),
            ("ot_epsilon", self.ot_epsilon > 0.0, "> 0", self.ot_epsilon),
            ("ot_num_iters", self.ot_num_iters >= 1, ">= 1", self.ot_num_iters),
        )
        reading = GUIDANCE[self.guidance]
        configuration.check(
            *reading.check(self.guidance_options),
            ("suppress_weight", reading.selects or self.traj_weight == 0.0 or self.suppress_weight == 1.0,
             f"1.0 with guidance {self.guidance!r} (it trains every token of its rollout)", self.suppress_weight),
        )

    @staticmethod
    def preset_values(name: str) -> dict[str, Any]:
        """The fields a preset sets (every other field keeps its default):
        opd (section 1 only), opd_suppress (candidates, locator, suppression), topd (everything)."""
        if name not in PRESETS:
            raise configuration.ConfigError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
        return dict(PRESETS[name])

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TopdConfig":
        """The preset `name` with `overrides` (typed, one-line errors naming the key)."""
        return cls.from_dict({**cls.preset_values(name), **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TopdConfig":
        """Typed construction; unknown keys and wrong types are one-line errors naming the key."""
        return configuration.from_dict(cls, values)

    def option(self, key: str) -> Any:
        """The guidance reading's option `key`: the value given in guidance_options, else the
        reading's default (`GUIDANCE[guidance].options`)."""
        options = GUIDANCE[self.guidance].options
        if key not in options:
            raise KeyError(f"guidance {self.guidance!r} has no option {key!r}")
        return self.guidance_options.get(key, options[key].default)

    @property
    def guided(self) -> bool:
        """Whether guidance is on (lambda > 0)."""
        return self.traj_weight != 0.0

    @property
    def splices(self) -> bool:
        """Whether the trainer splices teacher segments into the rollouts (`step.splice`)."""
        return self.guided and GUIDANCE[self.guidance].needs == "splice"

    @property
    def uses_candidates(self) -> bool:
        """Whether the loss needs candidates: suppression, or guidance at divergent states."""
        return self.suppress_weight != 1.0 or (self.guided and GUIDANCE[self.guidance].selects)

    @property
    def guides_windows(self) -> bool:
        """Whether the loss supervises the student along the teacher's windows (L_traj)."""
        return self.guided and GUIDANCE[self.guidance].needs == "windows"

    @property
    def greedy_windows(self) -> bool:
        """Whether the guidance windows are the teacher's argmax continuation (window_tokens greedy)."""
        return self.guides_windows and self.option("window_tokens") == "greedy"

    @property
    def guidance_top_k(self) -> int:
        """k of the teacher's top-k along guidance windows (0: none needed)."""
        if self.guides_windows and self.option("step_loss") == "topk_fkl":
            return self.option("top_k")
        return 0

    @property
    def uses_windows(self) -> bool:
        """Whether the teacher must branch K-token windows from the candidates (a branching
        locator, or window guidance)."""
        return self.uses_candidates and (LOCATORS[self.locator].branches or self.guides_windows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopdInputs:
    """Arrays for `topd_loss`. Only the first four are always needed.

    rollout:     student_logprobs, behaviour_logprobs, teacher_logprobs [B, T] float; mask [B, T]
    candidates:  positions [B, M] int, valid [B, M] bool (selected from d if omitted; a slot at a
                 masked token or outside [0, T) is not a candidate, see `candidate_slots`)
    divergence:  ot [B, M]; reference_ot [B, R], reference_valid [B, R]; reference_positions
                 [B, R] (the window_kl locator scores references there); candidate_labels
                 [B, M] int (fork labels at C: 1 fork, 0 surface form, -1 undecidable; the
                 oracle locator's input)
    guidance:    window_logprobs [B, M, K]: student log pi_s(v_k | x, y_<t, v_<k) of the
                 teacher's window tokens; window_mask [B, M, K];
                 topk_fkl: window_student_topk_logprobs / window_teacher_topk_logprobs
                 [B, M, K, k], both at the teacher's top-k tokens of each window step;
                 teacher_written [B, T] bool: tokens a teacher segment wrote into the rollout
                 (guidance relay; its segments are then the windows at positions/valid)
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
    candidate_labels: Array | None = None
    teacher_written: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """What `topd_weights` decides: the candidates, their D, the real divergent states and w.

    positions [B, M] int32 and valid [B, M] bool (candidates C; a slot is valid only at a valid
    token inside [0, T)); scores [B, M] (D at C); reference / reference_valid [B, R] or None;
    tau [] and tau_defined []; candidate_divergence [B, M] (d at C); divergent [B, M] (R); suppressed [B, T] (tokens of C \\ R);
    weights [B, T] (w_t).
    """

    positions: Array
    valid: Array
    scores: Array
    reference: Array | None
    reference_valid: Array | None
    tau: Array
    tau_defined: Array
    candidate_divergence: Array
    divergent: Array
    suppressed: Array
    weights: Array


def candidate_slots(inputs: TopdInputs, config: TopdConfig, divergence: Array) -> tuple[Array, Array]:
    """C: positions [B, M] int32 and valid [B, M] bool.

        C = select_candidates(d)                   when inputs.positions is None
        C = {(b, m) : valid_bm, 0 <= t_bm < T, mask_b,t_bm}   for caller-supplied positions

    A supplied slot at a masked token or outside [0, T) is not a candidate (it is masked, never
    clamped onto another token); its position is clipped only so that gathers stay in bounds.
    """
    mask = inputs.mask
    if inputs.positions is None:
        return select_candidates(divergence, mask, quantile=config.candidate_quantile,
                                 max_candidates=config.max_candidates)
    t = mask.shape[-1]
    positions = inputs.positions.astype(jnp.int32)
    in_range = (positions >= 0) & (positions < t)
    positions = jnp.clip(positions, 0, max(t - 1, 0))
    at_valid_token = gather_tokens(mask > 0, positions) if t else jnp.zeros(positions.shape, bool)
    return positions, (inputs.valid > 0) & in_range & at_valid_token


def topd_weights(inputs: TopdInputs, config: TopdConfig) -> Selection:
    """The weights part: candidates, their divergence D, the real divergent set R and w.

        d_t = b_t - q_t;   C = candidate_slots(d)
        D   = LOCATORS[config.locator].loss_scores(...) at C (and at the references)
        R   = {c in C : D_c >= tau}                         (`divergent_states`, the run's rule;
                                                             a locator's own fixed tau if it has one)
        w_t = alpha if t in C \\ R else 1                     (alpha = suppress_weight)
    """
    mask = inputs.mask
    divergence = inputs.behaviour_logprobs - inputs.teacher_logprobs
    positions, valid = candidate_slots(inputs, config, divergence)
    locator = get_locator(config.locator)
    scores, reference = locator.loss_scores(inputs, config, divergence, positions)
    reference_valid = None
    if reference is not None:
        reference_valid = jnp.ones(reference.shape, bool) if inputs.reference_valid is None else inputs.reference_valid > 0
    rule = config if locator.threshold is None else dataclasses.replace(config, threshold_mode="absolute",
                                                                         tau=locator.threshold)
    divergent, tau, tau_defined = divergent_states(scores, valid, rule, reference=reference,
                                                   reference_valid=reference_valid)
    suppressed = tokens_at(positions, valid & ~divergent, mask.shape[-1]) & (mask > 0)
    weights = jnp.where(suppressed, config.suppress_weight, 1.0)
    return Selection(positions, valid, scores, reference, reference_valid, tau, tau_defined,
                     gather_tokens(divergence, positions), divergent, suppressed, weights)


def topd_objective(inputs: TopdInputs, config: TopdConfig,
                   selection: Selection | None) -> tuple[Array, dict[str, Array]]:
    """The objective part: OPD with the guidance reading's terms (`GUIDANCE[config.guidance]`).

        terms  = reading.objective(inputs, config, selection)         (lambda > 0 and the reading
                                                                       has what it acts on)
        L_OPD  = opd_loss(s, b, q, m; w, A)    w = terms.weights, else the selection's w, else 1;
                                               A = terms.advantage, else -d
        L      = L_OPD + lambda terms.loss_traj     when the reading adds a term (window readings)
                 L_OPD                              otherwise (loss_traj is then a reported metric)

    Returns (L, terms): loss_opd, loss_traj, the reading's metrics and opd_loss's own.
    """
    reading = GUIDANCE[config.guidance]
    weights = None if selection is None else selection.weights
    terms = None
    if config.guided and (selection is not None or not reading.selects):
        terms = reading.objective(inputs, config, selection)
    advantage = None if terms is None else terms.advantage
    if terms is not None and terms.weights is not None:
        weights = terms.weights if weights is None else weights * terms.weights
    loss_opd, metrics = opd_loss(
        inputs.student_logprobs,
        inputs.behaviour_logprobs,
        inputs.teacher_logprobs,
        inputs.mask,
        weights=weights,
        advantage=advantage,
        clip_eps=config.clip_eps,
        agg=config.agg,
    )
    loss_traj = jnp.zeros((), jnp.float32) if terms is None else terms.loss_traj
    loss = loss_opd + config.traj_weight * loss_traj if terms is not None and terms.added else loss_opd
    return loss, {**metrics, **({} if terms is None else terms.extra), "loss_traj": loss_traj}


def topd_diagnostics(inputs: TopdInputs, config: TopdConfig, selection: Selection | None) -> dict[str, Array]:
    """The diagnostics part (TOPD.md section 6), a pure function of the inputs and the selection.

        suppressed_fraction  |tokens of C \\ R| / |valid tokens|          (0 when alpha = 1)
        low_divergence_share |C \\ R| / |C|  over valid candidates
        loss_ot_spearman     Spearman(d, D) over valid candidates
        <prefix>_candidates_mean / _hist_candidates, <prefix>_reference_mean / _hist_reference:
                             D of the locator (prefix `LOCATORS[...].metric_prefix`: ot, window_kl),
                             histograms as counts in 20 bins over [0, 2]
        num_candidates, num_divergent, divergence_threshold (tau, 0 if undefined),
        window_length_mean   mean valid window length over valid candidates (windows given)
        rollout_length_mean, eos_rate, teacher_agreement   over rollouts / tokens
    """
    mask = inputs.mask
    valid_tokens = mask > 0
    metrics: dict[str, Array] = {"suppressed_fraction": jnp.zeros((), jnp.float32)}
    if selection is not None:
        s = selection
        if config.suppress_weight != 1.0:
            metrics["suppressed_fraction"] = mean_where(s.suppressed.astype(jnp.float32), valid_tokens)
        low = s.valid & ~s.divergent
        num_valid = jnp.sum(s.valid)
        prefix = get_locator(config.locator).metric_prefix
        metrics.update({
            "num_candidates": num_valid.astype(jnp.float32),
            "num_divergent": jnp.sum(s.divergent).astype(jnp.float32),
            "low_divergence_share": jnp.sum(low) / jnp.maximum(num_valid, 1),
            "loss_ot_spearman": spearman(s.candidate_divergence, s.scores, s.valid),
            "divergence_threshold": jnp.where(s.tau_defined, s.tau, 0.0),
            f"{prefix}_candidates_mean": mean_where(s.scores, s.valid),
            f"{prefix}_hist_candidates": masked_histogram(s.scores, s.valid, bins=OT_HISTOGRAM_BINS, low=0.0,
                                                          high=2.0),
        })
        if s.reference is not None:
            metrics[f"{prefix}_reference_mean"] = mean_where(s.reference, s.reference_valid)
            metrics[f"{prefix}_hist_reference"] = masked_histogram(s.reference, s.reference_valid,
                                                                   bins=OT_HISTOGRAM_BINS, low=0.0, high=2.0)
        if inputs.window_mask is not None:
            lengths = jnp.sum(inputs.window_mask > 0, axis=-1)
            metrics["window_length_mean"] = mean_where(lengths.astype(jnp.float32), s.valid)
    # Per-rollout diagnostics count only rollouts with tokens, so padded rows change nothing.
    lengths = jnp.sum(valid_tokens, axis=-1)
    has_tokens = lengths > 0
    metrics["rollout_length_mean"] = mean_where(lengths.astype(jnp.float32), has_tokens)
    if inputs.finished is not None:
        metrics["eos_rate"] = mean_where((inputs.finished > 0).astype(jnp.float32), has_tokens)
    if inputs.teacher_agrees is not None:
        metrics["teacher_agreement"] = mean_where((inputs.teacher_agrees > 0).astype(jnp.float32), valid_tokens)
    return metrics


def topd_loss(inputs: TopdInputs, config: TopdConfig) -> tuple[Array, dict[str, Array]]:
    """The TOPD loss and its diagnostics; pure and jittable (config is static).

        selection = topd_weights(inputs, config)       C, D, R, w     (when candidates are used
                                                                       or D is given)
        L, terms  = topd_objective(inputs, config, selection)         L_OPD(w) + lambda L_traj
        metrics   = topd_diagnostics(inputs, config, selection)       TOPD.md section 6

    Metrics: loss, loss_opd, loss_traj, reverse_kl_sampled, importance_ratio, clip_fraction and
    everything `topd_diagnostics` lists.
    """
    check_shapes(inputs)
    warn_without_tokens(inputs.mask)
    selection = None
    if config.uses_candidates or inputs.ot is not None:
        selection = topd_weights(inputs, config)
    loss, terms = topd_objective(inputs, config, selection)
    metrics = topd_diagnostics(inputs, config, selection)
    metrics.update(terms)
    metrics["loss"] = loss
    return loss, metrics
