"""Qwen3 Mixture-of-Experts decoders (Qwen3-30B-A3B-Instruct-2507: the paper's teacher).

Qwen3 attention (q/k RMSNorm, explicit head_dim) with the MLP of sparse layers replaced by a routed
MoE block (moe.py): router softmax over `num_experts`, top `num_experts_per_tok` experts per token,
their probabilities renormalised to sum to 1 when `norm_topk_prob`, each expert a SwiGLU MLP of
width `moe_intermediate_size`. Layer l is sparse when l is not in `mlp_only_layers` and
(l + 1) % `decoder_sparse_step` == 0; other layers use a dense MLP of width `intermediate_size`.
No shared expert. transformers 5 writes the expert count as `num_local_experts`, the released
checkpoints as `num_experts`; both are read.
"""

from __future__ import annotations

from typing import Any, Mapping

from topd_jax.configuration import ConfigError
from topd_jax.models.config import ModelConfig, decoder_from_hf, decoder_to_hf, get

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"
# Alternative spellings of keys config_to_hf writes; dropped from the carried-over config on save.
HF_ALIASES = ("num_local_experts",)


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    bias = get(raw, "attention_bias", bool, False)
    key = "num_experts" if "num_experts" in raw else "num_local_experts"
    only = get(raw, "mlp_only_layers", list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ConfigError(f"config.json: mlp_only_layers must be a list of layer indices, got {only!r}")
    return ModelConfig(
        family="qwen3_moe",
        qk_norm=True,
        num_experts=get(raw, key, int),
        num_experts_per_tok=get(raw, "num_experts_per_tok", int),
        moe_intermediate_size=get(raw, "moe_intermediate_size", int),
        norm_topk_prob=get(raw, "norm_topk_prob", bool, False),
        decoder_sparse_step=get(raw, "decoder_sparse_step", int, 1),
        mlp_only_layers=tuple(only),
        **decoder_from_hf(raw, attention_bias=bias),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **decoder_to_hf(cfg, architecture=ARCHITECTURE, model_type=MODEL_TYPE),
        "attention_bias": cfg.qkv_bias,
        "use_sliding_window": False,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": cfg.decoder_sparse_step,
        "mlp_only_layers": list(cfg.mlp_only_layers),
    }
