"""Files read back from a run or an arrays folder are checked, and bad ones are named with the key and the fix."""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from modules import cli, config
from modules.data import layout, schema
from modules.evaluation import predict
from modules.modeling import saving

RUN = {"run_id": "r1", "status": "complete", "image_size": 32, "margin": 4, "canvas": 0, "threshold": 0.4,
       "train_patients": ["1", "H2"], "val_patients": ["3"], "data": {"synthetic": True, "arrays_dir": "/a"},
       "training": {"epochs": 2, "epochs_trained": 2, "best_epoch": 1}}


def _write_run(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**RUN, **changes}))  # json writes NaN as NaN, as Python reads it
    return folder


def test_a_valid_run_passes_unchanged(tmp_path):
    assert saving.load_run(_write_run(tmp_path)) == RUN
    assert saving.load_run(_write_run(tmp_path, threshold=None, status="running"))["threshold"] is None


@pytest.mark.parametrize("threshold", [5.0, -1, math.nan, True, "0.5"])
def test_a_stored_threshold_out_of_range_or_not_a_number_is_refused(tmp_path, threshold):
    run = _write_run(tmp_path, threshold=threshold)
    with pytest.raises(saving.ModelFileError, match=r"config\.json: the key 'threshold' holds .*number from 0 to 1"):
        saving.load_run(run)


@pytest.mark.parametrize(("changes", "key"), [
    ({"train_patients": "1,H2"}, "train_patients"),  # a string: every id would be one character
    ({"val_patients": [3]}, "val_patients"),
    ({"data": "synthetic"}, "data"),
    ({"canvas": "wide"}, "canvas"),
    ({"image_size": 0}, "image_size"),
    ({"margin": 2.5}, "margin"),
    ({"training": {"epochs_trained": -1}}, "training.epochs_trained"),
    ({"status": "done"}, "status"),
])
def test_wrong_types_and_ranges_name_the_file_and_the_key(tmp_path, changes, key):
    run = _write_run(tmp_path, **changes)
    with pytest.raises(saving.ModelFileError, match=rf"{tmp_path / 'config.json'}: the key '{key}' holds"):
        saving.load_run(run)


def test_a_config_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(saving.ModelFileError, match=r"config\.json holds a list, not an object; restore"):
        saving.load_run(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(saving.ModelFileError, match=r"config\.json is not valid JSON"):
        saving.load_run(tmp_path)


def test_patients_stored_as_a_string_cannot_count_training_patients_as_unseen(tmp_path, synthetic_root):
    from modules.evaluation import evaluate

    run = _write_run(tmp_path / "run", train_patients="51,67", val_patients="45")
    (run / "model.keras").write_bytes(b"")
    with pytest.raises(ValueError, match="'train_patients' holds '51,67'"):
        evaluate.evaluate_run(run, synthetic_root, split="train", patients="unseen", output_dir=tmp_path / "o")


def test_the_stored_threshold_is_checked_before_any_prediction(tiny_run_dir, synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    stored = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**stored, "threshold": 5.0}))
    csv = tmp_path / "predictions.csv"
    testing = synthetic_root / config.TESTING_DIR
    assert cli.main(["predict", "--model", str(run), str(testing), "--csv", str(csv)]) == 2
    error = capsys.readouterr().err
    assert f"{run / 'config.json'}: the key 'threshold' holds 5.0" in error and "Traceback" not in error
    assert not csv.exists() and not csv.with_name("predictions_submission.csv").exists()  # no all-one-class file


# ----------------------------------------------------------------------------- backup/state.json
ENTRY = {"early_stopping": {"wait": 0, "best": 0.5, "best_epoch": 0, "stopped_epoch": 0},
         "reduce_lr": {"wait": 0, "best": 0.5, "cooldown_counter": 0},
         "best_weights": "best-epoch-0001.npz", "checkpoint": "epoch-0001.npz", "stopped": False}


