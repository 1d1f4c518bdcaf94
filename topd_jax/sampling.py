"""Rollouts and look-ahead windows: sampling from a `CausalLM` with a preallocated KV cache.

    options = SamplingOptions(temperature=1.0, top_p=0.95, eos_ids=(eos,))
    rollout = generate(student, prompts, prompt_mask, key=k, max_new_tokens=N,    # y ~ pi_s(.|x)
                       options=options)
    windows = branch(student, rollout, positions, key=k2, window=K, options=options)  # [B, M, K]
    windows = branch(teacher, teacher_cache, positions, key=k3, window=K,         # from the cache
                     prompt_len=P, tokens=prompt_and_completion)                   # scoring returned
    emb = window_embeddings(student, windows.tokens)                              # [B, M, K, D]

Sampling (both functions, one `SamplingOptions`): temperature T = 0 is greedy (argmax). Otherwise
the token is drawn from softmax(z / T) truncated to the top_k most likely tokens (top_k > 0; top_k
>= V keeps all), then to the smallest most-likely set whose renormalised probability is >= top_p
(always at least one token), and renormalised (the order of Hugging Face's logits warpers). A
rollout's row r (prompt i, sample j: r = i * num_samples + j) draws its token t with
fold_in(fold_in(key, r), t) (`row_keys`, `draw`), so its completion depends on its prompt, the key
and r only, whichever batch or decode slot it is in (`topd_jax.slots` draws the same tokens); a
window (b, m) is row r = b M + m of its [B, M] branches, drawn likewise (the same tokens as
`generate` from its re-prefilled prefix, row for row). A fixed key gives identical output. The
returned log-probs are always log softmax(z)[y] at temperature 1 without truncation: the
behaviour log-prob b_t that OPD compares with the teacher (TOPD.md, section 1).

Completion masks are 1 through the first EOS inclusive and 0 after; after a row finished, its
tokens are the pad id 0. Prompts are left-padded and every row must hold at least one real token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from topd_jax.models.decoder import CausalLM, KVCache, init_branch_cache, init_cache
from topd_jax.models.masks import check_left_padded
from topd_jax.models.sharding import constrain_batch
from topd_jax.draws import draw, is_eos, row_keys, sample_tokens, token_logprob  # noqa: F401 (re-exported)

Array = jax.Array
PAD_ID = 0


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["prompt_tokens", "prompt_mask", "tokens", "mask", "logprobs", "finished", "cache"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Rollout:
    """Sampled completions y of left-padded prompts x; B = batch * num_samples rows.

    prompt_tokens [B, P] int32 and prompt_mask [B, P] bool (left-padded; a prompt's samples are
    adjacent rows); tokens [B, N] int32; mask [B, N] bool (1 through the first EOS inclusive);
    logprobs [B, N] float32, log pi(y_t | x, y_<t) at temperature 1 (0 where mask is 0);
    finished [B] bool (an EOS was sampled); cache: the KVCache of prompt + completion, slot j < P
    the prompt's column j and slot P + t completion token t, index P + steps taken (the loop stops
    once every row finished), valid = [prompt_mask | mask] on the filled slots.
    """

    prompt_tokens: Array
    prompt_mask: Array
    tokens: Array
    mask: Array
    logprobs: Array
    finished: Array
    cache: KVCache


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "mask", "logprobs", "topk_logprobs", "topk_ids"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Windows:
    """Look-ahead windows v_1..v_K from the prefixes (x, y_<t) of M branch points per row.

    tokens [B, M, K] int32 (0 after the first EOS); mask [B, M, K] bool (1 through the first EOS
    inclusive); logprobs [B, M, K] float32, the branching model's log pi(v_k | x, y_<t, v_<k) at
    temperature 1 (0 where mask is 0). With `branch(..., top_k_logprobs=k)` also topk_logprobs
    [B, M, K, k] float32 and topk_ids [B, M, K, k] int32: the branching model's k most likely
    tokens at each window step (temperature 1, descending; 0 where mask is 0), the teacher
    support of the `topk_fkl` guidance; None otherwise.
    """

    tokens: Array
    mask: Array
    logprobs: Array
    topk_logprobs: Array | None = None
    topk_ids: Array | None = None


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How `generate` and `branch` draw each token; frozen and hashable, the static jit argument
    of their loops (equal options share one compiled program).

    temperature T >= 0: 0 is greedy (argmax); otherwise y ~ softmax(z / T), truncated to the top_k
    most likely tokens (top_k = 0, or top_k >= V, keeps all), then to the smallest most-likely set
    whose renormalised probability is >= top_p in (0, 1] (always at least one token), renormalised
    (the order of Hugging Face's logits warpers). eos_ids: token ids that end a row (its mask is 1
    through the first one inclusive). Bad values are refused here with a one-line error naming the
    field; eos_ids against the model's vocabulary by `generate` and `branch`.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self):
        t, p, k, eos = self.temperature, self.top_p, self.top_k, self.eos_ids
        if not _is_real(t) or not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not _is_real(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not _is_int(k) or k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {k!r}")
        ids = tuple(eos) if isinstance(eos, (tuple, list)) else None
        if ids is None or not all(_is_int(e) and e >= 0 for e in ids):
            raise ValueError(f"eos_ids must be a tuple of token ids >= 0, got {eos!r}")
        # Plain Python values, so equal options hash equal (one jit cache entry).
        for name, value in (("temperature", float(t)), ("top_p", float(p)), ("top_k", int(k)),
                            ("eos_ids", tuple(int(e) for e in ids))):
            object.__setattr__(self, name, value)


def check_options(options, vocab: int) -> SamplingOptions:
    """Refuse a non-SamplingOptions or EOS ids outside the model's vocabulary [0, vocab)."""
    if not isinstance(options, SamplingOptions):
        raise TypeError(f"options must be a SamplingOptions, got {type(options).__name__}")
    if not all(e < vocab for e in options.eos_ids):
        raise ValueError(f"eos_ids must be token ids in [0, {vocab}), got {options.eos_ids!r}")
    return options


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_count(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _sample_step(logits, keys, step, alive, options: SamplingOptions):
    """Draw for rows still alive: (tokens, logprobs, still-alive-after) with pads for dead rows;
    row r's token from fold_in(keys[r], step) (`draw`)."""
    tok = jnp.where(alive, draw(logits, keys, step, options), PAD_ID)
    logp = jnp.where(alive, token_logprob(logits, tok), 0.0)
    return tok, logp, alive & ~is_eos(tok, options.eos_ids)


class _DecodeCarry(NamedTuple):
    """`_generate`'s while-loop state; B rows, N = max_new_tokens."""

    step: Array  # [] int32: tokens drawn so far (the next token's index t)
    logits: Array  # [B, V]: the logits of y_t (the last fed token's output)
    cache: KVCache  # [B, P + N] slots: prompt, then the completion written so far
    tokens: Array  # [B, N] int32: y (PAD_ID after a row finished)
    logprobs: Array  # [B, N] float32: log pi(y_t) at temperature 1 (0 where mask is 0)
    mask: Array  # [B, N] bool: 1 through the first EOS inclusive
    alive: Array  # [B] bool: no EOS drawn yet


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "options", "num_samples"))
def _generate(graphdef, state, prompts, prompt_mask, key, *, max_new_tokens, options, num_samples):
    model = nnx.merge(graphdef, state)
    prompts = jnp.repeat(prompts.astype(jnp.int32), num_samples, axis=0)
    prompt_mask = jnp.repeat(prompt_mask.astype(bool), num_samples, axis=0)
    b, p = prompts.shape
    n = max_new_tokens
    cache = init_cache(model.config, b, p + n, model.dtype)
    # Hidden states, not [B, P, V] logits: only the last column's are needed, and left padding puts
    # every prompt's last real token there.
    hidden, cache = model(prompts, attention_mask=prompt_mask, cache=cache, return_hidden=True)
    # constrain_batch pins every carry array's B axis under a mesh (the scalar step is left alone).
    init = constrain_batch(_DecodeCarry(
        step=jnp.zeros((), jnp.int32), logits=model.logits(hidden[:, -1]), cache=cache,
        tokens=jnp.zeros((b, n), jnp.int32), logprobs=jnp.zeros((b, n), jnp.float32),
        mask=jnp.zeros((b, n), bool), alive=jnp.ones((b,), bool)))

    def cond(c: _DecodeCarry):
        return (c.step < n) & jnp.any(c.alive)

    keys = row_keys(key, b)

    def body(c: _DecodeCarry) -> _DecodeCarry:
        tok, logp, still = _sample_step(c.logits, keys, c.step, c.alive, options)
        # Write the token into the cache (valid only while alive) so the rollout's cache holds the
        # whole completion for branching; padding after EOS is never read.
        logits, cache = model(tok[:, None], attention_mask=c.alive[:, None], cache=c.cache)
        return constrain_batch(_DecodeCarry(
            step=c.step + 1, logits=logits[:, 0], cache=cache,
            tokens=jax.lax.dynamic_update_slice(c.tokens, tok[:, None], (0, c.step)),
            logprobs=jax.lax.dynamic_update_slice(c.logprobs, logp[:, None], (0, c.step)),
            mask=jax.lax.dynamic_update_slice(c.mask, c.alive[:, None], (0, c.step)), alive=still))

    out = jax.lax.while_loop(cond, body, init)
    return Rollout(prompts, prompt_mask, out.tokens, out.mask, out.logprobs, ~out.alive, out.cache)


