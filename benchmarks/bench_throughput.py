"""Training throughput of ANNa in float32 beside mixed_bfloat16 (and mixed_float16 on a GPU).

Trains a few batches of random uint8 cells per precision policy, alternating the policies
round by round so that a busy machine slows them alike, and prints images/second side by
side with the policy ``auto`` would pick here.

    python benchmarks/bench_throughput.py [--sizes 64,128] [--batches 8] [--rounds 2]

Writes ``output/benchmarks/throughput/throughput.csv`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules import config  # noqa: E402
from modules.modeling import hardware, training  # noqa: E402  (modules.modeling starts TensorFlow quietly)
from modules.modeling.inputs import make_dataset  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

#: (image size, depth, base filters) configurations measured.
CONFIGS = {64: (3, 8), 96: (4, 8), 128: (4, 8)}


def measure(policy: str, size: int, batch_size: int, batches: int, warmup: int = 2) -> float:
    """Images/second of ``model.fit`` under one policy, after ``warmup`` batches."""
    depth, filters = CONFIGS[size]
    settings = {**training.default_settings(), "image_size": size, "depth": depth, "base_filters": filters}
    rng = np.random.default_rng(0)
    count = batch_size * (warmup + batches)
    images = rng.integers(0, 120, (count, size, size, 3), dtype=np.uint8)
    masks = (images.max(axis=-1) > 4).astype(np.uint8)
    labels = rng.integers(0, 2, count).astype(np.int8)
    with hardware.dtype_policy(policy):
        model = training.build_model(settings)
        training.compile_model(model, settings)
        warm = make_dataset(images, masks, labels, np.arange(batch_size * warmup), batch_size, True)
        timed = make_dataset(images, masks, labels, np.arange(batch_size * warmup, count), batch_size, True)
        model.fit(warm, epochs=1, verbose=0)  # traces the train step
        started = time.perf_counter()
        model.fit(timed, epochs=1, verbose=0)
        seconds = time.perf_counter() - started
    return batch_size * batches / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,128", help="image sizes (64, 96, 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best is reported")
    parser.add_argument("--out", default=str(config.OUTPUT_DIR / "benchmarks" / "throughput"))
    args = parser.parse_args(argv)
    policies = ["float32", "mixed_bfloat16"] + (["mixed_float16"] if tf.config.list_physical_devices("GPU") else [])
    auto = hardware.select_policy("auto")
    flags = hardware.cpu_flags() & set(hardware.BF16_CPU_FLAGS)
    print(f"auto policy here: {hardware.describe_policy(auto)} "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        best: dict[str, float] = {}
        for round_ in range(args.rounds):
            for policy in policies:
                rate = measure(policy, size, args.batch_size, args.batches)
                best[policy] = max(best.get(policy, 0.0), rate)
                print(f"  size {size} round {round_} {policy}: {rate:.1f} img/s", flush=True)
        depth, filters = CONFIGS[size]
        for policy, rate in best.items():
            rows.append({"image_size": size, "depth": depth, "base_filters": filters, "batch_size": args.batch_size,
                         "policy": policy, "train_images_per_second": round(rate, 1),
                         "vs_float32": round(rate / best["float32"], 2), "auto_choice": policy == auto})
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "throughput.csv", index=False)
    (out / "throughput.json").write_text(json.dumps({"auto_policy": auto, "bf16_flags": sorted(flags),
                                                     "rows": rows}, indent=2) + "\n")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
