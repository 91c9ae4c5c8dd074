"""Patient-disjoint training runs: run folder, safe reload, splits, bad input, resume, CLI, MirroredStrategy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tensorflow")

from modules import cli, config  # noqa: E402
from modules.modeling import network as anna_model  # noqa: E402
from modules.modeling import training as train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(image_size=32, epochs=1, batch_size=16, base_filters=4, depth=2, seed=1, verbose=0)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def _run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _manifest(patients: dict[str, int], cells: int = 3, fold: int | None = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rows = []
    for patient, label in patients.items():
        for i in range(cells):
            name = f"UID_{patient}_{i}_1_{config.CLASS_NAMES[label]}.bmp"
            rows.append({"path": f"/x/{name}", "name": name, "original_name": name, "patient_id": patient,
                         "label": label, "split": "train", "fold": fold})
    table = pd.DataFrame(rows)
    table["label"] = table["label"].astype("Int8")
    table["fold"] = table["fold"].astype("Int8")
    return table, table["label"].to_numpy(dtype=int)


# --------------------------------------------------------------------------- run folder
def test_run_folder_holds_model_config_history_and_val_predictions(tiny_run_dir):
    run = Path(tiny_run_dir)
    assert run.parent.name == config.MODELS_SUBDIR
    for name in ("model.keras", "config.json", "history.csv", "val_predictions.csv"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.partial*"))
    cfg = train.load_run(run)
    for key in ("run_id", "created", "image_size", "margin", "background_threshold", "threshold",
                "threshold_method", "val_patients", "train_patients", "split_method", "seed", "policy",
                "strategy", "model", "training", "data", "versions", "architecture"):
        assert key in cfg, key
    assert cfg["run_id"] == run.name and cfg["status"] == "complete"
    assert cfg["image_size"] == 32 and cfg["seed"] == 1 and cfg["architecture"] == "anna"
    assert cfg["model"]["base_filters"] == 4 and cfg["model"]["depth"] == 2
    assert cfg["data"]["synthetic"] is True and cfg["data"]["manifest_digest"]
    assert cfg["versions"]["keras"].startswith("3.")
    assert set(cfg["val_patients"]).isdisjoint(cfg["train_patients"])
    assert cfg["split_method"] == "fold"  # the synthetic set has three folds
    assert 0.0 <= cfg["threshold"] <= 1.0
    history = pd.read_csv(run / "history.csv")
    assert {"epoch", "loss", "val_loss"} <= set(history.columns) and len(history) == 1
    predictions = pd.read_csv(run / "val_predictions.csv", dtype={"patient_id": str})
    assert list(predictions.columns) == ["path", "name", "patient_id", "label", "p_leukemia"]
    assert set(predictions["patient_id"]) == set(cfg["val_patients"])
    assert set(predictions["label"]) == {0, 1}
    assert predictions["p_leukemia"].between(0, 1).all()
    # Labels travel with file names: the suffix says the class.
    suffix = predictions["name"].str.extract(r"_(all|hem)\.\w+$", expand=False).map({"all": 1, "hem": 0})
    assert (suffix == predictions["label"]).all()
    # The threshold is Youden's J on exactly these predictions.
    assert cfg["threshold"] == pytest.approx(train.youden_threshold(predictions["label"], predictions["p_leukemia"]))


def test_saved_model_reproduces_val_predictions_in_a_fresh_process(tiny_run_dir):
    result = _run_python(f"""
        import json, keras, numpy as np, pandas as pd
        from modules.preprocessing import cells as preprocess
        run = {str(tiny_run_dir)!r}
        model = keras.saving.load_model(run + "/model.keras", safe_mode=True)
        cfg = json.load(open(run + "/config.json"))
        arrays = preprocess.load_arrays(cfg["data"]["arrays_dir"])
        expected = pd.read_csv(run + "/val_predictions.csv")
        row_of = {{p: i for i, p in enumerate(arrays.manifest["path"].astype(str))}}
        rows = [row_of[p] for p in expected["path"]]
        out = model.predict(np.asarray(arrays.images[rows], "float32"), verbose=0)
        print("MAXDIFF", float(np.abs(out["p_leukemia"][:, 0] - expected["p_leukemia"].to_numpy()).max()))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    max_diff = float(result.stdout.split("MAXDIFF")[-1])
    assert max_diff < 1e-5


