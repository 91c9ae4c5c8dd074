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
    """Hold the lock file ``path`` (created exclusively) for a read-modify-write of a shared file.

    Works wherever ``os.open(O_CREAT | O_EXCL)`` is atomic (local disks, Google Drive in Colab);
    a lock older than ``stale_after`` seconds is taken to be left by a killed process and removed.

    Args:
        path: The lock file, e.g. ``output/viz/.index.lock``.
        timeout: Seconds to wait for another holder before giving up.
        stale_after: Age in seconds after which a lock file is considered abandoned.

    Yields:
        ``path``.

    Raises:
        TimeoutError: The lock stayed held for ``timeout`` seconds; the message names the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
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
