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
from keras import layers

from modules import config
from modules.files import staged_folder, write_json_atomic
from modules.modeling import saving
from modules.modeling.network import MASK_OUTPUT, PROB_OUTPUT, CentredLogit

ENSEMBLE_TAG = "ensemble"


class EnsembleError(ValueError):
    """Runs that cannot be combined; the message says which and why."""


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
    """The run folder of each finished ``model`` job of a cross-validation (``fold<k>_<model>/result.json``)."""
    import json

    results = [json.loads(p.read_text()) for p in sorted(Path(cv_dir).glob("fold*/result.json"))]
    runs = [Path(r["run_dir"]) for r in results if r.get("model") == model and r.get("run_dir")]
    if not runs:
        raise EnsembleError(f"no finished {model} job under {cv_dir} (fold<k>_{model}/result.json); run "
                            "`python -m modules cv` first, or name the run folders")
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
    compared = {key: [str(c.get(key)) for c in configs]
                for key in ("image_size", "canvas", "margin", "background_threshold", "architecture")}
    compared["mask target"] = [str((c.get("training") or {}).get("mask_target") or "cell") for c in configs]
    for key, values in compared.items():
        if len(set(values)) > 1:
            raise EnsembleError(f"the runs differ in {key} ({', '.join(values)}); combine runs trained on the "
                                "same arrays settings and mask target")
    thresholds = [float(c["threshold"]) for c in configs]
    model = build_ensemble([saving.load_model(r) for r in runs], thresholds)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out) if out else config.OUTPUT_DIR / config.MODELS_SUBDIR / f"{stamp}-{ENSEMBLE_TAG}{len(runs)}"
    if run_dir.exists():
        raise EnsembleError(f"{run_dir} exists already; choose a new --out (a run folder is never overwritten)")
    seen = sorted({p for c in configs for p in c["train_patients"] + c["val_patients"]}, key=str)
    first = configs[0]
    run_config = {
        **first, "run_id": run_dir.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threshold": 0.5, "threshold_method": "members' own validation thresholds: sigmoid of the mean of "
        "logit(p) - logit(threshold), called at 0.5",
        "train_patients": seen, "val_patients": [], "excluded_patients": [],
        "split_method": f"ensemble of {len(runs)} runs", "val_fold": None,
        "validation": {}, "ensemble": {"members": [str(r.resolve()) for r in runs], "thresholds": thresholds},
        "data": {**first["data"], "synthetic": any(c["data"].get("synthetic") for c in configs)},
        # The members' training, not the ensemble's: member 0's figures with every member's best epoch.
        "training": {**first["training"], "best_epoch": None, "member_best_epochs": [
            c["training"].get("best_epoch") for c in configs]},
    }
    with staged_folder(run_dir, replace=False) as staged:  # a failed save leaves no folder behind
        model.save(staged.path / saving.MODEL_FILENAME)
        write_json_atomic(staged.path / saving.CONFIG_FILENAME, run_config)
    return staged.target