# --------------------------------------------------------------------------- splits
def test_split_by_fold_defaults_to_the_last_fold(synthetic_root, session_output):
    from modules.preprocessing import cells as preprocess

    arrays = preprocess.load_arrays(preprocess.prepare_arrays(synthetic_root, size=32, output_dir=session_output,
                                                              progress=False))
    labels = np.asarray(arrays.labels).astype(int)
    split = train.split_patients(arrays.manifest, labels)
    folds = arrays.manifest["fold"].to_numpy()
    assert split.method == "fold" and split.val_fold == int(np.nanmax(folds.astype(float)))
    assert set(folds[split.val_index]) == {split.val_fold}
    assert (arrays.manifest["split"].iloc[split.train_index] == "train").all()
    other = train.split_patients(arrays.manifest, labels, val_fold=0)
    assert set(folds[other.val_index]) == {0}
    with pytest.raises(train.SplitError, match="fold 7"):
        train.split_patients(arrays.manifest, labels, val_fold=7)


def test_split_by_patients_is_stratified_and_never_by_image():
    manifest, labels = _manifest({"1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "H1": 0, "H2": 0, "H3": 0})
    for seed in range(5):
        split = train.split_patients(manifest, labels, seed=seed)
        assert split.method == "patients_stratified"
        val_classes = {int(labels[i]) for i in split.val_index}
        assert val_classes == {0, 1}
        patients = manifest["patient_id"].to_numpy()
        assert set(patients[split.val_index]).isdisjoint(patients[split.train_index])
        assert len(split.val_index) + len(split.train_index) == len(manifest)
    named = train.split_patients(manifest, labels, val_patients=["h2", "4"])
    assert named.val_patients == ["4", "H2"] and named.method == "patients"
    with pytest.raises(train.SplitError, match="not among"):
        train.split_patients(manifest, labels, val_patients=["99"])


def test_split_errors_name_the_missing_class():
    manifest, labels = _manifest({"1": 1, "2": 1, "H1": 0, "H2": 0})
    with pytest.raises(train.SplitError, match="no hem"):
        train.split_patients(manifest, labels, val_patients=["1"])
    with pytest.raises(train.TrainingDataError, match="one class only"):
        train.split_patients(manifest, labels, val_patients=["H1", "H2"])
    one_hem, one_labels = _manifest({"1": 1, "2": 1, "H1": 0})
    with pytest.raises(train.SplitError, match="only 1 hem patient"):
        train.split_patients(one_hem, one_labels)
    all_only, all_labels = _manifest({"1": 1, "2": 1, "3": 1})
    with pytest.raises(train.TrainingDataError):
        train.split_patients(all_only, all_labels)


# --------------------------------------------------------------------------- bad input
def test_bad_splits_fail_before_any_run_folder_is_made(synthetic_root, session_output, tmp_path):
    from modules.preprocessing import cells as preprocess

    manifest = preprocess.load_arrays(preprocess.prepare_arrays(
        synthetic_root, size=32, output_dir=session_output, progress=False)).manifest
    training = manifest[manifest["split"] == "train"]
    all_patients = sorted(set(training.loc[training["label"] == 1, "patient_id"]))
    hem_patients = sorted(set(training.loc[training["label"] == 0, "patient_id"]))
    runs = tmp_path / "runs"
    with pytest.raises(train.SplitError, match="--val-patients"):
        train.train_model(synthetic_root, val_patients=all_patients[:1], output_dir=session_output,
                          runs_dir=runs, **TINY)
    with pytest.raises(train.TrainingDataError, match="one class only"):
        train.train_model(synthetic_root, val_patients=hem_patients, output_dir=session_output,
                          runs_dir=runs, **TINY)
    assert not runs.exists() or not any(runs.iterdir())


def test_arrays_and_manifest_of_different_lengths_are_refused(tiny_run_dir, tmp_path):
    arrays_dir = Path(train.load_run(tiny_run_dir)["data"]["arrays_dir"])
    broken = tmp_path / "arrays_broken"
    shutil.copytree(arrays_dir, broken)
    manifest = pd.read_csv(broken / "manifest.csv", dtype=str)
    manifest.iloc[:-3].to_csv(broken / "manifest.csv", index=False)
    with pytest.raises(ValueError, match="manifest|arrays_broken"):
        train.train_model(broken, output_dir=tmp_path / "out", **TINY)
    assert not (tmp_path / "out" / "models").exists()


def test_arrays_prepared_with_another_canvas_are_refused(tiny_run_dir, tmp_path):
    arrays_dir = Path(train.load_run(tiny_run_dir)["data"]["arrays_dir"])
    with pytest.raises(train.TrainingDataError, match="canvas"):
        train.train_model(arrays_dir, output_dir=tmp_path / "out", canvas=320, **TINY)
    assert not (tmp_path / "out" / "models").exists()


def test_cli_reports_bad_input_as_an_error(synthetic_root, tmp_path, capsys):
    code = cli.main(["train", "--data", str(synthetic_root), "--size", "32", "--out", str(tmp_path),
                     "--val-patients", "7"])
    assert code == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- resume and CLI
def test_interrupted_cli_run_resumes_at_the_next_epoch(synthetic_root, session_output, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "modules", "train", "--data", str(synthetic_root), "--size", "32",
               "--epochs", "40", "--batch-size", "16", "--base-filters", "4", "--depth", "2", "--seed", "3",
               "--out", str(out)]
    log = (tmp_path / "train.log").open("w")  # a file, not a pipe nobody reads (a full pipe would block it)
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        state_files: list[Path] = []
        while time.monotonic() < deadline and process.poll() is None:
            state_files = list(out.glob("models/*/state.json"))
            if state_files and list(state_files[0].parent.glob("last-epoch-*.keras")):
                break
            time.sleep(0.5)
    finally:
        process.kill()
        process.wait()
        log.close()
    assert state_files, "the run never finished an epoch"
    run = state_files[0].parent
    assert train.load_run(run)["status"] == "running"
    state = json.loads((run / "state.json").read_text())
    last_epoch = state["last_epoch"]
    # state.json names the checkpoint written with it (older ones are removed after it is written).
    assert state["last_checkpoint"] == train.last_checkpoint_name(last_epoch)
    assert (run / state["last_checkpoint"]).is_file()

    # A model of another size than the arrays is refused before training.
    with pytest.raises(anna_model.ModelFileError, match="32x32"):
        train.train_model(synthetic_root, image_size=48, resume=run, output_dir=session_output, verbose=0)

    result = subprocess.run([sys.executable, "-m", "modules", "train", "--resume", str(run),
                             "--epochs", str(last_epoch + 2)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(run)  # the run folder is the last line
    cfg = train.load_run(run)
    assert cfg["status"] == "complete" and cfg["seed"] == 3
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(last_epoch + 2))
    assert not list(run.glob("last*.keras"))  # only needed while the run was unfinished
    with pytest.raises(train.TrainingDataError, match="finished already"):
        train.train_model(resume=run)


# --------------------------------------------------------------------------- distribution
def test_one_epoch_under_mirrored_strategy_on_two_logical_cpus(synthetic_root, session_output, tmp_path):
    result = _run_python(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
        from modules.modeling.training import train_model, load_run
        run = train_model({str(synthetic_root)!r}, image_size=32, epochs=1, batch_size=16, base_filters=4,
                          depth=2, seed=5, verbose=0, strategy="mirrored", output_dir={str(session_output)!r},
                          runs_dir={str(tmp_path / "runs")!r})
        cfg = load_run(run)
        print("STRATEGY", cfg["strategy"], "EPOCHS", cfg["training"]["epochs_trained"], "STATUS", cfg["status"])
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line == "STRATEGY MirroredStrategy(2 replicas) EPOCHS 1 STATUS complete"


def test_youden_threshold_never_comes_from_the_infinite_first_point():
    # roc_curve's first threshold is +inf; a constant (untrained) model must not store 1.0.
    assert train.youden_threshold(np.array([0, 1, 0, 1]), np.full(4, 0.7, dtype="float32")) == pytest.approx(0.7)
