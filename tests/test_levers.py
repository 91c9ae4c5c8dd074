"""The settings measured against unseen subjects: optical-density input, stain augmentation, a strided stem,
subject weighting, the subject-weighted threshold, the nucleus target and cross-validation variants."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from modules import metrics
from modules.evaluation import cv
from modules.modeling import inputs, network, saving


def test_optical_density_is_beer_lambert_inside_the_cell_and_zero_outside():
    image = np.zeros((1, 4, 4, 3), "float32")
    image[0, :2] = [[[255, 127, 63]] * 4] * 2  # cell; the lower half stays black background
    density = network.OpticalDensity()(image).numpy()
    np.testing.assert_allclose(density[0, 0, 0], -np.log((np.array([255, 127, 63]) + 1) / 256), rtol=1e-6)
    assert (density[0, 2:] == 0).all()


def test_od_model_with_a_stem_saves_loads_safely_and_keeps_the_mask_size(tmp_path):
    model = network.build_anna((64, 64, 3), depth=2, base_filters=4, input_transform="od", stem_stride=2)
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


def test_stain_augmentation_is_the_identity_at_mid_draws_and_keeps_the_background():
    rng = np.random.default_rng(1)
    images = rng.integers(20, 250, (3, 8, 8, 3)).astype("float32")
    images[:, :2] = 0  # background rows
    masks = (images.max(-1, keepdims=True) > 4).astype("float32")
    no_flip = np.full((3, 3), 0.99, "float32")
    mid = np.concatenate([no_flip, np.full((3, inputs.AUGMENT_DRAWS - 3), 0.5, "float32")], 1)
    same, _ = inputs.augment_batch(tf.constant(images), tf.constant(masks), tf.constant(mid), colour="stain")
    np.testing.assert_allclose(same.numpy(), images, atol=1e-2)
    strong = np.concatenate([no_flip, np.zeros((3, inputs.RGB_DRAWS - 3)), np.ones((3, inputs.STAIN_DRAWS))], 1)
    changed, _ = inputs.augment_batch(tf.constant(images), tf.constant(masks), tf.constant(strong, tf.float32),
                                      colour="stain")
    assert (changed.numpy()[:, :2] == 0).all()  # the background stays black
    assert np.abs(changed.numpy()[:, 2:] - images[:, 2:]).mean() > 3  # more stain: the cell changed


def test_subject_weights_even_out_subjects_and_keep_classes_balanced():
    labels = np.array([1] * 100 + [1] * 4 + [0] * 16 + [0] * 0)
    subjects = np.array(["big"] * 100 + ["small"] * 4 + ["H1"] * 16)
    rows = np.arange(len(labels))
    weights = inputs.cell_weights(labels, rows, True, subjects)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[labels == 1].sum() == pytest.approx(weights[labels == 0].sum())
    big, small = weights[subjects == "big"].sum(), weights[subjects == "small"].sum()
    assert big / small == pytest.approx(np.sqrt(100 / 4))  # 1/sqrt(n) per cell: sqrt(n) per subject
    plain = inputs.cell_weights(labels, rows, True)
    np.testing.assert_allclose(plain[labels == 0], len(rows) / (2 * 16))  # = balanced_class_weights


def test_subject_weighted_youden_is_not_pulled_by_one_large_subject():
    # One healthy subject with 200 cells scored low, four with 5 cells each scored 0.6: by cells the threshold
    # lands low (the four small subjects' 20 cells cost little), by subjects above them (four of five subjects).
    scores = np.r_[np.full(200, 0.1), np.full(20, 0.6), np.full(50, 0.9), np.linspace(0.3, 0.55, 50)]
    labels = np.r_[np.zeros(220), np.ones(100)].astype(int)
    groups = np.r_[["H0"] * 200, np.repeat(["H1", "H2", "H3", "H4"], 5), ["L0"] * 50, ["L1"] * 50]
    by_cells = metrics.youden_threshold(labels, scores)
    by_subjects = metrics.youden_threshold(labels, scores, groups)
    assert by_cells == pytest.approx(0.3) and by_subjects == pytest.approx(0.9)


def test_cv_variants_are_parsed_checked_and_named():
    name, settings = cv.parse_variant("stain", "input_transform=od,subject_weighting=true,image_size=192,"
                                               "mask_loss_weight=0.5")
    assert name == "stain" and settings == {"input_transform": "od", "subject_weighting": True, "image_size": 192,
                                            "mask_loss_weight": 0.5}
    with pytest.raises(cv.CrossValidationError, match="KEY=VALUE"):
        cv.parse_variant("x", "seed=3")
    with pytest.raises(cv.CrossValidationError, match="other than"):
        cv.parse_variant("anna", "input_transform=od")
    with pytest.raises(cv.CrossValidationError, match="not listed in --models"):
        cv.run_cv("unused", "unused", models=("anna",), variants={"od": {"input_transform": "od"}})


@pytest.mark.slow
def test_a_nucleus_target_run_trains_records_and_is_scored_against_its_target(synthetic_root, tmp_path):
    from modules.evaluation import predict
    from modules.modeling.training import train_model

    run_dir = train_model(synthetic_root, image_size=32, epochs=1, batch_size=16, base_filters=4, depth=2,
                          output_dir=tmp_path, seed=1, verbose=0, mask_target="nucleus", colour_augment="stain",
                          subject_weighting=True, threshold_rule="subject_youden")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["training"]["mask_target"] == "nucleus" and config["training"]["subject_weighting"]
    assert "subjects_weighted_equally" in config["threshold_method"]
    assert predict.load_predictor(run_dir).settings["mask_target"] == "nucleus"
