"""models.moe: expert parallelism under a mesh equals the one-device grouped MoE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.models import moe
from topd_jax.models.sharding import batch_sharding, make_mesh

B, T, D, E, I, K = 8, 5, 16, 8, 12, 3


def _inputs():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    return (jax.random.normal(k[0], (B, T, D)), jax.random.normal(k[1], (D, E)),
            0.3 * jax.random.normal(k[2], (E, D, I)), 0.3 * jax.random.normal(k[3], (E, D, I)),
            0.3 * jax.random.normal(k[4], (E, I, D)))


def _parallel(*args):
    return moe.expert_parallel(*args, mesh=jax.sharding.get_abstract_mesh(), top_k=K, normalize=True)


@pytest.mark.parametrize("sizes", [dict(fsdp=8), dict(data=2, tensor=2, expert=2), dict(tensor=2, expert=4),
                                   dict(expert=8), dict(tensor=8)], ids=str)
def test_expert_parallel_equals_the_grouped_moe_forward_and_gradient(sizes, monkeypatch):
    """Experts over `expert`, their width over `tensor` (I = 12 does not split 8 ways: replicated),
    each device's tokens routed 4 at a time (EP_CHUNK_TOKENS; its 5 to 40 tokens padded)."""
    monkeypatch.setattr(moe, "EP_CHUNK_TOKENS", 4)
    x, *weights = _inputs()
    want = moe.moe_forward(x, *weights, top_k=K, normalize=True)
    grad = jax.grad(lambda x: jnp.sum(moe.moe_forward(x, *weights, top_k=K, normalize=True) ** 2))(x)
    mesh = make_mesh(**sizes)
    with jax.set_mesh(mesh):
        x_split = jax.device_put(x, batch_sharding(mesh, x.shape))
        got = jax.jit(_parallel)(x_split, *weights)
        got_grad = jax.jit(jax.grad(lambda x: jnp.sum(_parallel(x, *weights) ** 2)))(x_split)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(grad), atol=1e-4, rtol=1e-5)


def test_a_decode_step_moves_activations_not_expert_weights():
    """Under data 1 x tensor 2 x expert 4 the compiled block has no all-gather of an expert weight:
    its collectives are the tokens' all-gather, the reduce-scatter back and the tensor all-reduce."""
    x, *weights = _inputs()
    mesh = make_mesh(tensor=2, expert=4)
    with jax.set_mesh(mesh):
        shardings = [jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert", None, "tensor"))] * 2
        shardings.append(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert", "tensor", None)))
        gate, up, down = (jax.device_put(w, s) for w, s in zip(weights[1:], shardings))
        text = jax.jit(_parallel).lower(x[:, :1], weights[0], gate, up, down).compile().as_text()
    results = [line.split("=")[1].split("all-gather")[0] for line in text.splitlines()
               if " all-gather(" in line or " all-gather-start(" in line]
    assert results and all(r.strip().startswith(f"f32[{B},{D}]") for r in results), results  # the tokens only
