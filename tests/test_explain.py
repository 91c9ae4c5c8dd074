"""Grad-CAM on ANNa models (Keras 3 Functional, dict outputs)."""
from __future__ import annotations

import numpy as np
import pytest

from modules.reporting import explain
from modules.modeling import network as model
from modules.modeling import saving
from modules import preprocessing


@pytest.fixture(scope="module")
def anna():
    import keras

    keras.utils.set_random_seed(3)
    return model.build_anna((32, 32, 3), depth=2, base_filters=4, dropout=0.0)


@pytest.fixture(scope="module")
def cell(synthetic_root) -> np.ndarray:
    path = sorted((synthetic_root / "training_data" / "fold_0" / "all").iterdir())[0]
    return preprocessing.preprocess_image(preprocessing.load_rgb(path), 32)[0]


def test_default_layer_feeds_the_classification_output(anna):
    name = explain.default_layer_name(anna)
    assert name == "bottleneck_conv2"  # the deepest convolution, not the segmentation head
    assert explain.default_layer_name(model.build_legacy((32, 32, 3))) == "bottleneck_conv2"


def test_grad_cam_is_a_non_constant_map_of_the_input_size(anna, cell):
    heatmap = explain.grad_cam(anna, cell)
    assert heatmap.shape == cell.shape[:2]
    assert heatmap.dtype == np.float32
    assert 0.0 <= heatmap.min() and heatmap.max() == pytest.approx(1.0)
    assert heatmap.std() > 0.01


def test_grad_cam_on_the_trained_run_and_the_bottleneck(tiny_run_dir, cell):
    trained = saving.load_model(tiny_run_dir)
    for layer in (None, "up0_conv2"):
        heatmap = explain.grad_cam(trained, cell, layer_name=layer)
        assert heatmap.shape == (32, 32) and heatmap.std() > 0.01
    # Evidence for ALL and evidence for HEM are different maps.
    assert not np.allclose(explain.grad_cam(trained, cell, target="leukemia"),
                           explain.grad_cam(trained, cell, target="normal"))


def test_batch_equals_single_images(anna, cell):
    images = np.stack([cell, np.rot90(cell).copy()])
    batch = explain.grad_cam_batch(anna, images)
    for image, heatmap in zip(images, batch):
        np.testing.assert_allclose(explain.grad_cam(anna, image), heatmap, atol=1e-5)


def test_given_classes_explain_each_cell_by_its_own_call(anna, cell):
    images = np.stack([cell, np.rot90(cell).copy()])
    batch = explain.grad_cam_batch(anna, images, target=np.array([1, 0]))
    np.testing.assert_allclose(batch[0], explain.grad_cam(anna, images[0], target="leukemia"), atol=1e-5)
    np.testing.assert_allclose(batch[1], explain.grad_cam(anna, images[1], target="normal"), atol=1e-5)
    with pytest.raises(ValueError, match="one 0 or 1 per image"):
        explain.grad_cam_batch(anna, images, target=np.array([1, 2]))


def test_legacy_model_and_bad_arguments(cell):
    legacy = model.build_legacy((32, 32, 3))
    assert explain.grad_cam(legacy, cell).shape == (32, 32)
    anna = model.build_anna((32, 32, 3), depth=2, base_filters=4)
    with pytest.raises(ValueError, match="does not feed"):
        explain.grad_cam(anna, cell, layer_name="cell_mask")
    with pytest.raises(ValueError, match="one \\(H,W,3\\) image"):
        explain.grad_cam(anna, cell[None])
    with pytest.raises(ValueError, match="target"):
        explain.grad_cam(anna, cell, target="blast")


def test_overlay_keeps_size_and_type(cell):
    heatmap = np.linspace(0, 1, 32 * 32, dtype="float32").reshape(32, 32)
    overlay = explain.overlay_heatmap(cell, heatmap)
    assert overlay.shape == cell.shape and overlay.dtype == np.uint8
