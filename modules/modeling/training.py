"""Patient-disjoint training runs of ANNa (and of the legacy network, for comparison).

``train_model`` prepares the cached arrays when needed, splits the labeled training cells by
patient (by C-NMC fold when the data has several, otherwise by holding out whole patients of
each class), streams batches from the memory-mapped arrays through ``tf.data`` with
augmentation applied to image and mask together, trains under the precision policy and
``tf.distribute`` strategy picked for the hardware, and writes one run folder::

    output/models/<run_id>/model.keras  config.json  history.csv  val_predictions.csv

The decision threshold in ``config.json`` is Youden's J on the run's own patient-held-out
validation predictions. ``resume=RUN_DIR`` continues an interrupted run from its last epoch.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from modules import config
from modules.files import atomic_path, write_csv_atomic, write_json_atomic

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from modules.modeling import network as anna_model  # noqa: E402

CONFIG_FILENAME = "config.json"
HISTORY_FILENAME = "history.csv"
VAL_PREDICTIONS_FILENAME = "val_predictions.csv"
#: Older runs' name for the last-epoch checkpoint; runs now write ``last-epoch-<N>.keras``
#: (``last_checkpoint_name``) and name it in ``state.json``.
LAST_CHECKPOINT = "last.keras"
STATE_FILENAME = "state.json"
ARCHITECTURES = ("anna", "legacy")
#: Settings train_model accepts besides its named arguments, with their defaults.
EXTRA_DEFAULTS = {
    "architecture": "anna", "learning_rate": config.DEFAULT_LEARNING_RATE,
    "val_fraction": config.DEFAULT_VAL_FRACTION, "dropout": 0.1, "batch_norm": True,
    "head_units": 64, "mask_loss_weight": 0.25, "augment": True, "class_weighting": True,
    "patience": 8, "lr_patience": 3, "exclude_patients": (), "runs_dir": None, "run_tag": None,
    "strategy": "auto", "skip_bad": False, "standardize_input": False, "canvas": config.DEFAULT_CANVAS,
}


class TrainingDataError(ValueError):
    """The arrays, manifest or labels cannot be trained on; the message says what to fix."""


class SplitError(TrainingDataError):
    """The patient-disjoint validation split cannot be made as asked."""


# --------------------------------------------------------------------------- small files
def load_run(run_dir: str | Path) -> dict:
    """Read a run's ``config.json``.

    Args:
        run_dir: The run folder (``output/models/<run_id>``).

    Returns:
        The configuration dict.
    """
    path = Path(run_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a run folder written by `python -m modules train`")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- splitting
@dataclass
class PatientSplit:
    """Row indices of the training and validation cells, and how they were chosen."""

    train_index: np.ndarray
    val_index: np.ndarray
    train_patients: list[str]
    val_patients: list[str]
    method: str
    val_fold: int | None = None
    excluded_patients: list[str] = field(default_factory=list)


def _class_name(label: int) -> str:
    return config.CLASS_NAMES[int(label)]


def split_patients(
    manifest: pd.DataFrame,
    labels: np.ndarray,
    val_patients: list[str] | None = None,
    val_fold: int | None = None,
    val_fraction: float = config.DEFAULT_VAL_FRACTION,
    seed: int = config.DEFAULT_SEED,
    exclude_patients: tuple[str, ...] | list[str] = (),
    source: str = "the data",
) -> PatientSplit:
    """Split the labeled training cells into patient-disjoint training and validation sets.

    By C-NMC fold when the data has several folds (``val_fold``, the last by default), by
    the named ``val_patients``, or else by holding out ``val_fraction`` of the patients of
    each class (at least one each). There is no image-level split.

    Args:
        manifest: The arrays' manifest (row i = array row i).
        labels: Labels aligned with the manifest (1, 0, or -1 unlabeled).
        val_patients: Patient ids to validate on.
        val_fold: C-NMC fold to validate on.
        val_fraction: Share of each class's patients held out when splitting by patient.
        seed: Seed of the patient draw.
        exclude_patients: Patients left out of both (held out for cross-validation).
        source: What to name in error messages.

    Returns:
        The split.
    """
    if val_patients and val_fold is not None:
        raise SplitError("give either validation patients or a validation fold, not both")
    patient_ids = manifest["patient_id"].fillna("").astype(str).str.upper().to_numpy()
    excluded = sorted({str(p).upper() for p in exclude_patients})
    unknown_excluded = set(excluded) - set(patient_ids)
    if unknown_excluded:
        raise SplitError(f"patients to exclude not found in {source}: {', '.join(sorted(unknown_excluded))}")
    usable = ((manifest["split"].astype(str) == "train").to_numpy() & (labels >= 0)
              & ~np.isin(patient_ids, excluded))
    if not usable.any():
        raise TrainingDataError(f"{source} has no labeled training cells (training_data/fold_N/{{all,hem}}); "
                                "point --data at a C-NMC_Leukemia root or a training fold")
    if (patient_ids[usable] == "").any():
        raise TrainingDataError(f"{source}: some training cells have no patient id, so they cannot be split "
                                "by patient; name files UID_<patient>_<image>_<cell>_<all|hem>")
    table = pd.DataFrame({"patient_id": patient_ids[usable], "label": labels[usable].astype(int),
                          "fold": manifest["fold"].to_numpy()[usable]})
    patient_class = table.groupby("patient_id")["label"].agg(lambda s: int(s.mode().iloc[0]))
    folds = sorted(int(f) for f in pd.unique(table["fold"].dropna()))

    if val_patients:
        wanted = [str(p).strip().upper() for p in val_patients if str(p).strip()]
        missing = sorted(set(wanted) - set(patient_class.index))
        if missing:
            raise SplitError(f"validation patients not among the training patients of {source}: "
                             f"{', '.join(missing)}; available: {', '.join(sorted(patient_class.index))}")
        chosen, method = sorted(set(wanted)), "patients"
    elif val_fold is not None or len(folds) > 1:
        if val_fold is None:
            val_fold = folds[-1]
        if int(val_fold) not in folds:
            raise SplitError(f"validation fold {val_fold} not in {source} (folds: {folds or 'none'}); "
                             "use --val-patients when the data has a single fold")
        val_fold = int(val_fold)
        chosen = sorted(set(table.loc[table["fold"] == val_fold, "patient_id"]))
        shared = set(chosen) & set(table.loc[table["fold"] != val_fold, "patient_id"])
        if shared:
            raise SplitError(f"patients {', '.join(sorted(shared))} appear in fold {val_fold} and in other folds "
                             f"of {source}; a fold split would not be patient-disjoint, use --val-patients")
        method = "fold"
    else:
        rng = np.random.default_rng(seed)
        chosen = []
        for label in sorted(patient_class.unique()):
            members = sorted(patient_class.index[patient_class == label])
            if len(members) < 2:
                raise SplitError(f"{source} has only {len(members)} {_class_name(label)} patient(s); at least "
                                 "two per class are needed to hold whole patients out for validation")
            count = min(len(members) - 1, max(1, int(round(val_fraction * len(members)))))
            chosen += list(rng.choice(members, size=count, replace=False))
        chosen, method = sorted(chosen), "patients_stratified"

    is_val = np.isin(table["patient_id"], chosen)
    rows = np.flatnonzero(usable)
    split = PatientSplit(
        train_index=rows[~is_val], val_index=rows[is_val],
        train_patients=sorted(set(table.loc[~is_val, "patient_id"])), val_patients=list(chosen),
        method=method, val_fold=val_fold if method == "fold" else None, excluded_patients=excluded,
    )
    train_classes = set(labels[split.train_index].tolist())
    if len(train_classes) < 2:
        only = ", ".join(_class_name(c) for c in sorted(train_classes)) or "no"
        raise TrainingDataError(f"the training cells of {source} hold one class only ({only}); both all and hem "
                                "cells are needed (check the data folder and the validation patients)")
    val_classes = set(labels[split.val_index].tolist())
    if val_classes != {0, 1}:
        lacking = ", ".join(_class_name(c) for c in (0, 1) if c not in val_classes)
        raise SplitError(f"the validation split ({method}: {', '.join(split.val_patients)}) has no {lacking} "
                         "patient; name patients of both classes with --val-patients or pick another --val-fold")
    return split


# --------------------------------------------------------------------------- tf.data
def balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    """Weights n / (2 n_c) so that both classes weigh the same in the loss."""
    counts = np.bincount(labels.astype(int), minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) for c in (0, 1)}


_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], "float32")
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype("float32")


def augment_batch(images: tf.Tensor, masks: tf.Tensor, colour: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
    """Randomly flip and rotate (by 90°) each image with its mask; jitter the cell's colour.

    The colour jitter (gain, contrast, saturation, hue rotation in YIQ space) mimics stain
    and lighting differences between patients and touches only the cell: the black
    background stays as it was.

    Args:
        images: (B, S, S, 3) float32, 0-255.
        masks: (B, S, S, 1) float32, 0/1.
        colour: Apply the colour jitter.

    Returns:
        The augmented images and masks.
    """
    batch = tf.shape(images)[0]
    stacked = tf.concat([images, masks], axis=-1)
    # A transpose and two flips, each drawn per cell, give all 8 flips/90° rotations of a square.
    for flip in (lambda t: tf.transpose(t, [0, 2, 1, 3]), lambda t: tf.reverse(t, axis=[1]),
                 lambda t: tf.reverse(t, axis=[2])):
        stacked = tf.where(tf.random.uniform([batch, 1, 1, 1]) < 0.5, flip(stacked), stacked)
    images, masks = stacked[..., :3], stacked[..., 3:]
    if not colour:
        return images, masks
    angle = tf.random.uniform([batch], -0.15, 0.15)
    saturation = tf.random.uniform([batch], 0.8, 1.2)
    zeros, ones = tf.zeros([batch]), tf.ones([batch])
    rotate = tf.stack([
        tf.stack([ones, zeros, zeros], -1),
        tf.stack([zeros, saturation * tf.cos(angle), -saturation * tf.sin(angle)], -1),
        tf.stack([zeros, saturation * tf.sin(angle), saturation * tf.cos(angle)], -1),
    ], axis=1)  # (B, 3, 3)
    matrix = tf.einsum("ij,bjk,kl->bil", _YIQ_TO_RGB, rotate, _RGB_TO_YIQ)
    jittered = tf.einsum("bhwc,bdc->bhwd", images, matrix)
    cell = masks > 0.5
    area = tf.maximum(tf.reduce_sum(tf.cast(cell, tf.float32), axis=[1, 2, 3], keepdims=True), 1.0)
    mean = tf.reduce_sum(tf.where(cell, jittered, 0.0), axis=[1, 2], keepdims=True) / area
    contrast = tf.random.uniform([batch, 1, 1, 1], 0.8, 1.2)
    gain = tf.random.uniform([batch, 1, 1, 1], 0.8, 1.2)
    jittered = ((jittered - mean) * contrast + mean) * gain
    images = tf.where(cell, tf.clip_by_value(jittered, 0.0, 255.0), images)
    return images, masks


def make_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    training: bool,
    seed: int = config.DEFAULT_SEED,
    class_weights: dict[int, float] | None = None,
    segmentation: bool = True,
    augment: bool = True,
) -> tf.data.Dataset:
    """Stream ``(image, targets, sample_weights)`` batches from the (memory-mapped) arrays.

    Class weights travel as per-cell sample weights on ``p_leukemia``: Keras'
    ``class_weight`` does not apply to models with dict outputs.

    Args:
        images: (N, S, S, 3) uint8 array or memory map.
        masks: (N, S, S) uint8 0/1.
        labels: (N,) int8.
        indices: Rows to use.
        batch_size: Cells per batch (global, across replicas).
        training: Shuffle each epoch and augment.
        seed: Shuffle seed.
        class_weights: {0: w0, 1: w1}; all ones when None.
        segmentation: Include the ``cell_mask`` target.
        augment: Augment (only when training).

    Returns:
        The dataset.
    """
    size = int(images.shape[1])
    weights = class_weights or {0: 1.0, 1: 1.0}
    weight_table = tf.constant([weights[0], weights[1]], tf.float32)

    def load(rows: np.ndarray):
        rows = np.sort(rows)  # ascending rows read a memory map sequentially
        return images[rows], masks[rows], labels[rows].astype("int32")

    def read(rows):
        image, mask, label = tf.numpy_function(load, [rows], [tf.uint8, tf.uint8, tf.int32])
        image = tf.ensure_shape(image, [None, size, size, 3])
        mask = tf.ensure_shape(mask, [None, size, size])
        return tf.cast(image, tf.float32), tf.cast(mask, tf.float32)[..., None], tf.ensure_shape(label, [None])

    def to_example(image, mask, label):
        if training and augment:
            image, mask = augment_batch(image, mask)
        targets = {anna_model.PROB_OUTPUT: tf.cast(label, tf.float32)[:, None]}
        sample_weights = {anna_model.PROB_OUTPUT: tf.gather(weight_table, label)}
        if segmentation:
            targets[anna_model.MASK_OUTPUT] = mask
            # (B, 1, 1) broadcasts over the per-pixel mask loss.
            sample_weights[anna_model.MASK_OUTPUT] = tf.ones_like(sample_weights[anna_model.PROB_OUTPUT])[:, None, None]
        return image, targets, sample_weights

    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, dtype="int64"))
    if training:
        dataset = dataset.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(read, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- threshold
def youden_threshold(labels: np.ndarray, p_leukemia: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (rule: p >= threshold).

    Args:
        labels: 1/0 labels.
        p_leukemia: Predicted probabilities.

    Returns:
        The threshold in [0, 1].
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, p_leukemia)
    # thresholds[0] is +inf ("call nothing"); a degenerate model must not store 1.0 from it.
    best = 1 + int(np.argmax((tpr - fpr)[1:])) if len(thresholds) > 1 else 0
    return float(np.clip(thresholds[best], 0.0, 1.0))


# --------------------------------------------------------------------------- callbacks
def last_checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint written after ``epoch`` (0-based): ``last-epoch-0007.keras``."""
    return f"last-epoch-{epoch:04d}.keras"


