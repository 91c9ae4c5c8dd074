"""Evaluate a saved run on the labeled cells of one split of a dataset (the ``evaluate`` command): ``metrics.json``,
``predictions.csv`` and ``per_patient.csv``, from which ``modules.reporting`` draws the charts and the report."""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from modules import config
from modules.evaluation import predict
from modules.metrics import EvaluationError, compute_metrics, per_patient_table
from modules.files import staged_folder

SPLITS = config.EVALUATION_SPLITS
PREDICTION_COLUMNS = ("path", "name", "original_name", "patient_id", "label", "p_leukemia", "prediction",
                      "nucleus_share", "nucleus_cytoplasm_ratio")
SPLIT_NOTES = {
    "validation": "the labeled C-NMC validation (preliminary test) cells, labels joined by file name from the "
                  "labels CSV",
    "train": "training_data cells: these may be the very cells the model was trained on (unless restricted to "
             "held-out patients), so the numbers can be optimistic",
    "test-labeled": "every labeled cell in the folder (cells of patients other than the run's)",
}
SPLIT_EMPTY = {
    "validation": f"{{data}} holds no labeled validation_data cells (the Kaggle {config.VALIDATION_DIR}/"
                  f"{config.VALIDATION_IMAGES_DIR} folder with its labels CSV); for labeled cells of other patients "
                  "use --split test-labeled, for training cells --split train",
    "train": "{data} holds no training_data cells; use --split validation or test-labeled",
    "test-labeled": "{data} holds no labeled cells (testing_data is unlabeled); use `python -m modules predict` "
                    "for unlabeled images",
}


def _run_patients(run_config: dict) -> tuple[set[str], set[str]]:
    """(the run's training patients, its validation patients), empty when it does not record them."""
    return (set(map(str, run_config.get("train_patients") or [])),
            set(map(str, run_config.get("val_patients") or [])))


def _restrict_patients(rows: pd.DataFrame, patients: str | Sequence[str], run_patients: set[str], split: str,
                       data: Path) -> tuple[pd.DataFrame, str]:
    """The rows of ``--patients`` (``unseen`` or ids) and the words the split note gains."""
    ids = rows["patient_id"].astype(str)
    if isinstance(patients, str) and patients.strip().lower() == "unseen":
        if not run_patients:
            raise EvaluationError("--patients unseen needs the run's train_patients and val_patients in "
                                  "config.json; this run does not record them — name the patients instead")
        rows, note = rows[~ids.isin(run_patients)], ("; restricted to patients the run never saw (neither "
                                                     "training nor validation patients)")
    else:
        wanted = [p.strip().upper() for p in (patients.split(",") if isinstance(patients, str) else patients)
                  if p.strip()]
        missing = sorted(set(wanted) - set(ids))
        if missing:
            raise EvaluationError(f"patients {', '.join(missing)} have no labeled {split} cells in {data}; "
                                  "check the ids (as in the file names, e.g. 11 or H10)")
        rows, note = rows[ids.isin(wanted)], f"; restricted to patients {', '.join(wanted)}"
    if rows.empty:
        raise EvaluationError(f"no labeled cells left in {data} after --patients {patients}")
    return rows, note


def select_cells(manifest: pd.DataFrame, split: str, data: Path, run_config: dict,
                 patients: str | Sequence[str] | None = None) -> tuple[pd.DataFrame, str]:
    """The manifest rows to evaluate and a sentence saying what they are (see ``evaluate --help``).

    Raises:
        EvaluationError: No such cells, or ``test-labeled`` cells of the run's own patients.
    """
    if split not in SPLITS:
        raise EvaluationError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    labeled = manifest[manifest["label"].notna()]
    rows = labeled if split == "test-labeled" else labeled[labeled["split"] == split]
    if rows.empty:
        raise EvaluationError(SPLIT_EMPTY[split].format(data=data))
    note = SPLIT_NOTES[split]
    run_patients = set.union(*_run_patients(run_config))
    if patients is not None:
        rows, restriction = _restrict_patients(rows, patients, run_patients, split, data)
        note += restriction
    seen = sorted(set(rows["patient_id"].astype(str)) & run_patients)
    if split == "validation" and seen:
        warnings.warn(
            f"--split validation: cells of patients {', '.join(seen[:10])}{' …' if len(seen) > 10 else ''} in "
            f"{data} were used to train or validate this run, so their figures are optimistic; add "
            "--patients unseen to leave them out", stacklevel=3)
    if split == "test-labeled" and seen:
        raise EvaluationError(f"--split test-labeled: patients {', '.join(seen)} in {data} were used to train "
                              "or validate this run; pass --patients unseen to keep only the others, or "
                              "--split train to evaluate training cells knowingly")
    return rows.reset_index(drop=True), note


