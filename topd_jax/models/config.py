"""One model configuration for every supported decoder family, read from Hugging Face `config.json`.

`ModelConfig` is frozen and hashable (it is static metadata of the NNX modules). The family files
(`qwen3.py`, `qwen3_moe.py`, `qwen2.py`, `llama.py`) translate a family's `config.json` keys
to and from it with the helpers below; `families.py` picks the family from `architectures`.

RoPE parameters come in two layouts and both are read:
  transformers 5:   "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8, ...}
  transformers 4.x: "rope_theta": 5e5, "rope_scaling": {"rope_type" (or "type"): "llama3", ...}
Every error is one line that names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Mapping

import jax.numpy as jnp

from topd_jax.configuration import ConfigError, check
from topd_jax.models.attention import ATTENTION_CHOICES

Family = Literal["qwen3", "qwen3_moe", "qwen2", "llama"]
FAMILY_NAMES = ("qwen3", "qwen3_moe", "qwen2", "llama")
# How a model may compute: attention backends (attention.ATTENTION_CHOICES, imported above: the
# table's backends plus `auto`) and the rematerialisation policies of the scanned layers
# (decoder.REMAT_POLICIES).
REMAT_POLICIES = ("none", "dots", "full")
# The one table of parameter / compute dtypes a config names (training, export, eval).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RopeType = Literal["default", "linear", "llama3"]
ROPE_TYPES = ("default", "linear", "llama3")
# Keys that only describe RoPE: dropped from the carried-over config and rewritten on save.
ROPE_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: inv_freq_i = theta^(-2i/head_dim), rescaled per `type` (see layers.py)."""

    theta: float = 10000.0
    type: RopeType = "default"
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3

    def __post_init__(self):
        check(("rope_type", self.type in ROPE_TYPES, f"one of {', '.join(ROPE_TYPES)}", self.type),
              ("rope_theta", self.theta > 0, "> 0", self.theta),
              ("rope factor", self.factor > 0, "> 0", self.factor),
              ("high_freq_factor", self.type != "llama3" or self.high_freq_factor > self.low_freq_factor,
               f"> low_freq_factor={self.low_freq_factor} for llama3 rope scaling", self.high_freq_factor))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a pre-norm decoder (Llama layout) and of its optional MoE layers."""

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (all layers of dense models, mlp-only layers of MoE)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, `attention_bias`)
    o_bias: bool = False  # bias on the output projection (`attention_bias` of Llama/Qwen3)
    mlp_bias: bool = False  # bias on gate/up/down (Llama `mlp_bias`)
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    # Mixture of experts (num_experts == 0: dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # The source config.json without its RoPE keys, written back by save_pretrained (JSON text),
    # and the layout its RoPE keys came in ("v5": rope_parameters, "v4": rope_theta/rope_scaling).
    # How the model computes (not read from or written to config.json; static like the rest):
    # attention backend (attention.ATTENTION_CHOICES), its block size, and the
    # rematerialisation policy of the scanned layers in the backward pass.
    attention: str = "auto"
    attention_block: int = 512
    remat: str = "none"
    hf_extra: str = dataclasses.field(default="{}", compare=False, repr=False)
    hf_rope_layout: Literal["v5", "v4"] = dataclasses.field(default="v5", compare=False, repr=False)

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim")
        check(("family", self.family in FAMILY_NAMES, f"one of {', '.join(FAMILY_NAMES)}", self.family),
              *[(name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "an int >= 1", getattr(self, name))
                for name in sizes],
              ("num_heads", self.num_heads % self.num_kv_heads == 0,
               f"a multiple of num_kv_heads={self.num_kv_heads} (config.json: num_attention_heads and "
               "num_key_value_heads)", self.num_heads),
              ("rms_norm_eps", self.rms_norm_eps > 0, "> 0", self.rms_norm_eps))
        if self.num_experts:
            check(("num_experts_per_tok", 0 < self.num_experts_per_tok <= self.num_experts,
                   f"in [1, num_experts={self.num_experts}]", self.num_experts_per_tok),
                  ("moe_intermediate_size", self.moe_intermediate_size > 0, "> 0", self.moe_intermediate_size),
                  ("decoder_sparse_step", self.decoder_sparse_step > 0, "> 0", self.decoder_sparse_step))
        check(("attention", self.attention in ATTENTION_CHOICES, f"one of {', '.join(ATTENTION_CHOICES)}",
               self.attention),
              ("attention_block", _is_int(self.attention_block) and self.attention_block >= 1, "an int >= 1",
               self.attention_block),
              ("remat", self.remat in REMAT_POLICIES, f"one of {', '.join(REMAT_POLICIES)}", self.remat))
        check(("mlp_only_layers", all(0 <= i < self.num_layers for i in self.mlp_only_layers),
               f"layer indices in [0, {self.num_layers})", self.mlp_only_layers))

    def is_moe_layer(self, layer: int) -> bool:
        """Transformers' rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def layer_groups(self) -> tuple[tuple[int, int], ...]:
        """[start, stop) of each run of consecutive layers of one kind (dense or MoE): the
        decoder scans each run as one stacked block, so a uniform model is a single scan."""
        groups: list[list[int]] = []
        for layer in range(self.num_layers):
            if groups and self.is_moe_layer(layer) == self.is_moe_layer(groups[-1][0]):
                groups[-1][1] = layer + 1
            else:
                groups.append([layer, layer + 1])
        return tuple((a, b) for a, b in groups)

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, n, k, h = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * (n + 2 * k) * h + n * h * d
        attn += (n + 2 * k) * h * self.qkv_bias + d * self.o_bias + 2 * h * self.qk_norm
        dense = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d) * self.mlp_bias
        moe = self.num_experts * 3 * d * self.moe_intermediate_size + d * self.num_experts
        layers = sum(attn + 2 * d + (moe if self.is_moe_layer(i) else dense) for i in range(self.num_layers))
        return layers + d + self.vocab_size * d * (1 if self.tie_word_embeddings else 2)


