"""Real divergent states: which candidates' futures truly diverge (TOPD.md section 4, threshold).

The threshold rule is [reconstruction]: the paper calls a state a real divergence when it is both
high-loss and high-OT, without giving the cut. Three modes, all configurable:

    reference: tau = quantile_q of the OT distances at R random reference positions per rollout
               (over the batch): a candidate is "low divergence" when its future diverges no
               more than a typical position's.
    quantile:  tau = quantile_q of the candidates' own OT distances (over the batch).
    absolute:  tau given.

    R = {(b, m) valid : D_bm >= tau}

Shapes: B rollouts, M candidates, R reference positions.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from topd_jax.losses.stats import masked_quantile

Array = jax.Array
ThresholdMode = Literal["reference", "quantile", "absolute"]
THRESHOLD_MODES = ("reference", "quantile", "absolute")


def divergence_threshold(
    ot: Array,
    valid: Array,
    *,
    mode: ThresholdMode,
    reference_ot: Array | None = None,
    reference_valid: Array | None = None,
    quantile: float = 0.5,
    tau: float | None = None,
) -> tuple[Array, Array]:
    """tau for `divergent_mask`; returns (tau, defined). Undefined (no valid sample to take the
    quantile of) gives tau = -inf: without evidence, nothing is suppressed."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if mode == "absolute":
        if tau is None:
            raise ValueError("mode='absolute' needs tau")
        return jnp.asarray(tau, jnp.float32), jnp.asarray(True)
    if mode == "reference":
        if reference_ot is None:
            raise ValueError("mode='reference' needs reference_ot [B, R]")
        if reference_valid is None:
            reference_valid = jnp.ones(reference_ot.shape, bool)
        sample, sample_valid = reference_ot, reference_valid > 0
    else:
        sample, sample_valid = ot, valid > 0
    value, defined = masked_quantile(sample, sample_valid, quantile)
    return jnp.where(defined, value, -jnp.inf), defined


def above_threshold(scores: Array, valid: Array, tau: Array) -> Array:
    """R = {(b, m) valid : D_bm >= tau}: [B, M] x2, [] -> bool [B, M]. The one comparison that
    decides a real divergent state, wherever one is decided."""
    return (valid > 0) & (scores >= tau)


def divergent_mask(
    ot: Array,
    valid: Array,
    *,
    mode: ThresholdMode = "reference",
    reference_ot: Array | None = None,
    reference_valid: Array | None = None,
    quantile: float = 0.5,
    tau: float | None = None,
) -> Array:
    """Real divergent states among the candidates: [B, M] -> bool [B, M], valid & (D >= tau).

    See the module docstring for the three ways tau is set. `reference_valid` [B, R] marks
    padded reference slots (default: all valid).
    """
    threshold, _ = divergence_threshold(
        ot,
        valid,
        mode=mode,
        reference_ot=reference_ot,
        reference_valid=reference_valid,
        quantile=quantile,
        tau=tau,
    )
    return above_threshold(ot, valid, threshold)


def divergent_states(
    scores: Array,
    valid: Array,
    config: Any,
    *,
    reference: Array | None = None,
    reference_valid: Array | None = None,
) -> tuple[Array, Array, Array]:
    """The run's rule: `divergent_mask` with the threshold options of `config` (a TopdConfig:
    threshold_mode, threshold_quantile, tau). Returns (divergent [B, M], tau [], defined []).

    Training (`topd_loss`), the demo's rollout view and the miniature's locator analysis all
    call this, so a state is labelled divergent in exactly one way for a given config.
    """
    tau, defined = divergence_threshold(
        scores,
        valid,
        mode=config.threshold_mode,
        reference_ot=reference,
        reference_valid=reference_valid,
        quantile=config.threshold_quantile,
        tau=config.tau,
    )
    return above_threshold(scores, valid, tau), tau, defined
