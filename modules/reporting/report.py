"""An evaluation's charts and its ``report.md`` / ``report.html``, rendered from the Jinja2 templates in
``templates/`` (the words once, in ``report_body.j2``); images are linked by file name, beside the page."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from modules import config
from modules.data.layout import patient_sort_key
from modules.files import write_text_atomic
from modules.metrics import mask_dice
from modules.modeling import saving
from modules.reporting import HTML_TEMPLATES, TEXT_TEMPLATES, charts, explain
from modules.reporting.charts import Chart

METRIC_LABELS = {
    "roc_auc": "ROC AUC", "pr_auc": "PR AUC (average precision)", "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity (all recall)", "specificity": "specificity (hem recall)",
    "precision": "precision (all)", "f1": "F1 (all)", "weighted_f1": "weighted F1 (C-NMC 2019 metric)",
    "accuracy": "accuracy", "mcc": "Matthews correlation"}
#: Decodes and preprocesses one cell as the run did: path -> (image, mask).
CellLoader = Callable[[str], tuple[np.ndarray, np.ndarray]]


def write_evaluation_report(folder: str | Path, metrics: dict, predictions: pd.DataFrame, per_patient: pd.DataFrame,
                            model, load_cell: CellLoader, run_config: dict, seed: int = 0) -> tuple[Path, Path]:
    """Draw every chart of an evaluation into ``folder`` (``seed`` samples the cells of the image charts), then
    write the reports; returns (report.md, report.html)."""
    note = charts.synthetic_note(metrics.get("synthetic_model"), metrics.get("synthetic_data"))
    drawn = charts.metric_charts(predictions, metrics["threshold"], per_patient, note)
    curves = charts.training_chart(Path(metrics["model"]).parent, run_config,
                                   charts.synthetic_note(metrics.get("synthetic_model")))
    if curves is not None:
        drawn["training_curves"] = curves
    drawn.update(image_charts(model, predictions, load_cell, note, seed=seed,
                              mask_target=(run_config.get("training") or {}).get("mask_target") or "cell"))
    for name, chart in drawn.items():
        charts.save_chart(chart.figure, chart.data, name, chart.caption, folder)
        plt.close(chart.figure)
    return write_report(folder, metrics, run_config)


# ----------------------------------------------------------------------------- charts of cell images
def _cell_title(row) -> str:
    """``true <class>, p=<P(leukemia)> → <called class>``."""
    return (f"true {config.CLASS_NAMES[int(row['label'])]}, p={row['p_leukemia']:.2f} → "
            f"{config.CLASS_NAMES[int(row['prediction'])]}")


def image_charts(model, predictions: pd.DataFrame, load_cell: CellLoader, note: str = "", per_group: int = 3,
                 n_errors: int = 6, seed: int = 0, mask_target: str = "cell") -> dict[str, Chart]:
    """Charts of the cell images: the ``n_errors`` most confident errors of each kind, Grad-CAM on ``per_group``
    random cells of each true class right and wrong, and the predicted masks (a model with a mask output)."""
    frame = predictions.reset_index(drop=True)
    wrong = frame["prediction"] != frame["label"]
    drawn = {"confident_errors": errors_chart(frame, wrong, load_cell, n_errors, note)}
    rng = np.random.default_rng(seed)
    groups = []
    for label, right in ((1, True), (1, False), (0, True), (0, False)):
        index = np.flatnonzero(((frame["label"] == label) & (wrong != right)).to_numpy())
        name = f"{config.CLASS_NAMES[label]}, {'correct' if right else 'wrong'}"
        groups.append(frame.iloc[rng.choice(index, size=min(per_group, len(index)), replace=False)].assign(group=name))
    sample = pd.concat(groups, ignore_index=True)
    if sample.empty:
        return drawn
    prepared = [load_cell(path) for path in sample["path"]]
    cells = np.stack([image for image, _ in prepared])
    # An ensemble's members are nested models: Grad-CAM explains its first member.
    members = [layer for layer in model.layers if hasattr(layer, "layers") and layer.name.startswith("member")]
    explained, whose = (members[0], f" (ensemble member {members[0].name})") if members else (model, "")
    drawn["gradcam"] = gradcam_chart(explained, cells, sample, min(len(sample), 2 * per_group), whose + note)
    outputs = saving.predict_outputs(model, cells)
    if "cell_mask" in outputs:
        drawn["predicted_masks"] = mask_chart(cells, np.stack([mask for _, mask in prepared]),
                                              np.asarray(outputs["cell_mask"]), sample, note, mask_target)
    return drawn


def errors_chart(frame: pd.DataFrame, wrong: pd.Series, load_cell: CellLoader, n_errors: int, note: str = "") -> Chart:
    """The most confident errors: false positives on the top row, false negatives below."""
    kinds = [("false positive: hem called all", frame[wrong & (frame["label"] == 0)].nlargest(n_errors, "p_leukemia")),
             ("false negative: all called hem", frame[wrong & (frame["label"] == 1)].nsmallest(n_errors, "p_leukemia"))]
    ncols = max(n_errors, 1)
    images, titles = [], []
    for kind, rows in kinds:  # one grid row per kind, padded to the full width
        blank = f"no cell {kind.split(': ')[1]}" if rows.empty else ""
        images += [charts.for_display(load_cell(path)[0]) for path in rows["path"]] + [None] * (ncols - len(rows))
        titles += [f"{_cell_title(row)}\n{str(row['name'])[:22]}" for _, row in rows.iterrows()]
        titles += [blank] * (ncols - len(rows))
    table = pd.concat([rows.assign(kind=kind) for kind, rows in kinds])
    fig = charts.plot_image_grid(images, titles, ncols=ncols, row_labels=["hem called all", "all called hem"],
                                 title=f"Most confident errors (top: hem called all; bottom: all called hem){note}")
    return Chart(fig, table[["path", "name", "patient_id", "label", "p_leukemia", "prediction", "kind"]],
                 "The cells the model got wrong with the most confidence; each title gives the TRUE class and the "
                 "predicted P(leukemia). Images brightened for display.")


def gradcam_chart(model, cells: np.ndarray, sample: pd.DataFrame, ncols: int, note: str = "") -> Chart:
    """Grad-CAM overlays of the evidence for the class each cell was called, with a colour bar; a cell whose map is
    empty says so."""
    layer = explain.default_layer_name(model)
    heat = explain.grad_cam_batch(model, cells, layer_name=layer, target=sample["prediction"].to_numpy())
    empty = heat.reshape(len(heat), -1).max(axis=1) <= 0
    titles = [f"{row['group']}\n{_cell_title(row)}" + ("\nempty map: no region for its call" if blank else "")
              for (_, row), blank in zip(sample.iterrows(), empty)]
    fig = charts.plot_image_grid([explain.overlay_heatmap(cell, h) for cell, h in zip(cells, heat)], titles,
                                 ncols=ncols, title=f"Grad-CAM for the class each cell was called, layer {layer}{note}",
                                 colorbar=("jet", "evidence for the class called (1 = strongest in the cell)"))
    table = sample[["group", "path", "name", "label", "p_leukemia", "prediction"]].assign(
        layer=layer, heat_mean=heat.mean(axis=(1, 2)), map_empty=empty)
    return Chart(fig, table, f"Grad-CAM at layer {layer} of the score for the class each cell was called (after the "
                             "arrow in its title): warm regions pushed the model towards that call. Random cells of "
                             "each true class, correctly and wrongly classified; titles give the TRUE class and p. "
                             "An empty map means no region of that cell pushed towards its call at this layer.")


def mask_chart(cells: np.ndarray, reference: np.ndarray, predicted: np.ndarray, sample: pd.DataFrame,
               note: str = "", target: str = "cell") -> Chart:
    """Up to 6 cells spread over the groups: the cell, the U-Net's soft mask and its target (cell or nucleus)."""
    picks = np.unique(np.linspace(0, len(sample) - 1, min(len(sample), 6)).astype(int))
    dice = mask_dice(predicted[picks], reference[picks])
    images, titles = [], []
    for k, overlap in zip(picks, dice):
        images += [charts.for_display(cells[k]), predicted[k].astype("float32"), (reference[k] > 0).astype("float32")]
        titles += [_cell_title(sample.iloc[k]), f"predicted {target}\nDice {overlap:.2f}", f"{target} target"]
    fig = charts.plot_image_grid(images, titles, ncols=6, cmap="gray", title=f"U-Net output against its {target} "
                                 f"target{note}", colorbar=("gray", f"predicted P({target} pixel); target: 0 or 1"))
    table = sample.iloc[picks][["path", "name"]].assign(
        dice=dice, predicted_area=(predicted[picks] >= 0.5).sum(axis=(1, 2)),
        reference_area=(reference[picks] > 0).sum(axis=(1, 2)))
    source = ("the nucleus found from the stain's colour (preprocessing.nucleus)" if target == "nucleus" else
              "the cell mask derived from the black background in preprocessing")
    return Chart(fig, table, f"Each cell (brightened), the U-Net's predicted {target} mask on the colour bar's "
                             f"scale, and its training target, {source}, with their Dice overlap.")


