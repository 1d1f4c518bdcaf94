"""Decoder building blocks: RMSNorm, RoPE, GQA attention and the SwiGLU MLP.

`Attention` projects, normalises and rotates q/k/v and writes the key-value cache; the attention
itself (the backends and their table) is `attention.py`'s.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds its *logical* axis names
(e.g. ("embed", "q_heads", "head_dim")); sharding.py maps them to mesh axes with a rules table.
Eager sharding is off, so a module is built the same way with or without a mesh.
Shapes: B batch, T query tokens, S key slots, D hidden, N query heads, K kv heads, H head_dim,
F MLP width, V vocab. Norms, RoPE angles and the attention softmax are computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from topd_jax.models.attention import attend_branches, attention, decode_attend
from topd_jax.models.config import ModelConfig, RopeConfig
from topd_jax.models.masks import Visibility

Array = jax.Array
INIT_STD = 0.02  # transformers' initializer_range for all four families


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init: str = "normal") -> nnx.Param:
    """A Param of `shape` named by logical `axes`: N(0, INIT_STD), ones or zeros."""
    assert len(axes) == len(shape), (axes, shape)
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back before the scale."""

    def __init__(self, dim: int, eps: float, axis_name: str, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis_name,), dtype, "ones")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """[H/2] float32 inverse frequencies theta^(-2i/H), rescaled for `linear` and `llama3`.

    llama3: with wavelength w_i = 2 pi / f_i, L = original_max_position_embeddings,
      f_i                      if w_i < L / high_freq_factor
      f_i / factor             if w_i > L / low_freq_factor
      (1 - s) f_i / factor + s f_i,  s = (L / w_i - low) / (high - low)   otherwise.
    Computed in float32 like transformers, so the angles match bit for bit.
    """
    inv = (1.0 / (np.float32(rope.theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    inv = inv.astype(np.float32)
    if rope.type == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(rope.factor), inv).astype(np.float32)
        smooth = ((old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor))
        smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_angles(positions: Array, cfg: ModelConfig) -> tuple[Array, Array]:
    """cos, sin [B, T, H] float32 for integer `positions` [B, T] (halves repeated, HF layout)."""
    inv = jnp.asarray(rope_inv_freq(cfg.rope, cfg.head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads, H] rotated by the angles [B, T, H]: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    """GQA self-attention with optional q/k RMSNorm (Qwen3), q/k/v bias (Qwen2) and o bias."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (n, h), ("q_heads", "head_dim"), dtype, "zeros")
            self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, "zeros")
            self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, "zeros")
        if cfg.o_bias:
            self.o_bias = param(rngs, (d,), ("embed",), dtype, "zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, "head_dim", dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, "head_dim", dtype=dtype, rngs=rngs)
        self.qkv_bias, self.o_bias_on, self.qk_norm = cfg.qkv_bias, cfg.o_bias, cfg.qk_norm

    def project(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """x [B, T, D] -> q [B, T, N, H], k and v [B, T, K, H], biased, q/k-normed and rotated."""
        q = jnp.einsum("btd,dnh->btnh", x, self.q_proj[...])
        k = jnp.einsum("btd,dkh->btkh", x, self.k_proj[...])
        v = jnp.einsum("btd,dkh->btkh", x, self.v_proj[...])
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, attended: Array) -> Array:
        """[..., N, H] attention output -> [..., D] through o_proj (and its bias)."""
        out = jnp.einsum("...nh,nhd->...d", attended, self.o_proj[...])
        return out + self.o_bias[...] if self.o_bias_on else out

    def branch_step(self, x: Array, cos: Array, sin: Array, prefix: tuple[Array, Array, Array, Array],
                    branch_kv: tuple[Array, Array], layer: Array, step: Array, *, block: int = 512,
                    prefix_end: int | None = None) -> tuple[Array, tuple[Array, Array]]:
        """One decode step of M branches per row that share a prefix cache (see `attend_branches`).

        x [B, M, D] (one token per branch), cos/sin [B, M, H]; prefix = (keys, values, prefix_len,
        valid): the stacked cache [B, L, S, K, H] whose layer `layer` is read in place, branch m
        reading the valid slots < prefix_len [B, M]; branch_kv (k, v) [B, L, M, W, K, H], the stacked
        branch cache of every layer: this step's key and value are written in place at layer
        `layer`, slot `step` (as `__call__` writes its cache), then the branch reads its slots
        <= step of that layer. Returns ([B, M, D], updated branch_kv).
        """
        q, k, v = self.project(x, cos, sin)  # q [B, M, N, H], k/v [B, M, K, H]
        start = (0, layer, 0, step, 0, 0)
        branch_kv = tuple(jax.lax.dynamic_update_slice(c, new[:, None, :, None].astype(c.dtype), start)
                          for c, new in zip(branch_kv, (k, v)))
        bk, bv = (jax.lax.dynamic_index_in_dim(c, layer, axis=1, keepdims=False) for c in branch_kv)
        own = jnp.arange(bk.shape[2]) <= step  # [W], the same for every branch (lockstep decoding)
        keys, values, prefix_len, valid = prefix
        out = attend_branches(q, keys, values, layer, prefix_len, valid, bk, bv, jnp.broadcast_to(own, bk.shape[:3]),
                              block=block, prefix_end=prefix_end)
        return self.output(out), branch_kv

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array | Visibility,
                 cache: tuple[Array, Array] | None = None, layer: Array | None = None, index: Array | None = None,
                 *, impl: str = "auto", block: int = 512) -> tuple[Array, tuple[Array, Array] | None]:
        """x [B, T, D] -> ([B, T, D], cache). Without a cache, attention over this call's T keys
        (cache None is returned). With cache = (keys, values) [B, L, S, K, H], the stacked cache of
        every layer, this call's keys and values are first written in place at layer `layer`, slots
        [index, index + T) (one [B, T, K, H] `dynamic_update_slice` into the carried buffer; with a
        per-row index [B], a decode step, one scatter of row r to slot index[r]), and
        only then is layer `layer` read: by a decode step (T = 1) in key blocks up to its own slot
        (`attention.decode_attend`), by a prefill as its [B, S, K, H] for the attention backend.
        Every read of the buffer follows its one write, so XLA updates it in place instead of
        copying the cache. mask: a Visibility, or an explicit dense mask; impl/block: see
        `attention`."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            if jnp.ndim(index) == 1:  # one token per row, each at its own slot (a continuous decoder)
                rows = jnp.arange(x.shape[0])
                cache = tuple(c.at[rows, layer, index].set(new[:, 0].astype(c.dtype), mode="drop")
                              for c, new in zip(cache, (k, v)))
            else:
                start = (0, layer, index, 0, 0)
                cache = tuple(jax.lax.dynamic_update_slice(c, new[:, None].astype(c.dtype), start)
                              for c, new in zip(cache, (k, v)))
            if x.shape[1] == 1 and isinstance(mask, Visibility):  # a decode step: its filled blocks only
                return self.output(decode_attend(q, *cache, layer, mask, block=block)), cache
            k, v = (jax.lax.dynamic_index_in_dim(c, layer, axis=1, keepdims=False) for c in cache)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=impl, block=block)
        return self.output(out), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), optionally with biases (Llama `mlp_bias`)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.up_proj = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.down_proj = param(rngs, (f, d), ("mlp", "embed"), dtype)
        if cfg.mlp_bias:
            self.gate_bias = param(rngs, (f,), ("mlp",), dtype, "zeros")
            self.up_bias = param(rngs, (f,), ("mlp",), dtype, "zeros")
            self.down_bias = param(rngs, (d,), ("embed",), dtype, "zeros")
        self.bias = cfg.mlp_bias

    def __call__(self, x: Array) -> Array:
        gate, up = x @ self.gate_proj[...], x @ self.up_proj[...]
        if self.bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        out = (jax.nn.silu(gate) * up) @ self.down_proj[...]
        return out + self.down_bias[...] if self.bias else out
