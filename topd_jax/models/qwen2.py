"""Qwen2 and Qwen2.5 decoders (Qwen2.5-0.5B ... 72B and their Instruct/Math variants).

The Llama layout with a bias on the q, k and v projections (always on; the output projection has
none) and head_dim = hidden_size / num_attention_heads. Small models tie the LM head to the input
embedding. Sliding-window attention (`use_sliding_window`, off in every released checkpoint) is
refused.
"""

from __future__ import annotations

from typing import Any, Mapping

from topd_jax.models.config import ModelConfig, decoder_from_hf, decoder_to_hf

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPE = "qwen2"


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    fields = decoder_from_hf(raw, attention_bias=False)
    return ModelConfig(family="qwen2", **{**fields, "qkv_bias": True})


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = decoder_to_hf(cfg, architecture=ARCHITECTURE, model_type=MODEL_TYPE)
    return {**out, "use_sliding_window": False}
