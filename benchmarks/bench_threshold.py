"""Threshold rules, and ensembles of a fold's networks, compared on a finished cross-validation,
without training anything.

For every ANNa job of ``python -m modules cv --out DIR``: each rule chooses a threshold on the job's own
inner-validation predictions (``runs/*/val_predictions.csv``), which is then applied to the held-out
subjects (``heldout.csv``). Printed: per rule, the mean over folds of sensitivity and specificity, and
the mean and worst share of cells right over the held-out healthy subjects (each subject once).

``--ensemble anna,cstd,s192sw`` also scores, per fold, those models' jobs combined as
``python -m modules ensemble`` combines runs (each member's score centred on its own validation
threshold by ``CentredLogit``, their mean called leukemic above 0), with its held-out ROC AUC.

    python benchmarks/bench_threshold.py output/cv
    python benchmarks/bench_threshold.py output/cv --ensemble anna,cstd,s192sw
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sklearn.metrics import roc_auc_score  # noqa: E402

from modules.metrics import choose_threshold, youden_threshold  # noqa: E402

RULES = {
    "youden (cells)": lambda v: choose_threshold(v["label"], v["p_leukemia"], "youden"),
    "youden (subjects weighted equally)": lambda v: youden_threshold(v["label"], v["p_leukemia"], v["patient_id"]),
    **{f"sensitivity {target:.2f}": lambda v, target=target: choose_threshold(v["label"], v["p_leukemia"],
                                                                               "sensitivity", target)
       for target in (0.85, 0.90, 0.95)},
    "0.5": lambda v: 0.5,
}


def score(heldout: pd.DataFrame, threshold: float) -> dict:
    called = heldout["p_leukemia"] >= threshold
    right = called == (heldout["label"] == 1)
    healthy = right[heldout["label"] == 0].groupby(heldout["patient_id"]).mean()
    return {"threshold": threshold, "sensitivity": called[heldout["label"] == 1].mean(),
            "specificity": (~called[heldout["label"] == 0]).mean(), "healthy_mean": healthy.mean(),
            "healthy_worst": healthy.min(), "healthy": healthy.to_dict()}


def ensemble_scores(cv_dir: Path, models: list[str]) -> list[dict]:
    """Per fold holding every model's job: the members' centred scores averaged, cell by cell (joined by name)."""
    from modules.modeling.network import CentredLogit

    rows = []
    for fold in sorted({job.name.split("_")[0] for job in cv_dir.glob("fold*_*/")}):
        jobs = [cv_dir / f"{fold}_{model}" for model in models]
        if not all((job / "result.json").is_file() for job in jobs):
            continue
        members = []
        for job in jobs:
            v = pd.read_csv(next(job.glob("runs/*/val_predictions.csv")), dtype={"patient_id": str})
            heldout = pd.read_csv(job / "heldout.csv", dtype={"patient_id": str}).set_index("name")
            centred = CentredLogit(youden_threshold(v["label"], v["p_leukemia"]))(heldout["p_leukemia"].to_numpy())
            members.append(pd.Series(np.asarray(centred), index=heldout.index))
        cells = heldout[["patient_id", "label"]].join(pd.concat(members, axis=1, join="inner").mean(axis=1)
                                                       .rename("score"), how="inner")
        if len(cells) != len(heldout):
            raise SystemExit(f"{cv_dir / fold}: the members scored different cells; rerun the cv jobs")
        # The ensemble's threshold is its members' own (centred score 0), chosen on no held-out cell.
        result = score(cells.assign(p_leukemia=cells["score"]), 0.0)
        rows.append({"cv": cv_dir.name, "model": "+".join(models), "rule": "ensemble (members' thresholds)",
                     "roc_auc": roc_auc_score(cells["label"], cells["score"]), **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dirs", nargs="+", type=Path)
    parser.add_argument("--ensemble", default=None, metavar="MODEL,MODEL",
                        help="also score these models' jobs of each fold combined, as `modules ensemble` does")
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
                rows.append({"cv": cv_dir.name, "model": job.name.split("_", 1)[1], "rule": rule,
                             **score(heldout, choose(v)),
                             "roc_auc": roc_auc_score(heldout["label"], heldout["p_leukemia"])})
        if args.ensemble:
            rows += ensemble_scores(cv_dir, args.ensemble.split(","))
    table = pd.DataFrame(rows)
    for (cv, model, rule), group in table.groupby(["cv", "model", "rule"], sort=False):
        healthy = pd.Series({k: v for d in group["healthy"] for k, v in d.items()})
        print(f"{cv:>12} | {model:<12} | {rule:<36} | folds {len(group)} | thresholds "
              + " ".join(f"{t:.2f}" for t in group["threshold"])
              + f" | ROC AUC {group['roc_auc'].mean():.3f}"
              + f" | sensitivity {group['sensitivity'].mean():.3f} | specificity {group['specificity'].mean():.3f}"
              f" | healthy subjects mean {healthy.mean():.2f} worst {healthy.min():.2f}")


if __name__ == "__main__":
    main()
