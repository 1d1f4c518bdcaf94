"""Locators: how a candidate's future divergence D is scored (TOPD.md section 4; section 5 proxy).

A locator is one entry of `LOCATORS`, the single table every consumer reads (config validation,
the trainer's `locate`, `topd_loss`, the miniature's analysis):

    locator = LOCATORS[config.locator]
    locator.branches        # does the teacher branch K-token windows at candidates and references?
    locator.student_window  # how the student's window is obtained: branch | coupled | rollout
    locator.embedding       # whose input embedding table maps window tokens to vectors
    locator.window_scores   # branching locators: D from the two models' windows   [B, P]
    locator.labels          # does it read the fork labels of the candidates (the oracle)?
    locator.threshold       # a fixed tau of its own (scores that are decisions), else None
    locator.loss_scores     # D at candidates [B, M] and references [B, R] inside topd_loss
    locator.metric_prefix   # its diagnostics are named <prefix>_candidates_mean, <prefix>_hist_*

    ot                    both models branch from (x, y_<t) with independent noise (the paper's);
                          D = ot_distance(E_s[student window], E_s[teacher window]) (Sinkhorn in
                          the student's embedding space); the trainer computes D before the
                          update and passes it as TopdInputs.ot / reference_ot.
    ot_teacher_embedding  as ot, both windows embedded with the teacher's table E_T.
    ot_coupled            as ot, but the student's window draws with the teacher's per-step noise
                          (the same Gumbel noise, same key): identical next-token distributions
                          give identical windows, so D measures the models' difference, not the
                          sampling noise. Needs equal vocabulary sizes.
    ot_rollout            no student branching: the student's window is its own continuation
                          y_t..y_{t+K-1} from the rollout, compared with the teacher's window from
                          y_<t.
    window_kl             no branching: D = window_kl_proxy(d), the mean of d_t over the rollout's
                          own next K tokens, computed inside the loss from the rollout.
    oracle                no branching: D = 1 unless the candidate's fork label is 0 (a surface
                          form), cut at tau = 0.5 whatever threshold_mode says: exactly the
                          cosmetic candidates are suppressed and every other one is kept and
                          guided. The labels are TopdInputs.candidate_labels [B, M] (1 fork, 0
                          surface form, -1 undecidable), which the trainer fills from the task's
                          labeller (`trainer.step.candidates`, the synthetic task only); the loss
                          itself never imports a task. It bounds what suppression and guidance
                          can do with a perfect locator.

Adding a locator is one `Locator(...)` entry here plus its tests: `TopdConfig.locator` accepts
every name in the table, `locate` branches when `branches` is set, and the loss reads D through
`loss_scores`. Shapes: B rollouts, T tokens, M candidates, R references, K window tokens, D
embedding width, P = M + R branch points.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Literal

import jax
import jax.numpy as jnp

from topd_jax.losses.candidates import gather_tokens, window_kl_proxy
from topd_jax.losses.ot import ot_distance

if TYPE_CHECKING:  # topd.py imports this module
    from topd_jax.losses.topd import TopdConfig, TopdInputs

Array = jax.Array


def require(value: Array | None, name: str, why: str) -> Array:
    """value, or a one-line error naming the missing TopdInputs field."""
    if value is None:
        raise ValueError(f"TopdInputs.{name} is required {why}")
    return value


@dataclasses.dataclass(frozen=True)
class Locator:
    """One way of scoring a candidate's future divergence.

    name           the `TopdConfig.locator` value
    branches       the teacher decodes K-token windows at the candidates and references, the
                   student gets its windows there (`student_window`), and `window_scores` turns
                   them into D before the update
    student_window branching locators: branch = the student re-samples K tokens from y_<t with its
                   own noise | coupled = with the teacher's per-step noise | rollout = its own
                   continuation y_t.. (no student branching); None for locators that do not branch
    embedding      whose input embedding table embeds both windows: student | teacher
    window_scores  (student_embeddings [B, P, K, D], teacher_embeddings [B, P, K, D],
                   student_mask [B, P, K], teacher_mask [B, P, K], config) -> D [B, P];
                   None for locators that do not branch
    loss_scores    (inputs, config, d [B, T], positions [B, M]) -> (D [B, M], D_ref [B, R] or
                   None): D as the loss sees it (read from inputs, or computed from the rollout)
    metric_prefix  name of its diagnostics (`<prefix>_candidates_mean`, `<prefix>_hist_candidates`,
                   `<prefix>_reference_mean`, `<prefix>_hist_reference`)
    labels         the trainer fills TopdInputs.candidate_labels (fork labels at C) for it
    threshold      a fixed tau its scores are cut at (the divergent states are D >= threshold),
                   overriding threshold_mode; None = the run's threshold rule
    """

    name: str
    branches: bool
    window_scores: Callable[..., Array] | None
    loss_scores: Callable[..., tuple[Array, Array | None]]
    metric_prefix: str
    student_window: Literal["branch", "coupled", "rollout"] | None = None
    embedding: Literal["student", "teacher"] = "student"
    labels: bool = False
    threshold: float | None = None

    def __post_init__(self):
        if self.branches != (self.student_window is not None) or self.branches != (self.window_scores is not None):
            raise ValueError(f"locator {self.name!r}: a branching locator needs student_window and window_scores, "
                             "a non-branching one neither")
        if self.student_window not in (None, "branch", "coupled", "rollout"):
            raise ValueError(f"locator {self.name!r}: student_window must be branch, coupled or rollout")
        if self.embedding not in ("student", "teacher"):
            raise ValueError(f"locator {self.name!r}: embedding must be student or teacher")


def _ot_window_scores(student_embeddings: Array, teacher_embeddings: Array, student_mask: Array,
                      teacher_mask: Array, config: "TopdConfig") -> Array:
    """D = ot_distance(E_s[student window], E_s[teacher window]) per branch point."""
    return ot_distance(student_embeddings, teacher_embeddings, student_mask, teacher_mask,
                       epsilon=config.ot_epsilon, num_iters=config.ot_num_iters)


def _ot_loss_scores(inputs: "TopdInputs", config: "TopdConfig", divergence: Array,
                    positions: Array) -> tuple[Array, Array | None]:
    """The OT distances the trainer computed: inputs.ot [B, M], inputs.reference_ot [B, R]."""
    ot = require(inputs.ot, "ot", f"for locator={config.locator!r} when candidates are used")
    if config.threshold_mode == "reference":
        require(inputs.reference_ot, "reference_ot", "for threshold_mode='reference'")
    return ot, inputs.reference_ot


def _window_kl_loss_scores(inputs: "TopdInputs", config: "TopdConfig", divergence: Array,
                           positions: Array) -> tuple[Array, Array | None]:
    """P_t = window_kl_proxy(d) gathered at the candidates and (when given) the references."""
    proxy = window_kl_proxy(divergence, inputs.mask, window=config.window)
    ref_positions = inputs.reference_positions
    if config.threshold_mode == "reference":
        ref_positions = require(ref_positions, "reference_positions",
                                "for locator='window_kl' with threshold_mode='reference'")
    reference = None if ref_positions is None else gather_tokens(proxy, ref_positions)
    return gather_tokens(proxy, positions), reference


def _oracle_loss_scores(inputs: "TopdInputs", config: "TopdConfig", divergence: Array,
                        positions: Array) -> tuple[Array, Array | None]:
    """D = 1 - [label == 0] at the candidates: 0 at surface forms, 1 at forks and undecidable ones."""
    labels = require(inputs.candidate_labels, "candidate_labels", "for locator='oracle' (the trainer fills it)")
    return (labels != 0).astype(jnp.float32), None


LOCATORS: dict[str, Locator] = {
    locator.name: locator
    for locator in (
        Locator("ot", branches=True, window_scores=_ot_window_scores, loss_scores=_ot_loss_scores,
                metric_prefix="ot", student_window="branch"),
        Locator("ot_teacher_embedding", branches=True, window_scores=_ot_window_scores,
                loss_scores=_ot_loss_scores, metric_prefix="ot", student_window="branch", embedding="teacher"),
        Locator("ot_coupled", branches=True, window_scores=_ot_window_scores, loss_scores=_ot_loss_scores,
                metric_prefix="ot", student_window="coupled"),
        Locator("ot_rollout", branches=True, window_scores=_ot_window_scores, loss_scores=_ot_loss_scores,
                metric_prefix="ot", student_window="rollout"),
        Locator("window_kl", branches=False, window_scores=None, loss_scores=_window_kl_loss_scores,
                metric_prefix="window_kl"),
        Locator("oracle", branches=False, window_scores=None, loss_scores=_oracle_loss_scores,
                metric_prefix="oracle", labels=True, threshold=0.5),
    )
}


def get_locator(name: Any) -> Locator:
    """LOCATORS[name], or a one-line error listing the known locators."""
    if name not in LOCATORS:
        raise ValueError(f"unknown locator {name!r}; known: {', '.join(LOCATORS)}")
    return LOCATORS[name]


__all__ = ["LOCATORS", "Locator", "get_locator", "require"]
