"""Patient-grouped cross-validation: ``python -m modules cv``.

Each fold holds out whole subjects (a third of each class), trains on the others with an inner,
patient-disjoint validation that picks the best epoch and the threshold, and scores the held-out
cells. What is reported is what a reader needs to trust the model on people it has not seen:
per fold ROC AUC, balanced accuracy, sensitivity and specificity, and per held-out subject the
share of its cells called right, from which the mean and the worst specificity over the healthy
subjects (each subject counted once, whatever its number of cells) follow.

Every (fold, model) pair is a job with its own folder, ``<out>/fold<k>_<model>/``, whose
``result.json`` is written last: folds can run as separate processes or machines
(``--folds 1``) into one ``--out`` and be merged by ``--merge-only``; a folder without
``result.json`` (an interrupted job) is run again, a finished one is kept.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from modules import config
from modules.metrics import fast_metrics, per_patient_table
from modules.files import write_csv_atomic, write_json_atomic

#: ``anna``: the network with the project's defaults; ``cell_area``: each cell scored by its size alone
#: (no learning), the baseline a model must beat; ``legacy``: the older project's network. A variant
#: (``parse_variant``) is ANNa with some settings changed, under a name of its own.
MODELS = ("anna", "cell_area", "legacy")
#: The legacy net and the cell-area baseline see every cell on one common scale (a 320 px canvas),
#: so that the cell's area in the square is its real size.
SIZE_CANVAS = 320
#: Share of each class's training subjects held out as the inner validation of a fold.
CV_VAL_FRACTION = 0.34
#: Settings that must agree between the jobs of one model for them to be merged.
COMPARED_SETTINGS = ("seed", "image_size", "epochs", "policy")
FOLD_METRICS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")


class CrossValidationError(ValueError):
    """A cross-validation that cannot run or be merged as asked."""


def parse_variant(name: str, assignments: str) -> tuple[str, dict]:
    """``("s192", "image_size=192,stem_stride=2")`` -> the variant's name and its settings.

    Values are read as true/false, integers, decimals or text; keys are fields of ``config.ModelSettings``
    and ``config.TrainSettings`` other than the ones a cross-validation sets for every model.
    """
    from dataclasses import fields

    known = {f.name for cls in (config.ModelSettings, config.TrainSettings) for f in fields(cls)}
    known -= {"seed", "policy", "strategy", "epochs", "val_fraction"}
    known.add("canvas")  # a preprocessing setting: the variant's arrays are prepared with it
    if not name.isidentifier() or name in MODELS:
        raise CrossValidationError(f"variant name {name!r} must be a word other than {', '.join(MODELS)}")
    overrides = {}
    for item in filter(None, (part.strip() for part in assignments.split(","))):
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise CrossValidationError(f"variant {name}: {item!r} is not KEY=VALUE with KEY one of "
                                       f"{', '.join(sorted(known))}")
        lowered = text.strip().lower()
        value = {"true": True, "false": False}.get(lowered, text.strip())
        for kind in (int, float):
            if isinstance(value, str):
                try:
                    value = kind(value)
                except ValueError:
                    pass
        overrides[key] = value
    return name, overrides


def _fold_arrays(data: Path, size: int, canvas: int, out: Path):
    from modules import preprocessing

    return preprocessing.prepare_arrays(data, size=size, output_dir=out, progress=False, canvas=canvas)


def _heldout(manifest: pd.DataFrame, subjects: list[str]) -> tuple[np.ndarray, np.ndarray]:
    patient_ids = manifest["patient_id"].astype(str).str.upper().to_numpy()
    return patient_ids, np.flatnonzero(np.isin(patient_ids, subjects))


def _inner_split(arrays, subjects: list[str], seed: int):
    """The fold's inner validation: a share of each class's training subjects, drawn with ``seed``.

    Drawn even where the data has several C-NMC folds (training would otherwise validate on one of
    them, which may lack a class once the held-out subjects are gone).
    """
    from modules.data.splits import split_patients

    return split_patients(arrays.manifest.assign(fold=pd.NA), np.asarray(arrays.labels).astype(int),
                          val_fraction=CV_VAL_FRACTION, seed=seed, exclude_patients=subjects)


def _train_and_score(model: str, fold: int, subjects: list[str], settings: dict, job: Path) -> tuple:
    """Train one network without the fold's subjects; its held-out scores, threshold and run facts."""
    from modules import preprocessing
    from modules.modeling import saving, training

    legacy = model == "legacy"
    variant = settings["variants"].get(model, {})
    size = 128 if legacy else int(variant.get("image_size", settings["image_size"]))
    canvas = SIZE_CANVAS if legacy else int(variant.get("canvas", config.DEFAULT_CANVAS))
    arrays_dir = _fold_arrays(settings["data"], size, canvas, settings["arrays_out"])
    arrays = preprocessing.load_arrays(arrays_dir)
    overrides = {"epochs": 20, "batch_size": 32} if legacy else {
        k: settings[k] for k in ("epochs",) if settings.get(k)}
    overrides.update({k: v for k, v in variant.items() if k not in ("image_size", "canvas")})
    inner = _inner_split(arrays, subjects, settings["seed"] + fold)
    run_dir = training.train_model(
        arrays_dir, image_size=size, seed=settings["seed"] + fold, exclude_patients=subjects,
        val_patients=inner.val_patients, runs_dir=job / "runs", run_tag=f"cv{fold}-{model}",
        architecture="legacy" if legacy else "anna", policy=settings["policy"], verbose=2, canvas=canvas, **overrides)
    run = saving.load_run(run_dir)
    patient_ids, rows = _heldout(arrays.manifest, subjects)
    network = saving.load_model(run_dir)
    p_leukemia = saving.predict_outputs(network, arrays.images[rows])["p_leukemia"]
    facts = {"run_dir": str(run_dir), "val_patients": run["val_patients"], "policy": run.get("policy"),
             "epochs": run["training"]["epochs_trained"], "best_epoch": run["training"]["best_epoch"],
             "train_seconds": run["training"].get("wall_seconds")}
    return arrays.manifest.iloc[rows], patient_ids[rows], p_leukemia, float(run["threshold"]), facts


