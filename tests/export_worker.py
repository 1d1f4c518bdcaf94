"""An export that SIGKILLs itself at a chosen point (run as a script, not collected).

    python export_worker.py POINT CHECKPOINT OUT

POINT: tokenizer (the tokenizer is staged, no weight yet) | weights (the weights are written,
config.json not yet) | staged (everything staged, before the swap) | swapped (right after the
atomic swap, the old version not yet removed) | parked (a file system without the atomic
exchange: between its two renames, the old version parked beside OUT).
"""

import os
import signal
import sys

point, checkpoint, out = sys.argv[1:4]
os.environ["JAX_PLATFORMS"] = "cpu"

from topd_jax import export, fileio  # noqa: E402
from topd_jax.models import checkpoint as hf  # noqa: E402


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def after(real):
    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        die()
        return result
    return wrapped


if point == "tokenizer":
    hf.write_pretrained = die
elif point == "weights":
    hf.write_file = after(hf.write_file)
elif point == "staged":
    fileio._fsync_tree = die
elif point == "swapped":
    fileio._exchange = after(fileio._exchange)
elif point == "parked":
    fileio._exchange = lambda a, b: False
    real_rename = os.rename

    def rename(source, target):
        real_rename(source, target)
        if ".old-" in os.fspath(target):
            die()
    fileio.os.rename = rename  # fileio's `os` is the os module: patched for this process only
else:
    raise SystemExit(f"unknown point {point}")
sys.exit(export.main(["--checkpoint", checkpoint, "--out", out]))
