"""Evaluation and inference from a saved run: metrics, tables, charts, reports, predictions.

``evaluate_run`` scores a run on the labeled cells of a dataset and writes one folder under
``<output>/evaluations/``; ``predict_images`` gives P(leukemia) for any cell images;
``compute_metrics`` is the scikit-learn metric set with patient bootstrap intervals. The
``evaluate`` and ``predict`` commands call exactly these functions.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from modules import config
from modules.files import make_public, write_csv_atomic

#: Metrics with bootstrap intervals.
CI_METRICS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")
SPLITS = config.EVALUATION_SPLITS
PREDICTION_COLUMNS = ("path", "name", "original_name", "patient_id", "label", "p_leukemia", "prediction")
CHUNK = 256  # images decoded and predicted at a time: memory stays bounded on any dataset size


class EvaluationError(ValueError):
    """Bad input to evaluation or prediction; the message names the file and the fix."""


# ----------------------------------------------------------------------------- metrics


def _check_scores(labels, p_leukemia) -> tuple[np.ndarray, np.ndarray]:
    labels = pd.array(labels)
    if pd.isna(labels).any():
        raise EvaluationError("labels contain missing values: metrics need a 0/1 label for every cell")
    labels = np.asarray(labels, dtype="int64")
    p = np.asarray(p_leukemia, dtype="float64").reshape(-1)
    if labels.shape != p.shape:
        raise EvaluationError(f"{labels.size} labels but {p.size} probabilities")
    if labels.size == 0:
        raise EvaluationError("no cells to score")
    if not np.isin(labels, (0, 1)).all():
        raise EvaluationError("labels must be 1 (all) or 0 (hem)")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise EvaluationError("p_leukemia must be finite probabilities in [0, 1]")
    return labels, p


def _point_metrics(labels: np.ndarray, p: np.ndarray, threshold: float, names: Iterable[str]) -> dict:
    """The named metrics from scikit-learn; None where a class needed is absent."""
    predicted = (p >= threshold).astype("int64")
    both = labels.min() != labels.max()
    has_pos, has_neg = bool((labels == 1).any()), bool((labels == 0).any())
    functions = {
        "accuracy": lambda: skm.accuracy_score(labels, predicted),
        "balanced_accuracy": lambda: skm.balanced_accuracy_score(labels, predicted) if both else None,
        "sensitivity": lambda: skm.recall_score(labels, predicted, pos_label=1) if has_pos else None,
        "specificity": lambda: skm.recall_score(labels, predicted, pos_label=0) if has_neg else None,
        "precision": lambda: skm.precision_score(labels, predicted, pos_label=1, zero_division=0),
        "f1": lambda: skm.f1_score(labels, predicted, pos_label=1, zero_division=0),
        "weighted_f1": lambda: skm.f1_score(labels, predicted, average="weighted", zero_division=0),
        "roc_auc": lambda: skm.roc_auc_score(labels, p) if both else None,
        "pr_auc": lambda: skm.average_precision_score(labels, p) if both else None,
        "mcc": lambda: skm.matthews_corrcoef(labels, predicted) if both else None,
    }
    out = {}
    for name in names:
        value = functions[name]()
        out[name] = None if value is None else float(value)
    return out


def fast_metrics(labels: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """ROC AUC, balanced accuracy, sensitivity and specificity with plain numpy, for the bootstrap.

    scikit-learn's input checks cost milliseconds per call, too slow for a thousand replicates;
    these are the same quantities (AUC as the Mann-Whitney rank statistic with average ranks
    for ties, as ``roc_auc_score`` computes it) and a test checks them against scikit-learn.
    """
    from scipy.stats import rankdata

    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    called = p >= threshold
    sensitivity = float((called & positive).sum() / n_pos) if n_pos else None
    specificity = float((~called & ~positive).sum() / n_neg) if n_neg else None
    if n_pos and n_neg:
        ranks = rankdata(p)
        auc = float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        balanced = (sensitivity + specificity) / 2
    else:
        auc = balanced = None
    return {"roc_auc": auc, "balanced_accuracy": balanced, "sensitivity": sensitivity, "specificity": specificity}


def normalize_patient_ids(patient_ids) -> np.ndarray:
    """Patient ids as stripped, upper-case strings ("" where missing), as the manifest writes them.

    C-NMC spells one subject both ``h3`` and ``H3``; grouping must not count it twice.
    """
    return pd.Series(patient_ids, dtype="string").fillna("").str.strip().str.upper().to_numpy(dtype=object)


def bootstrap_intervals(labels, p_leukemia, threshold: float, patient_ids=None, n_boot: int = 1000,
                        seed: int = 0, confidence: float = 0.95,
                        metrics: Sequence[str] = CI_METRICS) -> tuple[dict, str]:
    """Percentile bootstrap intervals, resampling patients when their ids are known.

    Cells of one patient are strongly correlated, so resampling cells pretends there is far
    more independent evidence than there is; resampling whole patients (within each class,
    so every replicate keeps both classes) gives honest intervals.

    Args:
        labels: 0/1 true labels.
        p_leukemia: Predicted probabilities.
        threshold: Decision threshold (p >= threshold is leukemic).
        patient_ids: One id per cell; when any is missing or empty, cells are resampled.
        n_boot: Replicates.
        seed: Random seed.
        confidence: Interval mass (0.95 = 95 %).
        metrics: Metric names (see ``compute_metrics``).

    Returns:
        ({metric: [low, high] or None}, "patients" | "cells").
    """
    labels, p = _check_scores(labels, p_leukemia)
    groups = None
    if patient_ids is not None:
        ids = normalize_patient_ids(patient_ids)
        if len(ids) != len(labels):
            raise EvaluationError(f"{len(ids)} patient ids for {len(labels)} cells")
        if all(str(i) for i in ids):
            groups = ids
    rng = np.random.default_rng(seed)
    if groups is not None:
        unique, codes = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(codes == k) for k in range(len(unique))]
        # Stratify patients by their majority label so that replicates keep both classes.
        majority = np.array([int(round(labels[m].mean())) for m in members])
        strata = [np.flatnonzero(majority == c) for c in (0, 1) if (majority == c).any()]
        resampling = "patients"
    else:
        members = None
        strata = [np.flatnonzero(labels == c) for c in (0, 1) if (labels == c).any()]
        resampling = "cells"
    values: dict[str, list[float]] = {name: [] for name in metrics}
    for _ in range(n_boot):
        picks = [rng.choice(stratum, size=len(stratum), replace=True) for stratum in strata]
        chosen = np.concatenate(picks)
        index = np.concatenate([members[k] for k in chosen]) if members is not None else chosen
        sample = fast_metrics(labels[index], p[index], threshold)
        for name in metrics:
            value = sample[name]
            if value is not None:
                values[name].append(value)
    tail = (1 - confidence) / 2 * 100
    intervals = {name: ([float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if v else None)
                 for name, v in values.items()}
    return intervals, resampling


def compute_metrics(labels, p_leukemia, threshold: float, patient_ids=None, n_boot: int = 1000,
                    seed: int = 0, confidence: float = 0.95) -> dict:
    """All evaluation metrics (scikit-learn) with bootstrap intervals.

    Positive class = ``all`` = 1; a cell is called leukemic when ``p_leukemia >= threshold``.

    Args:
        labels: 0/1 true labels, joined to the images by file name.
        p_leukemia: Predicted probabilities.
        threshold: Decision threshold.
        patient_ids: Patient of each cell (bootstrap resamples patients when all are known).
        n_boot: Bootstrap replicates (0 skips the intervals).
        seed: Bootstrap seed.
        confidence: Interval mass.

    Returns:
        ``n, n_positive, n_negative, threshold, accuracy, balanced_accuracy, sensitivity,
        specificity, precision, f1, weighted_f1, roc_auc, pr_auc, mcc`` (None where undefined,
        e.g. AUC with one class), ``n_patients``, ``ci`` ({metric: [low, high]}),
        ``ci_resampling`` ("patients"/"cells"), ``ci_method``.
    """
    labels, p = _check_scores(labels, p_leukemia)
    threshold = float(threshold)
    result = {"n": int(labels.size), "n_positive": int((labels == 1).sum()),
              "n_negative": int((labels == 0).sum()), "threshold": threshold}
    result.update(_point_metrics(labels, p, threshold, ("accuracy", "balanced_accuracy", "sensitivity",
                                                        "specificity", "precision", "f1", "weighted_f1",
                                                        "roc_auc", "pr_auc", "mcc")))
    ids = normalize_patient_ids(patient_ids) if patient_ids is not None else None
    known = ids is not None and all(ids)
    result["n_patients"] = int(len(set(ids))) if known else None
    if n_boot > 0:
        intervals, resampling = bootstrap_intervals(labels, p, threshold, ids, n_boot, seed, confidence)
        result["ci"] = intervals
        result["ci_resampling"] = resampling
        result["ci_method"] = (f"{confidence:.0%} percentile bootstrap, {n_boot} replicates, "
                               f"{resampling} resampled with replacement within each class, seed {seed}")
    return result


def confusion_table(labels, predictions) -> pd.DataFrame:
    """Confusion matrix as a table: ``true, predicted, count, row_percent``.

    ``row_percent`` is the share of the TRUE class (row) total, so the diagonal reads as
    specificity (hem row) and sensitivity (all row).
    """
    matrix = skm.confusion_matrix(np.asarray(labels, dtype="int64"), np.asarray(predictions, dtype="int64"),
                                  labels=[0, 1])
    rows = []
    for true in (0, 1):
        total = matrix[true].sum()
        for predicted in (0, 1):
            count = int(matrix[true, predicted])
            rows.append({"true": true, "true_name": config.CLASS_NAMES[true], "predicted": predicted,
                         "predicted_name": config.CLASS_NAMES[predicted], "count": count,
                         "row_percent": 100.0 * count / total if total else 0.0})
    return pd.DataFrame(rows)


def per_patient_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: ``patient_id, cells, label, mean_p_leukemia, share_called_leukemic, accuracy``.

    ``label`` is the patient's true class (the majority when cells disagree, with
    ``mixed_labels`` saying so). Cells without a patient id are left out.
    """
    predictions = predictions.assign(patient_id=normalize_patient_ids(predictions["patient_id"]))
    known = predictions[predictions["patient_id"] != ""]
    columns = ["patient_id", "cells", "label", "mixed_labels", "mean_p_leukemia",
               "share_called_leukemic", "accuracy"]
    if known.empty:
        return pd.DataFrame(columns=columns)
    frame = known.assign(correct=(known["prediction"] == known["label"]).astype(float),
                         label_f=known["label"].astype(float))
    table = frame.groupby("patient_id", sort=True).agg(
        cells=("name", "size"), label_mean=("label_f", "mean"), mean_p_leukemia=("p_leukemia", "mean"),
        share_called_leukemic=("prediction", "mean"), accuracy=("correct", "mean")).reset_index()
    table["label"] = (table["label_mean"] >= 0.5).astype(int)
    table["mixed_labels"] = (table["label_mean"] > 0) & (table["label_mean"] < 1)
    return table[columns]


