"""Patient-disjoint training runs of ANNa (and of the legacy network, for comparison).

``train_model`` prepares the cached arrays when needed, splits the labeled cells by patient (``data.splits``),
streams augmented batches (``inputs``), trains under the precision policy and ``tf.distribute`` strategy chosen for
the hardware (``hardware``) and writes one run folder (``saving``), epochs counted from 1 as Keras prints them. The
decision threshold is chosen on the run's own patient-held-out validation predictions. ``resume=RUN_DIR`` continues
an interrupted run after its last finished epoch (``ResumeState``) and ends with the same history as an uninterrupted
one. A run folder has one writer at a time: the run holds its lock file (``.lock``) from start to end.

On several machines (``strategy="multi-worker"``, or ``auto`` with ``TF_CONFIG`` naming several workers) every worker
runs this function on its share of each (global) batch; only the chief (worker 0) saves into the run folder, the others
into a temporary folder removed at the end. A killed worker is restarted with ``resume=RUN_DIR`` on every worker: each
restores the chief's backup.
"""
from __future__ import annotations

import contextlib
import hashlib
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from modules import config
from modules.data import schema
from modules.data.layout import DIGEST_COLUMN
from modules.data.splits import PatientSplit, SplitError, split_patients
from modules.metrics import choose_threshold, point_metrics
from modules.files import atomic_path, exclusive_lock, remove_partials, write_csv_atomic, write_json_atomic
from modules.modeling import hardware, network, saving
from modules.modeling.inputs import balanced_class_weights, cell_weights, count_batches, make_dataset
from modules.modeling.saving import load_run

#: train_model's settings besides the fields of ``config.ModelSettings`` and ``config.TrainSettings``.
RUN_OPTIONS = {"architecture": "anna", "val_patients": None, "val_fold": None, "exclude_patients": (),
               "canvas": config.DEFAULT_CANVAS, "skip_bad": False, "runs_dir": None, "run_tag": None}
#: Settings a resumed run may change; every other one stays the run's own.
RESUMABLE = ("epochs", "skip_bad")
MODEL_KEYS = tuple(f.name for f in fields(config.ModelSettings) if f.name != "image_size")
BACKUP_DIRNAME, STATE_FILENAME, LOCK_FILENAME = "backup", "state.json", ".lock"


class TrainingDataError(ValueError):
    """The arrays, the settings or the run to resume cannot be trained on; the message says what to fix."""


class WorkerLostError(ValueError):
    """A worker of a multi-worker run stopped; the message says how to restart the run."""


# --------------------------------------------------------------------------- settings
def default_settings() -> dict:
    """Every setting of a run with its default."""
    return {**asdict(config.ModelSettings()), **asdict(config.TrainSettings()), **RUN_OPTIONS}


def _normalize(settings: dict) -> dict:
    for key, choices in (("architecture", network.ARCHITECTURES), ("threshold_rule", config.THRESHOLD_RULES),
                         ("input_transform", config.INPUT_TRANSFORMS), ("mask_target", config.MASK_TARGETS)):
        if settings[key] not in choices:
            raise ValueError(f"unknown {key} {settings[key]!r}; use one of {', '.join(choices)}")
    for key in ("image_size", "epochs", "batch_size", "seed", "base_filters", "depth", "canvas", "stem_stride"):
        settings[key] = int(settings[key])
    if not 0 < float(settings["target_sensitivity"]) <= 1:
        raise ValueError(f"target_sensitivity {settings['target_sensitivity']} must be in (0, 1]")
    settings.update(segmentation=bool(settings["segmentation"]),
                    target_sensitivity=float(settings["target_sensitivity"]),
                    val_patients=list(settings["val_patients"] or []) or None,
                    exclude_patients=sorted({str(p).upper() for p in settings["exclude_patients"]}))
    if settings["architecture"] == "legacy":
        # The older project: no augmentation, no class weights, no segmentation target,
        # early stopping on validation loss with patience 2, threshold 0.5.
        settings.update(segmentation=False, augment=False, class_weighting=False, patience=2, lr_patience=1)
    return settings


