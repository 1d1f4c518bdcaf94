"""topd_jax.plan: the trainer's phases compiled for a TPU topology (libtpu, no TPU) and locally."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from topd_jax.plan import chips, hlo, measure, report
from topd_jax.plan.cli import main
from topd_jax.trainer.config import load_config
from topd_jax.trainer.flops import PhaseTimer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
TOPOLOGY = "v5e:2x2"  # 4 chips: the smallest v5e slice libtpu compiles for
# Compile-only executables cannot be read back from the session's persistent compilation cache.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")


@pytest.fixture(autouse=True)
def _libtpu_env(monkeypatch):
    # What chips.compile_only_env would set, scoped to the test (other tests read TPU_WORKER_HOSTNAMES).
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _tpu_devices(name=TOPOLOGY):
    devices, chip = chips.topology_devices(name)
    return devices, chip


def test_plan_tiny_config_on_a_tpu_topology(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--config", TINY, "--topology", TOPOLOGY, "--json", str(out), f"output_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "| sample" in printed and "| train" in printed and "roofline s (est.)" in printed
    plan = json.loads(out.read_text())
    assert plan["topology"] == TOPOLOGY and plan["chip"] == "v5e" and plan["hbm_gib"] == 16
    assert plan["devices"] == 4 and plan["mesh"]["data"] == 4 and plan["fits"]
    assert [p["phase"] for p in plan["phases"]] == ["sample", "score", "branch", "train"]
    for p in plan["phases"]:
        assert p["error"] is None and p["compile_s"] > 0 and p["tflop"] > 0 and p["args_gib"] > 0
        assert p["peak_gib"] == pytest.approx(p["args_gib"] + p["out_gib"] - p["alias_gib"] + p["temp_gib"]
                                              + p["held_gib"])
        assert p["roofline_s"] > 0
    sample, branch = plan["phases"][0], plan["phases"][2]
    assert [(d["model"], d["steps"]) for d in sample["decode_steps"]] == [("student", 24)]
    assert [(d["model"], d["steps"]) for d in branch["decode_steps"]] == [("teacher", 8), ("student", 8)]
    # The loops' full step counts are added to the once-counted body.
    assert sample["with_loops"]["tflop"] > sample["tflop"]
    # The scanned layers (2 per model) count per iteration; XLA counts the loop body once.
    score, train = plan["phases"][1], plan["phases"][3]
    assert 2 in score["loop_trip_counts"] and 2 in train["loop_trip_counts"]
    assert score["tflop"] > score["xla_tflop"] > 0 and train["tflop"] > train["xla_tflop"] > 0
    assert None in sample["loop_trip_counts"] and not any(p["uncounted_kernels"] for p in plan["phases"])
    # The update alone (the other phases only lowered) compiles to the same program.
    only = tmp_path / "train.json"
    assert main(["--config", TINY, "--topology", TOPOLOGY, "--phases", "train", "--json", str(only)]) == 0
    (alone,) = json.loads(only.read_text())["phases"]
    keys = ("phase", "args_gib", "out_gib", "alias_gib", "temp_gib", "tflop")
    assert {k: alone[k] for k in keys} == {k: plan["phases"][3][k] for k in keys}


def test_plan_tiny_config_on_local_devices(capsys):
    assert main(["--config", TINY, "--topology", "local", "--no-decode-steps"]) == 0
    printed = capsys.readouterr().out
    assert f"{jax.device_count()} devices" in printed and "chip: unknown" in printed


def test_plan_measures_the_trainers_update(tmp_path):
    """The plan's update figures are the memory analysis of the update the Trainer compiles."""
    from topd_jax.trainer.loop import Trainer

    config = load_config(TINY, [f"output_dir={tmp_path}", "logging.tensorboard=false", "logging.progress=false"])
    trainer = Trainer(config)
    try:
        trainer.train_step(PhaseTimer())
        expected = trainer._update.memory_analysis()
    finally:
        trainer.close()
    train = measure.plan_step(config, jax.devices(), decode_steps=False).phases[-1]
    assert train.phase == "train" and train.error is None
    assert (train.args, train.out, train.alias, train.temp) == (
        expected.argument_size_in_bytes, expected.output_size_in_bytes, expected.alias_size_in_bytes,
        expected.temp_size_in_bytes)


def test_too_large_a_batch_exits_1_naming_the_phase(tmp_path, capsys):
    code = main(["--config", TINY, "--topology", TOPOLOGY, "--no-decode-steps", "--json", str(tmp_path / "p.json"),
                 "rollout.prompts_per_step=4194304"])
    assert code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("does not fit: ")]
    assert lines and all(line.split(": ")[1] in measure.PHASES for line in lines)
    assert not json.loads((tmp_path / "p.json").read_text())["fits"]


@pytest.mark.parametrize("topology", ["v9:2x2", "v5p", "v5p:4x4x", "tpu"])
def test_unknown_topology_is_a_one_line_error(topology, capsys):
    assert main(["--config", TINY, "--topology", topology]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "known chips: v4, v5e, v5p, v6e" in err


def test_a_topology_libtpu_refuses_is_a_one_line_error(capsys):
    assert main(["--config", TINY, "--topology", "v5e:1x1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: topology 'v5e:1x1': ")


def test_a_model_directory_with_only_config_json(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "tie_word_embeddings": True, "rope_theta": 10000.0}))
    out = tmp_path / "plan.json"
    assert main(["--config", TINY, "--topology", TOPOLOGY, "--no-decode-steps", "--json", str(out),
                 f"student.path={model}", "--student-layers", "2"]) == 0
    assert os.listdir(model) == ["config.json"]
    plan = json.loads(out.read_text())
    assert plan["layers"]["student"] == [2, 3] and all(p["error"] is None for p in plan["phases"])
    assert "LAYERS CUT: student 2 of 3" in capsys.readouterr().out


