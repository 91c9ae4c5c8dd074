"""Decode C-NMC cells, crop them to the cell, derive the cell mask and cache the arrays.

``prepare_arrays`` turns a dataset folder (or a manifest table) into
``output/arrays/<dataset>_<size>/`` holding ``images.npy`` (N,S,S,3) uint8 RGB,
``masks.npy`` (N,S,S) uint8 0/1, ``labels.npy`` (N,) int8 (1 all, 0 hem, -1 unlabeled),
``manifest.csv`` (row i = array row i) and ``meta.json``. The arrays are written through
memory maps chunk by chunk (memory stays bounded), by a pool of threads (or processes), into a folder
with a temporary name that is renamed into place only when complete. A second call on
unchanged files returns the cached folder.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import ctypes
import datetime as dt
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import cv2
import numpy as np

from modules import config, native
from modules.files import make_public, write_json_atomic

if TYPE_CHECKING:  # pandas is imported lazily: worker processes only need numpy and OpenCV
    import pandas as pd

#: Part of the cache digest: bump it whenever the pixels preprocess_image produces change,
#: so that arrays cached by older code are rebuilt rather than trusted.
META_VERSION = 3
#: BMP file header from byte 10: pixel offset, info header size, width, height, planes, bit
#: count, compression.
_BMP_HEADER = struct.Struct("<IIiiHHI")
#: With ``workers=None``, fewer images than this are prepared in the calling thread.
MIN_IMAGES_FOR_POOL = 128
#: With ``workers=None``, at most this many workers: beyond it threads mostly wait for the GIL
#: and the disk.
MAX_DEFAULT_WORKERS = 8
#: "thread" (default: file reads, OpenCV and NumPy release the GIL, so threads run in parallel
#: with no start-up or copying cost) or "process" (a forkserver/spawn pool). See docs/BENCHMARKS.md.
EXECUTOR = os.environ.get("ANNA_PREPARE_EXECUTOR", "thread")


class ImageError(ValueError):
    """An image cannot be used (unreadable, empty, wrong channels, no cell); the message names it."""


@dataclass
class PreparedArrays:
    """Cached arrays of one dataset at one size (arrays are read-only memory maps)."""

    images: np.ndarray  # (N, S, S, 3) uint8 RGB
    masks: np.ndarray  # (N, S, S) uint8 0/1
    labels: np.ndarray  # (N,) int8: 1 all, 0 hem, -1 unlabeled
    manifest: pd.DataFrame  # row i describes array row i
    meta: dict
    path: Path

    def __len__(self) -> int:
        return len(self.labels)


# --------------------------------------------------------------------------- one image

@contextlib.contextmanager
def _quiet_opencv():
    """Silence OpenCV's own log lines for unreadable files: our ImageError says it better."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def _view_bmp24(data: bytes, path: str) -> np.ndarray | None:
    """Zero-copy BGR view of an uncompressed 24-bit BMP (the Kaggle format), else None.

    The pixels are read in place (rows bottom-up, each padded to 4 bytes), so only the
    cell's crop is ever copied; other formats and BMP variants go through cv2.imdecode.
    """
    if len(data) < 54 or data[:2] != b"BM":
        return None
    offset, info_size, width, height, _, bits, compression = _BMP_HEADER.unpack_from(data, 10)
    if info_size < 40 or bits != 24 or compression != 0 or width <= 0 or height == 0:
        return None
    stride = (width * 3 + 3) // 4 * 4
    end = offset + stride * abs(height)
    if end > len(data):
        raise ImageError(f"{path} is truncated ({len(data)} of {end} bytes): copy it again from the download")
    rows = np.frombuffer(data, np.uint8, stride * abs(height), offset).reshape(abs(height), stride)
    rows = rows[:, :width * 3].reshape(abs(height), width, 3)
    return rows[::-1] if height > 0 else rows  # positive height: stored bottom-up


