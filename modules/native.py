"""The compiled per-cell kernel (``_cellkernel.c``): built on first use, loaded with ctypes.

Preparing cells is mostly reading files and a few passes over each image; in Python those
passes hold the GIL between NumPy and OpenCV calls, so two threads ran only about 1.3x faster
than one. The C kernel does a whole chunk of cells per call with the GIL released (ctypes
releases it), and gives exactly the bytes of the NumPy reference in ``preprocess``.

The shared library is compiled once per machine with the system C compiler (``$CC``, else
``cc``) into ``$ANNA_CACHE_DIR`` (default ``~/.cache/anna``), under a name that includes a
digest of the source, the compiler and the platform, written to a temporary name and renamed.
Without a compiler (or with ``ANNA_NATIVE=0``) everything still works through the NumPy
reference, slower; ``kernel()`` returns None then and ``status()`` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

#: Must equal ANNA_KERNEL_VERSION in the C source: a stale library is rebuilt, not trusted.
KERNEL_VERSION = 1
SOURCE = Path(__file__).with_name("_cellkernel.c")
CFLAGS = ("-O3", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-shared", "-fPIC", "-fno-strict-aliasing")

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    """Folder of the compiled kernel: ``$ANNA_CACHE_DIR`` or ``~/.cache/anna``."""
    if os.environ.get("ANNA_CACHE_DIR"):
        return Path(os.environ["ANNA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anna"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate
    return None


def _build(compiler: str, target: Path) -> None:
    """Compile the kernel to ``target`` (temporary name, then rename: never a half-written file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([*compiler.split(), *CFLAGS, "-o", temporary, str(SOURCE)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.chmod(temporary, 0o755)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _candidate_dirs() -> list[Path]:
    """Where the library may live: the cache folder, else a per-user temporary folder."""
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
    name = library_name(compiler)
    problems = []
    for folder in _candidate_dirs():
        target = folder / name
        try:
            library = None
            if target.exists():
                try:
                    library = ctypes.CDLL(str(target))
                except OSError:  # corrupt (an interrupted copy, a full disk): build it again
                    pass
            if library is None:
                _build(compiler, target)
                library = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as error:
            problems.append(f"{folder}: {error}")
            continue
        if library.anna_kernel_version() != KERNEL_VERSION:
            problems.append(f"{target} is not kernel version {KERNEL_VERSION}: delete it to rebuild")
            continue
        _declare(library)
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
