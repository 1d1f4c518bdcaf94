"""Routed mixture-of-experts SwiGLU block (Qwen3-MoE) computed with grouped matmuls.

For tokens x [N, D] and router weight W_r [D, E]:
  p = softmax(x W_r)                       (float32)
  (w, e) = top_k(p, k)                     w [N, k] weights, e [N, k] expert ids
  w <- w / sum_j w_j                       when norm_topk_prob
  y_n = sum_j w_nj * down_e(silu(gate_e(x_n)) * up_e(x_n)),  e = e_nj

The N * k (token, expert) assignments are sorted by expert, so every expert's rows are contiguous,
and each projection is one `jax.lax.ragged_dot` over all experts: lhs [N*k, D] with group sizes
[E] against stacked weights [E, D, I]. Each assignment is multiplied by its own expert only, so
the work is N * k expert-MLPs, not N * E. (XLA:GPU and TPU lower ragged_dot to a grouped matmul;
XLA:CPU has no grouped kernel and jax expands it to a masked dense product over all groups, so on
CPU the FLOPs are those of all E experts — same results, slower.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from topd_jax.models.config import ModelConfig
from topd_jax.models.layers import param
from topd_jax.models.sharding import context_mesh, logical_to_spec

Array = jax.Array


def route(logits: Array, k: int, normalize: bool) -> tuple[Array, Array]:
    """Top-k routing of router logits [N, E]: (weights [N, k] float32, expert ids [N, k] int32)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def grouped_swiglu(x: Array, experts: Array, gate: Array, up: Array, down: Array) -> Array:
    """Every token through each of its experts: x [N, D], expert ids [N, k] -> [N, k, D].

    Expert weights: gate and up [E, D, I], down [E, I, D].
    """
    n, k = experts.shape
    flat = experts.reshape(-1)  # assignment a = n * k + j
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    xs = x[order // k]  # [N*k, D]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    ys = jax.lax.ragged_dot(h, down, sizes)
    return jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)


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
        local = functools.partial(moe_forward, top_k=self.top_k, normalize=self.norm_topk_prob)
        mesh = context_mesh()
        split = None if mesh is None else logical_to_spec(("batch", None, None), x.shape, mesh)[0]
        if split is None:
            return local(x, *params)
        # Under a mesh whose batch axes split x: route and sort each device's own tokens. A
        # global sort by expert would gather the whole batch's assignments [B T k, D] onto every
        # device; here each device gathers the expert weights instead (as FSDP does for a dense
        # layer) and its activations stay split along the batch.
        axes = (split,) if isinstance(split, str) else tuple(split)
        return jax.shard_map(local, mesh=mesh, in_specs=(P(split),) + (P(),) * 4, out_specs=P(split),
                             axis_names=set(axes), check_vma=False)(x, *params)


def moe_forward(x: Array, router: Array, gate: Array, up: Array, down: Array, *, top_k: int,
                normalize: bool) -> Array:
    """The block on x [B, T, D] with router [D, E] and expert weights (module docstring)."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    weights, experts = route(flat @ router, top_k, normalize)
    ys = grouped_swiglu(flat, experts, gate, up, down)
    return jnp.einsum("nkd,nk->nd", ys, weights.astype(x.dtype)).reshape(b, t, d)
