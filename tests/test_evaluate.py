"""``evaluate``: end to end on a tiny trained run, and every bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from modules import cli, config
from modules import metrics as scores
from modules.evaluation import evaluate

EXPECTED_FILES = [
    "metrics.json", "predictions.csv", "per_patient.csv", "report.md", "report.html",
    *(f"{chart}.{ext}" for chart in ("confusion_matrix", "roc_curve", "precision_recall_curve",
                                     "probability_histogram", "calibration_curve", "training_curves",
                                     "per_patient_accuracy", "confident_errors", "gradcam", "predicted_masks",
                                     "nucleus_by_class")
      for ext in ("png", "csv")),
]


@pytest.fixture(scope="module")
def evaluation(tiny_run_dir, synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_out")
    return evaluate.evaluate_run(tiny_run_dir, synthetic_root, split="validation", output_dir=out,
                                 n_boot=200, progress=False)


def test_evaluation_writes_every_file(evaluation, tiny_run_dir):
    run_id = json.loads((tiny_run_dir / "config.json").read_text())["run_id"]
    assert evaluation.parent.name == config.EVALUATIONS_SUBDIR
    assert evaluation.name == f"{run_id}__synthetic_c-nmc_leukemia_validation"
    missing = [name for name in EXPECTED_FILES if not (evaluation / name).is_file()]
    assert not missing
    assert not list(evaluation.parent.glob("*.partial*"))  # the staging folder is gone
    predictions = pd.read_csv(evaluation / "predictions.csv")
    assert list(predictions.columns) == list(evaluate.PREDICTION_COLUMNS)
    shares = predictions["nucleus_share"]
    assert shares.dropna().between(0, 1).all() and shares.notna().any()  # inside the cell; NaN = none trusted
    per_patient = pd.read_csv(evaluation / "per_patient.csv")
    assert per_patient["cells"].sum() == len(predictions)
    errors = pd.read_csv(evaluation / "confident_errors.csv")
    assert (errors["label"] != errors["prediction"]).all()  # only errors, with their true label
    false_pos = errors[errors["label"] == 0]
    assert false_pos["kind"].str.startswith("false positive").all()
    assert list(false_pos["p_leukemia"]) == sorted(false_pos["p_leukemia"], reverse=True)
    by_name = predictions.set_index("name")
    assert (errors.set_index("name")["p_leukemia"] == by_name.loc[errors["name"], "p_leukemia"]).all()


def test_metrics_json_agrees_with_predictions_csv(evaluation, tiny_run_dir):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    predictions = pd.read_csv(evaluation / "predictions.csv", dtype={"patient_id": str})
    run = json.loads((tiny_run_dir / "config.json").read_text())
    assert metrics["threshold"] == pytest.approx(run["threshold"])
    assert metrics["threshold_source"].startswith("auto")
    labels, p = predictions["label"].to_numpy(), predictions["p_leukemia"].to_numpy()
    predicted = (p >= metrics["threshold"]).astype(int)
    assert (predicted == predictions["prediction"]).all()
    assert metrics["n"] == len(predictions) == metrics["n_positive"] + metrics["n_negative"]
    assert metrics["n_positive"] == int(labels.sum())
    recomputed = {
        "accuracy": skm.accuracy_score(labels, predicted),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, predicted),
        "sensitivity": skm.recall_score(labels, predicted),
        "specificity": skm.recall_score(labels, predicted, pos_label=0),
        "precision": skm.precision_score(labels, predicted, zero_division=0),
        "f1": skm.f1_score(labels, predicted, zero_division=0),
        "weighted_f1": skm.f1_score(labels, predicted, average="weighted"),
        "roc_auc": skm.roc_auc_score(labels, p), "pr_auc": skm.average_precision_score(labels, p),
        "mcc": skm.matthews_corrcoef(labels, predicted),
    }
    for name, value in recomputed.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert metrics["ci_resampling"] == "patients"
    for name in scores.CI_METRICS:
        low, high = metrics["ci"][name]
        assert low <= metrics[name] + 1e-9 and metrics[name] <= high + 1e-9
    assert metrics["synthetic_data"] is True
    assert metrics["synthetic_model"] is True and metrics["model_trained_on"] == "synthetic"
    assert metrics["preprocessing_check"]["matches"] is True  # same code made the training arrays


def test_preprocessing_drift_since_training_is_caught(tiny_run_dir, tmp_path):
    run = json.loads((tiny_run_dir / "config.json").read_text())
    arrays = tmp_path / "arrays"
    shutil.copytree(run["data"]["arrays_dir"], arrays)
    images = np.load(arrays / "images.npy", allow_pickle=False)
    images[0, 10:20, 10:20] = 255 - images[0, 10:20, 10:20]  # as if another crop/resize made them
    np.save(arrays / "images.npy", images)
    settings = {"image_size": 32, "margin": run["margin"], "background_threshold": run["background_threshold"],
                "canvas": run["canvas"]}
    same = evaluate.check_training_preprocessing(run, settings)
    assert same["matches"] is True and same["checked"] > 0
    moved = {**run, "data": {**run["data"], "arrays_dir": str(arrays)}}
    drifted = evaluate.check_training_preprocessing(moved, settings)
    assert drifted["matches"] is False and drifted["max_pixel_difference"] > 0
    assert "does NOT reproduce" in drifted["note"]
    gone = evaluate.check_training_preprocessing({**run, "data": {"arrays_dir": str(tmp_path / "none")}}, settings)
    assert gone["matches"] is None and "not checked" in gone["note"]


def test_labels_are_the_csv_labels_joined_by_name(evaluation, synthetic_root):
    predictions = pd.read_csv(evaluation / "predictions.csv")
    csv = pd.read_csv(synthetic_root / config.VALIDATION_DIR / config.VALIDATION_LABELS_CSV)
    by_name = dict(zip(csv["new_names"], csv["labels"]))
    assert len(predictions) == len(csv)
    assert (predictions["label"] == predictions["name"].map(by_name)).all()
    # The original name's suffix says the class too.
    assert (predictions["label"] == predictions["original_name"].str.contains("_all").astype(int)).all()


def test_report_states_data_run_threshold_and_loads_its_images(evaluation):
    text = (evaluation / "report.md").read_text()
    page = (evaluation / "report.html").read_text()
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert "SYNTHETIC" in text and "SYNTHETIC" in page
    assert metrics["run_id"] in text and metrics["data"] in text
    assert f"{metrics['threshold']:.4f}" in text and "auto" in text
    sources = [part.split("'")[0] for part in page.split("<img src='")[1:]]
    assert len(sources) >= 10
    for source in sources:
        assert "/" not in source and (evaluation / source).is_file()


def test_charts_are_published_to_the_gallery(evaluation):
    viz_dir = evaluation.parent.parent / config.VIZ_SUBDIR
    index = (viz_dir / "index.html").read_text()
    assert f"{evaluation.name}/roc_curve.png" in index and "Evaluation of run" in index
    assert (viz_dir / evaluation.name / "roc_curve.csv").is_file()


def test_cli_override_threshold_never_overwrites(evaluation, tiny_run_dir, synthetic_root, capsys):
    before = (evaluation / "metrics.json").read_text()
    code = cli.main(["evaluate", "--model", str(tiny_run_dir / "model.keras"), "--data", str(synthetic_root),
                     "--threshold", "0.5", "--out", str(evaluation.parent.parent), "--bootstrap", "50", "--no-viz"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    second = Path(last)
    assert second.name == f"{evaluation.name}_2" and second.is_dir()
    assert (evaluation / "metrics.json").read_text() == before
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["threshold"] == 0.5 and metrics["threshold_source"].startswith("override")
    assert "override" in (second / "report.md").read_text()


@pytest.mark.shared_data
def test_synthetic_model_on_real_cells_says_which_side_is_synthetic(tiny_run_dir, shared_cnmc_bmp, tmp_path):
    """The demo's case: a model trained on synthetic cells scored on the 40 real BMP cells."""
    folder = evaluate.evaluate_run(tiny_run_dir, shared_cnmc_bmp, split="train", output_dir=tmp_path, n_boot=0,
                                   progress=False)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n"] == 40 and metrics["synthetic_model"] is True and metrics["synthetic_data"] is False
    words = scores.describe_metrics(metrics)
    assert "the model was trained on SYNTHETIC cells" in words and "cells scored are SYNTHETIC" not in words
    index = (tmp_path / config.VIZ_SUBDIR / "index.html").read_text()
    assert "model trained on SYNTHETIC cells" in index and "[SYNTHETIC cells]" not in index


