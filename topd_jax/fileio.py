"""Crash-safe writes: what a user saved is never lost or half-written.

Both writers stage into a private temporary (mkstemp/mkdtemp create it 0600/0700) and give it
the mode a plain `open`/`mkdir` would have before it takes the target's place: the mode of the
file or directory it replaces, else 0666/0777 less the user's umask. So a 0755 export folder
stays 0755 and a new config.yaml is 0644 under the usual umask 022.
"""

from __future__ import annotations

import contextlib
import errno
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


def check_no_dangling_link(path: str | os.PathLike) -> None:
    """A FileNotFoundError naming the link and its target when `path`, or a folder on the way to
    it, is a symbolic link to nothing: creating `path` would fail with a puzzling "File exists"."""
    path = os.path.abspath(os.fspath(path))
    while True:
        if os.path.islink(path) and not os.path.exists(path):
            target = os.path.join(os.path.dirname(path), os.readlink(path))
            raise FileNotFoundError(errno.ENOENT, f"{os.strerror(errno.ENOENT)} (the target of the symbolic link "
                                    f"{path})", target)
        if os.path.exists(path) or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def check_writable(path: str | os.PathLike, *, directory: bool) -> None:
    """Refuse, before any work, a `path` that could not be written (an OSError naming where): a
    file whose folder does not exist, a folder whose nearest existing ancestor is not a folder
    (a folder is created with its parents, as by `mkdir -p`), either one where writing is not
    permitted; a `directory` path that is a file (or a file path
    that is a directory); a symbolic link to nothing (FileNotFoundError naming the link and its
    target: creating the path would fail with a puzzling "File exists")."""
    path = os.path.abspath(os.fspath(path))
    check_no_dangling_link(path)
    if os.path.exists(path):
        if directory != os.path.isdir(path):
            raise (NotADirectoryError if directory else IsADirectoryError)(
                errno.ENOTDIR if directory else errno.EISDIR, os.strerror(errno.ENOTDIR if directory else errno.EISDIR),
                path)
        where = path if directory else os.path.dirname(path)
    else:  # a folder is created with its parents; a file's folder must exist, as for open()
        where = os.path.dirname(path)
        while directory and not os.path.exists(where):
            where = os.path.dirname(where)
        if not os.path.exists(where):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), where)
        if not os.path.isdir(where):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), where)
    if not os.access(where, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), where)


class DirectoryBusy(OSError):
    """Another process is writing the directory (it holds `directory_lock`)."""


@contextlib.contextmanager
def directory_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the right to write directory `path` (one writer at a time) for the block.

    The lock is `.<name>.lock` beside `path` (the directory itself is swapped whole by
    `replace_directory`, so it cannot hold one), taken with `fcntl.flock` without waiting: a
    second writer gets `DirectoryBusy` naming the holder's pid at once. The file is removed
    when the block ends; a lock taken on a file that was removed in the meantime is taken again
    on the new one, so two writers never both hold it. The kernel drops the lock when the
    process dies, however it dies.
    """
    import fcntl

    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    lock = os.path.join(parent, f".{name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise DirectoryBusy(errno.EBUSY, f"{path} is being written by another process right now "
                                f"({holder or 'pid not recorded yet'}, lock {lock}); wait for it to finish or "
                                "write elsewhere") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file we locked: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        try:
            os.remove(lock)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Swap the paths `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the system or file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0; another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(parent: str, name: str) -> list[tuple[str, str]]:
    """(kind, path) of the staging ('saving') and retired ('old') folders of `name` in `parent`
    whose process is gone: what a killed replace_directory left behind."""
    found = []
    for entry in os.listdir(parent):
        for kind in ("saving", "old"):
            prefix = f".{name}.{kind}-"
            if entry.startswith(prefix):
                pid = entry[len(prefix):].split("-", 1)[0]
                if not (pid.isdigit() and process_alive(int(pid)) and int(pid) != os.getpid()):
                    found.append((kind, os.path.join(parent, entry)))
    return found


def recover_directory(path: str | os.PathLike) -> list[str]:
    """Undo what a killed `replace_directory` of `path` left: a complete earlier version parked
    between its two renames (only where the atomic exchange is unavailable) is put back, and
    stale staging folders are removed. Returns the names removed or restored."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return []
    done = []
    for kind, folder in _stale(parent, name):
        parked = os.path.join(folder, name)
        if kind == "old" and os.path.isdir(parked) and not os.path.exists(path):
            os.rename(parked, path)  # the previous version, complete: it never stopped being that
            done.append(f"restored {name} from {os.path.basename(folder)}")
        shutil.rmtree(folder, ignore_errors=True)
        done.append(f"removed {os.path.basename(folder)}")
    return done


@contextlib.contextmanager
def replace_directory(path: str | os.PathLike, *, replaced: Callable[[str], bool]) -> Iterator[str]:
    """Stage a new version of directory `path`, then swap it in whole, in one atomic step.

    Yields an empty staging directory next to `path` (same filesystem, named after this
    process). When the block finishes, the entries of the old `path` for which `replaced(name)`
    is False (e.g. a README) are carried into the staging directory (hard-linked, or copied
    across filesystems), everything is fsynced, and the staging directory and `path` are
    exchanged by one `renameat2(RENAME_EXCHANGE)`; the old version is then deleted. A kill at
    any point leaves `path` exactly as it was or exactly the new version, and the next call
    (`recover_directory`) removes what the killed one left beside it. Where the exchange is
    unavailable, two renames are used, and a kill between them leaves the complete old version
    parked beside `path`, which the next call puts back. If the block raises, the staging
    directory is removed and `path` is untouched. A `path` that is a file is refused before
    anything is written.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    recover_directory(path)
    mode = default_mode(path, directory=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-{os.getpid()}-", dir=parent)
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
        if os.path.isdir(path) and _exchange(staging, path):
            _fsync_dir(parent)  # staging now holds the old version: removed below
        else:
            if os.path.isdir(path):
                retired_dir = tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=parent)
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
    shutil.rmtree(staging, ignore_errors=True)
