"""`python -m topd_jax.demo`, the README's first command: `topd_jax.experiments.demo`.

Bad input is one line `error: ...` and exit status 2, as for every command (docs/faults.md):
an option argparse refuses (`--steps 0`, an unknown method), and an `--out` that cannot be a
folder (under a regular file, a symbolic link to nothing, no write permission), checked before
any model is trained. --debug (or TOPD_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from topd_jax.errors import exit_quietly, one_line_usage_errors, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    from topd_jax.experiments import demo
    from topd_jax.fileio import check_writable

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]

    def body() -> int:
        with one_line_usage_errors():
            wants_help = any(a in ("-h", "--help") for a in argv)
            peek = argparse.ArgumentParser(prog="python -m topd_jax.demo", add_help=False)
            peek.add_argument("--out")
            out = None if wants_help else peek.parse_known_args(argv)[0].out
            if out is not None:
                check_writable(out, directory=True)  # before the models are trained, not after
            return demo.main(argv)

    return run_cli(body, debug=debug)


if __name__ == "__main__":
    exit_quietly(main())
