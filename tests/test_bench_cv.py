"""benchmarks/bench_cv.py: combining the result files of several invocations."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from modules import config

_SPEC = importlib.util.spec_from_file_location("bench_cv", config.PROJECT_ROOT / "benchmarks" / "bench_cv.py")
bench_cv = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_cv)


def _rows(architecture: str, folds: list[int], auc: float) -> pd.DataFrame:
    metrics = {m: auc for m in bench_cv.METRICS}
    return pd.DataFrame([{"fold": f, "architecture": architecture, **metrics, "epochs": 3, "wall_seconds": 1.0,
                          "train_images_per_second": 10.0} for f in folds])


def test_a_fold_measured_twice_counts_once_newest_kept(tmp_path, capsys):
    _rows("anna", [0, 1, 2], 0.8).to_csv(tmp_path / "results_anna.csv", index=False)
    _rows("legacy", [0, 1, 2], 0.7).to_csv(tmp_path / "results_legacy.csv", index=False)
    rerun = tmp_path / "results_anna_folds1.csv"
    _rows("anna", [1], 0.9).to_csv(rerun, index=False)
    os.utime(rerun, ns=(2 * 10**18, 2 * 10**18))  # newer than the others
    results = bench_cv.combine(tmp_path)
    assert len(results) == 6 and not results.duplicated(["fold", "architecture"]).any()
    anna = results[results["architecture"] == "anna"].set_index("fold")["roc_auc"]
    assert anna.to_dict() == {0: 0.8, 1: 0.9, 2: 0.8}
    assert "results_anna.csv" in capsys.readouterr().out  # the superseded file is named
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert abs(summary["anna"]["mean_roc_auc"] - (0.8 + 0.9 + 0.8) / 3) < 1e-9
    assert not list(tmp_path.glob("*.partial*"))


def test_per_patient_summary_names_the_patients_that_carry_the_errors():
    patients = np.array(["H1"] * 4 + ["7"] * 3 + ["9"] * 2)
    labels = np.array([0] * 4 + [1] * 3 + [1] * 2)
    p = np.array([0.9, 0.8, 0.2, 0.7, 0.6, 0.4, 0.9, 0.95, 0.99])
    table = bench_cv.per_patient(patients, labels, p, threshold=0.5)
    assert list(table["patient_id"]) == ["H1", "7", "9"]  # worst first
    assert list(table["cells"]) == [4, 3, 2]
    assert table["share_correct"].tolist() == [0.25, 2 / 3, 1.0]
    assert np.isclose(table.loc[0, "mean_p_leukemia"], 0.65)
    assert (table["threshold"] == 0.5).all()


def test_cell_area_baseline_scores_size_alone_with_an_inner_validation_threshold(shared_cnmc, tmp_path):
    import argparse

    args = argparse.Namespace(data=str(shared_cnmc), size=32, arrays_out=str(tmp_path / "out"),
                              val_fraction=0.34, seed=42)
    [row] = bench_cv.run_fold(0, "cell_area", args, tmp_path)
    held_out = set(bench_cv.FOLDS[0])
    val_patients = set(row["val_patients"].split(","))
    assert val_patients and not val_patients & held_out  # the threshold never sees a held-out patient
    cells = pd.read_csv(tmp_path / "heldout_0_cell_area.csv")
    assert set(cells["patient_id"]) == held_out and len(cells) == row["heldout_cells"]
    # The score is the cell's share of the square: the held-out AUC is that of the mask area.
    assert np.isclose(row["roc_auc"], roc_auc_score(cells["label"], cells["p_leukemia"]))
    assert cells["p_leukemia"].between(0, 1).all() and 0 < row["threshold"] < 1
    called = cells["p_leukemia"] >= row["threshold"]
    assert np.isclose(row["sensitivity"], called[cells["label"] == 1].mean())
    assert (tmp_path / "heldout_patients_0_cell_area.csv").is_file()


def test_averaging_runs_matches_cells_by_path_not_by_order(tmp_path):
    paths = [f"/cells/{i}.bmp" for i in range(6)]
    labels = [0, 0, 0, 1, 1, 1]
    first = [0.1, 0.6, 0.2, 0.5, 0.9, 0.4]
    second = [0.3, 0.2, 0.7, 0.8, 0.6, 0.9]
    for name, p, order in (("a", first, [0, 1, 2, 3, 4, 5]), ("b", second, [5, 3, 1, 0, 4, 2])):
        (tmp_path / name).mkdir()
        for fold in bench_cv.FOLDS:
            pd.DataFrame({"path": [paths[i] for i in order], "label": [labels[i] for i in order],
                          "p_leukemia": [p[i] for i in order]}).to_csv(tmp_path / name / f"heldout_{fold}_anna.csv",
                                                                        index=False)
    table = bench_cv.average_heldout([tmp_path / "a", tmp_path / "b"], stems=("anna",))
    mean = table[(table["fold"] == 0) & (table["source"] == "mean")]["roc_auc"].item()
    assert np.isclose(mean, roc_auc_score(labels, (np.array(first) + np.array(second)) / 2))
    (tmp_path / "b" / "heldout_1_anna.csv").write_text("path,label,p_leukemia\n/other.bmp,1,0.5\n")
    with pytest.raises(ValueError, match="other cells"):
        bench_cv.average_heldout([tmp_path / "a", tmp_path / "b"], stems=("anna",))