def test_collective_bytes_of_a_compiled_all_gather():
    devices, _ = _tpu_devices()
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


def test_tpu_cost_analysis_counts_a_loop_body_once():
    """Why the plan compiles one decode step alone: the loop's trip count is not in its FLOPs."""
    devices, _ = _tpu_devices()
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(Mesh(np.array(devices[:1]), ("x",)),
                                                                             PartitionSpec()))

    def flops(n):
        loop = jax.jit(lambda a: jax.lax.fori_loop(0, n, lambda i, y: y @ a, a))
        return loop.lower(x).compile().cost_analysis()["flops"]

    assert flops(4) == flops(16) < 2 * 2 * 256**3


def _on(devices, shape, spec=PartitionSpec(), dtype=jnp.bfloat16):
    """An abstract array on `devices` (one topology's: each `_tpu_devices()` call makes new ones)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(Mesh(np.array(devices), ("x",)), spec))


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, hlo.parse(compiled.as_text())


def test_loop_aware_flops_count_a_scan_per_iteration():
    """A scan of n matmuls: n x one matmul's FLOPs, the trip count read from the loop."""
    matmul = 2 * 256**3
    one = _tpu_devices()[0][:1]

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

    one = _tpu_devices()[0][:1]
    compiled, module = _compiled(nested, _on(one, (256, 256)), _on(one, (3, 256, 256)))
    assert sorted(t for _, _, t in module.trip_counts) == [3, 5]
    assert hlo.flops(module) == 15 * 2 * 256**3
    assert compiled.cost_analysis()["flops"] == pytest.approx(2 * 256**3, rel=0.02)


def test_a_loop_without_a_trip_count_counts_once():
    """A data-dependent while loop (as the decode loops) counts once, as in XLA."""
    def loop(x):
        return jax.lax.while_loop(lambda c: (c[0] < 10) & (c[1].sum() < 1e6),
                                  lambda c: (c[0] + 1, jnp.tanh(c[1] @ c[1])), (0, x))[1]

    compiled, module = _compiled(loop, _on(_tpu_devices()[0][:1], (256, 256)))
    assert [t for _, _, t in module.trip_counts] == [None]
    assert hlo.flops(module) == 2 * 256**3
    assert hlo.flops(module) == pytest.approx(compiled.cost_analysis()["flops"], rel=0.02)


def test_loop_free_figures_agree_with_cost_analysis():
    """Without loops: FLOPs within 1% of XLA's (matmuls, their gradients, batched einsums XLA:TPU
    writes as windowed convolutions, a 4-chip sharded program); HBM bytes equal XLA's on an
    elementwise program and are each operand and result once on a matmul (XLA:TPU also counts
    its tiled emitter's re-reads, so its figure is larger there)."""
    devices, _ = _tpu_devices()
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
    devices, _ = _tpu_devices()

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

    devices, _ = _tpu_devices()
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


def test_chip_table_and_device_kinds():
    assert {c.name for c in chips.CHIPS.values()} == {"v4", "v5e", "v5p", "v6e"}
    kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e", "cpu": None}
    for kind, name in kinds.items():
        chip = chips.chip_of_device(type("D", (), {"device_kind": kind})())
        assert (chip and chip.name) == name
    assert chips.parse_topology("v5p:4x4x2") == (chips.CHIPS["v5p"], (4, 4, 2))
    assert chips.CHIPS["v4"].per_device(2).hbm_bytes == 16 * chips.GIB


def test_oom_message_and_roofline():
    assert measure.oom_used_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 120.50G of "
                                  "95.74G hbm. Exceeded hbm capacity by 24.8G.") == 120.5 * 2**30
    assert measure.oom_used_bytes("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                                  "temporaries (205.95G) exceeds available HBM (95.74G).") == 205.95 * 2**30
    assert measure.oom_used_bytes("INTERNAL: something else") is None
    chip = chips.CHIPS["v5p"]
    step = measure.DecodeStep("student", 10, flops=1e12, hbm_bytes=1e9, collectives={"all-gather": 0.0},
                              compile_s=1.0)
    phase = measure.PhaseFigures("sample", flops=2e12, hbm_bytes=1e12, decode=(step,))
    assert report.loop_totals(phase) == (2e12 + 9e12, 1e12 + 9e9, 0.0)
    assert report.roofline_seconds(phase, chip) == pytest.approx(max(11e12 / 459e12, 1.009e12 / 2765e9))
    assert report.roofline_seconds(phase, None) is None


def test_table_shows_loops_xla_flops_and_uncounted_kernels():
    step = measure.DecodeStep("student", 10, flops=1e12, hbm_bytes=1e9, collectives={"all-gather": 0.0},
                              compile_s=1.0, uncounted={"my_kernel": 2})
    phase = measure.PhaseFigures("sample", flops=36e12, xla_flops=1e12, loops=(36, None), decode=(step,),
                                 uncounted={"my_kernel": 2})
    plan = measure.StepPlan((phase,), {"data": 4}, 4, (36, 36), (48, 48))
    text = report.format_table(plan, chips.CHIPS["v5p"], "v5p:2x2x1", 0.9)
    assert "XLA TFLOP" in text and "| 36.0 " in text and "| 1.00 " in text
    assert "sample loops: trip counts 36; 1 without a trip count (counted once)" in text
    assert "FLOPs NOT COUNTED" in text and "my_kernel x 20" in text  # 2 in the phase + 2 x 9 more steps
    (row,) = report.to_json(plan, chips.CHIPS["v5p"], "v5p:2x2x1", 0.9)["phases"]
    assert row["tflop"] == 36 and row["xla_tflop"] == 1 and row["loop_trip_counts"] == [36, None]
