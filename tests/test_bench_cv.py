"""benchmarks/bench_cv.py: combining the result files of several invocations."""
from __future__ import annotations

import importlib.util
import json
import os

import pandas as pd

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
    import numpy as np

    patients = np.array(["H1"] * 4 + ["7"] * 3 + ["9"] * 2)
    labels = np.array([0] * 4 + [1] * 3 + [1] * 2)
    p = np.array([0.9, 0.8, 0.2, 0.7, 0.6, 0.4, 0.9, 0.95, 0.99])
    table = bench_cv.per_patient(patients, labels, p, threshold=0.5)
    assert list(table["patient_id"]) == ["H1", "7", "9"]  # worst first
    assert list(table["cells"]) == [4, 3, 2]
    assert table["share_correct"].tolist() == [0.25, 2 / 3, 1.0]
    assert np.isclose(table.loc[0, "mean_p_leukemia"], 0.65)
    assert (table["threshold"] == 0.5).all()
