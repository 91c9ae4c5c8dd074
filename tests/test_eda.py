"""EDA and preprocessing illustrations: real numbers on real cells, duplicates found, charts saved."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from modules import config
from modules.data import layout as data
from modules.reporting import eda
from modules.preprocessing import cells as preprocess


@pytest.fixture(scope="module")
def real_manifest(shared_cnmc):
    return data.scan_dataset(shared_cnmc)


@pytest.mark.shared_data
def test_measure_images_on_real_cells(real_manifest):
    stats = eda.measure_images(real_manifest, limit=24, seed=1, progress=False)
    assert len(stats) == 24 and list(stats.columns) == list(eda.STAT_COLUMNS)
    assert set(stats["class"]) == {"all", "hem"}  # the sample is stratified by class
    assert (stats["height"] == 450).all() and (stats["width"] == 450).all()
    # ../shared/data/README.md: 11-23 % of a cell image's pixels are non-black.
    assert stats["cell_area_fraction"].between(0.05, 0.35).all()
    # Recompute one row by hand: mean of the non-background pixels.
    row = stats.iloc[0]
    rgb = preprocess.load_rgb(row["path"])
    cell = (rgb > config.BACKGROUND_THRESHOLD).any(axis=2)
    assert row["cell_area_px"] == cell.sum()
    assert row["cell_mean_r"] == pytest.approx(rgb[cell][:, 0].mean(), rel=1e-6)
    assert row["image_mean_b"] == pytest.approx(rgb[..., 2].mean(), rel=1e-6)
    assert stats["content_hash"].is_unique


@pytest.mark.shared_data
def test_find_duplicates_flags_identical_pixels_under_other_names(shared_cnmc, tmp_path):
    cells = sorted((shared_cnmc / config.TRAINING_DIR / "fold_0" / "all").glob("*.png"))[:3]
    fold = tmp_path / "C-NMC_Leukemia" / config.TRAINING_DIR / "fold_0"
    (fold / "all").mkdir(parents=True)
    (fold / "hem").mkdir()
    for cell in cells:
        shutil.copy(cell, fold / "all" / cell.name)
    # The first cell again under another patient's name, once as a blast, once as a normal cell.
    shutil.copy(cells[0], fold / "all" / "UID_99_1_1_all.png")
    shutil.copy(cells[0], fold / "hem" / "UID_H99_1_1_hem.png")
    stats = eda.measure_images(data.scan_dataset(fold.parent.parent), progress=False)
    duplicates = eda.find_duplicates(stats)
    assert len(duplicates) == 3 and duplicates["content_hash"].nunique() == 1
    assert (duplicates["copies"] == 3).all() and duplicates["label_conflict"].all()
    assert not duplicates["crosses_splits"].any()
    assert cells[0].name in set(duplicates["name"])
    assert eda.find_duplicates(stats[~stats["name"].str.startswith("UID_99")]).pipe(len) == 2


def test_counts_agree_with_the_manifest(synthetic_root, tmp_path):
    manifest = data.scan_dataset(synthetic_root)
    counts = eda.count_cells(manifest)
    assert counts["cells"].sum() == len(manifest)
    assert list(dict.fromkeys(counts["split"])) == ["train", "validation", "test"]
    summary = data.summarize(manifest, by="label")
    for split, name in (("train", "all"), ("train", "hem"), ("validation", "all")):
        expected = summary.loc[(summary["split"] == split) & (summary["class"] == name), "cells"].item()
        assert counts.loc[(counts["split"] == split) & (counts["class"] == name), "cells"].sum() == expected
    fig, table = eda.plot_class_counts(manifest, output_dir=tmp_path)
    assert table["cells"].sum() == len(manifest)
    fig, balance = eda.plot_validation_balance(manifest, output_dir=tmp_path)
    assert balance.groupby("split")["share_of_cells"].sum().round(6).eq(1).all()


def test_charts_are_saved_published_and_marked_synthetic(synthetic_root, tmp_path):
    manifest = data.scan_dataset(synthetic_root)
    eda.plot_patient_counts(manifest, output_dir=tmp_path)
    fig, steps = eda.plot_preprocessing_steps(manifest, n=2, size=32, output_dir=tmp_path)
    for run, name in (("1.EDA", "patient_counts"), ("2.Image_preprocessing", "preprocessing_steps")):
        staged = tmp_path / config.CHARTS_SUBDIR / run / f"{name}.png"
        published = tmp_path / config.VIZ_SUBDIR / f"{run}__{name}.png"
        assert staged.is_file() and staged.with_suffix(".csv").is_file()
        assert published.read_bytes() == staged.read_bytes()
        assert pd.read_csv(published.with_suffix(".csv")).shape[0] > 0
    index = (tmp_path / config.VIZ_SUBDIR / "index.html").read_text()
    assert "1.EDA__patient_counts.png" in index and "SYNTHETIC cells" in index
    assert "SYNTHETIC" in fig.get_suptitle()
    # The square kept is the box plus margins, at least the canvas, and fits the drawn cell.
    assert (steps["square_side"] >= np.maximum(steps[["box_width", "box_height"]].max(axis=1) + 2 * steps["margin"],
                                               getattr(config, "DEFAULT_CANVAS", 0))).all()
    assert steps["mask_fraction"].between(0.01, 1).all()


def test_resolution_comparison_uses_the_model_preprocessing(synthetic_root, tmp_path):
    manifest = data.scan_dataset(synthetic_root)
    fig, table = eda.plot_resolution_comparison(manifest, sizes=(96, 32), n=2, output_dir=tmp_path)
    assert sorted(table["size"].unique()) == [32, 96] and len(table) == 4
    assert set(table["bytes_per_image"]) == {96 * 96 * 3, 32 * 32 * 3}
    row = table[table["size"] == 32].iloc[0]
    _, mask = preprocess.preprocess_image(preprocess.load_rgb(row["path"]), 32)
    assert row["mask_fraction"] == pytest.approx(mask.mean())
