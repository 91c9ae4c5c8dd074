"""Evaluation metrics (scikit-learn's, no TensorFlow), patient bootstrap intervals, tables and their meaning in
words. The positive class is ``all`` = 1; a cell is called leukemic when ``p_leukemia >= threshold``."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn import metrics as skm

from modules import config

#: Metrics with bootstrap intervals.
CI_METRICS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")


class EvaluationError(ValueError):
    """Bad input to evaluation or prediction; the message names the file and the fix."""


def _check_scores(labels, p_leukemia) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 0/1 and probabilities as float64, or an error saying what is wrong."""
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


def youden_threshold(labels, scores, groups=None) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (rule: score >= threshold), in [0, 1].

    With ``groups`` (a subject id per cell) each subject weighs the same in the sensitivity and
    specificity, whatever its number of cells: one large validation subject cannot pull the threshold.
    """
    weights = None
    if groups is not None:
        _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, sample_weight=weights)
    # thresholds[0] is +inf ("call nothing"); a degenerate model must not store 1.0 from it.
    best = 1 + int(np.argmax((tpr - fpr)[1:])) if len(thresholds) > 1 else 0
    return float(np.clip(thresholds[best], 0.0, 1.0))


def sensitivity_threshold(labels, scores, target: float) -> float:
    """The highest threshold at which at least ``target`` of the positive cells score >= it.

    It rests on the blasts alone, so it does not swing with the few healthy subjects a validation split holds.
    """
    positives = np.sort(np.asarray(scores, dtype="float64")[np.asarray(labels) == 1])[::-1]
    if not 0 < target <= 1 or positives.size == 0:
        raise EvaluationError(f"a sensitivity threshold needs a target in (0, 1] (got {target}) and positive cells "
                              f"({positives.size} given)")
    # The tolerance keeps 0.9 * 10 from rounding up to 10 cells.
    return float(positives[max(1, int(np.ceil(target * positives.size - 1e-9))) - 1])


def choose_threshold(labels, scores, rule: str,
                     target_sensitivity: float = config.TrainSettings.target_sensitivity) -> float:
    """The threshold a rule of ``config.THRESHOLD_RULES`` picks on validation cells."""
    if rule == "sensitivity":
        return sensitivity_threshold(labels, scores, target_sensitivity)
    return youden_threshold(labels, scores)


def point_metrics(labels: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """scikit-learn's metrics at one threshold; None where a class they need is absent."""
    called = (p >= threshold).astype("int64")
    has_pos, has_neg = bool((labels == 1).any()), bool((labels == 0).any())
    both = has_pos and has_neg
    values = {
        "accuracy": skm.accuracy_score(labels, called),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, called) if both else None,
        "sensitivity": skm.recall_score(labels, called, pos_label=1) if has_pos else None,
        "specificity": skm.recall_score(labels, called, pos_label=0) if has_neg else None,
        "precision": skm.precision_score(labels, called, pos_label=1, zero_division=0),
        "f1": skm.f1_score(labels, called, pos_label=1, zero_division=0),
        "weighted_f1": skm.f1_score(labels, called, average="weighted", zero_division=0),
        "roc_auc": skm.roc_auc_score(labels, p) if both else None,
        "pr_auc": skm.average_precision_score(labels, p) if both else None,
        "mcc": skm.matthews_corrcoef(labels, called) if both else None,
    }
    return {name: None if value is None else float(value) for name, value in values.items()}


