"""Decoder language models in Flax NNX with Hugging Face safetensors checkpoints.

Families: Qwen3 (dense), Qwen3-MoE, Qwen2/2.5, Llama 3/3.1/3.2 — one `CausalLM` configured by a
`ModelConfig` read from config.json. See docs/models.md.
"""

from topd_jax.models.checkpoint import CheckpointError, checkpoint_files, load_pretrained, save_pretrained, tensor_map
from topd_jax.models.config import ModelConfig, RopeConfig
from topd_jax.models.decoder import CausalLM, KVCache, init_branch_cache, init_cache
from topd_jax.models.families import SUPPORTED_ARCHITECTURES, config_from_hf, config_to_hf, read_config
from topd_jax.models.attention import attend, attend_branches
from topd_jax.models.masks import causal_mask, positions_from_padding, tree_attention_mask
from topd_jax.models.sharding import (
    CACHE_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    batch_sharding,
    cache_shardings,
    logical_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_model,
)
from topd_jax.models.tokenizer import build_prompt, encode_prompts, load_tokenizer

__all__ = [
    "CACHE_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "attend",
    "attend_branches",
    "batch_sharding",
    "build_prompt",
    "cache_shardings",
    "causal_mask",
    "checkpoint_files",
    "config_from_hf",
    "config_to_hf",
    "encode_prompts",
    "init_branch_cache",
    "init_cache",
    "load_pretrained",
    "load_tokenizer",
    "logical_sharding",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
    "positions_from_padding",
    "read_config",
    "save_pretrained",
    "shard_model",
    "tensor_map",
    "tree_attention_mask",
]
