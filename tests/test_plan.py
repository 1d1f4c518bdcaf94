"""topd_jax.plan: the trainer's phases compiled for a TPU topology (libtpu, no TPU) and locally."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from topd_jax.hardware.chips import CHIPS
from topd_jax.plan import measure, report, steps, topology
from topd_jax.plan.cli import main
from topd_jax.trainer.config import load_config
from topd_jax.trainer.flops import PhaseTimer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
TOPOLOGY = "v5e:2x2"  # 4 chips: the smallest v5e slice libtpu compiles for
# Compile-only executables cannot be read back from the session's persistent compilation cache;
# every test compiles for a TPU slice through libtpu (conftest.tpu_compile_env).
pytestmark = [pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry"),
              pytest.mark.usefixtures("tpu_compile_env")]


def _tpu_devices(name=TOPOLOGY):
    devices, chip = topology.topology_devices(name)
    return devices, chip


def test_plan_tiny_config_on_a_tpu_topology(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--config", TINY, "--topology", TOPOLOGY, "--json", str(out), f"output_dir={tmp_path}",
                 "rollout.mode=static"]) == 0
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
    # The bound beside the estimate: every phase has one, below its estimate; the step sums both.
    assert "bound s" in printed and "| step" in printed and "decode tokens/s per device" in printed
    for p in plan["phases"]:
        assert 0 < p["bound_s"] <= p["roofline_s"], p["phase"]
    assert plan["step"]["bound_s"] == pytest.approx(sum(p["bound_s"] for p in plan["phases"]))
    assert plan["step"]["roofline_s"] == pytest.approx(sum(p["roofline_s"] for p in plan["phases"]))
    assert sample["decode_tokens_per_device"] == 8 * 24 / 4  # 8 rollouts x 24 tokens over 4 chips
    # --lengths max (the default), rollout.mode static: the sample row is its loop run to the cap.
    static, chip = plan["sampling"]["modes"]["static"], plan["chip_figures"]
    assert plan["step"]["rollout_mode"] == "static" and plan["sampling"]["lengths"] == "max"
    assert static["decode_steps"] == 24 and static["roofline_s"] == pytest.approx(sample["roofline_s"])
    loops = sample["with_loops"]
    assert sample["roofline_s"] == pytest.approx(max(loops["tflop"] * 1e12 / chip["peak_flops"], loops["hbm_bytes"]
                                                     / chip["hbm_bandwidth"], loops["collective_bytes"] / chip["ici_bandwidth"]))
    assert all(d["weight_bytes"] > 0 and d["cache_bytes"] > 0 for d in sample["decode_steps"] + branch["decode_steps"])
    # The inference layout: auto, tensor 2 over the models' 2 kv heads, data over the rest.
    assert plan["inference_mesh"] == {"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}
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


def test_tpu_cost_analysis_counts_a_loop_body_once():
    """Why the plan compiles one decode step alone: the loop's trip count is not in its FLOPs."""
    devices, _ = _tpu_devices()
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(Mesh(np.array(devices[:1]), ("x",)),
                                                                             PartitionSpec()))

    def flops(n):
        loop = jax.jit(lambda a: jax.lax.fori_loop(0, n, lambda i, y: y @ a, a))
        return loop.lower(x).compile().cost_analysis()["flops"]

    assert flops(4) == flops(16) < 2 * 2 * 256**3


def test_topologies_name_the_tpu_chips_with_all_their_figures(monkeypatch):
    assert set(topology.TOPOLOGY_CHIPS) == {"v4", "v5e", "v5p", "v6e"}
    assert topology.parse_topology("v5p:4x4x2") == (CHIPS["v5p"], (4, 4, 2))
    with pytest.raises(ValueError, match="known chips: v4, v5e, v5p, v6e"):
        topology.parse_topology("v3:2x2")  # in the chip table for its peak FLOP/s only
    # `local`: the chip where the plan's figures are all known; a chip with a peak only is unknown.
    for kind, name in {"TPU v5 lite": "v5e", "NVIDIA H100 80GB HBM3": None, "cpu": None}.items():
        monkeypatch.setattr(jax, "devices", lambda: [type("D", (), {"device_kind": kind})()])
        _, chip = topology.topology_devices("local")
        assert (chip and chip.name) == name


