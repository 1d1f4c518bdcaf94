"""Token log-probs of rollouts and look-ahead windows, computed in row chunks (TOPD.md sections 1, 3, 5).

Two consumers, one mechanism:

- `score` / `score_rollout`: the teacher's (or the behaviour policy's) log-prob of every sampled
  token, q_t = log pi(y_t | x, y_<t), optionally its top-k distribution and the KV cache of the
  scored sequence (the shared prefix cache for teacher look-ahead branching). No gradient needed.
- `packed_logprobs`: the student's training forward. Each rollout is packed with its M windows
  and run ONCE under a tree-shaped attention mask (window tokens see the prefix up to t - 1 and
  their own window only, positions continue from t), returning the rollout log-probs s_t and the
  window log-probs log pi_s(v_k | x, y_<t, v_<k), differentiable in the parameters.

Both compute the final hidden states once (`return_hidden=True`), gather the rows that predict a
target token, and evaluate  log p(target) = logit[target] - logsumexp(logits)  over `chunk_size`
rows at a time (`chunked_rows`: a rematerialised `lax.map`), so only a [chunk_size, V] float32
slab of logits is ever live, in the forward and in the backward pass.

Shapes: B rollouts, P prompt tokens (left-padded), N completion tokens (right-padded after EOS),
L = P + N, M windows per rollout, K window tokens, k top-k size, V vocabulary, D hidden size.
Cache slot layout: slots [0, P) hold the prompt, slot P + t completion token t.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from topd_jax.chunking import chunked_rows
from topd_jax.models.decoder import CausalLM, KVCache, init_cache
from topd_jax.models.masks import Visibility, check_left_padded, tree_visibility

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scores:
    """What `score` returns; a pytree (fields that were not requested are None).

    logprobs:      [B, L] float32, log p(tokens[l] | tokens[<l]); 0 where there is no prediction
                   (l = 0, padding, the first real token of a left-padded row).
    topk_logprobs: [B, L, k] float32, the model's k largest log-probs at the position that
                   predicts token l (descending); 0 where logprobs is 0.
    topk_ids:      [B, L, k] int32, their token ids; 0 where logprobs is 0.
    cache:         KVCache holding every scored token in slots [0, L) (index = L).
    """

    logprobs: Array
    topk_logprobs: Array | None = None
    topk_ids: Array | None = None
    cache: KVCache | None = None


def _row_logprobs(model: CausalLM, hidden: Array, ids: Array, *, chunk_size: int, top_k: int = 0):
    """Log-probs of given token ids, and optionally the top-k, from hidden rows in chunks.

    hidden [R, D], ids [R, J] int -> gathered [R, J] float32 (log p(ids[r, j]) = logit - lse),
    and with top_k = k > 0 also (topk_logprobs [R, k], topk_ids [R, k]). Never materialises more
    than one [chunk_size, V] logits slab; the log-softmax itself is never materialised at all.
    """

    head = model.head()  # gathered once, outside the chunk loop

    def per_chunk(h, i):
        logits = model.logits(h, head)  # [C, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        gathered = jnp.take_along_axis(logits, i, axis=-1) - lse
        if not top_k:
            return gathered
        values, top_ids = jax.lax.top_k(logits, top_k)
        return gathered, values - lse, top_ids.astype(jnp.int32)

    return chunked_rows(per_chunk, hidden, ids.astype(jnp.int32), chunk_size=chunk_size)


def _check_pair(tokens: Array, mask: Array, what: str) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"{what} tokens must be [B, T], got shape {tokens.shape}")
    if mask.shape != tokens.shape:
        raise ValueError(f"{what} mask of shape {mask.shape} does not match tokens {tokens.shape}")


def _check_static(chunk_size: int, top_k: int, vocab: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, vocab_size={vocab}], got {top_k}")


def _forward_hidden(model: CausalLM, tokens: Array, mask: Array, return_cache: bool,
                    cache_len: int | None) -> tuple[Array, KVCache | None]:
    """Final hidden states [B, L, D] of a padded batch, and optionally its prefilled cache."""
    b, length = tokens.shape
    if not return_cache:
        return model(tokens, attention_mask=mask, return_hidden=True), None
    cache_len = length if cache_len is None else cache_len
    if cache_len < length:
        raise ValueError(f"cache_len {cache_len} is shorter than the {length} scored tokens")
    # A prefill from index 0 with the padding mask reads exactly what the plain forward reads
    # (slots <= own slot, real tokens only) at the same positions, so the hidden states agree.
    cache = init_cache(model.config, b, cache_len, dtype=model.dtype)
    return model(tokens, attention_mask=mask, cache=cache, return_hidden=True)


def _score_targets(model: CausalLM, seq: Array, seq_mask: Array, first: int, *, chunk_size: int, top_k: int,
                   return_cache: bool, cache_len: int | None) -> Scores:
    """Scores of the targets seq[:, first:] ([B, L - first] fields): one forward, then only the rows
    first - 1 ... L - 2 (those predicting a target) through the chunked log-softmax.

    A target gets a value where it and its predecessor are real tokens (seq_mask), else 0.
    """
    b, length = seq.shape
    hidden, cache = _forward_hidden(model, seq, seq_mask, return_cache, cache_len)
    rows = hidden[:, first - 1:length - 1].reshape(b * (length - first), hidden.shape[-1])
    out = _row_logprobs(model, rows, seq[:, first:].reshape(-1, 1), chunk_size=chunk_size, top_k=top_k)
    out = out if top_k else (out,)
    valid = seq_mask[:, first:] & seq_mask[:, first - 1:-1]  # [B, L - first]

    def align(x, dtype):
        x = x.reshape((b, length - first) + x.shape[1:])
        return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, 0).astype(dtype)

    logprobs = align(out[0][:, 0], jnp.float32)
    if not top_k:
        return Scores(logprobs, cache=cache)
    return Scores(logprobs, align(out[1], jnp.float32), align(out[2], jnp.int32), cache)


def score(model: CausalLM, tokens: Array, mask: Array, *, chunk_size: int = 512, top_k: int = 0,
          return_cache: bool = False, cache_len: int | None = None) -> Scores:
    """Per-token log-probs of whole sequences, in row chunks.

        logprobs[b, l] = log softmax(W h[b, l-1])[tokens[b, l]]    where mask[b, l-1] = mask[b, l] = 1
                       = 0                                          elsewhere (l = 0, padding, and the
                                                                    first real token of a left-padded row,
                                                                    which has no real context)

    with h the final hidden states of one forward over the padded batch. The B (L - 1) prediction
    rows are evaluated `chunk_size` at a time, so peak memory holds [chunk_size, V] logits, never
    [B, L, V]. Jittable with chunk_size, top_k, return_cache and cache_len static.

    Args:
      model: the scoring model (teacher, or the student without gradient).
      tokens: [B, L] int, prompt + completion.
      mask: [B, L], 1 = real token; left and right padding allowed.
      chunk_size: prediction rows per log-softmax chunk (>= 1).
      top_k: also return the model's top-k log-probs and ids at each predicting position (0: no).
      return_cache: also return the KV cache of the L tokens (slots [0, L), index L).
      cache_len: slots of that cache (default L); more leaves room to decode after the sequence.
    Returns:
      Scores (see its docstring).
    """
    _check_pair(tokens, mask, "score")
    _check_static(chunk_size, top_k, model.config.vocab_size)
    out = _score_targets(model, tokens.astype(jnp.int32), mask.astype(bool), 1, chunk_size=chunk_size, top_k=top_k,
                         return_cache=return_cache, cache_len=cache_len)

    def pad(x):  # l = 0 has no prediction
        return None if x is None else jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))

    return Scores(pad(out.logprobs), pad(out.topk_logprobs), pad(out.topk_ids), out.cache)


def score_rollout(model: CausalLM, prompt_tokens: Array, prompt_mask: Array, tokens: Array, mask: Array, *,
                  chunk_size: int = 512, top_k: int = 0, return_cache: bool = False,
                  cache_len: int | None = None) -> Scores:
    """Teacher scoring of sampled completions: completion-aligned log-probs q_t.

        q[b, t] = log pi(tokens[b, t] | prompt[b], tokens[b, :t])   where mask[b, t] = 1, else 0

    One forward over [prompt | completion] (L = P + N, cache slot layout of the module
    docstring); only the N rows that predict completion tokens (sequence indices P - 1 ... L - 2)
    go through the chunked log-softmax, the prompt's rows are skipped.

    Args:
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (P >= 1).
      tokens, mask: [B, N] completions, mask 1 through the first EOS inclusive.
      chunk_size, top_k, return_cache, cache_len: as in `score`.
    Returns:
      Scores with logprobs [B, N], topk_logprobs / topk_ids [B, N, k] (top_k > 0) and the cache
      of all P + N tokens (return_cache).
    """
    _check_pair(prompt_tokens, prompt_mask, "prompt")
    _check_pair(tokens, mask, "completion")
    if prompt_tokens.shape[0] != tokens.shape[0]:
        raise ValueError(f"prompt batch {prompt_tokens.shape[0]} does not match completion batch {tokens.shape[0]}")
    if prompt_tokens.shape[1] < 1:
        raise ValueError("score_rollout needs at least one prompt token to predict the first completion token")
    check_left_padded(prompt_mask)
    _check_static(chunk_size, top_k, model.config.vocab_size)
    seq = jnp.concatenate([prompt_tokens, tokens], axis=1).astype(jnp.int32)
    seq_mask = jnp.concatenate([prompt_mask, mask], axis=1).astype(bool)
    return _score_targets(model, seq, seq_mask, prompt_tokens.shape[1], chunk_size=chunk_size, top_k=top_k,
                          return_cache=return_cache, cache_len=cache_len)


def packed_logprobs(model: CausalLM, prompt_tokens: Array, prompt_mask: Array, tokens: Array, mask: Array,
                    positions: Array, window_tokens: Array, window_mask: Array, *, chunk_size: int = 512,
                    topk_ids: Array | None = None):
    """The student's training forward: rollout and look-ahead-window log-probs in one packed pass.

    The sequence S = [prompt (P) | completion (N)] is packed with its M windows,
    [S | window 0 (K) | ... | window M-1 (K)], and run once under the tree mask of
    `models.masks.tree_visibility` with branch points P + t_m (t_m = positions[b, m]):
    sequence tokens are causal; window m's tokens read the real sequence tokens before index
    P + t_m and their own window's real tokens up to themselves, at positions
    n_m + k (k = 0 ... K-1, n_m = number of real tokens before P + t_m). Then

        rollout[b, t]    = log pi(y_t | x, y_<t)            = log softmax(W h_S[P + t - 1])[y_t]
        window[b, m, 0]  = log pi(v_1 | x, y_<t)            = log softmax(W h_S[P + t_m - 1])[v_1]
        window[b, m, k]  = log pi(v_{k+1} | x, y_<t, v_<=k) = log softmax(W h_m[k - 1])[v_{k+1}],  k >= 1

    (v_1 replaces y_t, so it is predicted by the last prefix token's hidden state, which the
    sequence part already computed; for a branch past EOS, t_m > number of real completion tokens,
    the window continues the real prefix: its last real token predicts v_1), each equal to a
    separate forward on prompt + y_<t + window with the padding dropped.
    The B N + B M K target rows go through the log-softmax in chunks of `chunk_size` (rematerialised
    in the backward pass): only the target log-probs are kept, never [B, L + M K, V].
    Differentiable with respect to the model's parameters. Masked entries are 0.

    Args:
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (P >= 1).
      tokens, mask: [B, N] completions, mask 1 through the first EOS inclusive.
      positions: [B, M] int completion index t of each window's branch, in [0, N] (t = N continues
        after the completion).
      window_tokens, window_mask: [B, M, K] the windows v_1 ... v_K and their validity (an unused
        candidate slot is an all-zero window_mask row).
      chunk_size: target rows per log-softmax chunk (>= 1).
      topk_ids: optional [B, M, K, k] int token ids (the teacher's top-k at each window step).
    Returns:
      (rollout_logprobs [B, N], window_logprobs [B, M, K]) float32, plus window_topk_logprobs
      [B, M, K, k] = the student's full-vocabulary log-probs at topk_ids when topk_ids is given
      (0 where window_mask is 0).
    """
    _check_packed(model, prompt_tokens, prompt_mask, tokens, mask, positions, window_tokens, window_mask, chunk_size,
                  topk_ids)
    b, p = prompt_tokens.shape
    n = tokens.shape[1]
    m, k = window_tokens.shape[1:]
    length = p + n
    seq_mask = jnp.concatenate([prompt_mask, mask], axis=1).astype(bool)
    wmask = window_mask.astype(bool)
    branch = p + jnp.clip(positions.astype(jnp.int32), 0, n)  # [B, M] sequence index of v_1

    packed, tree, packed_pos = _pack(prompt_tokens, tokens, seq_mask, window_tokens, wmask, branch)
    hidden = model(packed, attention_mask=tree, positions=packed_pos, return_hidden=True)  # [B, L+MK, D]
    rollout_rows = hidden[:, p - 1:length - 1]  # [B, N, D], row t predicts y_t
    window_rows, predictor = _window_rows(hidden, seq_mask, branch, m, k)  # [B, M, K, D], [B, M]

    d = hidden.shape[-1]
    extra = 0 if topk_ids is None else topk_ids.shape[-1]
    rollout_ids = jnp.pad(tokens.reshape(b * n, 1).astype(jnp.int32), [(0, 0), (0, extra)])
    window_ids = window_tokens.reshape(b * m * k, 1).astype(jnp.int32)
    if topk_ids is not None:
        window_ids = jnp.concatenate([window_ids, topk_ids.reshape(b * m * k, extra).astype(jnp.int32)], axis=1)
    rows = jnp.concatenate([rollout_rows.reshape(b * n, d), window_rows.reshape(b * m * k, d)], axis=0)
    gathered = _row_logprobs(model, rows, jnp.concatenate([rollout_ids, window_ids], axis=0),
                             chunk_size=chunk_size)  # [B N + B M K, 1 + k]

    rollout_valid = seq_mask[:, p:] & seq_mask[:, p - 1:-1]
    rollout_logprobs = jnp.where(rollout_valid, gathered[:b * n, 0].reshape(b, n), 0.0)
    window_gathered = gathered[b * n:].reshape(b, m, k, 1 + extra)
    window_valid = wmask & (predictor >= 0)[:, :, None]  # an all-padding prefix gives v_1 no context
    window_logprobs = jnp.where(window_valid, window_gathered[..., 0], 0.0)
    if topk_ids is None:
        return rollout_logprobs, window_logprobs
    return rollout_logprobs, window_logprobs, jnp.where(window_valid[..., None], window_gathered[..., 1:], 0.0)


def _check_packed(model: CausalLM, prompt_tokens: Array, prompt_mask: Array, tokens: Array, mask: Array,
                  positions: Array, window_tokens: Array, window_mask: Array, chunk_size: int,
                  topk_ids: Array | None) -> None:
    """One-line errors for `packed_logprobs` inputs whose shapes do not fit together."""
    _check_pair(prompt_tokens, prompt_mask, "prompt")
    _check_pair(tokens, mask, "completion")
    check_left_padded(prompt_mask)
    b, p = prompt_tokens.shape
    if tokens.shape[0] != b:
        raise ValueError(f"prompt batch {b} does not match completion batch {tokens.shape[0]}")
    if p < 1:
        raise ValueError("packed_logprobs needs at least one prompt token to predict the first window token")
    if positions.ndim != 2 or positions.shape[0] != b:
        raise ValueError(f"positions must be [B={b}, M], got shape {positions.shape}")
    m = positions.shape[1]
    if window_tokens.ndim != 3 or window_tokens.shape[:2] != (b, m):
        raise ValueError(f"window_tokens must be [B, M, K] = [{b}, {m}, K], got shape {window_tokens.shape}")
    if window_mask.shape != window_tokens.shape:
        raise ValueError(f"window_mask of shape {window_mask.shape} does not match window_tokens {window_tokens.shape}")
    k = window_tokens.shape[2]
    if topk_ids is not None and (topk_ids.ndim != 4 or topk_ids.shape[:3] != (b, m, k)):
        raise ValueError(f"topk_ids must be [B, M, K, k] = [{b}, {m}, {k}, k], got shape {topk_ids.shape}")
    _check_static(chunk_size, 0, model.config.vocab_size)


def _pack(prompt_tokens: Array, tokens: Array, seq_mask: Array, window_tokens: Array, window_mask: Array,
          branch: Array) -> tuple[Array, Visibility, Array]:
    """[S | window 0 | ... | window M-1] token ids [B, L + MK], its tree visibility (per-token
    metadata, `masks.tree_visibility`: no [L + MK, L + MK] mask is built) and positions
    [B, L + MK]; branch [B, M] is each window's sequence index of v_1.

    Window positions continue from the number of real prefix tokens (also when the branch point
    is padding past EOS), as `tree_attention_mask` computes them. Window keys that are padding
    (past a window's EOS) are not read either, as in a padded forward of prompt + y_<t + window;
    a window's tokens never read later ones anyway.
    """
    b = seq_mask.shape[0]
    m, k = window_tokens.shape[1:]
    seq = jnp.concatenate([prompt_tokens, tokens], axis=1).astype(jnp.int32)
    vis, packed_pos = tree_visibility(branch, k, seq_mask, window_mask)
    packed = jnp.concatenate([seq, window_tokens.reshape(b, m * k).astype(jnp.int32)], axis=1)
    return packed, vis, packed_pos


def _window_rows(hidden: Array, seq_mask: Array, branch: Array, m: int, k: int) -> tuple[Array, Array]:
    """The hidden rows that predict each window token: [B, M, K, D], and `predictor` [B, M], the
    sequence index of the last real token before each branch (-1: no real prefix).

    v_1 is predicted by the last real token before the branch: index P + t - 1 for a branch inside
    the completion; earlier when the branch lies in padding past EOS (then the window continues
    the real prefix, consistently with its positions); v_{k+1} by window token k.
    """
    b, length = seq_mask.shape
    d = hidden.shape[-1]
    last_real = jax.lax.cummax(jnp.where(seq_mask, jnp.arange(length), -1), axis=1)  # [B, L]
    predictor = jnp.take_along_axis(last_real, branch - 1, axis=1)  # [B, M]
    prefix_last = jnp.take_along_axis(hidden, jnp.maximum(predictor, 0)[:, :, None], axis=1)  # [B, M, D]
    window_hidden = hidden[:, length:].reshape(b, m, k, d)
    return jnp.concatenate([prefix_last[:, :, None], window_hidden[:, :, :-1]], axis=2), predictor


__all__ = ["Scores", "packed_logprobs", "score", "score_rollout"]
