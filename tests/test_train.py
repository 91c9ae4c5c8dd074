"""Training runs: run folder, safe reload, patient splits, bad input, settings, resume, CLI, MirroredStrategy."""
from __future__ import annotations

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
from modules.data import splits  # noqa: E402
from modules.metrics import youden_threshold  # noqa: E402
from modules.modeling import saving  # noqa: E402
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
    assert not list(run.glob("*.partial*")) and not (run / "backup").exists()  # backup: only while unfinished
    cfg = saving.load_run(run)
    for key in ("run_id", "created", "image_size", "margin", "background_threshold", "threshold",
                "threshold_method", "val_patients", "train_patients", "split_method", "seed", "policy",
                "strategy", "model", "training", "data", "versions", "architecture"):
        assert key in cfg, key
    assert cfg["run_id"] == run.name and cfg["status"] == "complete"
    assert cfg["image_size"] == 32 and cfg["seed"] == 1 and cfg["architecture"] == "anna"
    assert cfg["model"]["base_filters"] == 4 and cfg["model"]["depth"] == 2
    assert cfg["data"]["synthetic"] is True and cfg["data"]["manifest_digest"]
    assert cfg["versions"]["keras"].startswith("3.")
    # The hardware in words, never a class repr such as _DefaultDistributionStrategy(1 replicas).
    assert cfg["strategy"].startswith("one device (") and cfg["hardware"].startswith(f"precision {cfg['policy']}")
    assert set(cfg["val_patients"]).isdisjoint(cfg["train_patients"])
    assert cfg["split_method"] == "fold"  # the synthetic set has three folds
    assert 0.0 <= cfg["threshold"] <= 1.0
    history = pd.read_csv(run / "history.csv")
    assert {"epoch", "loss", "val_loss", "learning_rate"} <= set(history.columns) and len(history) == 1
    # Epochs from 1, as Keras prints them: the one epoch is epoch 1, and its weights were kept.
    assert history["epoch"].tolist() == [1] and cfg["training"]["best_epoch"] == 1
    assert cfg["training"]["epochs_trained"] == 1
    predictions = pd.read_csv(run / "val_predictions.csv", dtype={"patient_id": str})
    assert list(predictions.columns) == ["path", "name", "patient_id", "label", "p_leukemia"]
    assert set(predictions["patient_id"]) == set(cfg["val_patients"])
    assert set(predictions["label"]) == {0, 1}
    assert predictions["p_leukemia"].between(0, 1).all()
    # Labels travel with file names: the suffix says the class.
    suffix = predictions["name"].str.extract(r"_(all|hem)\.\w+$", expand=False).map({"all": 1, "hem": 0})
    assert (suffix == predictions["label"]).all()
    # The threshold is Youden's J on exactly these predictions.
    assert cfg["threshold"] == pytest.approx(youden_threshold(predictions["label"], predictions["p_leukemia"]))


