"""Generalization to unseen patients: grouped 3-fold cross-validation by patient, ANNa vs legacy.

The 28 patients of the shared C-NMC fold_0 (19 ALL, 9 HEM) are split into three fixed folds,
stratified by class and balanced in cells (written below, not drawn). For each fold, ANNa and
the older project's network are trained on the other two folds, each with its own
patient-disjoint early-stopping validation carved from those training patients, and scored
on the held-out patients. ANNa's threshold comes from its own inner validation (Youden's J);
the legacy net uses 0.5 as it did. A third row per fold, ``cell_area``, scores each cell by its
size alone (no learning; threshold from the same inner validation): what a model must beat to
show it learned more than "blasts are larger". Results: per fold and mean ± sd. The defaults
are the settings of run 8 in docs/BENCHMARKS.md (96 px tight crops, depth 4, 8 base filters,
at most 30 epochs).

    nohup nice -n 5 python benchmarks/bench_cv.py --data ../shared/data/cnmc \
        > output/benchmarks/cv/log.txt 2>&1 &

Writes ``<out>/runs/<run_id>/`` (run folders, evaluable by ``modules.evaluate``), the
held-out predictions ``<out>/heldout_<fold>_<architecture>.csv`` with a per-patient summary
``<out>/heldout_patients_<fold>_<architecture>.csv`` (``per_patient``), ``<out>/results_<archs>.csv``
per invocation (so ANNa and legacy can run as two processes) and the combined
``<out>/results.csv`` / ``results.json`` with the summary (rewritten after every training).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score  # noqa: E402

from modules import config
from modules.preprocessing import cells as preprocess  # noqa: E402
from modules.modeling import network as anna_model  # noqa: E402
from modules.files import write_csv_atomic, write_json_atomic, write_text_atomic  # noqa: E402
from modules.modeling.training import load_run, split_patients, train_model, youden_threshold  # noqa: E402

#: Held-out patients per fold: 6-7 ALL (~800 cells) and 3 HEM patients each.
FOLDS = {
    0: ["52", "26", "14", "20", "43", "3", "19", "H24", "H6", "H7"],
    1: ["48", "35", "4", "22", "28", "15", "H12", "H16", "H11"],
    2: ["45", "50", "5", "11", "17", "1", "H15", "H17", "H19"],
}
#: Canvas (source pixels) of the cell-area baseline and of the legacy net: one scale for every
#: cell, so that its area in the square is its real size (on a tight crop every cell fills the frame).
SIZE_CANVAS = 320
#: ``--normalization`` -> ``build_anna(batch_norm=...)``.
NORMALIZATIONS = {"batch": True, "instance": "instance", "none": False}
METRICS = ("roc_auc", "balanced_accuracy", "f1_weighted", "sensitivity", "specificity")


def heldout_metrics(labels: np.ndarray, p_leukemia: np.ndarray, threshold: float) -> dict:
    """Scores on the held-out patients at a threshold chosen elsewhere."""
    predicted = (p_leukemia >= threshold).astype(int)
    return {"roc_auc": roc_auc_score(labels, p_leukemia),
            "balanced_accuracy": balanced_accuracy_score(labels, predicted),
            "f1_weighted": f1_score(labels, predicted, average="weighted"),
            "sensitivity": float(predicted[labels == 1].mean()),
            "specificity": float(1 - predicted[labels == 0].mean())}


def per_patient(patient_ids: np.ndarray, labels: np.ndarray, p_leukemia: np.ndarray,
                threshold: float) -> pd.DataFrame:
    """One row per held-out patient: class, cells, mean P(leukemia), share of cells called right.

    Cell-level ROC AUC mixes patients; this shows which patients carry the errors (a normal
    patient whose cells all score high, a leukemic one scored low throughout).
    """
    table = pd.DataFrame({"patient_id": patient_ids, "label": labels, "p_leukemia": p_leukemia,
                          "correct": (p_leukemia >= threshold).astype(int) == labels})
    grouped = table.groupby("patient_id")
    summary = pd.DataFrame({"label": grouped["label"].first(), "cells": grouped.size(),
                            "mean_p_leukemia": grouped["p_leukemia"].mean(),
                            "median_p_leukemia": grouped["p_leukemia"].median(),
                            "share_correct": grouped["correct"].mean()})
    summary["threshold"] = threshold
    return summary.reset_index().sort_values("share_correct").reset_index(drop=True)


def average_heldout(out_dirs: list[Path], stems: tuple[str, ...] = ("anna", "anna_tta")) -> pd.DataFrame:
    """ROC AUC per fold of each run's held-out scores and of their mean (an ensemble of runs).

    Threshold-free: the inner-validation scores a threshold for the mean would need are not
    kept. Cells are matched by path, never by order.

    Args:
        out_dirs: ``--out`` folders of earlier runs (same folds).
        stems: Which held-out files of each run to average (``heldout_<fold>_<stem>.csv``).

    Returns:
        One row per fold and source (``mean`` last).
    """
    rows = []
    for fold in sorted(FOLDS):
        scores, labels = [], None
        for out_dir in out_dirs:
            for stem in stems:
                path = Path(out_dir) / f"heldout_{fold}_{stem}.csv"
                if not path.is_file():
                    continue
                cells = pd.read_csv(path).set_index("path").sort_index()
                if labels is not None and not cells.index.equals(labels.index):
                    raise ValueError(f"{path} holds other cells than the runs before it; average runs on the same folds")
                labels = cells["label"]
                scores.append(cells["p_leukemia"])
                rows.append({"fold": fold, "source": f"{Path(out_dir).name}/{stem}",
                             "roc_auc": roc_auc_score(labels, cells["p_leukemia"])})
        if len(scores) > 1:
            rows.append({"fold": fold, "source": "mean", "roc_auc": roc_auc_score(labels, pd.concat(scores, axis=1).mean(axis=1))})
    return pd.DataFrame(rows)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation per architecture."""
    columns = [*METRICS, "epochs", "wall_seconds", "train_images_per_second"]
    grouped = results.groupby("architecture")[columns]
    return pd.concat({"mean": grouped.mean(), "sd": grouped.std(ddof=1)}, axis=1)