def check_training_preprocessing(run_config: dict, settings: dict, sample: int = 16) -> dict:
    """Re-prepare a few of the run's training cells and compare them with its cached arrays: ``checked``,
    ``max_pixel_difference``, ``matches`` (None when not checkable), ``arrays_dir``, ``note``.

    The run records its preprocessing settings, not the code that applied them: code changed since then gives
    the model other inputs than in training (once measured: single-cell probabilities moved by up to 0.34).
    """
    from modules import preprocessing

    recorded = run_config.get("data") or {}
    arrays_dir = recorded.get("arrays_dir")
    result = {"checked": 0, "max_pixel_difference": None, "matches": None, "arrays_dir": arrays_dir}
    if not arrays_dir or not (Path(arrays_dir) / "meta.json").is_file():
        return {**result, "note": "the run's training arrays are not on this machine; not checked"}
    try:
        arrays = preprocessing.load_arrays(arrays_dir)
    except (ValueError, OSError) as error:
        return {**result, "note": f"the run's training arrays could not be read ({error}); not checked"}
    if recorded.get("manifest_digest") and arrays.meta.get("digest") != recorded["manifest_digest"]:
        # The cache folder is shared by dataset and size: rebuilt since training (new code, margin or
        # files), comparing with it would check today's code against itself.
        return {**result, "note": "the arrays at that path were rebuilt since the run trained; not checkable"}
    if int(arrays.meta.get("size", -1)) != settings["image_size"] or len(arrays.manifest) == 0:
        return {**result, "note": "the arrays at that path now hold another size; not checked"}
    rows = np.unique(np.linspace(0, len(arrays.manifest) - 1, min(sample, len(arrays.manifest))).astype(int))
    worst = 0
    for row in rows:
        path = str(arrays.manifest["path"].iloc[row])
        if not Path(path).is_file():
            return {**result, "note": f"training cell {path} is gone; not checked"}
        image = predict.prepare_cell(path, settings)[0].astype("int16")
        worst = max(worst, int(np.abs(image - np.asarray(arrays.images[row], dtype="int16")).max()))
    note = ("the current preprocessing reproduces the run's training arrays exactly" if worst == 0 else
            f"the current preprocessing code does NOT reproduce the run's training arrays (pixel differences up to "
            f"{worst} on {len(rows)} cells): the preprocessing changed after the model was trained, so these "
            "numbers describe slightly different inputs than training saw; re-prepare the arrays and retrain")
    return {**result, "checked": int(len(rows)), "max_pixel_difference": worst, "matches": worst == 0, "note": note}


