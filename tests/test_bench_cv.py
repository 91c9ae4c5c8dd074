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
