"""Llama 3, 3.1 and 3.2 decoders (and Llama 2-shaped checkpoints with the same layout).

Pre-norm decoder: GQA attention with RoPE, SwiGLU MLP, RMSNorm. Llama 3.1/3.2 rescale the RoPE
frequencies with the `llama3` rule (layers.rope_inv_freq): wavelengths longer than
original_max_position_embeddings / low_freq_factor are divided by `factor`, shorter than
original / high_freq_factor kept, and interpolated smoothly in between. `attention_bias` puts a
bias on q, k, v and o; `mlp_bias` on gate, up and down. Llama 3.2 1B/3B tie the LM head.
"""

from __future__ import annotations

from typing import Any, Mapping

from topd_jax.models.config import ModelConfig, decoder_from_hf, decoder_to_hf, get

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    bias = get(raw, "attention_bias", bool, False)
    return ModelConfig(family="llama", mlp_bias=get(raw, "mlp_bias", bool, False),
                       **decoder_from_hf(raw, attention_bias=bias))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder_to_hf(cfg, architecture=ARCHITECTURE, model_type=MODEL_TYPE),
            "attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
