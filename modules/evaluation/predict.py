"""Inference from a saved run: P(leukemia) for any cell images, prepared as the run's arrays were.

``load_predictor`` loads a run once; ``score_cells`` is the one inference path, used by ``evaluate.evaluate_run``
and by ``predict_images`` (the ``predict`` command).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from modules import config
from modules.metrics import EvaluationError, mask_dice
from modules.files import write_csv_atomic

CHUNK = 256  # images decoded and predicted at a time: memory stays bounded on any dataset size
PREDICT_COLUMNS = ("path", "name", "p_leukemia", "prediction", "label_name", "nucleus_share",
                   "nucleus_cytoplasm_ratio", "testing", "model_trained_on")


# ----------------------------------------------------------------------------- the run
#: A saved run loaded to predict with: its ``config.json`` ({} for a model copied alone), the threshold with its
#: source, and the preprocessing settings its arrays were prepared with.
Predictor = NamedTuple("Predictor", [("model_file", Path), ("run_config", dict), ("model", object),
                                     ("threshold", float), ("threshold_source", str), ("settings", dict)])


def load_predictor(model_path: str | Path, threshold: str | float = "auto") -> Predictor:
    """Load a run folder or its ``model.keras`` with its threshold (``auto``: the run's stored one) and settings."""
    from modules.modeling import saving

    model_file = saving.model_path(model_path)
    run_config = saving.load_run(model_file, required=False)
    model = saving.load_model(model_file)
    value, source = resolve_threshold(threshold, run_config, model_file)
    return Predictor(model_file, run_config, model, value, source,
                     preprocessing_settings(model, run_config, model_file))


def trained_on(run_config: dict) -> str:
    """``synthetic``, ``real`` or ``unknown``: the cells the run's model was trained on."""
    data = run_config.get("data") or {}
    if "synthetic" not in data:
        return "unknown"
    return "synthetic" if data["synthetic"] else "real"


def resolve_threshold(threshold: str | float, run_config: dict, model_path: Path) -> tuple[float, str]:
    """(threshold, source): ``auto`` = the run's stored validation threshold; a number overrides it."""
    if isinstance(threshold, str) and threshold.strip().lower() == "auto":
        if run_config.get("threshold") is None:
            why = ("the run has not finished, so it has no validation threshold yet; finish it with `python -m "
                   "modules train --resume RUN_DIR`, or" if run_config.get("status") == "running" else
                   "no config.json with a 'threshold' beside the model, so --threshold auto has nothing to use;")
            raise EvaluationError(f"{model_path}: {why} pass --threshold 0.5 (or another value chosen on "
                                  "validation data)")
        method = run_config.get("threshold_method", "chosen on the run's validation predictions")
        return float(run_config["threshold"]), f"auto: stored in the run's config.json ({method})"
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise EvaluationError(f"--threshold must be 'auto' or a number in [0, 1], not {threshold!r}") from None
    if not 0.0 <= value <= 1.0:
        raise EvaluationError(f"--threshold {value} is outside [0, 1]")
    return value, "override: given by the user"


def preprocessing_settings(model, run_config: dict, model_path: Path) -> dict:
    """Image size (the model's), margin, background threshold and canvas (``config.json``'s, else the defaults with
    a warning and ``recorded`` False): how the run's arrays were prepared."""
    input_shape = model.input_shape[0] if isinstance(model.input_shape, list) else model.input_shape
    height, width, channels = input_shape[1:4]
    if height != width or channels != 3:
        raise EvaluationError(f"{model_path}: ANNa models take square RGB images, this one takes {input_shape[1:]}")
    size = int(run_config.get("image_size", height))
    if size != height:
        raise EvaluationError(f"{model_path}: config.json records image_size {size} but the model takes "
                              f"{height}x{width} images; the run folder is inconsistent — retrain or "
                              "restore the config.json written with this model")
    defaults = {"margin": config.DEFAULT_MARGIN, "background_threshold": config.BACKGROUND_THRESHOLD,
                "canvas": config.DEFAULT_CANVAS}
    guessed = [key for key in defaults if run_config.get(key) is None]
    settings = {"image_size": size, **{key: int(run_config.get(key) if key not in guessed else value)
                                       for key, value in defaults.items()},
                "recorded": not guessed and run_config.get("image_size") is not None,
                # What the U-Net's mask output was trained on: its predictions are compared with that.
                "mask_target": (run_config.get("training") or {}).get("mask_target") or "cell"}
    if guessed:
        source = "the run's config.json does not record" if run_config else "no config.json beside it records"
        warnings.warn(
            f"{model_path}: {source} {', '.join(guessed)}; cells are prepared with the current defaults "
            f"({', '.join(f'{key} {settings[key]}' for key in guessed)}). If the model was trained with other "
            "settings (e.g. prepare --canvas 320) its predictions are wrong: keep the config.json written by "
            "`train` beside model.keras", stacklevel=3)
    return settings


# ----------------------------------------------------------------------------- images to probabilities
def decode_cell(path: str, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """Decode one image and preprocess it as the run did: (image (S,S,3) uint8, cell mask (S,S) uint8)."""
    from modules import preprocessing

    try:
        return preprocessing.preprocess_image(
            preprocessing.load_rgb(path), settings["image_size"], margin=settings["margin"],
            threshold=settings["background_threshold"], canvas=settings["canvas"])
    except preprocessing.ImageError as error:
        message = str(error)
        raise preprocessing.ImageError(message if str(path) in message else f"{path}: {message}") from error


def target_and_nucleus(image: np.ndarray, cell: np.ndarray, settings: dict) -> tuple[np.ndarray, tuple[float, float]]:
    """The run's mask target of a prepared cell (its cell mask, or the nucleus where the run was trained on it),
    and the nucleus's share of the cell and nucleus-to-cytoplasm area ratio, from the nucleus found in the stain
    (``preprocessing.nucleus``; not the model's output), NaN where none is trusted. One nucleus search a cell."""
    from modules.preprocessing.nucleus import find_nucleus, nucleus_measures

    found = find_nucleus(image, cell)
    target = found.mask if settings.get("mask_target") == "nucleus" else cell
    # Where no nucleus is trusted the finder hands back the cell mask: no measurement, not a share of 1.
    return target, ((float("nan"), float("nan")) if found.fallback else nucleus_measures(found.mask, cell))


def prepare_cell(path: str, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """Decode one image and preprocess it as the run did: (image (S,S,3) uint8, the run's mask target (S,S) uint8)."""
    image, cell = decode_cell(path, settings)
    if settings.get("mask_target") != "nucleus":
        return image, cell
    return image, target_and_nucleus(image, cell, settings)[0]


def score_cells(predictor: Predictor, rows: pd.DataFrame, skip_bad: bool = False, batch_size: int = 64,
                progress: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """The ``rows`` (a ``path`` column) that decoded, with ``p_leukemia``, ``prediction`` (1 = leukemic, when
    p_leukemia >= the threshold), ``nucleus_share`` and ``nucleus_cytoplasm_ratio`` (``target_and_nucleus``) and, for
    a model with a mask output, ``mask_dice`` (its agreement with the run's mask target); and the ``{path, error}``
    of those skipped. Cells are decoded in threads (OpenCV releases the GIL) a chunk ahead of the model."""
    from tqdm.auto import tqdm

    from modules import preprocessing
    from modules.modeling import saving

    def prepare(path):
        try:
            image, cell = decode_cell(path, predictor.settings)
            return image, *target_and_nucleus(image, cell, predictor.settings)
        except (preprocessing.ImageError, OSError) as error:
            if not skip_bad:
                raise preprocessing.ImageError(f"{error}. Remove or replace the file, or pass --skip-bad to "
                                               "list it and go on without it") from error
            return error

    paths = rows["path"].tolist()
    kept, probabilities, dices, nuclei, skipped = [], [], [], [], []
    with ThreadPoolExecutor(min(8, preprocessing.default_workers())) as pool, \
            tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress) as bar:
        def submit(start: int) -> list:
            return [pool.submit(prepare, path) for path in paths[start:start + CHUNK]]

        pending = submit(0)
        for start in range(0, len(paths), CHUNK):
            results = [future.result() for future in pending]
            pending = submit(start + CHUNK)  # decoded while the model predicts this chunk
            good = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
            skipped += [{"path": str(paths[start + i]), "error": str(r)} for i, r in enumerate(results)
                        if isinstance(r, Exception)]
            if good:
                outputs = saving.predict_outputs(predictor.model, np.stack([results[i][0] for i in good]),
                                                 batch_size=batch_size)
                probabilities.append(np.asarray(outputs["p_leukemia"], dtype="float64").reshape(-1))
                if "cell_mask" in outputs:
                    dices.append(mask_dice(np.asarray(outputs["cell_mask"]), np.stack([results[i][1] for i in good])))
                nuclei += [results[i][2] for i in good]
                kept += [start + i for i in good]
            bar.update(len(results))
    p = np.concatenate(probabilities) if probabilities else np.zeros(0)
    share, ratio = (np.asarray(nuclei, dtype="float64").reshape(-1, 2).T if nuclei else (np.zeros(0), np.zeros(0)))
    scored = rows.iloc[kept].reset_index(drop=True).assign(p_leukemia=p,
                                                            prediction=(p >= predictor.threshold).astype("int64"),
                                                            nucleus_share=share, nucleus_cytoplasm_ratio=ratio)
    return scored.assign(mask_dice=np.concatenate(dices)) if dices else scored, skipped


# ----------------------------------------------------------------------------- the predict command
def _is_testing_folder(path: Path) -> bool:
    return path.name in (config.TESTING_DIR, config.TESTING_IMAGES_DIR)


def _folder_images(folder: Path) -> list[Path]:
    """Images found recursively in ``folder``; other files are named in a warning, hidden and junk ones skipped."""
    from modules.data.layout import JUNK_FILES, warn_ignored

    # The validation labels CSV belongs to the Kaggle layout: expected, not worth a warning.
    expected = JUNK_FILES | {config.VALIDATION_LABELS_CSV.lower()}
    files, others = [], []
    for p in sorted(folder.rglob("*")):
        # Hidden files and folders (.ipynb_checkpoints copies, .DS_Store) are not cells.
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts) \
                and p.name.lower() not in expected:
            (files if p.suffix.lower() in config.IMAGE_EXTENSIONS else others).append(p)
    if others:
        warn_ignored(folder, [str(p.relative_to(folder)) for p in others], "not an image",
                     f"; images must end in {', '.join(config.IMAGE_EXTENSIONS)}", noun=("file", "files"), stacklevel=5)
    return files


def list_images(paths_or_dirs: Iterable[str | Path] | str | Path) -> pd.DataFrame:
    """Image files given directly or found recursively in folders: ``path`` and ``testing`` (a C-NMC testing
    folder's cell)."""
    from modules.data.layout import utf8_path

    items = [paths_or_dirs] if isinstance(paths_or_dirs, (str, Path)) else list(paths_or_dirs)
    rows = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            rows += [{"path": str(p.resolve()), "testing": _is_testing_folder(path) or _is_testing_folder(p.parent)}
                     for p in _folder_images(path)]
        elif path.is_file():
            if path.suffix.lower() not in config.IMAGE_EXTENSIONS:
                raise EvaluationError(f"{path} is not an image ({', '.join(config.IMAGE_EXTENSIONS)})")
            rows.append({"path": str(path.resolve()), "testing": _is_testing_folder(path.parent)})
        else:
            raise FileNotFoundError(f"{path} not found: pass image files or folders of cell images")
    if not rows:
        raise FileNotFoundError(f"no images ({', '.join(config.IMAGE_EXTENSIONS)}) in {', '.join(map(str, items))}")
    for row in rows:  # a name that is not UTF-8 is named now, not as a failure to write the CSV
        utf8_path(row["path"])
    return pd.DataFrame(rows).drop_duplicates("path").reset_index(drop=True)


def predict_images(model_path: str | Path, paths_or_dirs: Iterable[str | Path] | str | Path,
                   csv: str | Path | None = None, threshold: str | float = "auto", skip_bad: bool = False,
                   progress: bool = True) -> pd.DataFrame:
    """``PREDICT_COLUMNS`` for image files and folders (searched recursively), with the run's preprocessing;
    ``attrs``: ``threshold``, ``threshold_source``, ``skipped`` (with ``skip_bad``), ``model``, ``warning`` (a model
    trained on synthetic cells, also warned about; else None) and, once ``csv`` is written, ``submission``."""
    predictor = load_predictor(model_path, threshold)
    scored, skipped = score_cells(predictor, list_images(paths_or_dirs), skip_bad, progress=progress)
    origin = trained_on(predictor.run_config)
    table = scored.assign(name=scored["path"].map(lambda p: Path(p).name), testing=scored["testing"].astype(bool),
                          label_name=scored["prediction"].map(config.CLASS_NAMES), model_trained_on=origin)
    warning = None if origin != "synthetic" else (
        f"{predictor.model_file} was trained on SYNTHETIC cells, so its labels for real cells mean nothing (a demo "
        "model); train on the real C-NMC cells for real predictions (python -m modules train --data "
        "input/C-NMC_Leukemia)")
    if warning:
        warnings.warn(warning, stacklevel=2)
    table = table[list(PREDICT_COLUMNS)]
    table.attrs.update({"threshold": predictor.threshold, "threshold_source": predictor.threshold_source,
                        "skipped": skipped, "model": str(predictor.model_file), "warning": warning})
    if csv is not None:
        write_predictions(table, csv)
    return table


def write_predictions(table: pd.DataFrame, csv: str | Path) -> Path:
    """Write a ``predict_images`` table (atomically) and, for C-NMC testing cells, the challenge submission
    (``new_names, labels``) beside it as ``<csv stem>_submission.csv`` (``table.attrs["submission"]``)."""
    csv = Path(csv).expanduser()
    write_csv_atomic(table, csv)
    if table["testing"].any():
        submission_path = csv.with_name(f"{csv.stem}_submission.csv")
        write_csv_atomic(submission_table(table), submission_path)
        table.attrs["submission"] = str(submission_path)
    return csv


def default_predictions_path(model_path: str | Path, images: Sequence[str | Path],
                             output_dir: str | Path | None = None) -> Path:
    """``<output>/predictions/<run_id>__<dataset>[_N].csv``: a new name, never an existing file."""
    from modules.data import layout
    from modules.modeling import saving

    model_file = saving.model_path(model_path)
    run_id = str(saving.load_run(model_file, required=False).get("run_id") or model_file.parent.name)
    try:
        dataset = layout.dataset_name(images[0]) if len(images) == 1 else "images"
    except (ValueError, FileNotFoundError):
        dataset = Path(images[0]).stem.lower()
    folder = Path(output_dir or config.OUTPUT_DIR) / config.PREDICTIONS_SUBDIR
    for n in range(1, 10_000):
        path = folder / (f"{run_id}__{dataset}.csv" if n == 1 else f"{run_id}__{dataset}_{n}.csv")
        if not path.exists() and not path.with_name(f"{path.stem}_submission.csv").exists():
            return path
    raise EvaluationError(f"too many prediction files for {run_id} in {folder}")


def submission_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """C-NMC challenge submission (``new_names, labels``) for the testing-folder cells, in numeric name order."""
    rows = predictions[predictions["testing"]] if "testing" in predictions else predictions
    table = pd.DataFrame({"new_names": rows["name"].astype(str), "labels": rows["prediction"].astype("int64")})
    order = table["new_names"].map(lambda n: (int(Path(n).stem) if Path(n).stem.isdigit() else 10**9, n))
    return table.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)
