"""Charts: matplotlib figures with the numbers they draw, saved as ``<name>.png`` + ``<name>.csv`` with a caption
in ``charts.json`` (read by the report and the gallery). The evaluation charts are scikit-learn's displays."""
from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib
import matplotlib.pyplot as plt  # matplotlib falls back to Agg without a display
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from modules import config
from modules.metrics import confusion_table
from modules.files import atomic_path, write_csv_atomic, write_json_atomic

#: Captions of the charts of one folder, in the order they were saved.
CHARTS_JSON = "charts.json"
CLASS_COLORS = {1: "#c0392b", 0: "#2e86c1"}  # all = red, hem = blue
DPI = 110


class Chart(NamedTuple):
    """One chart: the figure, the numbers it draws, and a caption."""
    figure: matplotlib.figure.Figure
    data: pd.DataFrame
    caption: str


def synthetic_note(model_synthetic: bool | None = None, cells_synthetic: bool | None = None) -> str:
    """Title suffix saying which side is synthetic: the model's training cells, the cells, or both (``None``: not
    part of this chart; EDA charts have no model, training curves no scored cells)."""
    parts = []
    if model_synthetic or (model_synthetic is False and cells_synthetic):
        parts.append(f"model trained on {'SYNTHETIC' if model_synthetic else 'real'} cells")
    if cells_synthetic or (cells_synthetic is False and model_synthetic):
        word = "SYNTHETIC" if cells_synthetic else "real"
        parts.append(f"{word} cells" if model_synthetic is None else f"scored on {word} cells")
    return f" [{', '.join(parts)}]" if parts else ""


def save_chart(fig: matplotlib.figure.Figure, data: pd.DataFrame, name: str, caption: str,
               out_dir: str | Path) -> Path:
    """Write ``<name>.png`` and ``<name>.csv`` atomically, record the caption; returns the PNG (figure left open)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"chart name {name!r} must be a plain file stem such as 'roc_curve'")
    png = Path(out_dir) / f"{name}.png"
    write_csv_atomic(pd.DataFrame(data), png.with_suffix(".csv"))
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    write_json_atomic(png.parent / CHARTS_JSON, {**chart_captions(png.parent), name: caption})
    return png


def chart_captions(folder: str | Path) -> dict[str, str]:
    """Captions recorded by ``save_chart`` in a folder, in the order the charts were first saved."""
    path = Path(folder) / CHARTS_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def for_display(rgb: np.ndarray) -> np.ndarray:
    """Stretch a dark cell to the full 0-255 range, for display only (C-NMC cells peak near 100-130)."""
    peak = max(int(np.max(rgb)), 1)
    return (np.asarray(rgb, dtype=np.float32) * (255.0 / peak)).astype(np.uint8)


# ----------------------------------------------------------------------------- evaluation charts
def metric_charts(predictions: pd.DataFrame, threshold: float, per_patient: pd.DataFrame,
                  note: str = "") -> dict[str, Chart]:
    """{name: Chart} of ``predictions.csv`` and ``per_patient.csv`` (curves need both classes); ``note``: titles'."""
    labels, called = (predictions[column].to_numpy("int64") for column in ("label", "prediction"))
    p = predictions["p_leukemia"].to_numpy("float64")
    charts = {"confusion_matrix": confusion_chart(labels, called, threshold, note)}
    if labels.min() != labels.max():
        charts["roc_curve"] = roc_chart(labels, p, called, threshold, note)
        charts["precision_recall_curve"] = precision_recall_chart(labels, p, called, note)
        charts["calibration_curve"] = calibration_chart(labels, p, note)
    charts["probability_histogram"] = histogram_chart(labels, p, threshold, note)
    if len(per_patient):
        charts["per_patient_accuracy"] = per_patient_chart(per_patient, note)
    if "nucleus_share" in predictions and predictions["nucleus_share"].notna().any():
        charts["nucleus_by_class"] = nucleus_chart(predictions, note)
    return charts


def nucleus_chart(predictions: pd.DataFrame, note: str = "") -> Chart:
    """Box plots by true class of the nucleus's share of the cell and the nucleus-to-cytoplasm ratio."""
    import seaborn as sns

    table = predictions[["name", "patient_id", "label", "nucleus_share", "nucleus_cytoplasm_ratio"]].assign(
        **{"class": predictions["label"].map(config.CLASS_NAMES)})
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), layout="constrained")
    for ax, column, label in ((axes[0], "nucleus_share", "nucleus area / cell area"),
                              (axes[1], "nucleus_cytoplasm_ratio", "nucleus : cytoplasm area")):
        sns.boxplot(data=table, x="class", y=column, hue="class", order=["all", "hem"],
                    palette={config.CLASS_NAMES[k]: CLASS_COLORS[k] for k in (0, 1)}, ax=ax, showfliers=False)
        ax.set(ylabel=label, xlabel="true class (all = leukemic blast, hem = normal)")
    axes[1].set_yscale("log")
    fig.suptitle(f"Nucleus size by class (nucleus found from the stain's colour){note}")
    return Chart(fig, table, "Each cell's nucleus, found from the stain's colour in preprocessing (not the model's "
                             "output): its share of the cell and the nucleus-to-cytoplasm area ratio, by true "
                             "class (boxes: quartiles, whiskers: 1.5 IQR, outliers not drawn).")


