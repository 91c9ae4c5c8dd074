"""Figures and documents of an evaluation: its charts, ``report.md`` and ``report.html``.

The chart builders return ``Chart`` (figure, data table, caption) so the notebooks show them
inline; ``evaluate.evaluate_run`` saves them with ``viz.save_chart`` and then calls
``write_report``, which lays the numbers and the figures out together, with images referenced
relatively so the HTML loads them from its own folder.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from modules import config
from modules.evaluation import evaluate
from modules.files import write_text_atomic

class Chart(NamedTuple):
    """One chart: the figure, the numbers it draws, and a caption."""

    figure: Any
    data: pd.DataFrame
    caption: str


def metric_charts(predictions: pd.DataFrame, threshold: float, synthetic: bool = False,
                  per_patient: pd.DataFrame | None = None) -> dict[str, Chart]:
    """Charts computed from the predictions table alone.

    Args:
        predictions: ``predictions.csv`` columns (``label``, ``p_leukemia``, ``prediction``, …).
        threshold: Decision threshold used.
        synthetic: Mark titles as synthetic.
        per_patient: ``per_patient_table`` output (computed when None).

    Returns:
        {name: Chart} for confusion_matrix, roc_curve, precision_recall_curve,
        probability_histogram, calibration_curve and (when patients are known) per_patient_accuracy.
    """
    from sklearn.calibration import calibration_curve

    from modules.reporting import charts as viz

    tag = viz.synthetic_suffix(synthetic)
    labels = predictions["label"].astype("int64").to_numpy()
    p = predictions["p_leukemia"].astype("float64").to_numpy()
    predicted = predictions["prediction"].astype("int64").to_numpy()
    charts: dict[str, Chart] = {}
    table = evaluate.confusion_table(labels, predicted)
    charts["confusion_matrix"] = Chart(viz.plot_confusion_matrix(table, f"Confusion matrix, threshold {threshold:.3f}{tag}"),
                                       table, "Cell counts (left) and the share of each TRUE class (right, rows sum "
                                       "to 100 %): the all row's diagonal is the sensitivity, the hem row's the specificity.")
    both = labels.min() != labels.max()
    operating = (float(((predicted == 1) & (labels == 0)).sum() / max((labels == 0).sum(), 1)),
                 float(((predicted == 1) & (labels == 1)).sum() / max((labels == 1).sum(), 1)))
    if both:
        fpr, tpr, thresholds = skm.roc_curve(labels, p)
        roc = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})
        auc = skm.roc_auc_score(labels, p)
        charts["roc_curve"] = Chart(viz.plot_roc(roc, auc, operating, threshold, f"ROC curve{tag}"), roc,
                                    f"ROC curve (AUC {auc:.3f}); the dot is the operating point of threshold {threshold:.3f}.")
        precision, recall, pr_thresholds = skm.precision_recall_curve(labels, p)
        pr = pd.DataFrame({"recall": recall, "precision": precision,
                           "threshold": np.append(pr_thresholds, np.nan)})
        ap = skm.average_precision_score(labels, p)
        op_precision = float(skm.precision_score(labels, predicted, zero_division=0))
        charts["precision_recall_curve"] = Chart(
            viz.plot_precision_recall(pr, ap, float(labels.mean()), (operating[1], op_precision), f"Precision-recall{tag}"),
            pr, f"Precision against recall for the leukemic class (average precision {ap:.3f}); dashed: share of leukemic cells.")
        fraction, mean_predicted = calibration_curve(labels, p, n_bins=10, strategy="uniform")
        # Cells per non-empty bin, binned as calibration_curve bins them (right-closed edges).
        counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p), minlength=10)
        counts = counts[counts > 0]
        calibration = pd.DataFrame({"mean_predicted": mean_predicted, "fraction_positive": fraction,
                                    "cells": counts if len(counts) == len(fraction) else np.nan})
        charts["calibration_curve"] = Chart(viz.plot_calibration(calibration, f"Calibration{tag}"), calibration,
                                            "Observed share of leukemic cells per bin of predicted probability; on "
                                            "the diagonal the probabilities can be read as frequencies.")
    edges = np.linspace(0, 1, 26)
    histogram = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:],
                              "hem": np.histogram(p[labels == 0], bins=edges)[0],
                              "all": np.histogram(p[labels == 1], bins=edges)[0]})
    charts["probability_histogram"] = Chart(viz.plot_probability_histogram(histogram, threshold, f"P(leukemia) by true class{tag}"),
                                            histogram, "Predicted P(leukemia) of the cells of each true class; "
                                            "the dashed line is the decision threshold.")
    per_patient = evaluate.per_patient_table(predictions) if per_patient is None else per_patient
    if len(per_patient):
        charts["per_patient_accuracy"] = Chart(viz.plot_per_patient(per_patient, f"Accuracy per patient{tag}"), per_patient,
                                               "Share of each patient's cells classified correctly (number of cells "
                                               "above each bar); cells of one patient are correlated, so this shows "
                                               "whether errors concentrate in a few patients.")
    return charts


def training_chart(run_dir: str | Path, synthetic: bool = False) -> Chart | None:
    """Learning curves from the run's ``history.csv`` (None when it has none)."""
    from modules.reporting import charts as viz

    history_path = Path(run_dir) / "history.csv"
    if not history_path.is_file():
        return None
    history = pd.read_csv(history_path)
    if history.empty:
        return None
    return Chart(viz.plot_training_curves(history, f"Training curves{viz.synthetic_suffix(synthetic)}"), history,
                 "Loss and metrics per epoch on the training cells and the run's patient-held-out validation cells.")


