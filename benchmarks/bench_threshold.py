"""Threshold rules compared on a finished cross-validation, without training anything.

For every ANNa job of ``python -m modules cv --out DIR``: each rule chooses a threshold on the job's own
inner-validation predictions (``runs/*/val_predictions.csv``), which is then applied to the held-out
subjects (``heldout.csv``). Printed: per rule, the mean over folds of sensitivity and specificity, and
the mean and worst share of cells right over the held-out healthy subjects (each subject once).

    python benchmarks/bench_threshold.py output/cv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from modules.metrics import youden_threshold  # noqa: E402

RULES = {
    "youden (cells)": lambda v: youden_threshold(v["label"], v["p_leukemia"]),
    "youden (subjects weighted equally)": lambda v: youden_threshold(v["label"], v["p_leukemia"], v["patient_id"]),
    "0.5": lambda v: 0.5,
}


def score(heldout: pd.DataFrame, threshold: float) -> dict:
    called = heldout["p_leukemia"] >= threshold
    right = called == (heldout["label"] == 1)
    healthy = right[heldout["label"] == 0].groupby(heldout["patient_id"]).mean()
    return {"threshold": threshold, "sensitivity": called[heldout["label"] == 1].mean(),
            "specificity": (~called[heldout["label"] == 0]).mean(), "healthy_mean": healthy.mean(),
            "healthy_worst": healthy.min(), "healthy": healthy.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = []
    for cv_dir in args.cv_dirs:
        for job in sorted(cv_dir.glob("fold*_*/")):
            val = sorted(job.glob("runs/*/val_predictions.csv"))
            if not val or not (job / "heldout.csv").is_file():
                continue
            v = pd.read_csv(val[0], dtype={"patient_id": str})
            heldout = pd.read_csv(job / "heldout.csv", dtype={"patient_id": str})
            for rule, choose in RULES.items():
                rows.append({"cv": cv_dir.name, "job": job.name, "rule": rule, **score(heldout, choose(v))})
    table = pd.DataFrame(rows)
    for (cv, rule), group in table.groupby(["cv", "rule"], sort=False):
        healthy = pd.Series({k: v for d in group["healthy"] for k, v in d.items()})
        print(f"{cv:>12} | {rule:<36} | folds {len(group)} | thresholds "
              + " ".join(f"{t:.2f}" for t in group["threshold"])
              + f" | sensitivity {group['sensitivity'].mean():.3f} | specificity {group['specificity'].mean():.3f}"
              f" | healthy subjects mean {healthy.mean():.2f} worst {healthy.min():.2f}")


if __name__ == "__main__":
    main()
