"""The arrays cache: every cell of a dataset prepared once into memory-mapped ``.npy`` files.

``prepare_arrays`` writes ``output/arrays/<dataset>_<size>/``: ``images.npy`` (N,S,S,3) uint8 RGB,
``masks.npy`` (N,S,S) uint8 0/1, ``labels.npy`` (N,) int8 (1 all, 0 hem, -1 unlabeled),
``manifest.csv`` (row i = array row i) and ``meta.json``. A thread pool fills the memory maps
chunk by chunk (OpenCV and NumPy release the GIL) in a staging folder that is renamed into place
only when complete. A second call on unchanged files returns the cached folder.
"""
from __future__ import annotations

import concurrent.futures as futures
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from modules import config
from modules.files import make_public, write_json_atomic
from modules.preprocessing.cells import ImageError, check_settings, preprocess_image, quiet_opencv, read_bgr

#: Part of the cache digest: bump it whenever the pixels ``preprocess_image`` produces change, so
#: that arrays cached by older code are rebuilt rather than trusted (4: OpenCV's INTER_AREA resize).
META_VERSION = 4
ARRAY_NAMES = ("images", "masks", "labels")


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


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def source_root(manifest: pd.DataFrame) -> Path:
    """The dataset folder a manifest was scanned from (else its files' common folder)."""
    source = manifest.attrs.get("source")
    return Path(source) if source else Path(os.path.commonpath([str(Path(p).parent) for p in manifest["path"]]))


def compute_digest(manifest: pd.DataFrame, size: int, margin: int, threshold: int = config.BACKGROUND_THRESHOLD,
                   root: Path | None = None, canvas: int = config.DEFAULT_CANVAS) -> str:
    """sha256 of everything ``prepare_arrays`` reads: the settings, ``META_VERSION`` and, per file
    sorted by path relative to ``root``, its path, size, mtime and manifest fields (so a changed
    labels CSV changes it too)."""
    prefix = str(root or source_root(manifest)).rstrip(os.sep) + os.sep
    digest = hashlib.sha256(f"v{META_VERSION}|{size}|{margin}|{threshold}|canvas={int(canvas)}\n".encode())
    entries = []
    columns = [manifest[c].tolist() for c in ("path", "original_name", "patient_id", "label", "split", "fold")]
    for path, *fields in zip(*columns):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}; scan the dataset again") from None
        relative = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, prefix)
        entries.append("|".join(map(str, [relative, stat.st_size, stat.st_mtime_ns, *fields])))
    for entry in sorted(entries):
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()


def _dataset_for(manifest: pd.DataFrame) -> str:
    """The dataset's name; a subset of it gets a name of its own, so it never takes the full set's cache."""
    dataset = manifest.attrs.get("dataset")
    if dataset and manifest.attrs.get("rows") == len(manifest):
        return dataset
    subset = hashlib.sha256("\n".join(sorted(manifest["path"])).encode()).hexdigest()[:8]
    return f"{dataset}_subset-{subset}" if dataset else f"manifest-{subset}"


def _cache_is_valid(folder: Path, digest: str, skip_bad: bool) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        counts = [np.load(folder / f"{n}.npy", mmap_mode="r").shape[0] for n in ARRAY_NAMES]
    except (OSError, ValueError):
        return False
    if meta.get("skipped") and not skip_bad:
        return False  # rebuild, which raises on the bad files as a first run would
    return meta.get("digest") == digest and counts == [meta.get("count")] * 3


def _prepare_chunk(start: int, paths: list[str], images: np.ndarray, masks: np.ndarray,
                   settings: tuple[int, int, int, int]) -> tuple[int, list[tuple[int, str, str]]]:
    """Prepare rows ``start…`` into the memory maps; returns how many and the errors (row, path, message)."""
    errors = []
    for row, path in enumerate(paths, start):
        try:
            image, mask = preprocess_image(read_bgr(path), *settings)
        except ImageError as error:
            errors.append((row, path, str(error) if path in str(error) else f"{path}: {error}"))
        except OSError as error:
            errors.append((row, path, f"{path} cannot be read ({error}); check the file and its permissions"))
        else:
            images[row] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # converted small: cheaper than the input
            masks[row] = mask
    return len(paths), errors


