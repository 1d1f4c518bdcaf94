"""The decoder stack all four families share, and its key-value cache.

    tokens [B, T] -> embed -> L x (x + attn(norm(x)); x + mlp_or_moe(norm(x))) -> norm -> logits

`CausalLM(cfg)` is configured by a ModelConfig (families.py reads one from config.json). Calling it:

    logits = model(tokens)                                   # [B, T, V] float32, causal
    hidden = model(tokens, return_hidden=True)               # [B, T, D] after the final norm;
    logits = model.logits(hidden[:, a:b])                    #   logits of any chunk
    logits = model(tokens, attention_mask=pad)               # pad [B, T], 1 = real token
    logits = model(tokens, attention_mask=m, positions=p)    # explicit m [B, T, T] (packed trees)
    cache = init_cache(cfg, B, S_max)
    logits, cache = model(prompt, cache=cache)               # prefill, then one step at a time:
    logits, cache = model(next_tokens, cache=cache)          # [B, 1]

Default positions count the real tokens before each token (masks.positions_from_padding; with a
cache, every real token cached so far), so left-padded batches need no explicit positions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from topd_jax.models.config import ModelConfig
from topd_jax.models.layers import MLP, Attention, RMSNorm, param, rope_angles
from topd_jax.models.masks import causal_mask, explicit_mask, positions_from_padding
from topd_jax.models.moe import MoEBlock

Array = jax.Array


class KVCache(NamedTuple):
    """Preallocated keys and values of every layer; functional (calls return an updated copy).

    keys, values: per layer [B, S_max, K, H]; valid [B, S_max] bool marks slots holding real
    tokens; index int32 [] is the next slot to write (slots [0, index) are filled).
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    valid: Array
    index: Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt included)."""
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def init_branch_cache(cfg: ModelConfig, batch: int, branches: int, window: int,
                      dtype=jnp.bfloat16) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """Empty branch-local (keys, values), per layer [B, M, W, K, H], for `CausalLM.branch_step`."""
    shape = (batch, branches, window, cfg.num_kv_heads, cfg.head_dim)
    return (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        mlp = MoEBlock if cfg.is_moe_layer(layer) else MLP
        self.mlp = mlp(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def branch_step(self, x, cos, sin, prefix_kv, prefix_mask, branch_kv, step):
        """x [B, M, D] -> [B, M, D] for one lockstep token per branch (Attention.branch_step)."""
        h, branch_kv = self.self_attn.branch_step(self.input_layernorm(x), cos, sin, prefix_kv, prefix_mask,
                                                  branch_kv, step)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), branch_kv


class CausalLM(nnx.Module):
    """Decoder-only language model (module docstring). `dtype` is the parameter and compute dtype."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def logits(self, hidden: Array) -> Array:
        """[..., D] final hidden states -> [..., V] float32 logits (tied or separate LM head)."""
        if self.config.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", hidden, self.embed_tokens[...], preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", hidden, self.lm_head[...], preferred_element_type=jnp.float32)

    def __call__(self, tokens: Array, *, positions: Array | None = None, attention_mask: Array | None = None,
                 cache: KVCache | None = None, return_hidden: bool = False):
        """tokens [B, T] int -> logits [B, T, V] (or hidden [B, T, D]); with a cache, (out, cache).

        attention_mask: None (causal), [B, T] padding mask (1 = real), or an explicit boolean
        [B, T, T_kv] / [B, 1, T, T_kv] mask used as given (T_kv = T, or S_max with a cache).
        positions: [B, T] int; default see module docstring.
        """
        b, t = tokens.shape
        explicit = attention_mask is not None and attention_mask.ndim >= 3
        padding = None if attention_mask is None or explicit else attention_mask.astype(bool)
        if padding is not None and padding.shape != (b, t):
            raise ValueError(f"padding attention_mask of shape {padding.shape} does not match tokens {(b, t)}")
        if cache is None:
            index, kv_len = None, t
            mask = explicit_mask(attention_mask, b, t, t) if explicit else causal_mask(b, t, padding)
            if positions is None and padding is not None:
                positions = positions_from_padding(padding)
            elif positions is None:
                positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        else:
            index, kv_len = cache.index, cache.max_len
            if t > kv_len:
                raise ValueError(f"{t} tokens do not fit a cache of {kv_len} slots")
            new = jnp.ones((b, t), bool) if padding is None else padding
            valid = jax.lax.dynamic_update_slice(cache.valid, new, (0, index))
            if explicit:
                mask = explicit_mask(attention_mask, b, t, kv_len)
            else:
                slots = jnp.arange(kv_len)
                mask = (slots[None, None, :] <= (index + jnp.arange(t))[None, :, None]) & valid[:, None, :]
            if positions is None:
                counts = jax.lax.dynamic_slice_in_dim(jnp.cumsum(valid.astype(jnp.int32), axis=1), index, t, axis=1)
                positions = jnp.maximum(counts - 1, 0)
        cos, sin = rope_angles(positions, self.config)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer(x, cos, sin, mask, kv, index)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        x = self.norm(x)
        out = x if return_hidden else self.logits(x)
        if cache is None:
            return out
        return out, KVCache(tuple(new_keys), tuple(new_values), valid, index + t)

    def branch_step(self, tokens: Array, positions: Array, prefix: KVCache, prefix_len: Array,
                    branch_kv: tuple[tuple[Array, ...], tuple[Array, ...]], step: Array
                    ) -> tuple[Array, tuple[tuple[Array, ...], tuple[Array, ...]]]:
        """One decode step of M branches per row from a shared prefix cache, read in place.

        tokens, positions [B, M] int: the token each branch feeds now and its RoPE position.
        prefix: the rows' cache (slots [B, S]); branch m of row b reads the slots s < prefix_len[b, m]
        with prefix.valid[b, s], never copying them. branch_kv: per layer (keys, values)
        [B, M, W, K, H] from `init_branch_cache`; this step's keys and values go to slot `step`
        (int32 [], shared: the branches decode in lockstep) and the branch reads its slots <= step.
        Returns logits [B, M, V] float32 and the updated branch_kv. For one branch this equals
        `__call__` on the prefix's visible tokens followed by the branch's tokens.
        """
        prefix_mask = (jnp.arange(prefix.max_len)[None, None, :] < prefix_len[:, :, None]) & prefix.valid[:, None, :]
        cos, sin = rope_angles(positions, self.config)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            x, kv = layer.branch_step(x, cos, sin, (prefix.keys[i], prefix.values[i]), prefix_mask,
                                      (branch_kv[0][i], branch_kv[1][i]), step)
            new_keys.append(kv[0])
            new_values.append(kv[1])
        return self.logits(self.norm(x)), (tuple(new_keys), tuple(new_values))
