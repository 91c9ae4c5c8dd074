"""Charts and the ``output/viz`` gallery.

Chart functions take plain tables or arrays and return a matplotlib ``Figure`` (the notebooks
show it inline); ``save_chart`` writes it as PNG with its data as CSV beside it (same stem),
both atomically. ``publish_to_viz`` copies saved charts into ``output/viz`` under stable names
and ``write_viz_index`` rebuilds ``output/viz/index.html`` listing every chart with its
caption, newest run first.
"""
from __future__ import annotations

import html
import json
import shutil
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

import matplotlib.pyplot as plt  # matplotlib falls back to Agg without a display
import numpy as np
import pandas as pd

from modules import config
from modules.files import atomic_path, exclusive_lock, write_csv_atomic, write_json_atomic, write_text_atomic

#: Caption registry written beside the charts of one folder.
CHARTS_JSON = "charts.json"
#: Gallery registry in the viz folder (one entry per published chart).
VIZ_INDEX_JSON = "index.json"
#: Held while index.json is rewritten (``files.exclusive_lock``).
VIZ_LOCK = ".index.lock"
CLASS_COLORS = {1: "#c0392b", 0: "#2e86c1"}  # all = red, hem = blue
DPI = 110


def _read_json(path: Path, default):
    if not path.exists():
        return default
    return json.loads(path.read_text())


def synthetic_suffix(synthetic: bool) -> str:
    """Title suffix marking charts computed from synthetic cells."""
    return " [SYNTHETIC cells]" if synthetic else ""


def save_chart(fig: matplotlib.figure.Figure, data: pd.DataFrame, name: str, caption: str,
               out_dir: str | Path) -> Path:
    """Write a chart as ``<name>.png`` and its data as ``<name>.csv`` (atomically).

    The caption is recorded in ``<out_dir>/charts.json`` so reports and the gallery can show it.

    Args:
        fig: The figure to save (left open: the caller may still display it).
        data: The numbers drawn, as a table.
        name: File stem, e.g. ``roc_curve``.
        caption: One or two sentences saying what the chart shows.
        out_dir: Destination folder (created if needed).

    Returns:
        Path of the PNG.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"chart name {name!r} must be a plain file stem such as 'roc_curve'")
    out_dir = Path(out_dir)
    png, csv = out_dir / f"{name}.png", out_dir / f"{name}.csv"
    write_csv_atomic(pd.DataFrame(data), csv)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    captions = _read_json(out_dir / CHARTS_JSON, {})
    captions[name] = caption
    write_json_atomic(out_dir / CHARTS_JSON, captions)
    return png


def chart_captions(folder: str | Path) -> dict[str, str]:
    """Captions recorded by ``save_chart`` in a folder, in the order the charts were saved."""
    return _read_json(Path(folder) / CHARTS_JSON, {})


def publish_to_viz(paths: Iterable[str | Path] | str | Path, viz_dir: str | Path | None = None,
                   run: str | None = None, caption: str | None = None) -> list[Path]:
    """Copy saved charts (PNG + CSV) into the gallery under stable names and refresh index.html.

    Args:
        paths: PNG files written by ``save_chart`` (or their stems).
        viz_dir: Gallery folder; ``config.VIZ_DIR`` by default.
        run: Group name shown in the gallery (an evaluation, a notebook such as ``1.EDA``);
            it prefixes the file names (``<run>__<stem>.png``) so runs never overwrite each other.
        caption: Caption for every chart given; by default the one ``save_chart`` recorded.

    Returns:
        The PNG paths inside ``viz_dir``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    viz_dir = Path(viz_dir or config.VIZ_DIR)
    viz_dir.mkdir(parents=True, exist_ok=True)
    # index.json is read, extended and written back: one run at a time, or a run publishing at
    # the same moment would lose the other's captions.
    with exclusive_lock(viz_dir / VIZ_LOCK):
        return _publish_locked(paths, viz_dir, run, caption)


def _publish_locked(paths, viz_dir: Path, run: str | None, caption: str | None) -> list[Path]:
    index = _read_json(viz_dir / VIZ_INDEX_JSON, [])
    published = []
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for path in paths:
        png = Path(path).with_suffix(".png")
        if not png.exists():
            raise FileNotFoundError(f"chart {png} not found: save it with viz.save_chart first")
        stem = f"{run}__{png.stem}" if run else png.stem
        target = viz_dir / f"{stem}.png"
        with atomic_path(target) as tmp:
            shutil.copyfile(png, tmp)
        csv_name = None
        if png.with_suffix(".csv").exists():
            csv_name = f"{stem}.csv"
            with atomic_path(viz_dir / csv_name) as tmp:
                shutil.copyfile(png.with_suffix(".csv"), tmp)
        text = caption if caption is not None else chart_captions(png.parent).get(png.stem, "")
        index = [entry for entry in index if entry["file"] != target.name]
        index.append({"file": target.name, "csv": csv_name, "caption": text, "run": run or "",
                      "chart": png.stem, "published": now})
        published.append(target)
    write_json_atomic(viz_dir / VIZ_INDEX_JSON, index)
    write_viz_index(viz_dir)
    return published


