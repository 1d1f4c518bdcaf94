"""Attention kernels and the table of backends: `attention` is the one entry point of every model.

    out = attention(q, k, v, mask, impl="auto", block=512)  # q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H]

Every backend computes the same grouped-query attention (query head n reads kv head n // G):

    out[b, t, n] = sum_s softmax_s(q[b, t, n] . k[b, s, n // G] / sqrt(H) | visible) v[b, s, n // G]

with the softmax in float32 over the visible keys; a query with no visible key gets the mean of
all S values, never NaN. `mask` is a `masks.Visibility` (per-token metadata, every backend) or an
explicit [B, T, S] bool mask (dense only). Shapes: B batch, T query tokens, S key slots, N query
heads, K kv heads (G = N / K), H head_dim, C = `Visibility.causal_len` the known-causal queries
(prompt + rollout: queries [0, C) read keys [0, C) causally; the look-ahead windows follow them).

ATTENTION_BACKENDS, name -> (q, k, v, vis, block) -> out:

    dense      `attend`: the full [B, K, G, T, S] scores, memory O(T S); the exact reference,
               any platform
    blockwise  `blockwise_attend`: online softmax over [block, block] tiles (query blocks a
               `lax.map`, key blocks a `lax.scan`, both rematerialised), never [T, S]; any platform
    splash     queries [0, C) by `splash_causal`, the rest (windows) by `blockwise_attend`; for
               TPU (elsewhere the kernel runs in Pallas interpret mode, how the tests check it)
    cudnn      queries [0, C) by `cudnn_causal`, the windows by `blockwise_attend`; for GPU with
               bfloat16 / float16 (elsewhere XLA's implementation of the same call)
    auto       `auto_backend`: dense while T x S <= AUTO_DENSE_MAX_SCORES (2^20), above that the
               platform's fused kernel (AUTO_FUSED; cudnn only for CUDNN_DTYPES), else blockwise

The fused kernels are the ones that ship with JAX, so none is maintained here. On TPU that is the
Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`): flash
attention that skips the masked upper-triangle blocks, with its own backward kernels, masking by
a causal block mask plus segment ids; a Mosaic kernel is not partitioned automatically, so under
a mesh it runs in `jax.shard_map`. On GPU it is `jax.nn.dot_product_attention(...,
implementation="cudnn")`, JAX's entry to cuDNN's fused flash kernel, which masks by a causal flag
plus per-row key lengths (rows are reordered real tokens first). Neither takes the windows' mask
(a window query reads the prefix and its own window), so `_fused` serves those by blockwise.
The platform is `target_platform()`: the context mesh's devices (a TPU topology's when the plan
compiles for one from a CPU host), else JAX's default backend.

ATTENTION_CHOICES ("auto" and the table's names) is the one list of allowed values: the model's
`ModelConfig.attention` and the trainer's `model.attention` are checked against it.
Decoding reads the stacked cache in place through one online softmax over key blocks:
`decode_attend` (one query per row, a sampling step) and `attend_branches` (one query per branch
over a prefix cache the row's branches share plus each branch's own slots).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from topd_jax.models.masks import Visibility, dense_mask
from topd_jax.models.sharding import context_mesh, logical_to_spec

Array = jax.Array


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


def _fold(state, x, visible, v, spec):
    """One block of an online softmax: state (m, l, acc) [B, K, G, M] / [B, K, G, M, H], scores x
    [B, K, G, M, W] float32, visible broadcastable to x, values v (einsum `spec` with the probs)."""
    m, l, acc = state
    x = jnp.where(visible, x, jnp.finfo(jnp.float32).min)
    m_new = jnp.maximum(m, jnp.max(x, axis=-1))
    p = jnp.where(visible, jnp.exp(x - m_new[..., None]), 0.0)
    scale = jnp.exp(m - m_new)
    acc = acc * scale[..., None] + jnp.einsum(spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * scale + jnp.sum(p, axis=-1), acc


def _cache_blocks(q: Array, cache_k: Array, cache_v: Array, layer: Array | int, visible, end: Array | int,
                  block: int):
    """Online-softmax state of queries q [B, K, G, M, H] (scaled) over layer `layer` of the stacked
    cache [B, L, S, K, H], its slots [0, end) read in key blocks of W = min(block, S) sliced straight
    from the stacked buffer (never the layer's whole [B, S, K, H]). visible(slots [W]) -> bool
    [B, M, W] for the slots of a block; a block past S is moved back to end at S, its slots already
    read masked. The block loop's trip count is ceil(end / W) (`lax.fori_loop`; static when end is)."""
    b, kv, g, m, h = q.shape
    s = cache_k.shape[2]
    width = min(block, s)

    def body(j, state):
        start = jnp.minimum(j * width, s - width)
        k, v = (jax.lax.dynamic_slice(c, (0, layer, start, 0, 0), (b, 1, width, kv, h))[:, 0].astype(q.dtype)
                for c in (cache_k, cache_v))
        slots = start + jnp.arange(width)
        seen = (visible(slots) & (slots >= j * width))[:, None, None]  # [B, 1, 1, M, W]
        x = jnp.einsum("bkgmh,bwkh->bkgmw", q, k, preferred_element_type=jnp.float32)
        return _fold(state, x, seen, v, "bkgmw,bwkh->bkgmh")

    init = (jnp.full((b, kv, g, m), jnp.finfo(jnp.float32).min), jnp.zeros((b, kv, g, m)),
            jnp.zeros((b, kv, g, m, h)))
    return jax.lax.fori_loop(0, (end + width - 1) // width, body, init)


def _finish(state, shape, dtype) -> Array:
    """out = acc / l as [B, M, N, H] (zeros for a query that saw no key)."""
    _, l, acc = state
    out = jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0)  # [B, K, G, M, H]
    return jnp.moveaxis(out, 3, 1).reshape(shape).astype(dtype)


def _grouped(q: Array, kv: int) -> Array:
    """q [B, M, N, H] -> [B, K, G, M, H] scaled by 1 / sqrt(H) (query head n reads kv head n // G)."""
    b, m, n, h = q.shape
    return jnp.moveaxis(q.reshape(b, m, kv, n // kv, h), 1, 3) / math.sqrt(h)


def decode_attend(q: Array, cache_k: Array, cache_v: Array, layer: Array | int, vis: Visibility, *,
                  block: int = 512) -> Array:
    """One query token per row against layer `layer` of the stacked cache, read in place and only
    where it is filled: q [B, 1, N, H], cache_k/v [B, L, S, K, H] -> [B, 1, N, H].

    The query reads the real keys at slots < e = vis.q_end (a decode step at slot `index` has
    e = index + 1; sequence keys only). Key blocks j = 0 .. ceil(max e / W) - 1 of W = min(block, S)
    slots are each sliced straight from the stacked cache and folded into an online softmax, as
    flash attention does:

        m_j = max(m_{j-1}, max_s x_s),  l_j = l_{j-1} e^(m_{j-1} - m_j) + sum_s e^(x_s - m_j),
        a_j = a_{j-1} e^(m_{j-1} - m_j) + sum_s e^(x_s - m_j) v_s,      out = a / l,

    x_s = q . k_s / sqrt(H) over the block's visible keys. So a step reads the e filled slots, not
    all S: on average P + N / 2 of the P + N a rollout allocates. The trip count is ceil(max e / W),
    static when the cache index is (the plan compiles a step at a fixed index). Equals `attend` on
    the visible keys up to float summation order; a row with no visible key (never in decoding:
    every prompt holds a real token) gets zeros.
    """
    end = vis.q_end[:, 0]  # [B]
    state = _cache_blocks(_grouped(q, cache_k.shape[3]), cache_k, cache_v, layer,
                          lambda slots: (vis.k_valid[:, slots] & (slots[None] < end[:, None]))[:, None],
                          jnp.max(end), block)
    return _finish(state, q.shape, q.dtype)


def attend_branches(q: Array, cache_k: Array, cache_v: Array, layer: Array | int, prefix_len: Array,
                    k_valid: Array, branch_k: Array, branch_v: Array, branch_mask: Array, *, block: int = 512,
                    prefix_end: int | None = None) -> Array:
    """Attention of one query per branch over a prefix cache its row's branches share plus the
    branch's own slots: q [B, M, N, H] (branch m of row b) -> [B, M, N, H].

    Prefix: layer `layer` of the stacked cache [B, L, S, K, H], read in place in key blocks as
    `decode_attend` reads it; branch m reads slot s when s < prefix_len[b, m] and k_valid[b, s]
    ([B, M] and [B, S]). Own slots: branch_k, branch_v [B, M, W, K, H] under branch_mask [B, M, W].
    One online softmax over both (`decode_attend`'s equations), so the result is

        out = softmax([s_p | s_w]) [v_p | v_w] = (sum_p e^s_p v_p + sum_w e^s_w v_w) / Z,

    and no per-branch copy [B, M, S, K, H] of the prefix exists: each prefix block is read once for
    the M branches of its row. Blocks up to max prefix_len are read, or to `prefix_end` (a static
    bound on prefix_len: the plan's fixed-cost step). Equals `attend` on the concatenation
    [prefix | branch] up to float summation order; a branch that sees no key gets zeros.
    """
    kv = cache_k.shape[3]
    qg = _grouped(q, kv)
    end = jnp.max(prefix_len) if prefix_end is None else prefix_end
    state = _cache_blocks(qg, cache_k, cache_v, layer,
                          lambda slots: k_valid[:, None, slots] & (slots[None, None] < prefix_len[:, :, None]),
                          end, block)
    x = jnp.einsum("bkgmh,bmwkh->bkgmw", qg, branch_k.astype(q.dtype), preferred_element_type=jnp.float32)
    state = _fold(state, x, branch_mask[:, None, None], branch_v.astype(q.dtype), "bkgmw,bmwkh->bkgmh")
    return _finish(state, q.shape, q.dtype)