def _display(image: np.ndarray) -> np.ndarray:
    """Stretch a dark C-NMC cell to its own range for display only."""
    image = np.asarray(image, dtype="float32")
    return (image / max(float(image.max()), 1.0) * 255).astype("uint8")


def _title(row) -> str:
    """``true <class>, p=<P(leukemia)> → <called class>`` and the file name."""
    called = config.CLASS_NAMES[int(row["prediction"])]
    return f"true {config.CLASS_NAMES[int(row['label'])]}, p={row['p_leukemia']:.2f} → {called}\n{str(row['name'])[:22]}"


def image_charts(model, predictions: pd.DataFrame, settings: dict, synthetic: bool = False, per_group: int = 3,
                 n_errors: int = 6, seed: int = 0) -> dict[str, Chart]:
    """Galleries that need the images: confident errors, Grad-CAM overlays, predicted masks.

    Args:
        model: The loaded model.
        predictions: ``predictions.csv`` table (``path`` of each cell).
        settings: ``preprocessing_settings`` output.
        synthetic: Mark titles as synthetic.
        per_group: Grad-CAM cells per group (true class x correct/wrong).
        n_errors: Most confident errors of each kind.
        seed: Sampling seed.

    Returns:
        {name: Chart} for confident_errors, gradcam and (with a mask output) predicted_masks.
    """
    from modules.evaluation import explain
    from modules.reporting import charts as viz
    from modules.modeling import network as model_module

    tag = viz.synthetic_suffix(synthetic)
    charts: dict[str, Chart] = {}
    frame = predictions.reset_index(drop=True)
    wrong = frame["prediction"] != frame["label"]
    false_pos = frame[wrong & (frame["label"] == 0)].sort_values("p_leukemia", ascending=False).head(n_errors)
    false_neg = frame[wrong & (frame["label"] == 1)].sort_values("p_leukemia", ascending=True).head(n_errors)
    errors = pd.concat([false_pos.assign(kind="false positive: hem called all"),
                        false_neg.assign(kind="false negative: all called hem")])

    def load(rows):
        return [evaluate.prepare_cell(path, settings)[0] for path in rows["path"]]

    images = load(errors) if len(errors) else []
    titles = [_title(row) for _, row in errors.iterrows()]
    ncols = max(n_errors, 1)
    # Lay the two kinds on separate rows, padding the first row when it has fewer cells.
    grid_images, grid_titles = [], []
    for kind_rows, start, kind in ((false_pos, 0, "hem called all"), (false_neg, len(false_pos), "all called hem")):
        missing = ncols - len(kind_rows)
        grid_images += [_display(i) for i in images[start:start + len(kind_rows)]] + [None] * missing
        grid_titles += titles[start:start + len(kind_rows)] + [f"no cell {kind}" if not len(kind_rows) else ""] * missing
    charts["confident_errors"] = Chart(
        viz.plot_image_grid(grid_images, grid_titles, ncols=ncols,
                            title=f"Most confident errors (top: hem called all; bottom: all called hem){tag}",
                            row_labels=["hem called all", "all called hem"]),
        errors[["path", "name", "patient_id", "label", "p_leukemia", "prediction", "kind"]],
        "The cells the model got wrong with the most confidence; each title gives the TRUE class and "
        "the predicted P(leukemia). Images brightened for display.")

    rng = np.random.default_rng(seed)
    groups = [("all, correct", (frame["label"] == 1) & ~wrong), ("all, wrong", (frame["label"] == 1) & wrong),
              ("hem, correct", (frame["label"] == 0) & ~wrong), ("hem, wrong", (frame["label"] == 0) & wrong)]
    sample = []
    for name, selector in groups:
        index = np.flatnonzero(selector.to_numpy())
        for i in rng.choice(index, size=min(per_group, len(index)), replace=False) if len(index) else []:
            sample.append((name, frame.iloc[int(i)]))
    if sample:
        cells = np.stack([evaluate.prepare_cell(row["path"], settings)[0] for _, row in sample])
        layer = explain.default_layer_name(model)
        heatmaps = explain.grad_cam_batch(model, cells, layer_name=layer, target="leukemia")
        overlays = [explain.overlay_heatmap(cell, heat) for cell, heat in zip(cells, heatmaps)]
        titles = [f"{name}\n{_title(row).splitlines()[0]}" for name, row in sample]
        table = pd.DataFrame([{"group": name, "path": row["path"], "name": row["name"], "label": row["label"],
                               "p_leukemia": row["p_leukemia"], "layer": layer,
                               "heat_mean": float(heat.mean())} for (name, row), heat in zip(sample, heatmaps)])
        charts["gradcam"] = Chart(
            viz.plot_image_grid(overlays, titles, ncols=per_group * 2 if len(sample) > per_group * 2 else max(len(sample), 1),
                                title=f"Grad-CAM for P(leukemia), layer {layer}{tag}"),
            table, f"Grad-CAM of the leukemia score at layer {layer}: red regions raised P(leukemia). Random "
            "cells of each true class, correctly and wrongly classified; titles give the TRUE class and p.")
        outputs = model_module.predict_outputs(model, cells)
        if "cell_mask" in outputs:
            derived = np.stack([evaluate.prepare_cell(row["path"], settings)[1] for _, row in sample])
            predicted = np.asarray(outputs["cell_mask"])
            # Up to 6 cells spread over the groups (both classes, right and wrong).
            picks = np.unique(np.linspace(0, len(sample) - 1, min(len(sample), 6)).astype(int))
            grid, grid_titles, rows = [], [], []
            for k in picks:
                hit = predicted[k] >= 0.5
                ref = derived[k] > 0
                dice = 2 * (hit & ref).sum() / max(hit.sum() + ref.sum(), 1)
                grid += [_display(cells[k]), predicted[k].astype("float32"), ref.astype("float32")]
                grid_titles += [_title(sample[k][1]).splitlines()[0], f"predicted mask\nDice {dice:.2f}", "mask from preprocessing"]
                rows.append({"path": sample[k][1]["path"], "name": sample[k][1]["name"], "dice": float(dice),
                             "predicted_area": int(hit.sum()), "reference_area": int(ref.sum())})
            charts["predicted_masks"] = Chart(
                viz.plot_image_grid(grid, grid_titles, ncols=6, title=f"U-Net cell masks{tag}", cmap="gray"),
                pd.DataFrame(rows), "Each cell (brightened), the U-Net's predicted cell mask and the mask derived "
                "from the background in preprocessing, with their Dice overlap.")
    return charts


