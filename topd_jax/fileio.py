"""Crash-safe writes: what a user saved is never lost or half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator


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
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    retired_dir = retired = None
    try:
        yield staging
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(path: str | os.PathLike, text: str) -> None:
    """Replace file `path` by `text` all at once: a crash leaves the old file or the new one,
    never a half-written one (a temp file in the same directory, fsynced, renamed over `path`,
    the directory fsynced). The file gets the permissions a plain `open(path, "w")` would give
    (0666 less the umask), not mkstemp's private 0600."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(temp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    _fsync_dir(folder)
