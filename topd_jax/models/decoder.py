"""The decoder stack all four families share, and its key-value cache.

    tokens [B, T] -> embed -> L x (x + attn(norm(x)); x + mlp_or_moe(norm(x))) -> norm -> logits

`CausalLM(cfg)` is configured by a ModelConfig (families.py reads one from config.json). Calling it:

    logits = model(tokens)                                   # [B, T, V] float32, causal
    hidden = model(tokens, return_hidden=True)               # [B, T, D] after the final norm;
    logits = model.logits(hidden[:, a:b])                    #   logits of any chunk
    logits = model(tokens, attention_mask=pad)               # pad [B, T], 1 = real token
    logits = model(tokens, attention_mask=vis, positions=p)  # vis: masks.Visibility (packed trees)
    logits = model(tokens, attention_mask=m, positions=p)    # explicit m [B, T, T] (dense attention)
    cache = init_cache(cfg, B, S_max)
    logits, cache = model(prompt, cache=cache)               # prefill, then one step at a time:
    logits, cache = model(next_tokens, cache=cache)          # [B, 1]

Layers are scanned, not unrolled: each run of consecutive layers of one kind (all of a uniform
model; dense and MoE runs of a mixed Qwen3-MoE) is one `LayerStack` whose parameters carry a
leading `layers` axis, applied by `jax.lax.scan`, so the compiled program does not grow with depth.
`cfg.remat` rematerialises each layer in the backward pass (`REMAT_POLICIES`). Attention runs
through `attention.attention` with `cfg.attention` / `cfg.attention_block`; masks are `Visibility`
metadata (a padding mask becomes one), so the memory-efficient backends never see a [T, S] mask.

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
from topd_jax.models.masks import Visibility, causal_visibility, explicit_mask, positions_from_padding
from topd_jax.models.moe import MoEBlock
from topd_jax.models.sharding import constrain_batch, context_mesh, logical_to_spec

Array = jax.Array

# `ModelConfig.remat` -> the jax.checkpoint policy of one scanned layer (None: no remat).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
}


class KVCache(NamedTuple):
    """Preallocated keys and values of every layer; functional (calls return an updated copy).

    keys, values: [B, L, S_max, K, H] (layer l's cache is [:, l]); valid [B, S_max] bool marks
    slots holding real tokens; index int32 [] is the next slot to write (slots [0, index) are
    filled), or the Python int 0 of a fresh cache (`init_cache`): then the prefill is known to
    be causal from slot 0 (`Visibility.causal_len`), so the fused attention kernels serve it.
    index may also be int32 [B], a next slot per row (the slots of `topd_jax.slots`, each row at
    its own length): then a call is one decode step (T = 1) and row r writes slot index[r] (an
    index >= S_max writes nothing: a slot that is not decoding).
    """

    keys: Array
    values: Array
    valid: Array
    index: Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt included)."""
    shape = (batch, cfg.num_layers, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool), 0)


def init_branch_cache(cfg: ModelConfig, batch: int, branches: int, window: int,
                      dtype=jnp.bfloat16) -> tuple[Array, Array]:
    """Empty branch-local (keys, values) [B, L, M, W, K, H] for `CausalLM.branch_step`."""
    shape = (batch, cfg.num_layers, branches, window, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        mlp = MoEBlock if cfg.is_moe_layer(layer) else MLP
        self.mlp = mlp(cfg, dtype=dtype, rngs=rngs)
        self.impl, self.block = cfg.attention, cfg.attention_block

    def __call__(self, x, cos, sin, mask, cache=None, layer=None, index=None):
        """x [B, T, D] -> ([B, T, D], cache): the stacked cache (Attention.__call__) with this layer's
        keys and values written at slots [index, index + T), or None without one."""
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, index, impl=self.impl,
                                  block=self.block)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache

    def branch_step(self, x, cos, sin, prefix, branch_kv, layer, step, prefix_end=None):
        """x [B, M, D] -> [B, M, D] for one lockstep token per branch (Attention.branch_step);
        branch_kv: the stacked [B, L, M, W, K, H] branch cache, layer `layer` written in place."""
        h, branch_kv = self.self_attn.branch_step(self.input_layernorm(x), cos, sin, prefix, branch_kv, layer, step,
                                                  block=self.block, prefix_end=prefix_end)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), branch_kv


