"""Decoder building blocks: RMSNorm, RoPE, GQA attention and the SwiGLU MLP.

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
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from topd_jax.models.config import ModelConfig, RopeConfig
from topd_jax.models.masks import Visibility, dense_mask
from topd_jax.models.sharding import context_mesh, logical_to_spec

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


def attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """softmax(q k^T / sqrt(H) + log mask) v with grouped kv heads.

    q [B, T, N, H], k and v [B, S, K, H] (N a multiple of K: query head n reads kv head n // (N/K)),
    mask [B, T, S] bool (True: key visible). A row with no visible key gets a uniform average
    instead of NaN. Pure, so decoding can pass any concatenation of cached keys (e.g. a shared
    prefix cache followed by a branch-local one) with the matching mask.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attend(q: Array, k: Array, v: Array, vis: Visibility, *, block_q: int = 512,
                     block_k: int = 512) -> Array:
    """`attend` without the [T, S] scores: online softmax over key blocks, memory O(T x block).

    q [B, T, N, H], k and v [B, S, K, H] (grouped kv heads as in `attend`); `vis` the per-token
    visibility (masks.Visibility), evaluated per [block_q, block_k] tile. For each query block
    and key block j, with s_j = q k_j^T / sqrt(H) masked to -inf where not visible,

        m_j = max(m_{j-1}, max s_j),  l_j = l_{j-1} e^(m_{j-1} - m_j) + sum e^(s_j - m_j),
        acc_j = acc_{j-1} e^(m_{j-1} - m_j) + e^(s_j - m_j) v_j,      out = acc / l

    in float32. A query with no visible key gets the mean of all S values, exactly as `attend`'s
    softmax over all-masked scores. The query blocks are a `lax.map` and the key blocks a
    `lax.scan`, each rematerialised (`jax.checkpoint`), so the backward pass recomputes the
    tiles instead of storing them: peak temporaries hold O(block_q x S) scores per query block
    at most, never [T, S]. Block sizes need not divide T or S (both are padded; padded keys are
    invisible, padded queries dropped). Tiles that `vis.causal_len` proves invisible (a query
    block wholly inside the known-causal queries against keys after its last query) are skipped
    by a `lax.cond` on the block indices alone (no data, so no cross-device reduction): a causal
    pass computes about half of the tiles.
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    scale = 1.0 / math.sqrt(h)
    v_mean = jnp.mean(v.astype(jnp.float32), axis=1)  # [B, K, H]: the all-masked row's output

    def blocks(x, axis, count, size, value=0):  # [B, L, ...] -> [count, B, size, ...]
        x = _pad_axis(x, axis, count * size, value)
        x = x.reshape(x.shape[:axis] + (count, size) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    qb = blocks(q.reshape(b, t, kv, g, h), 1, nq, bq)  # [nq, B, bq, K, G, H]
    kb, vb = blocks(k, 1, nk, bk), blocks(v, 1, nk, bk)  # [nk, B, bk, K, H]
    q_meta = tuple(blocks(x, 1, nq, bq, fill) for x, fill in ((vis.q_slot, 0), (vis.q_end, 0), (vis.q_window, -1)))
    k_valid, k_window = blocks(vis.k_valid, 1, nk, bk, False), blocks(vis.k_window, 1, nk, bk, -1)
    k_slot = jnp.arange(nk * bk, dtype=jnp.int32).reshape(nk, 1, bk)

    def key_step(carry, tile, query, q_slot, q_end, q_window):
        m_prev, l_prev, acc = carry
        key, value, valid, window, slot = tile
        scores = jnp.einsum("bqkgh,bskh->bkgqs", query, key, preferred_element_type=jnp.float32) * scale
        sequence = (window[:, None, :] < 0) & (slot[:, None, :] < q_end[:, :, None])
        own = (window[:, None, :] >= 0) & (window[:, None, :] == q_window[:, :, None]) \
            & (slot[:, None, :] <= q_slot[:, :, None])
        visible = (valid[:, None, :] & (sequence | own))[:, None, None]  # [B, 1, 1, bq, bk]
        scores = jnp.where(visible, scores, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(scores, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        probs = jnp.exp(scores - m_safe[..., None])
        correction = jnp.exp(m_prev - m_safe)
        l_new = l_prev * correction + jnp.sum(probs, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgqs,bskh->bkgqh", probs.astype(value.dtype), value,
                                                       preferred_element_type=jnp.float32)
        return (m_new, l_new, acc), None

    causal = vis.causal_len

    def tile_step(carry, tile, q_start, *query):
        compute = jax.checkpoint(lambda c: key_step(c, tile, *query)[0])
        if causal == 0:
            return compute(carry), None
        k_start = tile[-1][0, 0]  # the tile's first key slot (k_slot [1, bk])
        hidden = (q_start + bq <= causal) & (k_start >= q_start + bq)
        return jax.lax.cond(hidden, lambda c: c, compute, carry), None

    @jax.checkpoint
    def query_block(inputs):
        q_start, query, q_slot, q_end, q_window = inputs
        step = lambda c, x: tile_step(c, x, q_start, query, q_slot, q_end, q_window)  # noqa: E731
        init = (jnp.full((b, kv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g, bq), jnp.float32),
                jnp.zeros((b, kv, g, bq, h), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, k_valid, k_window, k_slot))
        out = jnp.where((l > 0)[..., None], acc / jnp.where(l > 0, l, 1.0)[..., None], v_mean[:, :, None, None, :])
        return jnp.moveaxis(out, 3, 1)  # [B, bq, K, G, H]

    q_starts = jnp.arange(nq, dtype=jnp.int32) * bq
    out = jax.lax.map(query_block, (q_starts, qb, *q_meta))  # [nq, B, bq, K, G, H]
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, n, h)[:, :t]
    return out.astype(v.dtype)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _sees_a_key(k_valid: Array) -> Array:
    """[B, C] bool: causal query i has a visible key (a real key at a slot <= i)."""
    return jnp.cumsum(k_valid.astype(jnp.int32), axis=1) > 0


def _causal_segments(k_valid: Array) -> tuple[Array, Array]:
    """(q_seg, k_seg) [B, C] int32 for a fused causal kernel that masks by segment equality:
    real keys are segment 1, padding 0; query i is segment 1 when it has a visible key
    (`_sees_a_key`) and 0 otherwise, so it then reads padding (at least its own slot) instead
    of an empty row, and its output is replaced afterwards (`_fused`)."""
    return _sees_a_key(k_valid).astype(jnp.int32), k_valid.astype(jnp.int32)


def splash_causal(q: Array, k: Array, v: Array, k_valid: Array, *, block: int) -> Array:
    """Causal attention of q [B, C, N, H] over k, v [B, C, K, H] (keys masked by k_valid [B, C])
    with the Pallas TPU splash-attention kernel that ships with JAX
    (`jax.experimental.pallas.ops.tpu.splash_attention`): flash attention with block-sparse
    skipping of the masked upper triangle, forward and backward, never a [C, C] array.

    Mosaic kernels cannot be partitioned automatically, so under a context mesh the kernel runs
    inside `jax.shard_map`: batch split by the `batch` rule, heads by the `q_heads` / `kv_heads`
    rules (both on the same mesh axes, else heads stay whole), each device running the kernel on
    its own rows and heads. On a non-TPU platform the kernel runs in Pallas interpret mode (how
    the tests check it on CPU). C must be a multiple of the kernel block (`_fused` pads it).
    Rows whose query has no visible key read padding (`_causal_segments`); the caller fixes them.
    """
    b, c, n, h = q.shape
    interpret = target_platform() != "tpu"
    q = (q.astype(jnp.float32) / math.sqrt(h)).astype(q.dtype)  # the kernel does not scale
    q_seg, k_seg = _causal_segments(k_valid)
    sizes = dict.fromkeys(("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                           "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"), block)

    def local(q, k, v, q_seg, k_seg):  # one device's rows and heads
        heads = q.shape[2]
        mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((c, c)) for _ in range(heads)])
        kernel = splash.make_splash_mha(mask, block_sizes=splash.BlockSizes(**sizes), head_shards=1,
                                        q_seq_shards=1, interpret=interpret)

        def row(q, k, v, q_seg, k_seg):  # the kernel's layout: [heads, C, H]
            out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                         segment_ids=splash.SegmentIds(q_seg, k_seg))
            return out.swapaxes(0, 1)

        return jax.vmap(row)(q, k, v, q_seg, k_seg)

    mesh = context_mesh()
    if mesh is None:
        return local(q, k, v, q_seg, k_seg)
    q_spec = logical_to_spec(("batch", None, "q_heads", None), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # grouped heads must stay together on a device
        q_spec = kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, q_seg, k_seg)


def cudnn_causal(q: Array, k: Array, v: Array, k_valid: Array, *, block: int) -> Array:
    """Causal attention of q [B, C, N, H] over k, v [B, C, K, H] (keys masked by k_valid [B, C])
    through `jax.nn.dot_product_attention`: the cuDNN fused flash kernel on a GPU
    (implementation "cudnn"), XLA's own implementation elsewhere (how the tests check it on CPU).

    cuDNN masks by sequence lengths, not per-key flags, so each row is first reordered with its
    real tokens first (a stable sort: their order, hence causality among them, is kept) and
    `key_value_seq_lengths` = the row's real tokens; the output is put back in the original order.
    Exact for every query that reads all real keys before it and none after: every real token,
    and the padding before and after a row's real tokens (left-padded prompts, the padding after
    EOS). A padding query between real tokens (never read by the models) sees all of the row's
    real keys instead of those before it. Rows whose query has no visible key: see `_fused`.
    """
    del block  # cuDNN picks its own tiles
    order = jnp.argsort(~k_valid.astype(bool), axis=1, stable=True)  # [B, C]: real slots first
    gather = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
    lengths = jnp.maximum(jnp.sum(k_valid.astype(jnp.int32), axis=1), 1)
    impl = "cudnn" if target_platform() == "gpu" else None
    out = jax.nn.dot_product_attention(gather(q), gather(k), gather(v), is_causal=True,
                                       key_value_seq_lengths=lengths, implementation=impl)
    inverse = jnp.argsort(order, axis=1)
    return jnp.take_along_axis(out, inverse[:, :, None, None], axis=1)


def _fused(causal_kernel, granule: int):
    """A backend that serves the known-causal queries [0, C) of a Visibility (C = causal_len)
    with `causal_kernel` over keys [0, C), and the rest (look-ahead windows) with
    `blockwise_attend` over all S keys; their outputs are concatenated, not merged, because the
    two query sets are disjoint and a sequence query never reads a window key. C is padded to a
    multiple of the kernel block (a multiple of `granule`; padded keys are invisible). A causal
    query with no visible key gets the mean of all S values, as in `attend`."""

    def backend(q, k, v, vis, block):
        c = vis.causal_len
        if c == 0:
            return blockwise_attend(q, k, v, vis, block_q=block, block_k=block)
        tile = min(_round_up(block, granule), _round_up(c, granule))
        padded = _round_up(c, tile)
        pad = lambda x, value=0: _pad_axis(x[:, :c], 1, padded, value)
        valid = vis.k_valid[:, :c]
        out = causal_kernel(pad(q), pad(k), pad(v), pad(valid, False), block=tile)[:, :c]
        seen = _sees_a_key(valid)[:, :, None, None]
        v_mean = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True)  # [B, 1, K, H]
        v_mean = jnp.repeat(v_mean, q.shape[2] // v.shape[2], axis=2).astype(out.dtype)
        out = jnp.where(seen, out, v_mean)
        if c == q.shape[1]:
            return out
        rest = blockwise_attend(q[:, c:], k, v, vis.queries(c), block_q=block, block_k=block)
        return jnp.concatenate([out, rest.astype(out.dtype)], axis=1)

    return backend


def target_platform() -> str:
    """The platform the program being traced runs on: the context mesh's devices (a TPU
    topology's when the plan compiles for one from a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


