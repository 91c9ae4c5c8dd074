"""The notebook series: committed clean, same opening cells, and run end to end through papermill."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest

from modules import cli, config, notebooks
from modules.data import synthetic

NOTEBOOK_PATHS = [config.NOTEBOOKS_DIR / name for name in notebooks.NOTEBOOK_NAMES]
REQUIRED_PARAMETERS = {"DATA_DIR", "OUTPUT_DIR", "IMAGE_SIZE", "BASE_FILTERS", "DEPTH", "EPOCHS", "BATCH_SIZE",
                       "SEED", "MODEL_PATH", "SAMPLE_LIMIT", "SPLIT", "THRESHOLD", "SYNTHETIC_SCALE"}
#: Charts each notebook must publish to viz/ under a stable name.
EXPECTED_CHARTS = {
    "1.EDA": ["class_counts", "fold_counts", "patient_counts", "validation_balance", "image_sizes",
              "colour_statistics", "cell_area_intensity", "subject_cell_areas", "sample_grid"],
    "2.Image_preprocessing": ["preprocessing_steps", "resolution_comparison", "prepared_arrays"],
    "3.ANNa": ["model_diagram", "training_curves"],
    "4.Test": ["testing_predictions"],
}
#: Lines of TensorFlow's C++ start-up log (absl, oneDNN, CUDA probes): none may reach a notebook.
TF_LOG_MARKERS = ("oneDNN", "cuInit", "absl::", "TF_ENABLE_ONEDNN_OPTS", "cuda_dlopen", "computation_placer",
                  "Unable to register cu", "E0000 00:00")
EVALUATION_CHARTS = ["confusion_matrix", "roc_curve", "precision_recall_curve", "probability_histogram",
                     "calibration_curve", "per_patient_accuracy", "gradcam", "predicted_masks"]


def _code_cells(path: Path) -> list:
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def _outputs(path: Path) -> list[dict]:
    return [output for cell in _code_cells(path) for output in cell.get("outputs", [])]


def _text(outputs: list[dict]) -> str:
    parts = []
    for output in outputs:
        parts.append(output.get("text", ""))
        data = output.get("data", {})
        parts += [str(data.get("text/html", "")), str(data.get("text/plain", "")), str(data.get("text/markdown", ""))]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- committed notebooks
@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count; clear it"


def test_every_notebook_opens_with_the_same_cells():
    openings = [[cell.source for cell in _code_cells(path)[:4]] for path in NOTEBOOK_PATHS]
    assert all(opening == openings[0] for opening in openings)
    setup, parameters, imports, determinism = _code_cells(NOTEBOOK_PATHS[0])[:4]
    assert "google.colab" in setup.source and 'REPO_URL = ""' in setup.source
    assert "notebooks.setup_session(DRIVE_DATA_DIR)" in setup.source
    code_lines = [line for line in setup.source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code_lines) <= 14, f"the setup cell has {len(code_lines)} lines of code; keep it about a dozen"
    assert "parameters" in parameters.metadata.get("tags", [])
    # TensorFlow starts through modules.modeling (its C++ log silenced) before keras imports it.
    assert imports.source.index("from modules.modeling import") < imports.source.index("import keras")
    assert "keras.utils.set_random_seed(SEED)" in determinism.source
    # papermill must read every assignment (it skips a line with "=" in its comment, with a warning).
    assigned = set(re.findall(r"^([A-Z_]+) *=", parameters.source, flags=re.MULTILINE))
    for path in NOTEBOOK_PATHS:
        assert set(papermill.inspect_notebook(str(path))) == assigned == REQUIRED_PARAMETERS


def test_model_and_training_defaults_come_from_the_package():
    found = papermill.inspect_notebook(str(NOTEBOOK_PATHS[0]))
    for name in ("IMAGE_SIZE", "BASE_FILTERS", "DEPTH", "EPOCHS", "BATCH_SIZE", "SEED"):
        assert found[name]["default"].startswith(("ModelSettings.", "TrainSettings.")), (name, found[name])


def test_no_dead_links():
    for path in [*NOTEBOOK_PATHS, config.PROJECT_ROOT / "README.md"]:
        text = path.read_text()
        assert "<owner>" not in text and "github.com/" not in text, f"{path.name} links to a repository URL"


def test_setup_session_installs_only_when_an_import_is_missing(monkeypatch, tmp_path):
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(notebooks.subprocess, "run", lambda args, check: calls.append(args))
    notebooks.setup_session("")
    assert calls == [] and Path.cwd() == config.PROJECT_ROOT
    real_find_spec = notebooks.importlib.util.find_spec
    monkeypatch.setattr(notebooks.importlib.util, "find_spec",
                        lambda name: None if name == "cv2" else real_find_spec(name))
    notebooks.setup_session("")
    assert len(calls) == 1 and calls[0][-2:] == ["-r", str(config.PROJECT_ROOT / "requirements.txt")]


def test_describe_subjects():
    import pandas as pd

    table = pd.DataFrame({"patient_id": ["H1", "H2", "5"], "cells": [10, 40, 30], "label": [0, 0, 1],
                          "mixed_labels": [False, False, False], "accuracy": [0.9, 0.3, 0.8]})
    text = notebooks.describe_subjects(table)
    assert "2 healthy subjects: on average 60% of a subject's cells were called normal" in text
    assert "the worst, H2, 30% of its 40 cells" in text and "1 leukemic subject:" in text
    assert "no subject-level figures" in notebooks.describe_subjects(table.iloc[:0])


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_notebook_defines_no_functions(path):
    for cell in _code_cells(path):
        for line in cell.source.splitlines():
            assert not line.lstrip().startswith(("def ", "class ", "async def ")), (
                f"{path.name}: define functions in modules/, not in the notebook: {line}")


# ----------------------------------------------------------------------------- helpers
def test_parse_value():
    assert notebooks.parse_value("5") == 5 and isinstance(notebooks.parse_value("5"), int)
    assert notebooks.parse_value("0.5") == 0.5
    assert notebooks.parse_value("True") is True and notebooks.parse_value("None") is None
    assert notebooks.parse_value("auto") == "auto"


def test_select_notebooks():
    assert notebooks.select_notebooks(None) == list(notebooks.NOTEBOOK_NAMES)
    assert notebooks.select_notebooks(["4", "1.EDA"]) == ["1.EDA.ipynb", "4.Test.ipynb"]
    with pytest.raises(ValueError, match="no notebook '7'"):
        notebooks.select_notebooks(["7"])


def test_resolve_data_dir(tmp_path, monkeypatch, synthetic_root):
    assert notebooks.resolve_data_dir(synthetic_root) == synthetic_root.resolve()
    with pytest.raises(FileNotFoundError, match="input/README.md"):
        notebooks.resolve_data_dir(tmp_path / "missing")
    monkeypatch.setattr(config, "REAL_DATA_DIR", tmp_path / "no_real_data")
    made = notebooks.resolve_data_dir(None, output_dir=tmp_path / "out", scale="tiny")
    assert made == (tmp_path / "out" / "synthetic" / config.DATASET_FOLDER_NAME).resolve()
    assert synthetic.is_synthetic(made)
    marker = made / config.SYNTHETIC_MARKER
    stamp = marker.stat().st_mtime_ns
    assert notebooks.resolve_data_dir("", output_dir=tmp_path / "out", scale="tiny") == made
    assert marker.stat().st_mtime_ns == stamp  # reused, not drawn again
    real = tmp_path / "real" / config.DATASET_FOLDER_NAME
    real.mkdir(parents=True)
    monkeypatch.setattr(config, "REAL_DATA_DIR", real)
    assert notebooks.resolve_data_dir(None, output_dir=tmp_path / "out") == real.resolve()
    assert "SYNTHETIC" in notebooks.data_banner_html(made)
    assert "SYNTHETIC" not in notebooks.data_banner_html(real)


def _fake_run(models: Path, name: str, created: str, status: str = "complete") -> Path:
    run = models / name
    run.mkdir(parents=True)
    (run / "model.keras").write_bytes(b"placeholder")
    (run / "config.json").write_text(json.dumps({"run_id": name, "created": created, "status": status}))
    return run


def test_find_model_picks_the_newest_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="3.ANNa"):
        notebooks.find_model("", tmp_path)
    models = tmp_path / config.MODELS_SUBDIR
    _fake_run(models, "b-old", "2026-01-01T00:00:00+00:00")
    newest = _fake_run(models, "a-new", "2026-03-01T00:00:00+00:00")
    _fake_run(models, "c-running", "2026-05-01T00:00:00+00:00", status="running")
    assert notebooks.find_model(None, tmp_path) == newest
    assert notebooks.find_model(models / "b-old", tmp_path) == (models / "b-old").resolve()
    with pytest.raises(FileNotFoundError, match="MODEL_PATH"):
        notebooks.find_model(tmp_path / "nope", tmp_path)


def test_evaluation_split(synthetic_root):
    run = {"val_patients": ["11", "H3"]}
    assert notebooks.evaluation_split(synthetic_root, run)[:2] == ("validation", None)
    fold = synthetic_root / config.TRAINING_DIR / "fold_0"
    split, patients, note = notebooks.evaluation_split(fold, run)
    assert (split, patients) == ("train", ["11", "H3"]) and "optimistic" in note
    with pytest.raises(ValueError, match="no labeled validation_data"):
        notebooks.evaluation_split(fold, {})
    assert notebooks.evaluation_split(fold, run, "test-labeled")[0] == "test-labeled"


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_series_runs_end_to_end(notebook_series):
    output_dir, executed = notebook_series
    assert [p.name for p in executed] == list(notebooks.NOTEBOOK_NAMES)
    assert all(p.parent.parent == output_dir / config.NOTEBOOKS_SUBDIR for p in executed)
    viz_dir = output_dir / config.VIZ_SUBDIR
    index = (viz_dir / "index.html").read_text()
    for path in executed:
        outputs = _outputs(path)
        errors = [o for o in outputs if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
        text = _text(outputs)
        assert "SYNTHETIC DATA" in text, f"{path.name} shows no synthetic-data banner"
        shown_log = [marker for marker in TF_LOG_MARKERS if marker in text]
        assert not shown_log, f"{path.name} shows TensorFlow's C++ log ({shown_log})"
        assert not re.search(r"\b\d+\.000000\b", text), f"{path.name} prints a count as a float with 6 decimals"
        images = sum("image/png" in o.get("data", {}) for o in outputs)
        stem = path.stem
        expected = EXPECTED_CHARTS[stem] + (EVALUATION_CHARTS if stem == "4.Test" else [])
        assert images >= len(expected), f"{path.name} shows {images} images, expected at least {len(expected)}"
        for chart in EXPECTED_CHARTS[stem]:
            png = viz_dir / stem / f"{chart}.png"
            assert png.stat().st_size > 1000 and png.with_suffix(".csv").is_file(), png
            assert png.name in index
    runs = list((output_dir / config.MODELS_SUBDIR).iterdir())
    assert len(runs) == 1 and (runs[0] / "model.keras").is_file()
    evaluations = list((output_dir / config.EVALUATIONS_SUBDIR).iterdir())
    assert len(evaluations) == 1 and evaluations[0].name.startswith(runs[0].name)
    for chart in EVALUATION_CHARTS:
        assert (viz_dir / evaluations[0].name / f"{chart}.png").is_file(), chart
    metrics = json.loads((evaluations[0] / "metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["synthetic_data"] is True
    predictions = sorted((output_dir / config.PREDICTIONS_SUBDIR).glob(f"{runs[0].name}__*.csv"))
    testing = [p for p in predictions if not p.stem.endswith("_submission")]
    assert [p.name for p in testing] == [f"{runs[0].name}__synthetic_c-nmc_leukemia_test.csv"], predictions
    assert len(testing[0].read_text().splitlines()) == 1 + 10  # tiny set: 10 testing cells
    assert testing[0].with_name(testing[0].stem + "_submission.csv").is_file()
    # The notebooks ran with the parameters given, not their defaults.
    run_config = json.loads((runs[0] / "config.json").read_text())
    assert run_config["image_size"] == 32 and run_config["training"]["epochs"] == 1
    by_name = {path.stem: _text(_outputs(path)) for path in executed}
    # 3.ANNa says in words what hardware was chosen, and counts epochs from 1 as Keras prints them.
    assert f"trained with {run_config['hardware']}" in by_name["3.ANNa"]
    assert "DistributionStrategy" not in by_name["3.ANNa"]
    assert run_config["training"]["best_epoch"] == 1
    assert list(pd.read_csv(runs[0] / "history.csv")["epoch"]) == [1]
    # 4.Test: figures in words, subject-level figures, no NaN interval cells.
    assert "Of " in by_name["4.Test"] and "specificity" in by_name["4.Test"]
    assert "healthy subject" in by_name["4.Test"]
    assert "NaN" not in by_name["4.Test"]


@pytest.mark.slow
def test_test_notebook_runs_alone_on_a_saved_run(tiny_run_dir, synthetic_root, tmp_path):
    output_dir = tmp_path / "out"
    executed = notebooks.run_notebooks(synthetic_root, {"MODEL_PATH": str(tiny_run_dir), "SEED": 5}, output_dir,
                                       notebooks=["4"], progress=False)
    assert [p.name for p in executed] == ["4.Test.ipynb"]
    outputs = _outputs(executed[0])
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert str(tiny_run_dir) in _text(outputs)
    assert not (output_dir / config.MODELS_SUBDIR).exists()  # nothing was trained
    evaluations = list((output_dir / config.EVALUATIONS_SUBDIR).iterdir())
    assert len(evaluations) == 1 and evaluations[0].name.startswith(tiny_run_dir.name)
    assert (evaluations[0] / "report.html").is_file()


@pytest.mark.slow
def test_run_notebooks_cli_names_the_failing_notebook(synthetic_root, tmp_path, capsys):
    # No trained run in an empty output folder: 4.Test must fail with a message that says what to do.
    code = cli.main(["run-notebooks", "--data", str(synthetic_root), "--out", str(tmp_path), "--only", "4",
                     "--no-progress"])
    assert code == 1
    message = capsys.readouterr().err
    assert "4.Test.ipynb failed" in message and "no trained run" in message
    assert (tmp_path / config.NOTEBOOKS_SUBDIR).is_dir()


def test_unknown_parameter_is_refused_before_running(synthetic_root, tmp_path, capsys):
    code = cli.main(["run-notebooks", "--data", str(synthetic_root), "--out", str(tmp_path), "-p", "EPOCH", "2"])
    assert code == 2 and "unknown notebook parameter(s) EPOCH" in capsys.readouterr().err
    assert not (tmp_path / config.NOTEBOOKS_SUBDIR).exists()


def test_demo_and_run_notebooks_commands_are_registered():
    parser = cli.build_parser()
    args = parser.parse_args(["run-notebooks", "--data", "d", "-p", "EPOCHS", "2", "-p", "SPLIT", "train",
                              "--only", "3", "4"])
    assert args.parameters == [["EPOCHS", "2"], ["SPLIT", "train"]] and args.only == ["3", "4"]
    assert parser.parse_args(["demo"]).func is not None
    assert os.environ.get("JUPYTER_PATH") is None or "anna-kernel" not in os.environ["JUPYTER_PATH"]
