"""Routed mixture-of-experts SwiGLU block (Qwen3-MoE) computed with grouped matmuls.

For tokens x [N, D] and router weight W_r [D, E]:
  p = softmax(x W_r)                       (float32)
  (w, e) = top_k(p, k)                     w [N, k] weights, e [N, k] expert ids
  w <- w / sum_j w_j                       when norm_topk_prob
  y_n = sum_j w_nj * down_e(silu(gate_e(x_n)) * up_e(x_n)),  e = e_nj

The N * k (token, expert) assignments are sorted by expert, so every expert's rows are contiguous,
and each projection is one `jax.lax.ragged_dot` over all experts: lhs [N*k, D] with group sizes
[E] against stacked weights [E, D, I]. Each assignment is multiplied by its own expert only, so
the work is N * k expert-MLPs, not N * E; the weighted outputs are scatter-added to their tokens.
(XLA:GPU and TPU lower ragged_dot to a grouped matmul; XLA:CPU has no grouped kernel and jax
expands it to a masked dense product over all groups, so on CPU the FLOPs are those of all E
experts — same results, slower.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from topd_jax.models.config import ModelConfig
from topd_jax.models.layers import param
from topd_jax.models.sharding import context_mesh, logical_to_spec, mesh_axes

Array = jax.Array


def route(logits: Array, k: int, normalize: bool) -> tuple[Array, Array]:
    """Top-k routing of router logits [N, E]: (weights [N, k] float32, expert ids [N, k] int32)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def grouped_swiglu(x: Array, experts: Array, weights: Array, gate: Array, up: Array, down: Array) -> Array:
    """Every token through each of its experts, weighted: x [N, D], expert ids and weights [N, k]
    -> y [N, D] with y_n = sum_j w_nj down_e(silu(gate_e(x_n)) * up_e(x_n)), e = e_nj.

    Expert weights: gate and up [E, D, I], down [E, I, D]. The N k assignments are sorted by
    expert and each projection is one `ragged_dot`; the weight w_nj scales the [N k, I] hidden
    before the down projection (linear, so the same sum), and the outputs are added straight back
    to their tokens in the model's dtype (a scatter-add into [N, D], as transformers' `index_add_`;
    no [N, k, D] array). An assignment of
    weight 0 adds exactly nothing (how expert parallelism parks the assignments of experts other
    devices hold).
    """
    n, k = experts.shape
    flat = experts.reshape(-1)  # assignment a = n * k + j
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    token = order // k
    xs = x[token]  # [N*k, D]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    ys = jax.lax.ragged_dot(h * weights.reshape(-1)[order, None].astype(h.dtype), down, sizes)
    return jnp.zeros((n, x.shape[1]), ys.dtype).at[token].add(ys)


