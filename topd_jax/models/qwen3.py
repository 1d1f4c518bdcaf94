"""Qwen3 dense decoders (Qwen3-0.6B ... 32B, Qwen3-4B-Instruct-2507: the paper's student).

A Llama-layout pre-norm decoder (GQA attention with RoPE, SwiGLU MLP, RMSNorm) plus an RMSNorm over
head_dim on every query and key head before RoPE (`q_norm`, `k_norm`), and an explicit `head_dim`
that need not equal hidden_size / num_attention_heads. `attention_bias` puts a bias on q, k, v and
o. Small models tie the LM head to the input embedding (`tie_word_embeddings`).
"""

from __future__ import annotations

from typing import Any, Mapping

from topd_jax.models.config import ModelConfig, decoder_from_hf, decoder_to_hf, get

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    bias = get(raw, "attention_bias", bool, False)
    return ModelConfig(family="qwen3", qk_norm=True, **decoder_from_hf(raw, attention_bias=bias))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder_to_hf(cfg, architecture=ARCHITECTURE, model_type=MODEL_TYPE),
            "attention_bias": cfg.qkv_bias, "use_sliding_window": False}
