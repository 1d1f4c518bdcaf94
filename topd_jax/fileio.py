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


@contextlib.contextmanager
def replace_directory(path: str | os.PathLike, *, replaced: Callable[[str], bool]) -> Iterator[str]:
    """Stage a new version of directory `path`, then swap it in whole.

    Yields an empty staging directory next to `path` (same filesystem). When the block finishes,
    the entries of the old `path` for which `replaced(name)` is False (e.g. tokenizer files) are
    copied into the staging directory, everything is fsynced, and the staging directory takes
    `path`'s place by two renames. If the block raises, the staging directory is removed and
    `path` is untouched. A crash can never leave a half-written `path`: at worst (between the two
    renames) the complete old and new versions both sit beside it as hidden directories.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        yield staging
        if os.path.isdir(path):
            for entry in os.listdir(path):
                source, target = os.path.join(path, entry), os.path.join(staging, entry)
                if replaced(entry) or os.path.exists(target):
                    continue
                if os.path.isdir(source):
                    shutil.copytree(source, target, symlinks=True)
                else:
                    shutil.copy2(source, target, follow_symlinks=False)
        _fsync_tree(staging)
        if os.path.isdir(path):
            retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(path, os.path.join(retired, name))
            os.rename(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        elif os.path.exists(path):
            raise FileExistsError(f"{path} exists and is not a directory")
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
