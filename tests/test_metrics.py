"""Evaluation metrics against scikit-learn, and the patient bootstrap."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from modules import metrics

# Known arrays: 6 leukemic (1), 4 normal (0) cells.
LABELS = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
P = np.array([0.95, 0.80, 0.62, 0.55, 0.30, 0.10, 0.70, 0.40, 0.20, 0.05])


def test_each_metric_matches_scikit_learn_and_hand_counts():
    result = metrics.compute_metrics(LABELS, P, threshold=0.5, n_boot=0)
    predicted = (P >= 0.5).astype(int)  # 1,1,1,1,0,0,1,0,0,0: TP=4 FN=2 FP=1 TN=3
    assert result["n"] == 10 and result["n_positive"] == 6 and result["n_negative"] == 4
    assert result["threshold"] == 0.5
    expected = {
        "accuracy": skm.accuracy_score(LABELS, predicted),
        "balanced_accuracy": skm.balanced_accuracy_score(LABELS, predicted),
        "sensitivity": skm.recall_score(LABELS, predicted),
        "specificity": skm.recall_score(LABELS, predicted, pos_label=0),
        "precision": skm.precision_score(LABELS, predicted),
        "f1": skm.f1_score(LABELS, predicted),
        "weighted_f1": skm.f1_score(LABELS, predicted, average="weighted"),
        "roc_auc": skm.roc_auc_score(LABELS, P),
        "pr_auc": skm.average_precision_score(LABELS, P),
        "mcc": skm.matthews_corrcoef(LABELS, predicted),
    }
    for name, value in expected.items():
        assert result[name] == pytest.approx(value), name
    # The same numbers by hand, so a wrong positive class or swapped totals cannot pass.
    assert result["sensitivity"] == pytest.approx(4 / 6)
    assert result["specificity"] == pytest.approx(3 / 4)
    assert result["precision"] == pytest.approx(4 / 5)
    assert result["accuracy"] == pytest.approx(7 / 10)
    assert result["balanced_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)


def test_threshold_is_inclusive_and_moves_the_metrics():
    at_055 = metrics.compute_metrics(LABELS, P, threshold=0.55, n_boot=0)
    at_056 = metrics.compute_metrics(LABELS, P, threshold=0.56, n_boot=0)
    assert at_055["sensitivity"] == pytest.approx(4 / 6)  # p == threshold counts as leukemic
    assert at_056["sensitivity"] == pytest.approx(3 / 6)
    assert at_055["roc_auc"] == at_056["roc_auc"]  # threshold-free


def test_confusion_table_percentages_use_true_class_totals():
    table = metrics.confusion_table(LABELS, (P >= 0.5).astype(int)).set_index(["true", "predicted"])
    assert table.loc[(1, 1), "count"] == 4 and table.loc[(1, 0), "count"] == 2
    assert table.loc[(0, 1), "count"] == 1 and table.loc[(0, 0), "count"] == 3
    assert table.loc[(1, 1), "row_percent"] == pytest.approx(100 * 4 / 6)  # sensitivity
    assert table.loc[(0, 0), "row_percent"] == pytest.approx(100 * 3 / 4)  # specificity
    for true in (0, 1):
        assert table.loc[true, "row_percent"].sum() == pytest.approx(100)


def test_one_class_gives_undefined_auc_not_a_crash():
    result = metrics.compute_metrics([1, 1, 1], [0.9, 0.4, 0.7], threshold=0.5, n_boot=20)
    assert result["roc_auc"] is None and result["specificity"] is None
    assert result["sensitivity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("labels, p, message", [
    ([1, 0, pd.NA], [0.1, 0.2, 0.3], "missing"),
    ([1, 0, 2], [0.1, 0.2, 0.3], "1 \\(all\\) or 0"),
    ([1, 0], [0.1, 0.2, 0.3], "2 labels but 3"),
    ([1, 0], [0.1, 1.5], "\\[0, 1\\]"),
])
def test_bad_inputs_are_refused(labels, p, message):
    with pytest.raises(metrics.EvaluationError, match=message):
        metrics.compute_metrics(pd.array(labels, dtype="Int8"), p, threshold=0.5, n_boot=0)


def _clustered_cells(seed: int = 3):
    """20 patients (10 per class), 60 near-identical cells each: the patient, not the cell, is the unit."""
    rng = np.random.default_rng(seed)
    labels, p, patients = [], [], []
    for k in range(20):
        label = int(k < 10)
        center = rng.uniform(0.35, 0.95) if label else rng.uniform(0.05, 0.65)
        labels += [label] * 60
        p += list(np.clip(center + rng.normal(0, 0.01, 60), 0, 1))
        patients += [f"{'' if label else 'H'}{k}"] * 60
    return np.array(labels), np.array(p), patients


def test_patient_bootstrap_is_wider_than_cell_bootstrap_on_clustered_cells():
    labels, p, patients = _clustered_cells()
    by_patient, how_p = metrics.bootstrap_intervals(labels, p, 0.5, patient_ids=patients, n_boot=400, seed=1)
    by_cell, how_c = metrics.bootstrap_intervals(labels, p, 0.5, patient_ids=None, n_boot=400, seed=1)
    assert (how_p, how_c) == ("patients", "cells")
    point = metrics.compute_metrics(labels, p, 0.5, n_boot=0)
    for name in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity"):
        width_patient = by_patient[name][1] - by_patient[name][0]
        width_cell = by_cell[name][1] - by_cell[name][0]
        # 1,200 cells look like a lot of evidence; 20 patients are not.
        assert width_patient > 2.5 * width_cell, (name, width_patient, width_cell)
        assert by_patient[name][0] <= point[name] <= by_patient[name][1]


def test_compute_metrics_says_what_it_resampled():
    labels, p, patients = _clustered_cells()
    with_ids = metrics.compute_metrics(labels, p, 0.5, patient_ids=patients, n_boot=50)
    assert with_ids["ci_resampling"] == "patients" and with_ids["n_patients"] == 20
    missing_one = list(patients)
    missing_one[0] = ""
    without = metrics.compute_metrics(labels, p, 0.5, patient_ids=missing_one, n_boot=50)
    assert without["ci_resampling"] == "cells" and without["n_patients"] is None
    assert set(with_ids["ci"]) == {"roc_auc", "balanced_accuracy", "sensitivity", "specificity"}


def test_per_patient_table():
    frame = pd.DataFrame({"name": list("abcde"), "patient_id": ["1", "1", "H2", "H2", "H2"],
                          "label": [1, 1, 0, 0, 0], "p_leukemia": [0.9, 0.3, 0.8, 0.1, 0.2],
                          "prediction": [1, 0, 1, 0, 0]})
    table = metrics.per_patient_table(frame).set_index("patient_id")
    assert table.loc["1", "cells"] == 2 and table.loc["1", "accuracy"] == pytest.approx(0.5)
    assert table.loc["H2", "label"] == 0 and table.loc["H2", "share_called_leukemic"] == pytest.approx(1 / 3)
    assert table.loc["H2", "mean_p_leukemia"] == pytest.approx((0.8 + 0.1 + 0.2) / 3)


def test_patient_ids_are_grouped_as_the_manifest_spells_them():
    """C-NMC writes one subject as both h3 and H3: that is one patient, not two."""
    labels = np.array([0] * 10 + [1] * 10)
    p = np.linspace(0.05, 0.95, 20)
    patients = ["h3"] * 5 + [" H3"] * 5 + ["1"] * 10
    result = metrics.compute_metrics(labels, p, 0.5, patient_ids=patients, n_boot=20)
    assert result["n_patients"] == 2 and result["ci_resampling"] == "patients"
    frame = pd.DataFrame({"name": [f"{i}.bmp" for i in range(20)], "patient_id": patients, "label": labels,
                          "p_leukemia": p, "prediction": (p >= 0.5).astype(int)})
    table = metrics.per_patient_table(frame).set_index("patient_id")
    assert sorted(table.index) == ["1", "H3"] and table.loc["H3", "cells"] == 10


def test_bootstrap_metrics_equal_scikit_learn_on_resamples():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    p = np.round(rng.random(300), 2)  # rounded: many ties, as sklearn must handle them too
    for _ in range(5):
        index = rng.integers(0, 300, 300)
        fast = metrics.fast_metrics(labels[index], p[index], 0.5)
        slow = metrics.compute_metrics(labels[index], p[index], 0.5, n_boot=0)
        for name in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity"):
            assert fast[name] == pytest.approx(slow[name]), name


def test_youden_threshold_is_the_best_cut():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.35, 0.7, 0.8, 0.9, 0.95])
    assert metrics.youden_threshold(labels, scores) == pytest.approx(0.7)  # J = 0.8 there, 0.75 at 0.35
    # A constant score has only the "call nothing" point after +inf: never 1.0 from it.
    assert metrics.youden_threshold(np.array([0, 1]), np.full(2, 0.3)) == pytest.approx(0.3)


def _demo_metrics(**extra) -> dict:
    """40 leukemic cells, 38 called leukemic; 40 normal cells, 11 called normal (the demo's figures)."""
    labels = np.array([1] * 40 + [0] * 40)
    p = np.array([0.9] * 38 + [0.1] * 2 + [0.2] * 11 + [0.8] * 29)
    return {**metrics.compute_metrics(labels, p, 0.5, n_boot=0), **extra}


def test_describe_metrics_says_what_the_figures_mean():
    text = metrics.describe_metrics(_demo_metrics())
    assert text.startswith("Of 40 leukemic cells 38 were called leukemic (sensitivity 0.95); of 40 normal cells "
                           "only 11 were called normal (specificity 0.28): most normal cells are called leukemic.")
    assert "ROC AUC" in text and "SYNTHETIC" not in text
    model_only = metrics.describe_metrics(_demo_metrics(synthetic_model=True, synthetic_data=False))
    assert "the model was trained on SYNTHETIC cells" in model_only and "cells scored are SYNTHETIC" not in model_only
    good = metrics.describe_metrics(metrics.compute_metrics(LABELS, P, 0.5, n_boot=0))
    assert "only" not in good and "most" not in good  # 4 of 6 and 3 of 4: no verdict


def test_metrics_table_shows_counts_as_integers_and_no_nan():
    from modules import notebooks

    table = notebooks.metrics_table(metrics.compute_metrics(LABELS, P, 0.5, patient_ids=list("aabbcdefgh"),
                                                            n_boot=50))
    assert table.loc["n", "value"] == "10" and table.loc["n_positive", "value"] == "6"
    assert table.loc["n", "ci_low"] == "" and table.loc["roc_auc", "ci_low"] != ""
    assert not table.isna().any().any() and "nan" not in table.to_string().lower()


def test_metrics_need_no_tensorflow():
    import subprocess
    import sys

    code = "import sys; import modules.metrics; print('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
