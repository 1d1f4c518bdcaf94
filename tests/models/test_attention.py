"""Attention backends and the scanned decoder: every path equals the dense reference.

Every backend against dense `attend` (forward and gradient): blockwise, the TPU splash kernel
(Pallas interpret mode on CPU) and the `jax.nn.dot_product_attention` path that runs cuDNN on a
GPU (XLA's implementation on CPU), on causal left-padded prompts, the packed look-ahead tree
(windows at the start, middle and end, past EOS), GQA groupings and block sizes that do not
divide the lengths; blockwise also against a cache. The memory claim at T = 4096; the scanned,
rematerialised decoder against an unrolled loop over its layers on every family.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from topd_jax.models import load_pretrained
from topd_jax.models.attention import (ATTENTION_BACKENDS, ATTENTION_CHOICES, attend, attention, blockwise_attend,
                                       decode_attend)
from topd_jax.models.config import ModelConfig
from topd_jax.models.decoder import REMAT_POLICIES
from topd_jax.models.layers import rope_angles
from topd_jax.models.masks import (causal_mask, causal_visibility, dense_mask, positions_from_padding,
                                   tree_attention_mask, tree_visibility)

TOL = 2e-5


def qkv(b, t, s, n, k, h, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, s, k, h)),
            jax.random.normal(keys[2], (b, s, k, h)))


FUSED = ("splash", "cudnn")  # causal kernel for the sequence queries + blockwise for the windows


def assert_same_forward_and_grad(vis, q, k, v, block, impl="blockwise"):
    mask = dense_mask(vis)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)) * jnp.arange(q.shape[1])[None, :, None, None])

    dense = functools.partial(attend, mask=mask)
    if impl == "blockwise":
        backend = functools.partial(blockwise_attend, vis=vis, block_q=block[0], block_k=block[1])
    else:
        backend = functools.partial(attention, mask=vis, impl=impl, block=block[0])
    np.testing.assert_allclose(backend(q, k, v), dense(q, k, v), atol=TOL, rtol=0)
    for got, want in zip(jax.grad(functools.partial(loss, backend), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(functools.partial(loss, dense), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=10 * TOL, rtol=1e-5)


def test_the_attention_table_is_the_config_choice():
    assert ATTENTION_CHOICES == ("auto", *ATTENTION_BACKENDS)
    assert set(ATTENTION_BACKENDS) == {"dense", "blockwise", "splash", "cudnn"}
    sizes = dict(family="qwen3", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                 num_kv_heads=1, head_dim=4)
    for impl in ATTENTION_CHOICES:  # ModelConfig checks against the table itself
        assert ModelConfig(**sizes, attention=impl).attention == impl
    with pytest.raises(ValueError, match=f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got 'flash'"):
        ModelConfig(**sizes, attention="flash")
    assert set(REMAT_POLICIES) == {"none", "dots", "full"}


@pytest.mark.parametrize("heads, block", [((4, 2), (8, 16)), ((4, 4), (5, 7)), ((6, 1), (64, 64))])
def test_blockwise_equals_dense_on_left_padded_causal_prompts(heads, block):
    # Row 1 is left-padded by 5: its padding queries see no key (the uniform-average rule).
    n, kv = heads
    pad = jnp.arange(37)[None, :] >= jnp.array([[0], [5]])
    q, k, v = qkv(2, 37, 37, n, kv, 8)
    assert_same_forward_and_grad(causal_visibility(pad), q, k, v, block)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("heads", [(4, 2), (6, 1)])
def test_fused_kernels_equal_dense_on_padded_causal_prompts(impl, heads):
    # 150 tokens (not a multiple of the kernel's 128 block); row 1 left-padded by 5, row 2 all
    # padding, row 0 padded after its EOS at 120: every query, padding included, as `attend`.
    n, kv = heads
    pad = jnp.ones((3, 150), bool).at[0, 120:].set(False).at[1, :5].set(False).at[2].set(False)
    q, k, v = qkv(3, 150, 150, n, kv, 8, seed=3)
    assert_same_forward_and_grad(causal_visibility(pad), q, k, v, (128, 128), impl)


def test_cudnn_path_is_exact_for_real_tokens_around_a_padding_gap():
    # cuDNN masks by lengths: a row's real tokens are moved first. Real queries after a gap of
    # padding still read exactly the real keys before them.
    pad = jnp.ones((1, 40), bool).at[0, 10:16].set(False)
    q, k, v = qkv(1, 40, 40, 4, 2, 8, seed=4)
    vis = causal_visibility(pad)
    got, want = attention(q, k, v, vis, impl="cudnn"), attend(q, k, v, dense_mask(vis))
    np.testing.assert_allclose(got[:, pad[0]], want[:, pad[0]], atol=TOL, rtol=0)


def test_blockwise_equals_dense_against_a_cache():
    # 3 new tokens at slots 6..8 of a 12-slot cache whose slots 0-1 are padding and 9-11 empty.
    valid = jnp.zeros((2, 12), bool).at[:, 2:9].set(True)
    vis = causal_visibility(jnp.ones((2, 3), bool), start=6, key_valid=valid)
    expected = (jnp.arange(12)[None, None, :] <= (6 + jnp.arange(3))[None, :, None]) & valid[:, None, :]
    np.testing.assert_array_equal(dense_mask(vis), expected)
    q, k, v = qkv(2, 3, 12, 4, 2, 8, seed=1)
    assert_same_forward_and_grad(vis, q, k, v, (2, 5))


@pytest.mark.parametrize("index", [0, 4, 9, 13])
@pytest.mark.parametrize("static", [True, False])
def test_decode_attend_reads_the_filled_blocks_and_equals_dense(index, static):
    """One query at slot `index` of layer 1 of a stacked 3-layer, 14-slot cache, in key blocks of 4
    (the last one partial, moved back to end at slot 14): equals `attend` on the layer's slots."""
    b, s, n, kv, h = 3, 14, 4, 2, 8
    rng = np.random.default_rng(index)
    keys, values = (jnp.asarray(rng.normal(size=(b, 3, s, kv, h)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(rng.random((b, s)) < 0.7).at[:, index].set(True)  # padding anywhere, own slot real
    q = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.float32)

    def run(at):
        vis = causal_visibility(jnp.ones((b, 1), bool), start=at, key_valid=valid)
        return decode_attend(q, keys, values, 1, vis, block=4), attend(q, keys[:, 1], values[:, 1], dense_mask(vis))

    got, want = run(index) if static else jax.jit(run)(jnp.int32(index))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_blockwise_equals_dense_on_the_packed_lookahead_tree():
    # Windows at the start (t = 0), the middle and the end (t = T), one past EOS (row 1, t = 19
    # with 3 pad columns before it), window padding after a window's EOS.
    t, m, kw = 20, 3, 4
    pad = jnp.ones((2, t), bool).at[1, 17:].set(False)
    branch = jnp.array([[0, 10, 20], [5, 19, 20]])
    wmask = jnp.ones((2, m, kw), bool).at[1, 2, 2:].set(False)
    vis, positions = tree_visibility(branch, kw, pad, wmask)
    tree, tree_positions = tree_attention_mask(branch, kw, t, padding_mask=pad)
    key_ok = jnp.concatenate([jnp.ones((2, t), bool), wmask.reshape(2, m * kw)], axis=1)
    np.testing.assert_array_equal(dense_mask(vis), tree & key_ok[:, None, :])
    np.testing.assert_array_equal(positions, tree_positions)
    q, k, v = qkv(2, t + m * kw, t + m * kw, 4, 2, 8, seed=2)
    assert_same_forward_and_grad(vis, q, k, v, (7, 5))
    for impl in FUSED:  # the sequence by the causal kernel, the windows blockwise
        assert vis.causal_len == t
        assert_same_forward_and_grad(vis, q, k, v, (128, 128), impl)


def test_auto_is_dense_for_small_scores_and_explicit_masks_are_dense_only():
    pad = jnp.ones((1, 6), bool)
    q, k, v = qkv(1, 6, 6, 2, 1, 4)
    np.testing.assert_array_equal(attention(q, k, v, causal_visibility(pad)), attend(q, k, v, causal_mask(1, 6, pad)))
    with pytest.raises(ValueError, match="explicit .* mask is dense only"):
        attention(q, k, v, causal_mask(1, 6, pad), impl="blockwise")
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        attention(q, k, v, causal_visibility(pad), impl="flash")


def test_blockwise_forward_and_backward_needs_an_eighth_of_the_dense_temporaries():
    # The memory claim: causal attention fwd+bwd at T = 4096, compiled temp bytes on CPU.
    b, t, n, kv, h = 1, 4096, 4, 2, 32
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h))]
    pad = jax.ShapeDtypeStruct((b, t), jnp.bool_)

    def temp_bytes(impl):
        def loss(q, k, v, pad):
            return jnp.sum(attention(q, k, v, causal_visibility(pad), impl=impl, block=512))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes, pad).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense, blockwise = temp_bytes("dense"), temp_bytes("blockwise")
    assert blockwise * 8 <= dense, (blockwise, dense)


