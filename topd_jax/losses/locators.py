"""Locators: how a candidate's future divergence D is scored (TOPD.md section 4; section 5 proxy).

A locator is one entry of `LOCATORS`, the single table every consumer reads (config validation,
the trainer's `locate`, `topd_loss`, the miniature's analysis):

    locator = LOCATORS[config.locator]
    locator.branches        # do both models branch K-token windows at candidates and references?
    locator.window_scores   # branching locators: D from the two models' windows   [B, P]
    locator.loss_scores     # D at candidates [B, M] and references [B, R] inside topd_loss
    locator.metric_prefix   # its diagnostics are named <prefix>_candidates_mean, <prefix>_hist_*

    ot         both models branch from (x, y_<t); D = ot_distance(E_s[student window],
               E_s[teacher window]) (Sinkhorn in embedding space); the trainer computes D before
               the update and passes it as TopdInputs.ot / reference_ot.
    window_kl  no branching: D = window_kl_proxy(d), the mean of d_t over the rollout's own next
               K tokens, computed inside the loss from the rollout.

Adding a locator is one `Locator(...)` entry here plus its tests: `TopdConfig.locator` accepts
every name in the table, `locate` branches when `branches` is set, and the loss reads D through
`loss_scores`. Shapes: B rollouts, T tokens, M candidates, R references, K window tokens, D
embedding width, P = M + R branch points.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax

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
    branches       both models decode K-token windows at the candidates and references, and
                   `window_scores` turns them into D before the update
    window_scores  (student_embeddings [B, P, K, D], teacher_embeddings [B, P, K, D],
                   student_mask [B, P, K], teacher_mask [B, P, K], config) -> D [B, P];
                   None for locators that do not branch
    loss_scores    (inputs, config, d [B, T], positions [B, M]) -> (D [B, M], D_ref [B, R] or
                   None): D as the loss sees it (read from inputs, or computed from the rollout)
    metric_prefix  name of its diagnostics (`<prefix>_candidates_mean`, `<prefix>_hist_candidates`,
                   `<prefix>_reference_mean`, `<prefix>_hist_reference`)
    """

    name: str
    branches: bool
    window_scores: Callable[..., Array] | None
    loss_scores: Callable[..., tuple[Array, Array | None]]
    metric_prefix: str


def _ot_window_scores(student_embeddings: Array, teacher_embeddings: Array, student_mask: Array,
                      teacher_mask: Array, config: "TopdConfig") -> Array:
    """D = ot_distance(E_s[student window], E_s[teacher window]) per branch point."""
    return ot_distance(student_embeddings, teacher_embeddings, student_mask, teacher_mask,
                       epsilon=config.ot_epsilon, num_iters=config.ot_num_iters)


def _ot_loss_scores(inputs: "TopdInputs", config: "TopdConfig", divergence: Array,
                    positions: Array) -> tuple[Array, Array | None]:
    """The OT distances the trainer computed: inputs.ot [B, M], inputs.reference_ot [B, R]."""
    ot = require(inputs.ot, "ot", "for locator='ot' when candidates are used")
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


LOCATORS: dict[str, Locator] = {
    locator.name: locator
    for locator in (
        Locator("ot", branches=True, window_scores=_ot_window_scores, loss_scores=_ot_loss_scores,
                metric_prefix="ot"),
        Locator("window_kl", branches=False, window_scores=None, loss_scores=_window_kl_loss_scores,
                metric_prefix="window_kl"),
    )
}


def get_locator(name: Any) -> Locator:
    """LOCATORS[name], or a one-line error listing the known locators."""
    if name not in LOCATORS:
        raise ValueError(f"unknown locator {name!r}; known: {', '.join(LOCATORS)}")
    return LOCATORS[name]


__all__ = ["LOCATORS", "Locator", "get_locator", "require"]
