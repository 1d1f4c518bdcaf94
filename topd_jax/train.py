"""Command line: train a student with OPD, suppression-only or TOPD.

    python -m topd_jax.train --config configs/tiny_cpu.yaml [key=value ...]

Overrides use the dotted names of `topd_jax/trainer/config.py` (`steps=2`, `preset=opd`,
`output_dir=/tmp/run`, `seed=1`, `loss.window=8`, `rollout.max_new_tokens=16`); values are YAML.
A run resumes from output_dir/checkpoints when a checkpoint is there; a folder holds one run, so
starting over there takes checkpoint.resume=false checkpoint.earlier_run=move (the earlier run is
moved aside; resume=false alone is refused). Writes output_dir/metrics.jsonl, TensorBoard events
and config.yaml. Every key given once: a key twice on the command line is refused.

SIGTERM, Ctrl-C (SIGINT) or SIGHUP (the terminal closed; not under nohup) saves a complete
checkpoint after the step in progress and exits with one line (rerun the same command to
resume); a second one exits at once. One trainer at a time
owns output_dir (a lock file); a second is refused, naming the first.

Every failure a user can act on (a bad key or value, a checkpoint that does not fit or cannot
be read, a full disk, a run whose steps are all skipped) is one line `error: ...` and exit
status 2; --debug (or TOPD_DEBUG=1) shows the traceback instead. See docs/faults.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Sequence

from topd_jax.errors import ArgumentParser, exit_quietly, run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # The key list needs the config module (numpy, optax): build it only for --help.
    wants_help = any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))
    epilog = None
    if wants_help:
        from topd_jax.configuration import describe_keys
        from topd_jax.trainer.config import TrainConfig

        epilog = "config keys (key=value overrides; values are YAML):\n" + "\n".join(describe_keys(TrainConfig))
    parser = ArgumentParser(prog="python -m topd_jax.train", description=__doc__.split("\n\n")[0],
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: every key at its default)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or TOPD_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (see below)")
    return parser.parse_intermixed_args(argv)  # overrides may stand before or after the options


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _train(args), debug=args.debug)


def _train(args: argparse.Namespace) -> int:
    # Parse the config before importing JAX-heavy modules: a typo fails in a second.
    from topd_jax.configuration import check_command_line
    from topd_jax.trainer.config import load_config

    check_command_line(args.config, args.overrides)
    config = load_config(args.config, args.overrides)
    from topd_jax.trainer.loop import Trainer
    from topd_jax.trainer.preemption import PREEMPTION, Interrupted

    # SIGTERM, SIGINT (Ctrl-C) and SIGHUP alike, from here to the exit: while the trainer is built there
    # is nothing to save, so the first one stops at once; from then on it saves a complete
    # checkpoint after the step in progress (or, after the last step, lets the run finish).
    with PREEMPTION:
        try:
            with PREEMPTION.immediately():
                trainer = Trainer(config)
        except Interrupted as stop:
            print(f"{stop.name}: stopped before the first step; nothing new to save (a complete checkpoint in "
                  f"{config.output_dir} is kept)", file=sys.stderr)
            return 128 + stop.signum
        try:
            metrics = trainer.run()
        except BaseException:
            with contextlib.suppress(Exception):  # a failed save re-raises on close; the first error counts
                trainer.close()
            raise
        trainer.close()
        late = PREEMPTION.signal if trainer.stopped_by is None else None
    if trainer.stopped_by is not None:
        return 0  # the run said what it saved (one line); rerunning resumes it
    if late is not None:
        print(f"{late} after the last step: the run is complete (step {trainer.step}/{config.steps} saved in "
              f"{config.output_dir}); exiting", file=sys.stderr)
        return 0
    if metrics:
        print(f"step {trainer.step}/{config.steps}: loss {float(metrics['loss']):.4f}, metrics in "
              f"{config.output_dir}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    exit_quietly(main())
