"""TrainConfig: the YAML configs, dotted overrides, one-line errors, optimizer, mesh and runtime."""

import dataclasses
import math
import pathlib
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from topd_jax.configuration import ConfigError, describe_keys
from topd_jax.losses import TopdConfig
from topd_jax.models.attention import ATTENTION_CHOICES
from topd_jax.models.decoder import CausalLM
from topd_jax.trainer import runtime
from topd_jax.trainer.config import (ComputeConfig, DistributedConfig, MeshConfig, OptimizerConfig, RandomModelConfig,
                                     TrainConfig, load_config, save_config)

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
PAPER = ROOT / "configs" / "paper_qwen3_30b_a3b_to_4b.yaml"


def error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- the shipped configs


def test_tiny_cpu_config_loads_with_matching_vocabularies():
    config = load_config(TINY)
    student, teacher = config.student.random, config.teacher.random
    assert config.student.path is None and config.teacher.path is None
    assert student.vocab_size == teacher.vocab_size == 128
    assert (student.hidden_size, teacher.hidden_size, student.num_layers, teacher.num_layers) == (32, 64, 2, 2)
    assert (config.steps, config.output_dir) == (20, "runs/tiny_cpu")
    assert (config.rollout.prompts_per_step, config.rollout.max_new_tokens, config.data.prompt_length) == (8, 24, 8)
    loss = config.loss
    assert (loss.window, loss.max_candidates, loss.num_reference) == (8, 4, 2)
    assert config.optimizer.learning_rate == 1e-3 and config.checkpoint.every == 10 and config.checkpoint.keep == 2
    assert config.distributed.initialize == "off"
    assert config.mesh.resolve(8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}


def test_paper_config_loads_with_the_paper_models_and_default_loss():
    config = load_config(PAPER)
    assert config.teacher.path.endswith("Qwen3-30B-A3B-Instruct-2507")
    assert config.student.path.endswith("Qwen3-4B-Instruct-2507")
    assert config.student.dtype == config.teacher.dtype == "bfloat16"
    assert config.data.source == "jsonl" and config.data.path
    assert config.loss == TopdConfig()  # window 50, max_candidates 8
    assert (config.optimizer.learning_rate, config.optimizer.schedule) == (1e-6, "cosine")
    assert config.mesh.resolve(8) == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    assert (config.checkpoint.every, config.checkpoint.keep) == (50, 3)


@pytest.mark.parametrize("path", [TINY, PAPER])
def test_yaml_configs_spell_every_value_with_its_type(path):
    # Plain yaml.safe_load (not only load_config's loader) reads the same config.
    assert TrainConfig.from_dict(yaml.safe_load(path.read_text(encoding="utf-8"))) == load_config(path)


def test_no_file_gives_the_defaults_with_a_larger_teacher_of_the_same_vocabulary():
    config = load_config(None)
    assert config == TrainConfig()
    assert config.teacher.random.vocab_size == config.student.random.vocab_size
    assert config.teacher.random.model_config().num_params() > config.student.random.model_config().num_params()


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize("override, get, expected", [
    ("output_dir=/tmp/x", lambda c: c.output_dir, "/tmp/x"),
    ("steps=2", lambda c: c.steps, 2),
    ("preset=opd", lambda c: c.loss, TopdConfig.preset("opd", window=8, max_candidates=4, num_reference=2)),
    ("seed=3", lambda c: c.seed, 3),
    ("chunk_size=64", lambda c: c.chunk_size, 64),
    ("rollout.max_new_tokens=16", lambda c: c.rollout.max_new_tokens, 16),
    ("rollout.eos_ids=[1, 2]", lambda c: c.rollout.eos_ids, (1, 2)),
    ("rollout.temperature=0", lambda c: c.rollout.temperature, 0.0),
    ("loss.window=5", lambda c: c.loss.window, 5),
    ("loss.guidance_options.step_loss=topk_fkl", lambda c: c.loss.option("step_loss"), "topk_fkl"),
    ("student.path=/models/s", lambda c: c.student.path, "/models/s"),
    ("student.random.hidden_size=16", lambda c: c.student.random.hidden_size, 16),
    ("teacher.dtype=bfloat16", lambda c: c.teacher.dtype, "bfloat16"),
    ("data.prompt_length=4", lambda c: c.data.prompt_length, 4),
    ("optimizer.learning_rate=3e-4", lambda c: c.optimizer.learning_rate, 3e-4),
    ("optimizer.max_grad_norm=null", lambda c: c.optimizer.max_grad_norm, None),
    ("mesh.fsdp=-1", lambda c: (c.mesh.data, c.mesh.fsdp), (-1, -1)),
    ("distributed.initialize=on", lambda c: c.distributed.initialize, "on"),
    ("checkpoint.async_save=false", lambda c: c.checkpoint.async_save, False),
    ("logging.peak_flops=1.5e12", lambda c: c.logging.peak_flops, 1.5e12),
])
def test_dotted_override_sets_the_key_on_top_of_the_file(override, get, expected):
    if override == "mesh.fsdp=-1":  # two -1 sizes: only valid after data is pinned
        config = load_config(TINY, ["mesh.data=2", override])
        expected = (2, -1)
    else:
        config = load_config(TINY, [override])
    assert get(config) == expected


