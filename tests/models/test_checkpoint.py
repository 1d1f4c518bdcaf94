"""Safetensors checkpoints: load, save, transformers round trip, sharded files, clear refusals."""

import json
import os
import pickle
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hf_models import build_hf_model, forward, hf_logits, random_tokens
from safetensors.torch import load_file, save_file

from topd_jax.configuration import ConfigError
from topd_jax.models import CheckpointError, load_pretrained, save_pretrained
from topd_jax.models.safetensors_io import SafetensorsFile

TOL = 1e-4


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def edited_checkpoint(src, dst, **config_changes):
    """A copy of checkpoint `src` at `dst` whose config.json has `config_changes` applied."""
    path = copy_checkpoint(src, dst)
    with open(path / "config.json") as f:
        raw = json.load(f)
    raw.update(config_changes)
    with open(path / "config.json", "w") as f:
        json.dump(raw, f)
    return path


@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied_bias", "qwen3_moe", "qwen2", "llama3", "llama_bias"])
def test_load_save_and_transformers_reloads_the_same_logits(name, hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint(name)
    x = random_tokens(2, 9, seed=8)
    model = load_pretrained(path, dtype=jnp.float32)
    save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["architectures"] == [type(hf).__name__] and written["dtype"] == "float32"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(reloaded, x), hf_logits(hf, x))
    again = load_pretrained(tmp_path, dtype=jnp.float32)
    x = jnp.asarray(x)
    np.testing.assert_array_equal(np.asarray(forward(again, x)), np.asarray(forward(model, x)))


def test_bfloat16_checkpoint_is_read_exactly(tmp_path):
    hf = build_hf_model("qwen3_moe").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert SafetensorsFile(tmp_path / "model.safetensors").dtype("model.norm.weight") == ml_dtypes.bfloat16
    x = random_tokens(2, 8, seed=9)
    out = np.asarray(forward(load_pretrained(tmp_path, dtype=jnp.float32), jnp.asarray(x)))
    # Reference: the bf16 weights upcast by transformers (hf.float() would keep a bf16 RoPE buffer).
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    np.testing.assert_allclose(out, hf_logits(ref, x), atol=TOL, rtol=0)


def test_sharded_checkpoints_load_and_save_with_an_index(hf_checkpoint, tmp_path):
    _, hf = hf_checkpoint("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    x = random_tokens(1, 8, seed=11)
    model = load_pretrained(tmp_path / "hf", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(x))), hf_logits(hf, x), atol=TOL, rtol=0)

    save_pretrained(model, tmp_path / "ours", max_shard_size=60_000)
    with open(tmp_path / "ours" / "model.safetensors.index.json") as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(os.path.getsize(tmp_path / "ours" / s) < 60_000 + 20_000 for s in shards)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(reloaded, x), hf_logits(hf, x))


def test_save_in_bfloat16_writes_bf16_tensors_transformers_loads(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("llama3")
    save_pretrained(load_pretrained(path, dtype=jnp.float32), tmp_path, dtype=jnp.bfloat16)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    weight = reloaded.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight, hf.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16), rtol=0, atol=0)


def test_pickle_only_checkpoints_are_refused_and_never_unpickled(hf_checkpoint, tmp_path):
    sentinel = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(hf_checkpoint("qwen3")[0] / "config.json", path)
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(ValueError, match=r"only pickle checkpoint files \(pytorch_model.bin\).*never unpickled"):
        load_pretrained(path)
    assert not sentinel.exists()
    os.remove(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(path)


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint("qwen3")[0], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"has no tensor 'model\.layers\.1\.self_attn\.k_norm\.weight'"):
        load_pretrained(path)


def test_shape_mismatch_names_tensor_and_both_shapes(hf_checkpoint, tmp_path):
    path = edited_checkpoint(hf_checkpoint("qwen3")[0], tmp_path / "ckpt", intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(96, 64\) "
                                         r"in the checkpoint, expected \(128, 64\)"):
        load_pretrained(path)


