"""The cross-validation command: folds by subject, jobs run apart and merged, subject-level figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modules.cli import main
from modules.data import folds as data_folds
from modules.data import layout
from modules.evaluation import cv
from modules.metrics import fast_metrics, per_patient_table


def test_fold0_folds_hold_out_every_subject_once(shared_cnmc):
    manifest = layout.scan_dataset(shared_cnmc)
    folds = data_folds.cv_folds(manifest)
    held_out = [s for members in folds.values() for s in members]
    subjects = set(manifest["patient_id"].astype(str).str.upper())
    assert sorted(held_out) == sorted(subjects) and len(held_out) == len(set(held_out)) == 28
    healthy = [s for s in held_out if s.startswith("H")]
    assert len(healthy) == 9 and all(sum(s.startswith("H") for s in m) == 3 for m in folds.values())


def test_drawn_folds_spread_both_classes(synthetic_root):
    manifest = layout.scan_dataset(synthetic_root)
    folds = data_folds.cv_folds(manifest)
    labels = manifest.assign(patient_id=manifest["patient_id"].str.upper()).groupby("patient_id")["label"].first()
    assert sorted(s for m in folds.values() for s in m) == sorted(
        manifest.loc[manifest["split"] == "train", "patient_id"].str.upper().unique())
    for members in folds.values():
        assert set(labels[members]) == {0, 1}
    with pytest.raises(data_folds.FoldError, match="folds"):
        data_folds.cv_folds(manifest, n_folds=50)


def test_subject_figures_count_each_subject_once():
    cells = pd.DataFrame({"patient_id": ["H1"] * 9 + ["H2"] + ["7"] * 4,
                          "label": [0] * 10 + [1] * 4,
                          "p_leukemia": [0.1] * 9 + [0.9] + [0.8, 0.8, 0.8, 0.2]})
    cells = cells.assign(name=[f"c{i}" for i in range(len(cells))], prediction=(cells["p_leukemia"] >= 0.5) * 1)
    table = per_patient_table(cells).set_index("patient_id")
    assert table.loc["H1", "accuracy"] == 1.0 and table.loc["H2", "accuracy"] == 0.0
    assert table.loc["7", "accuracy"] == 0.75 and table.loc["H1", "cells"] == 9
    # Weighted by cells the specificity is 0.9; counted per subject the mean is 0.5.
    scores = fast_metrics(cells["label"].to_numpy(), cells["p_leukemia"].to_numpy(), 0.5)
    assert scores["specificity"] == pytest.approx(0.9)
    assert table.loc[["H1", "H2"], "accuracy"].mean() == pytest.approx(0.5)


@pytest.mark.shared_data
def test_folds_as_separate_jobs_merge_to_the_single_run(shared_cnmc, tmp_path, capsys):
    arrays_out = tmp_path / "arrays"
    together = cv.run_cv(shared_cnmc, tmp_path / "together", models=("cell_area",), arrays_out=arrays_out)
    apart = tmp_path / "apart"
    for fold in (2, 0, 1):  # three jobs in any order into one folder, as three processes or machines would
        cv.run_cv(shared_cnmc, apart, folds=[fold], models=("cell_area",), arrays_out=arrays_out)
    capsys.readouterr()
    assert main(["cv", "--out", str(apart), "--merge-only"]) == 0
    printed = capsys.readouterr().out
    assert "| cell_area |" in printed and printed.strip().endswith("summary.csv")
    merged = pd.read_csv(apart / "summary.csv")
    columns = [c for c in together.columns if c != "train_minutes_mean"]
    pd.testing.assert_frame_equal(together[columns], merged[columns], check_dtype=False)
    row = merged.iloc[0]
    assert row["folds"] == 3 and row["healthy_subjects"] == 9 and row["leukemic_subjects"] == 19
    subjects = pd.read_csv(apart / "subjects.csv", dtype={"patient_id": str})
    healthy = subjects[subjects["label"] == 0]["accuracy"]
    assert row["healthy_subject_mean"] == pytest.approx(healthy.mean())
    assert row["healthy_subject_worst"] == pytest.approx(healthy.min())
    assert 0.6 < row["roc_auc_mean"] < 0.95  # cell size alone separates the classes, but not perfectly


@pytest.mark.shared_data
def test_two_processes_run_folds_at_once_into_one_folder(shared_cnmc, tmp_path):
    out, root = tmp_path / "cv", Path(__file__).resolve().parent.parent
    env = {**os.environ, "ANNA_OUTPUT_DIR": str(tmp_path / "output")}  # both prepare the same arrays at once
    jobs = [subprocess.Popen([sys.executable, "-m", "modules", "cv", "--data", str(shared_cnmc), "--out", str(out),
                              "--folds", str(fold), "--models", "cell_area"], cwd=root, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for fold in (0, 1)]
    try:
        printed = [job.communicate(timeout=600)[0] for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
    assert [job.returncode for job in jobs] == [0, 0], printed
    assert cv.merge(out).loc[0, "folds"] == 2
    assert sorted(pd.read_csv(out / "results.csv")["fold"]) == [0, 1]


@pytest.mark.shared_data
def test_finished_job_kept_unfinished_rerun_and_other_settings_refused(shared_cnmc, tmp_path, capsys):
    out, arrays_out = tmp_path / "cv", tmp_path / "arrays"
    cv.run_cv(shared_cnmc, out, folds=[0], models=("cell_area",), arrays_out=arrays_out)
    job = out / "fold0_cell_area"
    first = json.loads((job / "result.json").read_text())
    cv.run_cv(shared_cnmc, out, folds=[0], models=("cell_area",), arrays_out=arrays_out)
    assert "kept" in capsys.readouterr().out
    (job / "result.json").unlink()  # as if killed before its last write
    cv.run_cv(shared_cnmc, out, folds=[0], models=("cell_area",), arrays_out=arrays_out)
    again = json.loads((job / "result.json").read_text())
    assert again["roc_auc"] == pytest.approx(first["roc_auc"])
    with pytest.raises(cv.CrossValidationError, match="different settings"):
        cv.run_cv(shared_cnmc, out, folds=[1], models=("cell_area",), seed=7, arrays_out=arrays_out)
    assert not (out / "fold1_cell_area").exists()  # refused before anything ran
    other = json.loads((job / "result.json").read_text())
    other.update(fold=1, settings={**other["settings"], "seed": 7})
    (out / "fold1_cell_area").mkdir()
    (out / "fold1_cell_area" / "result.json").write_text(json.dumps(other))  # e.g. copied from another machine
    with pytest.raises(cv.CrossValidationError, match="different settings"):
        cv.merge(out)
    with pytest.raises(cv.CrossValidationError, match="no finished"):
        cv.merge(tmp_path / "empty")


@pytest.mark.slow
def test_anna_cv_on_synthetic_cells(synthetic_root, tmp_path):
    out = tmp_path / "cv"
    summary = cv.run_cv(synthetic_root, out, folds=[0], models=("anna", "narrow"), image_size=32, epochs=1,
                        arrays_out=tmp_path / "arrays", variants={"narrow": {"base_filters": 4}})
    result = json.loads((out / "fold0_anna" / "result.json").read_text())
    assert result["epochs"] == 1 and 0.0 <= result["threshold"] <= 1.0
    cells = pd.read_csv(out / "fold0_anna" / "heldout.csv", dtype={"patient_id": str})
    assert set(cells["patient_id"]) == set(result["heldout_subjects"])
    assert np.isfinite(summary.loc[0, "roc_auc_mean"])
    assert "| anna |" in cv.format_summary(summary)

    # The benchmark combining a fold's networks as `modules ensemble` does scores the same held-out cells.
    bench = subprocess.run([sys.executable, str(Path(cv.__file__).parents[2] / "benchmarks" / "bench_threshold.py"),
                            str(out), "--ensemble", "anna,narrow"], capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr[-3000:]
    ensemble = [line for line in bench.stdout.splitlines() if "| anna+narrow " in line]
    assert len(ensemble) == 1 and "folds 1 | thresholds 0.00 | ROC AUC" in ensemble[0], bench.stdout
    members = pd.concat(pd.read_csv(out / f"fold0_{m}" / "heldout.csv") for m in ("anna", "narrow"))
    assert 0.0 <= float(ensemble[0].split("ROC AUC ")[1].split()[0]) <= 1.0 and len(members) == 2 * len(cells)