def test_override_into_a_section_the_file_does_not_have():
    config = load_config(PAPER, ["student.random.vocab_size=64", "student.path=null"])
    assert config.student.path is None and config.student.random.vocab_size == 64


def test_later_overrides_win():
    assert load_config(None, ["steps=2", "steps=5"]).steps == 5


@pytest.mark.parametrize("override", ["steps", "=3", " =3", "rollout..top_k=1", "rollout.=1", ".steps=1"])
def test_malformed_override_is_a_one_line_error(override):
    assert "must look like key=value" in error(None, [override])


def test_override_into_a_value_says_it_is_not_a_section():
    message = error(None, ["steps.x=1"])
    assert "'steps'" in message and "not a section" in message


def test_override_value_that_is_not_yaml_names_the_override():
    assert "rollout.eos_ids=[1" in error(None, ["rollout.eos_ids=[1"])


def test_overrides_must_be_a_list_not_a_string():
    assert "list of key=value" in error(None, "steps=2")


# ---------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("override, unknown, close", [
    ("stpes=3", "'stpes'", "'steps'"),
    ("rollout.max_new_token=3", "'rollout.max_new_token'", "'rollout.max_new_tokens'"),
    ("student.random.hidden=3", "'student.random.hidden'", "'student.random.hidden_size'"),
    ("optimizer.lr=0.1", "'optimizer.lr'", "'optimizer."),
    ("rollot.top_k=3", "'rollot'", "'rollout'"),
])
def test_unknown_key_names_it_and_the_closest_valid_key(override, unknown, close):
    message = error(None, [override])
    assert message.startswith(f"unknown config key {unknown}")
    assert f"did you mean {close}" in message


def test_unknown_key_in_the_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  max_new_tokns: 4\n", encoding="utf-8")
    assert error(path) == "unknown config key 'rollout.max_new_tokns'; did you mean 'rollout.max_new_tokens'?"


@pytest.mark.parametrize("override, start, expected, given", [
    ("steps=two", "steps:", "expected int", "'two' (str)"),
    ("rollout.temperature=hot", "rollout.temperature:", "expected float", "'hot' (str)"),
    ("rollout.top_k=true", "rollout.top_k:", "expected int", "True (bool)"),
    ("rollout.eos_ids=3", "rollout.eos_ids:", "expected tuple[int, ...]", "3 (int)"),
    ("rollout.eos_ids=[1, x]", "rollout.eos_ids[1]:", "expected int", "'x' (str)"),
    ("student.random.family=gpt2", "student.random.family:", "'qwen3' | 'qwen3_moe'", "'gpt2' (str)"),
    ("rollout=3", "rollout:", "expected a mapping of RolloutConfig keys", "3 (int)"),
    ("loss=[1]", "loss:", "expected a mapping of TopdConfig keys", "[1] (list)"),
])
def test_wrong_type_names_key_expected_type_and_value_given(override, start, expected, given):
    message = error(None, [override])
    assert message.startswith(start) and expected in message and given in message


