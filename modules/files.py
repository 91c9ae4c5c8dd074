"""Write files and folders so that a reader never sees half of one, and give a folder one writer.

Files (``atomic_path``) and folders (``staged_folder``) are built under a hidden ``.partial`` name, then renamed into
place (atomic on one file system): an interrupted run leaves at most a hidden ``*.partial*`` entry. ``exclusive_lock``
gives a folder one writer; its holder may ``remove_partials``: no live process owns them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

try:  # OS file locks on Linux and macOS; Windows has none of its kind
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


#: What every temporary name holds (``.<stem>.<random>.partial<ext>``).
PARTIAL = ".partial"
#: The process's umask, read once at import: reading it means setting it (then putting it back), not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def make_public(path: str | os.PathLike) -> None:
    """Give a file (0666) or folder (0777) made by ``tempfile`` the usual permissions, less the umask."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension, for Keras and Matplotlib), moved onto it on success."""
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
        tmp.unlink(missing_ok=True)


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


@dataclass
class StagedFolder:
    path: Path  # the folder to fill
    target: Path  # where it lands: final once the ``with`` block has ended


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, replace: bool = True) -> Iterator[StagedFolder]:
    """Build a folder as ``.<name>.<random>.partial`` beside ``target``, renamed into place on success (on an error
    it is removed). ``replace``: an existing ``target`` is moved aside and removed (memory maps open on its files stay
    valid); otherwise the folder takes the first free name of ``target``, ``target_2``, ``target_3`` …"""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = StagedFolder(Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=target.parent)),
                          target)
    try:
        yield staged
        make_public(staged.path)  # mkdtemp makes it private
        staged.target = _move_into_place(staged.path, target) if replace else _move_to_free_name(staged.path, target)
    finally:
        shutil.rmtree(staged.path, ignore_errors=True)  # gone already when it was moved


def _move_into_place(folder: Path, target: Path) -> Path:
    if target.exists():  # rename cannot replace a folder that has files: move the old one aside first
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(folder, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, target)
    return target


def _move_to_free_name(folder: Path, target: Path) -> Path:
    for n in range(1, 10_000):
        name = target.with_name(target.name if n == 1 else f"{target.name}_{n}")
        try:
            if not name.exists():
                folder.rename(name)  # fails if another process took the name meanwhile
                return name
        except OSError:
            if not name.exists():
                raise
    raise FileExistsError(f"{target}: 10,000 folders of that name already exist; remove some of them")


def remove_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove (and return) the temporary files killed writers left in ``folder``; call it only while holding the
    folder's ``exclusive_lock``: then no live writer owns them."""
    removed = [path for path in Path(folder).glob(f".*{PARTIAL}*") if path.is_file() and not path.is_symlink()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


class LockHeldError(ValueError):
    """Another live process holds the lock; the message names it (pid, host, since when)."""


def read_holder(path: str | os.PathLike) -> str:
    """The process recorded in a lock file, in words: ``process 12 on host (since …; python -m modules train)``."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
        return f"process {holder['pid']} on {holder['host']} (since {holder['since']}; {holder['command']})"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now, or by other code
        return "another process (not yet recorded)"


def _holder_record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500]}) + "\n"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on the file ``path`` (its folder must exist) for the ``with`` block; the kernel
    drops it when its holder dies, so no stale lock is left. The holder records itself in the file for the message of
    a process that finds it taken; the file stays, emptied (a late opener must not lock a file nobody else sees).
    ``wait``: wait for the holder (saying so on stderr) instead of raising LockHeldError. Windows: a warning only."""
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
