"""The synthetic stand-in: Kaggle layout, determinism, and classes that differ only in shape/texture."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from modules import config
from modules.data.layout import CELL_NAME
from modules.data.synthetic import _Patient, _stain_gain, draw_cell, is_synthetic, make_synthetic_dataset


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _bmp_header(path: Path) -> tuple[int, int, int]:
    header = path.read_bytes()[:30]
    assert header[:2] == b"BM"
    width = int.from_bytes(header[18:22], "little", signed=True)
    height = int.from_bytes(header[22:26], "little", signed=True)
    return width, abs(height), int.from_bytes(header[28:30], "little")


def test_kaggle_layout(synthetic_root):
    assert synthetic_root.name == config.DATASET_FOLDER_NAME
    assert (synthetic_root / config.SYNTHETIC_MARKER).is_file()
    assert "SYNTHETIC" in (synthetic_root / config.SYNTHETIC_MARKER).read_text()
    training = synthetic_root / config.TRAINING_DIR
    assert sorted(p.name for p in training.iterdir()) == ["fold_0", "fold_1", "fold_2"]
    patients_seen: dict[str, str] = {}
    for fold in training.iterdir():
        assert sorted(p.name for p in fold.iterdir()) == ["all", "hem"]
        for class_dir in fold.iterdir():
            names = [p.name for p in class_dir.iterdir()]
            assert names and all(CELL_NAME.match(Path(n).stem) for n in names)
            assert all(n.endswith(f"_{class_dir.name}.bmp") for n in names)
            patients = {n.split("_")[1].upper() for n in names}
            assert len(patients) >= 2  # several patients per class in every fold
            for patient in patients:  # a patient lives in one fold only
                assert patients_seen.setdefault(patient, fold.name) == fold.name
    assert any(n.startswith("UID_h") for n in (p.name for p in training.rglob("*.bmp")))  # like the real h3

    validation = synthetic_root / config.VALIDATION_DIR
    images = sorted(p.name for p in (validation / config.VALIDATION_IMAGES_DIR).iterdir())
    assert sorted(images, key=lambda n: int(n.split(".")[0])) == [f"{i}.bmp" for i in range(1, len(images) + 1)]
    labels = pd.read_csv(validation / config.VALIDATION_LABELS_CSV, dtype=str)
    assert list(labels.columns) == list(config.VALIDATION_LABEL_COLUMNS)
    assert sorted(labels["new_names"]) == sorted(images)
    assert labels["new_names"].tolist() != [f"{i}.bmp" for i in range(1, len(images) + 1)]  # not in file order
    suffix = labels["Patient_ID"].str.extract(r"_(all|hem)\.bmp$")[0].map(config.CLASS_FOLDERS)
    assert (labels["labels"].astype(int) == suffix).all()
    assert not set(labels["Patient_ID"].str.split("_").str[1].str.upper()) & set(patients_seen)

    testing = sorted((synthetic_root / config.TESTING_DIR / config.TESTING_IMAGES_DIR).iterdir())
    assert len(testing) >= 8 and all(re.fullmatch(r"\d+\.bmp", p.name) for p in testing)

    for path in [*training.rglob("*.bmp")][:5] + testing[:2]:
        assert _bmp_header(path) == (450, 450, 24)  # 24-bit BMP, like the Kaggle files


def test_cells_look_like_real_ones(synthetic_root):
    from modules.preprocessing.cells import load_rgb

    for path in sorted(synthetic_root.rglob("*.bmp"))[:12]:
        rgb = load_rgb(path)
        cell = (rgb > config.BACKGROUND_THRESHOLD).any(axis=2)
        assert 0.04 < cell.mean() < 0.5
        assert (rgb[~cell] == 0).all()  # background exactly black
        assert rgb.max() < 200 and rgb[cell].mean() < 130  # low-valued stain, as in C-NMC
        mean = rgb[cell].mean(axis=0)
        assert mean[2] > mean[1] and mean[0] > mean[1]  # purple/blue


def test_deterministic_and_reused(synthetic_root, tmp_path):
    again = make_synthetic_dataset(tmp_path / "a", seed=7, scale="tiny")
    assert _tree_digest(again) == _tree_digest(synthetic_root)
    stamp = (again / config.SYNTHETIC_MARKER).stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path / "a", seed=7, scale="tiny") == again
    assert (again / config.SYNTHETIC_MARKER).stat().st_mtime_ns == stamp  # reused, not redrawn
    other = make_synthetic_dataset(tmp_path / "a", seed=8, scale="tiny")  # replaces the seed-7 tree
    assert other == again and "seed: 8" in (other / config.SYNTHETIC_MARKER).read_text()
    assert _tree_digest(other) != _tree_digest(synthetic_root)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name != config.DATASET_FOLDER_NAME]


def test_refuses_to_overwrite_real_data_and_bad_scale(tmp_path):
    (tmp_path / config.DATASET_FOLDER_NAME / "training_data").mkdir(parents=True)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_synthetic_dataset(tmp_path, seed=0, scale="tiny")
    with pytest.raises(ValueError, match="tiny, small"):
        make_synthetic_dataset(tmp_path / "x", scale="huge")


def test_is_synthetic(synthetic_root, tmp_path, shared_cnmc_bmp):
    assert is_synthetic(synthetic_root)
    assert is_synthetic(synthetic_root / "training_data" / "fold_1" / "hem")
    assert is_synthetic(next(synthetic_root.rglob("*.bmp")))
    assert not is_synthetic(tmp_path)
    assert not is_synthetic(shared_cnmc_bmp)


def _cell_statistics(n_patients: int = 12, cells_per_patient: int = 8):
    """Simple per-cell statistics and labels over freshly drawn patients of both classes."""
    rng = np.random.default_rng(123)
    rows, labels = [], []
    for index in range(n_patients):
        label = index % 2
        patient = _Patient(str(index), label, _stain_gain(rng), float(rng.uniform(0.9, 1.1)),
                           float(rng.uniform(0.8, 1.25)))
        for cell_index in range(cells_per_patient):
            rgb = draw_cell(np.random.default_rng([index, cell_index]), patient).astype(np.float32)
            pixels = rgb[(rgb > config.BACKGROUND_THRESHOLD).any(axis=2)]
            rows.append([*pixels.mean(axis=0), *pixels.std(axis=0), *np.median(pixels, axis=0)])
            labels.append(label)
    return np.array(rows), np.array(labels)


def test_no_single_colour_statistic_separates_the_classes():
    features, labels = _cell_statistics()
    for column in range(features.shape[1]):
        auc = roc_auc_score(labels, features[:, column])
        assert max(auc, 1 - auc) < 0.85, f"statistic {column} separates the classes (AUC {auc:.2f})"


def test_classes_differ_in_chromatin_texture_with_overlap():
    # Normal cells have coarse clumped chromatin (strong edges inside the nucleus), blasts fine
    # open chromatin: a tendency a model can learn, not a clean cut.
    import cv2

    from modules.preprocessing.cells import preprocess_image

    rng = np.random.default_rng(5)
    edge_share, labels = [], []
    for index in range(12):
        label = index % 2
        patient = _Patient(str(index), label, _stain_gain(rng), float(rng.uniform(0.9, 1.1)),
                           float(rng.uniform(0.8, 1.25)))
        for cell_index in range(8):
            image, mask = preprocess_image(draw_cell(np.random.default_rng([index, cell_index, 3]), patient), 64)
            gray = cv2.GaussianBlur(image.astype(np.float32).mean(axis=2), (0, 0), 0.8)
            magnitude = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
            inner = cv2.erode(mask, np.ones((5, 5), np.uint8)).astype(bool)
            edge_share.append(np.mean(magnitude[inner] / gray[inner].mean() > 0.5))
            labels.append(label)
    auc = roc_auc_score(np.array(labels) == 0, edge_share)
    assert 0.6 < auc < 0.97, auc