# ----------------------------------------------------------------------------- model and images


def resolve_model_path(model_path: str | Path) -> Path:
    """The ``.keras`` file for a run folder or a file path.

    Raises:
        FileNotFoundError: Nothing there, or a folder without ``model.keras``.
    """
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "model.keras").is_file():
            raise FileNotFoundError(f"{path} is a folder without model.keras: pass a run folder written by "
                                    "`python -m modules train` (output/models/<run_id>) or a .keras file")
        return path / "model.keras"
    if not path.is_file():
        raise FileNotFoundError(f"model {path} not found: pass a run folder (output/models/<run_id>) or its "
                                "model.keras")
    return path


def load_run_config(model_path: str | Path) -> dict:
    """The run's ``config.json`` beside the model, or ``{}`` when the model stands alone."""
    config_path = resolve_model_path(model_path).parent / "config.json"
    if not config_path.is_file():
        return {}
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{config_path} is not valid JSON ({error}); restore it from the run "
                              "or pass a .keras file copied elsewhere together with --threshold") from error


def load_model(model_path: str | Path):
    """Load a run's model (``safe_mode=True``) through ``modules.model.load_model``."""
    from modules.modeling import network as model_module

    return model_module.load_model(resolve_model_path(model_path))


def preprocessing_settings(model, run_config: dict, model_path: Path) -> dict:
    """Image size, margin, background threshold and canvas to prepare cells as the run's arrays were.

    Values missing from ``config.json`` fall back to the defaults in ``config`` (``recorded``
    is then False and the report says so).

    Raises:
        EvaluationError: The run's recorded image size does not match the model's input.
    """
    input_shape = model.input_shape[0] if isinstance(model.input_shape, list) else model.input_shape
    height, width, channels = input_shape[1:4]
    if height != width or channels != 3:
        raise EvaluationError(f"{model_path}: ANNa models take square RGB images, this one takes {input_shape[1:]}")
    size = int(run_config.get("image_size", height))
    if size != height:
        raise EvaluationError(f"{model_path}: config.json records image_size {size} but the model takes "
                              f"{height}x{width} images; the run folder is inconsistent — retrain or "
                              "restore the config.json written with this model")
    settings = {"image_size": size,
                "margin": int(run_config.get("margin", config.DEFAULT_MARGIN)),
                "background_threshold": int(run_config.get("background_threshold", config.BACKGROUND_THRESHOLD)),
                "canvas": int(run_config["canvas"]) if run_config.get("canvas") is not None else config.DEFAULT_CANVAS}
    settings["recorded"] = all(run_config.get(key) is not None
                               for key in ("image_size", "margin", "background_threshold", "canvas"))
    # The size comes from the model itself; the rest cannot be read from it.
    guessed = [key for key in ("margin", "background_threshold", "canvas") if run_config.get(key) is None]
    if guessed:
        source = "the run's config.json does not record" if run_config else "no config.json beside it records"
        warnings.warn(
            f"{model_path}: {source} {', '.join(guessed)}; cells are prepared with the current defaults "
            f"({', '.join(f'{key} {settings[key]}' for key in guessed)}). If the model was trained with other "
            "settings (e.g. prepare --canvas 320) its predictions are wrong: keep the config.json written by "
            "`train` beside model.keras", stacklevel=2,
        )
    return settings