# ----------------------------------------------------------------------------- bad input


def _copy_cells(source: Path, target: Path, count: int) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(source.iterdir())[:count]
    return [Path(shutil.copy(f, target / f.name)) for f in files]


@pytest.fixture
def small_training_tree(synthetic_root, tmp_path) -> Path:
    """A Kaggle-layout copy of a few synthetic training cells (fold_0 only)."""
    root = tmp_path / "C-NMC_Leukemia"
    for cls in ("all", "hem"):
        _copy_cells(synthetic_root / "training_data" / "fold_0" / cls, root / "training_data" / "fold_0" / cls, 3)
    (root / config.SYNTHETIC_MARKER).write_text((synthetic_root / config.SYNTHETIC_MARKER).read_text())
    return root


def test_undecodable_image_stops_or_is_listed(tiny_run_dir, small_training_tree, tmp_path):
    bad = small_training_tree / "training_data" / "fold_0" / "all" / "UID_999_1_1_all.bmp"
    bad.write_bytes(b"BM not really an image")
    with pytest.raises(ValueError, match="UID_999_1_1_all.bmp.*--skip-bad"):
        evaluate.evaluate_run(tiny_run_dir, small_training_tree, split="train", output_dir=tmp_path / "o",
                              n_boot=0, publish=False, progress=False)
    folder = evaluate.evaluate_run(tiny_run_dir, small_training_tree, split="train", output_dir=tmp_path / "o",
                                   skip_bad=True, n_boot=0, publish=False, progress=False)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [Path(s["path"]).name for s in metrics["skipped"]] == [bad.name]
    assert metrics["n"] == 6 and metrics["n_scanned"] == 7
    assert "could not be decoded" in (folder / "report.md").read_text()
    assert "trained on" in metrics["split_note"]


