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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

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