def evaluate_run(model_path: str | Path, data: str | Path, split: str = "validation",
                 threshold: str | float = "auto", output_dir: str | Path | None = None,
                 patients: str | Sequence[str] | None = None, skip_bad: bool = False, n_boot: int = 1000,
                 seed: int = 0, publish: bool = True, progress: bool = True) -> Path:
    """Score a run (its folder or ``model.keras``) on the labeled cells of ``split`` in ``data`` (see ``evaluate
    --help`` for ``split``, ``threshold`` and ``patients``); returns ``<output_dir>/evaluations/<run_id>__<dataset>_
    <split>[_N]``. ``n_boot`` bootstrap replicates give the intervals; ``publish`` copies the charts to the gallery."""
    from modules.data import layout, synthetic

    run = predict.load_predictor(model_path, threshold)
    run_config, model_file, settings = run.run_config, run.model_file, run.settings
    data_path = Path(data).expanduser()
    cells, split_note = select_cells(layout.scan_dataset(data_path), split, data_path, run_config, patients)
    scored, skipped = predict.score_cells(run, cells, skip_bad, progress=progress)
    if scored.empty:
        raise EvaluationError(f"every image in {data_path} failed to decode; nothing to evaluate")
    predictions = scored.astype({"path": str, "name": str, "original_name": str, "label": "int64"}).assign(
        patient_id=scored["patient_id"].fillna("").astype(str))[list(PREDICTION_COLUMNS)]
    metrics = compute_metrics(predictions["label"], predictions["p_leukemia"], run.threshold,
                              patient_ids=predictions["patient_id"], n_boot=n_boot, seed=seed)
    run_train, run_val = _run_patients(run_config)
    patient = predictions["patient_id"]
    metrics.update({
        "threshold_source": run.threshold_source, "threshold_method": run_config.get("threshold_method"),
        "prediction_rule": "leukemic (1) when p_leukemia >= threshold",
        "split": split, "split_note": split_note,
        "patients_filter": patients if patients is None or isinstance(patients, str) else list(patients),
        "cells_from_run_training_patients": int(patient.isin(run_train).sum()),
        "cells_from_run_validation_patients": int(patient.isin(run_val).sum()),
        "cells_from_unseen_patients": int((~patient.isin(run_train | run_val)).sum()) if run_train | run_val else None,
        "mask_dice_mean": float(scored["mask_dice"].mean()) if "mask_dice" in scored else None,
        "mask_target": settings["mask_target"] if "mask_dice" in scored else None,
        "skipped": skipped, "n_scanned": int(len(cells)),
        "data": str(data_path.resolve()), "dataset": layout.dataset_name(data_path),
        "synthetic_data": bool(synthetic.is_synthetic(data_path)),
        "run_id": str(run_config.get("run_id") or model_file.parent.name), "model": str(model_file.resolve()),
        "model_trained_on": predict.trained_on(run_config),
        "synthetic_model": predict.trained_on(run_config) == "synthetic",
        "preprocessing": settings, "preprocessing_check": check_training_preprocessing(run_config, settings),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return _write_evaluation(Path(output_dir or config.OUTPUT_DIR), metrics, predictions, run.model, settings,
                             run_config, seed, publish)


def _write_evaluation(output_root: Path, metrics: dict, predictions: pd.DataFrame, model, settings: dict,
                      run_config: dict, seed: int, publish: bool) -> Path:
    """Write the numbers, let reporting draw the charts and the report from them, then move the folder into place."""
    from modules.reporting import report

    name = f"{metrics['run_id']}__{metrics['dataset']}_{metrics['split']}"
    with staged_folder(output_root / config.EVALUATIONS_SUBDIR / name, replace=False) as staged:  # never overwrites
        per_patient = per_patient_table(predictions)
        predictions.to_csv(staged.path / "predictions.csv", index=False)
        per_patient.to_csv(staged.path / "per_patient.csv", index=False)
        (staged.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        report.write_evaluation_report(staged.path, metrics, predictions, per_patient, model,
                                       partial(predict.prepare_cell, settings=settings), run_config, seed)
    folder = staged.target
    if publish:
        from modules.reporting import gallery

        gallery.publish_evaluation(folder, output_root / config.VIZ_SUBDIR, metrics, run_config)
    return folder


def load_evaluation(folder: str | Path) -> dict:
    """An evaluation folder read back: ``metrics`` (dict), ``predictions``, ``per_patient`` (DataFrames), ``charts``."""
    from modules.reporting import charts as viz

    folder = Path(folder)
    return {"metrics": json.loads((folder / "metrics.json").read_text()),
            "predictions": pd.read_csv(folder / "predictions.csv", dtype={"patient_id": "string"},
                                       keep_default_na=False),
            "per_patient": pd.read_csv(folder / "per_patient.csv", dtype={"patient_id": "string"}),
            "charts": {name: folder / f"{name}.png" for name in viz.chart_captions(folder)}}
