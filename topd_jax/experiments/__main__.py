"""python -m topd_jax.experiments: the miniature's protocol (screen -> sweep -> test) and the
guidance anatomy, from the command line. `python -m topd_jax.demo` is the short tour."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

from topd_jax import fileio
from topd_jax.errors import ArgumentParser


def _numbers(text: str, kind, name: str, parser) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        parser.error(f"--{name} must be a comma list of numbers, got {text!r}")
    if not values:
        parser.error(f"--{name} is empty")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    from topd_jax.experiments import protocol as proto

    defaults = proto.Protocol()
    parser = ArgumentParser(prog="python -m topd_jax.experiments", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("reproduce", help="the whole protocol; writes OUT/results.json and OUT/results.md",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--out", default="results/miniature", help="output directory (resumed if it holds this protocol)")
    run.add_argument("--seeds", default=",".join(map(str, defaults.seeds)), help="comma list of test seeds")
    run.add_argument("--dev-seed", type=int, default=defaults.dev_seed, help="the development seed (never a test seed)")
    run.add_argument("--screen", default=",".join(defaults.screen), help="methods screened on the development seed")
    run.add_argument("--carry", type=int, default=defaults.carry,
                     help="non-baseline methods carried to the test seeds (best development area), with their oracle bounds")
    run.add_argument("--learning-rates", default=",".join(f"{lr:g}" for lr in defaults.learning_rates),
                     help="the sweep's grid (must include 1e-3, the screen's rate)")
    run.add_argument("--steps", type=int, default=defaults.steps, help="distillation steps per run")
    run.add_argument("--eval-every", type=int, default=defaults.eval_every, help="evaluation interval (the budgets)")
    run.add_argument("--batch", type=int, default=defaults.batch, help="prompts per step")
    run.add_argument("--eval-problems", type=int, default=defaults.eval_problems, help="held-out test problems")
    run.add_argument("--dev-problems", type=int, default=defaults.dev_problems, help="development problems")
    run.add_argument("--locator-batches", type=int, default=defaults.locator_batches,
                     help="batches of 32 rollouts for the locator analysis (0: skip)")
    run.add_argument("--workers", type=int, default=1, help="distillations run at once (one process each)")
    run.add_argument("--cache", default=None, help="where the SFT'd models are kept; default OUT/models")
    anatomy = sub.add_parser("anatomy", help="the guidance term's gradient against OPD's, on the SFT'd pair",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    anatomy.add_argument("--out", default="results/anatomy", help="output directory (anatomy.json, anatomy.md)")
    anatomy.add_argument("--batch", type=int, default=proto.BATCH, help="prompts in the measured batch")
    anatomy.add_argument("--cache", default=None, help="SFT'd models cache (default ~/.cache/topd_jax/miniature)")
    errors = sub.add_parser("errors", help="what each trained student gets wrong (first local error by kind)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    errors.add_argument("runs", nargs="+", help="run directories (their newest checkpoint is exported and evaluated) "
                        "or model directories with a config.json")
    errors.add_argument("--problems", type=int, default=1024, help="held-out test problems")
    args = parser.parse_args(argv)
    if args.command in ("reproduce", "anatomy"):
        from topd_jax.errors import one_line

        try:  # an --out under a regular file, a link to nothing: one line before any work
            fileio.check_writable(args.out, directory=True)
        except OSError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2

    if args.command == "errors":
        import tempfile

        from topd_jax.experiments import anatomy as anat, models
        from topd_jax.export import export

        problems = models.eval_problems(args.problems)
        rows = {}
        for run in args.runs:
            if os.path.isfile(os.path.join(run, "config.json")):  # an exported / SFT'd model directory
                rows[os.path.basename(os.path.normpath(run))] = anat.first_errors(models.load(run), problems)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    step = export(run, os.path.join(tmp, "student"))
                except Exception as err:  # noqa: BLE001  (a bad run directory is a one-line error)
                    print(f"error: {run}: {err}", file=sys.stderr)
                    return 2
                rows[f"{os.path.basename(os.path.normpath(run))} (step {step})"] = anat.first_errors(
                    models.load(os.path.join(tmp, "student")), problems)
        print(anat.error_table(rows))
        return 0

    if args.command == "anatomy":
        from topd_jax.experiments import anatomy as anat
        from topd_jax.experiments.demo import cache_dir

        if args.batch < 1:
            parser.error("--batch must be >= 1")
        os.makedirs(args.out, exist_ok=True)
        result = anat.measure(cache_dir(args.cache), batch=args.batch)
        fileio.write_file(os.path.join(args.out, "anatomy.json"), json.dumps(result, indent=1))
        table = anat.table(result)
        fileio.write_file(os.path.join(args.out, "anatomy.md"), table + "\n")
        print(table)
        return 0

    for name in ("steps", "eval_every", "batch", "eval_problems", "dev_problems", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.carry < 0 or args.locator_batches < 0:
        parser.error("--carry and --locator-batches must be >= 0")
    rates = _numbers(args.learning_rates, float, "learning-rates", parser)
    if any(lr <= 0 for lr in rates):
        parser.error("--learning-rates must be > 0")
    try:
        protocol = proto.Protocol(seeds=_numbers(args.seeds, int, "seeds", parser), dev_seed=args.dev_seed,
                                  screen=tuple(m for m in args.screen.split(",") if m), carry=args.carry,
                                  learning_rates=rates, steps=args.steps, eval_every=args.eval_every,
                                  batch=args.batch, eval_problems=args.eval_problems,
                                  dev_problems=args.dev_problems, locator_batches=args.locator_batches)
    except ValueError as err:
        parser.error(str(err))
    os.makedirs(args.out, exist_ok=True)
    from topd_jax.experiments.rendering import summary

    try:
        results = proto.reproduce(args.out, protocol, cache_dir=args.cache, workers=args.workers,
                                  progress=lambda text: print(text, flush=True))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = summary(results)
    fileio.write_file(os.path.join(args.out, "results.md"), table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
