"""Several trained runs as one model: ``python -m modules ensemble RUN_DIR ... `` (or ``--cv DIR``).

Each member's score is centred on its own threshold (chosen on its own patient-held-out validation),
``logit(p) - logit(threshold)``; the ensemble's ``p_leukemia`` is the sigmoid of their mean, so its
threshold is 0.5 and no cell of any data set chooses it. Masks are averaged. The result is an
ordinary run folder (``model.keras`` + ``config.json``): ``evaluate``, ``predict`` and the notebooks
take it as they take one run. Its ``train_patients`` lists every patient any member trained or
validated on, so that ``evaluate --patients unseen`` keeps only patients no member has seen.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
from keras import layers

from modules import config
from modules.files import atomic_path, write_json_atomic
from modules.modeling import saving
from modules.modeling.network import MASK_OUTPUT, PROB_OUTPUT

ENSEMBLE_TAG = "ensemble"


class EnsembleError(ValueError):
    """Runs that cannot be combined; the message says which and why."""


@keras.saving.register_keras_serializable(package="anna")
class CentredLogit(layers.Layer):
    """``logit(p) - logit(threshold)``: a member's score, 0 at its own threshold."""

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def call(self, p):
        p = keras.ops.clip(keras.ops.cast(p, "float32"), 1e-6, 1 - 1e-6)
        t = float(np.clip(self.threshold, 1e-6, 1 - 1e-6))
        return keras.ops.log(p / (1 - p)) - float(np.log(t / (1 - t)))

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold}


def build_ensemble(members: list[keras.Model], thresholds: list[float]) -> keras.Model:
    """One model whose ``p_leukemia`` is the sigmoid of the members' mean centred logit (threshold 0.5)."""
    inputs = keras.Input(shape=members[0].inputs[0].shape[1:], name="image")
    scores, masks = [], []
    for k, (member, threshold) in enumerate(zip(members, thresholds)):
        member.name = f"member{k}"  # unique names inside one model
        outputs = member(inputs)
        scores.append(CentredLogit(threshold, name=f"member{k}_centred")(outputs[PROB_OUTPUT]))
        if MASK_OUTPUT in outputs:
            masks.append(outputs[MASK_OUTPUT])
    mean = layers.Average(name="mean_centred_logit")(scores) if len(scores) > 1 else scores[0]
    result = {PROB_OUTPUT: layers.Activation("sigmoid", dtype="float32", name=PROB_OUTPUT)(mean)}
    if len(masks) == len(members):
        result[MASK_OUTPUT] = (layers.Average(dtype="float32", name=MASK_OUTPUT)(masks) if len(masks) > 1
                               else layers.Identity(dtype="float32", name=MASK_OUTPUT)(masks[0]))
    return keras.Model(inputs, result, name="anna_ensemble")


def cv_runs(cv_dir: str | Path, model: str = "anna") -> list[Path]:
    """The finished run folders of a cross-validation's ``model`` jobs (``fold<k>_<model>/runs/*``)."""
    runs = sorted(p.parent for p in Path(cv_dir).glob(f"fold*_{model}/runs/*/{saving.MODEL_FILENAME}"))
    if not runs:
        raise EnsembleError(f"no finished {model} run under {cv_dir} (fold<k>_{model}/runs/<run>/model.keras); "
                            "run `python -m modules cv` first, or name the run folders")
    return runs


def write_ensemble(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Combine finished runs into a new run folder (``output/models/<timestamp>-ensemble<N>``); its path.

    Raises:
        EnsembleError: Fewer than two runs, an unfinished one, or runs of other image sizes or targets.
    """
    runs = [Path(r) for r in run_dirs]
    if len(runs) < 2:
        raise EnsembleError("an ensemble needs at least two run folders")
    configs = [saving.load_run(r) for r in runs]
    for run, cfg in zip(runs, configs):
        if cfg.get("status") != "complete" or cfg.get("threshold") is None:
            raise EnsembleError(f"{run} has not finished training (no threshold yet); finish it or leave it out")
    for key in ("image_size", "canvas", "margin", "architecture"):
        if len({str(c.get(key)) for c in configs}) > 1:
            raise EnsembleError(f"the runs differ in {key} ({', '.join(str(c.get(key)) for c in configs)}); "
                                "combine runs trained on the same arrays settings")
    members = [saving.load_model(r) for r in runs]
    model = build_ensemble(members, [float(c["threshold"]) for c in configs])
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out) if out else config.OUTPUT_DIR / config.MODELS_SUBDIR / f"{stamp}-{ENSEMBLE_TAG}{len(runs)}"
    if run_dir.exists():
        raise EnsembleError(f"{run_dir} exists already; choose a new --out (a run folder is never overwritten)")
    run_dir.mkdir(parents=True)
    with atomic_path(run_dir / saving.MODEL_FILENAME) as partial:
        model.save(partial)
    seen = sorted({p for c in configs for p in c["train_patients"] + c["val_patients"]}, key=str)
    first = configs[0]
    write_json_atomic(run_dir / saving.CONFIG_FILENAME, {
        **first, "run_id": run_dir.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threshold": 0.5, "threshold_method": "members' own validation thresholds: sigmoid of the mean of "
        "logit(p) - logit(threshold), called at 0.5",
        "train_patients": seen, "val_patients": [], "excluded_patients": [],
        "split_method": f"ensemble of {len(runs)} runs", "val_fold": None,
        "validation": {}, "ensemble": {"members": [str(r.resolve()) for r in runs],
                                       "thresholds": [float(c["threshold"]) for c in configs]},
        "data": {**first["data"], "synthetic": any(c["data"].get("synthetic") for c in configs)},
    })
    return run_dir
