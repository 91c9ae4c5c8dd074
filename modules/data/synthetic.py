"""A procedural, deterministic stand-in for C-NMC 2019 in the Kaggle layout, marked as synthetic.

Blasts (``all``) get a larger nucleus, fine open chromatin and nucleoli; normal cells (``hem``) a thinner rim, clumped
chromatin and rarely a nucleolus, with overlap. Stain varies per patient alike in both classes, so only shape and
texture tell them apart.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from modules import config
from modules.files import staged_folder

IMAGE_SIDE = 450
#: Bumped whenever the drawing changes, so that a cached synthetic tree is redrawn.
GENERATOR_VERSION = 2
#: Share of cells drawn with the other class's morphology (real smears have such cells too).
ATYPICAL_FRACTION = 0.12
SYNTHETIC_BANNER = ("SYNTHETIC DATA: these cells are drawn procedurally by modules.synth, not taken from "
                    "patients; results on them say nothing about real leukemia images.")

# Patients and cells per part: (ALL patients, HEM patients, cells per patient (low, high)).
_PLANS = {
    "tiny": {"fold": ((2, (4, 6)), (2, (4, 6))), "validation": ((2, (4, 4)), (2, (4, 4))),
             "test": ((1, (5, 5)), (1, (5, 5)))},
    "small": {"fold": ((3, (20, 24)), (3, (14, 18))), "validation": ((3, (16, 16)), (2, (16, 16))),
              "test": ((2, (12, 12)), (2, (8, 8)))},
}


@dataclass(frozen=True)
class _Patient:
    patient_id: str  # as written in the file names (one healthy subject in lower case, like h3)
    label: int
    stain: tuple[float, float, float]  # per-patient RGB gain
    size_bias: float  # per-patient cell-size factor
    texture_gain: float  # per-patient chromatin contrast factor


def _stain_gain(rng: np.random.Generator) -> tuple[float, float, float]:
    brightness = rng.uniform(0.78, 1.18)
    return tuple(float(brightness * rng.uniform(0.92, 1.08)) for _ in range(3))


def _smooth_noise(rng: np.random.Generator, side: int, grain: float) -> np.ndarray:
    """Zero-mean, unit-std noise whose blobs are about ``grain`` pixels wide."""
    coarse = max(2, int(round(side / grain)))
    noise = rng.standard_normal((coarse, coarse)).astype(np.float32)
    noise = cv2.resize(noise, (side, side), interpolation=cv2.INTER_CUBIC)
    noise -= noise.mean()
    return noise / (noise.std() + 1e-6)


def _wobbly_disc(side: int, cy: float, cx: float, radius: float, rng: np.random.Generator,
                 wobble: float) -> np.ndarray:
    """Boolean mask of a slightly irregular disc (radius modulated by low harmonics)."""
    angle = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    edge = np.ones_like(angle)
    for harmonic in (2, 3, 4):
        edge += rng.uniform(0, wobble) * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))
    points = np.stack([cx + radius * edge * np.cos(angle), cy + radius * edge * np.sin(angle)], axis=1)
    mask = np.zeros((side, side), np.uint8)
    cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def draw_cell(rng: np.random.Generator, patient: _Patient) -> np.ndarray:
    """One segmented cell of the patient, (450, 450, 3) uint8 RGB on a background of exactly 0; one in eight
    (``ATYPICAL_FRACTION``) has the other class's morphology, as in real smears: no perfect score."""
    blast = (patient.label == 1) != (rng.random() < ATYPICAL_FRACTION)
    # Class tendencies with overlap: blasts are bigger, with a larger nuclear fraction.
    cell_radius = float(np.clip(rng.normal(100 if blast else 88, 15) * patient.size_bias, 55, 160))
    nc_ratio = float(np.clip(rng.normal(0.83 if blast else 0.78, 0.055), 0.62, 0.94))
    nucleus_radius = cell_radius * nc_ratio
    side = int(2 * cell_radius * 1.25) + 8
    centre = side / 2
    cell = _wobbly_disc(side, centre, centre, cell_radius, rng, 0.05)
    offset = (cell_radius - nucleus_radius) * rng.uniform(0.0, 0.7)
    direction = rng.uniform(0, 2 * np.pi)
    ny, nx = centre + offset * np.sin(direction), centre + offset * np.cos(direction)
    nucleus = _wobbly_disc(side, ny, nx, nucleus_radius, rng, 0.06) & cell

    # Chromatin: blasts fine and open, normal cells coarse and clumped (zero-mean either way, so the mean colour does
    # not give the class away).
    if blast:
        grain, contrast = rng.uniform(2.5, 5.5), rng.uniform(0.07, 0.17)
        texture = _smooth_noise(rng, side, grain)
    else:
        grain, contrast = rng.uniform(4.5, 9.0), rng.uniform(0.09, 0.19)
        texture = np.tanh(1.8 * _smooth_noise(rng, side, grain))
        texture = (texture - texture.mean()) / (texture.std() + 1e-6)
    contrast *= patient.texture_gain
    shade = 1.0 + contrast * texture

    # Nucleoli: pale round spots, common in blasts and rare in normal lymphocytes.
    nucleoli = np.zeros((side, side), np.float32)
    count = rng.choice([0, 1, 2, 3], p=[0.3, 0.35, 0.25, 0.1] if blast else [0.7, 0.22, 0.08, 0.0])
    for _ in range(count):
        angle, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55) * nucleus_radius
        spot = (nucleus_radius * rng.uniform(0.07, 0.12))
        cv2.circle(nucleoli, (int(nx + reach * np.cos(angle)), int(ny + reach * np.sin(angle))),
                   int(spot), 1.0, -1, lineType=cv2.LINE_AA)
    if count:
        nucleoli = cv2.GaussianBlur(nucleoli, (0, 0), 2.0) * nucleus

    # Low-valued purple/blue stain like the real cells (maxima around 100-130).
    stain = np.asarray(patient.stain, np.float32)
    nucleus_rgb = np.array([80, 36, 90], np.float32) * stain
    cytoplasm_rgb = np.array([96, 56, 108], np.float32) * stain
    # A soft gradient across the cell (uneven illumination), the nucleoli and sensor noise.
    yy, xx = np.ogrid[0:side, 0:side]
    tilt = 1.0 + 0.06 * ((xx - centre) * np.cos(direction) + (yy - centre) * np.sin(direction)) / side
    light = (tilt * (1.0 + 0.28 * nucleoli)).astype(np.float32)
    nuclear_shade = np.where(nucleus, shade, 0).astype(np.float32)
    image = nuclear_shade[..., None] * nucleus_rgb + (~nucleus)[..., None] * cytoplasm_rgb
    image *= light[..., None]
    image += rng.standard_normal((side, side, 1), dtype=np.float32) * 3.0
    np.clip(image, 12, 160, out=image)
    image *= cell[..., None]

    canvas = np.zeros((IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8)
    top = int(np.clip(IMAGE_SIDE / 2 - side / 2 + rng.normal(0, 20), 0, IMAGE_SIDE - side))
    left = int(np.clip(IMAGE_SIDE / 2 - side / 2 + rng.normal(0, 20), 0, IMAGE_SIDE - side))
    canvas[top:top + side, left:left + side] = image.astype(np.uint8)
    return canvas


def _make_patients(rng: np.random.Generator, plan, used: set[str]) -> list[tuple[_Patient, int]]:
    patients = []
    for label, (n_patients, (low, high)) in zip((1, 0), plan):
        for _ in range(n_patients):
            while True:
                number = int(rng.integers(1, 100))
                patient_id = str(number) if label == 1 else f"H{number}"
                if patient_id not in used:
                    break
            used.add(patient_id)
            patient = _Patient(patient_id, label, _stain_gain(rng), float(rng.uniform(0.9, 1.1)),
                               float(rng.uniform(0.8, 1.25)))
            patients.append((patient, int(rng.integers(low, high + 1))))
    return patients


def _cell_names(patient: _Patient, n_cells: int) -> list[str]:
    suffix = config.CLASS_NAMES[patient.label]
    return [f"UID_{patient.patient_id}_{1 + i // 3}_{1 + i % 3}_{suffix}.bmp" for i in range(n_cells)]


def _write_bmp(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def _draw_tree(root: Path, seed: int, scale: str) -> None:
    plan = _PLANS[scale]
    rng = np.random.default_rng([seed, 2019])
    used: set[str] = set()
    numbers = itertools.count(1)

    def draw(patient: _Patient) -> np.ndarray:  # a generator per cell: one cell's draws never shift the next
        return draw_cell(np.random.default_rng([seed, next(numbers)]), patient)

    for fold in range(3):
        patients = _make_patients(rng, plan["fold"], used)
        if fold == 0:  # the real data writes one healthy subject in lower case (h3)
            first_hem = next(i for i, (p, _) in enumerate(patients) if p.label == 0)
            p, n = patients[first_hem]
            patients[first_hem] = (replace(p, patient_id=p.patient_id.lower()), n)
        for patient, n_cells in patients:
            folder = root / config.TRAINING_DIR / f"fold_{fold}" / config.CLASS_NAMES[patient.label]
            folder.mkdir(parents=True, exist_ok=True)
            for name in _cell_names(patient, n_cells):
                _write_bmp(folder / name, draw(patient))

    # Validation and testing: renamed 1.bmp… in shuffled order; validation's labels in a CSV listed in another order.
    for key, part, images in (("validation", config.VALIDATION_DIR, config.VALIDATION_IMAGES_DIR),
                              ("test", config.TESTING_DIR, config.TESTING_IMAGES_DIR)):
        cells = [(p, name) for p, n in _make_patients(rng, plan[key], used) for name in _cell_names(p, n)]
        (root / part / images).mkdir(parents=True)
        rows = []
        for new_index, cell_number in enumerate(rng.permutation(len(cells)), start=1):
            patient, original = cells[cell_number]
            _write_bmp(root / part / images / f"{new_index}.bmp", draw(patient))
            rows.append({"Patient_ID": original, "new_names": f"{new_index}.bmp", "labels": patient.label})
        if key == "validation":
            pd.DataFrame(rows).sort_values("Patient_ID").to_csv(root / part / config.VALIDATION_LABELS_CSV, index=False)

    (root / config.SYNTHETIC_MARKER).write_text(f"{SYNTHETIC_BANNER}\n\nseed: {seed}\nscale: {scale}\n"
                                                f"generator_version: {GENERATOR_VERSION}\n")


def make_synthetic_dataset(out_dir: str | os.PathLike, seed: int = 0, scale: str = "small") -> Path:
    """Write ``<out_dir>/C-NMC_Leukemia`` (training folds, validation, testing); returns that root.

    ``scale``: ``tiny`` (about 60 training cells, for tests) or ``small`` (about 350, the demo). A tree of the same
    seed, scale and generator version is reused; a new one is staged and renamed into place (``staged_folder``)."""
    if scale not in config.SYNTHETIC_SCALES:
        raise ValueError(f"unknown synthetic scale {scale!r}: use one of {', '.join(config.SYNTHETIC_SCALES)}")
    out_dir = Path(out_dir).expanduser().resolve()
    root = out_dir / config.DATASET_FOLDER_NAME
    if root.exists():
        if not (root / config.SYNTHETIC_MARKER).is_file():
            raise ValueError(f"{root} exists and is not a synthetic dataset (no {config.SYNTHETIC_MARKER}); "
                             "refusing to overwrite it: pass another --out folder")
        lines = (root / config.SYNTHETIC_MARKER).read_text().splitlines()
        marker = {key.strip(): value.strip() for key, sep, value in (line.partition(":") for line in lines) if sep}
        wanted = {"seed": str(seed), "scale": scale, "generator_version": str(GENERATOR_VERSION)}
        if all(marker.get(k) == v for k, v in wanted.items()):
            return root
    with staged_folder(root) as staged:
        _draw_tree(staged.path, seed, scale)
    return root


def is_synthetic(path: str | os.PathLike) -> bool:
    """Whether a dataset root, a folder or an image lies in a synthetic dataset (its marker file at or above)."""
    current = Path(path).expanduser().resolve()
    return any((folder / config.SYNTHETIC_MARKER).is_file() for folder in (current, *current.parents))