def check_training_preprocessing(run_config: dict, settings: dict, sample: int = 16) -> dict:
    """Re-prepare a few of the run's training cells and compare them with its cached arrays.

    The run recorded its preprocessing settings, but not the code that applied them: when the
    preprocessing code changed after the arrays were cached, the model sees slightly different
    inputs at evaluation than in training (measured here: 16 % of pixels differing by up to 93
    levels moved single-cell probabilities by up to 0.34). This catches that case.

    Args:
        run_config: The run's ``config.json``.
        settings: ``preprocessing_settings`` output.
        sample: Cells compared (spread evenly over the arrays).

    Returns:
        ``{"checked": n, "max_pixel_difference": int | None, "matches": bool | None,
        "arrays_dir": str | None, "note": str}``; ``matches`` is None when not checkable.
    """
    from modules.preprocessing import cells as preprocess

    arrays_dir = (run_config.get("data") or {}).get("arrays_dir")
    result = {"checked": 0, "max_pixel_difference": None, "matches": None, "arrays_dir": arrays_dir}
    if not arrays_dir or not (Path(arrays_dir) / "meta.json").is_file():
        return {**result, "note": "the run's training arrays are not on this machine; not checked"}
    try:
        arrays = preprocess.load_arrays(arrays_dir)
    except (ValueError, OSError) as error:
        return {**result, "note": f"the run's training arrays could not be read ({error}); not checked"}
    recorded_digest = (run_config.get("data") or {}).get("manifest_digest")
    if recorded_digest and arrays.meta.get("digest") != recorded_digest:
        # The cache folder is shared by dataset and size: it was rebuilt since training (new
        # code, margin or files), so comparing with it would check today's code against itself.
        return {**result, "note": "the arrays at that path were rebuilt since the run trained; not checkable"}
    if int(arrays.meta.get("size", -1)) != settings["image_size"] or len(arrays.manifest) == 0:
        return {**result, "note": "the arrays at that path now hold another size; not checked"}
    rows = np.unique(np.linspace(0, len(arrays.manifest) - 1, min(sample, len(arrays.manifest))).astype(int))
    worst = 0
    for row in rows:
        path = str(arrays.manifest["path"].iloc[row])
        if not Path(path).is_file():
            return {**result, "note": f"training cell {path} is gone; not checked"}
        image, _ = prepare_cell(path, settings)
        worst = max(worst, int(np.abs(image.astype("int16") - np.asarray(arrays.images[row], dtype="int16")).max()))
    matches = worst == 0
    note = ("the current preprocessing reproduces the run's training arrays exactly" if matches else
            f"the current preprocessing code does NOT reproduce the run's training arrays (pixel differences up to "
            f"{worst} on {len(rows)} cells): the preprocessing changed after the model was trained, so these "
            "numbers describe slightly different inputs than training saw; re-prepare the arrays and retrain")
    return {**result, "checked": int(len(rows)), "max_pixel_difference": worst, "matches": matches, "note": note}


