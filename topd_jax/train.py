"""Command line: train a student with OPD, suppression-only or TOPD.

    python -m topd_jax.train --config configs/tiny_cpu.yaml [key=value ...]

Overrides use the dotted names of `topd_jax/trainer/config.py` (`steps=2`, `preset=opd`,
`output_dir=/tmp/run`, `seed=1`, `loss.window=8`, `rollout.max_new_tokens=16`); values are YAML.
A run resumes from output_dir/checkpoints when a checkpoint is there (checkpoint.resume=false
starts over). Writes output_dir/metrics.jsonl, TensorBoard events and config.yaml.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from topd_jax.configuration import ConfigError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m topd_jax.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: every key at its default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Parse the config before importing JAX-heavy modules: a typo fails in a second.
    from topd_jax.trainer.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from topd_jax.trainer.loop import Trainer

    trainer = Trainer(config)
    try:
        metrics = trainer.run()
    finally:
        trainer.close()
    if metrics:
        print(f"step {trainer.step}/{config.steps}: loss {float(metrics['loss']):.4f}, metrics in "
              f"{config.output_dir}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
