"""Exploratory data analysis and preprocessing illustrations for notebooks 1 and 2.

Every ``plot_*`` function returns ``(figure, table)``: the figure for the notebook to show
inline, the numbers drawn as a DataFrame. Both are saved as ``<name>.png`` / ``<name>.csv``
under ``<output_dir>/charts/<run>/`` and published into ``<output_dir>/viz/`` as
``<run>__<name>.png`` (stable names, listed in ``viz/index.html``). Titles say
"SYNTHETIC cells" whenever the images come from the synthetic stand-in.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from modules import config
from modules.preprocessing import cells as preprocess
from modules.data import synthetic as synth
from modules.reporting import charts as viz

EDA_RUN = "1.EDA"
PREPROCESSING_RUN = "2.Image_preprocessing"
#: Columns of ``measure_images``.
STAT_COLUMNS = ("path", "name", "patient_id", "label", "class", "split", "fold", "height", "width",
                "cell_area_px", "cell_area_fraction", "cell_intensity", "cell_mean_r", "cell_mean_g",
                "cell_mean_b", "image_mean_r", "image_mean_g", "image_mean_b", "content_hash")
_CLASS_ORDER = ("all", "hem", "unlabeled")
_CLASS_COLORS = {"all": viz.CLASS_COLORS[1], "hem": viz.CLASS_COLORS[0], "unlabeled": "#7f8c8d"}


# ----------------------------------------------------------------------------- helpers
def class_names(labels: pd.Series) -> pd.Series:
    """Map nullable 1/0 labels to ``all``/``hem`` and missing labels to ``unlabeled``."""
    return labels.map(lambda v: "unlabeled" if pd.isna(v) else config.CLASS_NAMES[int(v)]).astype(str)


def manifest_is_synthetic(manifest: pd.DataFrame) -> bool:
    """Whether the manifest's images come from a synthetic dataset."""
    return bool(len(manifest)) and synth.is_synthetic(Path(manifest["path"].iloc[0]).parent)


def _title(text: str, synthetic: bool) -> str:
    return text + viz.synthetic_suffix(synthetic)


def save_figure(fig: matplotlib.figure.Figure, table: pd.DataFrame, name: str, caption: str,
                run: str, output_dir: str | Path | None = None, synthetic: bool = False) -> Path:
    """Save a chart under ``charts/<run>/`` and publish it into ``viz/`` (stable name).

    Args:
        fig: The figure (closed afterwards; it can still be displayed).
        table: The numbers drawn.
        name: File stem.
        caption: What the chart shows.
        run: Gallery group, e.g. ``1.EDA``.
        output_dir: Root of the outputs; ``config.OUTPUT_DIR`` by default.
        synthetic: Start the caption with "SYNTHETIC cells" (it shows in the gallery).

    Returns:
        The PNG path inside ``viz/``.
    """
    root = Path(output_dir or config.OUTPUT_DIR)
    caption = f"SYNTHETIC cells, not patients' cells. {caption}" if synthetic else caption
    png = viz.save_chart(fig, table, name, caption, root / config.CHARTS_SUBDIR / run)
    plt.close(fig)  # the notebook displays the returned figure once, not twice
    return viz.publish_to_viz(png, root / config.VIZ_SUBDIR, run=run)[0]


def _sample(manifest: pd.DataFrame, limit: int, seed: int, by: str = "label") -> pd.DataFrame:
    """At most ``limit`` rows, stratified by ``by`` (all rows when ``limit`` is 0 or None)."""
    if not limit or len(manifest) <= limit:
        return manifest
    keys = class_names(manifest["label"]) if by == "label" else manifest[by].astype(str)
    share = limit / len(manifest)
    parts = [group.sample(n=max(1, round(len(group) * share)), random_state=seed)
             for _, group in manifest.groupby(keys, sort=True)]
    return pd.concat(parts).sort_values("path").head(limit)


# ----------------------------------------------------------------------------- counts
def count_cells(manifest: pd.DataFrame) -> pd.DataFrame:
    """Cells and patients per split, fold and class.

    Args:
        manifest: ``data.scan_dataset`` table.

    Returns:
        Columns ``split, fold, class, cells, patients``.
    """
    table = manifest.assign(**{"class": class_names(manifest["label"]),
                               "fold": manifest["fold"].astype("string").fillna("")})
    grouped = table.groupby(["split", "fold", "class"], sort=True)
    counts = grouped.agg(cells=("path", "size"),
                         patients=("patient_id", lambda ids: ids[ids != ""].nunique())).reset_index()
    order = counts["split"].map({"train": 0, "validation": 1, "test": 2}).fillna(3)
    return counts.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