def unrolled_logits(model, tokens, pad):
    """The pre-scan decoder: a Python loop over the layers (`CausalLM.layer`), dense masks."""
    positions = positions_from_padding(pad)
    cos, sin = rope_angles(positions, model.config)
    mask = causal_mask(*tokens.shape, pad)
    x = jnp.take(model.embed_tokens[...], tokens, axis=0)
    for i in range(model.config.num_layers):
        x, _ = model.layer(i)(x, cos, sin, mask)
    return model.logits(model.norm(x))


@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied_bias", "qwen3_moe", "qwen3_moe_step", "qwen2", "llama3"])
def test_scanned_decoder_equals_the_unrolled_layers_logits_and_gradients(name, hf_checkpoint):
    model = load_pretrained(hf_checkpoint(name)[0], dtype=jnp.float32)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 9), 0, model.config.vocab_size)
    pad = jnp.arange(9)[None, :] >= jnp.array([[0], [3]])
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, forward):
        logits = forward(nnx.merge(graphdef, params))
        return jnp.sum(jnp.where(pad[..., None], jax.nn.log_softmax(logits), 0.0)[..., :7])

    scanned = lambda m: m(tokens, attention_mask=pad)  # noqa: E731
    unrolled = lambda m: unrolled_logits(m, tokens, pad)  # noqa: E731
    np.testing.assert_allclose(scanned(model), unrolled(model), atol=TOL, rtol=0)
    for got, want in zip(jax.tree.leaves(jax.grad(loss)(params, scanned)), jax.tree.leaves(jax.grad(loss)(params, unrolled))):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_rematerialised_layers_give_the_same_gradients(remat, hf_checkpoint):
    path = hf_checkpoint("qwen3")[0]
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 8), 0, 160)

    def grads(**overrides):
        model = load_pretrained(path, dtype=jnp.float32, overrides=overrides)
        graphdef, params = nnx.split(model, nnx.Param)
        return jax.grad(lambda p: jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(tokens))))(params)

    for got, want in zip(jax.tree.leaves(grads(remat=remat)), jax.tree.leaves(grads())):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)  # recomputed, not reused: rounding