def resolve_settings(given: dict, previous: dict | None = None, run_dir: Path | None = None) -> dict:
    """The defaults, then a resumed run's own settings, then those given (None: not given).

    Raises TypeError on an unknown setting, TrainingDataError where a resumed run changes one not in ``RESUMABLE``.
    """
    given = {key: value for key, value in given.items() if value is not None}
    unknown = set(given) - set(default_settings())
    if unknown:
        raise TypeError(f"train_model() got unknown settings: {', '.join(sorted(unknown))}")
    if previous is None:
        return _normalize({**default_settings(), **given})
    stored = {**default_settings(), **previous["settings"]}
    asked = _normalize({**stored, **given})
    changed = [key for key in given if key not in RESUMABLE and asked[key] != stored[key]]
    if changed:
        raise TrainingDataError(f"{run_dir} was trained with " + ", ".join(f"{k}={stored[k]!r}" for k in changed)
                                + f"; a resumed run keeps its settings (only {' and '.join(RESUMABLE)} may change)")
    return asked


# --------------------------------------------------------------------------- data
def open_arrays(data, settings: dict, output_dir: Path | None):
    """Prepare (or reuse) the arrays for ``data`` and load them, checking they fit the settings."""
    from modules import preprocessing

    path = None if isinstance(data, pd.DataFrame) else Path(data)
    arrays_dir = path if path is not None and (path / "images.npy").is_file() else preprocessing.prepare_arrays(
        data, size=settings["image_size"], output_dir=output_dir, skip_bad=settings["skip_bad"], progress=True,
        canvas=settings["canvas"])
    arrays = preprocessing.load_arrays(arrays_dir)
    canvas, prepared = settings["canvas"], arrays.meta.get("canvas", config.DEFAULT_CANVAS)
    if prepared is not None and int(prepared) != canvas:
        raise TrainingDataError(f"arrays in {arrays_dir} were prepared with canvas {prepared}, not {canvas}; "
                                f"use --canvas {prepared} or pass the dataset folder instead")
    size, wanted = int(arrays.images.shape[1]), settings["image_size"]
    if size != wanted:
        raise saving.ModelFileError(f"arrays in {arrays_dir} are {size}x{size}, not {wanted}x{wanted}; "
                                    f"use --size {size} or prepare the data at {wanted}")
    return Path(arrays_dir), arrays


def check_resumable(previous: dict, run_dir: Path, arrays, split: PatientSplit) -> None:
    """Refuse to resume a run on other cells than those it started with."""
    digest = previous.get("data", {}).get("manifest_digest")
    if digest and arrays.meta.get("digest") != digest:
        raise TrainingDataError(f"the arrays were rebuilt since {run_dir} started (other files, margin or "
                                "preprocessing code), so its later epochs would train on other inputs; start a new run")
    if split.val_patients != previous["val_patients"]:
        raise SplitError(f"the data gives validation patients {split.val_patients}, but {run_dir} validated on "
                         f"{previous['val_patients']}; resume with the run's own data")


# --------------------------------------------------------------------------- model
def build_model(settings: dict) -> keras.Model:
    """The uncompiled network the settings describe (``network.build_anna`` or ``build_legacy``)."""
    shape = (settings["image_size"], settings["image_size"], 3)
    if settings["architecture"] == "legacy":
        return network.build_legacy(shape)
    return network.build_anna(shape, **{key: settings[key] for key in MODEL_KEYS})


def compile_model(model: keras.Model, settings: dict) -> None:
    """Adam, binary cross-entropy on each output (the mask's weighted), AUC on ``p_leukemia``."""
    losses, weights = {network.PROB_OUTPUT: "binary_crossentropy"}, {network.PROB_OUTPUT: 1.0}
    if settings["architecture"] == "anna" and settings["segmentation"]:
        losses[network.MASK_OUTPUT] = "binary_crossentropy"
        weights[network.MASK_OUTPUT] = float(settings["mask_loss_weight"])
    model.compile(optimizer=keras.optimizers.Adam(settings["learning_rate"]), loss=losses, loss_weights=weights,
                  metrics={network.PROB_OUTPUT: [keras.metrics.AUC(name="auc")]})


def monitor_of(settings: dict) -> tuple[str, str]:
    """The validation figure that early stopping and the learning-rate schedule watch, and its direction."""
    return ("val_loss", "min") if settings["architecture"] == "legacy" else (f"val_{network.PROB_OUTPUT}_auc", "max")