def last_checkpoint_path(run_dir: Path, state: dict) -> Path:
    """The last-epoch checkpoint that ``state`` (from ``state.json``) was written with."""
    return Path(run_dir) / state.get("last_checkpoint", LAST_CHECKPOINT)


def _remove_last_checkpoints(run_dir: Path, keep: str | None = None) -> None:
    for path in [*Path(run_dir).glob("last-epoch-*.keras"), Path(run_dir) / LAST_CHECKPOINT]:
        if path.name != keep:
            path.unlink(missing_ok=True)


class RunCheckpoint(keras.callbacks.Callback):
    """Save the best model (``model.keras``), the last epoch (``last-epoch-<N>.keras``) and ``state.json``.

    Each file is written under a temporary name and renamed, so an interrupted run never
    leaves a half-written model that ``--resume`` or evaluation would trust. The last-epoch
    checkpoint gets a new name every epoch and ``state.json``, written after it, names it:
    an interruption between the two leaves the previous pair intact, so ``--resume`` never
    pairs a checkpoint with another epoch's counters. Older checkpoints are removed after.
    """

    def __init__(self, run_dir: Path, monitor: str, mode: str, best: float | None = None):
        super().__init__()
        self.run_dir, self.monitor, self.mode = Path(run_dir), monitor, mode
        self.best = best
        self.best_epoch: int | None = None
        self.wait = 0

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def _save(self, name: str) -> None:
        with atomic_path(self.run_dir / name) as partial:
            self.model.save(partial)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"checkpoint monitor {self.monitor!r} missing from logs {sorted(logs or {})}")
        value = float(value)
        if np.isfinite(value) and self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            self._save(anna_model.MODEL_FILENAME)
        else:
            self.wait += 1
        last = last_checkpoint_name(epoch)
        self._save(last)
        state = {"last_epoch": epoch, "last_checkpoint": last, "best": self.best, "best_epoch": self.best_epoch,
                 "wait": self.wait, "monitor": self.monitor, "mode": self.mode}
        write_json_atomic(self.run_dir / STATE_FILENAME, state)
        _remove_last_checkpoints(self.run_dir, keep=last)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that can start from a saved best value and patience count (``--resume``)."""

    def __init__(self, *args, initial_best: float | None = None, initial_wait: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._initial_best, self._initial_wait = initial_best, initial_wait

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._initial_best is not None:
            self.best, self.wait = self._initial_best, self._initial_wait


class ThroughputTimer(keras.callbacks.Callback):
    """Seconds of each epoch's training part (before validation), for images/second."""

    def __init__(self):
        super().__init__()
        self.train_seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self.train_seconds.append(time.perf_counter() - self._start)