def _decode_bgr(path: str | os.PathLike) -> np.ndarray:
    """Read an image as 3-channel uint8 BGR (OpenCV order), or raise ImageError naming it."""
    path = os.fspath(path)  # plain strings in this per-image path: pathlib costs more than decoding
    try:  # Python's open() also takes paths cv2.imread cannot (non-ASCII on Windows)
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}; scan the dataset again") from None
    if not data:
        raise ImageError(f"{path} is empty (0 bytes), probably an interrupted copy; copy it again from the download")
    image = _view_bmp24(data, path)
    if image is not None:
        return image
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(
            f"{path} cannot be decoded: the file is corrupt, truncated or not really a "
            f"{os.path.splitext(path)[1]} image; "
            "copy it again from the download"
        )
    if image.dtype != np.uint8:
        raise ImageError(f"{path} has {image.dtype} pixels; C-NMC cells are 8-bit RGB: save it as 8-bit RGB")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        raise ImageError(
            f"{path} is grayscale; C-NMC cells are RGB and the stain colour matters, so it is not converted: "
            "use the original RGB file"
        )
    if channels == 4:
        # An opaque alpha channel (some converters add one) carries nothing: drop it. A
        # transparent one would hide part of the cell, so that is an error.
        if image[..., 3].min() < 255:
            raise ImageError(
                f"{path} is RGBA with transparent pixels; C-NMC cells are RGB without transparency: "
                "use the original file or save it as RGB"
            )
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif channels != 3:
        raise ImageError(f"{path} has {channels} channels; C-NMC cells are RGB (3 channels): use the original file")
    return image


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read one cell image as RGB.

    Grayscale images and RGBA images with transparency are refused (ImageError); an
    opaque alpha channel is dropped, which loses nothing.

    Args:
        path: Image file (.bmp, .png, .jpg, .tif …).

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        ImageError: The file is empty, corrupt, truncated, grayscale, RGBA with
            transparency or not 8-bit; the message names the file and the fix.
    """
    with _quiet_opencv():
        return cv2.cvtColor(_decode_bgr(path), cv2.COLOR_BGR2RGB)


def preprocess_image(rgb: np.ndarray, size: int, margin: int = config.DEFAULT_MARGIN,
                     threshold: int = config.BACKGROUND_THRESHOLD,
                     canvas: int = config.DEFAULT_CANVAS) -> tuple[np.ndarray, np.ndarray]:
    """Crop a cell to its bounding box, centre it on a black square and resize it.

    The cell is every pixel with a channel above ``threshold`` (the background is black).
    The square's side is the box's longer side plus ``2 * margin``, and at least ``canvas``.
    Only the part of the square inside the image is resampled (``resample``: area averaging
    when shrinking, bilinear when enlarging) into its place in the black output square.
    The mask marks the pixels of the returned image with a channel above ``threshold``:
    exactly the cell the model sees. Works on either channel order (RGB or BGR) and keeps it.
    ``prepare_arrays`` gives the same bytes for the same file.

    Args:
        rgb: (H, W, 3) uint8 image.
        size: Side of the output square in pixels.
        margin: Background pixels kept around the cell's bounding box, at the input scale.
        threshold: Background threshold (``config.BACKGROUND_THRESHOLD``).
        canvas: Smallest side of the padded square, in input pixels, so that cells keep a
            common scale (``config.DEFAULT_CANVAS``); 0 crops tightly to each cell.

    Returns:
        ``(image, mask)``: (size, size, 3) uint8 and (size, size) uint8 with 1 on the cell.

    Raises:
        ImageError: No pixel is above the threshold (an all-black image).
        ValueError: ``rgb`` is not a non-empty (H, W, 3) uint8 array, or a setting is outside
            ``check_settings``' limits.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"preprocess_image needs a non-empty (H, W, 3) uint8 image, not {rgb.dtype} {rgb.shape}")
    check_settings(size, margin, threshold, canvas, min_size=1)
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    _crop_resize_into(rgb, image, mask, margin, threshold, canvas)
    return image, mask


#: Largest output side, margin and canvas accepted (the C kernel's limits; far beyond any use).
MAX_SIZE, MAX_EXTENT = 16384, 1 << 20