def _stacked(layers: list[DecoderLayer]) -> DecoderLayer:
    """layers[0] with every parameter replaced by the stack of all layers' [L, ...] and its
    logical axes prefixed by `layers` (each layer keeps the values it was initialised with)."""
    flat = [dict(nnx.to_flat_state(nnx.state(layer, nnx.Param))) for layer in layers]
    stacked = []
    for path, var in flat[0].items():
        axes = ("layers", *var.get_metadata()["out_sharding"])
        value = jnp.stack([f[path].get_value() for f in flat])
        stacked.append((path, var.replace(value, out_sharding=axes)))
    nnx.update(layers[0], nnx.from_flat_state(stacked))
    return layers[0]


class LayerStack(nnx.Module):
    """Layers [first, first + count) of one kind as one module: parameters [count, ...] on a
    leading `layers` axis, applied by `lax.scan` (rematerialised per `cfg.remat`)."""

    def __init__(self, cfg: ModelConfig, first: int, count: int, *, dtype, rngs: nnx.Rngs):
        self.layer = _stacked([DecoderLayer(cfg, first + i, dtype=dtype, rngs=rngs) for i in range(count)])
        self.first, self.count = first, count
        self.remat = cfg.remat

    def _scan(self, body, carry, extra_xs=()):
        graphdef, state = nnx.split(self.layer)

        def step(carry, xs):
            layer_state, offset = xs[0], xs[1]
            return body(nnx.merge(graphdef, layer_state), carry, self.first + offset, *xs[2:]), None

        if REMAT_POLICIES[self.remat] is not None:
            step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat])
        carry, _ = jax.lax.scan(step, carry, (state, jnp.arange(self.count), *extra_xs))
        return carry

    def __call__(self, x, cos, sin, mask, cache_kv=None, index=None):
        """x [B, T, D] through the stack; cache_kv: the whole (keys, values) [B, L, S, K, H] of
        every layer, this stack's layers updated at slots [index, index + T)."""

        def body(layer, carry, i):
            # Activations stay split along the batch (under a context mesh): with FSDP the
            # partitioner then gathers each layer's weights instead of replicating the batch.
            # The whole cache is the carry and layer i writes its slots in place (Attention).
            return layer(constrain_batch(carry[0]), cos, sin, mask, carry[1], i, index)

        return self._scan(body, (x, cache_kv))

    def branch_step(self, x, cos, sin, prefix, branch_kv, step, prefix_end=None):
        """One lockstep token per branch through the stack (DecoderLayer.branch_step); prefix =
        (keys, values, prefix_len, valid), its [B, L, S, K, H] read in place, branch_kv
        [B, L, M, W, K, H] updated in place (the carry)."""

        def body(layer, carry, i):
            return layer.branch_step(carry[0], cos, sin, prefix, carry[1], i, step, prefix_end)

        return self._scan(body, (x, branch_kv))


