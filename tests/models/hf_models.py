"""Tiny random Hugging Face checkpoints of every family, built with transformers + torch (CPU).

Weights are redrawn at a scale where logits are O(1) and router choices are far from ties, so
parity tolerances are meaningful. conftest.py saves each variant once per session.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import nnx

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)

VARIANTS = {
    # Explicit head_dim 24 != hidden / heads = 16, untied head.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "qwen3_tied_bias": ("Qwen3Config", "Qwen3ForCausalLM",
                        dict(head_dim=16, tie_word_embeddings=True, attention_bias=True)),
    # Layer 0 sparse, layer 1 dense via mlp_only_layers; renormalised top-2 of 4 experts.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False)),
    # decoder_sparse_step 2: layer 0 dense, layer 1 sparse; raw top-3 of 6 experts.
    "qwen3_moe_step": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                       dict(head_dim=16, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
                            norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM",
                   dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                        rope_parameters=dict(rope_type="linear", rope_theta=5000.0, factor=2.0))),
}


def build_hf_model(name: str, seed: int = 0):
    """A transformers model of variant `name` in fp32 eager attention, weights at an O(1) scale."""
    config_cls, model_cls, extra = VARIANTS[name]
    config = getattr(transformers, config_cls)(**COMMON, **extra, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    return model


def hf_logits(model, tokens: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        args = {k: torch.as_tensor(np.array(v)) for k, v in kwargs.items()}
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **args).logits.float().numpy()


def random_tokens(batch: int, length: int, seed: int = 0, vocab: int = COMMON["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


@nnx.jit(static_argnames="return_hidden")
def forward(model, tokens, attention_mask=None, positions=None, cache=None, return_hidden=False):
    """model(...) compiled once per model structure and input shape (eager dispatch is slower)."""
    return model(tokens, attention_mask=attention_mask, positions=positions, cache=cache, return_hidden=return_hidden)