def test_saved_model_reproduces_val_predictions_in_a_fresh_process(tiny_run_dir):
    result = _run_python(f"""
        import json, keras, numpy as np, pandas as pd
        from modules import preprocessing
        run = {str(tiny_run_dir)!r}
        model = keras.saving.load_model(run + "/model.keras", safe_mode=True)
        cfg = json.load(open(run + "/config.json"))
        arrays = preprocessing.load_arrays(cfg["data"]["arrays_dir"])
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
    from modules import preprocessing

    arrays = preprocessing.load_arrays(preprocessing.prepare_arrays(synthetic_root, size=32, output_dir=session_output,
                                                                    progress=False))
    labels = np.asarray(arrays.labels).astype(int)
    split = splits.split_patients(arrays.manifest, labels)
    folds = arrays.manifest["fold"].to_numpy()
    assert split.method == "fold" and split.val_fold == int(np.nanmax(folds.astype(float)))
    assert set(folds[split.val_index]) == {split.val_fold}
    assert (arrays.manifest["split"].iloc[split.train_index] == "train").all()
    other = splits.split_patients(arrays.manifest, labels, val_fold=0)
    assert set(folds[other.val_index]) == {0}
    with pytest.raises(splits.SplitError, match="fold 7"):
        splits.split_patients(arrays.manifest, labels, val_fold=7)


def test_split_by_patients_is_stratified_and_never_by_image():
    manifest, labels = _manifest({"1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "H1": 0, "H2": 0, "H3": 0})
    for seed in range(5):
        split = splits.split_patients(manifest, labels, seed=seed)
        assert split.method == "patients_stratified"
        val_classes = {int(labels[i]) for i in split.val_index}
        assert val_classes == {0, 1}
        patients = manifest["patient_id"].to_numpy()
        assert set(patients[split.val_index]).isdisjoint(patients[split.train_index])
        assert len(split.val_index) + len(split.train_index) == len(manifest)
    named = splits.split_patients(manifest, labels, val_patients=["h2", "4"])
    assert named.val_patients == ["4", "H2"] and named.method == "patients"
    with pytest.raises(splits.SplitError, match="not among"):
        splits.split_patients(manifest, labels, val_patients=["99"])


def test_split_errors_name_the_missing_class():
    manifest, labels = _manifest({"1": 1, "2": 1, "H1": 0, "H2": 0})
    with pytest.raises(splits.SplitError, match="no hem"):
        splits.split_patients(manifest, labels, val_patients=["1"])
    with pytest.raises(splits.SplitError, match="one class only"):
        splits.split_patients(manifest, labels, val_patients=["H1", "H2"])
    one_hem, one_labels = _manifest({"1": 1, "2": 1, "H1": 0})
    with pytest.raises(splits.SplitError, match="only 1 hem patient"):
        splits.split_patients(one_hem, one_labels)
    all_only, all_labels = _manifest({"1": 1, "2": 1, "3": 1})
    with pytest.raises(splits.SplitError):
        splits.split_patients(all_only, all_labels)


# --------------------------------------------------------------------------- bad input
def test_bad_splits_fail_before_any_run_folder_is_made(synthetic_root, session_output, tmp_path):
    from modules import preprocessing

    manifest = preprocessing.load_arrays(preprocessing.prepare_arrays(
        synthetic_root, size=32, output_dir=session_output, progress=False)).manifest
    training = manifest[manifest["split"] == "train"]
    all_patients = sorted(set(training.loc[training["label"] == 1, "patient_id"]))
    hem_patients = sorted(set(training.loc[training["label"] == 0, "patient_id"]))
    runs = tmp_path / "runs"
    with pytest.raises(splits.SplitError, match="--val-patients"):
        train.train_model(synthetic_root, val_patients=all_patients[:1], output_dir=session_output,
                          runs_dir=runs, **TINY)
    with pytest.raises(splits.SplitError, match="one class only"):
        train.train_model(synthetic_root, val_patients=hem_patients, output_dir=session_output,
                          runs_dir=runs, **TINY)
    assert not runs.exists() or not any(runs.iterdir())


def test_arrays_and_manifest_of_different_lengths_are_refused(tiny_run_dir, tmp_path):
    arrays_dir = Path(saving.load_run(tiny_run_dir)["data"]["arrays_dir"])
    broken = tmp_path / "arrays_broken"
    shutil.copytree(arrays_dir, broken)
    manifest = pd.read_csv(broken / "manifest.csv", dtype=str)
    manifest.iloc[:-3].to_csv(broken / "manifest.csv", index=False)
    with pytest.raises(ValueError, match="manifest|arrays_broken"):
        train.train_model(broken, output_dir=tmp_path / "out", **TINY)
    assert not (tmp_path / "out" / "models").exists()


def test_arrays_prepared_with_another_canvas_are_refused(tiny_run_dir, tmp_path):
    arrays_dir = Path(saving.load_run(tiny_run_dir)["data"]["arrays_dir"])
    with pytest.raises(train.TrainingDataError, match="canvas"):
        train.train_model(arrays_dir, output_dir=tmp_path / "out", canvas=320, **TINY)
    assert not (tmp_path / "out" / "models").exists()


def test_cli_reports_bad_input_as_an_error(synthetic_root, tmp_path, capsys):
    code = cli.main(["train", "--data", str(synthetic_root), "--size", "32", "--out", str(tmp_path),
                     "--val-patients", "7"])
    assert code == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- settings
def test_defaults_come_from_the_settings_dataclasses():
    settings = train.resolve_settings({"epochs": 2, "depth": None})
    assert settings["epochs"] == 2  # given
    assert settings["depth"] == config.ModelSettings.depth and settings["batch_size"] == config.TrainSettings.batch_size
    legacy = train.resolve_settings({"architecture": "legacy", "patience": 9})
    assert legacy["patience"] == 2 and legacy["segmentation"] is False  # the older project's own
    with pytest.raises(TypeError, match="base_filter"):
        train.resolve_settings({"base_filter": 4})
    # The CLI's defaults are "not given", so train_model (or the run to resume) decides.
    args = cli.build_parser().parse_args(["train", "--data", "x"])
    assert args.batch_size is None and args.depth is None and args.base_filters is None and args.seed is None


# --------------------------------------------------------------------------- resume
def _toy_fit(run_dir: Path, interrupt_at: int | None = None, monkeypatch=None):
    """fit_model on a toy regression whose validation loss only rises: the LR is halved, then training stops."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    x = np.linspace(-1, 1, 32, dtype="float32")[:, None]
    train_data = tf.data.Dataset.from_tensor_slices((x, 2 * x)).batch(8)
    val_data = tf.data.Dataset.from_tensor_slices((x, -2 * x)).batch(8)  # learning y = 2x makes it worse
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    if interrupt_at is not None:
        def interrupt(self, epoch, logs=None):
            if epoch == interrupt_at:
                raise KeyboardInterrupt  # as if killed before this epoch
        monkeypatch.setattr(train.ThroughputTimer, "on_epoch_begin", interrupt)
    settings = {"architecture": "legacy", "patience": 3, "lr_patience": 1, "epochs": 12}
    state, _ = train.fit_model(model, lambda first_epoch: train_data, val_data, settings, run_dir, verbose=0)
    return model, state


def test_resume_restores_early_stopping_the_lr_schedule_and_the_history(tmp_path, monkeypatch):
    whole, whole_state = _toy_fit(tmp_path / "whole")
    expected = pd.read_csv(tmp_path / "whole" / "history.csv")
    assert expected["epoch"].tolist() == [1, 2, 3, 4]  # best epoch 1, patience 3
    assert expected["learning_rate"].iloc[-1] < expected["learning_rate"].iloc[0]
    assert whole_state.callbacks["early_stopping"].best_epoch == 0

    with pytest.raises(KeyboardInterrupt):
        _toy_fit(tmp_path / "resumed", interrupt_at=2, monkeypatch=monkeypatch)
    assert pd.read_csv(tmp_path / "resumed" / "history.csv")["epoch"].tolist() == [1, 2]
    monkeypatch.undo()
    resumed, resumed_state = _toy_fit(tmp_path / "resumed")
    history = pd.read_csv(tmp_path / "resumed" / "history.csv")
    # Same epochs (none twice), losses, learning rates and stop as the uninterrupted run.
    pd.testing.assert_frame_equal(history, expected, rtol=1e-6)
    assert resumed_state.callbacks["early_stopping"].best_epoch == 0
    for left, right in zip(resumed.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(left, right, rtol=1e-6)  # the best epoch's weights, restored

    # Killed after training stopped but before the run folder was finished: resuming trains no more.
    again, again_state = _toy_fit(tmp_path / "whole")
    assert len(again_state.rows) == 4
    for left, right in zip(again.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(left, right, rtol=1e-6)


def test_interrupted_cli_run_resumes_at_the_next_epoch(synthetic_root, session_output, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "modules", "train", "--data", str(synthetic_root), "--size", "32",
               "--epochs", "40", "--batch-size", "16", "--base-filters", "4", "--depth", "2", "--seed", "3",
               "--out", str(out)]
    log = (tmp_path / "train.log").open("w")  # a file, not a pipe nobody reads (a full pipe would block it)
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        backups: list[Path] = []
        while time.monotonic() < deadline and process.poll() is None:
            backups = list(out.glob("models/*/backup/state.json"))
            if backups:  # written last of an epoch's backup
                break
            time.sleep(0.5)
    finally:
        process.kill()
        process.wait()
        log.close()
    assert backups, "the run never finished an epoch"
    run = backups[0].parents[1]
    assert saving.load_run(run)["status"] == "running"
    done = max(map(int, train.read_state(run)))
    # history.csv is written before the epoch's backup, so a kill between the two leaves it one epoch ahead
    # of state.json (an epoch of these tiny runs takes under the poll's 0.5 s); the resume drops that row.
    assert pd.read_csv(run / "history.csv")["epoch"].max() in (done, done + 1)  # epochs from 1

    # A resumed run keeps its settings: another image size is refused before training.
    with pytest.raises(train.TrainingDataError, match="image_size=32"):
        train.train_model(synthetic_root, image_size=48, resume=run, output_dir=session_output, verbose=0)

    result = subprocess.run([sys.executable, "-m", "modules", "train", "--resume", str(run),
                             "--epochs", str(done + 1)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(run)  # the run folder is the last line
    cfg = saving.load_run(run)
    assert cfg["status"] == "complete" and cfg["seed"] == 3
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(1, done + 2))  # each epoch once, from 1
    assert 1 <= cfg["training"]["best_epoch"] <= done + 1 and cfg["training"]["epochs_trained"] == done + 1
    assert not (run / "backup").exists()  # only needed while the run was unfinished
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
    assert line == "STRATEGY mirrored over 2 devices (CPU:0, CPU:1) EPOCHS 1 STATUS complete"