def check_request(model: CausalLM, prompts, prompt_mask, options, max_new_tokens, num_samples):
    """A sampling request's arguments checked, one line per problem: (prompts [b, P], prompt_mask
    [b, P] (left-padded), options, N, num_samples)."""
    prompts, prompt_mask = jnp.asarray(prompts), jnp.asarray(prompt_mask)
    if prompts.ndim != 2 or prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompts and prompt_mask must both be [batch, P], got {prompts.shape} and "
                         f"{prompt_mask.shape}")
    check_left_padded(prompt_mask)
    return (prompts, prompt_mask, check_options(options, model.config.vocab_size),
            check_count("max_new_tokens", max_new_tokens), check_count("num_samples", num_samples))


def generate(model: CausalLM, prompts: Array, prompt_mask: Array, *, key: Array, max_new_tokens: int,
             num_samples: int = 1, options: SamplingOptions = SamplingOptions()) -> Rollout:
    """Sample num_samples completions of up to max_new_tokens tokens for each left-padded prompt.

    prompts [b, P] int, prompt_mask [b, P] (1 = real token, left-padded, >= 1 real token per row).
    One jitted prefill of the repeated prompts into a cache of P + N slots, then a
    `lax.while_loop` of one-token steps y_t ~ pi(. | x, y_<t) drawn by `options`
    (`SamplingOptions`) that stops when every row has sampled an EOS or after N steps.
    Returns a Rollout with B = b * num_samples rows (samples of a prompt adjacent).
    """
    prompts, prompt_mask, options, steps, samples = check_request(model, prompts, prompt_mask, options,
                                                                  max_new_tokens, num_samples)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompts, prompt_mask, key, max_new_tokens=steps, options=options,
                     num_samples=samples)