# --- helpers the family files use to read and write config.json -------------------------------


def get(raw: Mapping[str, Any], key: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
    """raw[key] checked against typ (ints accepted for floats, bools never for numbers)."""
    if key not in raw or (raw[key] is None and default is not ...):
        if default is ...:
            raise ConfigError(f"config.json: missing key {key!r}")
        return default
    value = raw[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " | ".join(t.__name__ for t in types)
        raise ConfigError(f"config.json: {key} must be {names}, got {value!r}")
    return value


def rope_from_hf(raw: Mapping[str, Any]) -> RopeConfig:
    """RopeConfig from either layout (module docstring); transformers' defaults fill the gaps."""
    params = raw.get("rope_parameters")
    if params is None:  # transformers 4.x layout
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", get(raw, "rope_theta", float, 10000.0))
    if not isinstance(params, Mapping):
        raise ConfigError(f"config.json: rope_parameters must be a dict, got {params!r}")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError("config.json: per-layer-type rope_parameters are not supported")
    params = dict(params)
    if "rope_theta" not in params:
        params["rope_theta"] = get(raw, "rope_theta", float, 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    factor_fraction = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if factor_fraction not in (None, 1, 1.0):
        raise ConfigError(f"config.json: partial_rotary_factor {factor_fraction} is not supported (only 1.0)")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"config.json: rope_type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    fields = dict(theta=get(params, "rope_theta", float), type=kind)
    if kind in ("linear", "llama3"):
        fields["factor"] = get(params, "factor", float)
    if kind == "llama3":
        fields["low_freq_factor"] = get(params, "low_freq_factor", float)
        fields["high_freq_factor"] = get(params, "high_freq_factor", float)
        fields["original_max_position_embeddings"] = get(
            params, "original_max_position_embeddings", int, get(raw, "max_position_embeddings", int, 8192))
    return RopeConfig(**fields)


def rope_to_hf(rope: RopeConfig, layout: Literal["v5", "v4"]) -> dict[str, Any]:
    """The RoPE keys of config.json in the transformers 5 (`v5`) or 4.x (`v4`) layout."""
    scaling: dict[str, Any] = {}
    if rope.type != "default":
        scaling = {"rope_type": rope.type, "factor": rope.factor}
    if rope.type == "llama3":
        scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                       original_max_position_embeddings=rope.original_max_position_embeddings)
    if layout == "v4":
        return {"rope_theta": rope.theta, "rope_scaling": scaling or None}
    return {"rope_parameters": {"rope_type": rope.type, "rope_theta": rope.theta, **scaling}}


def decoder_from_hf(raw: Mapping[str, Any], *, attention_bias: bool) -> dict[str, Any]:
    """The ModelConfig fields every family reads the same way (kwargs for ModelConfig)."""
    act = get(raw, "hidden_act", str, "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    if get(raw, "use_sliding_window", bool, False):
        raise ConfigError("config.json: use_sliding_window=true is not supported (sliding-window attention)")
    hidden = get(raw, "hidden_size", int)
    heads = get(raw, "num_attention_heads", int)
    return dict(
        vocab_size=get(raw, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=get(raw, "intermediate_size", int),
        num_layers=get(raw, "num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=get(raw, "num_key_value_heads", int, heads),
        head_dim=get(raw, "head_dim", int, hidden // heads),
        rms_norm_eps=get(raw, "rms_norm_eps", float, 1e-6),
        tie_word_embeddings=get(raw, "tie_word_embeddings", bool, False),
        max_position_embeddings=get(raw, "max_position_embeddings", int, 32768),
        rope=rope_from_hf(raw),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
    )


def decoder_to_hf(cfg: ModelConfig, *, architecture: str, model_type: str) -> dict[str, Any]:
    """config.json keys shared by the families (RoPE keys excluded, see rope_to_hf)."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
    }


def extra_from_hf(raw: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields that remember the source config.json: its other keys and RoPE layout."""
    legacy = "rope_parameters" not in raw and ("rope_theta" in raw or "rope_scaling" in raw)
    return dict(hf_extra=json.dumps({k: v for k, v in raw.items() if k not in ROPE_KEYS}, sort_keys=True),
                hf_rope_layout="v4" if legacy else "v5")
