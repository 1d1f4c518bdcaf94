"""The training step: time split, TOPD step time / OPD step time side by side, and the train
step's FLOP/s against this machine's measured matmul peak, in one run.

    python benchmarks/bench_step.py                  # configs/tiny_cpu.yaml, bench shapes below
    python benchmarks/bench_step.py --quick          # smoke sizes
    python benchmarks/bench_step.py --size 0.6b      # a Qwen3-0.6B-shaped random student (GPU/TPU)
    python benchmarks/bench_step.py key=value ...    # any trainer override

Two trainers (`preset=opd`, `preset=topd`) are built on the same config, compiled by two warm-up
steps each, then stepped alternately (opd, topd, opd, ...) for --steps steps each, so both see
the same machine state. Reported: the median seconds per phase (sample / score / branch / train)
and per step, the ratio of median step times TOPD / OPD (the paper reports about 1.41x; goal
<= 1.25x), and for each preset the train update's FLOP/s (loop-aware FLOPs of the compiled
update / its median time) as a fraction of the matmul peak measured here (`measure_matmul_peak`,
float32 on CPU, bfloat16 elsewhere), i.e. an MFU with a measured, not nominal, peak.

The ratio depends mostly on how much look-ahead decoding a rollout carries, (M + R) K / N. The
bench keeps the paper's proportion (defaults M = 8, R = 2, K = 50 against rollouts of about 4,000
tokens: 500 / 4,000 = 0.125) at a CPU-sized scale: (4 + 2) x 8 = 48 window tokens against N = 384
rollout tokens. `rollout.max_new_tokens=128` (0.375) shows a branch-heavy run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

BENCH = ["steps=1000", "rollout.prompts_per_step=8", "rollout.max_new_tokens=384", "data.prompt_length=16",
         "loss.window=8", "loss.max_candidates=4", "loss.num_reference=2", "logging.progress=false",
         "logging.tensorboard=false", "checkpoint.every=0"]
QUICK = ["steps=1000", "rollout.prompts_per_step=8", "rollout.max_new_tokens=12", "data.prompt_length=5",
         "loss.window=3", "loss.max_candidates=2", "logging.progress=false", "logging.tensorboard=false",
         "checkpoint.every=0"]
QWEN3_0_6B = ["student.random.vocab_size=151936", "student.random.hidden_size=1024",
              "student.random.intermediate_size=3072", "student.random.num_layers=28", "student.random.num_heads=16",
              "student.random.num_kv_heads=8", "student.random.head_dim=128", "student.dtype=bfloat16",
              "teacher.random.vocab_size=151936", "teacher.random.hidden_size=1024",
              "teacher.random.intermediate_size=3072", "teacher.random.num_layers=28", "teacher.random.num_heads=16",
              "teacher.random.num_kv_heads=8", "teacher.random.head_dim=128", "teacher.random.init_seed=1",
              "teacher.dtype=bfloat16", "rollout.max_new_tokens=1024", "loss.window=50", "loss.max_candidates=8",
              "rollout.prompts_per_step=8", "data.prompt_length=64"]
PHASES = ("sample", "score", "branch", "train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", choices=("tiny", "0.6b"), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per preset (default 10, quick 2)")
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp

    from topd_jax.trainer.config import load_config
    from topd_jax.trainer.flops import PhaseTimer, measure_matmul_peak
    from topd_jax.trainer.loop import Trainer

    steps = args.steps or (2 if args.quick else 10)
    base = (QUICK if args.quick else BENCH) + (QWEN3_0_6B if args.size == "0.6b" else []) + args.overrides
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = measure_matmul_peak(size=256 if args.quick else 2048, dtype=jnp.float32 if on_cpu else jnp.bfloat16)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s per device")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {preset: Trainer(load_config(args.config, [*base, f"preset={preset}", f"output_dir={tmp}/{preset}"]))
                    for preset in ("opd", "topd")}
        timers = {preset: PhaseTimer() for preset in trainers}
        for preset, trainer in trainers.items():  # compile every phase
            for _ in range(2):
                trainer.train_step(timers[preset])
        rows = {preset: [] for preset in trainers}
        for _ in range(steps):
            for preset, trainer in trainers.items():
                timers[preset].split()  # a step's time_step must not include the other preset's step
                rows[preset].append(trainer.train_step(timers[preset]))
        cfg = trainers["topd"].config
        print(f"config: {args.config} {' '.join(base)}")
        print(f"B = {trainers['topd'].rollouts_per_step} rollouts x N = {cfg.rollout.max_new_tokens} tokens; "
              f"topd: M = {trainers['topd'].loss.max_candidates}, R = {trainers['topd'].loss.num_reference}, "
              f"K = {trainers['topd'].loss.window}; {steps} timed steps each, medians")
        print(f"| preset | {' | '.join(PHASES)} | step (ms) | rollout tok/s | train GFLOP/s | of measured peak |")
        print("|---|" + "---|" * (len(PHASES) + 4))
        medians = {}
        for preset, trainer in trainers.items():
            med = {k: statistics.median(r[k] for r in rows[preset]) for k in rows[preset][0] if k.startswith("time_")}
            medians[preset] = med
            tokens = statistics.median(r["tokens"] for r in rows[preset])
            flops = trainer.update_flops or 0.0
            rate = flops / med["time_train"]
            print(f"| {preset} | " + " | ".join(f"{1e3 * med[f'time_{p}']:.1f}" for p in PHASES)
                  + f" | {1e3 * med['time_step']:.1f} | {tokens / med['time_step']:,.0f} | {rate / 1e9:.2f} "
                  f"| {rate / peak:.1%} |")
            trainer.close()
        ratio = medians["topd"]["time_step"] / medians["opd"]["time_step"]
        print(f"TOPD / OPD step time: {ratio:.2f}x (paper: 1.41x; goal <= 1.25x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