def _branch_points(cache: KVCache, tokens: Array, positions: Array, prompt_len: int) -> tuple[Array, Array, Array]:
    """Where each branch starts: the last real slot `last` [B, M] of the prefix (x, y_<t), its
    position pos(last) and its token id (fed again as step 0: it yields the logits of v_1, so the
    shared cache is read below `last` only). t is clipped to [0, N]."""
    n = tokens.shape[1] - prompt_len
    slots = jnp.arange(cache.max_len)
    t = jnp.clip(positions.astype(jnp.int32), 0, n)
    # The prefix (x, y_<t) is every valid slot < P + t.
    visible = cache.valid[:, None, :] & (slots[None, None, :] < (prompt_len + t)[:, :, None])  # [B, M, S]
    last = jnp.max(jnp.where(visible, slots, 0), axis=-1)  # [B, M]
    count = jnp.cumsum(cache.valid.astype(jnp.int32), axis=1)  # real tokens in slots <= s
    start_pos = jnp.maximum(jnp.take_along_axis(count, last, axis=1) - 1, 0)  # pos(last)
    first_tok = jnp.take_along_axis(tokens.astype(jnp.int32), last, axis=1)
    return last, start_pos, first_tok


class _BranchCarry(NamedTuple):
    """`_branch`'s while-loop state; B rows, M branch points, K = window, k = top_k_logprobs."""

    step: Array  # [] int32: window tokens drawn so far (the next token's index k)
    fed: Array  # [B, M] int32: the token fed at this step (the prefix's last token, then v_k)
    branch_kv: KVCache  # [B, M, K] branch-local slots per layer
    tokens: Array  # [B, M, K] int32: v (PAD_ID after a window finished)
    logprobs: Array  # [B, M, K] float32: log pi(v_k) at temperature 1 (0 where mask is 0)
    topk_logprobs: Array  # [B, M, K, k] float32: each step's k largest log-probs (k = 0: empty)
    topk_ids: Array  # [B, M, K, k] int32: their token ids
    mask: Array  # [B, M, K] bool: 1 through the first EOS inclusive
    alive: Array  # [B, M] bool: no EOS drawn yet


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "window", "options", "top_k_logprobs"))
def _branch(graphdef, state, cache, tokens, positions, key, forced=None, *, prompt_len, window, options,
            top_k_logprobs):
    """forced: None, or (tokens [B, M, L], count [B, M], limit [B, M]): step k < count feeds
    forced[k] instead of a draw (its log-prob under the model is kept), and a branch ends after
    `limit` steps."""
    model = nnx.merge(graphdef, state)
    b, m = positions.shape
    k = window
    last, start_pos, first_tok = _branch_points(cache, tokens, positions, prompt_len)
    keys = row_keys(key, b * m)
    keys = keys.reshape(b, m, *keys.shape[1:])  # branch (b, m) is row b * M + m
    kk = top_k_logprobs
    # constrain_batch pins every carry array's B axis under a mesh (the scalar step is left alone).
    init = constrain_batch(_BranchCarry(
        step=jnp.zeros((), jnp.int32), fed=first_tok,
        branch_kv=init_branch_cache(model.config, b, m, k, cache.keys.dtype),
        tokens=jnp.zeros((b, m, k), jnp.int32), logprobs=jnp.zeros((b, m, k), jnp.float32),
        topk_logprobs=jnp.zeros((b, m, k, kk), jnp.float32), topk_ids=jnp.zeros((b, m, k, kk), jnp.int32),
        mask=jnp.zeros((b, m, k), bool), alive=jnp.ones((b, m), bool)))

    def cond(c: _BranchCarry):
        return (c.step < k) & jnp.any(c.alive)

    def body(c: _BranchCarry) -> _BranchCarry:
        step, alive = c.step, c.alive
        logits, branch_kv = model.branch_step(c.fed, start_pos + step, cache, last, c.branch_kv, step)
        tok, logp, still = _sample_step(logits, keys, step, alive, options)
        if forced is not None:
            forced_tokens, count, limit = forced
            index = jnp.minimum(step, forced_tokens.shape[-1] - 1)
            take = alive & (step < count)
            tok = jnp.where(take, jax.lax.dynamic_index_in_dim(forced_tokens, index, axis=2, keepdims=False), tok)
            logp = jnp.where(alive, token_logprob(logits, tok), 0.0)
            still = alive & ~is_eos(tok, options.eos_ids) & (step + 1 < limit)
        top_lp, top_ids = c.topk_logprobs, c.topk_ids
        if kk:
            vals, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), kk)
            vals, ids = jnp.where(alive[..., None], vals, 0.0), jnp.where(alive[..., None], ids, 0)
            top_lp = jax.lax.dynamic_update_slice(top_lp, vals[:, :, None], (0, 0, step, 0))
            top_ids = jax.lax.dynamic_update_slice(top_ids, ids[:, :, None].astype(jnp.int32), (0, 0, step, 0))
        return constrain_batch(_BranchCarry(
            step=step + 1, fed=tok, branch_kv=branch_kv,
            tokens=jax.lax.dynamic_update_slice(c.tokens, tok[:, :, None], (0, 0, step)),
            logprobs=jax.lax.dynamic_update_slice(c.logprobs, logp[:, :, None], (0, 0, step)),
            topk_logprobs=top_lp, topk_ids=top_ids,
            mask=jax.lax.dynamic_update_slice(c.mask, alive[:, :, None], (0, 0, step)), alive=still))

    out = jax.lax.while_loop(cond, body, init)
    if not kk:
        return Windows(out.tokens, out.mask, out.logprobs)
    return Windows(out.tokens, out.mask, out.logprobs, out.topk_logprobs, out.topk_ids)


