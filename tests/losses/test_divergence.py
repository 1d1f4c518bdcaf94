"""divergent_mask and its three threshold modes (TOPD.md section 4)."""

import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.losses import divergence_threshold, divergent_mask

OT = jnp.array([[0.1, 0.5, 0.9], [0.3, 0.7, 0.2]])
VALID = jnp.array([[True, True, True], [True, True, False]])


def test_reference_mode_hand_computed():
    ref = jnp.array([[0.2, 0.4], [0.6, 9.0]])
    ref_valid = jnp.array([[True, True], [True, False]])
    # median of (0.2, 0.4, 0.6) = 0.4; divergent: valid and D >= 0.4.
    got = divergent_mask(OT, VALID, mode="reference", reference_ot=ref, reference_valid=ref_valid)
    np.testing.assert_array_equal(got, [[False, True, True], [False, True, False]])


def test_quantile_mode_hand_computed():
    # valid candidates 0.1, 0.5, 0.9, 0.3, 0.7 -> 0.8-quantile (linear) = 0.74.
    tau, defined = divergence_threshold(OT, VALID, mode="quantile", quantile=0.8)
    np.testing.assert_allclose(tau, 0.74, rtol=1e-6)
    assert bool(defined)
    got = divergent_mask(OT, VALID, mode="quantile", quantile=0.8)
    np.testing.assert_array_equal(got, [[False, False, True], [False, False, False]])


def test_absolute_mode_and_its_errors():
    np.testing.assert_array_equal(divergent_mask(OT, VALID, mode="absolute", tau=0.5), [[False, True, True], [False, True, False]])
    with pytest.raises(ValueError, match="needs tau"):
        divergent_mask(OT, VALID, mode="absolute")
    with pytest.raises(ValueError, match="needs reference_ot"):
        divergent_mask(OT, VALID, mode="reference")
    with pytest.raises(ValueError, match="mode must be one of"):
        divergent_mask(OT, VALID, mode="median")


def test_without_any_reference_nothing_is_suppressed():
    ref = jnp.zeros((2, 2))
    tau, defined = divergence_threshold(OT, VALID, mode="reference", reference_ot=ref, reference_valid=jnp.zeros((2, 2), bool))
    assert not bool(defined) and float(tau) == -np.inf
    got = divergent_mask(OT, VALID, mode="reference", reference_ot=ref, reference_valid=jnp.zeros((2, 2), bool))
    np.testing.assert_array_equal(got, VALID)
