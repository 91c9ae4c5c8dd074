"""A run folder's files: the saved model (loaded safely), its ``config.json``, and prediction with it.

A run folder (``output/models/<run_id>/``) holds ``model.keras``, ``config.json``,
``history.csv`` and ``val_predictions.csv`` (``backup/`` too while it is unfinished).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import keras
import numpy as np

from modules.data import schema
from modules.modeling.network import PROB_OUTPUT

MODEL_FILENAME = "model.keras"
CONFIG_FILENAME = "config.json"
HISTORY_FILENAME = "history.csv"
VAL_PREDICTIONS_FILENAME = "val_predictions.csv"


class ModelFileError(ValueError):
    """A model or run file that is not what ANNa wrote, or does not fit the data."""


def model_path(path: str | Path) -> Path:
    """The ``.keras`` file of a run folder, or the file given; FileNotFoundError where there is none."""
    path = Path(path).expanduser()
    file = path / MODEL_FILENAME if path.is_dir() else path
    if not file.is_file():
        where = f"{path} is a folder without {MODEL_FILENAME}" if path.is_dir() else f"model file {file} not found"
        raise FileNotFoundError(f"{where}: pass a run folder written by `python -m modules train` "
                                f"(output/models/<run_id>) or its {MODEL_FILENAME}")
    return file


def load_run(path: str | Path, required: bool = True) -> dict:
    """The ``config.json`` of a run folder, or of the run a file inside it belongs to.

    Without it: FileNotFoundError, or ``{}`` unless ``required`` (a model copied alone). ModelFileError where it is
    not a JSON object or a value has the wrong type or range (``schema.RUN``).
    """
    path = Path(path).expanduser()
    file = (path if path.is_dir() else path.parent) / CONFIG_FILENAME
    if not file.is_file():
        if not required:
            return {}
        raise FileNotFoundError(f"{file} not found; pass a run folder written by `python -m modules train`")
    return schema.read_json(file, schema.RUN, "restore the config.json the run wrote, or train the run again",
                            ModelFileError)


def load_model(path: str | Path) -> keras.Model:
    """Load a saved ANNa (or legacy) model of a run folder or ``.keras`` file with ``safe_mode=True``, uncompiled.

    FileNotFoundError where there is none, ModelFileError where the file is not a Keras 3 archive.
    """
    file = model_path(path)
    if file.suffix != ".keras" or not zipfile.is_zipfile(file):
        raise ModelFileError(f"{file} is not a Keras 3 archive (.keras zip); pass the model.keras "
                             "written by `python -m modules train` (HDF5/.h5 files are not supported)")
    try:
        with zipfile.ZipFile(file) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile as error:
        raise ModelFileError(f"{file} is a damaged Keras archive ({error}); train again") from error
    if "config.json" not in names:
        raise ModelFileError(f"{file} is a zip file but not a Keras archive (no config.json inside)")
    try:
        return keras.saving.load_model(file, compile=False, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise ModelFileError(f"{file} could not be loaded as a Keras model: {error}") from error


#: The 8 symmetries of a square (4 rotations by 90°, each with and without a mirror), as
#: ``(quarter_turns, mirrored)``: a single cell has no preferred orientation.
DIHEDRAL = tuple((turns, mirrored) for mirrored in (False, True) for turns in range(4))


def dihedral(batch: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """Mirror (left-right) then rotate a (B, S, S, ...) batch."""
    batch = batch[:, :, ::-1] if mirrored else batch
    return np.rot90(batch, turns, axes=(1, 2))


def undo_dihedral(maps: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """Inverse of ``dihedral``: maps predicted on a transformed batch, back in place."""
    maps = np.rot90(maps, -turns, axes=(1, 2))
    return maps[:, :, ::-1] if mirrored else maps


def predict_outputs(model: keras.Model, images, batch_size: int = 64, tta: bool = False) -> dict[str, np.ndarray]:
    """Run an ANNa or legacy model over (N, S, S, 3) uint8 RGB images in batches (memory maps are not loaded).

    ``tta``: average the outputs over the 8 flips/90° rotations of each image (``DIHEDRAL``; segmentation maps are
    turned back first), 8x the work. Returns ``{"p_leukemia": (N,) float32}`` plus ``"cell_mask": (N, S, S)
    float32`` when the model has that output.
    """
    expected, size = int(model.inputs[0].shape[1]), int(images.shape[1])
    if expected != size:
        raise ModelFileError(f"model takes {expected}x{expected} images but the arrays are {size}x{size}; "
                             f"prepare the data with --size {expected}")
    views = DIHEDRAL if tta else DIHEDRAL[:1]
    results: dict[str, list[np.ndarray]] = {PROB_OUTPUT: []}
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], dtype="float32")
        summed: dict[str, np.ndarray] = {}
        for turns, mirrored in views:
            # The identity view is the batch itself: ascontiguousarray copies only turned views.
            outputs = model.predict_on_batch(np.ascontiguousarray(dihedral(batch, turns, mirrored)))
            if not isinstance(outputs, dict):  # a single-output model
                outputs = {PROB_OUTPUT: outputs}
            for name, value in outputs.items():
                value = np.asarray(value, dtype="float32")
                if value.ndim == 4:  # a map: back to the image's orientation
                    value = undo_dihedral(value, turns, mirrored)
                summed[name] = summed[name] + value if name in summed else value
        for name, value in summed.items():
            results.setdefault(name, []).append((value[..., 0] if value.shape[-1] == 1 else value) / len(views))
    return {name: np.concatenate(parts) if parts else np.zeros((0,), "float32") for name, parts in results.items()}