def branch(model: CausalLM, source: Rollout | KVCache, positions: Array, *, key: Array, window: int,
           options: SamplingOptions = SamplingOptions(), prompt_len: int | None = None,
           tokens: Array | None = None, top_k_logprobs: int = 0) -> Windows:
    """Decode a K-token window from each prefix (x, y_<t), t = positions[b, m], all B*M at once.

    source: a Rollout (its cache, P = its prompt width, its prompt + completion tokens), or a KVCache
    with the same slot layout (slot j < P: prompt column j; slot P + t: completion token t; valid
    marks real tokens), e.g. the teacher's scoring cache; then prompt_len = P and tokens [B, P + N]
    (the token ids of those slots) are required. positions [B, M] int: completion indices t in
    [0, N] (t = 0 right after the prompt, t = N after the whole completion); values outside are
    clipped to [0, N]. Prefix slots past the cache's filled part or after an EOS are invalid, so
    such a t branches after the row's last real token.

    Exactly a naive re-prefill of the real tokens of (x, y_<t) followed by K decode steps, without
    copying or recomputing the prefix: with `last` the last real slot < P + t (the token y_{t-1},
    or the prompt's last token when t = 0) at position p = pos(last),
      step 0 feeds tokens[last] at position p against the shared cache's real slots < last plus
        its own branch slot 0; its logits give v_1 (one recomputed token, not a prefill);
      step k >= 1 feeds v_k at position p + k against the same prefix slots plus branch slots <= k;
    so v_1 sits at the position of the rollout token it replaces. Every step is one
    `CausalLM.branch_step`: the [B, M] queries attend to the shared cache [B, S] in place (masks
    [B, M, S]) and to a branch-local cache [B, M, K] per layer, one softmax over both blocks. The
    loop (`lax.while_loop`, jitted) stops when every window has sampled an EOS or after K steps.
    `options` (`SamplingOptions`) as in `generate`; branch (b, m) is row b M + m of the request
    (`row_keys`): its step k draws from fold_in(fold_in(key, b M + m), k).
    top_k_logprobs = k > 0 also returns each step's k most likely tokens and their log-probs.
    Returns Windows [B, M, K].
    """
    cache, p, ids = _branch_source(source, prompt_len, tokens)
    positions = jnp.asarray(positions)
    batch = cache.valid.shape[0]
    if positions.ndim != 2 or positions.shape[0] != batch:
        raise ValueError(f"positions must be [B, M] with B = {batch}, got shape {positions.shape}")
    if ids.ndim != 2 or ids.shape[0] != batch or not 1 <= p <= ids.shape[1] <= cache.max_len:
        raise ValueError(f"tokens of shape {ids.shape} and prompt_len {p} do not fit a cache of shape "
                         f"{cache.valid.shape} (need 1 <= P <= P + N <= S)")
    options = check_options(options, model.config.vocab_size)
    graphdef, state = nnx.split(model)
    return _branch(graphdef, state, cache, ids, positions, key, prompt_len=int(p),
                   window=check_count("window", window), options=options,
                   top_k_logprobs=_check_topk(top_k_logprobs, model.config.vocab_size))