def test_bad_preset_lists_the_presets():
    message = error(None, ["preset=fast"])
    assert message.startswith("preset:") and "'fast'" in message
    assert all(name in message for name in ("'opd'", "'opd_suppress'", "'topd'"))


def test_bad_loss_key_or_value_fails_at_load():
    assert error(None, ["loss.windw=3"]) == "unknown config key 'loss.windw'; did you mean 'loss.window'?"
    assert error(None, ["loss.window=0"]) == "loss.window must be >= 1, got 0"
    assert error(None, ["loss.window=wide"]).startswith("loss.window: expected int")
    assert "tau" in error(None, ["loss.threshold_mode=absolute"])


@pytest.mark.parametrize("override, message", [
    ("steps=0", "steps must be >= 1, got 0"),
    ("rollout.top_p=2", "rollout.top_p must be in (0, 1], got 2.0"),
    ("rollout.prompts_per_step=0", "rollout.prompts_per_step must be >= 1, got 0"),
    ("data.source=jsonl", "data.path must be set when source is 'jsonl' or 'tfds', got None"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate must be > 0, got 0.0"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1, got 0"),
    ("mesh.tensor=0", "mesh.tensor must be >= 1 or -1, got 0"),
    ("student.random.num_heads=3", "student.random.num_heads must be a multiple of num_kv_heads=2, got 3"),
    ("teacher.random.num_experts=4", "teacher.random.num_experts must be 0 for the dense family 'qwen3', got 4"),
    ("student.random.family=qwen3_moe", "student.random.num_experts must be >= 1 for family 'qwen3_moe', got 0"),
])
def test_out_of_range_value_names_the_dotted_key(override, message):
    assert error(None, [override]) == message


# ---------------------------------------------------------------- model.attention: the models' table


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_every_model_backend_loads_from_the_yaml_and_from_an_override(tmp_path, impl):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  attention: {impl}\n", encoding="utf-8")
    assert load_config(path).model.attention == impl
    config = load_config(PAPER, [f"model.attention={impl}"])
    assert config.model.attention == impl
    # ... and reaches the models' own config, which checks against the same table.
    model = dataclasses.replace(RandomModelConfig().model_config(), **config.model.overrides())
    assert model.attention == impl


def test_unknown_backend_is_one_line_naming_the_key_and_the_tables_choices():
    message = error(None, ["model.attention=flash"])
    assert message == "model.attention must be one of auto, dense, blockwise, splash, cudnn, got 'flash'"
    assert message == f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got 'flash'"


def test_the_configs_attention_choices_are_exactly_the_models_table():
    # One list: the field is a plain str checked against ATTENTION_CHOICES (no Literal copy of it).
    assert typing.get_type_hints(ComputeConfig)["attention"] is str
    accepted = [impl for impl in ATTENTION_CHOICES if ComputeConfig(attention=impl).attention == impl]
    assert accepted == list(ATTENTION_CHOICES)
    with pytest.raises(ConfigError):
        ComputeConfig(attention="")
    # The documented choices (--help, the paper config's comment) name the same table.
    lines = describe_keys(ComputeConfig)
    doc = lines[lines.index("  attention: str = 'auto'") + 1].strip()
    assert doc.split(" (")[0].split(" | ") == list(ATTENTION_CHOICES)
    assert f"({' | '.join(ATTENTION_CHOICES[1:])} force one)" in PAPER.read_text(encoding="utf-8")


def test_two_automatic_mesh_sizes_are_an_error():
    assert "at most one mesh size may be -1" in error(None, ["mesh.fsdp=-1"])


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error(path) == f"config file not found: {path}"


@pytest.mark.parametrize("text, expected", [("- 1\n- 2\n", "top level must be a mapping"),
                                             ("steps: [1\n", "invalid YAML")])