def test_model_size_not_matching_its_config(tiny_run_dir, tmp_path, synthetic_root):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    settings = json.loads((run / "config.json").read_text())
    settings["image_size"] = 64
    (run / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="image_size 64.*32x32"):
        evaluate.evaluate_run(run, synthetic_root, output_dir=tmp_path / "o", n_boot=0, progress=False)


def test_model_path_errors(tmp_path, tiny_run_dir, synthetic_root):
    with pytest.raises(FileNotFoundError, match="without model.keras"):
        evaluate.evaluate_run(tmp_path, synthetic_root, output_dir=tmp_path / "o")
    lone = tmp_path / "lone" / "model.keras"
    lone.parent.mkdir()
    shutil.copy(tiny_run_dir / "model.keras", lone)
    with pytest.raises(ValueError, match="--threshold 0.5"):  # no config.json: auto has nothing to use
        evaluate.evaluate_run(lone, synthetic_root, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        evaluate.evaluate_run(tiny_run_dir, synthetic_root, threshold="1.5", output_dir=tmp_path / "o")


def test_no_labeled_cells(tiny_run_dir, synthetic_root, tmp_path):
    testing = synthetic_root / config.TESTING_DIR
    for split in ("validation", "test-labeled"):
        with pytest.raises(ValueError, match="no labeled|holds no labeled"):
            evaluate.evaluate_run(tiny_run_dir, testing, split=split, output_dir=tmp_path / "o")
    assert not (tmp_path / "o" / config.EVALUATIONS_SUBDIR).exists() or \
        not any((tmp_path / "o" / config.EVALUATIONS_SUBDIR).iterdir())


def test_labels_csv_not_covering_the_folder(tiny_run_dir, synthetic_root, tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    shutil.copytree(synthetic_root / config.VALIDATION_DIR, root / config.VALIDATION_DIR)
    csv_path = root / config.VALIDATION_DIR / config.VALIDATION_LABELS_CSV
    table = pd.read_csv(csv_path)
    table.iloc[1:].to_csv(csv_path, index=False)  # one image without its label row
    with pytest.raises(ValueError, match=config.VALIDATION_LABELS_CSV.replace(".", "\\.")):
        evaluate.evaluate_run(tiny_run_dir, root, output_dir=tmp_path / "o")


def test_test_labeled_refuses_the_runs_own_patients(tiny_run_dir, synthetic_root, tmp_path):
    run = json.loads((tiny_run_dir / "config.json").read_text())
    training = synthetic_root / "training_data"
    with pytest.raises(ValueError, match="--patients unseen"):
        evaluate.evaluate_run(tiny_run_dir, training, split="test-labeled", output_dir=tmp_path / "o")
    manifest = __import__("modules.data.layout", fromlist=["scan_dataset"]).scan_dataset(training)
    seen = set(run["train_patients"]) | set(run["val_patients"])
    unseen = sorted(set(manifest["patient_id"]) - seen)
    if not unseen:  # every training patient was used by the run: nothing left to evaluate
        with pytest.raises(ValueError, match="no labeled cells left"):
            evaluate.evaluate_run(tiny_run_dir, training, split="test-labeled", patients="unseen",
                                  output_dir=tmp_path / "o")
    else:
        folder = evaluate.evaluate_run(tiny_run_dir, training, split="test-labeled", patients="unseen",
                                       output_dir=tmp_path / "o", n_boot=0, publish=False, progress=False)
        predictions = pd.read_csv(folder / "predictions.csv", dtype={"patient_id": str})
        assert set(predictions["patient_id"]) == set(unseen)
    with pytest.raises(ValueError, match="patients NOPE"):
        evaluate.evaluate_run(tiny_run_dir, training, split="train", patients="NOPE", output_dir=tmp_path / "o")


def test_validation_split_warns_about_the_runs_own_patients(tmp_path):
    """C-NMC's validation patients are new; a folder where they are not gets a warning, not silence."""
    manifest = pd.DataFrame({"path": ["1.bmp", "2.bmp", "3.bmp"], "name": ["1.bmp", "2.bmp", "3.bmp"],
                             "original_name": ["UID_11_1_1_all.bmp", "UID_H3_1_1_hem.bmp", "UID_50_1_1_all.bmp"],
                             "patient_id": ["11", "H3", "50"], "label": pd.array([1, 0, 1], dtype="Int8"),
                             "split": "validation", "fold": pd.array([None] * 3, dtype="Int8")})
    run = {"train_patients": ["11"], "val_patients": ["H3"]}
    with pytest.warns(UserWarning, match=r"patients 11, H3 .* were used to train or validate this run"):
        rows, _ = evaluate.select_cells(manifest, "validation", tmp_path, run, None)
    assert len(rows) == 3
    rows, _ = evaluate.select_cells(manifest, "validation", tmp_path, run, "unseen")
    assert list(rows["patient_id"]) == ["50"]


def test_train_split_counts_the_runs_patients(tiny_run_dir, synthetic_root, tmp_path):
    folder = evaluate.evaluate_run(tiny_run_dir, synthetic_root / "training_data", split="train",
                                   output_dir=tmp_path / "o", n_boot=0, publish=False, progress=False)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["cells_from_run_training_patients"] + metrics["cells_from_run_validation_patients"] \
        + metrics["cells_from_unseen_patients"] == metrics["n"]
    assert metrics["cells_from_run_training_patients"] > 0
    assert "trained on" in (folder / "report.md").read_text()
    assert np.isfinite(metrics["roc_auc"])