def test_blockwise_model_equals_dense_model(hf_checkpoint):
    path = hf_checkpoint("qwen3_moe")[0]
    tokens = jax.random.randint(jax.random.PRNGKey(7), (2, 11), 0, 160)
    pad = jnp.arange(11)[None, :] >= jnp.array([[0], [4]])
    dense = load_pretrained(path, dtype=jnp.float32, overrides={"attention": "dense"})
    blockwise = load_pretrained(path, dtype=jnp.float32, overrides={"attention": "blockwise", "attention_block": 4})
    np.testing.assert_allclose(blockwise(tokens, attention_mask=pad), dense(tokens, attention_mask=pad),
                               atol=TOL, rtol=0)


def test_the_compiled_program_does_not_grow_with_depth():
    # One layer's program, scanned: 2 and 12 layers lower to the same-sized HLO (an unrolled
    # decoder's text grows ~6x), so compile time does not grow with the layer count either.
    from topd_jax.models.config import ModelConfig
    from topd_jax.models.decoder import CausalLM

    def hlo_size(layers):
        cfg = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=layers,
                          num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, remat="full")
        graphdef, params = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        loss = lambda p, t: jnp.sum(nnx.merge(graphdef, p)(t))  # noqa: E731
        return len(jax.jit(jax.grad(loss)).lower(params, tokens).as_text())

    small, deep = hlo_size(2), hlo_size(12)
    assert abs(deep - small) <= 0.05 * small, (small, deep)


def test_splash_under_a_mesh_runs_per_device_in_shard_map():
    # 8 simulated CPU devices, batch over data and heads over tensor: each device's kernel sees
    # its own rows and heads, and the result equals the dense reference.
    from topd_jax.models.sharding import make_mesh

    mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    pad = jnp.ones((2, 130), bool).at[1, :7].set(False)
    q, k, v = qkv(2, 130, 130, 4, 2, 8, seed=6)
    vis = causal_visibility(pad)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: attention(q, k, v, vis, impl="splash", block=128))(q, k, v)
    np.testing.assert_allclose(got, attend(q, k, v, dense_mask(vis)), atol=TOL, rtol=0)


def test_auto_picks_the_platform_kernel_and_splash_compiles_for_a_tpu_topology():
    # The plan's path: a TPU topology's compile-only devices as the context mesh (libtpu, no TPU).
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    from topd_jax.models.attention import auto_backend, target_platform
    from topd_jax.models.sharding import make_mesh

    assert target_platform() == "cpu"
    long_q = jnp.zeros((1, 2048, 4, 8))
    assert auto_backend(long_q, long_q) == "blockwise" and auto_backend(long_q[:, :8], long_q[:, :8]) == "dense"
    devices = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
    mesh = make_mesh(data=2, tensor=2, devices=devices)

    def spec(shape, *axes):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16 if len(shape) == 4 else jnp.bool_,
                                    sharding=NamedSharding(mesh, PartitionSpec(*axes)))

    q, k, pad = spec((2, 2048, 4, 128), "data", None, "tensor"), spec((2, 2048, 2, 128), "data", None, "tensor"), \
        spec((2, 2048), "data")
    chosen = []

    def loss(q, k, v, pad):
        chosen.append((target_platform(), auto_backend(q, k)))
        return jnp.sum(attention(q, k, v, causal_visibility(pad)).astype(jnp.float32))

    # Mosaic refuses float32 contraction precision on bf16 operands: this suite's "highest"
    # matmul precision (conftest) is for the CPU reference checks, not for a TPU kernel.
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, pad).compile()
    assert chosen[0] == ("tpu", "splash")
    assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, not an XLA fallback