def confusion_chart(labels: np.ndarray, called: np.ndarray, threshold: float, note: str = "") -> Chart:
    """Cell counts and the share of each TRUE class, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), layout="constrained")
    names = [f"{config.CLASS_NAMES[k]} ({k})" for k in (0, 1)]
    for ax, normalize, fmt, title in ((axes[0], None, "d", "cells"),
                                      (axes[1], "true", ".1%", "share of each TRUE class")):
        ConfusionMatrixDisplay.from_predictions(labels, called, labels=[0, 1], display_labels=names,
                                                normalize=normalize, values_format=fmt, cmap="Blues", ax=ax,
                                                im_kw={"vmin": 0, "vmax": 1} if normalize else None)
        ax.set(title=title, xlabel="predicted", ylabel="true")
    fig.suptitle(f"Confusion matrix, threshold {threshold:.3f}{note}")
    return Chart(fig, confusion_table(labels, called),
                 "Cell counts (left) and the share of each TRUE class (right, rows sum to 100 %): the all row's "
                 "diagonal is the sensitivity, the hem row's the specificity.")


def _two_lines(title: str, note: str) -> str:
    """The title with the synthetic note on a line of its own (narrow charts)."""
    return f"{title}\n{note.strip()}" if note else title


def _operating_point(labels: np.ndarray, called: np.ndarray) -> tuple[float, float, float]:
    """(false positive rate, true positive rate, precision) of the thresholded calls."""
    precision = float(labels[called == 1].mean()) if (called == 1).any() else 0.0
    return float(called[labels == 0].mean()), float(called[labels == 1].mean()), precision


def roc_chart(labels: np.ndarray, p: np.ndarray, called: np.ndarray, threshold: float, note: str = "") -> Chart:
    """ROC curve with the chance line and the operating point of the threshold."""
    fig, ax = plt.subplots(figsize=(5, 4.6), layout="constrained")
    display = RocCurveDisplay.from_predictions(labels, p, name="ANNa", ax=ax, plot_chance_level=True)
    fpr, tpr, _ = _operating_point(labels, called)
    ax.scatter([fpr], [tpr], color="black", zorder=3,
               label=f"threshold {threshold:.3f} (sensitivity {tpr:.2f}, specificity {1 - fpr:.2f})")
    ax.legend(loc="lower right", fontsize=8)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           title=_two_lines("ROC curve", note))
    return Chart(fig, pd.DataFrame({"fpr": display.fpr, "tpr": display.tpr}),
                 f"ROC curve (AUC {display.roc_auc:.3f}); the dot is the operating point of threshold {threshold:.3f}.")


def precision_recall_chart(labels: np.ndarray, p: np.ndarray, called: np.ndarray, note: str = "") -> Chart:
    """Precision against recall with the chance level (share of leukemic cells) and the operating point."""
    fig, ax = plt.subplots(figsize=(5, 4.6), layout="constrained")
    display = PrecisionRecallDisplay.from_predictions(labels, p, name="ANNa", ax=ax, plot_chance_level=True)
    _, recall, precision = _operating_point(labels, called)
    ax.scatter([recall], [precision], color="black", zorder=3, label="operating point")
    ax.legend(loc="lower left", fontsize=8)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=_two_lines("Precision-recall", note))
    return Chart(fig, pd.DataFrame({"recall": display.recall, "precision": display.precision}),
                 f"Precision against recall for the leukemic class (average precision "
                 f"{display.average_precision:.3f}); dashed: the share of leukemic cells.")


def calibration_chart(labels: np.ndarray, p: np.ndarray, note: str = "", bins: int = 10) -> Chart:
    """Reliability curve above a bar chart of the cells in each bin (few cells make a bin's share noisy)."""
    fig, (ax, below) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, height_ratios=[3, 1], layout="constrained")
    display = CalibrationDisplay.from_predictions(labels, p, n_bins=bins, name="ANNa", ax=ax)
    edges = np.linspace(0, 1, bins + 1)
    cells = np.bincount(np.searchsorted(edges[1:-1], p), minlength=bins)  # binned as calibration_curve bins
    below.bar(edges[:-1], cells, width=1 / bins, align="edge", color="#d35400", alpha=0.6, label="cells per bin")
    below.legend(fontsize=8)
    below.set(xlabel="mean predicted P(leukemia)", ylabel="cells per bin")
    ax.set(xlabel="", ylabel="observed share of leukemic cells", title=_two_lines("Calibration", note))
    ax.legend(fontsize=8, loc="upper left")
    table = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "cells": cells,
                          "mean_predicted": np.nan, "fraction_positive": np.nan})
    table.loc[cells > 0, ["mean_predicted", "fraction_positive"]] = np.c_[display.prob_pred, display.prob_true]
    return Chart(fig, table, "Observed share of leukemic cells per bin of predicted probability (top) and the "
                             "cells in each bin (bottom); on the diagonal the probabilities read as frequencies.")