def resolve_threshold(threshold: str | float, run_config: dict, model_path: Path) -> tuple[float, str]:
    """(threshold, source): ``auto`` = the run's stored validation threshold; a number overrides it."""
    if isinstance(threshold, str) and threshold.strip().lower() == "auto":
        if run_config.get("threshold") is None and run_config.get("status") == "running":
            raise EvaluationError(f"{model_path}: the run has not finished, so it has no validation threshold "
                                  "yet; finish it with `python -m modules train --resume RUN_DIR`, or pass "
                                  "--threshold 0.5 (or another value chosen on validation data)")
        if run_config.get("threshold") is None:
            raise EvaluationError(f"{model_path}: no config.json with a 'threshold' beside the model, so "
                                  "--threshold auto has nothing to use; pass --threshold 0.5 (or another "
                                  "value chosen on validation data)")
        value = float(run_config["threshold"])
        method = run_config.get("threshold_method", "chosen on the run's validation predictions")
        return value, f"auto: stored in the run's config.json ({method})"
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise EvaluationError(f"--threshold must be 'auto' or a number in [0, 1], not {threshold!r}") from None
    if not 0.0 <= value <= 1.0:
        raise EvaluationError(f"--threshold {value} is outside [0, 1]")
    return value, "override: given by the user"


def prepare_cell(path: str, settings: dict):
    """Decode one image and preprocess it as the run did. Returns (image (S,S,3) uint8, mask (S,S) uint8)."""
    from modules.preprocessing import cells as preprocess

    rgb = preprocess.load_rgb(path)
    try:
        return preprocess.preprocess_image(rgb, settings["image_size"], margin=settings["margin"],
                                           threshold=settings["background_threshold"],
                                           canvas=settings.get("canvas", config.DEFAULT_CANVAS))
    except preprocess.ImageError as error:
        raise preprocess.ImageError(f"{path}: {error}") from error


