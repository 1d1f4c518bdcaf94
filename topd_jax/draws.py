"""How one token is drawn: sampling a row of logits, its behaviour log-prob, EOS, per-row keys.

    keys = row_keys(key, B)                 # k_r = fold_in(key, r)
    y = draw(logits, keys, t, options)      # row r: sample_tokens(logits[r], fold_in(k_r, t[r]))

The pieces `sampling.generate`, `sampling.branch` and `slots.decode` share (sampling.py's module
docstring states the rule).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from topd_jax.sampling import SamplingOptions

Array = jax.Array


def sample_tokens(logits: Array, key: Array, *, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0) -> Array:
    """One token per row of logits [..., V] (float32) -> int32 [...] (module docstring).

    z' = z / T; top_k keeps the k largest z' (ties broken by lower id); top_p keeps sorted tokens
    i with sum_{j < i} p_j < top_p, p the softmax over the top-k set, so the kept set is the
    smallest whose probability reaches top_p; y ~ softmax(z' restricted to the kept set).
    Options are not checked here (`SamplingOptions` refuses bad ones); they are static.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    vocab = scaled.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    if k == vocab and top_p >= 1:
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    # Sorted candidates (lax.top_k: descending, ties by lower index); only k when top_k truncates.
    vals, ids = jax.lax.top_k(scaled, k)
    if top_p < 1:
        probs = jax.nn.softmax(vals, axis=-1)
        # Exclusive cumulative mass of the more likely candidates: 0 for candidate 0, always kept.
        before = jnp.concatenate([jnp.zeros_like(probs[..., :1]), jnp.cumsum(probs, axis=-1)[..., :-1]], axis=-1)
        vals = jnp.where(before < top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def token_logprob(logits: Array, tokens: Array) -> Array:
    """log softmax(logits)[token] at temperature 1: [..., V], [...] -> float32 [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def is_eos(tokens: Array, eos: tuple[int, ...]) -> Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(eos, jnp.int32), axis=-1)


def row_keys(key: Array, rows: int, first: Array | int = 0) -> Array:
    """The keys of rows first .. first + rows - 1 of a request: k_r = fold_in(key, r) -> [rows, ...].
    A row's draws depend on its key and its own token index only (`draw`), never on the other rows
    of the batch or the slot it decodes in: the static and the continuous sampler agree."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(first + jnp.arange(rows, dtype=jnp.int32))


def draw(logits: Array, keys: Array, t: Array, options: SamplingOptions) -> Array:
    """Row r's token t: y ~ sample_tokens(logits[r], fold_in(keys[r], t[r])): logits [..., V], keys
    [..., key] (`row_keys`, the same leading shape), t [...] int (or a scalar) -> int32 [...]."""
    lead = logits.shape[:-1]
    rows = math.prod(lead)

    def one(z, k, i):
        return sample_tokens(z, jax.random.fold_in(k, i), temperature=options.temperature, top_p=options.top_p,
                             top_k=options.top_k)

    flat = jax.vmap(one)(logits.reshape(rows, logits.shape[-1]), keys.reshape(rows, *keys.shape[len(lead):]),
                         jnp.broadcast_to(t, lead).reshape(rows))
    return flat.reshape(lead)