def _save(out: Path, rows: list[dict], settings: dict, stem: str) -> None:
    """Write one invocation's rows (``<stem>.csv``), then the combined ``results.csv/json``."""
    write_csv_atomic(pd.DataFrame(rows), out / f"{stem}.csv")
    write_json_atomic(out / f"{stem}.settings.json", settings)
    combine(out)


def combine(out: Path) -> pd.DataFrame:
    """Merge every ``results_*.csv`` in ``out`` (ANNa and legacy may run as separate processes).

    A (fold, architecture) measured by several invocations is counted once: the newest file's
    row is kept and the superseded files are named.
    """
    parts = []
    for path in sorted(out.glob("results_*.csv"), key=lambda p: p.stat().st_mtime_ns):
        part = pd.read_csv(path)
        part["source"] = path.name
        parts.append(part)
    results = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(results):
        duplicated = results.duplicated(["fold", "architecture"], keep="last")
        if duplicated.any():
            superseded = sorted(set(results.loc[duplicated, "source"]))
            print(f"note: {int(duplicated.sum())} fold result(s) measured again later; the older rows from "
                  f"{', '.join(superseded)} are left out of results.csv", flush=True)
        results = results[~duplicated].sort_values(["architecture", "fold"]).reset_index(drop=True)
    write_csv_atomic(results, out / "results.csv")
    summary = summarize(results) if len(results) else pd.DataFrame()
    settings = {path.name: json.loads(path.read_text()) for path in sorted(out.glob("results_*.settings.json"))}
    payload = {"settings": settings, "folds": FOLDS, "per_fold": results.to_dict(orient="records"),
               "summary": {arch: {f"{stat}_{metric}": float(summary.loc[arch, (stat, metric)])
                                  for stat, metric in summary.columns}
                           for arch in summary.index}}
    write_text_atomic(out / "results.json", json.dumps(payload, indent=2, default=float) + "\n")
    return results


