"""Benchmark ``prepare_arrays`` against a plain cv2 loop and the read-bytes floor.

The 3,526 shared real cells (``../shared/data/cnmc``, PNG) are converted once to BMP copies
in a temporary folder in the Kaggle layout (not timed; BMP is what the Kaggle download holds).
The page cache is warmed by reading every file once, then each method runs in a fresh
subprocess, so its peak memory is its own:

- ``floor``: read every file's bytes (``open().read()``), nothing else;
- ``cv2_loop``: the older project's loop, ``cv2.imread`` + ``cv2.resize`` to 128 px, appended
  to a list and stacked (no crop, no mask);
- ``prepare``: ``modules.preprocess.prepare_arrays`` end to end (scan, digest, decode, crop,
  mask, resize, memory-mapped .npy, manifest, meta), from an empty output folder, with its
  default thread pool and the C kernel (``modules/native.py``; built once per machine before
  any timing, like the imports: its one-time build is timed and printed separately);
- ``prepare_cached``: the same call again (the cache is reused);
- ``prepare_processes``: ``prepare_arrays`` with a process pool instead of its default threads
  (comparison);
- ``prepare_numpy``: ``prepare_arrays`` with ``ANNA_NATIVE=0``, the NumPy reference that runs
  where no C compiler is found (same bytes, slower);
- ``floor_parallel``: the floor split over all cores (one process each, pool started before
  the clock): how much faster reading gets in parallel here;
- ``read_rowmax_parallel``: as ``floor_parallel`` plus one pass over each image's bytes (the
  maximum of every row, the least any cropping must do): a lower bound for ``prepare`` on this
  machine, which also finds the column extent, resizes, writes 230 MB of arrays, scans and digests.

Wall time is what the targets are about; CPU time (user + system, all threads and children)
is printed beside it because it stays meaningful when other jobs share the cores.

Peak memory is the largest total RSS of the process and its children, sampled every 10 ms
(psutil). Usage::

    python benchmarks/bench_prepare.py [--size 128] [--repeats 3] [--bmp-dir DIR] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from modules import config  # noqa: E402


METHODS = ("floor", "cv2_loop", "prepare", "prepare_cached", "prepare_processes", "prepare_numpy",
           "floor_parallel", "read_rowmax_parallel")


def _read_files(paths: list[str]) -> int:
    """Read each file's bytes; returns the total."""
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += len(handle.read())
    return total


def _read_rowmax(paths: list[str]) -> int:
    """Read each file and take the maximum of every pixel row (one pass over the bytes)."""
    from modules.preprocessing.cells import _view_bmp24

    cell_rows = 0
    for path in paths:
        with open(path, "rb") as handle:
            image = _view_bmp24(handle.read(), path)
        cell_rows += int((image.reshape(image.shape[0], -1).max(axis=1) > config.BACKGROUND_THRESHOLD).sum())
    return cell_rows


def _convert(job: tuple[str, str]) -> None:
    import cv2

    source, target = job
    image = cv2.imread(source, cv2.IMREAD_UNCHANGED)
    if not cv2.imwrite(target + ".partial.bmp", image):
        raise OSError(f"cannot write {target}")
    os.replace(target + ".partial.bmp", target)


def make_bmp_copies(source_root: Path, bmp_root: Path) -> Path:
    """Convert the shared PNG cells to BMP once (Kaggle layout); reuse a complete copy."""
    sources = sorted(source_root.glob("training_data/fold_*/*/*.png"))
    if not sources:
        raise FileNotFoundError(f"no PNG cells under {source_root}")
    dataset = bmp_root / config.DATASET_FOLDER_NAME
    jobs = []
    for source in sources:
        target = dataset / source.relative_to(source_root).with_suffix(".bmp")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(source), str(target)))
    if jobs:
        print(f"converting {len(jobs)} PNG cells to BMP in {dataset} (once, not timed)…", flush=True)
        with ProcessPoolExecutor() as pool:
            list(pool.map(_convert, jobs, chunksize=32))
    return dataset


def _paths(dataset: Path) -> list[str]:
    return sorted(str(p) for p in dataset.glob("training_data/fold_*/*/*.bmp"))