def check_settings(size: int, margin: int, threshold: int, canvas: int, min_size: int = 8) -> None:
    """Raise ValueError unless size, margin, threshold and canvas are usable integers.

    Args:
        size: Output side, ``min_size`` to ``MAX_SIZE`` pixels.
        margin, canvas: 0 to ``MAX_EXTENT`` input pixels.
        threshold: Background threshold, 0 to 254 (a channel above it is cell).
        min_size: Smallest accepted size.
    """
    values = {"size": size, "margin": margin, "threshold": threshold, "canvas": canvas}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, not {value!r}")
    if not (min_size <= size <= MAX_SIZE and 0 <= margin <= MAX_EXTENT and 0 <= canvas <= MAX_EXTENT
            and 0 <= threshold <= 254):
        raise ValueError(f"need {min_size} <= size <= {MAX_SIZE}, 0 <= margin, canvas <= {MAX_EXTENT} and "
                         f"0 <= threshold <= 254 (got size={size}, margin={margin}, canvas={canvas}, "
                         f"threshold={threshold})")


def _no_cell_error(threshold: int) -> ImageError:
    return ImageError(f"no cell pixels (every channel <= {threshold}): the image is black")


def _bounding_box(rgb: np.ndarray, threshold: int) -> tuple[int, int, int, int]:
    """``(y, x, height, width)`` of the pixels with a channel above ``threshold``.

    Row maxima, then column maxima over the cell's rows only: two cheap passes, no
    full-size mask.
    """
    flat = rgb.reshape(rgb.shape[0], -1)
    rows = np.flatnonzero(flat.max(axis=1) > threshold)
    if rows.size == 0:
        raise _no_cell_error(threshold)
    # Column maxima over the cell's rows, per byte: byte index // 3 is the pixel column.
    channels = np.flatnonzero(flat[rows[0]:rows[-1] + 1].max(axis=0) > threshold)
    y, x = int(rows[0]), int(channels[0]) // 3
    return y, x, int(rows[-1]) - y + 1, int(channels[-1]) // 3 - x + 1