class MoEBlock(nnx.Module):
    """x [B, T, D] -> [B, T, D]: router + `num_experts` SwiGLU experts of width moe_intermediate_size."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = param(rngs, (d, e), ("embed", "expert"), dtype)
        self.gate_proj = param(rngs, (e, d, i), ("expert", "embed", "expert_mlp"), dtype)
        self.up_proj = param(rngs, (e, d, i), ("expert", "embed", "expert_mlp"), dtype)
        self.down_proj = param(rngs, (e, i, d), ("expert", "expert_mlp", "embed"), dtype)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def __call__(self, x: Array) -> Array:
        params = (self.router[...], self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        mesh = context_mesh()
        if mesh is None:
            return moe_forward(x, *params, top_k=self.top_k, normalize=self.norm_topk_prob)
        return expert_parallel(x, *params, mesh=mesh, top_k=self.top_k, normalize=self.norm_topk_prob)


# Tokens per device routed at once by `expert_parallel` (gathered over the expert axis): bounds the
# [tokens x k, D] assignment buffers of a long prefill; a decode step is one chunk.
EP_CHUNK_TOKENS = 4096


def expert_parallel(x: Array, router: Array, gate: Array, up: Array, down: Array, *, mesh, top_k: int,
                    normalize: bool) -> Array:
    """The block under a mesh, each device computing only its own experts' share (`jax.shard_map`).

    Shardings come from the logical-axis rules: x's batch axes (data, fsdp, expert), the experts'
    `expert` axis (E / e per device) and `expert_mlp` axis (I / t per device, tensor). The embed
    axis of the weights is gathered at entry, as FSDP gathers a dense layer's. Per device, with
    x_d its own tokens:

        x_g = all_gather(x_d over expert)           tokens of the devices sharing its experts
        y_g = sum_{j: e_nj local} w_nj down_e(silu(gate_e(x)) * up_e(x))   local experts, I / t
        y   = psum(y_g over tensor);  y_d = psum_scatter(y over expert)     back to x_d's rows

    so decoding moves only activations (all-gather and reduce-scatter of [tokens, D]), never an
    expert's weights, and each device reads 1 / (e t) of the expert weights. Without expert or
    tensor axes this is the batch-split routing of each device's own tokens with the experts
    gathered (FSDP). Tokens are routed EP_CHUNK_TOKENS at a time (`lax.map`), so a long prefill's
    assignment buffers stay bounded. Equals `moe_forward` on the whole batch.
    """
    batch = logical_to_spec(("batch", None, None), x.shape, mesh)[0]
    w_spec = logical_to_spec(("expert", "embed", "expert_mlp"), gate.shape, mesh)
    expert_axes, mlp_axes = mesh_axes(w_spec[0]), mesh_axes(w_spec[2])
    gathered = tuple(a for a in expert_axes if a in mesh_axes(batch))  # tokens to collect from peers
    replicated_tokens = tuple(a for a in expert_axes if a not in gathered)
    n_local = gate.shape[0] // math.prod(mesh.shape[a] for a in expert_axes)

    def local(x, router, gate, up, down):
        b, t, d = x.shape
        first = 0
        for a in expert_axes:  # the index of this device's first expert
            first = first * mesh.shape[a] + jax.lax.axis_index(a)
        first = first * n_local

        def route_chunk(flat):  # [C, D] own tokens -> [C, D] their outputs
            tokens = jax.lax.all_gather(flat, gathered, axis=0, tiled=True) if gathered else flat
            weights, experts = route(tokens @ router, top_k, normalize)
            own = experts - first
            mine = (own >= 0) & (own < n_local)
            # Another device's expert: parked on local expert 0 with weight 0 (adds nothing).
            y = grouped_swiglu(tokens, jnp.where(mine, own, 0), jnp.where(mine, weights, 0.0), gate, up, down)
            if mlp_axes or replicated_tokens:
                y = jax.lax.psum(y, mlp_axes + replicated_tokens)
            return jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True) if gathered else y

        flat = x.reshape(b * t, d)
        chunk = EP_CHUNK_TOKENS
        if b * t <= chunk:
            return route_chunk(flat).reshape(b, t, d)
        pad = (-(b * t)) % chunk
        chunks = jnp.pad(flat, [(0, pad), (0, 0)]).reshape(-1, chunk, d)
        return jax.lax.map(route_chunk, chunks).reshape(-1, d)[:b * t].reshape(b, t, d)

    w_in = P(w_spec[0], None, w_spec[2])
    w_out = P(w_spec[0], w_spec[2], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(batch), P(), w_in, w_in, w_out), out_specs=P(batch),
                         check_vma=False)(x, router, gate, up, down)


def moe_forward(x: Array, router: Array, gate: Array, up: Array, down: Array, *, top_k: int,
                normalize: bool) -> Array:
    """The block on x [B, T, D] with router [D, E] and expert weights (module docstring)."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    weights, experts = route(flat @ router, top_k, normalize)
    return grouped_swiglu(flat, experts, weights, gate, up, down).reshape(b, t, d)