def iter_prepared(paths: Sequence[str], settings: dict, skip_bad: bool = False, chunk: int = CHUNK,
                  workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list]]:
    """Decode and preprocess images in chunks, in parallel threads (OpenCV releases the GIL).

    The next chunk is decoded while the caller works on the current one.

    Yields:
        (row indices kept, images (n,S,S,3) uint8, masks (n,S,S) uint8, skipped [{path, error}]).

    Raises:
        preprocess.ImageError: An image fails to decode and ``skip_bad`` is off.
    """
    from modules.preprocessing import cells as preprocess

    workers = workers or min(8, preprocess._default_workers())

    def prepare(path):
        try:
            return prepare_cell(path, settings)
        except (preprocess.ImageError, OSError) as error:
            if not skip_bad:
                raise preprocess.ImageError(f"{error}. Remove or replace the file, or pass --skip-bad to "
                                            "list it and go on without it") from error
            return error

    starts = list(range(0, len(paths), chunk))
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(prepare, path) for path in paths[:chunk]]
        for start in starts:
            part = list(paths[start:start + chunk])
            results = [future.result() for future in pending]
            # Decode the next chunk while the caller runs the model on this one.
            pending = [pool.submit(prepare, path) for path in paths[start + chunk:start + 2 * chunk]]
            kept = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
            skipped = [{"path": str(part[i]), "error": str(r)} for i, r in enumerate(results)
                       if isinstance(r, Exception)]
            size = settings["image_size"]
            images = np.stack([results[i][0] for i in kept]) if kept else np.zeros((0, size, size, 3), "uint8")
            masks = np.stack([results[i][1] for i in kept]) if kept else np.zeros((0, size, size), "uint8")
            yield np.asarray(kept, dtype="int64") + start, images, masks, skipped


def predict_paths(model, paths: Sequence[str], settings: dict, skip_bad: bool = False, batch_size: int = 64,
                  progress: bool = True) -> dict:
    """P(leukemia) (and mask agreement) for image files, with the run's preprocessing.

    Returns:
        ``{"index": kept row indices, "p_leukemia": (n,), "mask_dice": (n,) or None,
        "skipped": [{path, error}]}``; ``mask_dice`` compares the predicted cell mask (>= 0.5)
        with the mask derived in preprocessing, when the model segments.
    """
    from tqdm.auto import tqdm

    from modules.modeling import network as model_module

    kept, probabilities, dices, skipped = [], [], [], []
    has_mask = False
    with tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress) as bar:
        for index, images, masks, bad in iter_prepared(paths, settings, skip_bad):
            skipped += bad
            if len(index):
                outputs = model_module.predict_outputs(model, images, batch_size=batch_size)
                probabilities.append(np.asarray(outputs["p_leukemia"], dtype="float32").reshape(-1))
                if "cell_mask" in outputs:
                    has_mask = True
                    predicted = np.asarray(outputs["cell_mask"]) >= 0.5
                    reference = masks > 0
                    overlap = (predicted & reference).sum(axis=(1, 2))
                    total = predicted.sum(axis=(1, 2)) + reference.sum(axis=(1, 2))
                    dices.append(np.where(total > 0, 2 * overlap / np.maximum(total, 1), 1.0))
                kept.append(index)
            bar.update(len(index) + len(bad))
    result = {"index": np.concatenate(kept) if kept else np.zeros(0, "int64"),
              "p_leukemia": np.concatenate(probabilities) if probabilities else np.zeros(0, "float32"),
              "mask_dice": np.concatenate(dices) if has_mask else None, "skipped": skipped}
    return result


# ----------------------------------------------------------------------------- evaluate


def _select_cells(manifest: pd.DataFrame, split: str, data: Path, run_config: dict,
                  patients: str | Sequence[str] | None) -> tuple[pd.DataFrame, str]:
    """Rows to evaluate and a sentence saying what they are (see the ``--split`` help)."""
    if split not in SPLITS:
        raise EvaluationError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    run_train = set(map(str, run_config.get("train_patients") or []))
    run_val = set(map(str, run_config.get("val_patients") or []))
    labeled = manifest[manifest["label"].notna()]
    if split == "validation":
        rows = labeled[labeled["split"] == "validation"]
        if rows.empty:
            raise EvaluationError(f"{data} holds no labeled validation_data cells (the Kaggle "
                                  f"{config.VALIDATION_DIR}/{config.VALIDATION_IMAGES_DIR} folder with its labels CSV); "
                                  "for labeled cells of other patients use --split test-labeled, for training cells --split train")
        note = "the labeled C-NMC validation (preliminary test) cells, labels joined by file name from the labels CSV"
    elif split == "train":
        rows = labeled[labeled["split"] == "train"]
        if rows.empty:
            raise EvaluationError(f"{data} holds no training_data cells; use --split validation or test-labeled")
        note = ("training_data cells: these may be the very cells the model was trained on (unless restricted "
                "to held-out patients), so the numbers can be optimistic")
    else:
        rows = labeled
        if rows.empty:
            raise EvaluationError(f"{data} holds no labeled cells (testing_data is unlabeled); use "
                                  "`python -m modules predict` for unlabeled images")
        note = "every labeled cell in the folder (cells of patients other than the run's)"
    if patients is not None:
        if isinstance(patients, str) and patients.strip().lower() == "unseen":
            if not (run_train or run_val):
                raise EvaluationError("--patients unseen needs the run's train_patients and val_patients in "
                                      "config.json; this run does not record them — name the patients instead")
            rows = rows[~rows["patient_id"].astype(str).isin(run_train | run_val)]
            note += "; restricted to patients the run never saw (neither training nor validation patients)"
        else:
            wanted = [p.strip().upper() for p in (patients.split(",") if isinstance(patients, str) else patients)
                      if p.strip()]
            missing = sorted(set(wanted) - set(rows["patient_id"].astype(str)))
            if missing:
                raise EvaluationError(f"patients {', '.join(missing)} have no labeled {split} cells in {data}; "
                                      "check the ids (as in the file names, e.g. 11 or H10)")
            rows = rows[rows["patient_id"].astype(str).isin(wanted)]
            note += f"; restricted to patients {', '.join(wanted)}"
        if rows.empty:
            raise EvaluationError(f"no labeled cells left in {data} after --patients {patients}")
    seen = sorted(set(rows["patient_id"].astype(str)) & (run_train | run_val))  # the run's own patients
    if split == "validation" and seen:
        warnings.warn(
            f"--split validation: cells of patients {', '.join(seen[:10])}{' …' if len(seen) > 10 else ''} in "
            f"{data} were used to train or validate this run, so their figures are optimistic; add "
            "--patients unseen to leave them out", stacklevel=3,
        )
    if split == "test-labeled" and seen:
        raise EvaluationError(f"--split test-labeled: patients {', '.join(seen)} in {data} were used to train "
                              "or validate this run; pass --patients unseen to keep only the others, or "
                              "--split train to evaluate training cells knowingly")
    return rows.reset_index(drop=True), note