# ----------------------------------------------------------------------------- report documents

METRIC_LABELS = {
    "roc_auc": "ROC AUC", "pr_auc": "PR AUC (average precision)", "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity (all recall)", "specificity": "specificity (hem recall)",
    "precision": "precision (all)", "f1": "F1 (all)", "weighted_f1": "weighted F1 (C-NMC 2019 metric)",
    "accuracy": "accuracy", "mcc": "Matthews correlation",
}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def report_blocks(metrics: dict, run_config: dict, captions: dict[str, str],
                  per_patient: pd.DataFrame | None = None) -> list[tuple]:
    """The report as a list of blocks (``("h1"|"h2"|"p"|"banner"|"table"|"figure", …)``)."""
    blocks: list[tuple] = [("h1", f"ANNa evaluation: {metrics['run_id']} on {metrics['dataset']} ({metrics['split']})")]
    if metrics.get("synthetic_data") or metrics.get("synthetic_model"):
        which = " and ".join(w for w, flag in (("the evaluated cells", metrics.get("synthetic_data")),
                                               ("the model's training cells", metrics.get("synthetic_model"))) if flag)
        blocks.append(("banner", f"SYNTHETIC: {which} are synthetic, drawn by modules.synth. These numbers say "
                                 "nothing about real leukemia cells."))
    check = metrics.get("preprocessing_check") or {}
    if check.get("matches") is False:
        blocks.append(("banner", f"PREPROCESSING CHANGED: {check['note']}."))
    blocks.append(("h2", "Data"))
    data_lines = [
        f"Folder: `{metrics['data']}` (dataset `{metrics['dataset']}`, split `{metrics['split']}`).",
        f"Cells: {metrics['split_note']}.",
        f"{metrics['n']} cells scored ({metrics['n_positive']} all = leukemic, {metrics['n_negative']} hem = normal)"
        + (f" from {metrics['n_patients']} patients" if metrics.get("n_patients") else ", patients unknown") + ".",
    ]
    if metrics.get("cells_from_unseen_patients") is not None:
        data_lines.append(
            f"Against the run's patients: {metrics['cells_from_run_training_patients']} cells from its training "
            f"patients, {metrics['cells_from_run_validation_patients']} from its validation patients, "
            f"{metrics['cells_from_unseen_patients']} from patients it never saw.")
    else:
        data_lines.append("The run does not record its patients, so overlap with its training cells is unknown.")
    if metrics.get("skipped"):
        data_lines.append(f"{len(metrics['skipped'])} images could not be decoded and were skipped: "
                          + "; ".join(f"`{s['path']}` ({s['error']})" for s in metrics["skipped"]) + ".")
    blocks += [("p", line) for line in data_lines]
    blocks.append(("h2", "Model run"))
    history = Path(str(metrics.get("model", ""))).parent / "history.csv"
    epochs_run = len(pd.read_csv(history)) if metrics.get("model") and history.is_file() else None
    prep = metrics.get("preprocessing") or {}
    blocks += [
        ("p", f"Run `{metrics['run_id']}` (`{metrics['model']}`), architecture "
              f"{run_config.get('architecture', 'unknown')}, created {run_config.get('created', 'unknown')}."),
        ("p", f"Trained on `{(run_config.get('data') or {}).get('source', 'unknown')}`"
              + (f" for {epochs_run} epochs" if epochs_run else "")
              + f"; validation patients: {', '.join(map(str, run_config.get('val_patients') or [])) or 'unknown'}."),
        ("p", f"Preprocessing (from the run): {prep.get('image_size')} px, margin {prep.get('margin')}, "
              f"background threshold {prep.get('background_threshold')}, "
              + (f"canvas {prep.get('canvas')} px" if prep.get("canvas") else "tight crop (each cell fills the frame)")
              + ("" if prep.get("recorded", True) else " (not all recorded in the run's config.json: the "
                 "model's input size and the current defaults were used)") + "."
              + (f" Check against the training arrays: {check['note']}." if check.get("note") else "")),
    ]
    blocks.append(("h2", "Threshold"))
    if str(metrics["threshold_source"]).startswith("auto"):
        overlap = int(metrics.get("cells_from_run_validation_patients") or 0)
        origin = ("It is the run's stored threshold, fixed at training time and never tuned on the cells evaluated here."
                  if not overlap else
                  f"It is the run's stored threshold, fixed at training time, but **{overlap} of the cells evaluated "
                  "here come from the run's validation patients, which chose this threshold and the best epoch**: "
                  "on those cells the numbers are optimistic.")
    else:
        origin = ("It overrides the run's stored threshold; how it was chosen is up to the user (a threshold "
                  "tuned on these same cells would make the numbers optimistic).")
    blocks.append(("p", f"A cell is called leukemic when P(leukemia) >= **{metrics['threshold']:.4f}**. Source: "
                        f"{metrics['threshold_source']}. {origin}"))
    blocks.append(("h2", "Metrics"))
    rows = []
    for key, label in METRIC_LABELS.items():
        interval = (metrics.get("ci") or {}).get(key)
        rows.append({"metric": label, "value": _fmt(metrics.get(key)),
                     "95 % interval": f"{interval[0]:.3f} – {interval[1]:.3f}" if interval else ""})
    blocks.append(("table", pd.DataFrame(rows)))
    if metrics.get("ci"):
        blocks.append(("p", f"Intervals: {metrics['ci_method']}."
                            + (" Patient ids are unknown here, so cells were resampled: the intervals are too "
                               "narrow when cells of one patient are alike." if metrics["ci_resampling"] == "cells"
                               else "")))
    if metrics.get("mask_dice_mean") is not None:
        blocks.append(("p", f"U-Net cell mask: mean Dice {metrics['mask_dice_mean']:.3f} against the masks "
                            "derived from the black background in preprocessing."))
    blocks.append(("h2", "Figures"))
    for name, caption in captions.items():
        blocks.append(("figure", name, caption))
    if per_patient is not None and len(per_patient):
        blocks.append(("h2", "Per patient"))
        shown = per_patient.copy()
        for column in ("mean_p_leukemia", "share_called_leukemic", "accuracy"):
            shown[column] = shown[column].map(lambda v: f"{v:.3f}")
        blocks.append(("table", shown))
    blocks.append(("p", "Files: `metrics.json`, `predictions.csv` (one row per cell), `per_patient.csv`, and each "
                        "chart's data as CSV beside its PNG."))
    return blocks