def write_viz_index(viz_dir: str | Path | None = None) -> Path:
    """Write ``index.html`` listing every chart in the gallery with its caption, newest run first.

    PNGs present in the folder but never published through ``publish_to_viz`` are listed too
    (without caption), so nothing in the folder is hidden.

    Args:
        viz_dir: Gallery folder; ``config.VIZ_DIR`` by default.

    Returns:
        Path of ``index.html``.
    """
    viz_dir = Path(viz_dir or config.VIZ_DIR)
    viz_dir.mkdir(parents=True, exist_ok=True)
    entries = _read_json(viz_dir / VIZ_INDEX_JSON, [])
    entries = [e for e in entries if (viz_dir / e["file"]).exists()]
    known = {e["file"] for e in entries}
    for png in sorted(viz_dir.glob("*.png")):
        if png.name not in known and not png.name.startswith("."):  # hidden: another run's file being written
            mtime = datetime.fromtimestamp(png.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
            csv = png.with_suffix(".csv").name if png.with_suffix(".csv").exists() else None
            entries.append({"file": png.name, "csv": csv, "caption": "", "run": "",
                            "chart": png.stem, "published": mtime})
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        groups.setdefault(entry["run"], []).append(entry)
    # Newest run first: a run's date is that of its latest chart; charts keep publishing order.
    order = sorted(groups, key=lambda run: max(e["published"] for e in groups[run]), reverse=True)
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>ANNa charts</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "figure{display:inline-block;vertical-align:top;width:360px;margin:0 1em 1.5em 0}"
             "img{max-width:100%;border:1px solid #ddd}figcaption{font-size:0.9em}</style>",
             "</head><body>", "<h1>ANNa charts</h1>",
             f"<p>{len(entries)} charts; newest run first. Each chart's data is in the CSV of the same name.</p>"]
    for run in order:
        parts.append(f"<h2>{html.escape(run or 'other charts')}</h2>")
        for entry in groups[run]:
            src = html.escape(entry["file"])
            csv = f" (<a href='{html.escape(entry['csv'])}'>data</a>)" if entry.get("csv") else ""
            parts.append(f"<figure><a href='{src}'><img src='{src}' alt='{html.escape(entry['chart'])}'>"
                         f"</a><figcaption><b>{html.escape(entry['chart'])}</b>: "
                         f"{html.escape(entry['caption'])}{csv}</figcaption></figure>")
    parts.append("</body></html>")
    target = viz_dir / "index.html"
    write_text_atomic(target, "\n".join(parts) + "\n")
    return target


# ----------------------------------------------------------------------------- chart functions


def plot_confusion_matrix(table: pd.DataFrame, title: str = "Confusion matrix") -> matplotlib.figure.Figure:
    """Counts and row-normalized percentages (share of each TRUE class) side by side.

    Args:
        table: ``confusion_table`` output: rows ``true``, ``predicted``, ``count``, ``row_percent``.
        title: Figure title.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = ["hem (0)", "all (1)"]
    for ax, column, fmt, label in ((axes[0], "count", "{:.0f}", "cells"),
                                   (axes[1], "row_percent", "{:.1f} %", "% of true class")):
        grid = np.zeros((2, 2))
        for row in table.itertuples():
            grid[int(row.true), int(row.predicted)] = getattr(row, column)
        image = ax.imshow(grid, cmap="Blues", vmin=0, vmax=100 if column == "row_percent" else None)
        for i in range(2):
            for j in range(2):
                color = "white" if grid[i, j] > grid.max() / 2 else "black"
                ax.text(j, i, fmt.format(grid[i, j]), ha="center", va="center", color=color, fontsize=12)
        ax.set_xticks([0, 1], names)
        ax.set_yticks([0, 1], names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_roc(curve: pd.DataFrame, auc: float, operating_point: tuple[float, float], threshold: float,
             title: str = "ROC curve") -> matplotlib.figure.Figure:
    """ROC curve with its AUC and the operating point of the decision threshold.

    Args:
        curve: Columns ``fpr``, ``tpr``.
        auc: Area under the curve.
        operating_point: (false positive rate, true positive rate) at ``threshold``.
        threshold: The decision threshold used.
    """
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot(curve["fpr"], curve["tpr"], color="#8e44ad", lw=2, label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.scatter([operating_point[0]], [operating_point[1]], color="black", zorder=3,
               label=f"threshold {threshold:.3f}\n(sens {operating_point[1]:.2f}, spec {1 - operating_point[0]:.2f})")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_precision_recall(curve: pd.DataFrame, average_precision: float, prevalence: float,
                          operating_point: tuple[float, float], title: str = "Precision-recall curve"
                          ) -> matplotlib.figure.Figure:
    """Precision against recall with the chance level (the share of positives) and the operating point."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot(curve["recall"], curve["precision"], color="#16a085", lw=2, label=f"AP = {average_precision:.3f}")
    ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"chance ({prevalence:.2f})")
    ax.scatter([operating_point[0]], [operating_point[1]], color="black", zorder=3, label="operating point")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_probability_histogram(table: pd.DataFrame, threshold: float,
                               title: str = "P(leukemia) by true class") -> matplotlib.figure.Figure:
    """Histograms of predicted probabilities per true class.

    Args:
        table: Columns ``bin_left``, ``bin_right``, ``hem``, ``all`` (cell counts per bin).
        threshold: Drawn as a vertical line.
    """
    fig, ax = plt.subplots(figsize=(6, 3.8))
    width = table["bin_right"] - table["bin_left"]
    for name, label in (("hem", 0), ("all", 1)):
        ax.bar(table["bin_left"], table[name], width=width, align="edge", alpha=0.55,
               color=CLASS_COLORS[label], label=f"true {name}")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("predicted P(leukemia)")
    ax.set_ylabel("cells")
    ax.set_xlim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    return fig


