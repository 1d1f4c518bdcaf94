"""Where the miniature's time goes: one distillation run and its evaluations, split by phase.

    python benchmarks/profile_miniature.py                      # opd and topd, 30 steps each
    python benchmarks/profile_miniature.py --methods opd relay --steps 50

For each method of the protocol (`experiments.protocol.METHODS`), on the cached SFT'd pair
(`--cache`, trained once), one run of the real `Trainer` as the protocol runs it, reporting in
seconds: start-up (checkpoints loaded, programs built), the first step (compiling) and the
median steady step split into sample / score / branch / train and the rest of the step (host
glue: prompt transfer, the student's reshard, metric transfers), JAX's own compile time
(`jax.monitoring` backend-compile events, first step and evaluation included), and one greedy
evaluation of the development problems (first: compiling; then steady). The last column
projects a 100-step run with 5 evaluations from those figures.

    python benchmarks/profile_miniature.py --compile-cache /tmp/c --policy default   # JAX's own
    python benchmarks/profile_miniature.py --compile-cache /tmp/c --policy all       # the protocol's

With --compile-cache, programs go to that persistent cache under JAX's default policy (only
programs that took over a second to compile) or the protocol's (`protocol.use_compile_cache`:
every program): run the same command twice and the second run's `step 1` and `compile` show
what the cache saves a protocol run, which starts a Trainer (and its update) afresh.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["opd", "topd"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache", default="/tmp/topd_models", help="SFT'd models (trained once if missing)")
    parser.add_argument("--problems", type=int, default=512)
    parser.add_argument("--compile-cache", default=None, help="a persistent compilation cache directory")
    parser.add_argument("--policy", choices=("default", "all"), default="all",
                        help="what goes to --compile-cache: JAX's default or every program (the protocol's)")
    args = parser.parse_args()
    from topd_jax.experiments import models, protocol  # first: it keeps JAX off a TPU it may find

    import jax
    from flax import nnx

    from topd_jax.trainer.loop import Trainer

    if args.compile_cache and args.policy == "all":
        protocol.use_compile_cache(args.compile_cache)
    elif args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    teacher = models.cached_sft(models.TEACHER_SFT, args.cache, "teacher")
    student = models.cached_sft(models.STUDENT_SFT, args.cache, "student")
    problems = models.eval_problems(args.problems, models.DEV_EVAL_SEED)
    print(f"{'method':<24} {'start':>6} {'step 1':>7} {'steady':>7} {'sample':>7} {'score':>7} {'branch':>7} "
          f"{'train':>7} {'glue':>6} {'compile':>8} {'eval 1':>7} {'eval':>6} {'100 steps':>10}")
    for method in args.methods:
        compiles.clear()
        rows = []
        with tempfile.TemporaryDirectory() as out:
            config = protocol.distil_config(student, teacher, method=method, seed=models.DEV_SEED, output_dir=out,
                                            steps=args.steps)
            t0 = time.perf_counter()
            trainer = Trainer(config, callbacks=[lambda tr, step, metrics: rows.append(metrics)])
            start = time.perf_counter() - t0
            evals = []
            for _ in range(3):
                t = time.perf_counter()
                models.correctness(nnx.merge(trainer.graphdef, trainer.state.params), problems)
                evals.append(time.perf_counter() - t)
            trainer.run()
            trainer.close()
        steady = rows[1:]

        def median(key, part=steady):
            return statistics.median(float(r.get(key, 0.0)) for r in part)

        phases = {p: median(f"time_{p}") for p in ("sample", "score", "branch", "train")}
        step = median("time_step")
        glue = step - sum(phases.values())
        projected = start + float(rows[0]["time_step"]) + 99 * step + evals[0] + 4 * statistics.median(evals[1:])
        print(f"{method:<24} {start:6.2f} {float(rows[0]['time_step']):7.2f} {step:7.3f} "
              + " ".join(f"{phases[p]:7.3f}" for p in ("sample", "score", "branch", "train"))
              + f" {glue:6.3f} {sum(compiles):8.2f} {evals[0]:7.2f} {statistics.median(evals[1:]):6.3f} "
              f"{projected:10.1f}")


if __name__ == "__main__":
    main()