@pytest.mark.parametrize(("state", "says"), [
    ('{"epochs": ', "is not valid JSON"),
    ('["1"]', "holds a list, not an object"),
    ("{}", "lacks the key 'epochs'"),
    (json.dumps({"epochs": {"one": ENTRY}}), "the key 'epochs' holds"),
    (json.dumps({"epochs": {"1": "done"}}), "the key 'epochs.1' holds a string, not an object"),
    (json.dumps({"epochs": {"1": {**ENTRY, "early_stopping": {"wait": "x"}}}}), "'epochs.1.early_stopping.wait'"),
    (json.dumps({"epochs": {"1": {k: v for k, v in ENTRY.items() if k != "checkpoint"}}}), "lacks the key"),
])
def test_a_broken_state_file_is_named_with_the_fix(tmp_path, state, says):
    from modules.modeling import training

    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "state.json").write_text(state)
    assert training.read_state(tmp_path / "none") == {}
    with pytest.raises(training.TrainingDataError, match=rf"state\.json.*{says}.*delete .*backup to train the run"):
        training.read_state(tmp_path)
    (tmp_path / "backup" / "state.json").write_text(json.dumps({"epochs": {"1": ENTRY}}))
    assert training.read_state(tmp_path) == {"1": ENTRY}


# ----------------------------------------------------------------------------- arrays: meta.json and .npy
@pytest.fixture()
def arrays_copy(synthetic_root, session_output, tmp_path) -> Path:
    from modules import preprocessing

    folder = preprocessing.prepare_arrays(synthetic_root, size=32, output_dir=session_output, progress=False)
    return Path(shutil.copytree(folder, tmp_path / "arrays"))


def test_a_pickled_or_foreign_array_is_named(arrays_copy):
    from modules import preprocessing

    good = np.array(preprocessing.load_arrays(arrays_copy).images)
    images = arrays_copy / "images.npy"
    images.write_bytes(pickle.dumps(np.zeros((2, 32, 32, 3), np.uint8)))  # never unpickled
    with pytest.raises(schema.SchemaError, match=rf"{images} is not an array file written by prepare.*pickled"):
        preprocessing.load_arrays(arrays_copy)
    np.save(images, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(schema.SchemaError, match=r"images\.npy holds float32 of shape \(2, 32, 32, 3\), not uint8"):
        preprocessing.load_arrays(arrays_copy)
    np.save(images, good)
    np.save(arrays_copy / "labels.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(schema.SchemaError, match=r"labels\.npy is not an array file"):
        preprocessing.load_arrays(arrays_copy)


@pytest.mark.parametrize(("change", "key"), [({"size": "32"}, "size"), ({"count": None}, "count"),
                                             ({"counts": []}, "counts"), ({"skipped": [{"path": 1}]}, "skipped.0")])
def test_a_meta_json_of_the_wrong_form_is_named(arrays_copy, change, key):
    from modules import preprocessing

    meta = json.loads((arrays_copy / "meta.json").read_text())
    (arrays_copy / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(schema.SchemaError, match=rf"meta\.json.*'{key}.*delete {arrays_copy} and run"):
        preprocessing.load_arrays(arrays_copy)


# ----------------------------------------------------------------------------- the command line
def test_out_pointing_at_a_file_is_refused_before_any_work(synthetic_root, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("")
    for out in (file, file / "below"):
        assert cli.main(["scan", "--data", str(synthetic_root), "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert f"{file} is a file, not a folder" in error and "Traceback" not in error


def test_a_file_name_that_is_not_utf8_is_named(shared_cnmc, tmp_path, capsys):
    cell = next((shared_cnmc / config.TRAINING_DIR / "fold_0" / "all").glob("*.png"))
    testing = tmp_path / "C-NMC_Leukemia" / config.TESTING_DIR / config.TESTING_IMAGES_DIR
    testing.mkdir(parents=True)
    shutil.copy(cell, testing / "1.png")
    shutil.copy(cell, os.fsdecode(bytes(testing) + b"/caf\xe9.png"))  # Latin-1 bytes: undecodable as UTF-8
    with pytest.raises(layout.DatasetError, match=r"caf\\xe9\.png: the name is not valid UTF-8"):
        layout.scan_dataset(testing.parent.parent)
    with pytest.raises(layout.DatasetError, match=r"caf\\xe9\.png"):
        predict.list_images(testing)
    assert cli.main(["scan", "--data", str(testing.parent.parent), "--out", str(tmp_path / "out")]) == 2
    assert "caf\\xe9.png: the name is not valid UTF-8" in capsys.readouterr().err
