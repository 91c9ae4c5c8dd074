"""The nucleus of one cell, found from the colour of its stain (a target and a measure for the U-Net).

C-NMC cells are stained Jenner–Giemsa-like: the nucleus is purple (it absorbs green, passes red and blue), the thin
rim and scraps of cytoplasm are pale blue-grey. Each pixel is scored by how purple it is, ``log R + log B - 2 log G``:
a log-chromaticity, unchanged when a pixel is darker or lighter, neither with dense against light chromatin (a plain
Otsu threshold on a hematoxylin or density channel splits the chromatin) nor where the cell's edge blends into the
black background. Pixels scoring at least ``RATIO`` of the cell's median score are nucleus (most of a C-NMC cell is
nucleus, so the median is a nucleus level); a closing, an opening, the largest component and hole filling make the
outline. A result outside ``MIN_SHARE`` … ``MAX_SHARE`` of the cell is no nucleus the rule can trust: the cell mask
is returned instead and flagged.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: A pixel is nucleus when its purple score is at least this share of the cell's median score. On
#: fold_0 at 96 px the cytoplasm it leaves out scores a median 0.63 of that level.
RATIO = 0.75
#: Nucleus area as a share of the cell outside which the rule falls back to the cell mask.
MIN_SHARE, MAX_SHARE = 0.3, 0.98
#: Cell area (pixels) the sizes below are tuned at: the median C-NMC cell cropped tight at 96 px.
REFERENCE_AREA = 6000
#: At the reference area: the score's smoothing (Gaussian sigma, pixels), the closing that fills pale chromatin
#: notches at the nucleus edge and the opening that cuts thin spurs into cytoplasm tails.
SIGMA, CLOSE, OPEN = 1.0, 11, 3
#: Fewer interior pixels than this, or a median score below ``MIN_SCORE`` (a grey, unstained image): no nucleus.
MIN_PIXELS, MIN_SCORE = 50, 0.2
#: log(1 + v) for every uint8 value: a table lookup is cheaper than the logarithm.
LOG_TABLE = np.log1p(np.arange(256, dtype=np.float32))


@dataclass(frozen=True)
class Nucleus:
    """A cell's nucleus mask and whether it is the cell mask because no nucleus was trusted."""

    mask: np.ndarray  # (H, W) uint8 0/1, inside the cell
    fallback: bool


def purple_score(rgb: np.ndarray, cell: np.ndarray, sigma: float) -> np.ndarray:
    """``log R + log B - 2 log G`` per pixel (symmetric in R and B: BGR works alike), smoothed inside the cell only
    (0 outside it): normalised by the smoothed mask, so that the black background does not pull the edge down."""
    logs = cv2.LUT(rgb, LOG_TABLE)
    weight = cell.astype(np.float32)
    score = (logs[..., 0] + logs[..., 2] - 2 * logs[..., 1]) * weight
    smoothed = cv2.GaussianBlur(score, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(weight, (0, 0), sigma), 1e-3)
    return smoothed * weight


def odd_kernel(side: float) -> np.ndarray:
    """An elliptic structuring element with an odd side of at least 3 pixels near ``side``."""
    size = max(3, int(round(side)) | 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def clean_outline(candidate: np.ndarray, scale: float) -> np.ndarray:
    """Close pale notches, cut thin spurs; the largest component with its holes filled (uint8 0/1)."""
    pad = int(CLOSE * scale) + 1  # the closing must not stick to the image's border
    padded = cv2.copyMakeBorder(candidate, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    padded = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, odd_kernel(CLOSE * scale))
    padded = cv2.morphologyEx(padded, cv2.MORPH_OPEN, odd_kernel(OPEN * scale))
    # Outer contours only: drawing the largest one filled keeps one component and fills its holes at once.
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = np.zeros_like(padded)
    if contours:
        cv2.drawContours(outline, [max(contours, key=cv2.contourArea)], -1, 1, cv2.FILLED)
    return outline[pad:-pad, pad:-pad]


def find_nucleus(rgb: np.ndarray, cell_mask: np.ndarray) -> Nucleus:
    """The nucleus of one cell (RGB or BGR, uint8) inside its mask; the cell mask, flagged, when untrusted."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or cell_mask.shape != rgb.shape[:2]:
        raise ValueError(f"find_nucleus needs an (H, W, 3) uint8 image and an (H, W) mask, not {rgb.dtype} "
                         f"{rgb.shape} and {cell_mask.shape}")
    rgb = np.ascontiguousarray(rgb)  # OpenCV refuses strided views such as rgb[..., ::-1]
    cell = (cell_mask > 0).view(np.uint8)
    fallback = Nucleus(cell.copy(), True)
    area = int(cell.sum())
    scale = np.sqrt(max(area, 1) / REFERENCE_AREA)
    score = purple_score(rgb, cell, SIGMA * scale)
    # The level is read away from the edge, where few pixels carry the score.
    interior = cv2.erode(cell, odd_kernel(3)) > 0
    level = float(np.median(score[interior])) if interior.sum() >= MIN_PIXELS else 0.0
    if level < MIN_SCORE:
        return fallback
    nucleus = clean_outline((score >= RATIO * level).view(np.uint8), scale) & cell
    if not MIN_SHARE <= nucleus.sum() / area <= MAX_SHARE:
        return fallback
    return Nucleus(nucleus, False)


def nucleus_mask(rgb: np.ndarray, cell_mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 0/1 nucleus of one cell, or its cell mask where none is trusted (see ``find_nucleus``)."""
    return find_nucleus(rgb, cell_mask).mask


def nucleus_measures(nucleus: np.ndarray, cell_mask: np.ndarray) -> tuple[float, float]:
    """Nucleus area as a share of the cell, and the nucleus-to-cytoplasm area ratio (NaN without cytoplasm)."""
    cell, area = int(np.count_nonzero(cell_mask)), int(np.count_nonzero(nucleus))
    cytoplasm = cell - area
    return (area / cell if cell else float("nan")), (area / cytoplasm if cytoplasm > 0 else float("nan"))


def nucleus_masks(images: np.ndarray, cell_masks: np.ndarray, progress: bool = False) -> tuple[np.ndarray, int]:
    """``nucleus_mask`` of every cell of prepared arrays, (N, S, S) uint8 0/1, and how many cells fell back."""
    from tqdm.auto import tqdm

    out, fallbacks = np.empty(np.shape(cell_masks), dtype=np.uint8), 0
    for row in tqdm(range(len(out)), desc="nucleus masks", unit="cell", disable=not progress, mininterval=1.0):
        found = find_nucleus(np.asarray(images[row]), np.asarray(cell_masks[row]))
        out[row], fallbacks = found.mask, fallbacks + found.fallback
    return out, int(fallbacks)
