"""The arrays cache: every cell of a dataset prepared once (on a thread pool) into ``.npy`` files read memory-mapped.

``output/arrays/<dataset>_<size>/`` holds ``images.npy`` (N,S,S,3) uint8 RGB, ``masks.npy`` (N,S,S) uint8 0/1,
``labels.npy`` (N,) int8 (1 all, 0 hem, -1 unlabeled), ``manifest.csv`` (row i = array row i, with its ``pixel_digest``)
and ``meta.json``. One process at a time writes it (``arrays/.<name>.lock``).
"""
from __future__ import annotations

import concurrent.futures as futures
import datetime as dt
import hashlib
import os
import queue
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from modules import config
from modules.data import schema
from modules.data.duplicates import DIGEST_COLUMN, pixel_digest
from modules.data.layout import MANIFEST_DTYPES, DatasetError, read_manifest, scan_dataset, write_manifest
from modules.data.synthetic import is_synthetic
from modules.files import exclusive_lock, staged_folder, write_json_atomic
from modules.preprocessing.cells import ImageError, check_settings, preprocess_image, quiet_opencv, read_bgr

#: Part of the cache digest: bumped whenever the arrays written change, so older caches are rebuilt (7: the
#: pixel digest is xxh3_128 of the BGR pixels).
META_VERSION = 7
ARRAYS = ("images", "masks", "labels")
#: Rows one worker prepares per task: enough to amortise the pool, few enough to balance the threads.
CHUNK = 32

Settings = tuple[int, int, int, int]  # size, margin, threshold, canvas
Errors = list[tuple[int, str, str]]  # row, path, message


@dataclass
class PreparedArrays:
    """Cached arrays of one dataset at one size (read-only memory maps)."""

    images: np.ndarray  # (N, S, S, 3) uint8 RGB
    masks: np.ndarray  # (N, S, S) uint8 0/1
    labels: np.ndarray  # (N,) int8: 1 all, 0 hem, -1 unlabeled
    manifest: pd.DataFrame  # row i describes array row i
    meta: dict
    path: Path

    def __len__(self) -> int:
        return len(self.labels)


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _source_root(manifest: pd.DataFrame) -> Path:
    source = manifest.attrs.get("source")
    return Path(source) if source else Path(os.path.commonpath([str(Path(p).parent) for p in manifest["path"]]))


def compute_digest(manifest: pd.DataFrame, settings: Settings, root: Path) -> str:
    """sha256 of the settings, ``META_VERSION`` and each file's path (relative to ``root``), size, mtime and manifest
    fields (a changed labels CSV counts)."""
    prefix = str(root).rstrip(os.sep) + os.sep
    size, margin, threshold, canvas = settings
    digest = hashlib.sha256(f"v{META_VERSION}|{size}|{margin}|{threshold}|canvas={canvas}\n".encode())
    entries = []
    for path, *fields in zip(*(manifest[c].tolist() for c in ("path", "original_name", "patient_id", "label",
                                                                "split", "fold"))):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}; scan the dataset again") from None
        relative = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, prefix)
        entries.append("|".join(map(str, [relative, stat.st_size, stat.st_mtime_ns, *fields])))
    digest.update("".join(f"{entry}\n" for entry in sorted(entries)).encode())
    return digest.hexdigest()


def _dataset_for(manifest: pd.DataFrame) -> str:
    """The dataset's name; a subset gets a name of its own, so it never takes the full set's cache."""
    dataset = manifest.attrs.get("dataset")
    if dataset and manifest.attrs.get("rows") == len(manifest):
        return dataset
    subset = hashlib.sha256("\n".join(sorted(manifest["path"])).encode()).hexdigest()[:8]
    return f"{dataset}_subset-{subset}" if dataset else f"manifest-{subset}"


def _create_npy(path: Path, shape: tuple[int, ...]) -> int:
    """A uint8 ``.npy`` file of ``shape``, zeros until written; returns the byte at which its rows start."""
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
        first = file.tell()
        file.truncate(first + int(np.prod(shape)))
    return first