# --------------------------------------------------------------------------- callbacks
def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def read_state(run_dir: Path) -> dict[str, dict]:
    """The entries of ``backup/state.json`` by epoch (from 1); empty before the first epoch ended."""
    file = Path(run_dir) / BACKUP_DIRNAME / STATE_FILENAME
    if not file.is_file():
        return {}
    return dict(schema.read_json(file, schema.STATE, f"delete {file.parent} to train the run again from its first "
                                 "epoch", TrainingDataError)["epochs"])


class ResumeState(keras.callbacks.Callback):
    """Everything a resumed fit needs, saved after every epoch and put back at the first epoch of a fit that starts
    at ``epochs_done`` (``fit(initial_epoch=…)``).

    After each epoch: ``history.csv``, then in ``backup/`` the model's variables (dropout seed states included) and
    the optimizer's (``epoch-N.npz``), early stopping's best weights (``best-epoch-N.npz``) and ``state.json`` (both
    names, early stopping's and ``ReduceLROnPlateau``'s counters). Each file is replaced atomically, ``state.json``
    last, so a kill at any moment leaves one complete epoch. Not Keras' ``BackupAndRestore``: its ``save_weights``
    skips the seed states (a resumed run would not repeat the uninterrupted one), it rewrites its weights file, then
    its epoch file, in place (a kill between the two pairs one epoch's weights with another's number), deletes its
    backup when ``fit`` returns (before the model is saved) and keeps no other callback's state.
    """

    SAVED = {"early_stopping": ("wait", "best", "best_epoch", "stopped_epoch"),
             "reduce_lr": ("wait", "best", "cooldown_counter")}

    def __init__(self, run_dir: Path, early_stopping: keras.callbacks.EarlyStopping,
                 reduce_lr: keras.callbacks.ReduceLROnPlateau):
        super().__init__()
        self.folder, self.history_path = run_dir / BACKUP_DIRNAME, run_dir / saving.HISTORY_FILENAME
        self.callbacks = {"early_stopping": early_stopping, "reduce_lr": reduce_lr}
        self.entries, self.rows, self.restored = read_state(run_dir), [], False
        self.epochs_done = max(map(int, self.entries), default=0)

    def variables(self) -> dict[str, list]:
        """The model's variables and the optimizer's (step count, learning rate, moments), in a fixed order."""
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        return {"model": list(self.model.variables), "optimizer": list(self.model.optimizer.variables)}

    def restore(self, done: int) -> None:
        """Put back the history and the callbacks' state after epoch ``done`` (0: none), the variables when fitting."""
        self.restored = True
        if not done:
            return
        if self.history_path.is_file():
            history = pd.read_csv(self.history_path)
            self.rows = history[history["epoch"] <= done].to_dict("records")
        if str(done) not in self.entries:
            raise TrainingDataError(f"{self.folder / STATE_FILENAME} has no state for epoch {done}; start a new run")
        entry = self.entries[str(done)]
        for name, callback in self.callbacks.items():
            for attribute, value in entry[name].items():
                setattr(callback, attribute, value)
        with np.load(self.folder / entry["best_weights"]) as saved:
            self.callbacks["early_stopping"].best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if self.model is None:  # not fitting: only the best weights are wanted
            return
        file = self.folder / entry["checkpoint"]
        with np.load(file) as saved:
            for group, variables in self.variables().items():
                stored = sum(key.startswith(f"{group}_") for key in saved.files)
                if stored != len(variables):
                    raise TrainingDataError(f"{file} holds {stored} {group} variables, not {len(variables)}: it "
                                            "belongs to another network; start a new run")
                for i, variable in enumerate(variables):
                    variable.assign(saved[f"{group}_{i}"])

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if not self.restored:
            self.restore(epoch)  # the fit's initial epoch: epochs_done (0 for a new run)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.rows.append({"epoch": epoch + 1, **{key: _plain(value) for key, value in sorted((logs or {}).items())}})
        write_csv_atomic(pd.DataFrame(self.rows), self.history_path)
        stopping = self.callbacks["early_stopping"]
        best_file, checkpoint = f"best-epoch-{stopping.best_epoch + 1:04d}.npz", f"epoch-{epoch + 1:04d}.npz"
        if stopping.best_epoch == epoch:
            with atomic_path(self.folder / best_file) as partial:
                np.savez(partial, *stopping.best_weights)
        with atomic_path(self.folder / checkpoint) as partial:
            np.savez(partial, **{f"{group}_{i}": keras.ops.convert_to_numpy(variable) for group, variables
                                 in self.variables().items() for i, variable in enumerate(variables)})
        entry = {name: {attribute: _plain(getattr(callback, attribute)) for attribute in self.SAVED[name]}
                 for name, callback in self.callbacks.items()}
        self.entries = {str(epoch + 1): {**entry, "best_weights": best_file, "checkpoint": checkpoint,
                                         "stopped": bool(self.model.stop_training)}}
        write_json_atomic(self.folder / STATE_FILENAME, {"epochs": self.entries})  # the epoch is saved now
        for path in self.folder.glob("*.npz"):
            if path.name not in (best_file, checkpoint):
                path.unlink(missing_ok=True)


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


