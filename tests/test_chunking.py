"""chunked_rows: the row-chunked, rematerialised map behind reverse_kl and scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.chunking import chunked_rows, row_shards
from topd_jax.models.sharding import batch_sharding, make_mesh


def test_chunked_rows_maps_pytrees_and_pads_the_last_chunk():
    x = jnp.arange(10.0).reshape(5, 2)
    out = chunked_rows(lambda a: (a.sum(-1), a * 2), x, chunk_size=3)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(x.sum(-1)))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(x * 2))


def test_empty_rows_and_bad_chunk_sizes():
    out = chunked_rows(lambda a: a * 2, jnp.zeros((0, 3)), chunk_size=4)
    assert out.shape == (0, 3)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_rows(lambda a: a, jnp.ones((2, 1)), chunk_size=0)
    with pytest.raises(ValueError, match="one row count"):
        chunked_rows(lambda a, b: a, jnp.ones((2, 1)), jnp.ones((3, 1)), chunk_size=1)


def _head_loss(w, h, ids, chunk_size):
    """A scoring-shaped chunked function: log-softmax of h @ w gathered at ids, summed."""
    def per_chunk(rows, i):
        logits = rows @ w
        return jnp.take_along_axis(logits, i, axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
    return chunked_rows(per_chunk, h, ids, chunk_size=chunk_size)


def test_per_device_chunks_equal_the_global_chunking_forward_and_gradient():
    """Under a mesh splitting the rows 4 ways each device maps over its own rows; values and
    gradients equal the unsharded chunking (float32, exact up to summation order: 1e-6)."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(4 * 10, 8)), jnp.float32)  # 10 rows per device: 2 chunks of 6, padded
    w = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 32, size=(40, 1)), jnp.int32)
    value = lambda w, h: jnp.sum(_head_loss(w, h, ids, 6) ** 2)
    ref, ref_grads = _head_loss(w, h, ids, 6), jax.grad(value, argnums=(0, 1))(w, h)
    mesh = make_mesh(data=4, tensor=2)
    with jax.set_mesh(mesh):
        assert row_shards(40) == 4
        rows = jax.device_put(h, batch_sharding(mesh, h.shape))
        out = jax.jit(lambda w, h: _head_loss(w, h, ids, 6))(w, rows)
        grads = jax.jit(jax.grad(value, argnums=(0, 1)))(w, rows)
        jaxpr = str(jax.make_jaxpr(lambda w, h: _head_loss(w, h, ids, 6))(w, rows))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert "f32[24,8]" in jaxpr  # one iteration: 6 rows of each of the 4 devices
