"""``predict``: any cell images, C-NMC testing folders and the challenge submission."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest

from modules import cli, config
from modules.evaluation import predict
from modules.modeling import network as model
from modules.modeling import saving
from modules import preprocessing


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in config.IMAGE_EXTENSIONS)


def test_testing_folder_gives_one_row_per_image_and_a_submission(tiny_run_dir, synthetic_root, tmp_path, capsys):
    testing = synthetic_root / config.TESTING_DIR
    files = _images(testing)
    csv = tmp_path / "predictions.csv"
    code = cli.main(["predict", "--model", str(tiny_run_dir), str(testing), "--csv", str(csv)])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert Path(out[-1]) == csv.resolve()
    table = pd.read_csv(csv)
    assert len(table) == len(files)
    assert sorted(table["name"]) == sorted(f.name for f in files)
    threshold = json.loads((tiny_run_dir / "config.json").read_text())["threshold"]
    assert ((table["p_leukemia"] >= threshold).astype(int) == table["prediction"]).all()
    assert table["p_leukemia"].between(0, 1).all()
    submission_path = tmp_path / "predictions_submission.csv"
    assert any(str(submission_path) in line for line in out)
    submission = pd.read_csv(submission_path)
    assert list(submission.columns) == ["new_names", "labels"]
    assert len(submission) == len(files)
    assert [int(Path(n).stem) for n in submission["new_names"]] == sorted(int(f.stem) for f in files)
    by_name = dict(zip(table["name"], table["prediction"]))
    assert (submission["labels"] == submission["new_names"].map(by_name)).all()


def test_prediction_matches_the_training_arrays(tiny_run_dir, synthetic_root, tmp_path):
    """The same cells through prepare_arrays (the training path) give the same probabilities."""
    folder = synthetic_root / config.VALIDATION_DIR
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = predict.predict_images(tiny_run_dir / "model.keras", folder, progress=False)
    # The labels CSV beside the renamed cells is part of the layout: no warning about it.
    assert not [w for w in caught if "not an image" in str(w.message)]
    arrays_dir = preprocessing.prepare_arrays(folder, size=32, output_dir=tmp_path, progress=False)
    arrays = preprocessing.load_arrays(arrays_dir)
    reference = saving.predict_outputs(saving.load_model(tiny_run_dir), arrays.images)["p_leukemia"]
    expected = dict(zip(arrays.manifest["path"].astype(str), reference))
    got = table.set_index("path")["p_leukemia"]
    assert len(got) == len(expected)
    for path, p in expected.items():
        assert got[str(Path(path).resolve())] == pytest.approx(float(p), abs=1e-5)
    assert not table["testing"].any() and "submission" not in table.attrs


def test_new_cells_in_nested_folders_and_single_files(tiny_run_dir, synthetic_root, tmp_path, capsys):
    cells = _images(synthetic_root / "training_data" / "fold_0")[:4]
    new = tmp_path / "new cells"
    (new / "nested").mkdir(parents=True)
    shutil.copy(cells[0], new / "a.bmp")
    shutil.copy(cells[1], new / "nested" / "b.BMP")
    (new / "notes.txt").write_text("not an image")
    (new / "Thumbs.db").write_bytes(b"viewer cache")  # skipped without a word
    (new / ".ipynb_checkpoints").mkdir()  # Jupyter's hidden copies are not more cells
    shutil.copy(cells[0], new / ".ipynb_checkpoints" / "a.bmp")
    with pytest.warns(UserWarning, match=r"ignoring 1 file that is not an image \(notes\.txt\)"):
        table = predict.predict_images(tiny_run_dir, [new, cells[2]], progress=False)
    assert sorted(table["name"]) == sorted(["a.bmp", "b.BMP", cells[2].name])
    assert set(table["label_name"]) <= {"all", "hem"}
    assert cli.main(["predict", "--model", str(tiny_run_dir), str(cells[3])]) == 0
    assert cells[3].name in capsys.readouterr().out


def test_bad_images_and_paths(tiny_run_dir, synthetic_root, tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    for cell in _images(synthetic_root / config.TESTING_DIR)[:3]:
        shutil.copy(cell, folder / cell.name)
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="broken.png.*--skip-bad"):
        predict.predict_images(tiny_run_dir, folder, progress=False)
    table = predict.predict_images(tiny_run_dir, folder, skip_bad=True, progress=False)
    assert len(table) == 3
    assert [Path(s["path"]).name for s in table.attrs["skipped"]] == ["broken.png"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict.predict_images(tiny_run_dir, tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        predict.predict_images(tiny_run_dir, tmp_path / "empty", progress=False)
    not_a_model = tmp_path / "model.keras"
    not_a_model.write_text("not a zip")
    with pytest.raises(ValueError, match="not a Keras"):
        predict.predict_images(not_a_model, folder, threshold=0.5, progress=False)


def test_model_input_size_is_checked_against_the_run(tiny_run_dir, synthetic_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run_dir / "config.json", run / "config.json")
    model.build_anna((64, 64, 3), depth=2, base_filters=4).save(run / "model.keras")
    with pytest.raises(ValueError, match="image_size 32 but the model takes 64x64"):
        predict.predict_images(run, synthetic_root / config.TESTING_DIR, progress=False)


def test_testing_folder_without_csv_goes_to_a_new_file(tiny_run_dir, synthetic_root, tmp_path, capsys):
    testing = synthetic_root / config.TESTING_DIR / config.TESTING_IMAGES_DIR
    written = []
    for _ in range(2):
        assert cli.main(["predict", "--model", str(tiny_run_dir), str(testing), "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        written.append(Path(out[-1]))
        assert "submission" in out[-2]
    run_id = json.loads((tiny_run_dir / "config.json").read_text())["run_id"]
    assert written[0].parent == tmp_path / config.PREDICTIONS_SUBDIR
    assert written[0].name.startswith(f"{run_id}__") and written[1].stem == f"{written[0].stem}_2"
    for path in written:
        assert len(pd.read_csv(path.with_name(f"{path.stem}_submission.csv"))) == len(_images(testing))


def test_preprocessing_follows_the_run_config(synthetic_root):
    anna = model.build_anna((32, 32, 3), depth=2, base_filters=4)
    recorded = {"image_size": 32, "margin": 2, "background_threshold": 6, "canvas": 0}
    settings = predict.preprocessing_settings(anna, recorded, Path("run"))
    assert settings["recorded"] and settings["canvas"] == 0 and settings["margin"] == 2
    cell = _images(synthetic_root / config.TESTING_DIR)[0]
    image, mask = predict.prepare_cell(str(cell), settings)
    expected = preprocessing.preprocess_image(preprocessing.load_rgb(cell), 32, margin=2, threshold=6, canvas=0)
    assert (image == expected[0]).all() and (mask == expected[1]).all()
    with pytest.warns(UserWarning, match=r"run: no config.json beside it records margin, "
                                         r"background_threshold, canvas; .*predictions are wrong"):
        defaults = predict.preprocessing_settings(anna, {}, Path("run"))
    assert not defaults["recorded"] and defaults["canvas"] == config.DEFAULT_CANVAS


def test_a_model_trained_on_synthetic_cells_is_flagged(tiny_run_dir, synthetic_root, tmp_path, capsys):
    """The demo's model is synthetic: the terminal and every CSV row say so; a real run's model is not flagged."""
    cells = _images(synthetic_root / config.TESTING_DIR)[:3]
    csv = tmp_path / "synthetic.csv"
    with pytest.warns(UserWarning, match="trained on SYNTHETIC cells"):
        assert cli.main(["predict", "--model", str(tiny_run_dir), *map(str, cells), "--csv", str(csv)]) == 0
    assert set(pd.read_csv(csv)["model_trained_on"]) == {"synthetic"}
    real = tmp_path / "real_run"
    shutil.copytree(tiny_run_dir, real)
    run = json.loads((real / "config.json").read_text())
    (real / "config.json").write_text(json.dumps({**run, "data": {**run["data"], "synthetic": False}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        table = predict.predict_images(real, cells, csv=tmp_path / "real.csv", progress=False)
    assert table.attrs["warning"] is None
    assert set(pd.read_csv(tmp_path / "real.csv")["model_trained_on"]) == {"real"}
