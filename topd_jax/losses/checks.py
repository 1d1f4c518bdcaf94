"""Entry checks of `topd_loss`'s inputs: the named axes of every `TopdInputs` field, their sizes,
and a mask with no valid token (shapes as in `losses.topd`: B, T, M, K, R, k)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # topd.py imports this module
    from topd_jax.losses.topd import TopdInputs

Array = jax.Array

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
    "candidate_labels": "BM",
    "teacher_written": "BT",
}


def warn_without_tokens(mask: Array) -> None:
    """A one-line warning when a concrete mask has no valid token: the loss is then 0 with zero
    gradients, which is defined (padding-only batches are allowed) but rarely meant. Under jit the
    mask is abstract; the metric `rollout_length_mean` reports 0 there."""
    if isinstance(mask, jax.core.Tracer) or bool(jnp.any(jnp.asarray(mask) > 0)):
        return
    warnings.warn(f"TopdInputs.mask {tuple(mask.shape)} has no valid token: the loss is 0 with zero gradients",
                  stacklevel=3)


def check_shapes(inputs: "TopdInputs") -> dict[str, int]:
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
