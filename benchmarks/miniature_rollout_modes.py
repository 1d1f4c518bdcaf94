"""Does OPD learn the same with continuous rollouts? The miniature's OPD run on the development seed
with `rollout.mode=static` and `rollout.mode=continuous`, everything else the protocol's.

    python benchmarks/miniature_rollout_modes.py --results docs/results_miniature_rerun.json

Each mode: one `protocol.distil` run (OPD, development seed and problems, the protocol's rate,
steps, batch and evaluations) on the cached SFT'd pair (`--cache`, trained once if missing).
Printed per mode: area, final accuracy, mean step time and sample-phase time, and for continuous
the pool's means (slot utilisation, carried and dropped rollouts, off-policy share). The criterion
(issue 26): continuous's area lies within the spread of OPD's area over the protocol's test seeds
(`--results`: a protocol results.json; its OPD test runs give the seeds' 95% prediction interval
of one run, mean +- t sd sqrt(1 + 1/n): one run varies like one seed). The development problems
are not the test problems, so the interval is a yardstick of seed noise, not a paired test.
"""

from __future__ import annotations

import argparse
import json
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="/tmp/topd_models", help="SFT'd models (trained once if missing)")
    parser.add_argument("--out", default="results/rollout_modes", help="run directories")
    parser.add_argument("--results", help="a protocol results.json: OPD's test-seed areas for the interval")
    parser.add_argument("--modes", nargs="+", default=["static", "continuous"])
    args = parser.parse_args()

    import os

    import numpy as np
    from scipy import stats

    from topd_jax.experiments import models, protocol

    proto = protocol.Protocol()
    protocol.use_compile_cache(os.path.join(args.cache, "jax"))
    teacher = models.cached_sft(models.TEACHER_SFT, args.cache, "teacher")
    student = models.cached_sft(models.STUDENT_SFT, args.cache, "student")
    problems = models.eval_problems(proto.dev_problems, models.DEV_EVAL_SEED)
    rows = {}
    for mode in args.modes:
        config = protocol.distil_config(student, teacher, method="opd", seed=proto.dev_seed, steps=proto.steps,
                                        output_dir=os.path.join(args.out, mode), overrides=[f"rollout.mode={mode}"])
        run = protocol.distil(config, problems, eval_every=proto.eval_every)
        metrics = run["metrics"]

        def mean(key):
            values = [float(m[key]) for m in metrics if key in m]
            return statistics.fmean(values) if values else float("nan")

        rows[mode] = run
        print(f"{mode:10s} area {run['area']:.3f}  final {run['final']:.3f}  step {mean('time_step'):.3f} s  "
              f"sample {mean('time_sample'):.3f} s  finished tokens/s {mean('tokens_per_s_finished'):.0f}"
              + (f"  slots busy {mean('slot_utilisation'):.2f}, carried {mean('rollouts_carried'):.1f}, "
                 f"dropped {mean('rollouts_dropped'):.2f}, off-policy {mean('off_policy_share'):.3f}, "
                 f"lag {mean('version_lag'):.3f}" if mode == "continuous" else ""))
    if args.results:
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
        areas = np.array([r["area"] for key, r in results["runs"].items() if key.startswith("opd|")])
        sd, n = areas.std(ddof=1), len(areas)
        t = stats.t.ppf(0.975, n - 1)
        # One more run of OPD falls in mean +- t sd sqrt(1 + 1/n) with 95% probability (a prediction
        # interval: a single run varies like one seed, not like the seeds' mean).
        low, high = areas.mean() - t * sd * np.sqrt(1 + 1 / n), areas.mean() + t * sd * np.sqrt(1 + 1 / n)
        print(f"OPD over {n} test seeds: area {areas.mean():.3f} (range {areas.min():.3f}-{areas.max():.3f}), "
              f"95% prediction interval of one run [{low:.3f}, {high:.3f}]")
        for mode, run in rows.items():
            inside = low <= run["area"] <= high
            print(f"{mode}: area {run['area']:.3f} {'within' if inside else 'outside'} the seeds' interval")
        if {"static", "continuous"} <= set(rows):
            diff, noise = rows["continuous"]["area"] - rows["static"]["area"], t * sd * np.sqrt(2)
            print(f"continuous - static area {diff:+.3f}; two runs of one mode differ by up to +-{noise:.3f} "
                  f"(95%, from the seeds' sd): {'within' if abs(diff) <= noise else 'outside'} seed noise")

if __name__ == "__main__":
    main()