def continuation(model: CausalLM, source: Rollout | KVCache, starts: Array, segment: Array, segment_len: Array, *,
                 key: Array, options: SamplingOptions = SamplingOptions(), prompt_len: int | None = None,
                 tokens: Array | None = None) -> Windows:
    """The model's continuation of each row from completion index t = starts[b] after a given
    segment: [B] -> Windows [B, 1, N] (N the completion width; rows with t < 0 are unused).

        u_k = segment[b, k]                    k < segment_len[b]  (fed, not drawn: a splice)
        u_k ~ pi(. | x, y_<t, u_<k)            segment_len[b] <= k < N - t

    One `branch` from (x, y_<t) with the segment's tokens forced: the shared prefix cache is read
    in place (no re-prefill), and the log-probs are the model's own at temperature 1 for every
    token, the forced ones included (a student's behaviour log-probs of a teacher's segment). It
    ends at EOS (forced or drawn) or after N - t tokens. source, prompt_len, tokens as in `branch`.
    """
    cache, p, ids = _branch_source(source, prompt_len, tokens)
    n = ids.shape[1] - p
    starts = jnp.asarray(starts, jnp.int32)
    segment = jnp.asarray(segment, jnp.int32)
    if starts.shape != (cache.valid.shape[0],) or segment.ndim != 2 or segment.shape[0] != starts.shape[0]:
        raise ValueError(f"starts must be [B] and segment [B, L] with B = {cache.valid.shape[0]}, got "
                         f"{starts.shape} and {segment.shape}")
    options = check_options(options, model.config.vocab_size)
    graphdef, state = nnx.split(model)
    t = jnp.clip(starts, 0, n - 1)
    count = jnp.minimum(jnp.asarray(segment_len, jnp.int32), n - t)
    forced = (segment[:, None, :], count[:, None], (n - t)[:, None])
    return _branch(graphdef, state, cache, ids, t[:, None], key, forced, prompt_len=int(p), window=n,
                   options=options, top_k_logprobs=0)


