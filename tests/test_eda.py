"""EDA and preprocessing illustrations: real numbers on real cells, duplicates found, charts saved."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from modules import config
from modules.data import layout as data
from modules.reporting import eda
from modules import preprocessing


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
    rgb = preprocessing.load_rgb(row["path"])
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
        published = tmp_path / config.VIZ_SUBDIR / run / f"{name}.png"
        assert staged.is_file() and staged.with_suffix(".csv").is_file()
        assert published.read_bytes() == staged.read_bytes()
        assert pd.read_csv(published.with_suffix(".csv")).shape[0] > 0
    index = (tmp_path / config.VIZ_SUBDIR / "index.html").read_text()
    assert "1.EDA/patient_counts.png" in index and "SYNTHETIC cells" in index
    assert "1.EDA — the cells of the data set" in index  # a heading a person reads, not a folder id
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
    _, mask = preprocessing.preprocess_image(preprocessing.load_rgb(row["path"]), 32)
    assert row["mask_fraction"] == pytest.approx(mask.mean())


def test_class_counts_list_splits_in_pipeline_order_without_zero_labels(synthetic_root, tmp_path):
    manifest = data.scan_dataset(synthetic_root)  # the testing cells are unlabeled: empty all/hem bars there
    fig, table = eda.plot_class_counts(manifest, output_dir=tmp_path)
    ax = fig.axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["train", "validation", "test"]
    labels = [text.get_text() for text in ax.texts]
    assert labels and "0" not in labels and "" in labels


def test_patients_are_listed_in_numeric_order():
    manifest = pd.DataFrame({"path": [f"p{i}" for i in range(6)], "label": pd.array([1, 1, 1, 0, 0, 1], "Int8"),
                             "patient_id": ["11", "3", "1", "H11", "H6", "35"], "split": "train", "fold": 0})
    summary = data.summarize(manifest, by="patient_id")
    assert summary["patient_id"].tolist() == ["1", "3", "11", "35", "H6", "H11"]


def test_model_diagram_draws_pools_between_blocks_and_every_level_into_the_head(tmp_path):
    from modules.modeling import network

    def image_box(figure) -> str:
        return next(text.get_text() for text in figure.axes[0].texts if text.get_text().startswith("image"))

    model = network.build_anna((32, 32, 3), depth=2, base_filters=4, stem_stride=1, input_transform="rgb")
    fig, blocks = eda.plot_model_diagram(model, output_dir=tmp_path, synthetic=True)
    assert image_box(fig).endswith("rescaled")
    order = blocks["block"].tolist()
    assert order.index("down0") < order.index("down0_pool") < order.index("down1") < order.index("down1_pool")
    shapes = blocks.set_index("block")["output_shape"]
    assert shapes["down0"] == "32x32x4" and shapes["down0_pool"] == "16x16x4"  # the pool is not inside its block
    head = next(text.get_text() for text in fig.axes[0].texts if text.get_text().startswith("head"))
    for level in ("down0", "down1", "bottleneck", "up0"):
        assert level in head
    caption = json.loads((tmp_path / config.CHARTS_SUBDIR / "3.ANNa" / "charts.json").read_text())["model_diagram"]
    assert "reads every level" in caption
    assert "stem" not in blocks["block"].tolist()
    # The defaults' strided stem is drawn between the image and the first block, at half its side.
    stemmed = network.build_anna((32, 32, 3), depth=2, base_filters=4, stem_stride=2)
    fig, blocks = eda.plot_model_diagram(stemmed, output_dir=tmp_path)
    shapes = blocks.set_index("block")["output_shape"]
    assert shapes["stem"] == "16x16x4" and shapes["down0"] == "16x16x4" and shapes["cell_mask"] == "32x32x1"
    assert any(text.get_text().startswith("stem: strided conv") for text in fig.axes[0].texts)
    standardized = network.build_anna((32, 32, 3), depth=2, base_filters=4, input_transform="cell_standardized")
    assert image_box(eda.plot_model_diagram(standardized, output_dir=tmp_path)[0]).endswith("standardized per cell")


@pytest.mark.shared_data
def test_testing_predictions_say_the_model_is_synthetic_and_the_cells_real(real_manifest, tmp_path):
    rows = real_manifest.head(4)
    predictions = pd.DataFrame({"path": rows["path"], "name": rows["name"], "p_leukemia": [0.2, 0.4, 0.6, 0.8],
                                "label_name": ["hem", "hem", "all", "all"], "model_trained_on": "synthetic"})
    predictions.attrs["threshold"] = 0.5
    fig, table = eda.plot_testing_predictions(predictions, n_examples=2, output_dir=tmp_path)
    assert "model trained on SYNTHETIC cells, scored on real cells" in fig.axes[0].get_title()
    assert table["cells"].sum() == 4
    index = (tmp_path / config.VIZ_SUBDIR / "index.html").read_text()
    assert "4.Test — predictions on the unlabeled testing cells [model trained on SYNTHETIC cells" in index


@pytest.mark.shared_data
def test_subject_cell_areas_chart_one_bar_per_subject(real_manifest, tmp_path):
    stats = eda.measure_images(real_manifest, limit=120, seed=2, progress=False)
    fig, table = eda.plot_subject_cell_areas(stats, output_dir=tmp_path)
    assert set(table["patient_id"]) == set(stats["patient_id"]) and table["patient_id"].is_unique
    assert table["median_cell_area_px"].is_monotonic_increasing and table["cells"].sum() == len(stats)
    one = table.iloc[-1]
    assert one["median_cell_area_px"] == stats.loc[stats["patient_id"] == one["patient_id"], "cell_area_px"].median()
    assert (tmp_path / config.VIZ_SUBDIR / eda.EDA_RUN / "subject_cell_areas.png").is_file()
    assert (tmp_path / config.VIZ_SUBDIR / eda.EDA_RUN / "subject_cell_areas.csv").is_file()