def measure(method: str, dataset: Path, size: int, workers: int | None, out: Path) -> dict:
    """Run one method in this process; returns images, seconds."""
    paths = _paths(dataset)
    # Libraries are imported before the clock starts: we time the work, not the interpreter.
    import cv2
    import numpy as np
    import pandas
    import tqdm.auto

    from modules import native
    from modules.data import layout as data
    from modules.preprocessing import cells as preprocess

    assert pandas and data and tqdm.auto  # imported for their import time only
    if method == "prepare_numpy":  # the fallback where no C compiler is found
        os.environ["ANNA_NATIVE"] = "0"
    # Like the imports: the C kernel is built once per machine (main() times that build) and
    # only loaded here.
    native.kernel()

    if method == "prepare_processes":
        preprocess.EXECUTOR = "process"
    pool = None
    if method.endswith("_parallel"):  # started (and warmed) before the clock, like the imports
        import multiprocessing

        cores = preprocess._default_workers()
        pool = ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork"))
        list(pool.map(len, [[0]] * cores))  # the workers exist before the clock starts
        shares = [paths[i::cores] for i in range(cores)]
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if method == "floor":
        _read_files(paths)
    elif method in ("floor_parallel", "read_rowmax_parallel"):
        list(pool.map(_read_files if method == "floor_parallel" else _read_rowmax, shares))
    elif method == "cv2_loop":
        images = []
        for path in paths:
            images.append(cv2.resize(cv2.imread(path), (size, size)))
        images = np.array(images)
    elif method in ("prepare", "prepare_cached", "prepare_processes", "prepare_numpy"):
        output = out / method if method in ("prepare_processes", "prepare_numpy") else out
        preprocess.prepare_arrays(dataset, size=size, output_dir=output, workers=workers, progress=False)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    if pool is not None:
        pool.shutdown()
    return {"method": method, "images": len(paths), "seconds": seconds,
            "cpu_seconds": _cpu_seconds() - cpu_start}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (all threads)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def build_kernel() -> str:
    """Time one build of the C kernel into a throwaway folder (what a first run on a new machine
    pays once), and make sure the real cached one exists before anything is timed."""
    from modules import native

    compiler = native._compiler()
    if compiler is None:
        return "C kernel: no C compiler found; prepare runs the NumPy reference"
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        native._build(compiler, Path(folder) / "kernel.so")
        seconds = time.perf_counter() - start
    native.kernel()
    return f"C kernel: one-time build {seconds:.2f} s with {compiler}; {native.status()}"


def run_isolated(method: str, dataset: Path, size: int, workers: int | None, out: Path) -> dict:
    """Run ``measure`` in a fresh interpreter and sample its memory (with children)."""
    command = [sys.executable, __file__, "--measure", method, "--bmp-dir", str(dataset.parent),
               "--size", str(size), "--out", str(out)] + (["--workers", str(workers)] if workers else [])
    process = psutil.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.01)
    output = process.stdout.read()
    if process.returncode:
        raise RuntimeError(f"{method} failed ({process.returncode}): {output}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best is reported (default: 3)")
    parser.add_argument("--bmp-dir", type=Path, default=Path(tempfile.gettempdir()) / "anna_bench_bmp",
                        help="where the BMP copies are made once and kept (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="prepare_arrays workers (default: all cores)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="methods to run (default: all)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # child process: one method, one JSON line
        dataset = args.bmp_dir / config.DATASET_FOLDER_NAME
        print(json.dumps(measure(args.measure, dataset, args.size, args.workers, args.out)))
        return

    dataset = make_bmp_copies(config.SHARED_DATA_DIR / "cnmc", args.bmp_dir)
    paths = _paths(dataset)
    for path in paths:  # warm the page cache so every method reads from memory
        Path(path).read_bytes()
    print(build_kernel(), flush=True)
    load = os.getloadavg()
    print(f"{len(paths)} BMP cells, {args.size} px, {os.cpu_count()} CPUs, load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="anna_bench_out_"))
        try:
            for method in args.methods:
                result = run_isolated(method, dataset, args.size, args.workers, out)
                print(f"  run {repeat + 1} {method:17s} {result['seconds']:6.2f} s  "
                      f"{result['images'] / result['seconds']:7.0f} img/s  cpu {result['cpu_seconds']:6.2f} s  "
                      f"peak {result['peak_rss_mb']:6.0f} MB", flush=True)
                if method not in best or result["seconds"] < best[method]["seconds"]:
                    best[method] = result
        finally:
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nbest of {args.repeats}:")
    print(f"{'method':18s} {'seconds':>8s} {'img/s':>8s} {'cpu s':>8s} {'peak MB':>8s}")
    for method, result in best.items():
        print(f"{method:18s} {result['seconds']:8.2f} {result['images'] / result['seconds']:8.0f} "
              f"{result['cpu_seconds']:8.2f} {result['peak_rss_mb']:8.0f}")
    if not {"prepare", "cv2_loop", "floor"} <= set(best):
        return
    prepare, loop, floor = best["prepare"]["seconds"], best["cv2_loop"]["seconds"], best["floor"]["seconds"]
    print(f"\nprepare vs cv2 loop: {loop / prepare:.2f}x as fast ({'OK' if prepare <= loop else 'SLOWER'})")
    print(f"prepare vs read-bytes floor: {prepare / floor:.2f}x the floor's time "
          f"({'OK' if prepare <= 2 * floor else 'over 2x'})")
    print(f"prepare peak memory: {best['prepare']['peak_rss_mb']:.0f} MB "
          f"({'OK' if best['prepare']['peak_rss_mb'] < 1024 else 'over 1 GB'})")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