# Attention backends, one entry each: (q [B, T, N, H], k/v [B, S, K, H], Visibility, block) -> [B, T, N, H].
ATTENTION_BACKENDS = {
    "dense": lambda q, k, v, vis, block: attend(q, k, v, dense_mask(vis)),
    "blockwise": lambda q, k, v, vis, block: blockwise_attend(q, k, v, vis, block_q=block, block_k=block),
    "splash": _fused(splash_causal, 128),  # TPU (Pallas interpret mode elsewhere)
    "cudnn": _fused(cudnn_causal, 1),  # GPU (XLA's implementation elsewhere)
}
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)
# `auto` keeps exact dense attention while the score matrix is small (tiny models, tests, the
# miniature: faster, and bit-identical to the reference) and above this picks the platform's
# fused kernel (AUTO_FUSED), else blockwise.
AUTO_DENSE_MAX_SCORES = 1 << 20
AUTO_FUSED = {"tpu": "splash", "gpu": "cudnn"}
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's flash kernel takes half precision only


def auto_backend(q: Array, k: Array) -> str:
    """What impl='auto' runs for q [B, T, N, H] against k [B, S, K, H] on `target_platform()`."""
    if q.shape[1] * k.shape[1] <= AUTO_DENSE_MAX_SCORES:
        return "dense"
    fused = AUTO_FUSED.get(target_platform(), "blockwise")
    if fused == "cudnn" and q.dtype not in CUDNN_DTYPES:
        return "blockwise"
    return fused