class CausalLM(nnx.Module):
    """Decoder-only language model (module docstring). `dtype` is the parameter and compute dtype."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([LayerStack(cfg, a, b - a, dtype=dtype, rngs=rngs) for a, b in cfg.layer_groups()])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i as its own module (a view of its slice of the stacked parameters)."""
        for stack in self.layers:
            if stack.first <= i < stack.first + stack.count:
                graphdef, state = nnx.split(stack.layer)
                return nnx.merge(graphdef, jax.tree.map(lambda x: x[i - stack.first], state))
        raise IndexError(f"layer {i} out of range [0, {self.config.num_layers})")

    def head(self) -> Array:
        """The LM head's weight: embed_tokens [V, D] when tied, else lm_head [D, V]. Under a context
        mesh its embed axis is gathered (its vocab axis keeps its rule): each device multiplies its
        own rows by the whole hidden size, so logits are never partial sums reduced across devices.
        Read it once outside a chunk loop and pass it to every chunk's `logits`: the gather
        (FSDP's) then happens once per program, not once per chunk."""
        tied = self.config.tie_word_embeddings
        weight, axes = (self.embed_tokens[...], ("vocab", "embed")) if tied else (self.lm_head[...], ("embed", "vocab"))
        mesh = context_mesh()
        if mesh is None:
            return weight
        return jax.lax.with_sharding_constraint(weight, logical_to_spec(axes, weight.shape, mesh, {"embed": None}))

    def logits(self, hidden: Array, head: Array | None = None) -> Array:
        """[..., D] final hidden states -> [..., V] float32 logits (tied or separate LM head);
        head: `self.head()`, when the caller read it already (a chunk loop)."""
        head = self.head() if head is None else head
        if self.config.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)

    def __call__(self, tokens: Array, *, positions: Array | None = None,
                 attention_mask: Array | Visibility | None = None, cache: KVCache | None = None,
                 return_hidden: bool = False):
        """tokens [B, T] int -> logits [B, T, V] (or hidden [B, T, D]); with a cache, (out, cache).

        attention_mask: None (causal), [B, T] padding mask (1 = real), a masks.Visibility over the
        T_kv keys, or an explicit boolean [B, T, T_kv] / [B, 1, T, T_kv] mask used as given (dense
        attention; T_kv = T, or S_max with a cache). positions: [B, T] int; default see module
        docstring.
        """
        b, t = tokens.shape
        given = isinstance(attention_mask, Visibility)
        explicit = not given and attention_mask is not None and attention_mask.ndim >= 3
        padding = None if attention_mask is None or explicit or given else attention_mask.astype(bool)
        if padding is not None and padding.shape != (b, t):
            raise ValueError(f"padding attention_mask of shape {padding.shape} does not match tokens {(b, t)}")
        if cache is None:
            index = None
            pad = jnp.ones((b, t), bool) if padding is None else padding
            mask = attention_mask if given else explicit_mask(attention_mask, b, t, t) if explicit \
                else causal_visibility(pad)
            if positions is None and padding is not None:
                positions = positions_from_padding(padding)
            elif positions is None:
                positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        else:
            index, kv_len = cache.index, cache.max_len
            if t > kv_len:
                raise ValueError(f"{t} tokens do not fit a cache of {kv_len} slots")
            per_row = jnp.ndim(index) == 1  # slots of a continuous decoder, each at its own index
            if per_row and (t != 1 or given or explicit):
                raise ValueError("a per-row cache index [B] serves one-token decode steps with a padding mask only")
            new = jnp.ones((b, t), bool) if padding is None else padding
            if per_row:  # row r writes slot index[r]; an index past the cache writes nothing
                valid = cache.valid.at[jnp.arange(b), index].set(new[:, 0], mode="drop")
            else:
                valid = jax.lax.dynamic_update_slice(cache.valid, new, (0, index))
            if given:
                mask = attention_mask
            elif explicit:
                mask = explicit_mask(attention_mask, b, t, kv_len)
            else:
                mask = causal_visibility(new, start=index[:, None] if per_row else index, key_valid=valid)
            if positions is None:
                counts = jnp.cumsum(valid.astype(jnp.int32), axis=1)
                counts = (jnp.take_along_axis(counts, jnp.minimum(index, kv_len - 1)[:, None], axis=1) if per_row
                          else jax.lax.dynamic_slice_in_dim(counts, index, t, axis=1))
                positions = jnp.maximum(counts - 1, 0)
        cos, sin = rope_angles(positions, self.config)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        kv = None if cache is None else (cache.keys, cache.values)
        for stack in self.layers:
            x, kv = stack(x, cos, sin, mask, kv, index)
        x = self.norm(x)
        out = x if return_hidden else self.logits(x)
        if cache is None:
            return out
        return out, KVCache(kv[0], kv[1], valid, jnp.asarray(index + t, jnp.int32))

    def branch_step(self, tokens: Array, positions: Array, prefix: KVCache, prefix_len: Array,
                    branch_kv: tuple[Array, Array], step: Array,
                    prefix_end: int | None = None) -> tuple[Array, tuple[Array, Array]]:
        """One decode step of M branches per row from a shared prefix cache, read in place.

        tokens, positions [B, M] int: the token each branch feeds now and its RoPE position.
        prefix: the rows' cache (slots [B, S]); branch m of row b reads the slots s < prefix_len[b, m]
        with prefix.valid[b, s], never copying them. branch_kv: (keys, values) [B, L, M, W, K, H]
        from `init_branch_cache`; this step's keys and values go to slot `step` (int32 [], shared:
        the branches decode in lockstep) and the branch reads its slots <= step.
        Returns logits [B, M, V] float32 and the updated branch_kv. For one branch this equals
        `__call__` on the prefix's visible tokens followed by the branch's tokens. The prefix is read
        in key blocks up to max prefix_len (`attention.attend_branches`), or up to `prefix_end`, a
        static bound on prefix_len (the plan compiles a step at a fixed prefix length).
        """
        cos, sin = rope_angles(positions, self.config)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        reads = (prefix.keys, prefix.values, prefix_len, prefix.valid)
        for stack in self.layers:
            x, branch_kv = stack.branch_step(x, cos, sin, reads, branch_kv, step, prefix_end)
        return self.logits(self.norm(x)), branch_kv
