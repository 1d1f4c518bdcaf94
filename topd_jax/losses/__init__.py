"""The TOPD loss library: pure, jittable functions of arrays, one per equation of TOPD.md.

    rollout (s, b, q, m) -> opd_loss                          section 1
                         -> select_candidates                  section 2
    windows (embeddings) -> ot_distance                        section 4
    OT distances         -> divergent_mask / divergent_states  section 4 (threshold)
    everything           -> topd_loss(TopdInputs, TopdConfig)  sections 5-6
                            = topd_weights -> topd_objective, topd_diagnostics
    LOCATORS: the table of ways to score D (ot, window_kl, ...), see `locators`.
    GUIDANCE: the table of readings of near-future guidance (window, return, relay, ...), see
              `guidance`.
"""

from topd_jax.losses.candidates import (
    gather_tokens,
    reference_positions,
    select_candidates,
    window_kl_proxy,
)
from topd_jax.losses.divergence import divergence_threshold, divergent_mask, divergent_states
from topd_jax.losses.guidance import GUIDANCE, Guidance, bounded_reward, mean_future, prefix_likelihood
from topd_jax.losses.locators import LOCATORS, Locator
from topd_jax.losses.opd import aggregate, opd_loss, reverse_kl, reverse_kl_on_support
from topd_jax.losses.ot import cosine_cost, ot_distance, sinkhorn_plan
from topd_jax.losses.stats import masked_quantile, spearman
from topd_jax.losses.topd import (
    TopdConfig,
    TopdInputs,
    forward_kl_topk,
    near_future_return,
    topd_diagnostics,
    topd_loss,
    topd_objective,
    topd_weights,
    trajectory_loss,
)

__all__ = [
    "GUIDANCE",
    "Guidance",
    "bounded_reward",
    "mean_future",
    "prefix_likelihood",
    "LOCATORS",
    "Locator",
    "TopdConfig",
    "TopdInputs",
    "aggregate",
    "cosine_cost",
    "near_future_return",
    "divergence_threshold",
    "divergent_mask",
    "divergent_states",
    "forward_kl_topk",
    "gather_tokens",
    "masked_quantile",
    "opd_loss",
    "ot_distance",
    "reference_positions",
    "reverse_kl",
    "reverse_kl_on_support",
    "select_candidates",
    "sinkhorn_plan",
    "spearman",
    "topd_diagnostics",
    "topd_loss",
    "topd_objective",
    "topd_weights",
    "trajectory_loss",
    "window_kl_proxy",
]