# ----------------------------------------------------------------------------- report documents
def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(frame: pd.DataFrame) -> dict:
    return {"columns": [str(c) for c in frame.columns], "rows": frame.astype(str).values.tolist()}


def report_context(metrics: dict, run_config: dict, captions: dict[str, str],
                   per_patient: pd.DataFrame | None = None) -> dict:
    """The values ``templates/report_body.j2`` words the report from (``m`` = metrics, ``run`` = run config)."""
    intervals = metrics.get("ci") or {}
    scores = pd.DataFrame([{"metric": label, "value": _fmt(metrics.get(key)), "95 % interval":
                            f"{intervals[key][0]:.3f} – {intervals[key][1]:.3f}" if intervals.get(key) else ""}
                           for key, label in METRIC_LABELS.items()])
    if per_patient is not None and len(per_patient):
        per_patient = per_patient.sort_values("patient_id", key=patient_sort_key)
        per_patient = per_patient.assign(**{c: per_patient[c].map("{:.3f}".format)
                                            for c in ("mean_p_leukemia", "share_called_leukemic", "accuracy")})
    return {"m": metrics, "run": run_config, "training": run_config.get("training") or {},
            "title": f"ANNa evaluation: {metrics['run_id']} on {metrics['dataset']} ({metrics['split']})",
            "synthetic": [who for who, flag in (("the evaluated cells", metrics.get("synthetic_data")),
                                                ("the model's training cells", metrics.get("synthetic_model")))
                          if flag],
            "check": metrics.get("preprocessing_check") or {}, "prep": metrics.get("preprocessing") or {},
            "auto": str(metrics["threshold_source"]).startswith("auto"),
            "overlap": int(metrics.get("cells_from_run_validation_patients") or 0),
            "data_source": (run_config.get("data") or {}).get("source", "unknown"),
            "val_patients": ", ".join(pd.Series(list(run_config.get("val_patients") or []), dtype="string")
                                      .sort_values(key=patient_sort_key)) or "unknown",
            "scores": _table(scores), "figures": captions,
            "per_patient": _table(per_patient) if per_patient is not None and len(per_patient) else None}


def write_report(folder: str | Path, metrics: dict, run_config: dict | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (atomically) into an evaluation folder whose charts are saved."""
    folder = Path(folder)
    path = folder / "per_patient.csv"
    per_patient = pd.read_csv(path, dtype={"patient_id": "string"}) if path.is_file() else None
    context = report_context(metrics, run_config or {}, charts.chart_captions(folder), per_patient)
    return (write_text_atomic(folder / "report.md", TEXT_TEMPLATES.get_template("report.md").render(context)),
            write_text_atomic(folder / "report.html", HTML_TEMPLATES.get_template("report.html").render(context)))
