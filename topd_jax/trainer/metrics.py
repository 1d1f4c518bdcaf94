"""Per-step metrics of a training run: a JSON-lines file, TensorBoard events and a progress bar.

metrics.jsonl is the record of truth: one line per step, `{"step": s, **metrics}`, flushed as
it is written so a crash loses at most the line being written. Non-finite floats (NaN, inf)
are written as JSON `null`, so every line parses with any strict JSON reader.

Every file is written in the calling thread, so a write that fails (a full disk) raises its
OSError there, at the step that hit it. TensorBoard's event file included: tensorboardX's
`SummaryWriter` writes from a thread of its own behind a bounded queue, and when that thread
dies on ENOSPC the next `add_scalar` blocks the main thread on the full queue forever (and
with it every signal handler's effect); `EventFile` writes the same records (tensorboardX's
`EventsWriter` and summary protos) synchronously instead. The console (progress bar, notices)
is not a file the run owns: when it goes away (the terminal was closed: EIO) the run goes on
without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from topd_jax import fileio

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.log"
TENSORBOARD_DIR = "tensorboard"
# `<locator>_hist_*` metrics (ot_hist_candidates, window_kl_hist_reference, ...) are counts in 20
# equal bins over [0, 2] (losses.topd.OT_HISTOGRAM_BINS).
HISTOGRAM_MARK = "_hist_"
HISTOGRAM_RANGE = (0.0, 2.0)


def _to_json(value: Any) -> Any:
    """A JSON value for a metric: scalars as numbers (non-finite -> None), 1-d arrays as lists."""
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.ndim > 1:
        raise ValueError(f"metric of shape {array.shape} is neither a scalar nor a 1-d array")
    if array.dtype.kind in "biu":
        return array.tolist()
    if array.dtype.kind != "f":
        raise ValueError(f"metric of dtype {array.dtype} is not numeric")
    if array.ndim == 0:
        x = float(array)
        return x if math.isfinite(x) else None
    return [x if math.isfinite(x) else None for x in array.astype(np.float64).tolist()]


def _read_kept_lines(path: str, last_step: int) -> tuple[list[str], int]:
    """The lines of `path` for steps <= last_step, and how many unparsable lines were dropped."""
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1  # a line half-written by a crash
                continue
            if step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept, dropped


class EventFile:
    """One TensorBoard event file in `logdir`, written in the calling thread.

    The records are tensorboardX's (an `EventsWriter` file named events.out.tfevents.<time>.
    <host><suffix>, `summary.scalar` / `summary.histogram_raw` protos), as a `SummaryWriter`
    writes them, without its writer thread: a failed write raises here. `purge_step` is written
    as SummaryWriter writes it, a SessionLog START at that step, so TensorBoard hides the older
    files' events from that step on.
    """

    def __init__(self, logdir: str, *, purge_step: int | None = None, filename_suffix: str = ""):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(logdir, exist_ok=True)
        self._event = Event
        self._writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix)
        if purge_step is not None:
            self._writer.write_event(Event(step=purge_step, file_version="brain.Event:2"))
            self._writer.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, summary, step: int) -> None:
        self._writer.write_event(self._event(summary=summary, step=step, wall_time=time.time()))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self._write(scalar(tag, value), step)

    def add_histogram_raw(self, tag: str, *, step: int, **histogram) -> None:
        from tensorboardX.summary import histogram_raw

        self._write(histogram_raw(tag, **histogram), step)

    def flush(self) -> None:
        """Write what is buffered to the file (and fsync it); a full disk raises here."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the file (a full disk raises here)."""
        self._writer.close()


def _format(value: Any) -> str:
    """A compact progress-bar number: 4 significant digits."""
    return f"{float(value):.4g}"