def _cell_area(fold: int, subjects: list[str], settings: dict) -> tuple:
    """Score each cell by the share of a common-scale square its mask covers; threshold on inner validation,
    by the training default's rule."""
    from modules import preprocessing
    from modules.metrics import choose_threshold

    arrays = preprocessing.load_arrays(_fold_arrays(settings["data"], settings["image_size"], SIZE_CANVAS,
                                                    settings["arrays_out"]))
    labels = np.asarray(arrays.labels).astype(int)
    split = _inner_split(arrays, subjects, settings["seed"] + fold)
    area = (np.asarray(arrays.masks) > 0).reshape(len(labels), -1).mean(axis=1)  # share of the square
    defaults = config.TrainSettings()
    threshold = choose_threshold(labels[split.val_index], area[split.val_index], defaults.threshold_rule,
                                 defaults.target_sensitivity)
    patient_ids, rows = _heldout(arrays.manifest, subjects)
    facts = {"run_dir": "", "val_patients": split.val_patients, "policy": None, "epochs": 0, "best_epoch": 0,
             "train_seconds": 0.0}
    return arrays.manifest.iloc[rows], patient_ids[rows], area[rows], float(threshold), facts


def run_job(fold: int, model: str, subjects: list[str], settings: dict, out: Path) -> dict:
    """Run one (fold, model) job into ``<out>/fold<k>_<model>/``; reuse it when already finished."""
    job = out / f"fold{fold}_{model}"
    if (job / "result.json").is_file():
        result = json.loads((job / "result.json").read_text())
        print(f"[fold {fold} {model}] finished earlier in {job}; kept", flush=True)
        return result
    job.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if model == "cell_area":
        manifest, patient_ids, scores, threshold, facts = _cell_area(fold, subjects, settings)
    else:
        manifest, patient_ids, scores, threshold, facts = _train_and_score(model, fold, subjects, settings, job)
    labels = manifest["label"].astype(int).to_numpy()
    cells = pd.DataFrame({"path": manifest["path"].astype(str).to_numpy(), "name": manifest["name"].to_numpy(),
                          "patient_id": patient_ids, "label": labels, "p_leukemia": scores,
                          "prediction": (scores >= threshold).astype(int)})
    write_csv_atomic(cells, job / "heldout.csv")
    write_csv_atomic(per_patient_table(cells), job / "subjects.csv")  # accuracy = share of its cells right
    result = {"fold": fold, "model": model, "heldout_subjects": subjects, "heldout_cells": len(cells),
              "threshold": threshold, **fast_metrics(labels, scores, threshold), **facts,
              "wall_seconds": round(time.perf_counter() - started, 1),
              "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in settings.items() if k != "variants"},
                           "variant": settings["variants"].get(model, {})}}
    write_json_atomic(job / "result.json", result)  # last: only a finished job is trusted
    print(f"[fold {fold} {model}] " + ", ".join(f"{k} {result[k]:.3f}" for k in FOLD_METRICS)
          + f", threshold {threshold:.3f}, {result['wall_seconds']:.0f} s", flush=True)
    return result