def attention(q: Array, k: Array, v: Array, mask: Array | Visibility, *, impl: str = "auto",
              block: int = 512) -> Array:
    """The one attention entry point. mask: a Visibility (any backend) or an explicit dense
    [B, T, S] bool mask (dense only). impl: a name of ATTENTION_BACKENDS or 'auto'
    (`auto_backend`: dense for small score matrices or an explicit mask, else the platform's
    fused kernel for the known-causal queries and blockwise for the rest)."""
    if not isinstance(mask, Visibility):
        if impl not in ("auto", "dense"):
            raise ValueError(f"attention impl {impl!r} needs a Visibility; an explicit [B, T, S] mask is dense only")
        return attend(q, k, v, mask)
    if impl == "auto":
        impl = auto_backend(q, k)
    if impl not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    return ATTENTION_BACKENDS[impl](q, k, v, mask, block)


def attend_branches(q: Array, prefix_k: Array, prefix_v: Array, prefix_mask: Array,
                    branch_k: Array, branch_v: Array, branch_mask: Array) -> Array:
    """Attention of one query per branch over a shared prefix cache plus the branch's own cache.

    q [B, M, N, H]: branch m of row b. prefix_k, prefix_v [B, S, K, H]: the row's cache, shared by
    its M branches and read in place. branch_k, branch_v [B, M, W, K, H]: each branch's own slots.
    prefix_mask [B, M, S], branch_mask [B, M, W] bool (True: visible). With s_p = q k_p / sqrt(H)
    over the prefix slots and s_w = q k_w / sqrt(H) over the branch slots,

        out = softmax([s_p | s_w]) [v_p | v_w] = (sum_p e^s_p v_p + sum_w e^s_w v_w) / Z,

    one softmax over the concatenated score blocks; only scores [B, K, G, M, S + W] are built, never a
    per-branch copy [B, M, S, K, H] of the prefix keys or values. Equals `attend` on the
    concatenation [prefix | branch] (a row with no visible key gets a uniform average likewise).
    """
    b, m, n, h = q.shape
    kv = prefix_k.shape[2]
    q = q.reshape(b, m, kv, n // kv, h)
    s_prefix = jnp.einsum("bmkgh,bskh->bkgms", q, prefix_k, preferred_element_type=jnp.float32)
    s_branch = jnp.einsum("bmkgh,bmwkh->bkgmw", q, branch_k, preferred_element_type=jnp.float32)
    mask = jnp.concatenate([prefix_mask, branch_mask], axis=-1)[:, None, None]  # [B, 1, 1, M, S + W]
    scores = jnp.concatenate([s_prefix, s_branch], axis=-1) / math.sqrt(h)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(prefix_v.dtype)
    s = prefix_k.shape[1]
    out = (jnp.einsum("bkgms,bskh->bmkgh", probs[..., :s], prefix_v)
           + jnp.einsum("bkgmw,bmwkh->bmkgh", probs[..., s:], branch_v))
    return out.reshape(b, m, n, h)


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

    def branch_step(self, x: Array, cos: Array, sin: Array, prefix_kv: tuple[Array, Array], prefix_mask: Array,
                    branch_kv: tuple[Array, Array], step: Array) -> tuple[Array, tuple[Array, Array]]:
        """One decode step of M branches per row that share a prefix cache (see `attend_branches`).

        x [B, M, D] (one token per branch), cos/sin [B, M, H]; prefix_kv (k, v) [B, S, K, H] read
        in place under prefix_mask [B, M, S]; branch_kv (k, v) [B, M, W, K, H], this step's key and
        value written at slot `step`, then the branch reads its slots <= step.
        Returns ([B, M, D], updated branch_kv).
        """
        q, k, v = self.project(x, cos, sin)  # q [B, M, N, H], k/v [B, M, K, H]
        start = (0, 0, step, 0, 0)
        bk = jax.lax.dynamic_update_slice(branch_kv[0], k[:, :, None].astype(branch_kv[0].dtype), start)
        bv = jax.lax.dynamic_update_slice(branch_kv[1], v[:, :, None].astype(branch_kv[1].dtype), start)
        own = jnp.arange(bk.shape[2]) <= step  # [W], the same for every branch (lockstep decoding)
        out = attend_branches(q, prefix_kv[0].astype(q.dtype), prefix_kv[1].astype(q.dtype), prefix_mask,
                              bk.astype(q.dtype), bv.astype(q.dtype), jnp.broadcast_to(own, bk.shape[:3]))
        return self.output(out), (bk, bv)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array | Visibility,
                 kv: tuple[Array, Array] | None = None, index: Array | None = None, *, impl: str = "auto",
                 block: int = 512) -> tuple[Array, tuple[Array, Array]]:
        """x [B, T, D] -> ([B, T, D], this call's (k, v) [B, T, K, H]). With a cache kv = (k, v)
        [B, S, K, H] (one layer's), the new keys and values are placed at slots [index, index + T)
        and the queries attend over all S slots; the caller writes the returned (k, v) into its
        cache. mask: a Visibility, or an explicit dense mask; impl/block: see `attention`."""
        q, k, v = self.project(x, cos, sin)
        new = (k, v)
        if kv is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=impl, block=block)
        return self.output(out), new


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
