"""Cost of the TOPD loss next to plain OPD, and of the OT divergence per window, in one run.

    python benchmarks/bench_loss.py            # full sizes
    python benchmarks/bench_loss.py --quick    # tiny smoke sizes

(a) jitted `topd_loss` (preset topd, every input given: positions/valid, ot, reference_ot with
    R = 2, window_logprobs/window_mask, plus the diagnostic inputs) against jitted `opd_loss` on
    [B, T] rollouts: forward, and value_and_grad (topd: w.r.t. student_logprobs and
    window_logprobs; opd: w.r.t. student_logprobs, the only differentiated input it has).
(b) jitted `ot_distance` over N windows of K tokens with D-wide random embeddings, some windows
    short (masked), at the config's epsilon and iteration count.

Each function is traced and compiled first (timed and printed on its own), run once to warm up,
then timed over `--repeats` (losses) or `--ot-repeats` calls with `block_until_ready`; median and
min are reported. Runs on whatever backend JAX finds. Peak host memory at full size is under 2 GiB
(1.7 GB resident on CPU), almost all of it (b)'s two [512, 50, 2560] fp32 embedding arrays.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp

from topd_jax.losses import TopdConfig, TopdInputs, opd_loss, ot_distance, select_candidates, topd_loss

FULL = dict(batch=64, tokens=4096, candidates=8, window=50, references=2, windows=512, dim=2560)
QUICK = dict(batch=4, tokens=256, candidates=8, window=16, references=2, windows=16, dim=64)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke sizes instead of the full ones")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per loss function (default 50, quick 3)")
    parser.add_argument("--ot-repeats", type=int, default=None, help="timed ot_distance calls (default 20, quick 3)")
    parser.add_argument("--emb-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the OT window embeddings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 50
    if args.ot_repeats is None:
        args.ot_repeats = 3 if args.quick else 20
    if min(args.repeats, args.ot_repeats) < 1:
        parser.error("--repeats and --ot-repeats must be >= 1")
    return args


@dataclasses.dataclass
class Timing:
    compile_s: float
    median_s: float
    min_s: float


def time_jitted(fn, args: tuple, repeats: int) -> Timing:
    """Trace + compile once (timed), warm up once, then time `repeats` blocking calls."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(compile_s, statistics.median(times), min(times))


