"""What each phase of a step must cost at least, from first principles: the plan's `bound s` column.

The estimate (`report.roofline_seconds`) reads the compiled programs; the bound asks what the
hardware must do whatever the program, per device, from the shapes alone. A phase is a sum of parts,
each run `times` times; a part costs max(F / peak FLOP/s, H / HBM bandwidth) (perfect overlap):

    F  matmul FLOPs the part must do, split evenly over the n devices:
         forward, per token:  2 (D (N + 2 K) H + N H D) + mlp + 4 N H c      per layer, + 2 D V at scored rows
         mlp:                 2 x 3 D F (dense), 2 D E + k x 2 x 3 D I (MoE: the router, k experts)
         c:                   the keys a token attends to (causal: half the sequence on average)
         an update:           3 x forward (forward, and the backward's two matmuls per forward one)
    H  bytes the part must move through HBM: for a decode step, each device's share of the
       weights under the layout the phase runs in (read once per step) plus its share of the KV
       cache filled so far (read once per step); prefills and updates are FLOP-bound and their H is
       their weights once

Decode parts use the average filled length: the sampling loop's step t reads P + t slots, so
the mean step of a loop run to the cap N reads P + N / 2 (a rollout mode's own steps and mean
filled length: `plan.modes`); the window steps read the prefix (P + N / 2 on average, each row's
cache once for all its M branches). Each device's shares come from the abstract arrays with their
shardings (`figures.per_device_bytes`), so they follow the inference mesh.

Recomputation (remat), masked padding, per-expert capacity and every elementwise op are excluded:
the bound is what no program can beat, not what this one should reach.
"""

from __future__ import annotations

import dataclasses

from topd_jax.hardware.chips import Chip
from topd_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a phase: `times` repetitions of `flops` FLOPs and `hbm_bytes` bytes per device."""

    what: str
    flops: float
    hbm_bytes: float
    times: float = 1  # a rollout mode's expected steps need not be whole

    def seconds(self, chip: Chip) -> float:
        return self.times * max(self.flops / chip.peak_flops, self.hbm_bytes / chip.hbm_bandwidth)


@dataclasses.dataclass(frozen=True)
class Bound:
    """A phase's parts; decode_tokens: tokens the phase's decode loop writes per device (sample)."""

    parts: tuple[Part, ...]
    decode_tokens: float = 0.0

    def seconds(self, chip: Chip) -> float:
        return sum(p.seconds(chip) for p in self.parts)


def layer_flops_per_token(cfg: ModelConfig, layer: int, context: float) -> float:
    """Matmul FLOPs of decoder layer `layer` for one token attending to `context` keys."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attention = 2 * (d * (n + 2 * k) * h + n * h * d) + 4 * n * h * context
    if cfg.is_moe_layer(layer):
        mlp = 2 * d * cfg.num_experts + cfg.num_experts_per_tok * 6 * d * cfg.moe_intermediate_size
    else:
        mlp = 6 * d * cfg.intermediate_size
    return attention + mlp


def forward_flops(cfg: ModelConfig, tokens: float, context: float, scored: float) -> float:
    """Matmul FLOPs of a forward over `tokens` tokens each attending to `context` keys on average,
    with the LM head at `scored` of them."""
    per_token = sum(layer_flops_per_token(cfg, layer, context) for layer in range(cfg.num_layers))
    return tokens * per_token + scored * 2 * cfg.hidden_size * cfg.vocab_size


def prefill_part(cfg: ModelConfig, *, rows: int, prompt: int, devices: int, weight_bytes: float) -> Part:
    """The prefill of `rows` prompts of `prompt` tokens (weight_bytes: one device's share)."""
    return Part("prefill", forward_flops(cfg, rows * prompt, prompt / 2, rows) / devices, weight_bytes)


def decode_part(cfg: ModelConfig, *, rows: int, filled: float, steps: float, devices: int, weight_bytes: float,
                slot_bytes: float) -> Part:
    """`steps` decode steps of `rows` rows, each reading `filled` cache slots per row on average."""
    return Part("decode step", forward_flops(cfg, rows, filled, rows) / devices, weight_bytes + slot_bytes * filled,
                steps)


def sample_bound(cfg: ModelConfig, *, rows: int, prompt: int, new: int, devices: int, weight_bytes: float,
                 slot_bytes: float) -> Bound:
    """The prefill of `rows` prompts of `prompt` tokens, then `new` decode steps (the loop run to
    its cap; `plan.modes` for the steps a rollout mode runs).

    weight_bytes: one device's share of the student's weights (inference layout); slot_bytes: one
    device's share of one cache slot of every row (its rows x its kv heads x layers x K and V)."""
    return Bound((prefill_part(cfg, rows=rows, prompt=prompt, devices=devices, weight_bytes=weight_bytes),
                  decode_part(cfg, rows=rows, filled=prompt + new / 2, steps=new, devices=devices,
                              weight_bytes=weight_bytes, slot_bytes=slot_bytes)),
                 decode_tokens=rows * new / devices)


def score_bound(cfg: ModelConfig, *, rows: int, length: int, scored: int, devices: int,
                weight_bytes: float) -> Bound:
    """One forward of `rows` sequences of `length` tokens, log-probs at `scored` positions each."""
    return Bound((Part("forward", forward_flops(cfg, rows * length, length / 2, rows * scored) / devices,
                       weight_bytes),))


def window_bound(cfg: ModelConfig, *, rows: int, points: int, window: int, prefix: float, devices: int,
                 weight_bytes: float, slot_bytes: float) -> Part:
    """`window` decode steps of `points` branches per row from a prefix of `prefix` slots on average."""
    return Part("window step", forward_flops(cfg, rows * points, prefix + window / 2, rows * points) / devices,
                weight_bytes + slot_bytes * prefix, window)


def update_bound(cfg: ModelConfig, *, rows: int, length: int, scored: int, devices: int,
                 weight_bytes: float) -> Bound:
    """Forward and backward of `rows` packed sequences of `length` tokens (3 x the forward's FLOPs)."""
    return Bound((Part("forward + backward", 3 * forward_flops(cfg, rows * length, length / 2, rows * scored)
                       / devices, 3 * weight_bytes),))


__all__ = ["Bound", "Part", "decode_part", "forward_flops", "layer_flops_per_token", "prefill_part", "sample_bound",
           "score_bound", "update_bound", "window_bound"]
