"""ModelConfig from config.json: both transformers layouts, every family, one-line errors."""

import json

import pytest
import transformers
from hf_models import VARIANTS

from topd_jax.configuration import ConfigError
from topd_jax.models import ModelConfig, RopeConfig, config_from_hf, config_to_hf, read_config

LLAMA_31_V4 = {  # Llama-3.1-8B's config.json as transformers 4.x wrote it, shrunk
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": [128001, 128009], "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
LLAMA3_ROPE = RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)


def v5(raw):
    out = {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling")}
    out["rope_parameters"] = {"rope_theta": raw["rope_theta"], **raw["rope_scaling"]}
    return out


def test_both_rope_layouts_give_the_same_config():
    old, new = config_from_hf(LLAMA_31_V4), config_from_hf(v5(LLAMA_31_V4))
    assert old == new
    assert old.rope == LLAMA3_ROPE and old.head_dim == 8 and old.family == "llama"
    assert old.hf_rope_layout == "v4" and new.hf_rope_layout == "v5"


def test_very_old_type_key_and_missing_scaling_are_read():
    raw = {**LLAMA_31_V4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert config_from_hf(raw).rope == RopeConfig(theta=500000.0, type="linear", factor=2.0)
    raw = {k: v for k, v in LLAMA_31_V4.items() if k not in ("rope_scaling", "rope_theta")}
    assert config_from_hf(raw).rope == RopeConfig()


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_written_config_round_trips_and_transformers_reads_the_same_rope(layout):
    cfg = config_from_hf(LLAMA_31_V4)
    out = config_to_hf(cfg, layout=layout, dtype="float32")
    assert ("rope_parameters" in out) == (layout == "v5") and ("rope_scaling" in out) == (layout == "v4")
    assert out["bos_token_id"] == 128000 and out["eos_token_id"] == [128001, 128009]  # carried over
    assert out["dtype"] == out["torch_dtype"] == "float32"
    assert config_from_hf(json.loads(json.dumps(out))) == cfg
    hf = transformers.LlamaConfig.from_dict(out)
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["rope_theta"] == 500000.0
    assert hf.rope_parameters["factor"] == 8.0 and hf.rope_parameters["original_max_position_embeddings"] == 8192


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_transformers_written_configs_parse_to_the_right_shapes(name, hf_checkpoint):
    path, hf = hf_checkpoint(name)
    cfg = read_config(path)
    c = hf.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    assert cfg.head_dim == hf.model.layers[0].self_attn.head_dim
    assert cfg.tie_word_embeddings == c.tie_word_embeddings
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
    if cfg.family == "qwen3_moe":
        sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
        assert [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)] == sparse
        assert cfg.num_experts == c.num_experts and cfg.norm_topk_prob == c.norm_topk_prob


def test_released_qwen3_moe_key_spelling_is_read():
    raw = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
           "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "norm_topk_prob": True,
           "decoder_sparse_step": 2, "mlp_only_layers": [3], "rope_theta": 1e6}
    cfg = config_from_hf(raw)
    assert cfg.num_experts == 8 and cfg.head_dim == 32 and cfg.rope.theta == 1e6 and cfg.qk_norm
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    assert config_to_hf(cfg)["num_experts"] == 8


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"unsupported architectures \['GPT2LMHeadModel'\] .*supported: Llama"),
    ({"hidden_size": None}, r"config.json: hidden_size must be int, got None"),
    ({"num_attention_heads": "8"}, r"config.json: num_attention_heads must be int, got '8'"),
    ({"rms_norm_eps": True}, r"config.json: rms_norm_eps must be float, got True"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type 'yarn' is not supported; supported: default"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"config.json: missing key 'low_freq_factor'"),
    ({"use_sliding_window": True}, r"use_sliding_window=true is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"num_key_value_heads": 3}, r"num_heads must be a multiple of num_kv_heads=3 \(config.json: num_attention_heads and num_key_value_heads\), got 8"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor 0.5 is not supported"),
])
def test_bad_configs_fail_with_one_line_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_from_hf({**LLAMA_31_V4, **change})
    assert "\n" not in str(err.value)


def test_missing_key_and_bad_moe_values_are_named():
    raw = {k: v for k, v in LLAMA_31_V4.items() if k != "vocab_size"}
    with pytest.raises(ConfigError, match=r"config.json: missing key 'vocab_size'"):
        config_from_hf(raw)
    moe = {**LLAMA_31_V4, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 5,
           "moe_intermediate_size": 8}
    with pytest.raises(ConfigError, match=r"num_experts_per_tok must be in \[1, num_experts=4\], got 5"):
        config_from_hf(moe)
    with pytest.raises(ConfigError, match=r"mlp_only_layers must be layer indices in \[0, 2\), got \(7,\)"):
        config_from_hf({**moe, "num_experts_per_tok": 2, "mlp_only_layers": [7]})


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_config(tmp_path)


def test_config_is_hashable_static_metadata():
    a, b = config_from_hf(LLAMA_31_V4), config_from_hf(v5(LLAMA_31_V4))
    assert hash(a) == hash(b) and isinstance(a, ModelConfig)
