"""Benchmark ``prepare_arrays`` against a plain ``cv2.imread`` + ``cv2.resize`` loop on the same cells.

The 3,526 shared real cells (``../shared/data/cnmc``, PNG) are converted once to BMP copies in
the Kaggle layout (not timed; BMP is what the Kaggle download holds), and the page cache is
warmed by reading every file. Then, in one run, best of ``--repeats``:

- ``floor``: read every file's bytes, nothing else;
- ``cv2_loop``: ``cv2.imread`` + ``cv2.resize`` to the size (bilinear, no crop, no mask), stacked;
- ``prepare``: ``preprocessing.prepare_arrays`` end to end (scan, digest, decode, crop, resize,
  mask, memory-mapped .npy, manifest, meta) into an empty output folder, with its thread pool;
- ``prepare_cached``: the same call again (the cache is reused).

Wall time is what the target is about (prepare at least as fast as the loop); CPU time (user +
system, all threads) is printed beside it because it stays meaningful when other jobs share the cores.
Usage::

    python benchmarks/bench_prepare.py [--size 128] [--repeats 3] [--bmp-dir DIR] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules import config, preprocessing  # noqa: E402


def make_bmp_copies(source_root: Path, bmp_root: Path) -> Path:
    """Convert the shared PNG cells to BMP once (Kaggle layout); reuse the copies already made."""
    sources = sorted(source_root.glob("training_data/fold_*/*/*.png"))
    if not sources:
        raise FileNotFoundError(f"no PNG cells under {source_root}")
    dataset = bmp_root / config.DATASET_FOLDER_NAME
    jobs = [(source, dataset / source.relative_to(source_root).with_suffix(".bmp")) for source in sources]
    jobs = [(source, target) for source, target in jobs if not target.exists()]
    if jobs:
        print(f"converting {len(jobs)} PNG cells to BMP in {dataset} (once, not timed)…", flush=True)

        def convert(job: tuple[Path, Path]) -> None:
            source, target = job
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial.bmp")
            if not cv2.imwrite(str(partial), cv2.imread(str(source), cv2.IMREAD_UNCHANGED)):
                raise OSError(f"cannot write {partial}")
            os.replace(partial, target)

        with ThreadPoolExecutor() as pool:
            list(pool.map(convert, jobs))
    return dataset


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_bytes(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            handle.read()


def cv2_loop(paths: list[str], size: int) -> np.ndarray:
    return np.stack([cv2.resize(cv2.imread(path), (size, size)) for path in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best is reported (default: 3)")
    parser.add_argument("--bmp-dir", type=Path, default=Path(tempfile.gettempdir()) / "anna_bench_bmp",
                        help="where the BMP copies are made once and kept (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="prepare_arrays threads (default: one per core)")
    args = parser.parse_args()

    dataset = make_bmp_copies(config.SHARED_DATA_DIR / "cnmc", args.bmp_dir)
    paths = sorted(str(p) for p in dataset.glob("training_data/fold_*/*/*.bmp"))
    read_bytes(paths)  # warm the page cache: every method reads from memory
    workers = args.workers or preprocessing.default_workers()
    print(f"{len(paths)} BMP cells, {args.size} px, {workers} prepare threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    output = Path(tempfile.mkdtemp(prefix="anna_bench_out_"))
    methods = {
        "floor": lambda: read_bytes(paths),
        "cv2_loop": lambda: cv2_loop(paths, args.size),
        "prepare": lambda: preprocessing.prepare_arrays(dataset, size=args.size, output_dir=output, workers=workers,
                                                        progress=False),
        "prepare_cached": lambda: preprocessing.prepare_arrays(dataset, size=args.size, output_dir=output,
                                                               workers=workers, progress=False),
    }
    best: dict[str, tuple[float, float]] = {}
    try:
        for repeat in range(args.repeats):
            shutil.rmtree(output / config.ARRAYS_SUBDIR, ignore_errors=True)  # prepare starts from nothing
            for method, run in methods.items():
                start, cpu_start = time.perf_counter(), cpu_seconds()
                run()
                seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
                print(f"  run {repeat + 1} {method:15s} {seconds:6.2f} s  {len(paths) / seconds:7.0f} img/s  "
                      f"cpu {cpu:6.2f} s", flush=True)
                best[method] = min(best.get(method, (seconds, cpu)), (seconds, cpu))
    finally:
        shutil.rmtree(output, ignore_errors=True)
    print(f"\nbest of {args.repeats}:\n{'method':15s} {'seconds':>8s} {'img/s':>8s} {'cpu s':>8s}")
    for method, (seconds, cpu) in best.items():
        print(f"{method:15s} {seconds:8.2f} {len(paths) / seconds:8.0f} {cpu:8.2f}")
    prepare, loop, floor = best["prepare"][0], best["cv2_loop"][0], best["floor"][0]
    print(f"\nprepare vs cv2 loop: {loop / prepare:.2f}x as fast ({'OK' if prepare <= loop else 'SLOWER'}); "
          f"{prepare / floor:.1f}x the read-bytes floor; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