def fit_model(model: keras.Model, train_data: Callable[[int], tf.data.Dataset], val_data, settings: dict,
              run_dir: Path, verbose: int, steps_per_epoch: int | None = None) -> tuple[ResumeState, ThroughputTimer]:
    """Train with early stopping and a learning-rate schedule, resumably; the best epoch's weights at the end.

    ``train_data(first)`` gives the batches from epoch ``first`` on (from 0); ``steps_per_epoch`` is set where
    they stream all epochs in one pass (``inputs.make_dataset``), None where each pass is one epoch.
    """
    monitor, mode = monitor_of(settings)
    stopping = keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=settings["patience"],
                                             restore_best_weights=True, verbose=min(verbose, 1))
    reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.5, min_lr=1e-5,
                                                  patience=settings["lr_patience"], verbose=min(verbose, 1))
    state, timer = ResumeState(run_dir, stopping, reduce_lr), ThroughputTimer()
    latest = state.entries.get(str(state.epochs_done), {})
    if latest.get("stopped") or state.epochs_done >= settings["epochs"]:  # it had finished: take its best epoch
        state.restore(state.epochs_done)
        model.set_weights(stopping.best_weights)
        return state, timer
    # ResumeState comes after the callbacks whose state it saves; tf.data shuffles.
    model.fit(train_data(state.epochs_done), validation_data=val_data, epochs=settings["epochs"],
              initial_epoch=state.epochs_done, steps_per_epoch=steps_per_epoch, verbose=verbose,
              callbacks=[stopping, reduce_lr, state, timer], shuffle=False)
    return state, timer


# --------------------------------------------------------------------------- run folder
@contextlib.contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[Path]:
    """Be the run folder's one writer for the whole ``with`` block (else LockHeldError, naming the holder), then clear
    what a killed writer left; TrainingDataError where the run finished while this process got ready to resume it."""
    with exclusive_lock(run_dir / LOCK_FILENAME, f"the run folder {run_dir}"):
        if load_run(run_dir, required=False).get("status") == "complete":
            raise TrainingDataError(f"{run_dir} finished already; start a new run instead of --resume")
        for folder in (run_dir, run_dir / BACKUP_DIRNAME):  # a killed writer's temporary files: none is live now
            remove_partials(folder)
        yield run_dir


@contextlib.contextmanager
def worker_copy(resume: Path | None, tag: str) -> Iterator[Path]:
    """A temporary folder, removed at the end, holding a copy of ``resume``'s backup and history."""
    with tempfile.TemporaryDirectory(prefix="anna-worker-") as temp:
        folder = Path(temp) / (resume.name if resume else tag)
        folder.mkdir()
        if resume and (resume / BACKUP_DIRNAME).is_dir():
            shutil.copytree(resume / BACKUP_DIRNAME, folder / BACKUP_DIRNAME)
        if resume and (resume / saving.HISTORY_FILENAME).is_file():
            shutil.copy2(resume / saving.HISTORY_FILENAME, folder / saving.HISTORY_FILENAME)
        yield folder