def _check_same_settings(results: list[dict], out: Path) -> None:
    """Refuse jobs of one model trained differently (paths may differ between machines)."""
    for model in {r["model"] for r in results}:
        variants = {json.dumps({**{k: r["settings"][k] for k in COMPARED_SETTINGS},
                                "variant": r["settings"].get("variant", {})}, sort_keys=True)
                    for r in results if r["model"] == model}
        if len(variants) > 1:
            raise CrossValidationError(f"the {model} jobs in {out} ran with different settings; merge only jobs "
                                       "of one configuration (use another --out for another one)")


def merge(out: str | Path) -> pd.DataFrame:
    """Combine every finished job under ``out`` into results.csv, subjects.csv and summary.csv/json.

    Returns:
        The summary: one row per model with the mean and sd over folds of the cell-level scores, and
        the subject-level figures (mean and worst share right over healthy and over leukemic subjects).

    Raises:
        CrossValidationError: No finished job, or jobs of one model run with other settings.
    """
    out = Path(out)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("fold*_*/result.json"))]
    if not results:
        raise CrossValidationError(f"no finished cross-validation job (fold<k>_<model>/result.json) in {out}; "
                                   "run `python -m modules cv --out DIR` first")
    _check_same_settings(results, out)
    per_fold = pd.DataFrame([{k: v for k, v in r.items() if k != "settings"} for r in results])
    subjects = pd.concat([pd.read_csv(out / f"fold{r['fold']}_{r['model']}" / "subjects.csv", dtype={"patient_id": str})
                          .assign(fold=r["fold"], model=r["model"]) for r in results], ignore_index=True)
    rows = []
    for model, folds in per_fold.groupby("model", sort=False):
        row = {"model": model, "folds": len(folds)}
        for metric in FOLD_METRICS:
            row[f"{metric}_mean"], row[f"{metric}_sd"] = folds[metric].mean(), folds[metric].std(ddof=1)
        by_subject = subjects[subjects["model"] == model]
        for label, name in ((0, "healthy"), (1, "leukemic")):
            share = by_subject.loc[by_subject["label"] == label, "accuracy"]
            row[f"{name}_subjects"] = len(share)
            row[f"{name}_subject_mean"], row[f"{name}_subject_worst"] = share.mean(), share.min()
        row["train_minutes_mean"] = folds["train_seconds"].mean() / 60
        rows.append(row)
    order = {name: rank for rank, name in enumerate(MODELS)}  # then the variants, in the order they ran
    summary = pd.DataFrame(rows).sort_values("model", key=lambda s: s.map(lambda m: order.get(m, len(order))),
                                             kind="stable").reset_index(drop=True)
    write_csv_atomic(per_fold.drop(columns=["heldout_subjects", "val_patients"]), out / "results.csv")
    write_csv_atomic(subjects, out / "subjects.csv")
    write_csv_atomic(summary, out / "summary.csv")
    write_json_atomic(out / "summary.json", {"summary": summary.to_dict(orient="records"),
                                             "settings": results[0]["settings"]})
    return summary


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: the README's cross-validation table."""
    lines = ["| model | ROC AUC | balanced accuracy | sensitivity | specificity | healthy subjects: mean / worst "
             "specificity | training min/fold |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary.to_dict(orient="records"):
        cells = [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_sd']:.3f}" for m in FOLD_METRICS]
        lines.append(f"| {row['model']} | " + " | ".join(cells)
                     + f" | {row['healthy_subject_mean']:.2f} / {row['healthy_subject_worst']:.2f}"
                     f" ({row['healthy_subjects']}) | {row['train_minutes_mean']:.1f} |")
    return "\n".join(lines)


def run_cv(data: str | Path, out: str | Path, folds: list[int] | None = None,
           models: tuple[str, ...] = ("anna", "cell_area"), seed: int = config.DEFAULT_SEED,
           image_size: int = config.DEFAULT_IMAGE_SIZE, epochs: int | None = None, policy: str = "auto",
           arrays_out: str | Path | None = None, variants: dict[str, dict] | None = None) -> pd.DataFrame:
    """Run the chosen folds and models into ``out`` (finished jobs are kept), then merge.

    Args:
        data: A C-NMC training folder; the shared fold_0 gets its fixed folds, other data folds drawn
            by ``data.folds.cv_folds``.
        out: Folder of the jobs and the merged tables.
        folds: Fold numbers to run; all by default.
        models: Any of ``MODELS``.
        seed: Base seed (fold k trains with ``seed + k``).
        image_size: ANNa's input side; the cell-area baseline uses the same arrays size.
        epochs: ANNa's maximum epochs (the training default when None).
        policy: Precision policy for training (``auto`` picks bf16 only where the CPU has it natively).
        arrays_out: Output root of the cached arrays (``config.OUTPUT_DIR`` by default).
        variants: ANNa variants by name (``parse_variant``), each also named in ``models``.

    Returns:
        The merged summary (see ``merge``).
    """
    from modules.data import folds as data_folds
    from modules.data import layout

    variants = dict(variants or {})
    unused = sorted(set(variants) - set(models))
    if unused:
        raise CrossValidationError(f"variant(s) {', '.join(unused)} not listed in --models; add them there "
                                   "(e.g. --models anna,cell_area," + ",".join(unused) + ")")
    unknown = sorted(set(models) - set(MODELS) - set(variants))
    if unknown:
        raise CrossValidationError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)} "
                                   "or a --variant's name")
    fold_subjects = data_folds.cv_folds(layout.scan_dataset(data))
    chosen = sorted(fold_subjects) if folds is None else [int(f) for f in folds]
    missing = sorted(set(chosen) - set(fold_subjects))
    if missing:
        raise CrossValidationError(f"no fold {missing} in this cross-validation (folds {sorted(fold_subjects)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"data": Path(data).resolve(), "arrays_out": Path(arrays_out or config.OUTPUT_DIR), "seed": seed,
                "image_size": image_size, "epochs": epochs, "policy": policy, "variants": variants}
    planned = [{"model": m, "settings": {**{k: settings[k] for k in COMPARED_SETTINGS},
                                         "variant": variants.get(m, {})}} for m in models]
    finished = [json.loads(p.read_text()) for p in sorted(out.glob("fold*_*/result.json"))]
    _check_same_settings(finished + planned, out)  # before training anything
    for fold in chosen:
        for model in models:
            run_job(fold, model, fold_subjects[fold], settings, out)
    return merge(out)