def _heldout_rows(manifest: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Upper-case patient id of every array row, and the rows of the fold's held-out patients."""
    patient_ids = manifest["patient_id"].astype(str).str.upper().to_numpy()
    return patient_ids, np.flatnonzero(np.isin(patient_ids, FOLDS[fold]))


def run_cell_area(fold: int, args: argparse.Namespace, out: Path) -> list[dict]:
    """Baseline without learning: score each cell by its area alone.

    The score is the share of a common-scale square (``SIZE_CANVAS``) covered by the cell mask, so larger
    cells score higher; the threshold comes from the same inner validation patients ANNa
    uses (Youden's J), never from the held-out ones. It shows how much of a model's ranking
    cell size alone explains.
    """
    started = time.perf_counter()
    arrays = preprocess.load_arrays(preprocess.prepare_arrays(args.data, size=args.size, output_dir=args.arrays_out,
                                                              progress=False, canvas=SIZE_CANVAS))
    labels_all = np.asarray(arrays.labels).astype(int)
    split = split_patients(arrays.manifest, labels_all, val_fraction=args.val_fraction, seed=args.seed + fold,
                           exclude_patients=FOLDS[fold])
    area = np.asarray(arrays.masks, dtype=np.uint8).reshape(len(labels_all), -1).mean(axis=1)
    threshold = youden_threshold(labels_all[split.val_index], area[split.val_index])
    patient_ids, rows = _heldout_rows(arrays.manifest, fold)
    labels = labels_all[rows]
    _write_heldout(out, f"{fold}_cell_area", arrays.manifest.iloc[rows], patient_ids[rows], labels, area[rows],
                   threshold)
    wall = time.perf_counter() - started
    result = {"fold": fold, "architecture": "cell_area", "image_size": args.size, "run_dir": "",
              "heldout_patients": ",".join(FOLDS[fold]), "val_patients": ",".join(split.val_patients),
              "heldout_cells": int(len(rows)), "threshold": threshold, **heldout_metrics(labels, area[rows], threshold),
              "val_roc_auc": roc_auc_score(labels_all[split.val_index], area[split.val_index]),
              "epochs": 0, "best_epoch": 0, "wall_seconds": round(wall, 1), "train_images_per_second": float("nan")}
    _print_result(result, wall)
    return [result]


def run_fold(fold: int, architecture: str, args: argparse.Namespace, out: Path) -> list[dict]:
    """Train one architecture without the fold's patients and score it on them.

    Returns one result row, two for ANNa with ``--tta`` (plain, then ``anna_tta``).
    """
    if architecture == "cell_area":
        return run_cell_area(fold, args, out)
    size = args.legacy_size if architecture == "legacy" else args.size
    # The legacy net keeps the preprocessing it was measured with in runs 1-4.
    canvas = SIZE_CANVAS if architecture == "legacy" else args.canvas
    arrays_dir = preprocess.prepare_arrays(args.data, size=size, output_dir=args.arrays_out, progress=False,
                                           canvas=canvas)
    arrays = preprocess.load_arrays(arrays_dir)
    kwargs = dict(image_size=size, epochs=args.legacy_epochs if architecture == "legacy" else args.epochs,
                  batch_size=args.legacy_batch_size if architecture == "legacy" else args.batch_size, seed=args.seed + fold, exclude_patients=FOLDS[fold],
                  val_fraction=args.val_fraction, runs_dir=out / "runs", run_tag=f"cv{fold}-{architecture}-s{size}",
                  architecture=architecture, policy="auto", verbose=2, canvas=canvas)
    if architecture == "anna":
        kwargs.update(base_filters=args.base_filters, depth=args.depth, patience=args.patience,
                      lr_patience=args.lr_patience, batch_norm=NORMALIZATIONS[args.normalization],
                      dropout=args.dropout, mask_loss_weight=args.mask_loss_weight)
    started = time.perf_counter()
    run_dir = train_model(arrays_dir, **kwargs)
    wall = time.perf_counter() - started
    run = load_run(run_dir)
    patient_ids, rows = _heldout_rows(arrays.manifest, fold)
    labels = np.asarray(arrays.labels[rows]).astype(int)
    model = anna_model.load_model(run_dir)
    p_leukemia = anna_model.predict_outputs(model, arrays.images[rows])["p_leukemia"]
    manifest = arrays.manifest.iloc[rows]
    _write_heldout(out, f"{fold}_{architecture}", manifest, patient_ids[rows], labels, p_leukemia, run["threshold"])
    result = {"fold": fold, "architecture": architecture, "image_size": size, "run_dir": str(run_dir),
              "heldout_patients": ",".join(FOLDS[fold]), "val_patients": ",".join(run["val_patients"]),
              "heldout_cells": int(len(rows)), "threshold": run["threshold"],
              **heldout_metrics(labels, p_leukemia, run["threshold"]),
              "val_roc_auc": run["validation"]["roc_auc"],
              "epochs": run["training"]["epochs_trained"], "best_epoch": run["training"]["best_epoch"],
              "wall_seconds": round(wall, 1),
              "train_images_per_second": run["training"]["train_images_per_second"]}
    _print_result(result, wall)
    if architecture != "anna" or not args.tta:
        return [result]
    # The same model, each cell scored as the mean over its 8 flips/rotations; the threshold
    # is chosen again on the inner validation patients scored the same way (never on the held-out ones).
    val_rows = np.flatnonzero(np.isin(patient_ids, [str(p).upper() for p in run["val_patients"]]))
    val_labels = np.asarray(arrays.labels[val_rows]).astype(int)
    p_val = anna_model.predict_outputs(model, arrays.images[val_rows], tta=True)["p_leukemia"]
    threshold = youden_threshold(val_labels, p_val)
    p_tta = anna_model.predict_outputs(model, arrays.images[rows], tta=True)["p_leukemia"]
    _write_heldout(out, f"{fold}_{architecture}_tta", manifest, patient_ids[rows], labels, p_tta, threshold)
    tta = {**result, "architecture": f"{architecture}_tta", "threshold": threshold,
           **heldout_metrics(labels, p_tta, threshold), "val_roc_auc": roc_auc_score(val_labels, p_val)}
    _print_result(tta, wall)
    return [result, tta]


def _write_heldout(out: Path, stem: str, manifest: pd.DataFrame, patient_ids: np.ndarray, labels: np.ndarray,
                   p_leukemia: np.ndarray, threshold: float) -> None:
    """Write ``heldout_<stem>.csv`` (one row per cell) and ``heldout_patients_<stem>.csv``."""
    write_csv_atomic(pd.DataFrame({"path": manifest["path"].astype(str).to_numpy(),
                                   "name": manifest["name"].astype(str).to_numpy(),
                                   "patient_id": patient_ids, "label": labels, "p_leukemia": p_leukemia}),
                     out / f"heldout_{stem}.csv")
    write_csv_atomic(per_patient(patient_ids, labels, p_leukemia, threshold), out / f"heldout_patients_{stem}.csv")


def _print_result(result: dict, wall: float) -> None:
    print(f"[fold {result['fold']} {result['architecture']}] " + ", ".join(
        f"{k}={result[k]:.3f}" for k in (*METRICS, "threshold")) + f", epochs={result['epochs']}, "
        f"wall={wall:.0f}s, train img/s={result['train_images_per_second']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(config.SHARED_DATA_DIR / "cnmc"), help="shared fold_0 root")
    parser.add_argument("--out", default=str(config.OUTPUT_DIR / "benchmarks" / "cv"))
    parser.add_argument("--arrays-out", default=None, help="output root for the cached arrays (default output/)")
    parser.add_argument("--folds", default="0,1,2", help="folds to run (default all three)")
    parser.add_argument("--architectures", default="anna,legacy,cell_area",
                        help="comma-separated: anna, legacy (the older project's net), cell_area (cell size alone)")
    parser.add_argument("--size", type=int, default=config.DEFAULT_IMAGE_SIZE, help="ANNa image size")
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--mask-loss-weight", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=30, help="ANNa maximum epochs")
    parser.add_argument("--patience", type=int, default=8, help="ANNa early-stopping patience")
    parser.add_argument("--lr-patience", type=int, default=3, help="ANNa epochs without improvement before halving lr")
    parser.add_argument("--legacy-size", type=int, default=128)
    parser.add_argument("--legacy-epochs", type=int, default=20, help="legacy maximum epochs (patience 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="ANNa batch size")
    parser.add_argument("--legacy-batch-size", type=int, default=32)
    parser.add_argument("--val-fraction", type=float, default=0.34,
                        help="share of each class's training patients held out for early stopping/threshold")
    parser.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    parser.add_argument("--normalization", choices=tuple(NORMALIZATIONS), default="batch",
                        help="ANNa: normalization after each convolution (default: batch)")
    parser.add_argument("--standardize-input", action="store_true",
                        help="ANNa: standardize each image's channels inside the model (see build_anna)")
    parser.add_argument("--canvas", type=int, default=config.DEFAULT_CANVAS,
                        help="ANNa: smallest side of the square around each cell in source pixels; "
                             "0 crops tightly (default: %(default)s)")
    parser.add_argument("--tta", action="store_true",
                        help="ANNa: also score with test-time augmentation (8 flips/rotations), threshold from "
                             "the inner validation patients scored the same way; reported as architecture anna_tta")
    parser.add_argument("--report-only", action="store_true", help="only combine the results already in --out")
    parser.add_argument("--average-runs", default=None, metavar="DIR,DIR,…",
                        help="only report the held-out ROC AUC of earlier runs' --out folders and of their mean")
    args = parser.parse_args(argv)
    if args.average_runs:
        table = average_heldout([Path(d) for d in args.average_runs.split(",")])
        print(table.round(3).to_string(index=False))
        means = table[table["source"] == "mean"]["roc_auc"]
        if len(means):
            print(f"mean of the averaged runs over {len(means)} folds: {means.mean():.3f} ± {means.std(ddof=1):.3f}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    settings["command"] = " ".join(sys.argv)
    print(f"settings: {settings}", flush=True)
    # One file per invocation; a subset of folds gets its own name so that it never replaces
    # the rows of another invocation (combine() keeps the newest row per fold and architecture).
    folds = [int(f) for f in args.folds.split(",")]
    stem = "results_" + "_".join(args.architectures.split(","))
    if sorted(folds) != sorted(FOLDS):
        stem += "_folds" + "".join(str(f) for f in folds)
    rows: list[dict] = []
    if not args.report_only:
        for fold in folds:
            for architecture in args.architectures.split(","):
                rows.extend(run_fold(fold, architecture, args, out))
                _save(out, rows, settings, stem)
    results = combine(out)
    if len(results):
        with pd.option_context("display.width", 220, "display.max_columns", 40):
            print(results[["fold", "architecture", "image_size", *METRICS, "threshold", "epochs", "wall_seconds",
                           "train_images_per_second"]].round(3).to_string(index=False))
            print(summarize(results).round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
