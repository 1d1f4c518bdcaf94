"""Signals that stop a run cleanly: SIGTERM (preemptible TPU VMs), SIGINT (Ctrl-C), SIGHUP.

    with PREEMPTION:                       # the trainer's loop (and train.py around the build)
        with PREEMPTION.immediately():     # building: a signal raises Interrupted
            trainer = Trainer(config)
        ...                                # each step: PREEMPTION.agreed() -> save and return
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import jax
import numpy as np


class Interrupted(BaseException):
    """SIGTERM or SIGINT while nothing can be saved yet (the trainer is being built)."""

    def __init__(self, name: str, signum: int):
        super().__init__(name)
        self.name, self.signum = name, signum


class _Preemption:
    """SIGTERM (preemptible TPU VMs), SIGINT (Ctrl-C) and SIGHUP (the terminal closed) alike, for
    the whole process. A SIGHUP that is ignored when entered (`nohup`) stays ignored.

    While entered (nested entries share one state; main thread only), the first signal sets
    `signal`, which the loop checks after each step to save a complete checkpoint and return;
    inside `immediately()` (building the trainer: nothing to save yet) it raises Interrupted
    instead. A second signal exits at once (no traceback, no save; the last complete checkpoint
    stays, a half-written save is cleaned up at the next start). Leaving the outermost entry
    restores the previous handlers.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.signal: str | None = None
        self._immediate = False
        self._depth = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if self._depth == 0:
                self.signal = None
                self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                                  if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN)}
            self._depth += 1
        return self

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread() and self._depth > 0:
            self._depth -= 1
            if self._depth == 0:
                for s, handler in self._previous.items():
                    signal.signal(s, handler)

    @contextlib.contextmanager
    def immediately(self):
        before, self._immediate = self._immediate, True
        try:
            yield self
        finally:
            self._immediate = before

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            os.write(2, f"{name} again: exiting now without saving; the last complete checkpoint is kept\n".encode())
            os._exit(128 + signum)
        self.signal = name
        if self._immediate:
            raise Interrupted(name, signum)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def agreed(self) -> bool:
        """True on every process when any process got a signal (so all save the same step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


PREEMPTION = _Preemption()
