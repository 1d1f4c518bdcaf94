"""Crash-safe writes: what a user saved is never lost or half-written.

Both writers stage into a private temporary (mkstemp/mkdtemp create it 0600/0700) and give it
the mode a plain `open`/`mkdir` would have before it takes the target's place: the mode of the
file or directory it replaces, else 0666/0777 less the user's umask. So a 0755 export folder
stays 0755 and a new config.yaml is 0644 under the usual umask 022.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Callable, Iterator


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def default_mode(path: str, *, directory: bool) -> int:
    """The permission bits for `path`: those it has now, else what open/mkdir would give it."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return (0o777 if directory else 0o666) & ~umask()


def write_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` atomically: a temporary file in the same directory, fsynced, given
    `default_mode(path)`, then renamed over `path`; a crash leaves the old or the new file."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not expose an empty file after a crash
        os.chmod(tmp, default_mode(path, directory=False))
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


def _link_or_copy(source: str, target: str) -> str:
    """Carry a file into the staging directory: a hard link (no data copied, and the old
    directory stays intact, as nothing is written through either name), or a copy across
    filesystems."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)
    return target


def _fsync_dir(path: str) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace_directory(path: str | os.PathLike, *, replaced: Callable[[str], bool]) -> Iterator[str]:
    """Stage a new version of directory `path`, then swap it in whole.

    Yields an empty staging directory next to `path` (same filesystem). When the block finishes,
    the entries of the old `path` for which `replaced(name)` is False (e.g. tokenizer files) are
    carried into the staging directory (hard-linked, or copied across filesystems), everything is fsynced, and the staging directory takes
    `path`'s place by two renames. If the block (or the swap) raises, the staging directory is
    removed and the old `path` is in place. A crash can never leave a half-written `path`: at
    worst (between the two renames) the complete old and new versions both sit beside it as
    hidden directories. A `path` that is a file is refused before anything is written.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    mode = default_mode(path, directory=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    retired_dir = retired = None
    try:
        yield staging
        os.chmod(staging, mode)  # mkdtemp's 0700 would otherwise become the folder's mode
        if os.path.isdir(path):
            for entry in os.listdir(path):
                source, target = os.path.join(path, entry), os.path.join(staging, entry)
                if replaced(entry) or os.path.exists(target):
                    continue
                if os.path.isdir(source) and not os.path.islink(source):
                    shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(source, target)
        _fsync_tree(staging)
        if os.path.isdir(path):
            retired_dir = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            retired = os.path.join(retired_dir, name)
            os.rename(path, retired)
        os.rename(staging, path)
        _fsync_dir(parent)
    except BaseException:
        if retired is not None and not os.path.exists(path):
            os.rename(retired, path)  # the new version did not land: put the old one back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if retired_dir is not None:
            shutil.rmtree(retired_dir, ignore_errors=True)

