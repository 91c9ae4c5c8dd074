"""Prediction speed of an ANNa model at 128 px: batched against one image at a time.

Usage (from the repository root)::

    python benchmarks/bench_predict.py [--images 256] [--size 128] [--batch-size 64] [--repeats 3]

Builds ``model.build_anna`` with its default widths (depth 4, 8 base filters; untrained
weights: speed does not depend on them) and times, on the same real C-NMC cells
(``../shared/data/cnmc``, preprocessed once before timing; random pixels when absent):

- batched: ``saving.predict_outputs(model, images, batch_size)`` (what ``evaluate`` uses);
- one at a time: ``predict_outputs`` called per image (``predict_on_batch`` of one);
- one at a time with ``model.predict`` per image, as the older project's notebooks did;
- end to end: ``predict.predict_images`` on the image files (decode, crop, resize, predict),
  through a saved run folder.

Prints images/second side by side (best of ``--repeats`` rounds, the paths timed round-robin so
that they share the background load), with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from modules import config  # noqa: E402
from modules.evaluation import predict  # noqa: E402
from modules import preprocessing  # noqa: E402
from modules.modeling import network, saving  # noqa: E402


def best_rates(paths: dict, repeats: int) -> dict:
    """Images per second of each path, best of ``repeats``, timed round-robin.

    Interleaving the paths lets each see the same background load over time: on a shared
    machine, timing one path after another would compare loads, not paths.

    Args:
        paths: {name: (function, images per call)}.
        repeats: Rounds.
    """
    best = {name: 0.0 for name in paths}
    for _ in range(repeats):
        for name, (function, count) in paths.items():
            started = time.perf_counter()
            function()
            best[name] = max(best[name], count / (time.perf_counter() - started))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="cells timed (default 512: two decoding chunks)")
    parser.add_argument("--size", type=int, default=config.DEFAULT_IMAGE_SIZE,
                        help=f"image side (default {config.DEFAULT_IMAGE_SIZE}; docs/BENCHMARKS.md used 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the batched path (default 64)")
    parser.add_argument("--single", type=int, default=64, help="cells timed one at a time (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the best is kept (default 3)")
    parser.add_argument("--data", default=str(config.SHARED_DATA_DIR / "cnmc"), help="real cells to time on")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    size = args.size
    files = sorted(Path(args.data).rglob("*.png"))[:args.images] if Path(args.data).exists() else []
    if files:
        images = np.stack([preprocessing.preprocess_image(preprocessing.load_rgb(f), size)[0] for f in files])
        source = f"{len(files)} real cells from {args.data}"
    else:
        images = np.random.default_rng(0).integers(0, 120, (args.images, size, size, 3), dtype=np.uint8)
        source = f"{args.images} random images (real cells not found at {args.data})"
    model = network.build_anna((size, size, 3))
    count = len(images)
    single = images[:args.single]

    saving.predict_outputs(model, images[:args.batch_size], batch_size=args.batch_size)  # warm up
    saving.predict_outputs(model, images[:1], batch_size=1)
    model.predict(images[:1], verbose=0)
    batched = f"batched, predict_outputs (batch {args.batch_size})"
    paths = {
        batched: (lambda: saving.predict_outputs(model, images, batch_size=args.batch_size), count),
        "one at a time, predict_outputs": (lambda: [saving.predict_outputs(model, single[i:i + 1], batch_size=1)
                                                    for i in range(len(single))], len(single)),
        "one at a time, model.predict (older project)": (lambda: [model.predict(single[i:i + 1], verbose=0)
                                                                  for i in range(len(single))], len(single)),
    }
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        if files:
            run = Path(folder)
            model.save(run / "model.keras")
            (run / "config.json").write_text(json.dumps({"run_id": "bench", "image_size": size, "threshold": 0.5,
                                                         "margin": config.DEFAULT_MARGIN,
                                                         "background_threshold": config.BACKGROUND_THRESHOLD,
                                                         "canvas": config.DEFAULT_CANVAS}))
            predict.predict_images(run, files[:8], progress=False)  # load once, warm the file cache
            paths["end to end from files, predict_images (decode+crop+predict)"] = (
                lambda: predict.predict_images(run, files, progress=False), count)
        rates = best_rates(paths, args.repeats)

    print(f"ANNa build_anna(({size},{size},3)) defaults, {model.count_params():,} parameters, untrained; {source}")
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
          f"policy {keras.mixed_precision.global_policy().name}, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; best of {args.repeats} round-robin repeats")
    base = rates[batched]
    print(f"{'path':62s} {'images/s':>9s} {'vs batched':>10s}")
    for name, rate in rates.items():
        print(f"{name:62s} {rate:9.1f} {rate / base:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