def _fill(paths: list[str], images: np.ndarray, masks: np.ndarray, settings: tuple[int, int, int, int],
          workers: int, skip_bad: bool, progress: bool, desc: str) -> list[tuple[int, str, str]]:
    """Prepare every path with a thread pool, chunk by chunk; stops at the first bad chunk unless ``skip_bad``."""
    from tqdm.auto import tqdm

    chunk = max(8, min(64, math.ceil(len(paths) / (workers * 8))))
    errors = []
    # OpenCV's log level is process-wide: silenced once around the whole run.
    with quiet_opencv(), futures.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        jobs = [pool.submit(_prepare_chunk, start, paths[start:start + chunk], images, masks, settings)
                for start in range(0, len(paths), chunk)]
        try:
            for job in futures.as_completed(jobs):
                count, chunk_errors = job.result()
                errors += chunk_errors
                bar.update(count)
                if chunk_errors and not skip_bad:
                    break
        finally:  # a bad image, an interrupt: drop the chunks not started
            for job in jobs:
                job.cancel()
    return sorted(errors)


def _bad_images_error(errors: list[tuple[int, str, str]]) -> ImageError:
    listed = "\n  ".join(message for _, _, message in errors[:10])
    more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
    return ImageError(f"{len(errors)} image(s) cannot be used:\n  {listed}{more}\nFix or remove them, or leave them "
                      "out with --skip-bad (skip_bad=True); skipped files are listed in meta.json.")


def _compact(folder: Path, keep: np.ndarray) -> None:
    """Rewrite images/masks.npy keeping only the rows in ``keep``, chunk by chunk (memory stays bounded)."""
    for name in ("images", "masks"):
        full = np.load(folder / f"{name}.npy", mmap_mode="r")
        kept = np.lib.format.open_memmap(folder / f"{name}.kept.npy", mode="w+", dtype=full.dtype,
                                         shape=(len(keep), *full.shape[1:]))
        for begin in range(0, len(keep), 512):
            kept[begin:begin + 512] = full[keep[begin:begin + 512]]
        del kept, full  # flushed and unmapped before the rename
        os.replace(folder / f"{name}.kept.npy", folder / f"{name}.npy")