def plot_class_counts(manifest: pd.DataFrame, output_dir: str | Path | None = None
                      ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Bar chart of cells per split and class (training folds merged)."""
    synthetic = manifest_is_synthetic(manifest)
    table = (manifest.assign(**{"class": class_names(manifest["label"])})
             .groupby(["split", "class"], sort=True).size().rename("cells").reset_index())
    pivot = table.pivot(index="split", columns="class", values="cells").fillna(0).astype(int)
    pivot = pivot[[c for c in _CLASS_ORDER if c in pivot.columns]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    pivot.plot.bar(ax=ax, color=[_CLASS_COLORS[c] for c in pivot.columns], rot=0)
    for container in ax.containers:
        ax.bar_label(container, fontsize=8)
    ax.margins(y=0.15)
    ax.legend(fontsize=8, ncols=3, loc="upper right")
    ax.set_ylabel("cells")
    ax.set_title(_title("Cells per split and class", synthetic))
    fig.tight_layout()
    save_figure(fig, table, "class_counts",
                "Cells per split (train/validation/test) and class: all = leukemic blast, hem = normal cell.",
                EDA_RUN, output_dir, synthetic=synthetic)
    return fig, table


def plot_fold_counts(manifest: pd.DataFrame, output_dir: str | Path | None = None
                     ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Cells and patients per training fold and class."""
    synthetic = manifest_is_synthetic(manifest)
    table = count_cells(manifest[manifest["split"] == "train"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, column in zip(axes, ("cells", "patients")):
        pivot = table.pivot(index="fold", columns="class", values=column).fillna(0).astype(int)
        pivot = pivot[[c for c in _CLASS_ORDER if c in pivot.columns]]
        pivot.index = [f"fold_{f}" for f in pivot.index]
        pivot.plot.bar(ax=ax, color=[_CLASS_COLORS[c] for c in pivot.columns], rot=0)
        for container in ax.containers:
            ax.bar_label(container, fontsize=8)
        ax.margins(y=0.2)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, ncols=2, loc="upper right")
        ax.set_ylabel(column)
        ax.set_title(f"{column} per training fold", fontsize=10)
    fig.suptitle(_title("Training folds", synthetic))
    fig.tight_layout()
    save_figure(fig, table, "fold_counts",
                "Cells and patients per C-NMC training fold and class; each patient lies in one fold only.",
                EDA_RUN, output_dir, synthetic=synthetic)
    return fig, table


def plot_patient_counts(manifest: pd.DataFrame, output_dir: str | Path | None = None
                        ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Cells per patient (labeled cells), coloured by class, largest first."""
    synthetic = manifest_is_synthetic(manifest)
    labeled = manifest[manifest["label"].notna() & (manifest["patient_id"] != "")]
    table = (labeled.assign(**{"class": class_names(labeled["label"])})
             .groupby(["patient_id", "class"], sort=True)
             .agg(cells=("path", "size"), splits=("split", lambda s: ",".join(sorted(set(s)))))
             .reset_index().sort_values(["class", "cells"], ascending=[True, False], ignore_index=True))
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(table) + 2), 3.8))
    ax.bar(table["patient_id"], table["cells"], color=[_CLASS_COLORS[c] for c in table["class"]])
    ax.set_xlabel("patient (red = ALL patient's blasts, blue = healthy subject's normal cells)")
    ax.set_ylabel("cells")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.set_title(_title(f"Cells per patient ({len(table)} patients)", synthetic))
    fig.tight_layout()
    save_figure(fig, table, "patient_counts",
                "Cells per patient: a few patients contribute many cells, which is why splits are by patient.",
                EDA_RUN, output_dir, synthetic=synthetic)
    return fig, table


def plot_validation_balance(manifest: pd.DataFrame, output_dir: str | Path | None = None
                            ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Class balance of the validation split (cells and patients) beside that of training."""
    synthetic = manifest_is_synthetic(manifest)
    labeled = manifest[manifest["label"].notna()]
    labeled = labeled.assign(**{"class": class_names(labeled["label"])})
    table = (labeled.groupby(["split", "class"], sort=True)
             .agg(cells=("path", "size"), patients=("patient_id", lambda ids: ids[ids != ""].nunique()))
             .reset_index())
    table["share_of_cells"] = table["cells"] / table.groupby("split")["cells"].transform("sum")
    fig, ax = plt.subplots(figsize=(6, 3.4))
    splits = list(dict.fromkeys(table["split"]))
    left = np.zeros(len(splits))
    for name in ("all", "hem"):
        shares = [table.loc[(table["split"] == s) & (table["class"] == name), "share_of_cells"].sum()
                  for s in splits]
        ax.barh(splits, shares, left=left, color=_CLASS_COLORS[name], label=name)
        for y, (x0, share) in enumerate(zip(left, shares)):
            if share > 0.04:
                ax.text(x0 + share / 2, y, f"{share:.0%}", ha="center", va="center", color="white")
        left += shares
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of labeled cells")
    if "validation" not in splits:
        ax.text(0.5, -0.25, "no labeled validation_data in this dataset", transform=ax.transAxes,
                ha="center", fontsize=8, color="#c0392b")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(_title("Class balance: validation vs training", synthetic))
    fig.tight_layout()
    save_figure(fig, table, "validation_balance",
                "Share of leukemic (all) and normal (hem) cells in the validation set beside training.",
                EDA_RUN, output_dir, synthetic=synthetic)
    return fig, table


# ----------------------------------------------------------------------------- pixels
def _measure_one(path: str) -> dict:
    rgb = preprocess.load_rgb(path)
    threshold = config.BACKGROUND_THRESHOLD
    # OpenCV keeps this at ~1 ms per 450 px image (numpy boolean indexing is ~10x slower).
    cell = cv2.bitwise_not(cv2.inRange(rgb, (0, 0, 0), (threshold, threshold, threshold)))
    area = cv2.countNonZero(cell)
    cell_mean = cv2.mean(rgb, mask=cell)[:3] if area else (0.0, 0.0, 0.0)
    image_mean = cv2.mean(rgb)[:3]
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=16)
    digest.update(str(rgb.shape).encode())
    return {"height": rgb.shape[0], "width": rgb.shape[1], "cell_area_px": area,
            "cell_area_fraction": area / (rgb.shape[0] * rgb.shape[1]),
            "cell_intensity": float(np.mean(cell_mean)),
            **{f"cell_mean_{c}": float(v) for c, v in zip("rgb", cell_mean)},
            **{f"image_mean_{c}": float(v) for c, v in zip("rgb", image_mean)},
            "content_hash": digest.hexdigest()}


def measure_images(manifest: pd.DataFrame, limit: int | None = None, seed: int = config.DEFAULT_SEED,
                   workers: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Decode images and measure size, colour, cell area/intensity and a pixel-content hash.

    A pixel belongs to the cell when any channel exceeds ``config.BACKGROUND_THRESHOLD`` (the
    background is black), as in preprocessing.

    Args:
        manifest: ``data.scan_dataset`` table.
        limit: Measure at most this many images, sampled per class (0/None: all).
        seed: Sampling seed.
        workers: Threads (decoding releases the GIL); all cores by default.
        progress: Show a progress bar.

    Returns:
        One row per measured image, columns ``STAT_COLUMNS``. Raises ``preprocess.ImageError``
        naming the file when an image cannot be decoded.
    """
    rows = _sample(manifest, limit or 0, seed)
    paths = rows["path"].tolist()
    from modules.preprocessing.cells import _default_workers

    with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
        measured = list(tqdm(pool.map(_measure_one, paths), total=len(paths), desc="measuring images",
                             disable=not progress))
    # Joined by position: the manifest's index may hold duplicate labels (a concat of scans).
    stats = pd.DataFrame(measured)
    table = pd.concat([rows[["path", "name", "patient_id", "label", "split", "fold"]].reset_index(drop=True),
                       stats], axis=1)
    table.insert(4, "class", class_names(table["label"]))
    return table[list(STAT_COLUMNS)]


def plot_image_sizes(stats: pd.DataFrame, output_dir: str | Path | None = None
                     ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Image dimensions found (C-NMC images are all 450x450 RGB)."""
    synthetic = manifest_is_synthetic(stats)
    table = (stats.groupby(["height", "width", "class"], sort=True).size().rename("images").reset_index())
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{h}x{w}\n{c}" for h, w, c in zip(table["height"], table["width"], table["class"])]
    bars = ax.bar(labels, table["images"], color=[_CLASS_COLORS[c] for c in table["class"]])
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("images")
    ax.set_title(_title(f"Image sizes (height x width) of {len(stats)} images", synthetic))
    fig.tight_layout()
    save_figure(fig, table, "image_sizes", "Image sizes in pixels (height x width) per class.",
                EDA_RUN, output_dir, synthetic=synthetic)
    return fig, table


def plot_colour_statistics(stats: pd.DataFrame, output_dir: str | Path | None = None
                           ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Distributions of the mean red, green and blue value of the cell pixels, by class."""
    synthetic = manifest_is_synthetic(stats)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
    for ax, channel in zip(axes, ("r", "g", "b")):
        for name in _CLASS_ORDER:
            values = stats.loc[stats["class"] == name, f"cell_mean_{channel}"]
            if len(values):
                ax.hist(values, bins=30, alpha=0.5, color=_CLASS_COLORS[name], label=name)
        ax.set_xlabel(f"mean {dict(r='red', g='green', b='blue')[channel]} of cell pixels (0-255)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("images")
    fig.suptitle(_title("Colour of the cells by class", synthetic))
    fig.tight_layout()
    columns = ["cell_mean_r", "cell_mean_g", "cell_mean_b", "image_mean_r", "image_mean_g", "image_mean_b"]
    table = stats.groupby("class")[columns].describe().stack(level=0, future_stack=True)
    table = table.reset_index().rename(columns={"level_1": "statistic"})
    save_figure(fig, table, "colour_statistics",
                "Mean R, G, B of the cell pixels per image, by class (stain differs between patients).",
                EDA_RUN, output_dir, synthetic=synthetic)
    return fig, table


def plot_cell_area_intensity(stats: pd.DataFrame, output_dir: str | Path | None = None
                             ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Cell area (pixels) and mean intensity of the cell pixels, by class (box plots)."""
    synthetic = manifest_is_synthetic(stats)
    present = [c for c in _CLASS_ORDER if (stats["class"] == c).any()]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, column, label in ((axes[0], "cell_area_px", "cell area (pixels at 450 px)"),
                              (axes[1], "cell_intensity", "mean intensity of cell pixels")):
        data = [stats.loc[stats["class"] == c, column] for c in present]
        parts = ax.boxplot(data, patch_artist=True)
        ax.set_xticks(range(1, len(present) + 1), present)
        for patch, name in zip(parts["boxes"], present):
            patch.set_facecolor(_CLASS_COLORS[name])
            patch.set_alpha(0.6)
        ax.set_ylabel(label)
    fig.suptitle(_title("Cell area and intensity by class", synthetic))
    fig.tight_layout()
    table = stats.groupby("class")[["cell_area_px", "cell_area_fraction", "cell_intensity"]].describe()
    table.columns = [f"{a}_{b}" for a, b in table.columns]
    table = table.reset_index()
    save_figure(fig, table, "cell_area_intensity",
                "Blasts tend to be larger with a higher nucleus-to-cytoplasm ratio; classes overlap.",
                EDA_RUN, output_dir, synthetic=synthetic)
    return fig, table


def find_duplicates(stats: pd.DataFrame) -> pd.DataFrame:
    """Groups of images whose decoded pixels are identical (same content hash).

    Args:
        stats: ``measure_images`` table.

    Returns:
        One row per duplicated image: ``content_hash, copies, path, name, patient_id, class,
        split``, plus ``label_conflict`` (the copies carry different labels) and
        ``crosses_splits`` (copies in different splits: a leak between training and evaluation).
    """
    copies = stats.groupby("content_hash")["path"].transform("size")
    table = stats.loc[copies > 1, ["content_hash", "path", "name", "patient_id", "class", "split"]].copy()
    table.insert(1, "copies", copies[copies > 1])
    groups = table.groupby("content_hash")
    table["label_conflict"] = groups["class"].transform("nunique") > 1
    table["crosses_splits"] = groups["split"].transform("nunique") > 1
    return table.sort_values(["content_hash", "path"], ignore_index=True)


def plot_sample_grid(manifest: pd.DataFrame, per_class: int = 8, seed: int = config.DEFAULT_SEED,
                     output_dir: str | Path | None = None
                     ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Random cells of each class (one row per class), titled with patient and file name."""
    synthetic = manifest_is_synthetic(manifest)
    labeled = manifest[manifest["label"].notna()]
    labeled = labeled.assign(**{"class": class_names(labeled["label"])})
    picks = [group.sample(n=min(per_class, len(group)), random_state=seed)
             for _, group in labeled.groupby("class", sort=True)]
    table = pd.concat(picks)[["path", "name", "patient_id", "class", "split"]].reset_index(drop=True)
    images = [_thumbnail(preprocess.load_rgb(p)) for p in table["path"]]
    titles = [f"{c} · patient {pid}" for c, pid in zip(table["class"], table["patient_id"])]
    fig = viz.plot_image_grid(images, titles, ncols=per_class,
                              title=_title("Sample cells per class (rows: all, hem)", synthetic))
    save_figure(fig, table, "sample_grid",
                "Random cells of each class: leukemic blasts (all) and normal B-lymphoid precursors (hem); "
                "brightness stretched for display.",
                EDA_RUN, output_dir, synthetic=synthetic)
    return fig, table


def _thumbnail(rgb: np.ndarray, side: int = 150) -> np.ndarray:
    return for_display(cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA))


def for_display(rgb: np.ndarray) -> np.ndarray:
    """Stretch a dark cell to the full 0-255 range, for display only (C-NMC cells peak near 100-130)."""
    peak = max(int(rgb.max()), 1)
    return (rgb.astype(np.float32) * (255.0 / peak)).astype(np.uint8)


# ----------------------------------------------------------------------------- preprocessing
def plot_preprocessing_steps(manifest: pd.DataFrame, n: int = 4, size: int = config.DEFAULT_IMAGE_SIZE,
                             margin: int = config.DEFAULT_MARGIN, seed: int = config.DEFAULT_SEED,
                             output_dir: str | Path | None = None
                             ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Before/after grid: original 450 px cell, bounding box, the model's input and its mask.

    Uses ``preprocess.preprocess_image`` itself, so what is shown is what the model gets.
    """
    synthetic = manifest_is_synthetic(manifest)
    table = _sample(manifest[manifest["label"].notna()], n, seed)
    table = table[["path", "name", "patient_id", "label"]].reset_index(drop=True)
    images, titles, rows = [], [], []
    for path, label in zip(table["path"], table["label"]):
        rgb = preprocess.load_rgb(path)
        (y, x, height, width), (top, left, side) = preprocess.cell_square(rgb, margin)
        framed = for_display(rgb)  # stretched before drawing, so the boxes stay bright
        cv2.rectangle(framed, (x, y), (x + width - 1, y + height - 1), (255, 255, 0), 2)
        cv2.rectangle(framed, (left, top), (left + side - 1, top + side - 1), (0, 255, 255), 2)
        square, _ = preprocess.preprocess_image(rgb, side, margin=margin)  # same side: crop + pad only
        image, mask = preprocess.preprocess_image(rgb, size, margin=margin)
        name = config.CLASS_NAMES[int(label)]
        images += [framed, for_display(square), for_display(image), mask.astype(np.float32)]
        titles += [f"{name}: original {rgb.shape[0]}x{rgb.shape[1]}", f"cropped + padded {side}x{side}",
                   f"resized {size}x{size}", f"cell mask {size}x{size}"]
        rows.append({"box_x": x, "box_y": y, "box_width": width, "box_height": height, "square_side": side,
                     "size": size, "margin": margin, "mask_fraction": float(mask.mean())})
    table = table.join(pd.DataFrame(rows))
    fig = viz.plot_image_grid(images, titles, ncols=4, cmap="gray",
                              title=_title("Crop to the cell, pad to a square, resize; derive the mask", synthetic))
    save_figure(fig, table, "preprocessing_steps",
                "Each row: the original cell with its bounding box (yellow) and the square kept (cyan: box + "
                f"{margin} px margin{_canvas_note()}), the square after crop "
                f"and black padding, the {size} px model input, "
                "and the derived cell mask (white = cell). Brightness stretched for display.",
                PREPROCESSING_RUN, output_dir, synthetic=synthetic)
    return fig, table


def _canvas_note() -> str:
    canvas = int(config.DEFAULT_CANVAS)
    return f", at least {canvas} px" if canvas else ", made square"


def plot_resolution_comparison(manifest: pd.DataFrame, sizes: Sequence[int] = (450, 128, 64), n: int = 3,
                               margin: int = config.DEFAULT_MARGIN, seed: int = config.DEFAULT_SEED,
                               output_dir: str | Path | None = None
                               ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """The same cells preprocessed at several sizes (450, 128, 64 px): how much detail survives."""
    synthetic = manifest_is_synthetic(manifest)
    table = _sample(manifest[manifest["label"].notna()], n, seed)
    table = table[["path", "name", "patient_id", "label"]].reset_index(drop=True)
    images, titles, rows = [], [], []
    for path, label in zip(table["path"], table["label"]):
        rgb = preprocess.load_rgb(path)
        for size in sizes:
            image, mask = preprocess.preprocess_image(rgb, size, margin=margin)
            images.append(for_display(image))
            titles.append(f"{config.CLASS_NAMES[int(label)]}: {size}x{size}")
            rows.append({"path": path, "size": size, "bytes_per_image": int(image.nbytes),
                         "mask_fraction": float(mask.mean())})
    fig = viz.plot_image_grid(images, titles, ncols=len(sizes),
                              title=_title("One cell at " + " / ".join(f"{s}" for s in sizes) + " px", synthetic))
    result = pd.DataFrame(rows).merge(table, on="path")
    save_figure(fig, result, "resolution_comparison",
                "The same cells after crop and pad at each size: chromatin texture and nucleoli fade at 64 px.",
                PREPROCESSING_RUN, output_dir, synthetic=synthetic)
    return fig, result


def plot_prepared_arrays(arrays_dir: str | Path, n: int = 6, seed: int = config.DEFAULT_SEED,
                         output_dir: str | Path | None = None
                         ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Images and masks read back from the cached arrays (what training reads), with labels."""
    arrays = preprocess.load_arrays(arrays_dir)
    synthetic = bool(arrays.meta.get("synthetic")) or manifest_is_synthetic(arrays.manifest)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(arrays.labels), size=min(n, len(arrays.labels)), replace=False))
    images, titles = [], []
    for row in rows:
        label = int(arrays.labels[row])
        name = config.CLASS_NAMES.get(label, "unlabeled")
        images += [for_display(np.asarray(arrays.images[row])), np.asarray(arrays.masks[row], dtype=np.float32)]
        titles += [f"row {row}: {name}", f"row {row}: mask"]
    table = arrays.manifest.iloc[rows][["path", "name", "patient_id", "label"]].reset_index(names="row")
    fig = viz.plot_image_grid(images, titles, ncols=4, cmap="gray",
                              title=_title(f"Prepared arrays ({Path(arrays_dir).name})", synthetic))
    save_figure(fig, table, "prepared_arrays",
                "Rows read back from the cached arrays (images.npy, masks.npy) with their labels.",
                PREPROCESSING_RUN, output_dir, synthetic=synthetic)
    return fig, table


# ----------------------------------------------------------------------------- model and training
TRAINING_RUN = "3.ANNa"


def model_blocks(model) -> pd.DataFrame:
    """The model's layers grouped into blocks (``down0``, ``bottleneck``, ``up0``, ``head`` …).

    Args:
        model: A Keras model (layer names ``<block>_<part>`` as ``model.build_anna`` writes them).

    Returns:
        One row per block in layer order: ``block, layers, output_shape, parameters``.
    """
    rows: dict[str, dict] = {}
    for layer in model.layers:
        block = layer.name.split("_")[0]
        if layer.name in ("p_leukemia", "cell_mask"):
            block = layer.name
        elif block in ("head", "decoder") or layer.name in ("bottleneck_avg", "bottleneck_max"):
            block = "head"  # global pooling and dense layers of the classification head
        entry = rows.setdefault(block, {"block": block, "layers": 0, "output_shape": "", "parameters": 0})
        entry["layers"] += 1
        entry["parameters"] += int(layer.count_params())
        output = getattr(layer, "output", None)
        if output is not None and hasattr(output, "shape") and not layer.name.endswith("_pool"):
            entry["output_shape"] = "x".join(str(d) for d in output.shape[1:])
    return pd.DataFrame(list(rows.values()))


def plot_model_diagram(model, output_dir: str | Path | None = None, synthetic: bool = False
                       ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """A U-shaped block diagram of ANNa: encoder, bottleneck, decoder with skips, and the two heads.

    Args:
        model: A model from ``model.build_anna`` (other models are drawn as a chain of blocks).
        output_dir: Root of the outputs.
        synthetic: Mark the title (the diagram itself does not depend on data).

    Returns:
        The figure and ``model_blocks(model)``.
    """
    table = model_blocks(model)
    levels = {b: int(b[-1]) for b in table["block"] if b[:-1] in ("down", "up") and b[-1].isdigit()}
    depth = max((v for b, v in levels.items() if b.startswith("down")), default=-1) + 1
    fig, ax = plt.subplots(figsize=(11, 4.8))
    positions = {}
    chain = 0
    for block in table["block"]:
        if block.startswith("down") and block in levels:
            positions[block] = (levels[block], -levels[block])
        elif block.startswith("up") and block in levels:
            positions[block] = (2 * depth - levels[block], -levels[block])
        elif block == "bottleneck":
            positions[block] = (depth, -depth)
        elif block in ("image", "rescale"):
            positions[block] = (-1, 0.9 if block == "image" else 0)
        elif block == "cell_mask":
            positions[block] = (2 * depth + 1.1, 0)
        elif block == "head":
            positions[block] = (2 * depth + 1.1, -depth + 0.6)
        elif block == "p_leukemia":
            positions[block] = (2 * depth + 1.1, -depth - 0.6)
        else:
            positions[block] = (chain, 1.8)
            chain += 1
    info = table.set_index("block")
    for block, (x, y) in positions.items():
        color = {"down": "#aed6f1", "up": "#a9dfbf", "bot": "#f9e79f", "hea": "#f5b7b1", "p_l": "#f5b7b1",
                 "cel": "#d7bde2"}.get(block[:3] if not block.startswith(("down", "up")) else block.rstrip("0123456789"),
                                       "#e5e7e9")
        ax.text(x, y, f"{block}\n{info.loc[block, 'output_shape']}\n{info.loc[block, 'parameters']:,} params",
                ha="center", va="center", fontsize=7, bbox={"boxstyle": "round", "fc": color, "ec": "#555"})
    ordered = [b for b in table["block"] if b in positions]
    for a, b in zip(ordered, ordered[1:]):
        if b in ("cell_mask", "p_leukemia") or (a == "head" and b != "p_leukemia"):
            continue
        ax.annotate("", xy=positions[b], xytext=positions[a],
                    arrowprops={"arrowstyle": "->", "color": "#555", "shrinkA": 18, "shrinkB": 18})
    last_up = "up0" if "up0" in positions else None
    for level in range(depth):
        if f"down{level}" in positions and f"up{level}" in positions:
            ax.annotate("", xy=positions[f"up{level}"], xytext=positions[f"down{level}"],
                        arrowprops={"arrowstyle": "->", "color": "#2874a6", "ls": "--", "shrinkA": 30, "shrinkB": 30})
    for target in ("cell_mask", "head"):
        if last_up and target in positions:
            ax.annotate("", xy=positions[target], xytext=positions[last_up],
                        arrowprops={"arrowstyle": "->", "color": "#555", "shrinkA": 18, "shrinkB": 18})
    if "bottleneck" in positions and "head" in positions:
        ax.annotate("", xy=positions["head"], xytext=positions["bottleneck"],
                    arrowprops={"arrowstyle": "->", "color": "#b03a2e", "shrinkA": 22, "shrinkB": 22,
                                "connectionstyle": "arc3,rad=0.25"})
    if "head" in positions and "p_leukemia" in positions:
        ax.annotate("", xy=positions["p_leukemia"], xytext=positions["head"],
                    arrowprops={"arrowstyle": "->", "color": "#555", "shrinkA": 18, "shrinkB": 18})
    xs, ys = zip(*positions.values())
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 1, max(ys) + 0.6)
    ax.axis("off")
    total = int(model.count_params())
    ax.set_title(_title(f"{model.name}: U-Net encoder (left), decoder (right), skip connections (dashed); "
                        f"{total:,} parameters", synthetic), fontsize=10)
    fig.tight_layout()
    save_figure(fig, table, "model_diagram",
                "ANNa's blocks with their output shapes: the U-Net segments the cell (cell_mask); the head reads "
                "the pooled bottleneck and decoder features and gives P(leukemia).", TRAINING_RUN, output_dir,
                synthetic=synthetic)
    return fig, table


def plot_training_history(run_dir: str | Path, output_dir: str | Path | None = None
                          ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Learning curves of a run (``history.csv``), saved as ``3.ANNa__training_curves``.

    Args:
        run_dir: A run folder from ``train.train_model``.
        output_dir: Root of the outputs.

    Returns:
        The figure and the history table.
    """
    from modules.reporting import report
    from modules.modeling import training as train

    run = train.load_run(run_dir)
    synthetic = bool((run.get("data") or {}).get("synthetic"))
    chart = report.training_chart(run_dir, synthetic=synthetic)
    if chart is None:
        raise FileNotFoundError(f"{Path(run_dir) / 'history.csv'} is missing or empty: the run trained no epoch")
    save_figure(chart.figure, chart.data, "training_curves", chart.caption, TRAINING_RUN, output_dir, synthetic=synthetic)
    return chart.figure, chart.data


TEST_RUN = "4.Test"


def plot_testing_predictions(predictions: pd.DataFrame, n_examples: int = 6, seed: int = config.DEFAULT_SEED,
                             output_dir: str | Path | None = None
                             ) -> tuple[matplotlib.figure.Figure, pd.DataFrame]:
    """Predictions on unlabeled cells: P(leukemia) histogram with the threshold, and example cells.

    Args:
        predictions: ``evaluate.predict_images`` output (``attrs["threshold"]`` set).
        n_examples: Cells shown per predicted class.
        seed: Sampling seed for the examples.
        output_dir: Root of the outputs.

    Returns:
        The figure and the counts per predicted class.
    """
    threshold = float(predictions.attrs.get("threshold", 0.5))
    synthetic = manifest_is_synthetic(predictions)
    picks = [group.sample(n=min(n_examples, len(group)), random_state=seed)
             for _, group in predictions.groupby("label_name", sort=True)]
    examples = pd.concat(picks) if picks else predictions.head(0)
    ncols = max(n_examples, 1)
    fig = plt.figure(figsize=(1.9 * ncols, 3.2 + 2.1 * max(len(picks), 1)))
    grid = fig.add_gridspec(1 + max(len(picks), 1), ncols, height_ratios=[1.6] + [1] * max(len(picks), 1))
    ax = fig.add_subplot(grid[0, :])
    ax.hist(predictions["p_leukemia"], bins=np.linspace(0, 1, 26), color="#7d3c98", alpha=0.8)
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("predicted P(leukemia)")
    ax.set_ylabel("cells")
    ax.legend(fontsize=8)
    counts = predictions["label_name"].value_counts()
    ax.set_title(_title(f"{len(predictions)} unlabeled cells: {counts.get('all', 0)} called all, "
                        f"{counts.get('hem', 0)} called hem", synthetic), fontsize=10)
    for row, (_, group) in enumerate(examples.groupby("label_name", sort=True), start=1):
        for col, item in enumerate(group.itertuples()):
            cell_ax = fig.add_subplot(grid[row, col])
            cell_ax.imshow(_thumbnail(preprocess.load_rgb(item.path)))
            cell_ax.set_title(f"{item.name}\ncalled {item.label_name}, p={item.p_leukemia:.2f}", fontsize=7)
            cell_ax.set_xticks([])
            cell_ax.set_yticks([])
    fig.tight_layout()
    table = (predictions.groupby("label_name").agg(cells=("path", "size"), mean_p=("p_leukemia", "mean"))
             .reset_index().rename(columns={"label_name": "predicted"}))
    table["threshold"] = threshold
    save_figure(fig, table, "testing_predictions",
                "P(leukemia) for the unlabeled testing cells with the run's threshold, and example cells of each "
                "predicted class (no labels exist for these cells, so no accuracy can be computed).",
                TEST_RUN, output_dir, synthetic=synthetic)
    return fig, table
