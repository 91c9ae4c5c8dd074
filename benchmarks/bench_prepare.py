"""Benchmark ``prepare_arrays`` against a plain ``cv2.imread`` + ``cv2.resize`` loop on the same cells.

The shared real cells (``../shared/data/cnmc``, PNG) are converted once to BMP (the Kaggle download's format;
not timed). Each method runs in a fresh process, after its imports and with the page cache warmed; the best of
``--repeats`` is reported: ``floor`` (read every file's bytes), ``cv2_loop`` (imread + bilinear resize, stacked),
``cv2_area_loop`` (the same with INTER_AREA), ``prepare`` (end to end into an empty folder, its thread pool) and
``prepare_cached`` (the same call again). Wall time is the target; CPU time (all threads) is printed beside it
because it stays meaningful when other jobs share the cores.

    python benchmarks/bench_prepare.py [--size 128] [--repeats 3] [--bmp-dir DIR] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules import config, preprocessing  # noqa: E402

METHODS = ("floor", "cv2_loop", "cv2_area_loop", "prepare", "prepare_cached")


def make_bmp_copies(source_root: Path, bmp_root: Path) -> Path:
    """The shared PNG cells as BMP in the Kaggle layout, converted once."""
    sources = sorted(source_root.glob("training_data/fold_*/*/*.png"))
    if not sources:
        raise FileNotFoundError(f"no PNG cells under {source_root}")
    dataset = bmp_root / config.DATASET_FOLDER_NAME
    jobs = [(s, dataset / s.relative_to(source_root).with_suffix(".bmp")) for s in sources]
    jobs = [(source, target) for source, target in jobs if not target.exists()]

    def convert(job: tuple[Path, Path]) -> None:
        source, target = job
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.bmp")
        if not cv2.imwrite(str(partial), cv2.imread(str(source), cv2.IMREAD_UNCHANGED)):
            raise OSError(f"cannot write {partial}")
        os.replace(partial, target)

    if jobs:
        print(f"converting {len(jobs)} PNG cells to BMP in {dataset} (once, not timed)…", flush=True)
        with ThreadPoolExecutor() as pool:
            list(pool.map(convert, jobs))
    return dataset


def read_bytes(paths: list[str]) -> None:
    for path in paths:
        Path(path).read_bytes()


def cv2_loop(paths: list[str], size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    return np.stack([cv2.resize(cv2.imread(path), (size, size), interpolation=interpolation) for path in paths])


def measure(method: str, dataset: Path, size: int, workers: int, output: Path) -> dict:
    """Time one method in this (fresh) process."""
    paths = sorted(str(p) for p in dataset.glob("training_data/fold_*/*/*.bmp"))
    runs = {"floor": lambda: read_bytes(paths), "cv2_loop": lambda: cv2_loop(paths, size),
            "cv2_area_loop": lambda: cv2_loop(paths, size, cv2.INTER_AREA),
            "prepare": lambda: preprocessing.prepare_arrays(dataset, size=size, output_dir=output, workers=workers,
                                                            progress=False)}
    read_bytes(paths)  # other jobs may have pushed some files out of the page cache meanwhile
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    runs[method.removesuffix("_cached")]()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"images": len(paths), "seconds": seconds, "peak_mb": after.ru_maxrss / 1024,
            "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best is reported (default: 3)")
    parser.add_argument("--bmp-dir", type=Path, default=Path(tempfile.gettempdir()) / "anna_bench_bmp",
                        help="where the BMP copies are made once and kept (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="prepare_arrays threads (default: one per core)")
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)  # in a child process: one method
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workers = args.workers or preprocessing.default_workers()
    if args.measure:
        dataset = args.bmp_dir / config.DATASET_FOLDER_NAME
        print(json.dumps(measure(args.measure, dataset, args.size, workers, args.out)))
        return
    make_bmp_copies(config.SHARED_DATA_DIR / "cnmc", args.bmp_dir)
    print(f"{args.size} px, {workers} prepare threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; each method in a fresh process", flush=True)
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="anna_bench_out_") as output:  # prepare starts from nothing
            for method in METHODS:
                command = [sys.executable, __file__, "--measure", method, "--size", str(args.size), "--workers",
                           str(workers), "--bmp-dir", str(args.bmp_dir), "--out", output]
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                print(f"  run {repeat + 1} {method:15s} {result['seconds']:6.2f} s  cpu {result['cpu']:6.2f} s  "
                      f"peak {result['peak_mb']:5.0f} MB", flush=True)
                if result["seconds"] < best.get(method, {"seconds": float("inf")})["seconds"]:
                    best[method] = result
    print(f"\n{best['floor']['images']} BMP cells, best of {args.repeats}:\n"
          f"{'method':15s} {'seconds':>8s} {'img/s':>8s} {'cpu s':>8s} {'peak MB':>8s}")
    for method, result in best.items():
        print(f"{method:15s} {result['seconds']:8.2f} {result['images'] / result['seconds']:8.0f} "
              f"{result['cpu']:8.2f} {result['peak_mb']:8.0f}")
    prepare, loop, floor = (best[m]["seconds"] for m in ("prepare", "cv2_loop", "floor"))
    print(f"\nprepare vs cv2 loop: {loop / prepare:.2f}x as fast ({'OK' if prepare <= loop else 'SLOWER'}); "
          f"{prepare / floor:.1f}x the read-bytes floor; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