def splice_rollout(rollout: Rollout, starts: Array, after: Windows, segment_len: Array,
                   eos_ids: tuple[int, ...]) -> tuple[Rollout, Array]:
    """The rollout with y_t.. replaced by `after` (a `continuation` [B, 1, N]) where starts[b] = t
    >= 0; rows with t < 0 unchanged. Returns (Rollout without a cache, written [B, N] bool: the
    tokens of the segment, the first segment_len[b] of `after`).

        y'_s = y_s (s < t),  u_{s - t} (s >= t);  b'_s likewise;  mask'_s = m_s (s < t), mu_{s-t}
        finished' = an EOS among the valid tokens of y'
    """
    n = rollout.tokens.shape[1]
    starts = jnp.asarray(starts, jnp.int32)
    rel = jnp.arange(n)[None, :] - starts[:, None]  # [B, N]
    replaced = (starts[:, None] >= 0) & (rel >= 0)
    index = jnp.clip(rel, 0, n - 1)

    def take(x):
        return jnp.take_along_axis(x[:, 0], index, axis=1)

    mask = jnp.where(replaced, take(after.mask), rollout.mask)
    tokens = jnp.where(mask, jnp.where(replaced, take(after.tokens), rollout.tokens), PAD_ID)
    logprobs = jnp.where(mask, jnp.where(replaced, take(after.logprobs), rollout.logprobs), 0.0)
    written = replaced & (rel < jnp.asarray(segment_len, jnp.int32)[:, None]) & mask
    finished = jnp.any(is_eos(tokens, eos_ids) & mask, axis=1)
    return Rollout(rollout.prompt_tokens, rollout.prompt_mask, tokens, mask, logprobs, finished, None), written


def _branch_source(source: Rollout | KVCache, prompt_len: int | None,
                   tokens: Array | None) -> tuple[KVCache, int, Array]:
    """(cache, P, token ids [B, P + N]) of a branch source: a Rollout carries all three; a
    KVCache needs prompt_len and tokens."""
    if isinstance(source, Rollout):
        p = source.prompt_tokens.shape[1]
        if tokens is not None or prompt_len not in (None, p):
            raise ValueError("prompt_len and tokens are taken from a Rollout source; pass them only with a KVCache")
        return source.cache, p, jnp.concatenate([source.prompt_tokens, source.tokens], axis=1)
    if isinstance(source, KVCache):
        if prompt_len is None or tokens is None:
            raise ValueError("a KVCache source needs prompt_len (P) and tokens [B, P + N]")
        return source, prompt_len, jnp.asarray(tokens)
    raise TypeError(f"source must be a Rollout or a KVCache, got {type(source).__name__}")


def _check_topk(value, vocab: int) -> int:
    if not _is_int(value) or not 0 <= value <= vocab:
        raise ValueError(f"top_k_logprobs must be an int in [0, {vocab}], got {value!r}")
    return int(value)


def window_embeddings(model: CausalLM, tokens: Array) -> Array:
    """tokens [...] int -> [..., D] float32: rows of the model's input embedding table (the OT
    distance's default token embedding, TOPD.md section 4)."""
    return jnp.take(model.embed_tokens[...], jnp.asarray(tokens), axis=0).astype(jnp.float32)