def test_oom_message_and_roofline():
    assert measure.oom_used_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 120.50G of "
                                  "95.74G hbm. Exceeded hbm capacity by 24.8G.") == 120.5 * 2**30
    assert measure.oom_used_bytes("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                                  "temporaries (205.95G) exceeds available HBM (95.74G).") == 205.95 * 2**30
    assert measure.oom_used_bytes("INTERNAL: something else") is None
    chip = CHIPS["v5p"]
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
    text = report.format_table(plan, CHIPS["v5p"], "v5p:2x2x1", 0.9)
    assert "XLA TFLOP" in text and "| 36.0 " in text and "| 1.00 " in text
    assert "sample loops: trip counts 36; 1 without a trip count (counted once)" in text
    assert "FLOPs NOT COUNTED" in text and "my_kernel x 20" in text  # 2 in the phase + 2 x 9 more steps
    (row,) = report.to_json(plan, CHIPS["v5p"], "v5p:2x2x1", 0.9)["phases"]
    assert row["tflop"] == 36 and row["xla_tflop"] == 1 and row["loop_trip_counts"] == [36, None]


def test_a_decode_step_reads_about_its_weights_and_filled_cache_once():
    """One sampling step compiled for a TPU topology (as the plan compiles it: the cache donated,
    in the compiler's layout, filled to its middle) moves its weights' and its filled KV cache's
    shares about once, with no whole-cache copy: HBM bytes within 1.5 x that sum, temporaries
    below one cache. Before the cache was written in place it read 4.4 x."""
    from flax import nnx

    from topd_jax.hardware import hlo
    from topd_jax.models import CausalLM, ModelConfig
    from topd_jax.models.decoder import init_cache
    from topd_jax.models.sharding import batch_sharding, make_mesh
    from topd_jax.trainer import placement

    devices, _ = _tpu_devices()
    mesh = make_mesh(data=4, devices=devices)
    cfg = ModelConfig(family="qwen3", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=8,
                      num_heads=4, num_kv_heads=2, head_dim=128)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
                                 nnx.Param)
    params = measure.with_shardings(params, placement.tree_shardings(params, mesh))
    cache = jax.eval_shape(lambda: init_cache(cfg, 8, 2048, jnp.bfloat16))
    keys, values, valid = (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, x.shape))
                           for x in (cache.keys, cache.values, cache.valid))
    rows = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch_sharding(mesh, (8,)))
    alive = jax.ShapeDtypeStruct((8,), jnp.bool_, sharding=batch_sharding(mesh, (8,)))
    index = 1023
    with jax.set_mesh(mesh):
        compiled = steps.lower_step(functools.partial(steps.generate_step, index=index), graphdef, params, rows,
                                    alive, keys, values, valid, carried=(3, 4)).compile()
    cache_share = measure.per_device_bytes((keys, values))
    must = measure.per_device_bytes(params) + cache_share * (index + 1) / 2048
    read = hlo.hbm_bytes(hlo.parse(compiled.as_text()))
    assert read < 1.5 * must, (read, must)
    assert compiled.memory_analysis().temp_size_in_bytes < cache_share


def test_bound_counts_the_matmuls_and_the_decode_reads_by_hand():
    """`plan.bound` on a 2-layer model: the forward FLOPs of the formula written out, and a sampling
    bound = the prefill (its FLOPs or one read of the weights) + N x (weights + KV share at the mean
    filled length, or the step's FLOPs)."""
    from topd_jax.models import ModelConfig
    from topd_jax.plan import bound

    cfg = ModelConfig(family="qwen3", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=4)
    per_layer = 2 * (8 * (4 + 2 * 2) * 4 + 4 * 4 * 8) + 6 * 8 * 16 + 4 * 4 * 4 * 10.0  # context 10
    assert bound.forward_flops(cfg, tokens=3, context=10, scored=2) == pytest.approx(3 * 2 * per_layer + 2 * 2 * 8 * 100)
    chip = CHIPS["v5p"]
    sample = bound.sample_bound(cfg, rows=8, prompt=6, new=10, devices=4, weight_bytes=1e6, slot_bytes=2e3)
    prefill = max(bound.forward_flops(cfg, 8 * 6, 3, 8) / 4 / chip.peak_flops, 1e6 / chip.hbm_bandwidth)
    step = max(bound.forward_flops(cfg, 8, 11, 8) / 4 / chip.peak_flops, (1e6 + 2e3 * 11) / chip.hbm_bandwidth)
    assert sample.seconds(chip) == pytest.approx(prefill + 10 * step)
    assert sample.decode_tokens == 8 * 10 / 4


def test_inference_meshes_lay_out_on_a_torus_jax_cannot_split_by_whole_axes(monkeypatch):
    """tensor 4 x expert 16 on v6e:8x8 (the auto layout of the paper's pair there): jax.make_mesh
    refuses it along whole physical axes; make_mesh splits them instead."""
    from topd_jax.models.sharding import make_mesh

    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v6e-64")
    devices, _ = _tpu_devices("v6e:8x8")
    mesh = make_mesh(tensor=4, expert=16, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 4, "expert": 16}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_plan_compiles_relays_splice_phase_and_trains_on_the_spliced_rollout(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--config", TINY, "--topology", TOPOLOGY, "--json", str(out), f"output_dir={tmp_path}",
                 "loss.guidance=relay", "loss.suppress_weight=1.0", "loss.guidance_options.loss=fkl",
                 "loss.guidance_options.fkl_top_k=4", "--phases", "branch,train"]) == 0
    plan = json.loads(out.read_text())
    branch, train = (p for p in plan["phases"] if p["phase"] in ("branch", "train"))
    assert branch["error"] is None and train["error"] is None and branch["tflop"] > 0
    assert not branch["decode_steps"]  # the splice phase's loops have no separate step model
