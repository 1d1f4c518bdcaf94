"""Guidance: how TOPD spreads the teacher's guidance over near-future tokens, one entry per reading.

A reading is one entry of `GUIDANCE`, the single table every consumer reads (config validation,
the trainer's `locate` and `splice`, `topd_objective`, the miniature's screen):

    reading = GUIDANCE[config.guidance]
    reading.options    # its keys (TopdConfig.guidance_options) with defaults, checks and meaning
    reading.needs      # what the trainer must build for it: nothing | windows | splice
    reading.selects    # does it act at the locator's divergent states R (else: no selection)
    reading.objective  # (inputs, config, selection) -> Terms: the advantage it puts in OPD's
                       # place, the OPD weights it sets, the term it adds (lambda L_traj)

    window          the paper's form as we reconstruct it (TOPD.md section 5): supervise the
                    student along the teacher's K-token window from each divergent state,
                    L = L_OPD(w) + lambda L_traj.
    clean_window    window with each window's term weighted by the teacher's likelihood of its
                    prefix, c_r = PPL_T(x, y_<t)^(-1/tau) (SCOPE, arXiv 2604.10688): a window that
                    continues a broken prefix (the teacher finds it unlikely) counts little.
    return          no window: at each divergent state the OPD advantage becomes the near-future
                    return A_t = -(d_t + lambda sum_k gamma^k d_{t+k}) over the student's own
                    rollout.
    bounded_return  TOP-D (arXiv 2607.04751): bounded rewards r_t = log(alpha rho_t + 1 - alpha),
                    rho_t = pi_T / pi_S, the return r_t + lambda mean_k r_{t+k} over the next K - 1
                    tokens, z-scored over the batch's tokens, as the advantage at the divergent
                    states (or at every token).
    relay           Relay-OPD (arXiv 2607.26057): at trigger states the teacher samples a segment
                    that is spliced into the rollout and the student continues after it; every
                    token, the teacher's included, is trained with OPD's own advantage against
                    the student's old log-probs (loss advantage), or the segment with the top-k
                    forward KL (loss fkl, its ablation). The trainer's `splice` builds the rollout.

Adding a reading is one `Guidance(...)` entry here plus its tests: `TopdConfig.guidance` accepts
every name in the table, its options are validated by the entry, and the trainer builds what
`needs` names. Shapes: B rollouts, T tokens, M candidates (or segments), K window tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp

from topd_jax.losses.candidates import gather_tokens, tokens_at
from topd_jax.losses.locators import require
from topd_jax.losses.stats import mean_where

if TYPE_CHECKING:  # topd.py imports this module
    from topd_jax.losses.topd import Selection, TopdConfig, TopdInputs

Array = jax.Array
_LOG_ZERO = -1e30
WINDOW_NORMS = ("window", "token", "rollout_token")


@dataclasses.dataclass(frozen=True)
class Option:
    """One key of a reading: its default, the check a value must pass and its meaning."""

    default: Any
    check: Callable[[Any], bool]
    requirement: str
    doc: str


def _one_of(*values: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in values), "one of " + " | ".join(map(str, values))


def _real(low: float, high: float = math.inf, *, low_open: bool = False,
          high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return check, f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _count(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an int >= {low}"


def _option(default: Any, rule: tuple[Callable[[Any], bool], str], doc: str) -> Option:
    return Option(default, rule[0], rule[1], doc)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Terms:
    """What a reading contributes to the objective.

    advantage [B, T] or None: replaces OPD's A_t = -d_t (no gradient); weights [B, T] or None:
    OPD's per-token weights (None: the selection's w, or 1); loss_traj []: the reading's own term
    (added as lambda loss_traj when `added`, else a reported metric); extra: reading metrics.
    """

    advantage: Array | None
    weights: Array | None
    loss_traj: Array
    added: bool = dataclasses.field(metadata=dict(static=True), default=False)
    extra: dict[str, Array] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Guidance:
    """One reading of near-future guidance.

    name      the `TopdConfig.guidance` value
    needs     what the trainer builds for it: nothing (the rollout is enough) | windows (the
              teacher's K-token windows at the candidates, `Located.teacher_windows`) | splice
              (rollouts with teacher segments spliced in, `step.splice`)
    selects   it acts at the divergent states R of the locator (`topd_weights` runs); False:
              it trains every token as it is (relay: no candidates in the loss)
    options   its keys, `TopdConfig.guidance_options`, with defaults: name -> Option
    objective (inputs, config, selection) -> Terms
    """

    name: str
    needs: Literal["nothing", "windows", "splice"]
    selects: bool
    options: Mapping[str, Option]
    objective: Callable[..., Terms]

    def __post_init__(self):
        if self.needs not in ("nothing", "windows", "splice"):
            raise ValueError(f"guidance {self.name!r}: needs must be nothing, windows or splice")

    def check(self, given: Mapping[str, Any]) -> list[tuple[str, bool, str, Any]]:
        """`configuration.check` rows of the given options: unknown keys and bad values."""
        rows = []
        for key, value in given.items():
            if key not in self.options:
                rows.append((f"guidance_options.{key}", False,
                             f"a key of guidance {self.name!r} ({', '.join(self.options) or 'none'})", value))
                continue
            option = self.options[key]
            rows.append((f"guidance_options.{key}", option.check(value), option.requirement, value))
        return rows


class Options(dict):
    """A frozen, hashable dict of a reading's given options (TopdConfig is a static jit arg)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def _frozen(self, *args, **kwargs):
        raise TypeError("guidance options are frozen; build a new TopdConfig instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _frozen


# ---------------------------------------------------------------------------- equations

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
    step_loss: Array, window_mask: Array, divergent: Array, *, gamma: float = 1.0, norm: str = "window",
    rollout_tokens: Array | None = None, window_weights: Array | None = None,
) -> tuple[Array, Array]:
    """Near-future guidance [reconstruction]: [B, M, K], [B, M, K], [B, M] -> (L_traj, |R|).

        w_k = gamma^(k-1) / max_k' gamma^(k'-1) (over the window's valid steps)
        window:        L_traj = sum_{r in R} c_r [sum_k w_k m_k ell_k / sum_k w_k m_k] / max(1, |R|)
        token:         L_traj = sum_{r in R} c_r sum_k w_k m_k ell_k / max(1, sum_{r in R} sum_k w_k m_k)
        rollout_token: L_traj = sum_{r in R} c_r sum_k w_k m_k ell_k / max(1, N)

    N = rollout_tokens, the batch's valid rollout tokens (OPD's token_mean denominator), so under
    rollout_token a guided token weighs what one OPD token weighs. c_r = window_weights [B, M]
    (1 when None; clean_window's prefix likelihood). ell_k is -log pi_s(v_k | ...) for the sampled
    form or the top-k forward KL; windows with no valid token do not count in |R|.
    """
    if norm not in WINDOW_NORMS:
        raise ValueError(f"trajectory_loss: norm must be one of {WINDOW_NORMS}, got {norm!r}")
    if norm == "rollout_token" and rollout_tokens is None:
        raise ValueError("trajectory_loss: norm='rollout_token' needs rollout_tokens (N)")
    k = step_loss.shape[-1]
    if k == 0:  # K = 0: no window token to guide along, like M = 0
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    mask = window_mask.astype(jnp.float32)
    c = jnp.ones(divergent.shape, jnp.float32) if window_weights is None else window_weights.astype(jnp.float32)
    # l_r is invariant to rescaling w: divide by the largest valid weight, finite for any gamma.
    log_w = jnp.arange(k, dtype=jnp.float32) * jnp.log(jnp.asarray(gamma, jnp.float32))
    log_w_max = jnp.max(jnp.where(mask > 0, log_w, -jnp.inf), axis=-1, keepdims=True)
    w = jnp.exp(jnp.where(mask > 0, log_w - log_w_max, -jnp.inf))
    total_w = jnp.sum(w, axis=-1)
    per_window = jnp.sum(w * jnp.where(mask > 0, step_loss, 0.0), axis=-1) / jnp.where(total_w > 0, total_w, 1.0)
    counted = (divergent > 0) & (total_w > 0)
    count = jnp.sum(counted)
    if norm == "window":
        return jnp.sum(jnp.where(counted, c * per_window, 0.0)) / jnp.maximum(count, 1), count
    guided = jnp.where(counted[..., None] & (mask > 0), w, 0.0)  # [B, M, K]
    total = jnp.sum(c[..., None] * guided * jnp.where(mask > 0, step_loss, 0.0))
    denominator = jnp.sum(guided) if norm == "token" else jnp.asarray(rollout_tokens, jnp.float32)
    return total / jnp.maximum(denominator, 1.0), count


def near_future_return(divergence: Array, mask: Array, *, window: int, gamma: float = 1.0) -> Array:
    """The near-future return of every token of the student's own rollout [reconstruction]:
    [B, T] -> [B, T].

        F_t = sum_{k=1}^{K-1} gamma^k m_{t+k} d_{t+k}      (0 past the rollout's end)

    At a divergent state the advantage becomes A_t = -(d_t + lambda F_t): the teacher's
    disagreement with the drift that follows the fork is credited to the fork itself, spreading
    its guidance over the next K tokens without supervising any window.
    """
    if window < 1:
        raise ValueError(f"near_future_return: window must be >= 1, got {window}")
    d = jnp.where(mask > 0, divergence.astype(jnp.float32), 0.0)
    t = d.shape[-1]
    out = jnp.zeros_like(d)
    for k in range(1, min(window, t)):  # K shifted adds: exact, no cumulative-sum cancellation
        out = out + (gamma ** k) * jnp.pad(d[:, k:], [(0, 0), (0, k)])
    return out


def bounded_reward(student_logprobs: Array, teacher_logprobs: Array, *, alpha: float) -> Array:
    """TOP-D's bounded per-token reward [B, T] (arXiv 2607.04751):

        r_t = log(alpha rho_t + 1 - alpha),   rho_t = pi_T(y_t) / pi_S(y_t) = exp(q_t - b_t)

    r_t >= log(1 - alpha) (the floor: a token the teacher rules out costs a bounded amount);
    r_t = 0 where the models agree; it grows like log rho_t only where the teacher prefers y_t.
    Computed as logaddexp(log alpha + q - b, log(1 - alpha)), finite for any log-probs.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"bounded_reward: alpha must be in (0, 1), got {alpha}")
    log_rho = (teacher_logprobs - student_logprobs).astype(jnp.float32)
    return jnp.logaddexp(math.log(alpha) + log_rho, math.log1p(-alpha))


def mean_future(values: Array, mask: Array, *, window: int) -> Array:
    """The mean of the next K - 1 valid values [B, T] -> [B, T] (0 where none follows):

        mean_{k=1}^{K-1} m_{t+k} v_{t+k} / max(1, sum_k m_{t+k})
    """
    if window < 1:
        raise ValueError(f"mean_future: window must be >= 1, got {window}")
    m = (mask > 0).astype(jnp.float32)
    v = jnp.where(mask > 0, values.astype(jnp.float32), 0.0)
    t = v.shape[-1]
    total, count = jnp.zeros_like(v), jnp.zeros_like(v)
    for k in range(1, min(window, t)):
        total = total + jnp.pad(v[:, k:], [(0, 0), (0, k)])
        count = count + jnp.pad(m[:, k:], [(0, 0), (0, k)])
    return total / jnp.maximum(count, 1.0)


def zscore(values: Array, where: Array) -> Array:
    """(v - mean) / std over the entries `where` (std floored at 1e-6); 0 outside."""
    w = where > 0
    n = jnp.maximum(jnp.sum(w), 1)
    mean = jnp.sum(jnp.where(w, values, 0.0)) / n
    var = jnp.sum(jnp.where(w, (values - mean) ** 2, 0.0)) / n
    return jnp.where(w, (values - mean) / jnp.maximum(jnp.sqrt(var), 1e-6), 0.0)


def prefix_likelihood(teacher_logprobs: Array, mask: Array, positions: Array, *, tau: float) -> Array:
    """SCOPE-like window weight c = PPL_T(y_<t)^(-1/tau) at each position [B, M] in (0, 1]:

        c_bm = exp( (1/tau) sum_{s < t} m_s q_s / max(1, sum_{s < t} m_s) ),   t = positions_bm

    q_s = log pi_T(y_s | x, y_<s). The prompt is not counted (the teacher scores completions
    only); an empty prefix (t = 0) weighs 1.
    """
    q = jnp.where(mask > 0, teacher_logprobs.astype(jnp.float32), 0.0)
    n = jnp.cumsum((mask > 0).astype(jnp.float32), axis=-1)
    s = jnp.cumsum(q, axis=-1)
    # exclusive prefix sums: sum over s < t
    n_ex = jnp.pad(n, [(0, 0), (1, 0)])
    s_ex = jnp.pad(s, [(0, 0), (1, 0)])
    t = jnp.clip(positions.astype(jnp.int32), 0, q.shape[-1])
    mean_logp = gather_tokens(s_ex, t) / jnp.maximum(gather_tokens(n_ex, t), 1.0)
    return jnp.exp(mean_logp / tau)


# ---------------------------------------------------------------------------- readings

def _window_step_loss(inputs: "TopdInputs", step_loss: str, window_mask: Array) -> Array:
    """ell_k [B, M, K]: -log pi_s(v_k | ...) or the top-k forward KL at each window step."""
    if step_loss == "sampled":
        return -require(inputs.window_logprobs, "window_logprobs", "for window guidance")
    why = "for guidance_options.step_loss='topk_fkl'"
    student = require(inputs.window_student_topk_logprobs, "window_student_topk_logprobs", why)
    teacher = require(inputs.window_teacher_topk_logprobs, "window_teacher_topk_logprobs", why)
    # Steps past a window's end may hold anything (e.g. -inf); keep them out of the arithmetic.
    step_valid = (window_mask > 0)[..., None]
    return forward_kl_topk(jnp.where(step_valid, student, 0.0), jnp.where(step_valid, teacher, 0.0))


def _window_terms(inputs: "TopdInputs", config: "TopdConfig", selection: "Selection",
                  window_weights: Array | None = None) -> Terms:
    window_mask = require(inputs.window_mask, "window_mask", "for window guidance")
    step_loss = _window_step_loss(inputs, config.option("step_loss"), window_mask)
    loss_traj, _ = trajectory_loss(step_loss, window_mask, selection.divergent, gamma=config.option("gamma"),
                                   norm=config.option("norm"), rollout_tokens=jnp.sum(inputs.mask > 0),
                                   window_weights=window_weights)
    return Terms(None, None, loss_traj, added=True)


def _clean_window_terms(inputs, config, selection) -> Terms:
    """window, each guided window weighted by c_r = PPL_T(x, y_<t)^(-1/tau)."""
    c = jax.lax.stop_gradient(prefix_likelihood(inputs.teacher_logprobs, inputs.mask, selection.positions,
                                                tau=config.option("tau")))
    terms = _window_terms(inputs, config, selection, window_weights=c)
    at = selection.valid & selection.divergent
    mean_c = jnp.sum(jnp.where(at, c, 0.0)) / jnp.maximum(jnp.sum(at), 1)
    return dataclasses.replace(terms, extra={"window_weight_mean": mean_c})


def _at_divergent(inputs, selection) -> Array:
    at = tokens_at(selection.positions, selection.valid & selection.divergent, inputs.mask.shape[-1])
    return at & (inputs.mask > 0)


def _return_terms(inputs, config, selection) -> Terms:
    """A_t = -(d_t + lambda F_t) at R; loss_traj reports the mean credited drift F_t over R."""
    divergence = inputs.behaviour_logprobs - inputs.teacher_logprobs
    at = _at_divergent(inputs, selection)
    future = near_future_return(divergence, inputs.mask, window=config.window, gamma=config.option("gamma"))
    advantage = -(divergence + jnp.where(at, config.traj_weight * future, 0.0))
    return Terms(advantage, None, mean_where(future, at))


def _bounded_return_terms(inputs, config, selection) -> Terms:
    """G_t = r_t + lambda mean_{k<K} r_{t+k}, z-scored over the batch's valid tokens; A_t = G^_t
    at R (at: divergent) or at every token (at: every), -d_t elsewhere; loss_traj reports the
    mean future reward mean_k r_{t+k} where it is applied."""
    mask = inputs.mask > 0
    divergence = inputs.behaviour_logprobs - inputs.teacher_logprobs
    r = jnp.where(mask, bounded_reward(inputs.behaviour_logprobs, inputs.teacher_logprobs,
                                       alpha=config.option("alpha")), 0.0)
    future = mean_future(r, inputs.mask, window=config.window)
    g = zscore(r + config.traj_weight * future, mask)
    at = mask if config.option("at") == "every" else _at_divergent(inputs, selection)
    advantage = jnp.where(at, g, -divergence)
    return Terms(advantage, None, mean_where(future, at))


def _relay_terms(inputs, config, selection) -> Terms:
    """advantage: plain OPD over every token of the spliced rollout, A_t = q_t - b_t with b the
    student's old log-probs (the teacher's segment included); fkl: OPD on the student's own
    tokens only (w = 0 on the segment) + lambda mean over segment tokens of the top-k forward KL
    (the segments arrive as windows at their start positions)."""
    written = require(inputs.teacher_written, "teacher_written", "for guidance 'relay'") > 0
    share = mean_where(written.astype(jnp.float32), inputs.mask > 0)
    if config.option("loss") == "advantage":
        return Terms(None, None, jnp.zeros((), jnp.float32), extra={"teacher_token_share": share})
    window_mask = require(inputs.window_mask, "window_mask", "for guidance_options.loss='fkl'")
    valid = require(inputs.valid, "valid", "for guidance_options.loss='fkl'")
    step_loss = _window_step_loss(inputs, "topk_fkl", window_mask)
    loss_traj, _ = trajectory_loss(step_loss, window_mask, valid, norm="token")
    return Terms(None, jnp.where(written, 0.0, 1.0), loss_traj, added=True, extra={"teacher_token_share": share})


_WINDOW_OPTIONS = {
    "window_tokens": _option("sampled", _one_of("sampled", "greedy"),
                             "how the teacher's guidance window is drawn: sampled = at the windows' "
                             "temperature (the locator's window, reused) | greedy = its argmax continuation"),
    "step_loss": _option("sampled", _one_of("sampled", "topk_fkl"),
                         "ell_k: sampled = -log pi_s(v_k | x, y_<t, v_<k) of the teacher's token | topk_fkl = "
                         "forward KL from the teacher's renormalised top-k distribution to the student"),
    "norm": _option("window", _one_of(*WINDOW_NORMS),
                    "what L_traj averages over: window = mean over R of each window's weighted token mean | "
                    "token = mean over all guided tokens | rollout_token = sum over guided tokens / the "
                    "batch's valid rollout tokens"),
    "gamma": _option(1.0, _real(0.0, low_open=True), "per-step weight w_k = gamma^(k-1) along a window"),
    "top_k": _option(20, _count(1), "k: the teacher's top-k support of step_loss topk_fkl"),
}

GUIDANCE: dict[str, Guidance] = {
    "window": Guidance("window", "windows", True, _WINDOW_OPTIONS, _window_terms),
    "clean_window": Guidance("clean_window", "windows", True, {
        **_WINDOW_OPTIONS,
        "tau": _option(1.0, _real(0.0, low_open=True),
                       "temperature of the prefix weight c = PPL_T(y_<t)^(-1/tau); larger = milder"),
    }, _clean_window_terms),
    "return": Guidance("return", "nothing", True, {
        "gamma": _option(1.0, _real(0.0, low_open=True), "discount of the near-future return, gamma^k"),
    }, _return_terms),
    "bounded_return": Guidance("bounded_return", "nothing", True, {
        "alpha": _option(0.5, _real(0.0, 1.0, low_open=True, high_open=True),
                         "alpha of r_t = log(alpha rho_t + 1 - alpha), in (0, 1): the floor is log(1 - alpha)"),
        "at": _option("divergent", _one_of("divergent", "every"),
                      "where the return replaces OPD's advantage: the divergent states R | every token"),
    }, _bounded_return_terms),
    "relay": Guidance("relay", "splice", False, {
        "trigger": _option("topk", _one_of("topk", "locator"),
                           "where the teacher takes over: topk = its argmax is outside the student's top-k "
                           "(Relay-OPD's vocabulary-agnostic rule) | locator = the locator's divergent states"),
        "top_k": _option(5, _count(1), "k of the topk trigger"),
        "max_segments": _option(2, _count(1), "M: takeovers per rollout at most, earliest first"),
        "segment": _option(8, _count(1), "tokens of a teacher segment at most (it ends early at EOS)"),
        "loss": _option("advantage", _one_of("advantage", "fkl"),
                        "advantage = OPD's advantage on every token, the segment's included | fkl = top-k "
                        "forward KL on the segment (the ablation)"),
        "stop": _option(False, _one_of(False, True),
                        "the stop ablation: end the rollout at the first trigger, no segment"),
        "fkl_top_k": _option(20, _count(1), "k of the segment's top-k forward KL (loss fkl)"),
    }, _relay_terms),
}


def get_guidance(name: str) -> Guidance:
    if name not in GUIDANCE:
        raise ValueError(f"unknown guidance {name!r}; choose one of {tuple(GUIDANCE)}")
    return GUIDANCE[name]


__all__ = ["GUIDANCE", "Guidance", "Option", "Options", "Terms", "bounded_reward", "forward_kl_topk",
           "get_guidance", "mean_future", "near_future_return", "prefix_likelihood", "trajectory_loss", "zscore"]
