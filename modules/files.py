"""Write files so that a reader never sees half of one: a unique temporary name, then a rename.

Every file the package writes under ``output/`` goes through ``atomic_path``: the content is
written to a hidden sibling with a name no other process uses (``.<stem>.<random>.partial<ext>``,
keeping the extension so Keras and Matplotlib still recognise the format), then moved onto the
target with ``os.replace``, which is atomic on one file system. An interrupted run leaves at most
a hidden ``*.partial*`` file behind, never a truncated file under the real name, and two runs
writing the same name at once cannot clobber each other's temporary file.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

try:  # OS file locks (Linux, macOS); None on Windows, where the existence lock is used
    import fcntl as _flock
except ImportError:  # pragma: no cover
    _flock = None


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it, then put it back
    os.umask(mask)
    return mask


#: The process's umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = _read_umask()


def make_public(path: str | os.PathLike) -> None:
    """Give a file or folder made by ``tempfile`` (private: 0600 / 0700) the usual permissions.

    Files become ``0666`` and folders ``0777``, less the umask, as if made by ``open`` or
    ``mkdir``: results under ``output/`` stay readable by whoever may read the folder.
    """
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``.

    Args:
        path: The file to create or replace (its folder is created).

    Yields:
        The temporary path to write to (same folder and extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        make_public(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically; returns ``path``."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_csv_atomic(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as CSV (no index) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, timeout: float = 60.0, stale_after: float = 300.0) -> Iterator[Path]:
    """Hold the lock file ``path`` for a read-modify-write of a shared file.

    Where the operating system offers ``flock`` (Linux, macOS) the lock is an OS lock on that
    file: the kernel releases it when its holder exits or is killed, so a crashed run never
    leaves a lock behind, and the file itself stays in place. Elsewhere the lock is a file's
    existence (``os.open(O_CREAT | O_EXCL)``: ``path`` on Windows, ``path`` + ``.held`` on a
    file system without ``flock``); such a lock older than ``stale_after`` seconds is taken to
    be left by a killed process and removed.

    Args:
        path: The lock file, e.g. ``output/viz/.index.lock``.
        timeout: Seconds to wait for another holder before giving up.
        stale_after: Age in seconds after which an existence lock is considered abandoned.

    Yields:
        ``path``.

    Raises:
        TimeoutError: The lock stayed held for ``timeout`` seconds; the message names the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    if _flock is not None:
        handle = os.open(path, os.O_CREAT | os.O_RDWR)
        try:
            if _acquire_flock(handle, path, deadline, timeout):
                try:
                    yield path
                finally:
                    _flock.flock(handle, _flock.LOCK_UN)
                return
        finally:
            os.close(handle)
        # This file system has no flock (some network mounts): an existence lock beside it.
        yield from _existence_lock(path.with_name(path.name + ".held"), deadline, timeout, stale_after)
        return
    yield from _existence_lock(path, deadline, timeout, stale_after)


def _acquire_flock(handle: int, path: Path, deadline: float, timeout: float) -> bool:
    """Take the flock on ``handle``, waiting until ``deadline``; False where flock is unsupported."""
    while True:
        try:
            _flock.flock(handle, _flock.LOCK_EX | _flock.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} has been locked for {timeout:.0f} s by another run; wait for it to "
                                   "finish and try again") from None
            time.sleep(0.02)
        except OSError:
            return False


def _existence_lock(path: Path, deadline: float, timeout: float, stale_after: float) -> Iterator[Path]:
    """The lock as the existence of ``path`` (created exclusively), for systems without flock."""
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > stale_after:
                    path.unlink()
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} has been held for {timeout:.0f} s by another run; if no other "
                                   "ANNa run is writing there, delete the file and try again") from None
            time.sleep(0.02)
    try:
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
