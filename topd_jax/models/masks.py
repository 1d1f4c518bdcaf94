"""Attention masks and position ids: plain causal, padded, cached, and packed look-ahead trees.

Masks are boolean, True where a query may read a key: [B, T_q, T_kv]. `CausalLM.__call__` takes
a [B, T] padding mask (1 for real tokens; combined with causality here), a `Visibility` (per-token
metadata from which attention derives each block's mask, so no [T, S] array exists: what the
memory-efficient backends need), or an explicit [B, T_q, T_kv] / [B, 1, T_q, T_kv] mask that is
used exactly as given (dense attention only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def positions_from_padding(padding_mask: Array) -> Array:
    """[B, T] int32: the number of real tokens before each token (0 on leading padding).

    Equals arange(T) without padding; makes left-padded rows start at position 0.
    """
    return jnp.maximum(jnp.cumsum(padding_mask.astype(jnp.int32), axis=-1) - 1, 0)


def check_left_padded(prompt_mask: Array) -> None:
    """One-line error unless every prompt row is left-padded with a real last token.

    Decoding and scoring read the token after the prompt from the prompt's last column, so a
    right-padded prompt would be continued after a pad. Checked on concrete arrays only (inside
    a trace the values are unknown; a multi-host array spans hosts, so its loader checks it).
    """
    if isinstance(prompt_mask, jax.Array) and not isinstance(prompt_mask, jax.core.Tracer) \
            and not prompt_mask.is_fully_addressable:
        return
    try:
        values = np.asarray(prompt_mask).astype(bool)
    except jax.errors.TracerArrayConversionError:
        return
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"prompt_mask must be [B, P] with P >= 1, got shape {values.shape}")
    bad = np.flatnonzero(~values[:, -1])
    if bad.size:
        raise ValueError(f"prompts must be left-padded (a real token in the last column); rows {bad[:8].tolist()} "
                         "end in padding")


def causal_mask(batch: int, length: int, padding_mask: Array | None = None) -> Array:
    """[B, T, T]: token i reads tokens j <= i that are real (padding_mask [B, T], 1 = real)."""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[None, :] <= idx[:, None], (batch, length, length))
    if padding_mask is not None:
        mask = mask & padding_mask.astype(bool)[:, None, :]
    return mask


def explicit_mask(mask: Array, batch: int, q_len: int, kv_len: int) -> Array:
    """Validate an explicit [B, T_q, T_kv] or [B, 1, T_q, T_kv] mask and return it as [B, T_q, T_kv]."""
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"a 4-d attention_mask must be [B, 1, T_q, T_kv], got shape {mask.shape}")
        mask = mask[:, 0]
    if mask.shape != (batch, q_len, kv_len):
        raise ValueError(f"attention_mask of shape {mask.shape} does not match [B, T_q, T_kv] = "
                         f"{(batch, q_len, kv_len)}")
    return mask.astype(bool)


def tree_attention_mask(branch_points: Array, window_len: int, seq_len: int, *,
                        positions: Array | None = None,
                        padding_mask: Array | None = None) -> tuple[Array, Array]:
    """Mask and positions for a rollout packed with M look-ahead windows (TOPD.md section 5).

    The packed sequence is [rollout (T tokens) | window 0 (K) | ... | window M-1 (K)], length
    P = T + M K. Window m replaces the rollout from index t_m = branch_points[b, m] on:
      - rollout token i reads rollout tokens j <= i (causal);
      - window m's token k reads rollout tokens j < t_m and its own window's tokens k' <= k,
        never another window, and sits at position pos(t_m) + k, where pos(t_m) is the number of
        real tokens before index t_m (with explicit `positions`: positions[t_m], and t_m = T
        continues after the last token).
    So window m's logits equal those of the sequence rollout[:t_m] + window m run on its own.

    Args:
      branch_points: [B, M] int indices in [0, T] (values outside are clipped).
      window_len: K.
      seq_len: T.
      positions: [B, T] rollout positions (default: from padding_mask, else arange).
      padding_mask: [B, T] 1 for real rollout tokens; padding is never read.
    Returns:
      mask [B, P, P] bool and positions [B, P] int32.
    """
    b, m = branch_points.shape
    k, t = window_len, seq_len
    pad = jnp.ones((b, t), bool) if padding_mask is None else padding_mask.astype(bool)
    branch = jnp.clip(branch_points.astype(jnp.int32), 0, t)
    if positions is None:
        positions = positions_from_padding(pad)
        # A window starts at the number of real tokens before its branch point, also when that
        # index is padding (a branch past a row's end continues right after its last token).
        real_before = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(pad.astype(jnp.int32), axis=1)], axis=1)
        start = jnp.take_along_axis(real_before, branch, axis=1)  # [B, M]
    else:
        positions = positions.astype(jnp.int32)
        extended = jnp.concatenate([positions, positions[:, -1:] + 1], axis=1)  # pos(T) = last + 1
        start = jnp.take_along_axis(extended, branch, axis=1)  # [B, M]

    rollout_rows = jnp.concatenate([causal_mask(b, t, pad), jnp.zeros((b, t, m * k), bool)], axis=-1)
    sees_prefix = (jnp.arange(t)[None, None, :] < branch[:, :, None]) & pad[:, None, :]  # [B, M, T]
    sees_prefix = jnp.repeat(sees_prefix, k, axis=1)  # [B, M*K, T]
    own = np.kron(np.eye(m, dtype=bool), np.tril(np.ones((k, k), bool)))  # [M*K, M*K] block-causal
    window_rows = jnp.concatenate([sees_prefix, jnp.broadcast_to(own, (b, m * k, m * k))], axis=-1)
    mask = jnp.concatenate([rollout_rows, window_rows], axis=1)

    window_pos = (start[:, :, None] + jnp.arange(k)[None, None, :]).reshape(b, m * k)
    return mask, jnp.concatenate([positions, window_pos], axis=1)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("q_slot", "q_end", "q_window", "k_valid", "k_window"), meta_fields=("causal_len",))
@dataclasses.dataclass(frozen=True)
class Visibility:
    """Which keys each query reads, as per-token metadata instead of a [T, S] mask.

    Queries [B, T]: q_slot (the query's own slot in the key sequence), q_end (it reads
    sequence keys at slots < q_end), q_window (-1: a sequence query; m >= 0: a token of
    look-ahead window m). Keys [B, S]: k_valid (a real token), k_window (-1: a sequence key;
    m: a token of window m). Query i reads key j when

        k_valid[j] and ((k_window[j] < 0 and j < q_end[i])
                        or (k_window[j] >= 0 and k_window[j] == q_window[i] and j <= q_slot[i]))

    which covers every mask the models use: causal with padding (q_end = i + 1), a prefill or
    decode step against a cache (q_end = index + i + 1), and the packed look-ahead tree (window m
    reads the sequence before its branch point and its own earlier tokens). Attention backends
    evaluate it per block of queries and keys (`block_mask`), so no [T, S] array is built.

    causal_len C (static, pytree metadata): the first C queries are known to be plain causal
    from slot 0 (q_slot = i, q_end = i + 1, q_window = -1, and keys < C are sequence keys), so a
    fused causal kernel may serve them, masking only by k_valid; 0 when that is not known (a
    prefill at a traced cache index). The remaining queries (look-ahead windows) are served by
    the blockwise path.
    """

    q_slot: Array
    q_end: Array
    q_window: Array
    k_valid: Array
    k_window: Array
    causal_len: int = 0

    def queries(self, start: int) -> "Visibility":
        """The visibility of queries [start, T) alone (same keys; nothing known causal)."""
        return Visibility(self.q_slot[:, start:], self.q_end[:, start:], self.q_window[:, start:], self.k_valid,
                          self.k_window)


def block_mask(vis: Visibility, q: slice | Array, k: slice | Array) -> Array:
    """The visibility of query rows `q` against key columns `k` (index arrays or slices into
    the T and S axes): bool [B, tq, tk]. `dense_mask(vis)` is the whole [B, T, S]."""
    q_slot, q_end, q_window = vis.q_slot[:, q], vis.q_end[:, q], vis.q_window[:, q]
    k_valid, k_window = vis.k_valid[:, k], vis.k_window[:, k]
    k_slot = jnp.arange(vis.k_valid.shape[1])[k]
    sequence = (k_window[:, None, :] < 0) & (k_slot[None, None, :] < q_end[:, :, None])
    own = (k_window[:, None, :] >= 0) & (k_window[:, None, :] == q_window[:, :, None]) \
        & (k_slot[None, None, :] <= q_slot[:, :, None])
    return k_valid[:, None, :] & (sequence | own)


def dense_mask(vis: Visibility) -> Array:
    """[B, T, S] bool: the mask `vis` describes (for the dense backend and for tests)."""
    return block_mask(vis, slice(None), slice(None))


def causal_visibility(padding_mask: Array, *, start: Array | int = 0, key_valid: Array | None = None) -> Visibility:
    """Causal attention of T queries at slots [start, start + T) over S keys: query i reads the
    real keys at slots <= start + i. padding_mask [B, T] marks real queries' tokens; key_valid
    [B, S] the real keys (default: padding_mask, S = T)."""
    b, t = padding_mask.shape
    k_valid = padding_mask.astype(bool) if key_valid is None else key_valid.astype(bool)
    slot = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    known = isinstance(start, int) and start == 0  # a traced cache index: not known to start at 0
    return Visibility(slot, slot + 1, jnp.full((b, t), -1, jnp.int32), k_valid,
                      jnp.full(k_valid.shape, -1, jnp.int32), causal_len=t if known else 0)


def tree_visibility(branch_points: Array, window_len: int, padding_mask: Array,
                    window_mask: Array | None = None) -> tuple[Visibility, Array]:
    """`tree_attention_mask` as metadata: (Visibility of the packed [sequence | M windows of K]
    over itself, positions [B, L + M K]). window_mask [B, M, K] marks real window tokens (keys
    past a window's end are not read); default all real."""
    b, m = branch_points.shape
    k, t = window_len, padding_mask.shape[1]
    pad = padding_mask.astype(bool)
    branch = jnp.clip(branch_points.astype(jnp.int32), 0, t)
    positions = positions_from_padding(pad)
    real_before = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(pad.astype(jnp.int32), axis=1)], axis=1)
    start = jnp.take_along_axis(real_before, branch, axis=1)  # [B, M]
    window_pos = (start[:, :, None] + jnp.arange(k)[None, None, :]).reshape(b, m * k)
    slot = jnp.broadcast_to(jnp.arange(t + m * k, dtype=jnp.int32), (b, t + m * k))
    window_id = jnp.broadcast_to(jnp.repeat(jnp.arange(m, dtype=jnp.int32), k), (b, m * k))
    q_window = jnp.concatenate([jnp.full((b, t), -1, jnp.int32), window_id], axis=1)
    q_end = jnp.concatenate([slot[:, :t] + 1, jnp.repeat(branch, k, axis=1)], axis=1)
    wmask = jnp.ones((b, m * k), bool) if window_mask is None else window_mask.reshape(b, m * k).astype(bool)
    vis = Visibility(slot, q_end, q_window, jnp.concatenate([pad, wmask], axis=1), q_window, causal_len=t)
    return vis, jnp.concatenate([positions, window_pos], axis=1)