def _write_rows(path: Path, first: int, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` in place as rows ``start…`` of the ``.npy`` file whose rows start at byte ``first``."""
    with open(path, "r+b") as file:  # a handle of its own: threads write other rows of the file at once
        file.seek(first + start * rows[0].nbytes)
        file.write(rows.data)


def _prepare_chunk(start: int, paths: list[str], settings: Settings, buffers: queue.SimpleQueue,
                   files: list[tuple[Path, int]]) -> tuple[list[str], Errors]:
    """Prepare rows ``start…`` into a reused pair of chunk buffers, written into ``files`` (images.npy and masks.npy,
    each with the byte at which its rows start); returns their pixel digests and the errors."""
    images, masks = buffers.get()
    try:
        digests, errors = [""] * len(paths), []
        for row, path in enumerate(paths):
            try:
                decoded = read_bgr(path)
                image, masks[row] = preprocess_image(decoded, *settings)
            except ImageError as error:  # the row keeps stale pixels: it is left out or the run fails
                errors.append((start + row, path, str(error) if path in str(error) else f"{path}: {error}"))
            except OSError as error:
                errors.append((start + row, path, f"{path} cannot be read ({error}); check the file and its "
                                                  "permissions"))
            else:
                cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=images[row])  # the small output, not the input
                digests[row] = pixel_digest(decoded, bgr=True)  # OpenCV's order: hashed without a copy
        for (path, first), rows in zip(files, (images, masks)):
            _write_rows(path, first, start, rows[:len(paths)])
        return digests, errors
    finally:
        buffers.put((images, masks))


def _fill(folder: Path, paths: list[str], settings: Settings, workers: int, skip_bad: bool, progress: bool,
          desc: str) -> tuple[list[str], Errors]:
    """Prepare every path on a thread pool into images.npy and masks.npy; returns the digests and the errors, stopping
    at the first chunk with a bad image unless ``skip_bad``. Each worker reuses one chunk buffer: no fresh pages per
    chunk (page faults cost more than the pixels here), no memory map filled page by page."""
    n, size = len(paths), settings[0]
    shapes = {folder / "images.npy": (n, size, size, 3), folder / "masks.npy": (n, size, size)}
    files = [(path, _create_npy(path, shape)) for path, shape in shapes.items()]
    buffers, starts = queue.SimpleQueue(), range(0, n, CHUNK)
    threads = min(workers, len(starts))
    for _ in range(threads):  # one pair per thread
        buffers.put(tuple(np.zeros((CHUNK, *shape[1:]), np.uint8) for shape in shapes.values()))
    digests, errors = [], []
    with quiet_opencv(), futures.ThreadPoolExecutor(threads) as pool, \
            tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        jobs = [pool.submit(_prepare_chunk, start, paths[start:start + CHUNK], settings, buffers, files)
                for start in starts]
        try:
            for job in jobs:
                chunk_digests, chunk_errors = job.result()
                digests += chunk_digests
                errors += chunk_errors
                bar.update(len(chunk_digests))
                if chunk_errors and not skip_bad:
                    break
        finally:  # a bad image, an interrupt: drop the chunks not started
            for job in jobs:
                job.cancel()
    return digests, errors


def _compact(folder: Path, keep: np.ndarray) -> None:
    """Rewrite images/masks.npy keeping only the rows in ``keep``, 512 at a time (memory stays bounded)."""
    for name in ARRAYS[:2]:
        full = np.load(folder / f"{name}.npy", mmap_mode="r")
        kept = np.lib.format.open_memmap(folder / "kept.npy", "w+", full.dtype, (len(keep), *full.shape[1:]))
        for begin in range(0, len(keep), 512):
            kept[begin:begin + 512] = full[keep[begin:begin + 512]]
        del kept, full  # flushed and unmapped before the rename
        os.replace(folder / "kept.npy", folder / f"{name}.npy")


def _as_manifest(data) -> pd.DataFrame:
    """A dataset folder scanned, or a manifest table checked."""
    if isinstance(data, pd.DataFrame):
        missing = [c for c in config.MANIFEST_COLUMNS if c not in data.columns]
        if missing:
            raise DatasetError(f"the manifest table lacks columns {missing}; pass the table scan_dataset returns")
        manifest = data[list(config.MANIFEST_COLUMNS)].reset_index(drop=True)
        manifest.attrs = dict(data.attrs)
    else:
        manifest = scan_dataset(data)
    if manifest.empty:
        raise DatasetError("the manifest is empty: there are no images to prepare")
    return manifest


def _write_arrays(folder: Path, manifest: pd.DataFrame, settings: Settings, workers: int, skip_bad: bool,
                  progress: bool, desc: str) -> tuple[pd.DataFrame, list[dict]]:
    """images/masks/labels.npy and manifest.csv into ``folder``; returns the manifest kept and the files skipped."""
    n = len(manifest)
    digests, errors = _fill(folder, manifest["path"].tolist(), settings, workers, skip_bad, progress, desc)
    if errors and (not skip_bad or len(errors) == n):
        listed = "\n  ".join(message for _, _, message in errors[:10])
        more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ImageError(f"{len(errors)} image(s) cannot be used:\n  {listed}{more}\nFix or remove them, or leave "
                         "them out with --skip-bad (skip_bad=True); skipped files are listed in meta.json.")
    manifest = manifest.assign(**{DIGEST_COLUMN: digests})
    if errors:
        keep = np.setdiff1d(np.arange(n), [row for row, _, _ in errors])
        _compact(folder, keep)
        manifest = manifest.iloc[keep].reset_index(drop=True)
    np.save(folder / "labels.npy", manifest["label"].fillna(-1).to_numpy(dtype=np.int8))
    write_manifest(manifest.astype(MANIFEST_DTYPES), folder / "manifest.csv")
    return manifest, [{"path": path, "error": message} for _, path, message in errors]


def remove_staging(target: Path) -> list[Path]:
    """Remove the staging folders of ``target`` killed prepares left; only while holding the lock of ``target``."""
    name = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.partial")  # tempfile's random part
    left = [folder for folder in target.parent.glob(".*.partial") if folder.is_dir() and name.fullmatch(folder.name)]
    for folder in left:
        shutil.rmtree(folder, ignore_errors=True)
    return left


def _is_cached(folder: Path, digest: str, skip_bad: bool) -> bool:
    try:
        meta = load_arrays(folder).meta
    except (OSError, ValueError):
        return False
    # A cache with skipped files is rebuilt for a call that did not ask to skip: it raises as a first run would.
    return meta.get("digest") == digest and (skip_bad or not meta.get("skipped"))


def prepare_arrays(data, size: int = config.DEFAULT_IMAGE_SIZE, output_dir: str | os.PathLike | None = None,
                   skip_bad: bool = False, workers: int | None = None, progress: bool = True,
                   margin: int = config.DEFAULT_MARGIN, canvas: int = config.DEFAULT_CANVAS) -> Path:
    """Prepare (or reuse) the cached arrays of a dataset folder or manifest table, each cell through
    ``preprocess_image``; returns ``config.arrays_dir(...)``. ``skip_bad`` leaves unusable images out (listed in
    ``meta.json["skipped"]``) instead of raising ImageError naming them."""
    manifest, threshold = _as_manifest(data), config.BACKGROUND_THRESHOLD
    check_settings(size, margin, threshold, canvas)
    settings = (int(size), int(margin), threshold, int(canvas))
    source, dataset = _source_root(manifest), _dataset_for(manifest)
    target = config.arrays_dir(dataset, size, output_dir, canvas=canvas, margin=margin)
    digest = compute_digest(manifest, settings, source)
    if _is_cached(target, digest, skip_bad):
        return target
    synthetic = bool(manifest.attrs.get("synthetic", is_synthetic(source)))
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".{target.name}.lock", f"the arrays folder {target}", wait=True):
        if _is_cached(target, digest, skip_bad):  # prepared by the process this one waited for
            return target
        remove_staging(target)
        with staged_folder(target) as staged:
            desc = f"{'SYNTHETIC ' if synthetic else ''}{dataset} @ {size}px"
            manifest, skipped = _write_arrays(staged.path, manifest, settings, max(1, workers or default_workers()),
                                              skip_bad, progress, desc)
            labels = manifest["label"].fillna(-1)
            write_json_atomic(staged.path / "meta.json", {
                "size": settings[0], "margin": settings[1], "background_threshold": threshold, "canvas": settings[3],
                "source": str(source), "dataset": dataset, "count": len(manifest),
                "counts": {"all": int((labels == 1).sum()), "hem": int((labels == 0).sum()),
                           "unlabeled": int((labels == -1).sum())},
                "digest": digest, "skipped": skipped, "synthetic": synthetic, "meta_version": META_VERSION,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    return target


def load_arrays(arrays_dir: str | os.PathLike) -> PreparedArrays:
    """Open a folder ``prepare_arrays`` made (memory-mapped, read-only); SchemaError naming the file where meta.json
    or an array is not what ``prepare_arrays`` writes (a pickled ``.npy``, a wrong type or row count)."""
    folder = Path(arrays_dir)
    missing = [name for name in (*(f"{n}.npy" for n in ARRAYS), "manifest.csv", "meta.json")
               if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete arrays folder (missing {', '.join(missing)}); "
                                "run `python -m modules prepare --data DIR` again")
    fix = f"delete {folder} and run `python -m modules prepare --data DIR` again"
    meta = schema.read_json(folder / "meta.json", schema.META, fix)
    side = meta["size"]
    arrays = {name: _open_array(folder / f"{name}.npy", dtype, shape, fix)
              for name, (dtype, shape) in {"images": (np.uint8, (side, side, 3)), "masks": (np.uint8, (side, side)),
                                           "labels": (np.int8, ())}.items()}
    manifest = read_manifest(folder / "manifest.csv")
    manifest.attrs.update({"dataset": meta.get("dataset"), "source": meta.get("source"),
                           "synthetic": meta.get("synthetic", False), "rows": len(manifest)})
    if {*(len(a) for a in arrays.values()), len(manifest)} != {meta.get("count")}:
        raise schema.SchemaError(f"{folder}: arrays, manifest and meta.json disagree on the row count; {fix}")
    return PreparedArrays(manifest=manifest, meta=meta, path=folder, **arrays)


def _open_array(file: Path, dtype: type, shape: tuple[int, ...], fix: str) -> np.ndarray:
    """A read-only memory map of one ``.npy`` of the cache, checked to be (N, *shape) of ``dtype``."""
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)  # never unpickle: a .npy may come from anywhere
    except (ValueError, OSError, EOFError) as error:  # pickled, truncated or not a .npy at all
        raise schema.SchemaError(f"{file} is not an array file written by prepare ({error}); {fix}") from error
    if array.dtype != dtype or array.shape[1:] != shape:
        wanted = "(N" + "".join(f", {side}" for side in shape) + ")"
        raise schema.SchemaError(f"{file} holds {array.dtype} of shape {array.shape}, not {np.dtype(dtype)} of "
                                 f"shape {wanted}; {fix}")
    return array