def _markdown_table(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(str(v).replace("|", "/") for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render_markdown(blocks: list[tuple]) -> str:
    """Blocks as Markdown (figures referenced by relative file name)."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            parts.append(f"# {block[1]}")
        elif kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "banner":
            parts.append(f"> **{block[1]}**")
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            parts.append(_markdown_table(block[1]))
        elif kind == "figure":
            parts.append(f"![{block[1]}]({block[1]}.png)\n\n*{block[2]}* Data: [{block[1]}.csv]({block[1]}.csv)")
    return "\n\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """Escape text, then render the two Markdown marks used in blocks: `code` and **bold**."""
    import re

    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def render_html(blocks: list[tuple]) -> str:
    """Blocks as a standalone HTML page (images referenced relatively)."""
    title = next((b[1] for b in blocks if b[0] == "h1"), "ANNa evaluation")
    parts = ["<!doctype html>", f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em auto;max-width:1000px;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:0.9em}"
             "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}"
             ".banner{background:#fdecea;border:2px solid #c0392b;color:#922;padding:0.8em;font-weight:bold}</style>",
             "</head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "banner":
            parts.append(f"<div class='banner'>{_inline_html(block[1])}</div>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "table":
            parts.append(block[1].to_html(index=False, escape=True, border=0))
        elif kind == "figure":
            name = html.escape(block[1])
            parts.append(f"<figure><img src='{name}.png' alt='{name}'><figcaption>{_inline_html(block[2])} "
                         f"(<a href='{name}.csv'>data</a>)</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(folder: str | Path, metrics: dict, run_config: dict | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into an evaluation folder (atomically).

    Args:
        folder: The evaluation folder (its charts already saved, captions in ``charts.json``).
        metrics: The content of ``metrics.json``.
        run_config: The run's ``config.json`` (``{}`` when absent).

    Returns:
        (report.md, report.html).
    """
    from modules.reporting import charts as viz

    folder = Path(folder)
    per_patient_path = folder / "per_patient.csv"
    per_patient = pd.read_csv(per_patient_path, dtype={"patient_id": "string"}) if per_patient_path.exists() else None
    blocks = report_blocks(metrics, run_config or {}, viz.chart_captions(folder), per_patient)
    outputs = []
    for name, text in (("report.md", render_markdown(blocks)), ("report.html", render_html(blocks))):
        outputs.append(write_text_atomic(folder / name, text))
    return outputs[0], outputs[1]
