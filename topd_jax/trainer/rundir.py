"""A run owns its output_dir: one trainer at a time, and no file it did not write is overwritten.

    lock = RunLock.acquire("runs/x")   # refused (ConfigError, one line) while another run holds it
    ...                                # train; the lock dies with the process (kill -9 included)
    lock.release()

The lock is `output_dir/.topd-run.lock`, held with `fcntl.flock` on an open file: the kernel
drops it when the process ends however it ends, so a stale lock after `kill -9` or a crash never
blocks the resume, and nothing has to be cleaned up. The file itself stays (it is the mark that
the folder is a run's) and holds the holder's pid, host and start time, which a refused second
trainer names. The file is rewritten in place, never replaced, so every process locks the same
inode.

Multi-host runs: only process 0 takes the lock (the hosts of one run write one folder, and the
folder may not even be shared); the others learn the outcome from it (`agree`) and refuse too.

A run's own files (`config.yaml`, `metrics.jsonl`, `events.log`) are recognised by the lock
file or a `checkpoints/` folder beside them (a run written before the lock existed). In a
folder with neither, such a file is the user's: the run refuses rather than overwrite it.

A folder holds one run. Starting over (`checkpoint.resume=false`) where `checkpoints/` holds an
earlier run's saves is refused (`start_over`): the new run's early saves would be skipped as
already there, retention would delete the earlier run's steps and an export would hand out the
earlier run's weights. `checkpoint.earlier_run=move` moves the earlier run's files aside into
`<output_dir>.earlier-<UTC time>` first (a sibling folder: the new run's folder holds only it).
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import socket
import time
from typing import Sequence

from topd_jax.configuration import ConfigError

LOCK_FILE = ".topd-run.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "events.log")  # what a run writes at its top level
CHECKPOINT_DIR = "checkpoints"
# What a run writes, all moved together when a new run starts over (`start_over`); `data/` (the
# prompt sets built from their source files) is a cache any run reuses and stays.
EARLIER_RUN = (CHECKPOINT_DIR, "tensorboard", *RUN_FILES)
_KEPT_CONFIG = re.compile(r"^config\.before-\d+\.yaml$")  # config.yaml before a resume_changed resume


def _holder(text: str) -> str:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if not fields.get("pid"):
        return "another run (its pid is not recorded yet)"
    return f"pid {fields['pid']} on host {fields.get('host', '?')}, started {fields.get('started', '?')}"


def foreign_files(output_dir: str, names: Sequence[str] = RUN_FILES) -> list[str]:
    """The `names` in output_dir that no run wrote: present, but no lock file nor checkpoints/."""
    if os.path.exists(os.path.join(output_dir, LOCK_FILE)) or os.path.isdir(os.path.join(output_dir, CHECKPOINT_DIR)):
        return []
    return [name for name in names if os.path.lexists(os.path.join(output_dir, name))]


class RunLock:
    """The lock on one output_dir (see the module docstring); `acquire` to take it."""

    def __init__(self, path: str, fd: int | None, created_dir: str | None, created_file: bool):
        self.path, self._fd, self._created_dir, self._created_file = path, fd, created_dir, created_file
        self._earlier_record: bytes | None = None  # the record this lock replaced (put back if refused)

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike, *, primary: bool = True) -> "RunLock":
        """Take the lock of `output_dir`, creating the folder if needed.

        Refused with a one-line ConfigError when another process holds it (naming that process)
        or when the folder holds a run file no run wrote (`foreign_files`); either leaves
        nothing behind. `release(refused=True)` (the run was refused later in its start-up)
        removes the lock file and folders this call created. `primary=False` (hosts > 0 of a
        multi-host run) takes nothing.
        """
        output_dir = os.fspath(output_dir)
        path = os.path.join(output_dir, LOCK_FILE)
        if not primary:
            return cls(path, None, None, False)
        from topd_jax.fileio import check_no_dangling_link

        check_no_dangling_link(output_dir)  # makedirs would say only "File exists"
        foreign = foreign_files(output_dir)
        if foreign:
            raise ConfigError(f"output_dir {output_dir} holds {' and '.join(foreign)} that no run wrote (no "
                              f"{LOCK_FILE} or {CHECKPOINT_DIR}/ beside it); a run would overwrite "
                              f"{'them' if len(foreign) > 1 else 'it'}: pick another output_dir or move the file")
        created_dir = None
        if not os.path.isdir(output_dir):
            top = os.path.abspath(output_dir)
            while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
                top = os.path.dirname(top)
            os.makedirs(output_dir, exist_ok=True)
            created_dir = top
        created_file = not os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        lock = cls(path, fd, created_dir, created_file)
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            held = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            lock.release()
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise ConfigError(f"output_dir {output_dir} is in use by another run: {_holder(held)} (lock {path}); "
                              "wait for it to finish, stop it, or pick another output_dir") from None
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        record = f"pid={os.getpid()} host={socket.gethostname()} started={started}\n".encode()
        if not created_file:
            lock._earlier_record = os.pread(fd, 1 << 16, 0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, refused: bool = False) -> None:
        """Let the lock go (closing the file drops it). `refused`: the run never started, so the
        lock file and folder this acquire created are removed again, and a lock file that was
        there gets its earlier record back (a refused start changes no byte of the folder)."""
        if self._fd is None:
            return
        if refused:
            if self._earlier_record is not None:
                try:
                    os.ftruncate(self._fd, 0)
                    os.pwrite(self._fd, self._earlier_record, 0)
                except OSError:
                    pass
            if self._created_file:
                try:
                    os.remove(self.path)
                except OSError:
                    pass
            if self._created_dir is not None:
                for folder in _up_to(os.path.dirname(self.path), self._created_dir):
                    try:
                        os.rmdir(folder)  # only while empty: never removes what someone wrote
                    except OSError:
                        break
        os.close(self._fd)
        self._fd = None

    def __del__(self):  # a Trainer dropped without close(): the lock goes with it
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def held_by(output_dir: str | os.PathLike) -> str | None:
    """Who holds output_dir's run lock right now ("pid N on host H, started T"), or None when no
    trainer does. A reader's probe: a shared lock tried and dropped at once, never waited for."""
    import fcntl

    path = os.path.join(os.fspath(output_dir), LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            return _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """The names of an earlier run's files in output_dir (EARLIER_RUN, config.before-*.yaml) when
    its checkpoints/ holds anything (a step, a save cut off, a step moved aside); else []."""
    output_dir = os.fspath(output_dir)
    try:
        if not os.listdir(os.path.join(output_dir, CHECKPOINT_DIR)):
            return []
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(name for name in os.listdir(output_dir) if name in EARLIER_RUN or _KEPT_CONFIG.match(name))


def _steps(output_dir: str) -> str:
    entries = os.listdir(os.path.join(output_dir, CHECKPOINT_DIR))
    steps = sorted(int(e) for e in entries if e.isdigit())
    return f"steps {', '.join(map(str, steps))}" if steps else f"{len(entries)} unfinished or damaged saves"


def start_over(output_dir: str | os.PathLike, *, move: bool) -> tuple[str, list[str]] | None:
    """A new run (checkpoint.resume=false) in `output_dir`, which holds the lock: None when no
    earlier run is there. Otherwise `move` False refuses with a one-line ConfigError saying how
    to start over, and `move` True renames the earlier run's files into a new sibling folder
    `<output_dir>.earlier-<UTC time>` and returns (that folder, the names moved)."""
    output_dir = os.fspath(output_dir)
    names = earlier_run(output_dir)
    if not names:
        return None
    if not move:
        raise ConfigError(f"output_dir {output_dir} holds an earlier run ({_steps(output_dir)} in "
                          f"{os.path.join(output_dir, CHECKPOINT_DIR)}) and checkpoint.resume=false would mix a new "
                          "run into it: pick a new output_dir, or pass checkpoint.earlier_run=move to move the "
                          f"earlier run aside to {output_dir.rstrip(os.sep)}.earlier-<UTC time> (or drop "
                          "checkpoint.resume=false to resume it)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"{os.path.abspath(output_dir)}.earlier-{stamp}"
    target, n = base, 1
    while True:
        try:
            os.mkdir(target)
            break
        except FileExistsError:
            n += 1
            target = f"{base}-{n}"
    for name in names:
        os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    for folder in (target, output_dir):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target, names


def _up_to(folder: str, top: str) -> list[str]:
    """folder, its parent, ... up to and including `top` (the first folder a makedirs created)."""
    folder, top = os.path.abspath(folder), os.path.abspath(top)
    chain = [folder]
    while chain[-1] != top and os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain if chain[-1] == top else [folder]


def agree(ok: bool, message: str) -> None:
    """Multi-host: every process learns whether process 0 took the lock; the others refuse with
    `message` when it did not (process 0 raises its own, more precise, error)."""
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    if not bool(multihost_utils.broadcast_one_to_all(np.array(ok))) and jax.process_index() != 0:
        raise ConfigError(message)


__all__ = ["EARLIER_RUN", "LOCK_FILE", "RUN_FILES", "RunLock", "agree", "earlier_run", "foreign_files", "held_by",
           "start_over"]