class MetricsLogger:
    """Per-step metrics of a training run: output_dir/metrics.jsonl, TensorBoard event files
    (output_dir/tensorboard), a tqdm progress bar.

    Every file write happens in the calling thread and raises its OSError there (see the
    module docstring); a console that went away (EIO, the terminal closed) only silences the
    bar and printed notices. `enabled=False` (non-primary hosts) makes every method a no-op. Resuming (`start_step > 0`)
    keeps exactly the metrics.jsonl lines with step <= start_step (the steps after the
    checkpoint will be recomputed) and drops a half-written line, rewriting the file atomically;
    TensorBoard likewise purges its events after start_step. `start_step == 0` starts a fresh
    file: a new run in the same directory. Usable as a context manager.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        enabled: bool = True,
        progress_keys: Sequence[str] = ("loss", "low_divergence_share", "tokens_per_s"),
    ):
        self.enabled = enabled
        self.progress_keys = tuple(progress_keys)
        self._file = self._writer = self._bar = self._events = None
        if not enabled:
            return
        self.output_dir = os.fspath(output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        self.metrics_path = os.path.join(self.output_dir, METRICS_FILE)
        self.events_path = os.path.join(self.output_dir, EVENTS_FILE)
        dropped = 0
        if start_step > 0 and os.path.exists(self.metrics_path):
            kept, dropped = _read_kept_lines(self.metrics_path, start_step)
            fileio.write_file(self.metrics_path, "".join(kept))
        self._file = open(self.metrics_path, "a" if start_step > 0 else "w", encoding="utf-8")
        if tensorboard:
            # purge_step makes TensorBoard drop older events of steps >= purge_step: the steps a
            # crashed run logged after the checkpoint, or all of them for a fresh run. The suffix
            # keeps files apart (their names hold only whole seconds) in creation order.
            self._writer = EventFile(
                os.path.join(self.output_dir, TENSORBOARD_DIR),
                purge_step=start_step + 1 if start_step > 0 else 0,
                filename_suffix=f".{time.time_ns():020d}",
            )
        if progress:
            from tqdm.auto import tqdm

            with self._console():
                self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        if dropped:
            self.warn(f"dropped {dropped} unparsable line(s) of {self.metrics_path} on resume")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record the metrics of `step`: numbers or arrays (0-d or 1-d; jax arrays are fetched).

        JSON: one line `{"step": step, **metrics}`, arrays as lists, NaN/inf as null.
        TensorBoard: every scalar; `<locator>_hist_*` arrays as histograms of counts over 20 equal
        bins on [0, 2]; other 1-d arrays only in the JSON.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log called after close()")
        values = {key: value if isinstance(value, str) else np.asarray(value) for key, value in metrics.items()}
        record = {"step": int(step)}
        for key, value in values.items():
            try:
                record[key] = _to_json(value)
            except ValueError as error:
                raise ValueError(f"metric {key!r}: {error}") from None
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, str):
                    continue
                if value.ndim == 0:
                    self._writer.add_scalar(key, float(value), int(step))
                elif HISTOGRAM_MARK in key:
                    self._add_histogram(key, value, int(step))
            self._writer.flush()  # a full disk fails this step, not a later one
        if self._bar is not None:
            shown = {k: _format(values[k]) for k in self.progress_keys if k in values and np.ndim(values[k]) == 0}
            with self._console():
                if shown:
                    self._bar.set_postfix(shown, refresh=False)
                self._bar.update(max(0, int(step) - self._bar.n))

    def _add_histogram(self, tag: str, counts: np.ndarray, step: int) -> None:
        """Counts in equal bins over HISTOGRAM_RANGE; min/max/sum use the bin edges and centres."""
        counts = np.nan_to_num(counts.astype(np.float64))
        if counts.sum() <= 0:
            return  # nothing to show (TensorBoard rejects empty histograms)
        low, high = HISTOGRAM_RANGE
        edges = np.linspace(low, high, len(counts) + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        filled = np.nonzero(counts)[0]
        self._writer.add_histogram_raw(
            tag,
            min=float(edges[filled[0]]),
            max=float(edges[filled[-1] + 1]),
            num=float(counts.sum()),
            sum=float(counts @ centres),
            sum_squares=float(counts @ centres**2),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            step=step,
        )

    def warn(self, message: str) -> None:
        """Print `message` without breaking the progress bar and append it, timed, to events.log."""
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open(self.events_path, "a", encoding="utf-8") as f:  # the record first: the console may be gone
            f.write(line + "\n")
        with self._console():
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    @contextlib.contextmanager
    def _console(self):
        """Console output that may fail without failing the run: a closed terminal (EIO) or a
        closed pipe turns the bar off; the files hold the record."""
        try:
            yield
        except OSError:
            self._bar = None  # closing it would write to the console again

    def close(self) -> None:
        """Flush and close the metrics file, TensorBoard writer and bar; safe to call twice. Every
        one is closed even when an earlier one fails (a full disk); the first error is raised."""
        first: BaseException | None = None
        for name in ("_file", "_writer"):
            handle = getattr(self, name)
            setattr(self, name, None)
            if handle is not None:
                try:
                    handle.close()
                except OSError as err:
                    first = first or err
        if self._bar is not None:
            with self._console():
                self._bar.close()
            self._bar = None
        if first is not None:
            raise first

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # the error in flight is the one to report
            self.close()
