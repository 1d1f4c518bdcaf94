"""The errors a user can act on, and the one place the command lines turn them into one line.

    ConfigError      a config key or value, or the inputs it names, cannot work (configuration.py)
    CheckpointError  a checkpoint (training or Hugging Face) is missing, unreadable or does not fit
    TrainingError    a run that started cannot go on (every step skipped, the disk filled up)
    OSError          the file system refused (read-only directory, disk full, missing file)

`python -m topd_jax.{train,export,eval}` print each as `error: <one line>` and exit 2; `--debug`
or TOPD_DEBUG=1 re-raises it for the traceback. Any other exception is a bug and keeps its
traceback. A command line that argparse refuses (an unknown option, `--samples abc`) is one line
too (`ArgumentParser`, `one_line_usage_errors`), not argparse's usage block. docs/faults.md lists
what each failure looks like and how to recover.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import logging
import os
import sys
import threading
from typing import Callable

from topd_jax.configuration import ConfigError

DEBUG_ENV = "TOPD_DEBUG"


class CheckpointError(ValueError):
    """A checkpoint that was asked for does not exist, cannot be read, or does not fit the model."""


class TrainingError(RuntimeError):
    """A run cannot go on; the message names the last complete checkpoint when there is one."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, TrainingError, OSError)


def one_line(err: BaseException) -> str:
    """The error as one line: OSErrors as `<what failed>: <path>`, others their first line."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror if err.filename is None else f"{err.strerror}: {err.filename}"
        if err.errno == errno.ENOSPC:
            text += " (the disk is full)"
    else:
        text = str(err) or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0]


def first_line(err: BaseException) -> str:
    """Only the error's first line: XLA's compile errors run over many, the rest context (the
    plan's table cells). A user error for the command line is `one_line`."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].strip()


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` or what caused it is ENOSPC; TensorStore (Orbax's array writes) reports it as
    a ValueError whose text carries the OS message, not as an OSError."""
    for _ in range(10):
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if os.strerror(errno.ENOSPC) in str(err):
            return True
        err = err.__cause__ or err.__context__
        if err is None:
            return False
    return False


def debug_requested(flag: bool = False) -> bool:
    """--debug, or TOPD_DEBUG set to anything but '', '0' or 'false'."""
    return flag or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false")


_LIBRARY_LOGGERS = ("absl", "asyncio")


class _NoLibraryTracebacks(logging.Filter):
    """Drops ERROR records that carry a traceback: Orbax logs every failed background save with
    its whole stack (twice) before the failure reaches the trainer, which reports it as the one
    error line. --debug keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= logging.ERROR)


def run_cli(body: Callable[[], int], *, debug: bool = False) -> int:
    """body() -> its exit code; a user error -> `error: <one line>` on stderr and exit 2."""
    quiet = None if debug_requested(debug) else _NoLibraryTracebacks()
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    previous_hook = sys.unraisablehook
    if quiet is not None:
        for logger in loggers:
            logger.addFilter(quiet)
        sys.unraisablehook = functools.partial(_drop_closed_loop_callbacks, previous_hook)
    try:
        return body()
    except USER_ERRORS as err:
        if quiet is None:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if quiet is not None:
            for logger in loggers:
                logger.removeFilter(quiet)
            sys.unraisablehook = previous_hook


def _drop_closed_loop_callbacks(previous: Callable, unraisable) -> None:
    """An unraisable-exception hook without TensorStore's callbacks into the event loop of an
    Orbax read that already failed ("Event loop is closed", one traceback per pending array):
    the failed read is reported once, as the step that is unreadable. Others go on to `previous`."""
    err = unraisable.exc_value
    if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
        return
    previous(unraisable)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: <what argparse found> (see <prog>
    --help)` on stderr and exit status 2, instead of the usage block and a second line. Its
    subparsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


@contextlib.contextmanager
def one_line_usage_errors():
    """Every argparse parser built inside (one a command's own module builds, such as the
    demo's) reports its errors as `ArgumentParser` does: one line, exit 2."""
    previous = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = ArgumentParser.error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = previous


def exit_quietly(code: int) -> None:
    """sys.exit(code) for a `__main__` block. After a reported error (code 2), the libraries'
    own clean-up at exit (TensorBoard's writer flushing onto the same full disk, Orbax's pending
    futures) must not bury the error line under their tracebacks; --debug keeps them (it
    re-raises, so no code 2)."""
    if code == 2:
        sys.unraisablehook = lambda unraisable: None
        threading.excepthook = lambda args: None
        for name in _LIBRARY_LOGGERS:
            logging.getLogger(name).addFilter(_NoLibraryTracebacks())
    sys.exit(code)


__all__ = ["ArgumentParser", "CheckpointError", "ConfigError", "DEBUG_ENV", "TrainingError", "USER_ERRORS",
           "debug_requested", "exit_quietly", "first_line", "is_disk_full", "one_line", "one_line_usage_errors",
           "run_cli"]
