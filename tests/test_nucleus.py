"""The nucleus mask derived from the stain: drawn cells everywhere, 100 real C-NMC cells where present."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
from scipy import ndimage

from modules import config
from modules.preprocessing import load_rgb, preprocess_image
from modules.preprocessing.nucleus import find_nucleus, nucleus_mask, nucleus_measures

#: Nucleus share of the cell taken as plausible for a C-NMC cell at 96 px (a fallback counts as outside).
PLAUSIBLE = (0.5, 0.98)


def drawn_cell(side: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A purple disk (nucleus) in a pale blue-grey disk (cytoplasm) on black: (rgb, cell mask, nucleus)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    radius = np.hypot(yy - side / 2, xx - side / 2)
    cell, nucleus = (radius < 0.45 * side).view(np.uint8), (radius < 0.36 * side).view(np.uint8)
    rgb = np.where(nucleus[..., None] > 0, (90, 40, 95), (70, 52, 84)) * cell[..., None]
    # Dense and light chromatin: the brightness varies, the hue does not.
    shade = 1 + 0.3 * cv2.GaussianBlur(rng.standard_normal((side, side)).astype(np.float32), (0, 0), 3)
    rgb = np.clip(rgb * shade[..., None], 0, 255).astype(np.uint8)
    return rgb, cell, nucleus


def test_drawn_cell_nucleus_found_despite_patchy_chromatin():
    rgb, cell, nucleus = drawn_cell()
    found = find_nucleus(rgb, cell)
    assert not found.fallback
    assert found.mask.dtype == np.uint8 and set(np.unique(found.mask)) <= {0, 1}
    overlap = np.logical_and(found.mask, nucleus).sum() / np.logical_or(found.mask, nucleus).sum()
    assert overlap > 0.9


def test_channel_order_does_not_matter():
    rgb, cell, _ = drawn_cell()
    np.testing.assert_array_equal(nucleus_mask(rgb, cell), nucleus_mask(rgb[..., ::-1], cell))


def test_unstained_or_empty_cells_fall_back_to_the_cell_mask():
    _, cell, _ = drawn_cell()
    grey = np.repeat((cell * 120)[..., None], 3, axis=2).astype(np.uint8)
    found = find_nucleus(grey, cell)
    assert found.fallback
    np.testing.assert_array_equal(found.mask, cell)
    empty = find_nucleus(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8))
    assert empty.fallback and not empty.mask.any()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        find_nucleus(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="mask"):
        find_nucleus(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8))


def test_measures():
    cell = np.zeros((10, 10), np.uint8)
    cell[:, :5] = 1
    nucleus = cell.copy()
    nucleus[:, 4] = 0
    assert nucleus_measures(nucleus, cell) == pytest.approx((0.8, 4.0))
    assert np.isnan(nucleus_measures(cell, cell)[1])


@pytest.fixture(scope="module")
def real_cells(shared_cnmc) -> list[tuple[np.ndarray, np.ndarray]]:
    """100 fold_0 cells at 96 px as ``prepare`` makes them, 50 per class, spread over the patients."""
    cells = []
    for folder in ("all", "hem"):
        paths = sorted((shared_cnmc / "training_data" / "fold_0" / folder).glob("*.png"))
        for path in paths[::len(paths) // 50][:50]:
            cells.append(preprocess_image(load_rgb(path), config.DEFAULT_IMAGE_SIZE))
    return cells


@pytest.mark.shared_data
def test_real_nuclei_are_one_solid_component_inside_the_cell_of_plausible_size(real_cells):
    plausible = 0
    for rgb, cell in real_cells:
        found = find_nucleus(rgb, cell)
        assert found.mask.shape == cell.shape and found.mask.dtype == np.uint8
        assert not (found.mask & (1 - cell)).any(), "the nucleus leaves the cell"
        if found.fallback:
            continue
        assert cv2.connectedComponents(found.mask, connectivity=8)[0] == 2, "the nucleus is not one component"
        # Holes of the cell mask itself (black pixels inside the cell) are no holes of the nucleus.
        assert not (ndimage.binary_fill_holes(found.mask) & cell & (1 - found.mask)).any(), "the nucleus has holes"
        share, _ = nucleus_measures(found.mask, cell)
        plausible += PLAUSIBLE[0] <= share <= PLAUSIBLE[1]
    assert plausible >= 0.95 * len(real_cells)


@pytest.mark.shared_data
def test_real_nuclei_leave_out_the_cytoplasm(real_cells):
    shares = [nucleus_measures(nucleus_mask(rgb, cell), cell)[0] for rgb, cell in real_cells]
    # The rim of cytoplasm is gone (not the cell mask again), yet most of the cell is nucleus.
    assert 0.75 < np.median(shares) < 0.95