# --------------------------------------------------------------------------- runs
def _versions() -> dict[str, str]:
    import sklearn

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "scikit-learn": sklearn.__version__,
            "platform": platform.platform()}


def _new_run_dir(parent: Path, tag: str) -> tuple[str, Path]:
    """Create ``<parent>/<timestamp>-<tag>`` (with a counter when taken); never reuse a folder."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        run_id = f"{stamp}-{tag}" + (f"-{attempt}" if attempt > 1 else "")
        try:
            (parent / run_id).mkdir()
        except FileExistsError:
            continue
        return run_id, parent / run_id
    raise RuntimeError(f"could not create a new run folder under {parent}")


def _open_arrays(data, image_size: int, output_dir: Path | None, skip_bad: bool,
                 canvas: int = config.DEFAULT_CANVAS):
    """Prepare (or reuse) the arrays for ``data`` and load them, checking they agree."""
    from modules.preprocessing import cells as preprocess

    path = Path(data) if not isinstance(data, pd.DataFrame) else None
    if path is not None and (path / "images.npy").is_file():
        arrays_dir = path  # already an arrays folder
    else:
        arrays_dir = Path(preprocess.prepare_arrays(data, size=image_size, output_dir=output_dir,
                                                    skip_bad=skip_bad, progress=True, canvas=canvas))
    arrays = preprocess.load_arrays(arrays_dir)
    lengths = {"images.npy": len(arrays.images), "masks.npy": len(arrays.masks),
               "labels.npy": len(arrays.labels), "manifest.csv": len(arrays.manifest)}
    if len(set(lengths.values())) > 1:
        raise TrainingDataError(f"arrays in {arrays_dir} disagree in length ({lengths}); delete that folder "
                                "and run `python -m modules prepare` again")
    prepared_canvas = arrays.meta.get("canvas", config.DEFAULT_CANVAS)
    if prepared_canvas is not None and int(prepared_canvas) != int(canvas):
        raise TrainingDataError(f"arrays in {arrays_dir} were prepared with canvas {prepared_canvas}, not {canvas}; "
                                f"use --canvas {prepared_canvas} or pass the dataset folder instead")
    size = int(arrays.images.shape[1])
    if size != image_size:
        raise anna_model.ModelFileError(f"arrays in {arrays_dir} are {size}x{size}, not {image_size}x{image_size}; "
                                        f"use --size {size} or prepare the data at {image_size}")
    return arrays_dir, arrays


def _compile(model: keras.Model, architecture: str, learning_rate: float, segmentation: bool,
             mask_loss_weight: float) -> None:
    losses = {anna_model.PROB_OUTPUT: "binary_crossentropy"}
    weights = {anna_model.PROB_OUTPUT: 1.0}
    if architecture == "anna" and segmentation:
        losses[anna_model.MASK_OUTPUT] = "binary_crossentropy"
        weights[anna_model.MASK_OUTPUT] = float(mask_loss_weight)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=losses, loss_weights=weights,
                  metrics={anna_model.PROB_OUTPUT: [keras.metrics.AUC(name="auc")]})


def _resolve_settings(image_size, epochs, batch_size, val_patients, val_fold, seed, base_filters, depth,
                      segmentation, policy, extra: dict) -> dict:
    unknown = set(extra) - set(EXTRA_DEFAULTS)
    if unknown:
        raise TypeError(f"train_model() got unknown settings: {', '.join(sorted(unknown))}")
    settings = {**EXTRA_DEFAULTS, **extra}
    if settings["architecture"] not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {settings['architecture']!r}; use one of {ARCHITECTURES}")
    settings.update(image_size=int(image_size or config.DEFAULT_IMAGE_SIZE), epochs=int(epochs),
                    batch_size=int(batch_size), val_patients=list(val_patients or []) or None,
                    val_fold=val_fold, seed=int(seed), base_filters=int(base_filters), depth=int(depth),
                    segmentation=bool(segmentation), policy=policy)
    settings["exclude_patients"] = sorted({str(p).upper() for p in settings["exclude_patients"]})
    if settings["architecture"] == "legacy":
        # The older project: no augmentation, no class weights, no segmentation target,
        # early stopping on validation loss with patience 2, threshold 0.5.
        settings.update(segmentation=False, augment=False, class_weighting=False, patience=2, lr_patience=1)
    return settings


def _build(settings: dict) -> keras.Model:
    shape = (settings["image_size"], settings["image_size"], 3)
    if settings["architecture"] == "legacy":
        return anna_model.build_legacy(shape)
    return anna_model.build_anna(shape, depth=settings["depth"], base_filters=settings["base_filters"],
                                 batch_norm=settings["batch_norm"], dropout=settings["dropout"],
                                 segmentation=settings["segmentation"], head_units=settings["head_units"],
                                 standardize_input=settings["standardize_input"])


def _validation_summary(labels: np.ndarray, p_leukemia: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    predicted = (p_leukemia >= threshold).astype(int)
    return {"roc_auc": float(roc_auc_score(labels, p_leukemia)),
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "sensitivity": float(predicted[labels == 1].mean()),
            "specificity": float(1 - predicted[labels == 0].mean()),
            "cells": int(len(labels)),
            # The threshold (Youden's J) and the best epoch were both chosen on these cells, so the
            # thresholded figures are optimistic; unseen patients are measured by `evaluate`.
            "threshold_chosen_on_these_cells": True}


def train_model(
    data=None,
    image_size: int | None = None,
    epochs: int | None = None,
    batch_size: int = config.DEFAULT_BATCH_SIZE,
    val_patients: list[str] | None = None,
    val_fold: int | None = None,
    seed: int = config.DEFAULT_SEED,
    output_dir: str | Path | None = None,
    base_filters: int = 8,
    depth: int = 4,
    segmentation: bool = True,
    policy: str = "auto",
    resume: str | Path | None = None,
    verbose: int | str = "auto",
    **kwargs,
) -> Path:
    """Train ANNa (or the legacy net) on patient-disjoint splits and write a run folder.

    Args:
        data: Dataset folder (C-NMC layout), manifest DataFrame, or a prepared arrays folder.
            With ``resume`` it defaults to the run's arrays.
        image_size: Image side in pixels (``config.DEFAULT_IMAGE_SIZE``; the run's on resume).
        epochs: Maximum epochs (``config.DEFAULT_EPOCHS``; the run's on resume).
        batch_size: Global batch size.
        val_patients: Patient ids to validate on (instead of a fold or a drawn fraction).
        val_fold: C-NMC fold to validate on (default: the last one when there are several).
        seed: Random seed (weights, shuffling, augmentation, patient draw).
        output_dir: Root of the outputs (``config.OUTPUT_DIR``).
        base_filters: U-Net filters at the first level.
        depth: U-Net down-sampling steps.
        segmentation: Train the ``cell_mask`` output too.
        policy: ``auto``, ``float32``, ``mixed_bfloat16`` or ``mixed_float16``.
        resume: A run folder to continue from its last finished epoch.
        verbose: Keras verbosity; ``auto`` = one line per epoch.
        **kwargs: Further settings, see ``EXTRA_DEFAULTS`` (``architecture``, ``learning_rate``,
            ``val_fraction``, ``dropout``, ``mask_loss_weight``, ``patience``, ``canvas``,
            ``exclude_patients``, ``runs_dir``, ``run_tag``, ``strategy``…).

    Returns:
        The run folder.
    """
    output_dir = Path(output_dir) if output_dir else None
    state, previous, last_checkpoint = None, None, None
    if resume is not None:
        run_dir = Path(resume)
        previous = load_run(run_dir)
        if previous.get("status") == "complete":
            raise TrainingDataError(f"{run_dir} finished already; start a new run instead of --resume")
        state = (json.loads((run_dir / STATE_FILENAME).read_text()) if (run_dir / STATE_FILENAME).is_file()
                 else None)
        last_checkpoint = last_checkpoint_path(run_dir, state) if state else None
        if last_checkpoint is None or not last_checkpoint.is_file():
            raise FileNotFoundError(f"{run_dir} has no {STATE_FILENAME} with its last-epoch checkpoint (it stopped "
                                    "before its first epoch ended); start a new run")
        settings = {**EXTRA_DEFAULTS, **previous["settings"]}
        if "canvas" not in previous["settings"] and previous.get("canvas") is not None:
            settings["canvas"] = int(previous["canvas"])  # a run from before the setting: its arrays' canvas
        if settings["strategy"] not in anna_model.STRATEGIES:  # a strategy object was given: pick again
            settings["strategy"] = "auto"
        settings["image_size"] = int(image_size or settings["image_size"])
        settings["epochs"] = int(epochs or settings["epochs"])
        if data is None:
            arrays = Path(previous["data"]["arrays_dir"])
            data = arrays if arrays.is_dir() else previous["data"]["source"]
        run_id = previous["run_id"]
    else:
        if data is None:
            raise ValueError("no data given; pass --data DIR (a C-NMC_Leukemia folder) or --resume RUN_DIR")
        settings = _resolve_settings(image_size, epochs or config.DEFAULT_EPOCHS, batch_size, val_patients,
                                     val_fold, seed, base_filters, depth, segmentation, policy, kwargs)
    verbose = 2 if verbose == "auto" else int(verbose)
    initial_epoch = state["last_epoch"] + 1 if state else 0
    keras.utils.set_random_seed(settings["seed"] + initial_epoch)

    # Every check that can fail on bad input runs before training starts.
    arrays_dir, arrays = _open_arrays(data, settings["image_size"], output_dir, settings["skip_bad"],
                                      settings["canvas"])
    labels = np.asarray(arrays.labels).astype(int)
    source = str(arrays_dir if isinstance(data, pd.DataFrame) else data)
    split = split_patients(arrays.manifest, labels, settings["val_patients"], settings["val_fold"],
                           settings["val_fraction"], settings["seed"], settings["exclude_patients"], source)
    if previous is not None:
        saved_size = anna_model.archive_image_size(last_checkpoint)
        if saved_size != settings["image_size"]:
            raise anna_model.ModelFileError(
                f"{last_checkpoint} takes {saved_size}x{saved_size} images but the arrays are "
                f"{settings['image_size']}x{settings['image_size']}; resume with --size {saved_size}")
    recorded_digest = (previous or {}).get("data", {}).get("manifest_digest")
    if previous is not None and recorded_digest and arrays.meta.get("digest") != recorded_digest:
        raise TrainingDataError(
            f"{arrays_dir} was rebuilt since {resume} started (other files, margin or preprocessing code), so "
            "resuming would train the later epochs on different inputs; start a new run instead")
    if previous is not None and split.val_patients != previous["val_patients"]:
        raise SplitError(f"the data at {source} gives validation patients {split.val_patients}, but {resume} "
                         f"validated on {previous['val_patients']}; resume with the run's own data")
    policy_name = anna_model.select_policy(settings["policy"])
    strategy = anna_model.select_strategy(settings["strategy"])
    class_weights = balanced_class_weights(labels[split.train_index]) if settings["class_weighting"] else None
    val_weights = balanced_class_weights(labels[split.val_index]) if settings["class_weighting"] else None
    legacy = settings["architecture"] == "legacy"
    monitor, mode = ("val_loss", "min") if legacy else (f"val_{anna_model.PROB_OUTPUT}_auc", "max")

    if previous is None:
        parent = Path(settings["runs_dir"]) if settings["runs_dir"] else Path(output_dir or config.OUTPUT_DIR) / config.MODELS_SUBDIR
        tag = settings["run_tag"] or f"{settings['architecture']}-s{settings['image_size']}"
        run_id, run_dir = _new_run_dir(parent, tag)
    meta = arrays.meta
    run_config = {
        "run_id": run_id,
        "created": previous["created"] if previous else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "architecture": settings["architecture"],
        "image_size": settings["image_size"],
        "margin": meta.get("margin"),
        "background_threshold": meta.get("background_threshold"),
        "canvas": meta.get("canvas"),
        "threshold": None,
        "threshold_method": "fixed 0.5 (legacy)" if legacy else "youden_j_on_validation (p >= threshold)",
        "val_patients": split.val_patients,
        "train_patients": split.train_patients,
        "excluded_patients": split.excluded_patients,
        "split_method": split.method,
        "val_fold": split.val_fold,
        "seed": settings["seed"],
        "policy": policy_name,
        "strategy": anna_model.strategy_name(strategy),
        "model": ({"builder": "build_legacy", "input_shape": [settings["image_size"]] * 2 + [3]} if legacy else
                  {"builder": "build_anna", "input_shape": [settings["image_size"]] * 2 + [3],
                   "depth": settings["depth"], "base_filters": settings["base_filters"],
                   "batch_norm": settings["batch_norm"], "dropout": settings["dropout"],
                   "segmentation": settings["segmentation"], "head_units": settings["head_units"],
                   "standardize_input": settings["standardize_input"]}),
        "training": {"epochs": settings["epochs"], "batch_size": settings["batch_size"],
                     "learning_rate": settings["learning_rate"], "optimizer": "adam",
                     "class_weights": class_weights, "augment": settings["augment"],
                     "mask_loss_weight": settings["mask_loss_weight"] if settings["segmentation"] else None,
                     "monitor": monitor, "patience": settings["patience"],
                     "lr_patience": settings["lr_patience"],
                     "train_images": int(len(split.train_index)), "val_images": int(len(split.val_index))},
        "data": {"source": str(meta.get("source") or source), "arrays_dir": str(arrays_dir), "manifest_digest": meta.get("digest"),
                 "dataset": meta.get("dataset"), "synthetic": bool(meta.get("synthetic", False)),
                 "count": int(len(labels))},
        "versions": _versions(),
        "settings": settings,
    }
    write_json_atomic(run_dir / CONFIG_FILENAME, run_config)

    history_path = run_dir / HISTORY_FILENAME
    if state and history_path.is_file():  # drop epochs after the checkpoint we resume from
        history = pd.read_csv(history_path)
        write_csv_atomic(history[history["epoch"] <= state["last_epoch"]], history_path)
    timer = ThroughputTimer()
    started = time.perf_counter()
    with anna_model.dtype_policy(policy_name), strategy.scope():
        if state:
            model = keras.saving.load_model(last_checkpoint, safe_mode=True)  # with optimizer state
            anna_model.check_input_size(model, settings["image_size"], last_checkpoint)
        else:
            model = _build(settings)
            _compile(model, settings["architecture"], settings["learning_rate"], settings["segmentation"],
                     settings["mask_loss_weight"])
        train_data = make_dataset(arrays.images, arrays.masks, labels, split.train_index, settings["batch_size"],
                                  True, settings["seed"], class_weights, settings["segmentation"], settings["augment"])
        val_data = make_dataset(arrays.images, arrays.masks, labels, split.val_index, settings["batch_size"],
                                False, settings["seed"], val_weights, settings["segmentation"], False)
        callbacks = [
            ResumableEarlyStopping(monitor=monitor, mode=mode, patience=settings["patience"],
                                   restore_best_weights=True, verbose=min(verbose, 1),
                                   initial_best=state["best"] if state else None,
                                   initial_wait=state["wait"] if state else 0),
            keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.5,
                                              patience=settings["lr_patience"], min_lr=1e-5,
                                              verbose=min(verbose, 1)),
            keras.callbacks.CSVLogger(str(history_path), append=bool(state)),
            RunCheckpoint(run_dir, monitor, mode, best=state["best"] if state else None),
            timer,
        ]
        if state and state.get("wait", 0) >= settings["patience"]:
            callbacks = callbacks[2:]  # early stopping had fired: only finish the run
            epochs_to_run = initial_epoch
        else:
            epochs_to_run = settings["epochs"]
        if initial_epoch < epochs_to_run:
            model.fit(train_data, validation_data=val_data, epochs=epochs_to_run, initial_epoch=initial_epoch,
                      verbose=verbose, callbacks=callbacks, shuffle=False)  # tf.data shuffles
    train_seconds = time.perf_counter() - started

    best_model = anna_model.load_model(run_dir)
    val_images = arrays.images[split.val_index]
    p_val = anna_model.predict_outputs(best_model, val_images, batch_size=max(64, settings["batch_size"]))[
        anna_model.PROB_OUTPUT]
    val_labels = labels[split.val_index]
    manifest = arrays.manifest.iloc[split.val_index]
    predictions = pd.DataFrame({"path": manifest["path"].astype(str).to_numpy(),
                                "name": manifest["name"].astype(str).to_numpy(),
                                "patient_id": manifest["patient_id"].astype(str).to_numpy(),
                                "label": val_labels, "p_leukemia": p_val.astype("float64")})
    write_csv_atomic(predictions, run_dir / VAL_PREDICTIONS_FILENAME)
    threshold = 0.5 if legacy else youden_threshold(val_labels, p_val)
    history = pd.read_csv(history_path) if history_path.is_file() else pd.DataFrame()
    final_state = json.loads((run_dir / STATE_FILENAME).read_text())
    epoch_seconds = timer.train_seconds[1:] or timer.train_seconds
    run_config.update(status="complete", threshold=threshold,
                      validation=_validation_summary(val_labels, p_val, threshold))
    run_config["training"].update(
        epochs_trained=int(len(history)), best_epoch=final_state.get("best_epoch"),
        best_monitor_value=final_state.get("best"),
        wall_seconds=round(train_seconds + (previous or {}).get("training", {}).get("wall_seconds", 0.0), 1),
        train_images_per_second=(round(len(split.train_index) / float(np.median(epoch_seconds)), 1)
                                 if epoch_seconds else None))
    write_json_atomic(run_dir / CONFIG_FILENAME, run_config)
    _remove_last_checkpoints(run_dir)  # only needed to resume an unfinished run
    return run_dir


# --------------------------------------------------------------------------- command line