def _publish(staging: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an older cache."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".partial", dir=target.parent))
        os.replace(target, trash / target.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staging, target)


def _as_manifest(data) -> pd.DataFrame:
    """A dataset folder scanned, or a manifest table checked and copied."""
    from modules.data.layout import DatasetError, scan_dataset

    if not isinstance(data, pd.DataFrame):
        manifest = scan_dataset(data)
    else:
        missing = [c for c in config.MANIFEST_COLUMNS if c not in data.columns]
        if missing:
            raise DatasetError(f"the manifest table lacks columns {missing}; pass the table scan_dataset returns")
        manifest = data[list(config.MANIFEST_COLUMNS)].reset_index(drop=True)
        manifest.attrs = dict(data.attrs)
    if manifest.empty:
        raise DatasetError("the manifest is empty: there are no images to prepare")
    return manifest


def prepare_arrays(data, size: int = config.DEFAULT_IMAGE_SIZE, output_dir: str | os.PathLike | None = None,
                   skip_bad: bool = False, workers: int | None = None, progress: bool = True,
                   margin: int = config.DEFAULT_MARGIN, canvas: int = config.DEFAULT_CANVAS) -> Path:
    """Prepare (or reuse) the cached arrays of a dataset, each cell through ``preprocess_image``.

    Args:
        data: Dataset folder (anything ``data.scan_dataset`` accepts) or a manifest table.
        size: Side of the square images in pixels.
        output_dir: Output root (``config.OUTPUT_DIR`` by default); arrays go to ``arrays/``.
        skip_bad: Leave out unusable images (listed in ``meta.json["skipped"]``) instead of raising.
        workers: Threads (``default_workers()``, one per core, by default).
        progress: Show a tqdm progress bar.
        margin: Background pixels kept around each cell (at the source resolution).
        canvas: Smallest side of the square in source pixels (``config.DEFAULT_CANVAS``); 0 crops tightly.

    Returns:
        The arrays folder ``<output_dir>/arrays/<dataset>_<size>`` (``config.arrays_dir``).

    Raises:
        ImageError: An image cannot be used and ``skip_bad`` is False (the bad files found are
            named), or every image was skipped.
        DatasetError, FileNotFoundError: From scanning ``data``.
    """
    from modules.data.layout import MANIFEST_DTYPES, write_manifest
    from modules.data.synthetic import is_synthetic

    manifest = _as_manifest(data)
    threshold = config.BACKGROUND_THRESHOLD
    check_settings(size, margin, threshold, canvas)
    size, margin, canvas = int(size), int(margin), int(canvas)
    source, dataset = source_root(manifest), _dataset_for(manifest)
    synthetic = bool(manifest.attrs.get("synthetic", is_synthetic(source)))
    target = config.arrays_dir(dataset, size, output_dir, canvas=canvas, margin=margin)
    digest = compute_digest(manifest, size, margin, threshold, source, canvas=canvas)
    if _cache_is_valid(target, digest, skip_bad):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    make_public(staging)
    try:
        n = len(manifest)
        images = np.lib.format.open_memmap(staging / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        masks = np.lib.format.open_memmap(staging / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        errors = _fill(manifest["path"].tolist(), images, masks, (size, margin, threshold, canvas),
                       max(1, int(workers or default_workers())), skip_bad, progress,
                       f"{'SYNTHETIC ' if synthetic else ''}{dataset} @ {size}px")
        # No msync: the pages reach the files through the page cache; renaming the folder only
        # after every row is written is what makes a half-written cache impossible.
        del images, masks
        if errors and (not skip_bad or len(errors) == n):
            raise _bad_images_error(errors)
        if errors:
            keep = np.setdiff1d(np.arange(n), [row for row, _, _ in errors])
            _compact(staging, keep)
            manifest = manifest.iloc[keep].reset_index(drop=True)
        labels = manifest["label"].fillna(-1).to_numpy(dtype=np.int8)
        np.save(staging / "labels.npy", labels)
        write_manifest(manifest.astype(MANIFEST_DTYPES), staging / "manifest.csv")
        write_json_atomic(staging / "meta.json", {
            "size": size, "margin": margin, "background_threshold": threshold, "canvas": canvas,
            "source": str(source), "dataset": dataset, "count": len(manifest),
            "counts": {"all": int((labels == 1).sum()), "hem": int((labels == 0).sum()),
                       "unlabeled": int((labels == -1).sum())},
            "digest": digest, "skipped": [{"path": path, "error": message} for _, path, message in errors],
            "synthetic": synthetic, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "meta_version": META_VERSION,
        })
        try:
            _publish(staging, target)
        except OSError:
            if not _cache_is_valid(target, digest, skip_bad):  # lost a race to an identical run?
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_arrays(arrays_dir: str | os.PathLike) -> PreparedArrays:
    """Open a folder ``prepare_arrays`` made (memory-mapped, read-only).

    Raises:
        FileNotFoundError: The folder or one of its files is missing (prepare it again).
        ValueError: Its arrays, manifest and meta.json disagree on the row count.
    """
    from modules.data.layout import read_manifest

    folder = Path(arrays_dir)
    missing = [name for name in (*(f"{n}.npy" for n in ARRAY_NAMES), "manifest.csv", "meta.json")
               if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete arrays folder (missing {', '.join(missing)}); "
                                "run `python -m modules prepare --data DIR` again")
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ARRAY_NAMES}
    manifest = read_manifest(folder / "manifest.csv")
    manifest.attrs.update({"dataset": meta.get("dataset"), "source": meta.get("source"),
                           "synthetic": meta.get("synthetic", False), "rows": len(manifest)})
    if {len(arrays["images"]), len(arrays["masks"]), len(arrays["labels"]), len(manifest)} != {meta.get("count")}:
        raise ValueError(f"{folder}: arrays, manifest and meta.json disagree on the row count; prepare it again")
    return PreparedArrays(manifest=manifest, meta=meta, path=folder, **arrays)