@contextlib.contextmanager
def worker_run_dir(strategy: tf.distribute.Strategy, parent: Path, tag: str, resume: Path | None,
                   cells: int) -> Iterator[Path]:
    """The folder this process writes the run to: ``resume`` or a new run folder on the chief (or a lone process),
    a ``worker_copy`` of ``resume`` on any other worker, so that it restores the chief's epoch and callback state.

    Raises StrategyError where the workers hold other cells (``cells_key``) or would start from other epochs
    (they would mix two runs, or wait for each other for ever), WorkerLostError where one stops during the run.
    """
    chief = hardware.is_chief(strategy)
    with claim_run_dir(resume or new_run_dir(parent, tag)) if chief else worker_copy(resume, tag) as run_dir:
        if hardware.count_workers(strategy) == 1:
            yield run_dir
            return
        done = max(map(int, read_state(run_dir)), default=0)
        starts, held = zip(*hardware.gather_from_workers(strategy, [done, cells]))
        if len(set(held)) > 1:
            raise hardware.StrategyError("the workers hold different cells (their arrays differ): give every worker "
                                         "the same --data, prepared with the same settings")
        if len(set(starts)) > 1:
            raise hardware.StrategyError(f"the workers would start after epochs {list(starts)} (worker 0 first): "
                                         "start every worker with --resume RUN_DIR (the chief's run folder), or "
                                         "every one without it")
        try:
            yield run_dir
        except tf.errors.UnavailableError as error:  # TensorFlow stops every worker when one stops
            where = run_dir if chief else resume or "RUN_DIR (the chief's run folder)"
            raise WorkerLostError(f"a worker of the cluster stopped or cannot be reached ({type(error).__name__}), "
                                  f"so this one stopped too; start every worker again with --resume {where}") from error


def cells_key(manifest: pd.DataFrame, split: PatientSplit) -> int:
    """A number for the pixels and labels of a run's training and validation rows, in order: equal on every machine
    holding the same cells, wherever and however old the files; 6 hex digits, so workers exchange it exactly."""
    rows = manifest.iloc[np.concatenate([split.train_index, split.val_index])]
    text = "".join(f"{digest}{label}\n" for digest, label in zip(rows[DIGEST_COLUMN], rows["label"]))
    return int(hashlib.sha256(text.encode()).hexdigest()[:6], 16)


def cell_batches(images, masks, labels: np.ndarray, rows: np.ndarray, settings: dict, training: bool,
                 epochs: range) -> tf.data.Dataset:
    """The batches of ``rows`` a run with ``settings`` trains (``training``: weighted by class and augmented, over
    ``epochs``) or validates on (``inputs.make_dataset``)."""
    weights = cell_weights(labels, rows, settings["class_weighting"])
    augment = settings["augment"] and training
    return make_dataset(images, masks, labels, rows, settings["batch_size"], training, settings["seed"], weights,
                        settings["segmentation"], augment, epochs)


