"""Sharded loading and forward on 8 simulated CPU devices equal the single-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import forward, random_tokens
from jax.sharding import PartitionSpec as P

from topd_jax.models import (
    DEFAULT_RULES,
    batch_sharding,
    cache_shardings,
    init_cache,
    load_pretrained,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_model,
)

TOL = 1e-5


def test_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "qwen2", "llama3"])
def test_fsdp2_tensor4_load_and_forward_equal_one_device(name, hf_checkpoint):
    path, _ = hf_checkpoint(name)
    x = jnp.asarray(random_tokens(2, 10, seed=12))
    single = np.asarray(forward(load_pretrained(path, dtype=jnp.float32), x))
    mesh = make_mesh(fsdp=2, tensor=4)
    model = load_pretrained(path, dtype=jnp.float32, mesh=mesh)
    q = model.layers[0].layer.self_attn.q_proj[...]  # stacked over the scanned layers: [L, D, N, H]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)  # layers unsharded, embed on fsdp, heads on tensor
    assert q.addressable_shards[0].data.shape == (q.shape[0], 32, 1, q.shape[3])
    k = model.layers[0].layer.self_attn.k_proj[...]
    assert k.sharding.spec == P(None, "fsdp", None, None)  # 2 kv heads do not split over tensor=4: replicated
    assert model.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    out = forward(model, jax.device_put(x, batch_sharding(mesh, x.shape)))
    assert out.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(np.asarray(out), single, atol=TOL, rtol=0)


def test_experts_split_over_an_expert_axis(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3_moe")
    x = jnp.asarray(random_tokens(2, 9, seed=13))
    single = np.asarray(forward(load_pretrained(path, dtype=jnp.float32), x))
    mesh = make_mesh(fsdp=2, tensor=2, expert=2)
    model = load_pretrained(path, dtype=jnp.float32, mesh=mesh)
    gate = model.layers[0].layer.mlp.gate_proj[...]  # [L, E=4, D, I]
    assert gate.sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (gate.shape[0], 2, 32, 16)
    np.testing.assert_allclose(np.asarray(forward(model, x)), single, atol=TOL, rtol=0)


def test_sharded_gradients_equal_one_device(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3_tied_bias")
    x = jnp.asarray(random_tokens(2, 8, seed=14))

    @nnx.jit
    def grads(model, x):
        def loss(model):
            logp = jax.nn.log_softmax(model(x[:, :-1]))
            return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))
        return nnx.grad(loss)(model)

    ref = grads(load_pretrained(path, dtype=jnp.float32), x)
    mesh = make_mesh(fsdp=2, tensor=4)
    out = grads(load_pretrained(path, dtype=jnp.float32, mesh=mesh), jax.device_put(x, batch_sharding(mesh, x.shape)))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)


def test_shard_model_places_an_in_memory_model_like_load(hf_checkpoint):
    path, _ = hf_checkpoint("llama3")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    loaded = load_pretrained(path, dtype=jnp.float32, mesh=mesh)
    moved = shard_model(load_pretrained(path, dtype=jnp.float32), mesh)
    want = param_shardings(loaded, mesh)
    got = jax.tree.map(lambda v: v.get_value().sharding, nnx.state(moved, nnx.Param),
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
    specs = [(a.spec, b.spec) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
    assert all(a == b for a, b in specs)
    assert P("fsdp", "tensor") in [a for a, _ in specs]  # the MLP really is split


def test_sharded_cache_decoding_equals_the_full_forward(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3")
    x = jnp.asarray(random_tokens(2, 8, seed=15))
    full = np.asarray(forward(load_pretrained(path, dtype=jnp.float32), x))
    mesh = make_mesh(fsdp=2, tensor=4)
    model = load_pretrained(path, dtype=jnp.float32, mesh=mesh)
    cache = init_cache(model.config, 2, 8, jnp.float32)
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    logits, cache = forward(model, x[:, :5], cache=cache)
    steps = [np.asarray(logits)]
    for t in range(5, 8):
        logits, cache = forward(model, x[:, t:t + 1], cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=TOL, rtol=0)


def test_rules_replicate_what_does_not_divide_and_use_each_mesh_axis_once():
    mesh = make_mesh(fsdp=2, tensor=4)
    assert logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (63, 90), mesh) == P(None, None)
    assert logical_to_spec(("batch", None), (6, 3), mesh) == P("fsdp", None)  # data/expert have size 1
    assert logical_to_spec(("mlp", "vocab"), (8, 8), mesh) == P("tensor", None)  # tensor already used
    assert logical_to_spec(("embed",), (8,), mesh, rules={"embed": ("fsdp", "tensor")}) == P(("fsdp", "tensor"))
    assert logical_to_spec(("embed",), (4,), mesh, rules={"embed": ("fsdp", "tensor")}) == P("fsdp")
    with pytest.raises(ValueError, match="logical axis 'nope' has no sharding rule"):
        logical_to_spec(("nope",), (4,), mesh)
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        logical_to_spec(("embed",), (4,), mesh, rules={"embed": "model"})
    with pytest.raises(ValueError, match="needs 6 devices, 8 given"):
        make_mesh(fsdp=2, tensor=3)


def test_every_parameter_names_known_logical_axes(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("qwen3_moe")[0], dtype=jnp.float32)
    known = {name for name, _ in DEFAULT_RULES}
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(flat) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for path, var in flat:
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.ndim and set(axes) <= known, (path, axes)
