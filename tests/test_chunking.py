"""chunked_rows: the row-chunked, rematerialised map behind reverse_kl and scoring."""

import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.chunking import chunked_rows


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