def sharded(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The dataset with each worker of a cluster reading its own part of every (global) batch: sharded by data, not
    files (the cells come from one memory-mapped array); every worker shuffles alike, so the parts never overlap."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def new_run_dir(parent: Path, tag: str) -> Path:
    """Create ``<parent>/<timestamp>-<tag>`` (with a counter when taken); never reuse a folder."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        run_dir = parent / (f"{stamp}-{tag}" + (f"-{attempt}" if attempt > 1 else ""))
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()
            return run_dir
    raise RuntimeError(f"could not create a new run folder under {parent}")


def describe_run(run_dir: Path, settings: dict, split: PatientSplit, arrays, arrays_dir: Path, source: str,
                 policy: str, strategy: tf.distribute.Strategy, previous: dict | None) -> dict:
    """The ``config.json`` of a run that starts (or resumes) now."""
    import sklearn

    legacy, meta, size = settings["architecture"] == "legacy", arrays.meta, settings["image_size"]
    labels = np.asarray(arrays.labels).astype(int)
    builder = {"builder": f"build_{settings['architecture']}", "input_shape": [size, size, 3]}
    segmentation, weighted = settings["segmentation"], settings["class_weighting"]
    training = {**{key: settings[key] for key in ("epochs", "batch_size", "learning_rate", "augment", "patience",
                                                  "lr_patience")},
                "optimizer": "adam", "monitor": monitor_of(settings)[0],
                "mask_target": settings["mask_target"] if segmentation else None,
                "class_weights": balanced_class_weights(labels[split.train_index]) if weighted else None,
                "mask_loss_weight": settings["mask_loss_weight"] if segmentation else None,
                "train_images": int(len(split.train_index)), "val_images": int(len(split.val_index))}
    return {
        "run_id": run_dir.name, "status": "running", "architecture": settings["architecture"], "image_size": size,
        "created": previous["created"] if previous else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{key: meta.get(key) for key in ("margin", "background_threshold", "canvas")}, "threshold": None,
        "threshold_method": "fixed 0.5 (legacy)" if legacy else {
            "youden": "youden_j_on_validation (p >= threshold)",
            "sensitivity": f"sensitivity_{settings['target_sensitivity']:g}_on_validation (p >= threshold)",
        }[settings["threshold_rule"]],
        "val_patients": split.val_patients, "train_patients": split.train_patients,
        "excluded_patients": split.excluded_patients, "split_method": split.method, "val_fold": split.val_fold,
        "seed": settings["seed"], "policy": policy, "strategy": hardware.describe_strategy(strategy),
        "workers": hardware.count_workers(strategy), "hardware": hardware.describe_hardware(policy, strategy),
        "model": builder if legacy else {**builder, **{key: settings[key] for key in MODEL_KEYS}},
        "training": training,
        "data": {"source": str(meta.get("source") or source), "arrays_dir": str(arrays_dir),
                 "manifest_digest": meta.get("digest"), "dataset": meta.get("dataset"),
                 "synthetic": bool(meta.get("synthetic", False)), "count": int(len(labels))},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__, "pandas": pd.__version__, "scikit-learn": sklearn.__version__,
                     "platform": platform.platform()},
        # A strategy object is recorded as "auto": a resumed run picks one again.
        "settings": {**settings, "strategy": settings["strategy"] if isinstance(settings["strategy"], str) else "auto"},
    }


def finish_run(run_dir: Path, run_config: dict, model: keras.Model, arrays, split: PatientSplit,
               state: ResumeState, timer: ThroughputTimer, seconds: float) -> None:
    """Save the best model, score it on the validation patients, choose the threshold, complete config.json."""
    with atomic_path(run_dir / saving.MODEL_FILENAME) as partial:
        model.save(partial)
    best = saving.load_model(run_dir)  # the saved file is what gets scored
    labels = np.asarray(arrays.labels).astype(int)[split.val_index]
    p_val = saving.predict_outputs(best, arrays.images[split.val_index],
                                   batch_size=max(64, run_config["training"]["batch_size"]))[network.PROB_OUTPUT]
    manifest = arrays.manifest.iloc[split.val_index]
    columns = {key: manifest[key].astype(str).to_numpy() for key in ("path", "name", "patient_id")}
    write_csv_atomic(pd.DataFrame({**columns, "label": labels, "p_leukemia": p_val.astype("float64")}),
                     run_dir / saving.VAL_PREDICTIONS_FILENAME)
    settings = run_config["settings"]
    threshold = 0.5 if run_config["architecture"] == "legacy" else choose_threshold(
        labels, p_val, settings["threshold_rule"], settings["target_sensitivity"])
    figures = point_metrics(labels, p_val, threshold)
    # The threshold and the best epoch were both chosen on these cells, so the thresholded figures are
    # optimistic; patients the run never saw are measured by `evaluate`.
    validation = {**{key: figures[key] for key in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")},
                  "cells": int(len(labels)), "threshold_chosen_on_these_cells": True}
    stopping = state.callbacks["early_stopping"]
    epoch_seconds = timer.train_seconds[1:] or timer.train_seconds  # the first epoch includes tracing
    run_config.update(status="complete", threshold=threshold, validation=validation)
    run_config["training"].update(
        epochs_trained=len(state.rows), best_epoch=int(stopping.best_epoch) + 1,
        best_monitor_value=_plain(stopping.best), wall_seconds=round(seconds, 1), train_images_per_second=(
            round(len(split.train_index) / float(np.median(epoch_seconds)), 1) if epoch_seconds else None))
    write_json_atomic(run_dir / saving.CONFIG_FILENAME, run_config)
    shutil.rmtree(run_dir / BACKUP_DIRNAME, ignore_errors=True)  # only needed to resume an unfinished run


# --------------------------------------------------------------------------- train_model
def train_model(data=None, *, resume: str | Path | None = None, output_dir: str | Path | None = None,
                verbose: int | str = "auto", **settings) -> Path | None:
    """Train ANNa (or the legacy net) on patient-disjoint splits and write a run folder.

    ``data``: a dataset folder (C-NMC layout), manifest DataFrame or prepared arrays folder (with ``resume``,
    the run's arrays by default). ``resume``: a run folder to continue after its last finished epoch, with its
    own settings. ``verbose``: Keras' (``auto``: a line per epoch). ``settings``: fields of
    ``config.ModelSettings`` and ``config.TrainSettings``, and ``RUN_OPTIONS``; None takes the default.
    Returns the run folder; None on a worker of a cluster other than the chief (it keeps no files).
    """
    resume = Path(resume) if resume is not None else None
    previous = load_run(resume) if resume is not None else None
    if previous is not None and previous.get("status") == "complete":
        raise TrainingDataError(f"{resume} finished already; start a new run instead of --resume")
    settings = resolve_settings(settings, previous, resume)
    if data is None and previous is None:
        raise ValueError("no data given; pass --data DIR (a C-NMC_Leukemia folder) or --resume RUN_DIR")
    # First of all TensorFlow's work: a multi-worker strategy must exist before any other operation.
    strategy = hardware.select_strategy(settings["strategy"])
    if data is None:
        arrays = Path(previous["data"]["arrays_dir"])
        data = arrays if arrays.is_dir() else previous["data"]["source"]
    verbose = 2 if verbose == "auto" else int(verbose)
    # The same seed on a resume: it builds the same network, whose state is then restored; the data's
    # draws depend on (seed, epoch) only.
    keras.utils.set_random_seed(settings["seed"])

    # Every check that can fail on bad input runs before the run folder is made.
    output_dir = Path(output_dir) if output_dir else None
    arrays_dir, arrays = open_arrays(data, settings, output_dir)
    source = str(arrays_dir if isinstance(data, pd.DataFrame) else data)
    labels = np.asarray(arrays.labels).astype(int)
    split = split_patients(arrays.manifest, labels, settings["val_patients"], settings["val_fold"],
                           settings["val_fraction"], settings["seed"], settings["exclude_patients"], source)
    if previous is not None:
        check_resumable(previous, resume, arrays, split)
    policy = hardware.select_policy(settings["policy"])
    parent = Path(settings["runs_dir"] or Path(output_dir or config.OUTPUT_DIR) / config.MODELS_SUBDIR)
    tag = settings["run_tag"] or f"{settings['architecture']}-s{settings['image_size']}"

    masks, nucleus_fallbacks = arrays.masks, None
    if settings["segmentation"] and settings["mask_target"] == "nucleus":
        from modules.preprocessing.nucleus import nucleus_masks

        masks, nucleus_fallbacks = nucleus_masks(arrays.images, arrays.masks, progress=verbose > 0)

    def dataset(rows: np.ndarray, training: bool, first_epoch: int = 0) -> tf.data.Dataset:
        return sharded(cell_batches(arrays.images, masks, labels, rows, settings, training,
                                    range(first_epoch, settings["epochs"])))

    with worker_run_dir(strategy, parent, tag, resume, cells_key(arrays.manifest, split)) as run_dir:
        run_config = describe_run(run_dir, settings, split, arrays, arrays_dir, source, policy, strategy, previous)
        if nucleus_fallbacks is not None:  # cells whose target is their cell mask: no nucleus trusted
            run_config["training"]["nucleus_fallbacks"] = nucleus_fallbacks
        write_json_atomic(run_dir / saving.CONFIG_FILENAME, run_config)
        started = time.perf_counter()
        with hardware.dtype_policy(policy), strategy.scope():
            model = build_model(settings)
            if hardware.count_workers(strategy) > 1:  # each worker sees part of a batch: normalize over all of it
                for layer in model.layers:
                    if isinstance(layer, keras.layers.BatchNormalization):
                        layer.synchronized = True
            compile_model(model, settings)
            state, timer = fit_model(model, lambda first: dataset(split.train_index, True, first),
                                     dataset(split.val_index, False), settings, run_dir, verbose,
                                     count_batches(len(split.train_index), settings["batch_size"]))
        finish_run(run_dir, run_config, model, arrays, split, state, timer, time.perf_counter() - started)
    return run_dir if hardware.is_chief(strategy) else None