def test_unsupported_architecture_lists_the_supported_ones(hf_checkpoint, tmp_path):
    path = edited_checkpoint(hf_checkpoint("qwen3")[0], tmp_path / "ckpt", architectures=["MistralForCausalLM"])
    with pytest.raises(ConfigError, match=r"unsupported architectures \['MistralForCausalLM'\].*supported: "
                                          r"LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"):
        load_pretrained(path)


def test_tensors_the_config_does_not_use_are_refused(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint("qwen3")[0], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.2.input_layernorm.weight"] = torch.ones(64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"does not use: model\.layers\.2\.input_layernorm\.weight"):
        load_pretrained(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_reads_equal_numpy_slicing(dtype, tmp_path):
    full = torch.arange(7 * 5 * 3, dtype=torch.float32).reshape(7, 5, 3).to(dtype)
    save_file({"x": full, "v": full[0, 0].clone()}, tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    ref = full.float().numpy()
    np.testing.assert_array_equal(f.read("x").astype(np.float32), ref)
    np.testing.assert_array_equal(f.read("x", ((2, 5), (1, 4), (0, 2))).astype(np.float32), ref[2:5, 1:4, 0:2])
    np.testing.assert_array_equal(f.read("v", ((1, 3),)).astype(np.float32), ref[0, 0, 1:3])


def _with_header(path, edit):
    """Rewrite the JSON header of safetensors file `path` with `edit(header)`, data unchanged."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


def _set(name, key, value):
    return lambda header: header[name].__setitem__(key, value)


@pytest.mark.parametrize("edit, message", [
    (_set("x", "dtype", "F64"), r"tensor 'x' spans 24 bytes, but F64 \(2, 3\) needs 48"),
    (_set("y", "data_offsets", [24, 64]), r"tensor 'y' spans 40 bytes"),
    (_set("y", "data_offsets", [28, 44]), r"starts at byte 28 of the data, expected 24 \(a gap\)"),
    (_set("y", "data_offsets", [20, 36]), r"tensor 'y' starts at byte 20 of the data, expected 24 \(an overlap\)"),
    (_set("x", "dtype", "F7"), r"unsupported dtype 'F7'"),
    (_set("x", "shape", [2, -3]), r"invalid shape"),
    (lambda h: h.pop("y"), r"trailing bytes"),
])
def test_a_header_that_misdescribes_the_data_is_refused_as_the_safetensors_library_does(tmp_path, edit, message):
    from safetensors import safe_open

    path = tmp_path / "t.safetensors"
    save_file({"x": torch.zeros(2, 3), "y": torch.ones(4)}, path)
    _with_header(path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        SafetensorsFile(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(Exception):  # the reference reader agrees that the file is broken
        with safe_open(path, framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_a_truncated_safetensors_file_is_refused_when_opened(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.zeros(2, 3), "y": torch.ones(4)}, path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"the tensors end at byte 40 of the data but the file holds 36 "
                                              r"\(truncated\)"):
        SafetensorsFile(path)


def test_saving_over_a_checkpoint_replaces_it_whole_and_keeps_other_files(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("qwen3")
    model = load_pretrained(path, dtype=jnp.float32)
    target = tmp_path / "student"
    save_pretrained(model, target, max_shard_size=20_000)  # sharded first
    (target / "tokenizer.json").write_text("{}")
    save_pretrained(model, target)  # then a single file: no stale shards or index remain
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["student"]  # no staging directories left behind
    x = random_tokens(1, 6, seed=3)
    np.testing.assert_array_equal(np.asarray(forward(load_pretrained(target, dtype=jnp.float32), jnp.asarray(x))),
                                  np.asarray(forward(model, jnp.asarray(x))))


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_intact(hf_checkpoint, tmp_path, monkeypatch):
    path, _ = hf_checkpoint("qwen3")
    model = load_pretrained(path, dtype=jnp.float32)
    target = tmp_path / "student"
    save_pretrained(model, target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    import topd_jax.models.checkpoint as checkpoint

    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return write_file(*args, **kwargs)

    from topd_jax.models.safetensors_io import write_file

    monkeypatch.setattr(checkpoint, "write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target, dtype=jnp.bfloat16, max_shard_size=20_000)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["student"]
    load_pretrained(target, dtype=jnp.float32)
