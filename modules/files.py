"""Write files so that a reader never sees half of one, and let one process at a time write a folder.

Every file the package writes under ``output/`` goes through ``atomic_path``: the content is
written to a hidden sibling with a name no other process uses (``.<stem>.<random>.partial<ext>``,
keeping the extension so Keras and Matplotlib still recognise the format), then moved onto the
target with ``os.replace``, which is atomic on one file system. An interrupted run leaves at most
a hidden ``*.partial*`` file behind, never a truncated file under the real name, and two runs
writing the same name at once cannot clobber each other's temporary file.

``exclusive_lock`` gives a folder one writer (an OS lock the kernel drops when its holder dies);
its holder may then ``remove_partials``: no live process owns them.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

try:  # OS file locks on Linux and macOS; Windows has none of its kind
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it, then put it back
    os.umask(mask)
    return mask


#: What every temporary name of ``atomic_path`` holds (``.<stem>.<random>.partial<ext>``).
PARTIAL = ".partial"
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
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{PARTIAL}{path.suffix}", dir=path.parent)
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


def remove_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files ``atomic_path`` left in ``folder`` (a writer killed mid-write).

    Call it only while holding the folder's ``exclusive_lock``: then no live writer owns them.

    Returns:
        The files removed.
    """
    removed = []
    for path in Path(folder).glob(f".*{PARTIAL}*"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class LockHeldError(ValueError):
    """Another live process holds the lock; the message names it (pid, host, since when)."""


def read_holder(path: str | os.PathLike) -> str:
    """The process recorded in a lock file, in words: ``process 12 on host (since …; python -m modules train)``."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
        return (f"process {holder['pid']} on {holder['host']} (since {holder['since']}; "
                f"{holder['command']})")
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now, or by other code
        return "another process (not yet recorded)"


def _holder_record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500]}) + "\n"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on the file ``path`` for the whole ``with`` block.

    The kernel releases the lock when its holder exits or is killed, so a lock is never left
    behind and needs no staleness rule. The holder writes its pid, host, start time and command
    into the file, so a process that finds it taken names who holds it. The file stays (emptied):
    removing it would let a late opener lock a file nobody else sees. Windows has no ``flock``:
    there the lock is not enforced (a warning says so).

    Args:
        path: The lock file, e.g. ``<run folder>/.lock`` (its folder must exist).
        what: What the lock guards, for the message (``the run folder output/models/…``).
        wait: Wait for the holder to finish (saying so on stderr) instead of raising.

    Yields:
        ``path``.

    Raises:
        LockHeldError: Another process (or another open in this one) holds it and ``wait`` is False.
    """
    path = Path(path)
    if fcntl is None:  # pragma: no cover - Windows
        warnings.warn(f"{what} is not locked on this system (no fcntl): do not run two writers on it at once",
                      stacklevel=3)
        yield path
        return
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            if not wait:
                raise LockHeldError(f"{what} is in use by {holder}; wait for it to finish or stop it, "
                                    f"then run again (lock file {path})") from None
            print(f"waiting for {holder}, which is writing {what}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        os.ftruncate(handle, 0)
        os.pwrite(handle, _holder_record().encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(handle, 0)
    finally:
        os.close(handle)  # closing the last descriptor releases the lock