def rollout_inputs(key: jax.Array, sizes: dict, config: TopdConfig) -> TopdInputs:
    """Random but well-formed TopdInputs: right-padded rollouts, candidates picked from d."""
    b, t, m, k, r = (sizes[n] for n in ("batch", "tokens", "candidates", "window", "references"))
    keys = jax.random.split(key, 10)
    lengths = jax.random.randint(keys[0], (b, 1), t // 4, t + 1)
    mask = (jnp.arange(t)[None, :] < lengths).astype(jnp.float32)
    behaviour = -jax.random.exponential(keys[1], (b, t))
    teacher = -jax.random.exponential(keys[2], (b, t))
    student = behaviour + 0.01 * jax.random.normal(keys[3], (b, t))  # slightly off-policy
    positions, valid = select_candidates(
        behaviour - teacher, mask, quantile=config.candidate_quantile, max_candidates=m
    )
    window_lengths = jax.random.randint(keys[4], (b, m, 1), 1, k + 1)
    return TopdInputs(
        student_logprobs=student,
        behaviour_logprobs=behaviour,
        teacher_logprobs=teacher,
        mask=mask,
        positions=positions,
        valid=valid,
        ot=jax.random.uniform(keys[5], (b, m), maxval=1.2),
        reference_ot=jax.random.uniform(keys[6], (b, r), maxval=1.2),
        reference_valid=jnp.ones((b, r), bool),
        window_logprobs=-jax.random.exponential(keys[7], (b, m, k)),
        window_mask=(jnp.arange(k)[None, None, :] < window_lengths).astype(jnp.float32),
        teacher_agrees=jax.random.bernoulli(keys[8], 0.7, (b, t)),
        finished=jax.random.bernoulli(keys[9], 0.8, (b,)),
    )


def bench_losses(key: jax.Array, sizes: dict, repeats: int) -> None:
    config = TopdConfig.preset("topd")
    inputs = jax.block_until_ready(rollout_inputs(key, sizes, config))

    def opd_forward(s, b, q, m):
        return opd_loss(s, b, q, m, clip_eps=config.clip_eps, agg=config.agg)

    def opd_grad(s, b, q, m):
        return jax.value_and_grad(opd_forward, has_aux=True)(s, b, q, m)

    def topd_forward(inputs):
        return topd_loss(inputs, config)

    def topd_grad(inputs):
        def loss(s, w):
            return topd_loss(dataclasses.replace(inputs, student_logprobs=s, window_logprobs=w), config)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(inputs.student_logprobs, inputs.window_logprobs)

    rollout = (inputs.student_logprobs, inputs.behaviour_logprobs, inputs.teacher_logprobs, inputs.mask)
    print(
        f"(a) loss: B={sizes['batch']} T={sizes['tokens']} M={sizes['candidates']} K={sizes['window']} "
        f"R={sizes['references']}, preset topd vs opd_loss, {repeats} timed calls each"
    )
    print(f"    {'':36s} {'compile s':>10s} {'median ms':>10s} {'min ms':>10s}")
    rows = {}
    for name, fn, args in [
        ("opd_loss forward", opd_forward, rollout),
        ("topd_loss forward", topd_forward, (inputs,)),
        ("opd_loss value_and_grad (s)", opd_grad, rollout),
        ("topd_loss value_and_grad (s, window)", topd_grad, (inputs,)),
    ]:
        rows[name] = timing = time_jitted(fn, args, repeats)
        print(f"    {name:36s} {timing.compile_s:10.3f} {timing.median_s * 1e3:10.3f} {timing.min_s * 1e3:10.3f}")
    for kind, opd_name, topd_name in [
        ("forward", "opd_loss forward", "topd_loss forward"),
        ("value_and_grad", "opd_loss value_and_grad (s)", "topd_loss value_and_grad (s, window)"),
    ]:
        ratio_median = rows[topd_name].median_s / rows[opd_name].median_s
        ratio_min = rows[topd_name].min_s / rows[opd_name].min_s
        print(f"    ratio topd/opd {kind:15s} median {ratio_median:6.2f}x   min {ratio_min:6.2f}x")


def bench_ot(key: jax.Array, sizes: dict, repeats: int, emb_dtype: str) -> None:
    config = TopdConfig()
    n, k, d = sizes["windows"], sizes["window"], sizes["dim"]
    keys = jax.random.split(key, 4)
    x = jax.random.normal(keys[0], (n, k, d), emb_dtype)
    y = jax.random.normal(keys[1], (n, k, d), emb_dtype)

    def window_mask(key):
        # 3 in 4 windows run the full K tokens; the rest stop early (EOS) after 1..K-1 tokens.
        short, length = jax.random.split(key)
        lengths = jnp.where(
            jax.random.bernoulli(short, 0.25, (n, 1)), jax.random.randint(length, (n, 1), 1, max(k, 2)), k
        )
        return jnp.arange(k)[None, :] < lengths

    x_mask, y_mask = window_mask(keys[2]), window_mask(keys[3])
    x, y, x_mask, y_mask = jax.block_until_ready((x, y, x_mask, y_mask))
    short = int(jnp.sum(~x_mask[:, -1])) + int(jnp.sum(~y_mask[:, -1]))

    def distance(x, y, x_mask, y_mask):
        return ot_distance(x, y, x_mask, y_mask, epsilon=config.ot_epsilon, num_iters=config.ot_num_iters)

    timing = time_jitted(distance, (x, y, x_mask, y_mask), repeats)
    print(
        f"(b) ot_distance: {n} window pairs, K={k}, D={d} ({emb_dtype}), {short} of {2 * n} windows short, "
        f"epsilon={config.ot_epsilon}, {config.ot_num_iters} iterations, {repeats} timed calls"
    )
    print(f"    compile {timing.compile_s:.3f} s")
    print(f"    total      median {timing.median_s * 1e3:10.3f} ms   min {timing.min_s * 1e3:10.3f} ms")
    print(f"    per window median {timing.median_s / n * 1e6:10.3f} us   min {timing.min_s / n * 1e6:10.3f} us")


def main() -> None:
    args = parse_args()
    sizes = QUICK if args.quick else FULL
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, backend {jax.default_backend()}, "
        f"device {device.device_kind} x{jax.device_count()}, host CPUs {os.cpu_count()}, "
        f"{'quick' if args.quick else 'full'} sizes"
    )
    loss_key, ot_key = jax.random.split(jax.random.key(args.seed))
    bench_losses(loss_key, sizes, args.repeats)
    bench_ot(ot_key, sizes, args.ot_repeats, args.emb_dtype)


if __name__ == "__main__":
    main()