def test_file_that_is_not_a_mapping_is_a_one_line_error(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    message = error(path)
    assert str(path) in message and expected in message


def test_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert load_config(path) == TrainConfig()


# ---------------------------------------------------------------- round trip


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


@pytest.mark.parametrize("path", [TINY, PAPER])
def test_save_then_load_gives_the_same_config(tmp_path, path):
    config = load_config(path, ["rollout.eos_ids=[3, 4]", "loss.guidance_options.gamma=0.9"])
    assert _plain(config.to_dict())
    out = tmp_path / "run" / "config.yaml"
    save_config(config, out)
    assert load_config(out) == config
    assert TrainConfig.from_dict(yaml.safe_load(out.read_text(encoding="utf-8"))) == config
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temp file left
    save_config(config, out)  # overwrite in place
    assert load_config(out) == config


def test_equal_configs_hash_equal_despite_the_loss_dict():
    a, b = load_config(TINY), load_config(TINY)
    assert hash(a) == hash(b) and hash(a) != hash(load_config(TINY, ["loss.window=9"]))


# ---------------------------------------------------------------- mesh


@pytest.mark.parametrize("mesh, devices, expected", [
    (MeshConfig(), 8, (8, 1, 1, 1)),
    (MeshConfig(data=1, fsdp=-1), 8, (1, 8, 1, 1)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2, 1)),
    (MeshConfig(data=1, fsdp=2, tensor=2, expert=2), 8, (1, 2, 2, 2)),
    (MeshConfig(data=-1, expert=3), 3, (1, 1, 1, 3)),
])
def test_mesh_resolve_fills_the_automatic_axis(mesh, devices, expected):
    assert tuple(mesh.resolve(devices).values()) == expected


def test_mesh_resolve_errors_name_the_sizes_and_the_device_count():
    with pytest.raises(ConfigError, match=r"^mesh data=2 fsdp=2 tensor=1 expert=1 needs 4 devices, but there are 8"):
        MeshConfig(data=2, fsdp=2).resolve(8)
    with pytest.raises(ConfigError, match=r"tensor=3.*product 3 does not divide the 8 devices"):
        MeshConfig(tensor=3).resolve(8)


def test_mesh_from_config_uses_the_given_devices():
    assert jax.device_count() == 8  # tests/conftest.py
    mesh = runtime.mesh_from_config(MeshConfig(data=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    mesh = runtime.mesh_from_config(MeshConfig(data=1, fsdp=-1), devices=jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1, "expert": 1}


# ---------------------------------------------------------------- optimizer


def test_constant_schedule_warms_up_linearly():
    schedule = OptimizerConfig(learning_rate=0.1, warmup_steps=4).learning_rate_schedule(100)
    np.testing.assert_allclose([schedule(s) for s in (0, 1, 2, 4, 50, 100, 200)],
                               [0.0, 0.025, 0.05, 0.1, 0.1, 0.1, 0.1], rtol=1e-6)


def test_cosine_schedule_decays_to_zero_at_the_last_step():
    schedule = OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_steps=2).learning_rate_schedule(10)
    # after warmup: 0.1 * (1 + cos(pi * (s - 2) / 8)) / 2
    np.testing.assert_allclose([schedule(s) for s in (0, 1, 2, 4, 6, 10, 12)],
                               [0.0, 0.05, 0.1, 0.05 * (1 + math.cos(math.pi / 4)), 0.05, 0.0, 0.0], atol=1e-7)


def test_cosine_without_warmup_starts_at_the_peak():
    schedule = OptimizerConfig(learning_rate=0.1, schedule="cosine").learning_rate_schedule(4)
    np.testing.assert_allclose([schedule(s) for s in (0, 2, 4)], [0.1, 0.05, 0.0], atol=1e-7)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_built_optimizer_steps_by_the_scheduled_learning_rate(max_grad_norm):
    cfg = OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_steps=2, max_grad_norm=max_grad_norm)
    optimizer = cfg.build(total_steps=6)
    schedule = cfg.learning_rate_schedule(6)
    params = {"w": jnp.zeros(3)}
    state = optimizer.init(params)
    grads = {"w": jnp.array([3.0, -2.0, 5.0])}
    for step in range(8):
        # A constant gradient makes Adam's m_hat / sqrt(v_hat) = sign(g): the update is -lr(step) sign(g).
        updates, state = optimizer.update(grads, state, params)
        np.testing.assert_allclose(updates["w"], -schedule(step) * jnp.sign(grads["w"]), atol=1e-6)


