"""The compiled per-cell kernel (``_cellkernel.c``): built on first use, loaded with ctypes.

Preparing cells is mostly reading files and a few passes over each image; in Python those
passes hold the GIL between NumPy and OpenCV calls, so two threads ran only about 1.3x faster
than one. The C kernel does a whole chunk of cells per call with the GIL released (ctypes
releases it), and gives exactly the bytes of the NumPy reference in ``preprocess``.

The shared library is compiled once per machine with the system C compiler (``$CC``, else the
first of ``cc``, ``gcc``, ``clang`` found) into ``$ANNA_CACHE_DIR`` (default
``$XDG_CACHE_HOME/anna``, else ``~/.cache/anna``; where that cannot be written, a
private per-user folder in the temporary folder), under a name that includes a digest of the
source, the compiler and the platform. It is written to a temporary name and renamed, and its
SHA-256 is recorded beside it (``.sha256``): a library that does not match (cut short by an
interrupted build or copy) is rebuilt, never loaded.
Without a compiler (or with ``ANNA_NATIVE=0``) everything still works through the NumPy
reference, slower; ``kernel()`` returns None then and ``status()`` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from modules.files import atomic_path, write_text_atomic

#: Must equal ANNA_KERNEL_VERSION in the C source: a stale library is rebuilt, not trusted.
KERNEL_VERSION = 1
SOURCE = Path(__file__).with_name("_cellkernel.c")
CFLAGS = ("-O3", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-shared", "-fPIC", "-fno-strict-aliasing")

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    """Folder of the compiled kernel: ``$ANNA_CACHE_DIR``, else ``$XDG_CACHE_HOME/anna`` or ``~/.cache/anna``."""
    if os.environ.get("ANNA_CACHE_DIR"):
        return Path(os.environ["ANNA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anna"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(compiler: str, target: Path) -> None:
    """Compile the kernel to ``target`` and record its digest beside it (``<target>.sha256``).

    Both are written through ``files.atomic_path`` (a temporary name, then a rename), the digest
    last: a library without a matching digest (an interrupted build, a cut-short copy) is
    rebuilt, never loaded.
    """
    with atomic_path(target) as temporary:
        result = subprocess.run([*compiler.split(), *CFLAGS, "-o", str(temporary), str(SOURCE)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        digest = _sha256(temporary)
    write_text_atomic(target.with_name(target.name + ".sha256"), digest)


def _is_intact(target: Path) -> bool:
    """True when ``target`` exists and matches the digest recorded when it was built."""
    digest_file = target.with_name(target.name + ".sha256")
    try:
        return digest_file.read_text().strip() == _sha256(target)
    except OSError:
        return False


def _private_dir(folder: Path) -> bool:
    """Make ``folder`` (mode 0700) or accept it only if it is ours and closed to others.

    The fallback folder sits in the shared temporary folder, where another user could have
    made it first and left a library of their own for us to load.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return False
    own = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return own and stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o077


def _candidate_dirs() -> list[Path]:
    """Where the library may live: the cache folder, else a private per-user temporary folder."""
    fallback = Path(tempfile.gettempdir()) / f"anna-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return [cache_dir(), fallback]


def library_name(compiler: str) -> str:
    """File name of the library built by ``compiler``: a digest of everything that shapes it."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join((compiler, *CFLAGS, sys.platform, platform.machine(), str(KERNEL_VERSION))).encode())
    return f"cellkernel-{digest.hexdigest()[:16]}.so"


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("ANNA_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "NumPy reference (ANNA_NATIVE=0)"
    if os.name != "posix":
        return None, "NumPy reference: the C kernel is built on Linux and macOS only"
    compiler = _compiler()
    if compiler is None:
        return None, "NumPy reference, slower: no C compiler found (install gcc or clang, or set CC)"
    problems = []
    try:
        name = library_name(compiler)
    except OSError as error:
        return None, f"NumPy reference, slower: the kernel's source cannot be read ({error})"
    for number, folder in enumerate(_candidate_dirs()):
        if number > 0 and not _private_dir(folder):
            problems.append(f"{folder}: not a private folder of this user")
            continue
        target = folder / name
        try:
            if not _is_intact(target):  # missing, or cut short by an interrupted build or copy
                _build(compiler, target)
            library = ctypes.CDLL(str(target))
            if library.anna_kernel_version() != KERNEL_VERSION:
                problems.append(f"{target} is not kernel version {KERNEL_VERSION}: delete it to rebuild")
                continue
            _declare(library)
        except (OSError, AttributeError, subprocess.SubprocessError) as error:
            problems.append(f"{folder}: {error}")
            continue
        return library, f"C kernel {target}"
    return None, "NumPy reference, slower: the C kernel could not be built or loaded (" + "; ".join(problems) + ")"


def _declare(library: ctypes.CDLL) -> None:
    """Argument and result types of the kernel's functions (see _cellkernel.c)."""
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.anna_taps.argtypes = [i64, i64, pointer, pointer, pointer]
    library.anna_taps.restype = i64
    library.anna_crop_resize.argtypes = [pointer, i64, i64, i64, i64, i64, i32, i64, i32, pointer, pointer]
    library.anna_crop_resize.restype = i32
    library.anna_prepare_files.argtypes = [i64, pointer, i64, i64, i32, i64, pointer, pointer, pointer]
    library.anna_prepare_files.restype = i64


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel, built on first call; None where it cannot be (NumPy reference then).

    The first time it cannot be built (no compiler, a failed build), a warning says so and why;
    the results are the same, only slower.
    """
    with _lock:
        if "library" not in _state:
            _state["library"], _state["status"] = _load()
            if _state["library"] is None and "ANNA_NATIVE=0" not in _state["status"]:
                warnings.warn(f"preparing cells with the {_state['status']}", RuntimeWarning, stacklevel=2)
        return _state["library"]


def status() -> str:
    """One line saying which implementation prepares cells, and why."""
    kernel()
    return _state["status"]


def reset() -> None:
    """Forget the loaded kernel so that the next call looks again (tests, ``ANNA_NATIVE`` changes)."""
    with _lock:
        _state.clear()