def fast_metrics(labels: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """The ``CI_METRICS`` in plain NumPy: scikit-learn's input checks are too slow for a thousand replicates.

    AUC is the Mann-Whitney rank statistic with average ranks for ties, as in ``roc_auc_score``.
    """
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    called = p >= threshold
    sensitivity = float((called & positive).sum() / n_pos) if n_pos else None
    specificity = float((~called & ~positive).sum() / n_neg) if n_neg else None
    if not (n_pos and n_neg):
        return {"roc_auc": None, "balanced_accuracy": None, "sensitivity": sensitivity, "specificity": specificity}
    auc = float((rankdata(p)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return {"roc_auc": auc, "balanced_accuracy": (sensitivity + specificity) / 2,
            "sensitivity": sensitivity, "specificity": specificity}


def normalize_patient_ids(patient_ids) -> np.ndarray:
    """Patient ids as stripped upper-case strings ("" where missing): C-NMC spells one subject ``h3`` and ``H3``."""
    return pd.Series(patient_ids, dtype="string").fillna("").str.strip().str.upper().to_numpy(dtype=object)


def _resampling_units(labels: np.ndarray, patient_ids) -> tuple[list | None, list[np.ndarray], str]:
    """(cells of each patient or None, strata of units per class, "patients" | "cells")."""
    ids = None if patient_ids is None else normalize_patient_ids(patient_ids)
    if ids is not None and len(ids) != len(labels):
        raise EvaluationError(f"{len(ids)} patient ids for {len(labels)} cells")
    if ids is None or not all(ids):
        return None, [np.flatnonzero(labels == c) for c in (0, 1) if (labels == c).any()], "cells"
    unique, codes = np.unique(ids, return_inverse=True)
    members = [np.flatnonzero(codes == k) for k in range(len(unique))]
    # Patients are stratified by their majority label so that every replicate keeps both classes.
    majority = np.array([int(round(labels[m].mean())) for m in members])
    return members, [np.flatnonzero(majority == c) for c in (0, 1) if (majority == c).any()], "patients"


def bootstrap_intervals(labels, p_leukemia, threshold: float, patient_ids=None, n_boot: int = 1000,
                        seed: int = 0, confidence: float = 0.95,
                        metrics: Sequence[str] = CI_METRICS) -> tuple[dict, str]:
    """({metric: [low, high] or None}, "patients" | "cells"): percentile bootstrap intervals, resampling whole
    patients within each class when every cell's patient is known (cells of one patient are alike, so
    resampling cells would pretend far more independent evidence)."""
    labels, p = _check_scores(labels, p_leukemia)
    members, strata, resampling = _resampling_units(labels, patient_ids)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in metrics}
    for _ in range(n_boot):
        chosen = np.concatenate([rng.choice(stratum, size=len(stratum), replace=True) for stratum in strata])
        index = np.concatenate([members[k] for k in chosen]) if members is not None else chosen
        sample = fast_metrics(labels[index], p[index], threshold)
        for name in metrics:
            if sample[name] is not None:
                values[name].append(sample[name])
    tail = (1 - confidence) / 2 * 100
    intervals = {name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if v else None
                 for name, v in values.items()}
    return intervals, resampling


def compute_metrics(labels, p_leukemia, threshold: float, patient_ids=None, n_boot: int = 1000,
                    seed: int = 0, confidence: float = 0.95) -> dict:
    """``n, n_positive, n_negative, threshold``, the ``point_metrics``, ``n_patients`` (None unless every cell's
    patient is known) and, when ``n_boot > 0``, ``ci`` ({metric: [low, high]}), ``ci_resampling``, ``ci_method``."""
    labels, p = _check_scores(labels, p_leukemia)
    threshold = float(threshold)
    result = {"n": int(labels.size), "n_positive": int((labels == 1).sum()),
              "n_negative": int((labels == 0).sum()), "threshold": threshold,
              **point_metrics(labels, p, threshold)}
    ids = None if patient_ids is None else normalize_patient_ids(patient_ids)
    result["n_patients"] = int(len(set(ids))) if ids is not None and all(ids) else None
    if n_boot > 0:
        result["ci"], result["ci_resampling"] = bootstrap_intervals(labels, p, threshold, ids, n_boot, seed,
                                                                    confidence)
        result["ci_method"] = (f"{confidence:.0%} percentile bootstrap, {n_boot} replicates, "
                               f"{result['ci_resampling']} resampled with replacement within each class, seed {seed}")
    return result


def confusion_table(labels, predictions) -> pd.DataFrame:
    """``true, true_name, predicted, predicted_name, count, row_percent`` (of the TRUE class: the diagonal reads
    as specificity and sensitivity)."""
    matrix = skm.confusion_matrix(np.asarray(labels, dtype="int64"), np.asarray(predictions, dtype="int64"),
                                  labels=[0, 1])
    return pd.DataFrame([
        {"true": true, "true_name": config.CLASS_NAMES[true], "predicted": called,
         "predicted_name": config.CLASS_NAMES[called], "count": int(matrix[true, called]),
         "row_percent": 100.0 * matrix[true, called] / matrix[true].sum() if matrix[true].sum() else 0.0}
        for true in (0, 1) for called in (0, 1)])


def per_patient_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per known patient: ``patient_id, cells, label, mixed_labels, mean_p_leukemia,
    share_called_leukemic, accuracy``; ``label`` is the majority class, ``mixed_labels`` says when cells disagree.
    """
    columns = ["patient_id", "cells", "label", "mixed_labels", "mean_p_leukemia", "share_called_leukemic",
               "accuracy"]
    frame = predictions.assign(patient_id=normalize_patient_ids(predictions["patient_id"]))
    frame = frame[frame["patient_id"] != ""]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame.assign(correct=(frame["prediction"] == frame["label"]).astype(float),
                         label_f=frame["label"].astype(float))
    table = frame.groupby("patient_id", sort=True).agg(
        cells=("name", "size"), label_mean=("label_f", "mean"), mean_p_leukemia=("p_leukemia", "mean"),
        share_called_leukemic=("prediction", "mean"), accuracy=("correct", "mean")).reset_index()
    table["label"] = (table["label_mean"] >= 0.5).astype(int)
    table["mixed_labels"] = (table["label_mean"] > 0) & (table["label_mean"] < 1)
    return table[columns]


def _class_sentence(total: int, rate: float | None, noun: str, metric: str) -> str | None:
    """``of 40 normal cells only 11 were called normal (specificity 0.28)``."""
    if not total or rate is None:
        return None
    hits = int(round(rate * total))
    return f"of {total} {noun} cells {'only ' if rate < 0.5 else ''}{hits} were called {noun} ({metric} {rate:.2f})"


def describe_metrics(metrics: dict) -> str:
    """What an evaluation's figures mean, in plain sentences (``metrics.json`` or ``compute_metrics`` output)."""
    sensitivity, specificity = metrics.get("sensitivity"), metrics.get("specificity")
    parts = [s for s in (_class_sentence(metrics["n_positive"], sensitivity, "leukemic", "sensitivity"),
                         _class_sentence(metrics["n_negative"], specificity, "normal", "specificity")) if s]
    text = "; ".join(parts)
    text = text[:1].upper() + text[1:]
    verdicts = [words for rate, words in ((sensitivity, "most leukemic cells are called normal"),
                                          (specificity, "most normal cells are called leukemic"))
                if rate is not None and rate < 0.5]
    text += (": " + " and ".join(verdicts) + "." if verdicts else ".")
    if metrics.get("roc_auc") is not None:
        text += (f" ROC AUC {metrics['roc_auc']:.2f}: a leukemic cell scores above a normal one "
                 f"{metrics['roc_auc']:.0%} of the time (0.50 is chance), whatever the threshold.")
    interval = (metrics.get("ci") or {}).get("balanced_accuracy")
    if metrics.get("balanced_accuracy") is not None:
        bounds = (f"; 95 % interval {interval[0]:.2f}–{interval[1]:.2f}, {metrics['ci_resampling']} resampled"
                  if interval else "")
        text += f" Balanced accuracy {metrics['balanced_accuracy']:.2f} (0.50 is chance{bounds})."
    if metrics.get("n_patients"):
        text += (f" The cells come from {metrics['n_patients']} patients; cells of one patient are alike, "
                 "so the patients, not the cells, say how far these figures carry.")
    if metrics.get("synthetic_model") or metrics.get("synthetic_data"):
        sides = (("the model was trained on SYNTHETIC cells", metrics.get("synthetic_model")),
                 ("the cells scored are SYNTHETIC", metrics.get("synthetic_data")))
        which = " and ".join(words for words, synthetic in sides if synthetic)
        text += f" Note: {which}, so these figures say nothing about real leukemia cells."
    return text


def mask_dice(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Dice overlap per cell of predicted masks (>= 0.5) and reference masks (> 0); 1 where both are empty."""
    predicted, reference = predicted >= 0.5, reference > 0
    overlap = (predicted & reference).sum(axis=(1, 2))
    total = predicted.sum(axis=(1, 2)) + reference.sum(axis=(1, 2))
    return np.where(total > 0, 2 * overlap / np.maximum(total, 1), 1.0)