def _new_folder(parent: Path, name: str, staging: Path) -> Path:
    """Move the staging folder to ``parent/name`` (or ``name_2``, ``_3``…): never overwrite."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        target = parent / (name if n == 1 else f"{name}_{n}")
        if target.exists():
            continue
        try:
            os.rename(staging, target)  # atomic; fails if another process took the name meanwhile
            return target
        except OSError:
            if target.exists():
                continue
            raise
    raise EvaluationError(f"too many evaluations named {name} in {parent}")


def evaluate_run(model_path: str | Path, data: str | Path, split: str = "validation",
                 threshold: str | float = "auto", output_dir: str | Path | None = None,
                 patients: str | Sequence[str] | None = None, skip_bad: bool = False, n_boot: int = 1000,
                 seed: int = 0, publish: bool = True, progress: bool = True) -> Path:
    """Evaluate a saved run on the labeled cells of a dataset and write the evaluation folder.

    Args:
        model_path: Run folder or its ``model.keras``.
        data: Dataset folder (anything ``data.scan_dataset`` accepts).
        split: ``validation``, ``train`` or ``test-labeled`` (see the ``evaluate --help``).
        threshold: ``auto`` (the run's stored validation threshold) or a number.
        output_dir: Output root; the folder goes to ``<output_dir>/evaluations/``.
        patients: ``"unseen"`` (patients the run neither trained nor validated on) or patient ids.
        skip_bad: List undecodable images and go on instead of stopping.
        n_boot: Bootstrap replicates for the intervals.
        seed: Seed for the bootstrap and the image samples.
        publish: Also copy the charts to ``<output_dir>/viz`` and refresh its index.html.
        progress: Show progress bars.

    Returns:
        The evaluation folder ``<output_dir>/evaluations/<run_id>__<dataset>_<split>[_N]``.
    """
    import matplotlib.pyplot as plt

    from modules.data import layout as data_module
    from modules.reporting import report
    from modules.data import synthetic as synth
    from modules.reporting import charts as viz

    model_file = resolve_model_path(model_path)
    run_config = load_run_config(model_file)
    threshold_value, threshold_source = resolve_threshold(threshold, run_config, model_file)
    data_path = Path(data).expanduser()
    manifest = data_module.scan_dataset(data_path)
    dataset = data_module.dataset_name(data_path)
    cells, split_note = _select_cells(manifest, split, data_path, run_config, patients)
    model = load_model(model_file)
    settings = preprocessing_settings(model, run_config, model_file)
    synthetic_data = bool(synth.is_synthetic(data_path))
    synthetic_model = bool((run_config.get("data") or {}).get("synthetic", False))
    result = predict_paths(model, cells["path"].tolist(), settings, skip_bad=skip_bad, progress=progress)
    if result["index"].size == 0:
        raise EvaluationError(f"every image in {data_path} failed to decode; nothing to evaluate")
    kept = cells.iloc[result["index"]].reset_index(drop=True)
    predictions = pd.DataFrame({
        "path": kept["path"].astype(str), "name": kept["name"].astype(str),
        "original_name": kept["original_name"].astype(str), "patient_id": kept["patient_id"].fillna("").astype(str),
        "label": kept["label"].astype("int64"), "p_leukemia": result["p_leukemia"].astype("float64")})
    predictions["prediction"] = (predictions["p_leukemia"] >= threshold_value).astype("int64")
    patient_ids = predictions["patient_id"] if (predictions["patient_id"] != "").all() else None
    metrics = compute_metrics(predictions["label"], predictions["p_leukemia"], threshold_value,
                              patient_ids=patient_ids, n_boot=n_boot, seed=seed)
    run_train = set(map(str, run_config.get("train_patients") or []))
    run_val = set(map(str, run_config.get("val_patients") or []))
    patient_str = predictions["patient_id"]
    run_id = str(run_config.get("run_id") or model_file.parent.name)
    metrics.update({
        "threshold_source": threshold_source,
        "threshold_method": run_config.get("threshold_method"),
        "prediction_rule": "leukemic (1) when p_leukemia >= threshold",
        "split": split, "split_note": split_note, "patients_filter": patients if patients is None or
        isinstance(patients, str) else list(patients),
        "cells_from_run_training_patients": int(patient_str.isin(run_train).sum()),
        "cells_from_run_validation_patients": int(patient_str.isin(run_val).sum()),
        "cells_from_unseen_patients": int((~patient_str.isin(run_train | run_val)).sum())
        if (run_train or run_val) else None,
        "mask_dice_mean": float(np.mean(result["mask_dice"])) if result["mask_dice"] is not None else None,
        "skipped": result["skipped"], "n_scanned": int(len(cells)),
        "data": str(data_path.resolve()), "dataset": dataset, "synthetic_data": synthetic_data,
        "run_id": run_id, "model": str(model_file.resolve()), "synthetic_model": synthetic_model,
        "preprocessing": settings, "preprocessing_check": check_training_preprocessing(run_config, settings),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    per_patient = per_patient_table(predictions)

    output_root = Path(output_dir or config.OUTPUT_DIR)
    parent = output_root / config.EVALUATIONS_SUBDIR
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".evaluation-", suffix=".partial", dir=parent))
    try:
        predictions.to_csv(staging / "predictions.csv", index=False)
        per_patient.to_csv(staging / "per_patient.csv", index=False)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        synthetic = synthetic_data or synthetic_model
        charts = report.metric_charts(predictions, threshold_value, synthetic, per_patient)
        curves = report.training_chart(model_file.parent, synthetic)
        if curves is not None:
            charts["training_curves"] = curves
        charts.update(report.image_charts(model, predictions, settings, synthetic, seed=seed))
        for name, chart in charts.items():
            viz.save_chart(chart.figure, chart.data, name, chart.caption, staging)
            plt.close(chart.figure)
        report.write_report(staging, metrics, run_config)
        make_public(staging)  # mkdtemp makes it private
        folder = _new_folder(parent, f"{run_id}__{dataset}_{split}", staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if publish:
        viz.publish_to_viz(sorted(folder.glob("*.png")), output_root / config.VIZ_SUBDIR, run=folder.name)
    return folder


def load_evaluation(folder: str | Path) -> dict:
    """Read an evaluation folder back: ``metrics`` (dict), ``predictions``, ``per_patient`` (DataFrames), ``charts`` ({name: png})."""
    folder = Path(folder)
    from modules.reporting import charts as viz

    return {"metrics": json.loads((folder / "metrics.json").read_text()),
            "predictions": pd.read_csv(folder / "predictions.csv", dtype={"patient_id": "string"},
                                       keep_default_na=False),
            "per_patient": pd.read_csv(folder / "per_patient.csv", dtype={"patient_id": "string"}),
            "charts": {name: folder / f"{name}.png" for name in viz.chart_captions(folder)}}


# ----------------------------------------------------------------------------- predict


def _is_testing_folder(path: Path) -> bool:
    return path.name in (config.TESTING_DIR, config.TESTING_IMAGES_DIR)


def list_images(paths_or_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Image files given directly or found recursively in folders, in sorted order.

    Other files in the folders (notes, a ``.gif``) are named in a warning, not dropped silently;
    hidden files, ``Thumbs.db``/``desktop.ini`` and the C-NMC validation labels CSV are skipped
    without a word.

    Returns:
        Columns ``path`` and ``testing`` (True for cells of a C-NMC testing folder).

    Raises:
        FileNotFoundError: A path does not exist, or nothing to predict.
    """
    from modules.data.layout import _JUNK, warn_ignored

    items = [paths_or_dirs] if isinstance(paths_or_dirs, (str, Path)) else list(paths_or_dirs)
    # The validation labels CSV belongs to the Kaggle layout: expected, not worth a warning.
    expected = _JUNK | {config.VALIDATION_LABELS_CSV.lower()}
    rows = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            testing = _is_testing_folder(path)
            files, others = [], []
            for p in sorted(path.rglob("*")):
                # Hidden files and folders (.ipynb_checkpoints copies, .DS_Store) are not cells.
                hidden = any(part.startswith(".") for part in p.relative_to(path).parts)
                if p.is_file() and not hidden and p.name.lower() not in expected:
                    if p.suffix.lower() in config.IMAGE_EXTENSIONS:
                        files.append(p)
                    else:
                        others.append(str(p.relative_to(path)))
            if others:
                warn_ignored(path, others, "not an image", f"; images must end in {', '.join(config.IMAGE_EXTENSIONS)}",
                             noun=("file", "files"), stacklevel=3)
            rows += [{"path": str(p.resolve()), "testing": testing or _is_testing_folder(p.parent)} for p in files]
        elif path.is_file():
            if path.suffix.lower() not in config.IMAGE_EXTENSIONS:
                raise EvaluationError(f"{path} is not an image ({', '.join(config.IMAGE_EXTENSIONS)})")
            rows.append({"path": str(path.resolve()), "testing": _is_testing_folder(path.parent)})
        else:
            raise FileNotFoundError(f"{path} not found: pass image files or folders of cell images")
    if not rows:
        raise FileNotFoundError(f"no images ({', '.join(config.IMAGE_EXTENSIONS)}) in "
                                f"{', '.join(map(str, items))}")
    return pd.DataFrame(rows).drop_duplicates("path").reset_index(drop=True)


def predict_images(model_path: str | Path, paths_or_dirs: Iterable[str | Path] | str | Path,
                   csv: str | Path | None = None, threshold: str | float = "auto", skip_bad: bool = False,
                   progress: bool = True) -> pd.DataFrame:
    """P(leukemia) and the label for any cell images, with the run's preprocessing.

    Args:
        model_path: Run folder or its ``model.keras``.
        paths_or_dirs: Image files and/or folders (searched recursively).
        csv: Also write the table here (atomically); for cells of a C-NMC testing folder the
            challenge submission (``new_names, labels``) goes beside it as ``<stem>_submission.csv``.
        threshold: ``auto`` (the run's stored threshold) or a number.
        skip_bad: List undecodable images (in ``attrs["skipped"]``) instead of stopping.
        progress: Show a progress bar.

    Returns:
        Columns ``path, name, p_leukemia, prediction, label_name, testing``; ``attrs`` holds
        ``threshold``, ``threshold_source``, ``skipped`` and (when written) ``submission``.
    """
    model_file = resolve_model_path(model_path)
    run_config = load_run_config(model_file)
    threshold_value, threshold_source = resolve_threshold(threshold, run_config, model_file)
    files = list_images(paths_or_dirs)
    model = load_model(model_file)
    settings = preprocessing_settings(model, run_config, model_file)
    result = predict_paths(model, files["path"].tolist(), settings, skip_bad=skip_bad, progress=progress)
    kept = files.iloc[result["index"]].reset_index(drop=True)
    table = pd.DataFrame({"path": kept["path"], "name": kept["path"].map(lambda p: Path(p).name),
                          "p_leukemia": result["p_leukemia"].astype("float64")})
    table["prediction"] = (table["p_leukemia"] >= threshold_value).astype("int64")
    table["label_name"] = table["prediction"].map(config.CLASS_NAMES)
    table["testing"] = kept["testing"].astype(bool)
    table.attrs.update({"threshold": threshold_value, "threshold_source": threshold_source,
                        "skipped": result["skipped"], "model": str(model_file)})
    if csv is not None:
        write_predictions(table, csv)
    return table


def write_predictions(table: pd.DataFrame, csv: str | Path) -> Path:
    """Write a ``predict_images`` table and, for C-NMC testing cells, the submission beside it.

    The submission (``new_names, labels``) goes to ``<csv stem>_submission.csv``; its path is
    recorded in ``table.attrs["submission"]``.

    Returns:
        The table's path.
    """
    csv = Path(csv).expanduser()
    write_csv_atomic(table, csv)
    if table["testing"].any():
        submission_path = csv.with_name(f"{csv.stem}_submission.csv")
        write_csv_atomic(submission_table(table), submission_path)
        table.attrs["submission"] = str(submission_path)
    return csv


def default_predictions_path(model_path: str | Path, images: Sequence[str | Path],
                             output_dir: str | Path | None = None) -> Path:
    """``<output>/predictions/<run_id>__<dataset>[_N].csv``: a new name, never an existing file."""
    from modules.data import layout as data_module

    model_file = resolve_model_path(model_path)
    run_id = str(load_run_config(model_file).get("run_id") or model_file.parent.name)
    try:
        dataset = data_module.dataset_name(images[0]) if len(images) == 1 else "images"
    except (ValueError, FileNotFoundError):
        dataset = Path(images[0]).stem.lower() if len(images) == 1 else "images"
    folder = Path(output_dir or config.OUTPUT_DIR) / config.PREDICTIONS_SUBDIR
    for n in range(1, 10_000):
        path = folder / (f"{run_id}__{dataset}.csv" if n == 1 else f"{run_id}__{dataset}_{n}.csv")
        if not path.exists() and not path.with_name(f"{path.stem}_submission.csv").exists():
            return path
    raise EvaluationError(f"too many prediction files for {run_id} in {folder}")


def submission_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """C-NMC challenge submission (``new_names, labels``) for the testing-folder cells, in numeric name order."""
    rows = predictions[predictions["testing"]] if "testing" in predictions else predictions
    table = pd.DataFrame({"new_names": rows["name"].astype(str), "labels": rows["prediction"].astype("int64")})
    order = table["new_names"].map(lambda n: (int(Path(n).stem) if Path(n).stem.isdigit() else 10**9, n))
    return table.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


# ----------------------------------------------------------------------------- command line