def histogram_chart(labels: np.ndarray, p: np.ndarray, threshold: float, note: str = "") -> Chart:
    """Histograms of P(leukemia) per true class; the legend sits outside, never over the bars."""
    edges = np.linspace(0, 1, 26)
    table = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:],
                          "hem": np.histogram(p[labels == 0], edges)[0], "all": np.histogram(p[labels == 1], edges)[0]})
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    for label, name in config.CLASS_NAMES.items():
        ax.stairs(table[name], edges, fill=True, alpha=0.5, color=CLASS_COLORS[label], label=f"true {name}")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="predicted P(leukemia)", ylabel="cells", xlim=(0, 1), title=f"P(leukemia) by true class{note}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return Chart(fig, table, "Predicted P(leukemia) of the cells of each true class; the dashed line is the "
                             "decision threshold.")


def per_patient_chart(table: pd.DataFrame, note: str = "") -> Chart:
    """Bar per patient: share of its cells classified correctly, coloured by the patient's true class."""
    table = table.sort_values(["label", "accuracy"])
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(table) + 2), 3.8), layout="constrained")
    bars = ax.bar(table["patient_id"].astype(str), table["accuracy"],
                  color=[CLASS_COLORS.get(int(label), "grey") for label in table["label"]])
    ax.bar_label(bars, labels=[str(int(n)) for n in table["cells"]], fontsize=7)
    ax.set(ylim=(0, 1.1), ylabel="accuracy (cells correct)", title=f"Accuracy per patient{note}",
           xlabel="patient (red = ALL patient, blue = healthy subject; number = cells)")
    ax.tick_params(axis="x", rotation=90, labelsize=8)
    return Chart(fig, table, "Share of each patient's cells classified correctly (number of cells above each "
                             "bar); cells of one patient are correlated, so this shows whether errors concentrate "
                             "in a few patients.")


def training_chart(run_dir: str | Path, run_config: dict, note: str = "") -> Chart | None:
    """Learning curves of the run's ``history.csv`` (None without one), epochs from 1, the kept epoch marked."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file() or (history := pd.read_csv(path)).empty:
        return None
    # A 1-based ``epoch`` column where the run wrote one; Keras' CSVLogger counts from 0.
    if "epoch" not in history or history["epoch"].min() < 1:
        history["epoch"] = np.arange(1, len(history) + 1)
    best = (run_config.get("training") or {}).get("best_epoch")
    metrics = [c for c in history if c not in ("epoch", "learning_rate", "lr") and not c.startswith("val_")]
    metrics = sorted(metrics, key=lambda c: (c != "loss", c))[:6] or ["loss"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], metrics):
        for column, label in ((name, "training"), (f"val_{name}", "validation")):
            if column in history:
                ax.plot(history["epoch"], history[column], marker=".", label=label)
        if best:
            ax.axvline(int(best), color="grey", ls=":", label=f"restored epoch {int(best)}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Training curves{note}")
    return Chart(fig, history, "Loss and metrics per epoch (from 1) on the training cells and the run's "
                               "patient-held-out validation cells; the dotted line marks the epoch whose weights "
                               "were kept.")


def plot_image_grid(images: Sequence[np.ndarray | None], titles: Sequence[str], ncols: int = 6, title: str = "",
                    cmap: str | None = None, row_labels: Sequence[str] | None = None,
                    colorbar: tuple[str, str] | None = None) -> matplotlib.figure.Figure:
    """A grid of (H,W,3) uint8 or (H,W) [0, 1] images, titled (None leaves only the title in its cell);
    ``colorbar`` = (colormap, label): one colour bar saying what the values 0-1 mean."""
    nrows = max(int(np.ceil(len(images) / ncols)), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols + (0.8 if colorbar else 0), 2.1 * nrows + 0.5),
                             squeeze=False, layout="constrained")
    for ax, image, text in itertools.zip_longest(axes.flat, images, titles):
        ax.set(xticks=[], yticks=[])
        if image is None:  # a placeholder keeps rows aligned
            ax.axis("off")
            ax.text(0.5, 0.5, text or "", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        else:
            flat = np.ndim(image) == 2
            ax.imshow(image, cmap=cmap if flat else None, vmin=0 if flat else None, vmax=1 if flat else None)
            ax.set_title(text or "", fontsize=7)
    for row, label in enumerate((row_labels or [])[:nrows]):
        axes[row, 0].set_ylabel(label, fontsize=8)
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "no images in this group", ha="center", va="center")
    if colorbar:
        mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), colorbar[0])
        fig.colorbar(mappable, ax=axes, label=colorbar[1], fraction=0.025, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
