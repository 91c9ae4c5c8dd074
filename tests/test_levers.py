"""The settings measured against unseen subjects: per-cell colour standardization, a strided stem, the
subject-weighted and sensitivity thresholds, the nucleus target and cross-validation variants."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from modules import metrics
from modules.evaluation import cv
from modules.modeling import network, saving


def test_cell_standardization_removes_a_stain_change_and_keeps_the_background(tmp_path):
    rng = np.random.default_rng(3)
    image = np.zeros((1, 8, 8, 3), "float32")
    image[0, 2:6, 2:7] = rng.integers(60, 200, (4, 5, 3))
    paler = np.where(image > 0, image * 0.7 + 30, 0)  # the same cell, another subject's stain strength
    layer = network.CellStandardization()
    standardized, cell = layer(image).numpy()[0], image[0].max(-1) > 4
    np.testing.assert_allclose(standardized[cell].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(layer(paler).numpy()[0], standardized, atol=0.05)
    assert (standardized[~cell] == 0).all()
    assert (layer(np.zeros((1, 4, 4, 3))).numpy() == 0).all()  # no cell: no division by zero
    model = network.build_anna((32, 32, 3), depth=2, base_filters=4, input_transform="cell_standardized")
    model.save(tmp_path / "m.keras")
    cells = paler.repeat(4, 1).repeat(4, 2)
    np.testing.assert_allclose(saving.predict_outputs(saving.load_model(tmp_path / "m.keras"), cells)["p_leukemia"],
                               saving.predict_outputs(model, cells)["p_leukemia"], atol=1e-6)


def test_a_model_with_a_stem_saves_loads_safely_and_keeps_the_mask_size(tmp_path):
    model = network.build_anna((64, 64, 3), depth=2, base_filters=4, stem_stride=2)
    assert model.get_layer("stem_conv").strides == (2, 2)
    assert model.get_layer("down0_conv1").output.shape[1] == 32  # the U-Net works at half the side
    model.save(tmp_path / "m.keras")
    loaded = saving.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3)).astype("float32")
    out = saving.predict_outputs(loaded, x)
    assert out["cell_mask"].shape == (2, 64, 64)
    np.testing.assert_allclose(out["p_leukemia"], saving.predict_outputs(model, x)["p_leukemia"], atol=1e-6)
    with pytest.raises(ValueError, match="divisible by stem_stride"):
        network.build_anna((36, 36, 3), depth=2, stem_stride=2)
    with pytest.raises(ValueError, match="unknown input transform"):
        network.build_anna((32, 32, 3), depth=2, input_transform="hed")


def test_subject_weighted_youden_is_not_pulled_by_one_large_subject():
    # One healthy subject with 200 cells scored low, four with 5 cells each scored 0.6: by cells the threshold
    # lands low (the four small subjects' 20 cells cost little), by subjects above them (four of five subjects).
    scores = np.r_[np.full(200, 0.1), np.full(20, 0.6), np.full(50, 0.9), np.linspace(0.3, 0.55, 50)]
    labels = np.r_[np.zeros(220), np.ones(100)].astype(int)
    groups = np.r_[["H0"] * 200, np.repeat(["H1", "H2", "H3", "H4"], 5), ["L0"] * 50, ["L1"] * 50]
    by_cells = metrics.youden_threshold(labels, scores)
    by_subjects = metrics.youden_threshold(labels, scores, groups)
    assert by_cells == pytest.approx(0.3) and by_subjects == pytest.approx(0.9)


def test_sensitivity_threshold_rests_on_the_blasts_alone():
    # 10 blasts scored 1.0 ... 0.1, and healthy cells anywhere: 9 of 10 blasts lie at or above 0.2.
    blasts = np.linspace(1.0, 0.1, 10)
    for healthy in (np.zeros(5), np.full(40, 0.95)):
        labels = np.r_[np.ones(10), np.zeros(healthy.size)].astype(int)
        threshold = metrics.choose_threshold(labels, np.r_[blasts, healthy], "sensitivity", target_sensitivity=0.9)
        assert threshold == pytest.approx(0.2)
        assert (blasts >= threshold).mean() == pytest.approx(0.9)
    assert metrics.sensitivity_threshold(np.ones(10), blasts, 1.0) == pytest.approx(0.1)
    with pytest.raises(metrics.EvaluationError, match="positive cells"):
        metrics.sensitivity_threshold(np.zeros(3), np.zeros(3), 0.9)
    with pytest.raises(metrics.EvaluationError, match="target"):
        metrics.sensitivity_threshold(np.ones(3), np.zeros(3), 1.5)


def test_cv_variants_are_parsed_checked_and_named():
    name, settings = cv.parse_variant("cstd", "input_transform=cell_standardized,augment=false,image_size=192,"
                                              "mask_loss_weight=0.5")
    assert name == "cstd" and settings == {"input_transform": "cell_standardized", "augment": False,
                                           "image_size": 192, "mask_loss_weight": 0.5}
    assert cv.parse_variant("c256", "canvas=256")[1] == {"canvas": 256}  # preprocessing, not a model setting
    with pytest.raises(cv.CrossValidationError, match="KEY=VALUE"):
        cv.parse_variant("x", "seed=3")
    with pytest.raises(cv.CrossValidationError, match="other than"):
        cv.parse_variant("anna", "stem_stride=2")
    with pytest.raises(cv.CrossValidationError, match="not listed in --models"):
        cv.run_cv("unused", "unused", models=("anna",), variants={"s192": {"image_size": 192}})


@pytest.mark.slow
def test_a_nucleus_target_run_trains_records_and_is_scored_against_its_target(synthetic_root, tmp_path):
    from modules.evaluation import predict
    from modules.modeling.training import train_model

    run_dir = train_model(synthetic_root, image_size=32, epochs=1, batch_size=16, base_filters=4, depth=2,
                          output_dir=tmp_path, seed=1, verbose=0, mask_target="nucleus")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["training"]["mask_target"] == "nucleus"
    assert 0 <= config["training"]["nucleus_fallbacks"] <= config["data"]["count"]
    assert predict.load_predictor(run_dir).settings["mask_target"] == "nucleus"


def test_a_sensitivity_rule_run_stores_the_threshold_of_its_validation_blasts(synthetic_root, tmp_path):
    from modules.modeling import training

    run_dir = training.train_model(synthetic_root, image_size=32, epochs=1, batch_size=16, base_filters=4, depth=2,
                                   output_dir=tmp_path, seed=2, verbose=0, threshold_rule="sensitivity",
                                   target_sensitivity=0.8)
    run = json.loads((run_dir / saving.CONFIG_FILENAME).read_text())
    val = pd.read_csv(run_dir / saving.VAL_PREDICTIONS_FILENAME)
    assert run["threshold"] == pytest.approx(metrics.sensitivity_threshold(val["label"], val["p_leukemia"], 0.8))
    assert (val.loc[val["label"] == 1, "p_leukemia"] >= run["threshold"]).mean() >= 0.8
    assert run["threshold_method"].startswith("sensitivity_0.8_on_validation")
    with pytest.raises(ValueError, match="target_sensitivity"):
        training.train_model(synthetic_root, image_size=32, epochs=1, output_dir=tmp_path, target_sensitivity=1.5)


def test_the_gpu_preset_builds_a_larger_network_at_384_px():
    from modules import config
    from modules.modeling import training

    settings = training.resolve_settings(config.PRESETS["gpu"])
    model = training.build_model(settings)
    assert model.input_shape == (None, 384, 384, 3) and model.get_layer("stem_conv").strides == (2, 2)
    assert model.get_layer("cell_mask").output.shape[1:3] == (384, 384)
    default = training.build_model(training.resolve_settings({}))
    assert model.count_params() > 3 * default.count_params()  # twice the filters at every level