def plot_calibration(table: pd.DataFrame, title: str = "Calibration (reliability) curve") -> matplotlib.figure.Figure:
    """Observed share of leukemic cells against mean predicted probability per bin (cells per bin written beside)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    ax.plot(table["mean_predicted"], table["fraction_positive"], marker="o", color="#d35400", label="model")
    if "cells" in table:  # few cells make a bin's share noisy: say how many
        for x, y, n in zip(table["mean_predicted"], table["fraction_positive"], table["cells"]):
            if np.isfinite(n):
                ax.annotate(f"{int(n)}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("mean predicted P(leukemia)")
    ax.set_ylabel("observed share of leukemic cells")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_training_curves(history: pd.DataFrame, title: str = "Training curves") -> matplotlib.figure.Figure:
    """Loss and every other metric of a Keras CSVLogger history, training beside validation."""
    metrics = [c for c in history.columns if c not in ("epoch", "learning_rate", "lr") and not c.startswith("val_")]
    metrics = sorted(metrics, key=lambda c: (c != "loss", c))[:6] or ["loss"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    epochs = history["epoch"] + 1 if "epoch" in history else np.arange(1, len(history) + 1)
    for ax, name in zip(axes[0], metrics):
        if name in history:
            ax.plot(epochs, history[name], marker=".", label="training")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], marker=".", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_per_patient(table: pd.DataFrame, title: str = "Accuracy per patient") -> matplotlib.figure.Figure:
    """Bar per patient: share of its cells classified correctly, coloured by the patient's true class.

    Args:
        table: ``per_patient`` columns ``patient_id``, ``cells``, ``label``, ``accuracy``.
    """
    table = table.sort_values(["label", "accuracy"])
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(table) + 2), 3.8))
    colors = [CLASS_COLORS.get(int(label), "grey") for label in table["label"]]
    ax.bar(table["patient_id"].astype(str), table["accuracy"], color=colors)
    for x, (acc, cells) in enumerate(zip(table["accuracy"], table["cells"])):
        ax.text(x, acc + 0.01, str(int(cells)), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy (cells correct)")
    ax.set_xlabel("patient (red = ALL patient, blue = healthy subject; number = cells)")
    ax.tick_params(axis="x", rotation=90, labelsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_image_grid(images: Sequence[np.ndarray], titles: Sequence[str], ncols: int = 6,
                    title: str = "", cmap: str | None = None, row_labels: Sequence[str] | None = None
                    ) -> matplotlib.figure.Figure:
    """A grid of images with one title each (empty cells for missing images).

    Args:
        images: (H,W,3) uint8 or (H,W) float images; None leaves a blank cell showing its title.
        titles: One title per image.
        ncols: Images per row.
        title: Figure title.
        cmap: Colormap for 2-D images.
        row_labels: Optional label written left of each row.
    """
    n = max(len(images), 1)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols, 2.1 * nrows + 0.5), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index < len(images) and images[index] is None:  # a placeholder keeps rows aligned
            ax.axis("off")
            if titles[index]:
                ax.text(0.5, 0.5, titles[index], ha="center", va="center", fontsize=8, transform=ax.transAxes)
        elif index < len(images):
            image = images[index]
            ax.imshow(image, cmap=cmap if np.ndim(image) == 2 else None,
                      vmin=0 if np.ndim(image) == 2 else None, vmax=1 if np.ndim(image) == 2 else None)
            ax.set_title(titles[index], fontsize=7)
        else:
            ax.axis("off")
    if row_labels:
        for row, label in enumerate(row_labels[:nrows]):
            axes[row, 0].set_ylabel(label, fontsize=8)
    if not images:
        axes.flat[0].text(0.5, 0.5, "no images in this group", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
