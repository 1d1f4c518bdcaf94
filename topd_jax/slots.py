"""Continuous decoding: S decode slots that are refilled as their rows end, so a batch of rollouts
never waits for its longest row.

    slots = init_slots(student, slots=S, prompt_len=P, max_new_tokens=N)
    slots = insert(student, slots, where, prompts, prompt_mask, keys, version=v)   # prefill, in place
    slots = decode(student, slots, version=v, min_free=R, check_every=8, options=options)
    done  = ended(slots, occupied)        # host: rows that sampled an EOS or reached N tokens
    rows  = take(slots, where)            # their Rollout (no cache) and the versions that wrote them
    slots = evict(slots, where)           # rows given up (too stale): their slots are free
    rollout, versions = sample_continuous(student, prompts, prompt_mask, key=k, max_new_tokens=N,
                                          slots=S, options=options)   # a whole request, in order
    rollout = with_cache(student, rollout)   # its KV cache, for `sampling.branch` (windows)

The state is one pytree of static shapes (`Slots`): per slot its prompt, completion so far, length,
key, the policy version that wrote each token, the next token's logits, and its rows of one stacked
KV cache of P + N slots whose write index is per row (`KVCache.index` [S]): slot s's prompt fills
cache columns [0, P) (left-padded), its completion token t column P + t, the layout of a static
`Rollout`'s cache. Both jitted programs take the state donated and update it in place:
- `insert` prefills R new prompts ([R, P], one forward into a small [R, P] cache) and scatters them
  into the rows `where` [R] of the stacked cache (an index S is a padding row: dropped). The rest of
  a refilled row keeps the old row's keys, but its `valid` bits are cleared, and decode writes column
  P + t before it ever reads it: no step of the new row reads the old one's keys.
- `decode` runs one-token steps of every decoding slot at once (slot s at its own position and cache
  column P + length_s), in chunks of `check_every` steps (`lax.fori_loop`) inside a `lax.while_loop`
  that returns to the host once at least `min_free` slots are not decoding, or when none is, or
  after N steps: the host then takes the ended rows and refills their slots.
Row r of a request draws its token t from fold_in(k_r, t) (`sampling.row_keys`, `sampling.draw`),
as `sampling.generate` does, so a prompt's completion does not depend on the slot it lands in: the
same prompts and key give the static sampler's tokens.

Why our own: Tunix's sampler decodes in lockstep; vLLM's TPU backend (`continue_decode`),
SGLang-JAX and JetStream (`insert` into a free slot of the decode state) do slot refill in their
engines, which decode their own model code and can not run our `CausalLM` with its stacked cache,
the branch decoding of the windows, and our per-row keys; the loop here is small and is the
generate loop with a per-row index (vLLM's design: an on-device loop with an active mask, EOS
checked every 8 steps).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from topd_jax.models.decoder import CausalLM, KVCache, init_cache
from topd_jax.models.masks import check_left_padded
from topd_jax.models.sharding import constrain_batch, host_global
from topd_jax.sampling import (PAD_ID, Rollout, SamplingOptions, check_count, check_options, check_request, draw,
                               is_eos, row_keys, token_logprob)
from topd_jax.scoring import score_rollout

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["prompt_tokens", "prompt_mask", "tokens", "mask", "logprobs", "versions", "length",
                                "decoding", "keys", "logits", "cache", "busy_steps", "steps"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Slots:
    """S decode slots; P = prompt width, N = max_new_tokens.

    prompt_tokens [S, P] int32, prompt_mask [S, P] bool (left-padded); tokens [S, N] int32, mask
    [S, N] bool, logprobs [S, N] float32 as a `Rollout`'s (PAD_ID / 0 / 0 after the row's end);
    versions [S, N] int32: the policy version that drew each token (-1 where mask is 0); length [S]
    int32: tokens drawn (the next token's index t); decoding [S] bool: the slot holds a row that has
    not ended (no EOS, length < N); keys [S, ...]: the row keys (`sampling.row_keys`); logits [S, V]
    float32: the next token's; cache: the stacked KVCache [S, P + N] with index [S] = P + length;
    busy_steps, steps [] int32: decoding slot-steps and loop steps run so far (utilisation =
    busy_steps / (S steps)).
    """

    prompt_tokens: Array
    prompt_mask: Array
    tokens: Array
    mask: Array
    logprobs: Array
    versions: Array
    length: Array
    decoding: Array
    keys: Array
    logits: Array
    cache: KVCache
    busy_steps: Array
    steps: Array

    @property
    def num_slots(self) -> int:
        return self.tokens.shape[0]


def init_slots(model: CausalLM, *, slots: int, prompt_len: int, max_new_tokens: int) -> Slots:
    """S empty slots (none decoding) for prompts of width P and completions of up to N tokens
    (their keys are placeholders until `insert` gives each row its own)."""
    s, p, n = (check_count(name, v) for name, v in (("slots", slots), ("prompt_len", prompt_len),
                                                    ("max_new_tokens", max_new_tokens)))
    cfg = model.config
    cache = init_cache(cfg, s, p + n, model.dtype)
    keys = row_keys(jax.random.PRNGKey(0), s)
    return Slots(
        prompt_tokens=jnp.zeros((s, p), jnp.int32), prompt_mask=jnp.zeros((s, p), bool),
        tokens=jnp.zeros((s, n), jnp.int32), mask=jnp.zeros((s, n), bool), logprobs=jnp.zeros((s, n), jnp.float32),
        versions=jnp.full((s, n), -1, jnp.int32), length=jnp.zeros((s,), jnp.int32),
        decoding=jnp.zeros((s,), bool), keys=keys, logits=jnp.zeros((s, cfg.vocab_size), jnp.float32),
        cache=cache._replace(index=jnp.full((s,), p, jnp.int32)),
        busy_steps=jnp.zeros((), jnp.int32), steps=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("slots",))
def _insert(graphdef, params, slots: Slots, where, prompts, prompt_mask, keys):
    model = nnx.merge(graphdef, params)
    r, p = prompts.shape
    n = slots.tokens.shape[1]
    small = init_cache(model.config, r, p, slots.cache.keys.dtype)
    hidden, small = model(prompts, attention_mask=prompt_mask, cache=small, return_hidden=True)
    logits = model.logits(hidden[:, -1])  # left padding puts every prompt's last token at column P - 1

    def put(x, rows):
        return x.at[where].set(rows.astype(x.dtype), mode="drop")

    c = slots.cache
    cache = KVCache(
        # Only the prompt columns [0, P) of the R rows are written: no copy of the stacked cache.
        c.keys.at[where, :, :p].set(small.keys.astype(c.keys.dtype), mode="drop"),
        c.values.at[where, :, :p].set(small.values.astype(c.values.dtype), mode="drop"),
        put(c.valid, jnp.concatenate([prompt_mask, jnp.zeros((r, n), bool)], axis=1)),
        put(c.index, jnp.full((r,), p, jnp.int32)))
    return dataclasses.replace(
        slots, prompt_tokens=put(slots.prompt_tokens, prompts), prompt_mask=put(slots.prompt_mask, prompt_mask),
        tokens=put(slots.tokens, jnp.zeros((r, n), jnp.int32)), mask=put(slots.mask, jnp.zeros((r, n), bool)),
        logprobs=put(slots.logprobs, jnp.zeros((r, n), jnp.float32)),
        versions=put(slots.versions, jnp.full((r, n), -1, jnp.int32)), length=put(slots.length, jnp.zeros((r,))),
        decoding=put(slots.decoding, jnp.ones((r,), bool)), keys=put(slots.keys, keys),
        logits=put(slots.logits, logits),
        cache=cache)


def insert(model: CausalLM, slots: Slots, where, prompts, prompt_mask, keys) -> Slots:
    """Prefill R left-padded prompts [R, P] into slots `where` [R] (int; S = a padding row, not
    written) with their row keys [R, ...] (`sampling.row_keys`); the slots start decoding at t = 0.
    `slots` is donated: its buffers are updated in place (use the returned state)."""
    where, prompts = jnp.asarray(where, jnp.int32), jnp.asarray(prompts, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, bool)
    p = slots.prompt_tokens.shape[1]
    if (prompts.ndim != 2 or prompts.shape[1] != p or prompt_mask.shape != prompts.shape
            or where.shape != prompts.shape[:1]):
        raise ValueError(f"insert needs prompts and prompt_mask [R, {p}] and where [R], got {prompts.shape}, "
                         f"{prompt_mask.shape} and {where.shape}")
    check_left_padded(prompt_mask)
    keys = jnp.asarray(keys)
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):  # typed keys: the slots hold their raw bits
        keys = jax.random.key_data(keys)
    graphdef, params = nnx.split(model)
    return _insert(graphdef, params, slots, where, prompts, prompt_mask, keys)


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "check_every"), donate_argnames=("slots",))
def _decode(graphdef, params, slots: Slots, version, min_free, *, options, check_every):
    model = nnx.merge(graphdef, params)
    s, n = slots.tokens.shape
    p = slots.prompt_tokens.shape[1]
    rows = jnp.arange(s)

    def one(_, c: Slots) -> Slots:
        live, t = c.decoding, c.length
        tok = jnp.where(live, draw(c.logits, c.keys, t, options), PAD_ID)
        logp = jnp.where(live, token_logprob(c.logits, tok), 0.0)
        still = live & ~is_eos(tok, options.eos_ids) & (t + 1 < n)
        col = jnp.where(live, t, n)  # a slot not decoding writes nothing (index N is dropped)

        def put(x, v):
            return x.at[rows, col].set(v, mode="drop")

        cache = c.cache._replace(index=p + jnp.where(live, t, n))
        logits, cache = model(tok[:, None], attention_mask=live[:, None], cache=cache)
        return constrain_batch(dataclasses.replace(
            c, tokens=put(c.tokens, tok), mask=put(c.mask, live), logprobs=put(c.logprobs, logp),
            versions=put(c.versions, jnp.broadcast_to(version, (s,))), length=t + live, decoding=still,
            logits=jnp.where(live[:, None], logits[:, 0], c.logits), cache=cache._replace(index=p + t + live),
            busy_steps=c.busy_steps + jnp.sum(live), steps=c.steps + 1))

    def cond(carry):
        c, ran = carry
        free = jnp.sum(~c.decoding)
        return (ran < n) & (free < min_free) & jnp.any(c.decoding)

    def body(carry):
        c, ran = carry
        return jax.lax.fori_loop(0, check_every, one, c), ran + check_every

    out, _ = jax.lax.while_loop(cond, body, (constrain_batch(slots), jnp.zeros((), jnp.int32)))
    return out


def decode(model: CausalLM, slots: Slots, *, version: int = 0, min_free: int = 1, check_every: int = 8,
           options: SamplingOptions = SamplingOptions()) -> Slots:
    """Decode every slot that is decoding, `check_every` steps at a time, until at least `min_free`
    slots are not decoding (free or ended), none is decoding, or N steps ran. Each token is drawn
    by `options` from its row's key at its own index t, and its behaviour log-prob (log softmax at
    temperature 1) and `version` (the policy version drawing it) are kept. `slots` is donated."""
    options = check_options(options, model.config.vocab_size)
    graphdef, params = nnx.split(model)
    return _decode(graphdef, params, slots, jnp.asarray(version, jnp.int32), jnp.asarray(min_free, jnp.int32),
                   options=options, check_every=check_count("check_every", check_every))


@functools.partial(jax.jit, donate_argnames=("slots",))
def _evict(slots: Slots, where):
    return dataclasses.replace(slots, decoding=slots.decoding.at[where].set(False, mode="drop"))


def evict(slots: Slots, where) -> Slots:
    """Stop the rows of slots `where` [R] (S = padding): they no longer decode and their slots are
    free for `insert`. `slots` is donated. R is padded to its bucket (one program per bucket)."""
    where = np.asarray(where, np.int32)
    return _evict(slots, jnp.asarray(padded(where, bucket(len(where), slots.num_slots), slots.num_slots)))


def ended(slots: Slots, occupied: np.ndarray) -> np.ndarray:
    """Host: the occupied slots (bool [S], the caller's bookkeeping) that are no longer decoding."""
    return np.flatnonzero(np.asarray(occupied) & ~np.asarray(host_global(slots.decoding)))


@functools.partial(jax.jit, static_argnames=("eos_ids",))
def _take(slots: Slots, where, *, eos_ids):
    def rows(x):
        return jnp.take(x, where, axis=0)

    tokens, mask = rows(slots.tokens), rows(slots.mask)
    finished = jnp.any(is_eos(tokens, eos_ids) & mask, axis=1)
    return Rollout(rows(slots.prompt_tokens), rows(slots.prompt_mask), tokens, mask, rows(slots.logprobs), finished,
                   None), rows(slots.versions)


def take(slots: Slots, where, eos_ids: tuple[int, ...] = ()) -> tuple[Rollout, Array]:
    """The rows of slots `where` [R] as a Rollout without a cache (finished: an EOS of `eos_ids`
    among its tokens) and the versions [R, N] that wrote their tokens. A copy: the slots may be
    refilled afterwards. R is padded to its bucket (one program per bucket, not per count)."""
    where = np.asarray(where, np.int32)
    count = len(where)
    rows = np.concatenate([where, np.full(bucket(count, slots.num_slots) - count, where[0], np.int32)])
    return jax.tree.map(lambda x: x[:count], _take(slots, jnp.asarray(rows), eos_ids=tuple(eos_ids)))


def with_cache(model: CausalLM, rollout: Rollout, *, chunk_size: int = 512) -> Rollout:
    """The rollout with the model's KV cache of prompt + completion (the layout `sampling.branch`
    reads; `scoring.score_rollout`'s one forward): a slot's cache is not kept once its row is taken
    (the slot is refilled at once), so the windows' branching prefills the rows it needs again,
    one compute-bound forward instead of a cache held per finished row."""
    scores = score_rollout(model, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask,
                           chunk_size=chunk_size, return_cache=True)
    return dataclasses.replace(rollout, cache=scores.cache)


def bucket(count: int, slots: int) -> int:
    """The static row count of an insert of `count` prompts: the next power of two, at most S
    (SGLang-JAX's padding buckets: a handful of compiled prefill shapes, none per count)."""
    return min(1 << max(count - 1, 0).bit_length(), slots)


def padded(where: np.ndarray, rows: int, slots: int) -> np.ndarray:
    """`where` padded to `rows` entries with S (a padding row: `insert` drops it)."""
    return np.concatenate([np.asarray(where, np.int32), np.full(rows - len(where), slots, np.int32)])


def sample_continuous(model: CausalLM, prompts: Array, prompt_mask: Array, *, key: Array, max_new_tokens: int,
                      num_samples: int = 1, slots: int | None = None, check_every: int = 8,
                      refill: int | None = None, options: SamplingOptions = SamplingOptions()) -> tuple[Rollout, Array]:
    """`sampling.generate`'s request decoded on S slots (default: every row at once): rows are
    inserted as slots free up, so the request never waits for its longest row with a slot idle.
    Returns (Rollout without a cache, rows in request order: r = i * num_samples + j, versions
    [B, N], all 0). Row r draws from `sampling.row_keys(key, B)[r]`: the tokens equal generate's
    for the same prompts and key (up to float summation order in the log-probs). refill: the
    slots that must be free before the loop returns to refill them (default max(1, S // 8): each
    return costs a host round trip and an insert)."""
    prompts, prompt_mask, options, n, samples = check_request(model, prompts, prompt_mask, options, max_new_tokens,
                                                              num_samples)
    prompts = jnp.repeat(prompts.astype(jnp.int32), samples, axis=0)
    prompt_mask = jnp.repeat(prompt_mask.astype(bool), samples, axis=0)
    total = prompts.shape[0]
    s = total if slots is None else check_count("slots", slots)
    refill = max(1, s // 8) if refill is None else check_count("refill", refill)
    keys = row_keys(key, total)
    state = init_slots(model, slots=s, prompt_len=prompts.shape[1], max_new_tokens=n)
    holds = np.full(s, -1)  # the request row each slot holds, -1 = free
    queue, pieces, order = 0, [], []
    while queue < total or (holds >= 0).any():
        free = np.flatnonzero(holds < 0)[: total - queue]
        if len(free):
            rows = np.arange(queue, queue + len(free))
            size = bucket(len(free), s)
            pick = np.concatenate([rows, np.full(size - len(rows), rows[0])])
            state = insert(model, state, padded(free, size, s), prompts[pick], prompt_mask[pick], keys[pick])
            holds[free], queue = rows, queue + len(free)
        state = decode(model, state, min_free=min(refill, s) if queue < total else s, check_every=check_every,
                       options=options)
        done = ended(state, holds >= 0)
        if len(done):
            pieces.append(take(state, done, options.eos_ids))
            order.append(holds[done])
            holds[done] = -1
    back = jnp.asarray(np.argsort(np.concatenate(order)))
    rollout, versions = jax.tree.map(lambda *x: jnp.concatenate(x)[back], *pieces)
    return rollout, versions