def cell_square(rgb: np.ndarray, margin: int = config.DEFAULT_MARGIN,
                threshold: int = config.BACKGROUND_THRESHOLD,
                canvas: int = config.DEFAULT_CANVAS) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """The cell's bounding box and the square ``preprocess_image`` keeps around it.

    Args:
        rgb: (H, W, 3) uint8 image (either channel order).
        margin, threshold, canvas: As for ``preprocess_image``.

    Returns:
        ``((y, x, height, width), (top, left, side))`` in input pixels; the square may reach
        past the image's edges (that part is black padding).

    Raises:
        ImageError: No pixel is above the threshold.
    """
    y, x, height, width = _bounding_box(rgb, threshold)
    side = max(max(width, height) + 2 * margin, int(canvas))
    return (y, x, height, width), (y + height // 2 - side // 2, x + width // 2 - side // 2, side)


def _round_ratio(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, in integers (as the C kernel does)."""
    return (2 * numerator + denominator) // (2 * denominator)


def _crop_resize_into(image: np.ndarray, out: np.ndarray, mask: np.ndarray, margin: int, threshold: int,
                      canvas: int, swap: bool = False) -> None:
    """The work of ``preprocess_image``, written into ``out`` (S, S, 3) and ``mask`` (S, S), zero-filled.

    Channels are reversed on the way when ``swap`` (BGR in, RGB out). Uses the C kernel
    where it is built (``modules.native``), else the NumPy reference; both give the same bytes.
    """
    kernel = native.kernel()
    if kernel is None:
        _crop_resize_numpy(image, out, mask, margin, threshold, canvas, swap)
        return
    if image.strides[1:] != (3, 1):  # the kernel needs pixel-contiguous rows (any row step)
        image = np.ascontiguousarray(image)
    if not (out.flags.c_contiguous and mask.flags.c_contiguous):
        raise ValueError("out and mask must be C-contiguous arrays")
    status = kernel.anna_crop_resize(image.ctypes.data, image.shape[0], image.shape[1], image.strides[0],
                                     out.shape[0], margin, threshold, canvas, int(swap), out.ctypes.data,
                                     mask.ctypes.data)
    if status == _TOO_LARGE:  # over the kernel's 2**20 pixels a side: the reference has no such limit
        _crop_resize_numpy(image, out, mask, margin, threshold, canvas, swap)
    elif status == _NO_CELL:
        raise _no_cell_error(threshold)
    elif status < 0:
        raise MemoryError(f"the C kernel failed: {os.strerror(-status)}")


#: Status codes of the C kernel (``_cellkernel.c``) that reach ``_crop_resize_into``.
_NO_CELL, _TOO_LARGE = 2, 3


def _crop_resize_numpy(image: np.ndarray, out: np.ndarray, mask: np.ndarray, margin: int, threshold: int,
                       canvas: int, swap: bool) -> None:
    """NumPy reference of the C kernel's ``anna_crop_resize`` (same geometry, same integers)."""
    (y, x, height, width), (top, left, side) = cell_square(image, margin, threshold, canvas)
    size = out.shape[0]
    n_rows, n_cols = image.shape[:2]
    y0, y1 = max(y - margin, 0, top), min(y + height + margin, n_rows, top + side)
    x0, x1 = max(x - margin, 0, left), min(x + width + margin, n_cols, left + side)
    oy0, oy1 = _round_ratio((y0 - top) * size, side), _round_ratio((y1 - top) * size, side)
    ox0, ox1 = _round_ratio((x0 - left) * size, side), _round_ratio((x1 - left) * size, side)
    if oy1 > oy0 and ox1 > ox0:
        region = resample(image[y0:y1, x0:x1], ox1 - ox0, oy1 - oy0)
        out[oy0:oy1, ox0:ox1] = region[..., ::-1] if swap else region
        mask[oy0:oy1, ox0:ox1] = (region > threshold).any(axis=2)


@functools.lru_cache(maxsize=4096)
def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resampling taps of one axis, ``n_in`` pixels to ``n_out``.

    Shrinking (and equal sizes): output pixel d covers inputs [d n_in / n_out, (d+1) n_in / n_out)
    and each input it overlaps weighs its overlap (area resampling, no aliasing at any ratio).
    Enlarging: bilinear between the two nearest input centres. Weights are integers summing to
    256 per output pixel (rounded cumulatively, so none is negative), as in the C kernel's ``anna_taps``.

    Returns:
        ``(first, count, weight)``: output d reads inputs ``first[d] … first[d] + count[d] - 1``
        with ``weight[d, :count[d]]`` (the rest of the row is 0); read-only int32 arrays.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"taps needs sizes >= 1, not {n_in} -> {n_out}")
    stride = (n_in + n_out - 1) // n_out + 1 if n_in > n_out else 2
    first, count = np.zeros(n_out, np.int32), np.zeros(n_out, np.int32)
    weight = np.zeros((n_out, stride), np.int32)
    for d in range(n_out):
        if n_in >= n_out:
            low, high = d * n_in, (d + 1) * n_in  # in units of 1/n_out input pixel
            s0, s1 = low // n_out, (high - 1) // n_out
            cumulative = [((min(high, (s + 1) * n_out) - low) * 256 + n_in // 2) // n_in for s in range(s0, s1 + 1)]
            row = [end - begin for begin, end in zip([0] + cumulative[:-1], cumulative)]
        else:
            numerator, denominator = (2 * d + 1) * n_in - n_out, 2 * n_out
            s0, fraction = divmod(numerator, denominator) if numerator >= 0 else (0, 0)
            if s0 >= n_in - 1:
                s0, row = n_in - 1, [256]
            else:
                right = (fraction * 256 + n_out) // denominator
                row = [256 - right, right]
        first[d], count[d] = s0, len(row)
        weight[d, :len(row)] = row
    for array in (first, count, weight):
        array.flags.writeable = False
    return first, count, weight


def resample(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an (H, W, C) uint8 image: area averaging when shrinking, bilinear when enlarging.

    Vertical pass first (its sums, at most 255 * 256, fit 16 bits), then horizontal, rounded half up to 8 bits: the
    NumPy reference of the C kernel (``taps`` says which inputs each output pixel reads).

    Args:
        image: (H, W, C) uint8 image.
        width, height: Output size.

    Returns:
        (height, width, C) uint8 image.
    """
    v_first, _, v_weight = taps(image.shape[0], height)
    h_first, _, h_weight = taps(image.shape[1], width)
    vertical = np.zeros((height,) + image.shape[1:], np.uint32)
    for tap in range(v_weight.shape[1]):  # taps past a row's count weigh 0: any valid index will do
        rows = np.minimum(v_first + tap, image.shape[0] - 1)
        vertical += v_weight[:, tap, None, None].astype(np.uint32) * image[rows]
    total = np.full((height, width) + image.shape[2:], 1 << 15, np.uint32)
    for tap in range(h_weight.shape[1]):
        cols = np.minimum(h_first + tap, image.shape[1] - 1)
        total += h_weight[None, :, tap, None].astype(np.uint32) * vertical[:, cols]
    return (total >> 16).astype(np.uint8)


def _prepare_rows(start: int, paths: list[str], size: int, margin: int, threshold: int, canvas: int,
                  images_file: str, masks_file: str) -> tuple[int, int, list]:
    """In a worker process: prepare rows ``start…`` straight into the shared .npy files."""
    images = np.load(images_file, mmap_mode="r+", allow_pickle=False)
    masks = np.load(masks_file, mmap_mode="r+", allow_pickle=False)
    stop = start + len(paths)
    errors = _prepare_into(start, paths, size, margin, threshold, canvas, images[start:stop].view(np.ndarray),
                           masks[start:stop].view(np.ndarray))
    del images, masks  # unmapped; the pages are the parent's too (MAP_SHARED)
    return start, len(paths), errors


def _prepare_into(start: int, paths: list[str], size: int, margin: int, threshold: int, canvas: int,
                  images: np.ndarray, masks: np.ndarray) -> list[tuple]:
    """Prepare ``paths`` into ``images``/``masks`` (contiguous views of the output); returns the errors.

    With the C kernel, the whole chunk is one call (GIL released); the files it does not read
    itself (not 24-bit BMP) or cannot prepare are redone here, where errors get their messages.
    """
    kernel = native.kernel()
    todo = range(len(paths))
    if kernel is not None:
        status = np.zeros(len(paths), np.int32)
        encoded = (ctypes.c_char_p * len(paths))(*(os.fsencode(path) for path in paths))
        kernel.anna_prepare_files(len(paths), encoded, size, margin, threshold, canvas, images.ctypes.data,
                                  masks.ctypes.data, status.ctypes.data)
        todo = np.flatnonzero(status)
    errors = []
    for offset in map(int, todo):
        path = paths[offset]
        try:
            _crop_resize_into(_decode_bgr(path), images[offset], masks[offset], margin, threshold, canvas, swap=True)
        except ImageError as error:
            message = str(error)
            errors.append((start + offset, path, message if path in message else f"{path}: {message}"))
        except OSError as error:
            errors.append((start + offset, path,
                           f"{path} cannot be read ({error}); check the file and its permissions"))
    return errors


def _worker_context():
    """Process start method for the pool: forkserver where available, else spawn.

    Not fork: the parent may hold TensorFlow or OpenCV threads. The forkserver preloads this
    module, so each worker starts in milliseconds.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process at a time: OpenCV's own threads only contend
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # we report unreadable files


# --------------------------------------------------------------------------- the cache

def _source_root(manifest: pd.DataFrame) -> Path:
    source = manifest.attrs.get("source")
    if source:
        return Path(source)
    return Path(os.path.commonpath([str(Path(p).parent) for p in manifest["path"]]))


def compute_digest(manifest: pd.DataFrame, size: int, margin: int, threshold: int = config.BACKGROUND_THRESHOLD,
                   root: Path | None = None, canvas: int = config.DEFAULT_CANVAS) -> str:
    """Fingerprint of the inputs of ``prepare_arrays``.

    sha256 over size, margin, threshold, canvas and, per file sorted by relative path: the
    relative path, size, mtime_ns and the manifest's name/label/split/fold/patient fields
    (so a changed labels CSV also changes it).

    Args:
        manifest: Manifest table.
        size, margin, threshold: Preprocessing settings.
        root: Folder the paths are made relative to (the manifest's source by default).
        canvas: Smallest side of the square, in source pixels (``preprocess_image``).

    Returns:
        Hex digest.
    """
    root = str(root or _source_root(manifest))
    prefix = root.rstrip(os.sep) + os.sep
    digest = hashlib.sha256(f"v{META_VERSION}|{size}|{margin}|{threshold}|canvas={int(canvas)}\n".encode())
    entries = []
    columns = [manifest[c].tolist() for c in ("path", "original_name", "patient_id", "label", "split", "fold")]
    for path, original_name, patient_id, label, split, fold in zip(*columns):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}; scan the dataset again") from None
        relative = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
        entries.append(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}|{original_name}|{patient_id}|"
                       f"{label}|{split}|{fold}")
    for entry in sorted(entries):
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()


def _dataset_for(manifest: pd.DataFrame) -> str:
    dataset = manifest.attrs.get("dataset")
    if dataset and manifest.attrs.get("rows") == len(manifest):
        return dataset
    subset = hashlib.sha256("\n".join(sorted(manifest["path"])).encode()).hexdigest()[:8]
    return f"{dataset}_subset-{subset}" if dataset else f"manifest-{subset}"


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(folder: Path, digest: str, skip_bad: bool) -> bool:
    meta = _read_meta(folder)
    if not meta or meta.get("digest") != digest:
        return False
    if meta.get("skipped") and not skip_bad:
        return False  # rebuild, which raises on the bad files as a first run would
    try:
        shapes = [np.load(folder / f"{n}.npy", mmap_mode="r", allow_pickle=False).shape[0]
                  for n in ("images", "masks", "labels")]
        rows = sum(1 for _ in open(folder / "manifest.csv", encoding="utf-8")) - 1
    except (OSError, ValueError):
        return False
    return shapes == [meta.get("count")] * 3 and rows == meta.get("count")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run_chunks(paths: list[str], size: int, margin: int, threshold: int, canvas: int, workers: int,
                images: np.ndarray, masks: np.ndarray, skip_bad: bool, progress, desc: str) -> list[tuple]:
    """Prepare every path into the memory maps; returns the errors (index, path, message)."""
    from tqdm.auto import tqdm

    n = len(paths)
    chunk = max(8, min(64, math.ceil(n / (workers * 8))))
    starts = list(range(0, n, chunk))
    errors: list[tuple] = []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)

    def collect(result) -> None:
        start, count, chunk_errors = result
        errors.extend(chunk_errors)
        bar.update(count)
        if chunk_errors and not skip_bad:
            raise _StopOnError()

    def in_place(start: int) -> tuple[int, int, list]:
        # Threads (and the calling thread) write straight into the memory maps.
        stop = min(start + chunk, n)
        # Plain ndarray views: indexing a numpy.memmap row by row is slow.
        return start, stop - start, _prepare_into(start, paths[start:stop], size, margin, threshold, canvas,
                                                  images[start:stop].view(np.ndarray),
                                                  masks[start:stop].view(np.ndarray))

    # Silenced once around the whole run: OpenCV's log level is process-wide.
    with _quiet_opencv(), contextlib.closing(bar):
        try:
            _dispatch(starts, chunk, workers, in_place, collect, paths, size, margin, threshold, canvas, images,
                      masks)
        except _StopOnError:
            pass
    return sorted(errors)


def _dispatch(starts: list[int], chunk: int, workers: int, in_place, collect, paths: list[str], size: int,
              margin: int, threshold: int, canvas: int, images: np.ndarray, masks: np.ndarray) -> None:
    """Run the chunks in the calling thread, a thread pool or a process pool.

    Threads write straight into the memory maps (``in_place``); processes map the same .npy
    files and write their rows there too. At most ``3 * workers`` chunks are queued.
    """
    if workers <= 1 or len(starts) <= 1:
        for start in starts:
            collect(in_place(start))
        return
    threads = EXECUTOR == "thread"
    if threads:
        pool_context = futures.ThreadPoolExecutor(workers)
    else:
        pool_context = futures.ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_init_worker)
    with pool_context as pool:
        pending: set = set()
        queue = iter(starts)
        try:
            while True:
                for start in queue:
                    if threads:
                        pending.add(pool.submit(in_place, start))
                    else:
                        pending.add(pool.submit(_prepare_rows, start, paths[start:start + chunk], size, margin,
                                                threshold, canvas, images.filename, masks.filename))
                    if len(pending) >= 3 * workers:
                        break
                if not pending:
                    break
                done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    collect(future.result())
        except BaseException:  # a bad image (without skip_bad), an interrupt: stop queued chunks
            for future in pending:
                future.cancel()
            raise