def test_schedule_needs_a_positive_step_count():
    with pytest.raises(ConfigError, match="total_steps must be >= 1, got 0"):
        OptimizerConfig().build(0)


# ---------------------------------------------------------------- random models


@pytest.mark.parametrize("random", [
    RandomModelConfig(),
    RandomModelConfig(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    RandomModelConfig(family="qwen2", tie_word_embeddings=True),
    RandomModelConfig(family="llama", hidden_size=48, head_dim=12),
])
def test_random_model_config_builds_a_causal_lm_that_runs(random):
    cfg = random.model_config()
    assert cfg.family == random.family and cfg.vocab_size == random.vocab_size
    assert cfg.qk_norm == (random.family in ("qwen3", "qwen3_moe"))
    assert cfg.qkv_bias == (random.family == "qwen2")
    assert cfg.num_experts == random.num_experts
    model = CausalLM(cfg, rngs=nnx.Rngs(random.init_seed))
    tokens = jnp.arange(10).reshape(2, 5) % random.vocab_size
    logits = model(tokens)
    assert logits.shape == (2, 5, random.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))


# ---------------------------------------------------------------- distributed start-up

LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def fake_initialize(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting a coordinator; clean env."""
    calls = []
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_initialized", False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_initialize_off_and_auto_without_a_launcher_do_nothing(fake_initialize):
    assert runtime.initialize_distributed(DistributedConfig(initialize="off")) is False
    assert runtime.initialize_distributed(DistributedConfig(initialize="auto")) is False
    assert fake_initialize == []


@pytest.mark.parametrize("env, launcher", [
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, "TPU_WORKER_HOSTNAMES"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1"}, None),
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS"),
    ({"SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({}, None),
])
def test_multi_process_launch_reads_the_environment(env, launcher):
    assert runtime.multi_process_launch(env) == launcher


def test_auto_initializes_once_on_a_multi_host_launch(fake_initialize, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert runtime.initialize_distributed(DistributedConfig()) is True
    assert runtime.initialize_distributed(DistributedConfig()) is False  # idempotent
    assert fake_initialize == [dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_on_passes_the_configured_coordinator(fake_initialize):
    cfg = DistributedConfig(initialize="on", coordinator_address="h:1", num_processes=2, process_id=1)
    assert runtime.initialize_distributed(cfg) is True
    assert fake_initialize == [dict(coordinator_address="h:1", num_processes=2, process_id=1)]


def test_process_id_must_fit_num_processes():
    assert error(None, ["distributed.num_processes=2", "distributed.process_id=2"]).startswith(
        "distributed.process_id must be in [0, num_processes)")


def test_loss_is_a_typed_section_with_the_preset_applied_on_load():
    config = load_config(None, ["preset=opd", "loss.window=5"])
    assert config.loss == TopdConfig.preset("opd", window=5)
    assert load_config(None, ["preset=opd_suppress"]).loss == TopdConfig.preset("opd_suppress")
    # The resolved config (every loss field written out) loads back to the same config.
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert hash(TrainConfig.from_dict(config.to_dict())) == hash(config)


def test_window_temperature_is_a_rollout_option():
    assert load_config(None, ["rollout.window_temperature=0.5"]).rollout.window_temperature == 0.5
    assert error(None, ["rollout.window_temperature=-1"]) == "rollout.window_temperature must be >= 0 or null, got -1.0"
    assert error(None, ["loss.window_temperature=0.5"]).startswith("unknown config key 'loss.window_temperature'")


def test_load_config_names_a_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("steps: 3\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not valid UTF-8 text: byte 0xe9 at byte offset 18 \(line 2\)"):
        load_config(bad)
