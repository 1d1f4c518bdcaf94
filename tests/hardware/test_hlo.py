"""topd_jax.hardware.hlo: per-chip FLOPs, HBM bytes and collective bytes read from compiled HLO text,
loops counted per iteration; programs compiled for a TPU topology (libtpu, no TPU) and hand-written."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from topd_jax.hardware import hlo

TOPOLOGY = "v5e:2x2"  # 4 chips: the smallest v5e slice libtpu compiles for
# Compile-only executables cannot be read back from the session's persistent compilation cache;
# every test compiles for a TPU slice through libtpu (conftest.tpu_compile_env).
pytestmark = [pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry"),
              pytest.mark.usefixtures("tpu_compile_env")]


def _tpu_devices():
    """The compile-only devices of the TPU slice TOPOLOGY (each call makes new ones)."""
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu").devices)


def test_collective_bytes_of_a_compiled_all_gather():
    devices = _tpu_devices()
    mesh = Mesh(np.array(devices), ("x",))
    gather = jax.jit(lambda x: x * 2, in_shardings=NamedSharding(mesh, PartitionSpec("x")),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
    compiled = gather.lower(jax.ShapeDtypeStruct((1024, 256), jnp.float32)).compile()
    found = hlo.collective_bytes(compiled.as_text())
    assert found["all-gather"] == 1024 * 256 * 4  # the gathered result, on every chip
    assert found["reduce-scatter"] == found["all-reduce"] == found["all-to-all"] == 0


def test_collective_bytes_of_hand_written_hlo():
    text = "\n".join([
        "  %ag = (bf16[128,64]{1,0}, bf16[512,64]{1,0}) all-gather-start(bf16[128,64]{1,0:T(8,128)(2,1)} %p), "
        "channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}",
        "  %agd = bf16[512,64]{1,0} all-gather-done((bf16[128,64]{1,0}, bf16[512,64]{1,0}) %ag)",
        "  %rs = f32[32]{0} reduce-scatter(f32[128]{0} %q), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add",
        "  ROOT %ar = f32[10]{0} all-reduce(f32[10]{0} %r), replica_groups={}, to_apply=%add",
        "  %m = f32[99,99]{1,0} multiply(f32[99,99]{1,0} %a, f32[99,99]{1,0} %b)",
    ])
    assert hlo.collective_bytes(text) == {"all-gather": 512 * 64 * 2, "reduce-scatter": 128 * 4,
                                          "all-reduce": 40, "all-to-all": 0}


def _on(devices, shape, spec=PartitionSpec(), dtype=jnp.bfloat16):
    """An abstract array on `devices` (one topology's: each `_tpu_devices()` call makes new ones)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(Mesh(np.array(devices), ("x",)), spec))


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, hlo.parse(compiled.as_text())


def test_loop_aware_flops_count_a_scan_per_iteration():
    """A scan of n matmuls: n x one matmul's FLOPs, the trip count read from the loop."""
    matmul = 2 * 256**3
    one = _tpu_devices()[:1]

    def figures(n):
        scan = lambda x, w: jax.lax.scan(lambda y, wi: (jnp.tanh(y @ wi), None), x, w)[0]
        compiled, module = _compiled(scan, _on(one, (256, 256)), _on(one, (n, 256, 256)))
        assert [t for _, _, t in module.trip_counts] == [n]
        return hlo.flops(module), compiled.cost_analysis()["flops"], hlo.hbm_bytes(module)

    (f4, xla4, b4), (f16, xla16, b16) = figures(4), figures(16)
    assert f4 == 4 * matmul and f16 == 16 * matmul  # XLA: one matmul (and the tanh) for both
    assert xla4 == xla16 == pytest.approx(matmul, rel=0.02)
    assert b16 / b4 == pytest.approx(4, rel=0.05)  # one layer's slice per iteration, not the whole stack


def test_loop_aware_flops_multiply_nested_scans():
    def nested(x, w):
        inner = lambda wi: lambda u, _: (u @ wi, None)
        return jax.lax.scan(lambda y, wi: (jax.lax.scan(inner(wi), y, None, length=5)[0], None), x, w)[0]

    one = _tpu_devices()[:1]
    compiled, module = _compiled(nested, _on(one, (256, 256)), _on(one, (3, 256, 256)))
    assert sorted(t for _, _, t in module.trip_counts) == [3, 5]
    assert hlo.flops(module) == 15 * 2 * 256**3
    assert compiled.cost_analysis()["flops"] == pytest.approx(2 * 256**3, rel=0.02)


def test_a_loop_without_a_trip_count_counts_once():
    """A data-dependent while loop (as the decode loops) counts once, as in XLA."""
    def loop(x):
        return jax.lax.while_loop(lambda c: (c[0] < 10) & (c[1].sum() < 1e6),
                                  lambda c: (c[0] + 1, jnp.tanh(c[1] @ c[1])), (0, x))[1]

    compiled, module = _compiled(loop, _on(_tpu_devices()[:1], (256, 256)))
    assert [t for _, _, t in module.trip_counts] == [None]
    assert hlo.flops(module) == 2 * 256**3
    assert hlo.flops(module) == pytest.approx(compiled.cost_analysis()["flops"], rel=0.02)


def test_loop_free_figures_agree_with_cost_analysis():
    """Without loops: FLOPs within 1% of XLA's (matmuls, their gradients, batched einsums XLA:TPU
    writes as windowed convolutions, a 4-chip sharded program); HBM bytes equal XLA's on an
    elementwise program and are each operand and result once on a matmul (XLA:TPU also counts
    its tiled emitter's re-reads, so its figure is larger there)."""
    devices = _tpu_devices()
    mlp = lambda x, a, b, c: ((jax.nn.silu(x @ a) * (x @ b)) @ c).astype(jnp.float32).sum()
    shapes = ((512, 1024), (1024, 2048), (1024, 2048), (2048, 1024))
    one = [_on(devices[:1], s) for s in shapes]
    four = [_on(devices, s, PartitionSpec("x")) for s in shapes]
    programs = [(mlp, one), (jax.grad(mlp, argnums=(1, 2, 3)), one), (jax.grad(mlp, argnums=(1, 2, 3)), four),
                (lambda q, k: jnp.einsum("bnth,bnsh->bnts", q, k), [_on(devices[:1], (4, 8, 256, 64))] * 2)]
    for fn, args in programs:
        compiled, module = _compiled(fn, *args)
        assert not module.trip_counts
        assert hlo.flops(module) == pytest.approx(compiled.cost_analysis()["flops"], rel=0.01)
    compiled, module = _compiled(lambda x, y: jnp.tanh(x) * y + 1, *[_on(devices[:1], (1024, 1024))] * 2)
    assert hlo.hbm_bytes(module) == compiled.cost_analysis()["bytes accessed"] == 3 * 1024 * 1024 * 2
    compiled, module = _compiled(lambda x, a: x @ a, _on(devices[:1], (512, 1024)), _on(devices[:1], (1024, 2048)))
    once = (512 * 1024 + 1024 * 2048 + 512 * 2048) * 2  # lhs, rhs and result, bf16
    assert hlo.hbm_bytes(module) == once < compiled.cost_analysis()["bytes accessed"]


def test_collectives_inside_a_scan_count_per_iteration():
    devices = _tpu_devices()

    def reduced(n):
        scan = lambda x, w: jax.lax.scan(lambda y, wi: (y @ wi, None), x, w)[0]
        split = PartitionSpec(None, "x", None)  # each chip a quarter of every layer's rows: an all-reduce per layer
        _, module = _compiled(scan, _on(devices, (64, 256)), _on(devices, (n, 256, 256), split))
        inside = [m for c, i, m in module.instructions() if i.opcode.startswith("all-reduce")]
        assert inside and set(inside) == {n}  # in the loop body: n times per execution
        return hlo.collective_bytes(module)["all-reduce"]

    assert reduced(4) == 4 * 64 * 256 * 2 and reduced(16) == 4 * reduced(4)


def test_splash_attention_kernel_flops():
    """The Mosaic splash kernels XLA does not count: fwd 2, dq 3, dkv 4 units at causal density
    1/2, one unit 2 x prod(q dims) x S per chip."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    devices = _tpu_devices()
    mesh = Mesh(np.array(devices), ("x",))
    b, n, t, h = 8, 4, 512, 128
    sizes = dict.fromkeys(("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                           "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"), 128)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((t, t))] * n), block_sizes=sk.BlockSizes(**sizes),
                                head_shards=1, q_seq_shards=1)
    spec = PartitionSpec("x")
    attention = lambda q, k, v: jax.shard_map(jax.vmap(kernel), mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                                              check_vma=False)(q, k, v)
    qkv = [_on(devices, (b, n, t, h), spec)] * 3
    unit = 2 * (b // len(devices)) * n * t * h * t  # per chip: q [2, 4, 512, 128], S = 512
    with jax.default_matmul_precision("default"):  # the session's "highest" is fp32, which Mosaic refuses
        compiled, module = _compiled(attention, *qkv)
    kernels = [hlo.kernel_name(i) for _, i, _ in module.instructions() if i.opcode == "custom-call"]
    assert any(k.startswith("splash_mha_fwd") for k in kernels)
    assert "flops" not in compiled.cost_analysis() or compiled.cost_analysis()["flops"] < unit / 100
    assert hlo.flops(module) == 2 * unit / 2 and not hlo.uncounted_kernels(module)
    grad = jax.grad(lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    with jax.default_matmul_precision("default"):
        _, module = _compiled(grad, *qkv)
    assert hlo.flops(module) == pytest.approx((2 + 3 + 4) * unit / 2, rel=1e-3)  # fwd (residuals), dq, dkv
    assert not hlo.uncounted_kernels(module)


def test_hand_written_loops_multiply_their_body():
    """A known_trip_count in the backend_config (as XLA:GPU writes it) and a counted loop read from
    its structure: the body's dot and collective count per iteration."""
    body = ["%body (t: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {",
            "  %t = (s32[], f32[8,16]{1,0}) parameter(0)",
            "  %i = s32[] get-tuple-element(%t), index=0",
            "  %x = f32[8,16]{1,0} get-tuple-element(%t), index=1",
            "  %one = s32[] constant(1)",
            "  %next = s32[] add(%i, %one)",
            "  %w = f32[16,16]{1,0} constant({...})",
            "  %y = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
            "  %g = f32[32,16]{1,0} all-gather(%y), replica_groups={{0,1,2,3}}, dimensions={0}",
            "  %z = f32[8,16]{1,0} slice(%g), slice={[0:8], [0:16]}",
            "  ROOT %out = (s32[], f32[8,16]{1,0}) tuple(%next, %z)",
            "}",
            "%cond (c: (s32[], f32[8,16])) -> pred[] {",
            "  %c = (s32[], f32[8,16]{1,0}) parameter(0)",
            "  %ci = s32[] get-tuple-element(%c), index=0",
            "  %n = s32[] constant(12)",
            "  ROOT %lt = pred[] compare(%ci, %n), direction=LT",
            "}"]

    def entry(config=""):
        return body + ["ENTRY %main (a: f32[8,16]) -> f32[8,16] {",
                       "  %a = f32[8,16]{1,0} parameter(0)",
                       "  %zero = s32[] constant(2)",
                       "  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %a)",
                       f"  %loop = (s32[], f32[8,16]{{1,0}}) while(%init), condition=%cond, body=%body{config}",
                       "  ROOT %r = f32[8,16]{1,0} get-tuple-element(%loop), index=1",
                       "}"]

    structural = hlo.parse("\n".join(entry()))
    assert structural.trip_counts == (("loop", "", 10),)  # from 2 while < 12, step 1
    assert hlo.flops(structural) == 10 * 2 * 8 * 16 * 16
    assert hlo.collective_bytes(structural)["all-gather"] == 10 * 32 * 16 * 4
    known = hlo.parse("\n".join(entry(', backend_config={"known_trip_count":{"n":"36"}}')))
    assert known.trip_counts[0][2] == 36 and hlo.flops(known) == 36 * 2 * 8 * 16 * 16


def test_kernel_flops_rule_and_uncounted_kernels():
    q, k = hlo.Array("bf16", (2, 4, 256, 64)), hlo.Array("bf16", (2, 4, 512, 64))
    operands = ((hlo.Array("s8", (1, 4, 4)),), (q,), (k,), (k,))
    unit = 2 * 2 * 4 * 256 * 64 * 512
    assert hlo.kernel_flops("splash_mha_fwd_no_residuals", operands, ()) == 2 * unit / 2
    assert hlo.kernel_flops("splash_mqa_dq_segmented_no_residuals", operands, ()) == 3 * unit / 2
    assert hlo.kernel_flops("splash_mha_dkv_no_residuals", operands, (k, k)) == 4 * unit / 2
    fused = (hlo.Array("bf16", (2, 4, 4, 256, 64)), k, k)  # dq_unreduced [S // bkv, *q.shape], vmapped: dq + dkv
    assert hlo.kernel_flops("splash_mha_dkv_no_residuals", operands, fused) == 7 * unit / 2
    assert hlo.kernel_flops("my_kernel", operands, ()) is None
    text = "\n".join([
        "ENTRY %main (p: bf16[8,128]) -> bf16[8,128] {",
        "  %p = bf16[8,128]{1,0} parameter(0)",
        '  ROOT %k = bf16[8,128]{1,0} custom-call(%p), custom_call_target="tpu_custom_call", '
        'metadata={op_name="jit(f)/my_kernel/pallas_call"}',
        "}"])
    assert hlo.flops(text) == 0 and hlo.uncounted_kernels(text) == {"my_kernel": 1}