class _StopOnError(Exception):
    pass


def _bad_images_error(errors: list[tuple]) -> ImageError:
    listed = "\n  ".join(message for _, _, message in errors[:10])
    more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
    return ImageError(
        f"{len(errors)} image(s) cannot be used:\n  {listed}{more}\n"
        "Fix or remove them, or leave them out with --skip-bad (skip_bad=True); skipped files are listed in meta.json."
    )


def _compact(folder: Path, keep: np.ndarray) -> None:
    """Rewrite images/masks.npy keeping only the rows in ``keep`` (chunk by chunk)."""
    for name in ("images", "masks"):
        full = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        kept = np.lib.format.open_memmap(folder / f"{name}.kept.npy", mode="w+", dtype=full.dtype,
                                         shape=(len(keep), *full.shape[1:]))
        for begin in range(0, len(keep), 512):
            kept[begin:begin + 512] = full[keep[begin:begin + 512]]
        kept.flush()
        del kept, full
        os.replace(folder / f"{name}.kept.npy", folder / f"{name}.npy")


def _publish(staging: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an older cache."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".partial", dir=target.parent))
        os.replace(target, trash / target.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staging, target)


def prepare_arrays(data, size: int = config.DEFAULT_IMAGE_SIZE, output_dir: str | os.PathLike | None = None,
                   skip_bad: bool = False, workers: int | None = None, progress: bool = True,
                   margin: int = config.DEFAULT_MARGIN, canvas: int = config.DEFAULT_CANVAS) -> Path:
    """Prepare (or reuse) the cached arrays of a dataset.

    Each cell is cropped to its bounding box plus ``margin``, centred on a black square of at
    least ``canvas`` source pixels (so cells keep their relative size; 0 crops tightly), resized
    to ``size`` and stored as RGB with its mask (see ``preprocess_image``).

    Args:
        data: Dataset folder (anything ``data.scan_dataset`` accepts) or a manifest table.
        size: Side of the square images in pixels.
        output_dir: Output root (``config.OUTPUT_DIR`` by default); arrays go to ``arrays/``.
        skip_bad: Leave out unusable images (listed in ``meta.json["skipped"]``) instead of
            raising.
        workers: Parallel workers (threads by default, see ``EXECUTOR``); by default one per
            core up to ``MAX_DEFAULT_WORKERS`` (fewer than ``MIN_IMAGES_FOR_POOL`` images run
            in the calling thread).
        progress: Show a tqdm progress bar.
        margin: Background pixels kept around each cell (at the source resolution).
        canvas: Smallest side of the square in source pixels (``config.DEFAULT_CANVAS``); 0
            blows each cell up to fill the frame (more detail, but its size is lost).

    Returns:
        The arrays folder ``<output_dir>/arrays/<dataset>_<size>`` (``…_canvas<C>``,
        ``…_margin<M>`` for a canvas or margin other than the default).

    Raises:
        ImageError: An image cannot be used and ``skip_bad`` is False (every bad file found
            is named), or every image was skipped.
        DatasetError, FileNotFoundError: From scanning ``data``.
    """
    import pandas as pd

    from modules.data.layout import MANIFEST_DTYPES, DatasetError, scan_dataset, write_manifest

    if isinstance(data, pd.DataFrame):
        manifest = data.copy()
        manifest.attrs = dict(data.attrs)
        missing = [c for c in config.MANIFEST_COLUMNS if c not in manifest.columns]
        if missing:
            raise DatasetError(f"the manifest table lacks columns {missing}; pass the table scan_dataset returns")
        manifest = manifest[list(config.MANIFEST_COLUMNS)].reset_index(drop=True)
    else:
        manifest = scan_dataset(data)
    if manifest.empty:
        raise DatasetError("the manifest is empty: there are no images to prepare")
    check_settings(size, margin, config.BACKGROUND_THRESHOLD, canvas)
    size, margin, canvas = int(size), int(margin), int(canvas)
    from modules.data.synthetic import is_synthetic

    source = _source_root(manifest)
    synthetic = bool(manifest.attrs.get("synthetic", is_synthetic(source)))
    dataset = _dataset_for(manifest)
    threshold = config.BACKGROUND_THRESHOLD
    target = config.arrays_dir(dataset, size, output_dir, canvas=canvas, margin=margin)
    digest = compute_digest(manifest, size, margin, threshold, source, canvas=canvas)
    if _cache_is_valid(target, digest, skip_bad):
        return target

    if workers is None:  # a pool costs more than it saves on a few images
        workers = min(_default_workers(), MAX_DEFAULT_WORKERS) if len(manifest) >= MIN_IMAGES_FOR_POOL else 1
    workers = max(1, int(workers))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    make_public(staging)
    try:
        n = len(manifest)
        images = np.lib.format.open_memmap(staging / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        masks = np.lib.format.open_memmap(staging / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        desc = f"{'SYNTHETIC ' if synthetic else ''}{dataset} @ {size}px"
        errors = _run_chunks(manifest["path"].tolist(), size, margin, threshold, canvas, workers, images, masks,
                             skip_bad, progress, desc)
        # No msync: the pages reach the files through the page cache; renaming the folder
        # only after every row is written is what makes a half-written cache impossible.
        del images, masks
        if errors and not skip_bad:
            raise _bad_images_error(errors)
        if len(errors) == n:
            raise _bad_images_error(errors)
        skipped = [{"path": path, "error": message} for _, path, message in errors]
        if errors:
            keep = np.setdiff1d(np.arange(n), [index for index, _, _ in errors])
            _compact(staging, keep)
            manifest = manifest.iloc[keep].reset_index(drop=True)
        labels = manifest["label"].fillna(-1).to_numpy(dtype=np.int8)
        np.save(staging / "labels.npy", labels, allow_pickle=False)
        write_manifest(manifest.astype(MANIFEST_DTYPES), staging / "manifest.csv")
        meta = {
            "size": size, "margin": margin, "background_threshold": threshold, "canvas": canvas,
            "source": str(source),
            "dataset": dataset, "count": int(len(manifest)),
            "counts": {"all": int((labels == 1).sum()), "hem": int((labels == 0).sum()),
                       "unlabeled": int((labels == -1).sum())},
            "digest": digest, "skipped": skipped, "synthetic": synthetic,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "meta_version": META_VERSION,
            # Which implementation prepared the cells (both give the same bytes; see modules/native.py).
            "kernel": "C" if native.kernel() is not None else "NumPy",
        }
        write_json_atomic(staging / "meta.json", meta)
        try:
            _publish(staging, target)
        except OSError:
            if not _cache_is_valid(target, digest, skip_bad):  # lost a race to an identical run?
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_arrays(arrays_dir: str | os.PathLike) -> PreparedArrays:
    """Open a prepared arrays folder (memory-mapped, read-only).

    Args:
        arrays_dir: A folder returned by ``prepare_arrays``.

    Returns:
        PreparedArrays with ``images``, ``masks``, ``labels``, ``manifest`` and ``meta``.

    Raises:
        FileNotFoundError: The folder or one of its files is missing (prepare it again).
    """
    from modules.data.layout import read_manifest

    folder = Path(arrays_dir)
    needed = ["images.npy", "masks.npy", "labels.npy", "manifest.csv", "meta.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete arrays folder (missing {', '.join(missing)}); "
            "run `python -m modules prepare --data DIR` again"
        )
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in ("images", "masks", "labels")}
    manifest = read_manifest(folder / "manifest.csv")
    manifest.attrs.update({"dataset": meta.get("dataset"), "source": meta.get("source"),
                           "synthetic": meta.get("synthetic", False), "rows": len(manifest)})
    lengths = {len(arrays["images"]), len(arrays["masks"]), len(arrays["labels"]), len(manifest)}
    if lengths != {meta.get("count")}:
        raise ValueError(f"{folder}: arrays, manifest and meta.json disagree on the row count; prepare it again")
    return PreparedArrays(manifest=manifest, meta=meta, path=folder, **arrays)
