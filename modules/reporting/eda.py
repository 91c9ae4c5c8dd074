"""Exploratory charts for the notebooks: each ``plot_*`` returns (figure, table), saved under ``charts/<notebook>/``
and published as ``viz/<notebook>/``; titles say when the cells are synthetic."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import FancyArrowPatch, Rectangle
from tqdm.contrib.concurrent import thread_map

from modules import config, preprocessing
from modules.data import duplicates
from modules.data import synthetic as synth
from modules.data.layout import SPLIT_ORDER, patient_sort_key
from modules.preprocessing.cells import cell_mask
from modules.reporting import charts, gallery

EDA_RUN, PREPROCESSING_RUN, TRAINING_RUN, TEST_RUN = "1.EDA", "2.Image_preprocessing", "3.ANNa", "4.Test"
#: What the gallery says above each notebook's charts.
HEADINGS = {EDA_RUN: "1.EDA — the cells of the data set", PREPROCESSING_RUN: "2.Image_preprocessing — from a cell "
            "image to the model's input", TRAINING_RUN: "3.ANNa — the network and its training",
            TEST_RUN: "4.Test — predictions on the unlabeled testing cells"}
#: Columns of ``measure_images``.
STAT_COLUMNS = ("path", "name", "patient_id", "label", "class", "split", "fold", "height", "width",
                "cell_area_px", "cell_area_fraction", "cell_intensity", "cell_mean_r", "cell_mean_g",
                "cell_mean_b", "image_mean_r", "image_mean_g", "image_mean_b", "content_hash")
CLASS_ORDER = ("all", "hem", "unlabeled")
COLORS = {"all": charts.CLASS_COLORS[1], "hem": charts.CLASS_COLORS[0], "unlabeled": "#7f8c8d"}
Figure = matplotlib.figure.Figure
Plot = tuple[Figure, pd.DataFrame]


def class_names(labels: pd.Series) -> pd.Series:
    """Nullable 1/0 labels as ``all``/``hem``, missing ones as ``unlabeled``."""
    return labels.map(lambda v: "unlabeled" if pd.isna(v) else config.CLASS_NAMES[int(v)]).astype(str)


def manifest_is_synthetic(manifest: pd.DataFrame) -> bool:
    """Whether the manifest's images come from a synthetic dataset."""
    return bool(len(manifest)) and synth.is_synthetic(Path(manifest["path"].iloc[0]).parent)


def _note(table: pd.DataFrame, synthetic: bool = False) -> str:
    return charts.synthetic_note(cells_synthetic=synthetic or manifest_is_synthetic(table))


def _present(stats: pd.DataFrame) -> list[str]:
    """The classes of ``CLASS_ORDER`` the table holds, in that order."""
    return [c for c in CLASS_ORDER if (stats["class"] == c).any()]


def _by_split(table: pd.DataFrame, values: str) -> pd.DataFrame:
    """``values`` of a ``count_cells`` table per split (rows, in pipeline order) and class (columns)."""
    pivot = table.pivot(index="split", columns="class", values=values).fillna(0)
    return pivot.reindex([s for s in SPLIT_ORDER if s in pivot.index])


def save_figure(fig: Figure, table: pd.DataFrame, name: str, caption: str, run: str,
                output_dir: str | Path | None = None, note: str = "") -> Plot:
    """Save a chart under ``charts/<run>/``, publish that folder as ``viz/<run>/`` (heading + ``note``), close it."""
    folder = (root := Path(output_dir or config.OUTPUT_DIR)) / config.CHARTS_SUBDIR / run
    charts.save_chart(fig, table, name, caption, folder)
    plt.close(fig)  # the notebook shows the returned figure once
    gallery.publish(folder, root / config.VIZ_SUBDIR, run, HEADINGS.get(run, run) + note, "SYNTHETIC" in note)
    return fig, table


def _sample(manifest: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """At most ``limit`` rows, stratified by class (all rows when ``limit`` is 0)."""
    if not limit or len(manifest) <= limit:
        return manifest
    share = limit / len(manifest)
    parts = [group.sample(n=max(1, round(len(group) * share)), random_state=seed)
             for _, group in manifest.groupby(class_names(manifest["label"]), sort=True)]
    return pd.concat(parts).sort_values("path").head(limit)


def _bars(pivot: pd.DataFrame, ax) -> None:
    """Grouped bars per row and class, labelled with their counts (empty bars unlabelled)."""
    pivot = pivot[[c for c in CLASS_ORDER if c in pivot.columns]].astype(int)
    pivot.plot.bar(ax=ax, color=[COLORS[c] for c in pivot.columns], rot=0)
    for container in ax.containers:
        ax.bar_label(container, labels=[f"{v:g}" if v else "" for v in container.datavalues], fontsize=8)
    ax.margins(y=0.15)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))


# ----------------------------------------------------------------------------- counts
def count_cells(manifest: pd.DataFrame, by: Sequence[str] = ("split", "fold", "class")) -> pd.DataFrame:
    """Columns ``*by, cells, patients``, splits in pipeline order (train, validation, test)."""
    table = manifest.assign(**{"class": class_names(manifest["label"]),
                               "fold": manifest["fold"].astype("string").fillna("")})
    counts = table.groupby(list(by), sort=True).agg(
        cells=("path", "size"), patients=("patient_id", lambda ids: ids[ids != ""].nunique())).reset_index()
    return counts.sort_values("split", key=lambda s: s.map(SPLIT_ORDER), kind="stable", ignore_index=True)


def plot_class_counts(manifest: pd.DataFrame, output_dir: str | Path | None = None) -> Plot:
    """Bar chart of cells per split (in pipeline order) and class, training folds merged."""
    note, table = _note(manifest), count_cells(manifest, ("split", "class"))
    fig, ax = plt.subplots(figsize=(6.5, 3.6), layout="constrained")
    _bars(_by_split(table, "cells"), ax)
    ax.set(ylabel="cells", xlabel="", title=f"Cells per split and class{note}")
    return save_figure(fig, table, "class_counts", "Cells per split (train, validation, test) and class: all = "
                       "leukemic blast, hem = normal cell.", EDA_RUN, output_dir, note)


def plot_fold_counts(manifest: pd.DataFrame, output_dir: str | Path | None = None) -> Plot:
    """Cells and patients per training fold and class."""
    note, table = _note(manifest), count_cells(manifest[manifest["split"] == "train"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for ax, column in zip(axes, ("cells", "patients")):
        _bars(table.pivot(index="fold", columns="class", values=column).fillna(0).rename(index="fold_{}".format), ax)
        ax.set(ylabel=column, xlabel="", title=f"{column} per training fold")
    fig.suptitle(f"Training folds{note}")
    return save_figure(fig, table, "fold_counts", "Cells and patients per C-NMC training fold and class; each "
                       "patient lies in one fold only.", EDA_RUN, output_dir, note)


def plot_patient_counts(manifest: pd.DataFrame, output_dir: str | Path | None = None) -> Plot:
    """Cells per patient (labeled cells), coloured by class, largest first."""
    note, labeled = _note(manifest), manifest[manifest["label"].notna() & (manifest["patient_id"] != "")]
    table = (labeled.assign(**{"class": class_names(labeled["label"])}).groupby(["patient_id", "class"])
             .agg(cells=("path", "size"), splits=("split", lambda s: ",".join(sorted(set(s))))).reset_index()
             .sort_values(["class", "cells", "patient_id"], ascending=[True, False, True], ignore_index=True,
                          key=lambda c: patient_sort_key(c) if c.name == "patient_id" else c))
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(table) + 2), 3.8), layout="constrained")
    ax.bar(table["patient_id"], table["cells"], color=[COLORS[c] for c in table["class"]])
    ax.set(xlabel="patient (red = ALL patient's blasts, blue = healthy subject's normal cells)", ylabel="cells",
           title=f"Cells per patient ({len(table)} patients){note}")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    return save_figure(fig, table, "patient_counts", "Cells per patient: a few patients contribute many cells, "
                       "which is why splits are by patient.", EDA_RUN, output_dir, note)


def plot_validation_balance(manifest: pd.DataFrame, output_dir: str | Path | None = None) -> Plot:
    """Class balance (share of labeled cells) of each split, in pipeline order."""
    note, table = _note(manifest), count_cells(manifest[manifest["label"].notna()], ("split", "class"))
    table["share_of_cells"] = table["cells"] / table.groupby("split")["cells"].transform("sum")
    shares = _by_split(table, "share_of_cells").filter(["all", "hem"])
    fig, ax = plt.subplots(figsize=(6.5, 3.4), layout="constrained")
    shares.plot.barh(ax=ax, stacked=True, color=[COLORS[c] for c in shares.columns])
    for container in ax.containers:
        ax.bar_label(container, labels=[f"{v:.0%}" if v > 0.04 else "" for v in container.datavalues],
                     label_type="center", color="white")
    ax.invert_yaxis()  # train on top, as in the pipeline
    ax.set(xlim=(0, 1), xlabel="share of labeled cells", ylabel="",
           title=f"Class balance: validation vs training{note}")
    if "validation" not in shares.index:
        ax.text(0.5, -0.3, "no labeled validation_data in this dataset", transform=ax.transAxes, ha="center",
                fontsize=8, color="#c0392b")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return save_figure(fig, table, "validation_balance", "Share of leukemic (all) and normal (hem) cells in the "
                       "validation set beside training.", EDA_RUN, output_dir, note)


# ----------------------------------------------------------------------------- pixels
def _measure_one(path: str) -> dict:
    """The pixel columns of ``STAT_COLUMNS`` for one image (OpenCV: about 1 ms per 450 px cell)."""
    rgb = preprocessing.load_rgb(path)
    cell = cell_mask(rgb)
    area = cv2.countNonZero(cell)
    cell_mean = cv2.mean(rgb, mask=cell)[:3] if area else (0.0, 0.0, 0.0)
    return {"height": rgb.shape[0], "width": rgb.shape[1], "cell_area_px": area,
            "cell_area_fraction": area / (rgb.shape[0] * rgb.shape[1]), "cell_intensity": float(np.mean(cell_mean)),
            **{f"cell_mean_{c}": float(v) for c, v in zip("rgb", cell_mean)},
            **{f"image_mean_{c}": float(v) for c, v in zip("rgb", cv2.mean(rgb)[:3])},
            "content_hash": duplicates.pixel_digest(rgb)}


def measure_images(manifest: pd.DataFrame, limit: int | None = None, seed: int = config.DEFAULT_SEED,
                   workers: int | None = None, progress: bool = True) -> pd.DataFrame:
    """``STAT_COLUMNS`` of each image (decoded in threads; ``ImageError`` names a bad file), of ``limit`` images
    sampled by class share (0/None: all); the cell is preprocessing's ``cell_mask``."""
    rows = _sample(manifest, limit or 0, seed)
    measured = thread_map(_measure_one, rows["path"], max_workers=workers or preprocessing.default_workers(),
                          desc="measuring images", disable=not progress)
    # Joined by position: the manifest's index may hold duplicate labels (a concat of scans).
    table = pd.concat([rows[["path", "name", "patient_id", "label", "split", "fold"]].reset_index(drop=True),
                       pd.DataFrame(measured)], axis=1)
    return table.assign(**{"class": class_names(table["label"])})[list(STAT_COLUMNS)]


def plot_image_sizes(stats: pd.DataFrame, output_dir: str | Path | None = None) -> Plot:
    """Image dimensions found (C-NMC images are all 450x450 RGB)."""
    note, table = _note(stats), stats.groupby(["height", "width", "class"]).size().rename("images").reset_index()
    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    ax.bar_label(ax.bar([f"{h}x{w}\n{c}" for h, w, c in zip(table["height"], table["width"], table["class"])],
                        table["images"], color=[COLORS[c] for c in table["class"]]), fontsize=8)
    ax.set(ylabel="images", title=f"Image sizes (height x width) of {len(stats)} images{note}")
    return save_figure(fig, table, "image_sizes", "Image sizes in pixels (height x width) per class.", EDA_RUN,
                       output_dir, note)


def plot_colour_statistics(stats: pd.DataFrame, output_dir: str | Path | None = None) -> Plot:
    """Distributions of the mean red, green and blue value of the cell pixels, by class."""
    note = _note(stats)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True, layout="constrained")
    for ax, (channel, colour) in zip(axes, {"r": "red", "g": "green", "b": "blue"}.items()):
        sns.histplot(stats, x=f"cell_mean_{channel}", hue="class", palette=COLORS, bins=30, ax=ax,
                     hue_order=_present(stats), legend=channel == "b")
        ax.set(xlabel=f"mean {colour} of cell pixels (0-255)", ylabel="images")
    sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1, 1))  # beside the bars, not over them
    fig.suptitle(f"Colour of the cells by class{note}")
    columns = [f"{part}_mean_{c}" for part in ("cell", "image") for c in "rgb"]
    table = stats.groupby("class")[columns].describe().stack(level=0, future_stack=True)
    return save_figure(fig, table.reset_index().rename(columns={"level_1": "statistic"}), "colour_statistics",
                       "Mean R, G, B of the cell pixels per image, by class (stain differs between patients).",
                       EDA_RUN, output_dir, note)


def plot_cell_area_intensity(stats: pd.DataFrame, output_dir: str | Path | None = None) -> Plot:
    """Cell area (pixels) and mean intensity of the cell pixels, by class (box plots)."""
    note = _note(stats)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    for ax, column, label in ((axes[0], "cell_area_px", "cell area (pixels at 450 px)"),
                              (axes[1], "cell_intensity", "mean intensity of cell pixels")):
        sns.boxplot(stats, x="class", y=column, hue="class", order=_present(stats), palette=COLORS, ax=ax)
        ax.set(ylabel=label, xlabel="")
    fig.suptitle(f"Cell area and intensity by class{note}")
    table = stats.groupby("class")[["cell_area_px", "cell_area_fraction", "cell_intensity"]].describe()
    table.columns = [f"{a}_{b}" for a, b in table.columns]
    return save_figure(fig, table.reset_index(), "cell_area_intensity", "Blasts tend to be larger with a higher "
                       "nucleus-to-cytoplasm ratio; classes overlap.", EDA_RUN, output_dir, note)


def plot_subject_cell_areas(stats: pd.DataFrame, output_dir: str | Path | None = None) -> Plot:
    """Median cell area of each subject, smallest first, by class: where classes overlap between people."""
    note, labeled = _note(stats), stats[stats["class"] != "unlabeled"]
    table = (labeled.groupby(["patient_id", "class"])["cell_area_px"].agg(["median", "size"])
             .rename(columns={"median": "median_cell_area_px", "size": "cells"}).reset_index()
             .sort_values("median_cell_area_px", ignore_index=True))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(table)), 3.6), layout="constrained")
    sns.barplot(table, x="patient_id", y="median_cell_area_px", hue="class", order=table["patient_id"],
                hue_order=_present(labeled), palette=COLORS, dodge=False, ax=ax)
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    sns.move_legend(ax, "upper left", fontsize=8)
    ax.set(xlabel="subject", ylabel="median cell area (pixels at 450 px)", title=f"Cell size per subject{note}")
    return save_figure(fig, table, "subject_cell_areas", "Median cell area per subject, smallest first: healthy "
                       "subjects with large cells are the ones a size cue calls leukemic.", EDA_RUN, output_dir, note)


def find_duplicates(stats: pd.DataFrame) -> pd.DataFrame:
    """``duplicates.find_duplicates`` on the pixel hash of ``measure_images``: images whose pixels another repeats."""
    return duplicates.find_duplicates(stats, "content_hash")


def _thumbnail(path: str, side: int = 150) -> np.ndarray:
    return charts.for_display(cv2.resize(preprocessing.load_rgb(path), (side, side), interpolation=cv2.INTER_AREA))


def plot_sample_grid(manifest: pd.DataFrame, per_class: int = 8, seed: int = config.DEFAULT_SEED,
                     output_dir: str | Path | None = None) -> Plot:
    """Random cells of each class (one row per class), titled with their class and patient."""
    note, labeled = _note(manifest), manifest[manifest["label"].notna()]
    table = pd.concat([group.sample(n=min(per_class, len(group)), random_state=seed)
                       for _, group in labeled.assign(**{"class": class_names(labeled["label"])}).groupby("class")])
    table = table[["path", "name", "patient_id", "class", "split"]].reset_index(drop=True)
    fig = charts.plot_image_grid([_thumbnail(p) for p in table["path"]],
                                 [f"{c} · patient {pid}" for c, pid in zip(table["class"], table["patient_id"])],
                                 ncols=per_class, title=f"Sample cells per class (rows: all, hem){note}")
    return save_figure(fig, table, "sample_grid", "Random cells of each class: leukemic blasts (all) and normal "
                       "B-lymphoid precursors (hem); brightness stretched for display.", EDA_RUN, output_dir, note)


# ----------------------------------------------------------------------------- preprocessing
def _labeled_sample(manifest: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` labeled cells, stratified by class: ``path, name, patient_id, label``."""
    return _sample(manifest[manifest["label"].notna()], n, seed)[["path", "name", "patient_id", "label"]]


def plot_preprocessing_steps(manifest: pd.DataFrame, n: int = 4, size: int = config.DEFAULT_IMAGE_SIZE,
                             margin: int = config.DEFAULT_MARGIN, seed: int = config.DEFAULT_SEED,
                             output_dir: str | Path | None = None) -> Plot:
    """Each cell with its box and square, the square, the model's input and its mask (``preprocess_image``'s)."""
    note, table = _note(manifest), _labeled_sample(manifest, n, seed).reset_index(drop=True)
    images, titles, rows = [], [], []
    for path, label in zip(table["path"], table["label"]):
        rgb = preprocessing.load_rgb(path)
        (y, x, height, width), (top, left, side) = preprocessing.cell_square(rgb, margin)
        framed = charts.for_display(rgb)  # stretched before drawing, so the boxes stay bright
        cv2.rectangle(framed, (x, y), (x + width - 1, y + height - 1), (255, 255, 0), 2)
        cv2.rectangle(framed, (left, top), (left + side - 1, top + side - 1), (0, 255, 255), 2)
        square, _ = preprocessing.preprocess_image(rgb, side, margin=margin)  # same side: crop + pad only
        image, mask = preprocessing.preprocess_image(rgb, size, margin=margin)
        images += [framed, charts.for_display(square), charts.for_display(image), mask.astype(np.float32)]
        titles += [f"{config.CLASS_NAMES[int(label)]}: original {rgb.shape[0]}x{rgb.shape[1]}",
                   f"cropped + padded {side}x{side}", f"resized {size}x{size}", f"cell mask {size}x{size}"]
        rows.append({"box_x": x, "box_y": y, "box_width": width, "box_height": height, "square_side": side,
                     "size": size, "margin": margin, "mask_fraction": float(mask.mean())})
    fig = charts.plot_image_grid(images, titles, ncols=4, cmap="gray",
                                 title=f"Crop to the cell, pad to a square, resize; derive the mask{note}")
    canvas = f", at least {config.DEFAULT_CANVAS} px" if config.DEFAULT_CANVAS else ", made square"
    return save_figure(fig, table.join(pd.DataFrame(rows)), "preprocessing_steps", "Each row: the original cell "
                       f"with its bounding box (yellow) and the square kept (cyan: box + {margin} px margin{canvas}), "
                       f"the square after crop and black padding, the {size} px model input, and the derived cell "
                       "mask (white = cell). Brightness stretched for display.", PREPROCESSING_RUN, output_dir, note)


def plot_resolution_comparison(manifest: pd.DataFrame, sizes: Sequence[int] = (450, 128, 64), n: int = 3,
                               margin: int = config.DEFAULT_MARGIN, seed: int = config.DEFAULT_SEED,
                               output_dir: str | Path | None = None) -> Plot:
    """The same cells preprocessed at several sizes (450, 128, 64 px): how much detail survives."""
    note, table = _note(manifest), _labeled_sample(manifest, n, seed)
    images, titles, rows = [], [], []
    for path, label in zip(table["path"], table["label"]):
        rgb = preprocessing.load_rgb(path)
        for size in sizes:
            image, mask = preprocessing.preprocess_image(rgb, size, margin=margin)
            images.append(charts.for_display(image))
            titles.append(f"{config.CLASS_NAMES[int(label)]}: {size}x{size}")
            rows.append({"path": path, "size": size, "bytes_per_image": int(image.nbytes),
                         "mask_fraction": float(mask.mean())})
    fig = charts.plot_image_grid(images, titles, ncols=len(sizes),
                                 title="One cell at " + " / ".join(map(str, sizes)) + f" px{note}")
    return save_figure(fig, pd.DataFrame(rows).merge(table, on="path"), "resolution_comparison", "The same cells "
                       "after crop and pad at each size: chromatin texture and nucleoli fade at 64 px.",
                       PREPROCESSING_RUN, output_dir, note)


def plot_prepared_arrays(arrays_dir: str | Path, n: int = 6, seed: int = config.DEFAULT_SEED,
                         output_dir: str | Path | None = None) -> Plot:
    """Images and masks read back from the cached arrays (what training reads), with labels."""
    arrays = preprocessing.load_arrays(arrays_dir)
    note = _note(arrays.manifest, bool(arrays.meta.get("synthetic")))
    rows = np.sort(np.random.default_rng(seed).choice(len(arrays.labels), size=min(n, len(arrays.labels)),
                                                      replace=False))
    images, titles = [], []
    for row in rows:
        name = config.CLASS_NAMES.get(int(arrays.labels[row]), "unlabeled")
        images += [charts.for_display(np.asarray(arrays.images[row])), np.asarray(arrays.masks[row], dtype=np.float32)]
        titles += [f"row {row}: {name}", f"row {row}: mask"]
    table = arrays.manifest.iloc[rows][["path", "name", "patient_id", "label"]].reset_index(names="row")
    fig = charts.plot_image_grid(images, titles, ncols=4, cmap="gray",
                                 title=f"Prepared arrays ({Path(arrays_dir).name}){note}")
    return save_figure(fig, table, "prepared_arrays", "Rows read back from the cached arrays (images.npy, "
                       "masks.npy) with their labels.", PREPROCESSING_RUN, output_dir, note)


def plot_nucleus_targets(arrays_dir: str | Path, per_class: int = 6, seed: int = config.DEFAULT_SEED,
                         output_dir: str | Path | None = None) -> Plot:
    """Cells of each class with the nucleus found from the stain's colour outlined (yellow): the U-Net's target
    with ``--mask-target nucleus``; the table holds every cell's nucleus share and N:C ratio."""
    from modules.preprocessing.nucleus import find_nucleus, nucleus_measures

    arrays = preprocessing.load_arrays(arrays_dir)
    note = _note(arrays.manifest, bool(arrays.meta.get("synthetic")))
    labels = np.asarray(arrays.labels).astype(int)
    rng = np.random.default_rng(seed)
    rows = [row for label in (1, 0) for row in np.sort(rng.choice(np.flatnonzero(labels == label),
                                                                  size=min(per_class, int((labels == label).sum())),
                                                                  replace=False))]
    images, titles, records = [], [], []
    for row in rows:
        image, cell = np.asarray(arrays.images[row]), np.asarray(arrays.masks[row])
        found = find_nucleus(image, cell)
        share, ratio = (np.nan, np.nan) if found.fallback else nucleus_measures(found.mask, cell)
        outlined = charts.for_display(image).copy()
        contours, _ = cv2.findContours(found.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outlined, contours, -1, (255, 230, 0), 1)
        images.append(outlined)
        titles.append(f"{config.CLASS_NAMES[int(labels[row])]}, {arrays.manifest['patient_id'].iloc[row]}\n"
                      + ("no nucleus trusted" if found.fallback else f"nucleus {share:.2f}"))
        records.append({"row": int(row), "label": int(labels[row]), "nucleus_share": share,
                        "nucleus_cytoplasm_ratio": ratio, "fallback": found.fallback})
    table = pd.DataFrame(records).merge(arrays.manifest[["name", "patient_id"]].reset_index(names="row"), on="row")
    fig = charts.plot_image_grid(images, titles, ncols=per_class, row_labels=["all (leukemic)", "hem (normal)"],
                                 title=f"The nucleus, found from the stain's colour (yellow outline){note}")
    return save_figure(fig, table, "nucleus_targets", "Cells of each class with the nucleus found from the stain's "
                       "colour (a purple score log R + log B - 2 log G against the cell's median, closed, "
                       "filled, largest piece); where it is not trusted the cell mask is used (fallback).",
                       PREPROCESSING_RUN, output_dir, note)


# ----------------------------------------------------------------------------- model and training
def model_blocks(model) -> pd.DataFrame:
    """``block, layers, output_shape, parameters`` per block (``down0``, ``down0_pool``, …, ``head``), in order."""
    rows: dict[str, dict] = {}
    for layer in model.layers:
        prefix, _, part = layer.name.partition("_")
        block = (layer.name if layer.name in ("p_leukemia", "cell_mask") or part == "pool"
                 else "head" if prefix in ("head", "decoder") or part in ("avg", "max") else prefix)
        entry = rows.setdefault(block, {"block": block, "layers": 0, "output_shape": "", "parameters": 0})
        entry["layers"] += 1
        entry["parameters"] += int(layer.count_params())
        if part not in ("avg", "max"):  # a pooled copy feeding the head does not change the block's shape
            entry["output_shape"] = "x".join(str(d) for d in layer.output.shape[1:])
    return pd.DataFrame(list(rows.values()))


def _draw_unet(ax, model, info: pd.DataFrame) -> None:
    """ANNa as a U: encoder down the left with a max-pool between blocks, decoder up the right with the skips
    (dashed), and the head below, fed by every level it pools."""
    depth, step = sum(1 for block in info.index if block.startswith("down") and block[4:].isdigit()), 1.6
    boxes: dict[str, matplotlib.text.Text] = {}

    def box(name: str, x: float, y: float, colour: str, text: str | None = None, title: str = "") -> None:
        text = text or f"{title or name}\n{info.loc[name, 'output_shape']}\n{info.loc[name, 'parameters']:,} params"
        boxes[name] = ax.text(x, y, text, ha="center", va="center", fontsize=7,
                              bbox={"boxstyle": "round", "fc": colour, "ec": "#555"})

    def arrow(start, end, colour: str = "#555", style: str = "-") -> None:
        # Clipped at the boxes and drawn above them: an arrow ends at a box's edge, never crosses its text.
        texts = [boxes[point] if isinstance(point, str) else None for point in (start, end)]
        ax.add_patch(FancyArrowPatch(*[t.get_position() if t else p for t, p in zip(texts, (start, end))],
                                     arrowstyle="-|>", mutation_scale=10, color=colour, linestyle=style, zorder=4,
                                     patchA=texts[0] and texts[0].get_bbox_patch(),
                                     patchB=texts[1] and texts[1].get_bbox_patch()))

    standardized = any(layer.name == "cell_standardization" for layer in model.layers)
    box("input", -2.4, 0, "#e5e7e9", f"image\n{info.loc['image', 'output_shape']}\n"
        + ("standardized per cell" if standardized else "rescaled"))
    stem = ["stem"] if "stem" in info.index else []  # a strided convolution before the U-Net
    if stem:
        box("stem", -2.4, -step, "#d6eaf8", title="stem: strided conv")
    for level in range(depth):
        box(f"down{level}", 2 * level, -step * level, "#aed6f1")
        box(f"down{level}_pool", 2 * level + 1, -step * (level + 0.5), "#eaf2f8",
            f"max-pool\n{info.loc[f'down{level}_pool', 'output_shape']}")
        box(f"up{level}", 4 * depth - 2 * level, -step * level, "#a9dfbf")
        arrow(f"down{level}", f"up{level}", "#2874a6", "--")
    box("bottleneck", 2 * depth, -step * depth, "#f9e79f")
    chain = ["input", *stem, *[n for level in range(depth) for n in (f"down{level}", f"down{level}_pool")],
             "bottleneck", *[f"up{level}" for level in reversed(range(depth))]]
    for start, end in zip(chain, chain[1:]):
        arrow(start, end)
    if "cell_mask" in info.index:
        box("cell_mask", 4 * depth + 2.4, 0, "#d7bde2", None if "mask" not in info.index else  # stem: upsampled
            f"cell_mask\n{info.loc['cell_mask', 'output_shape']}\n1x1 conv, upsampled x2")
        arrow("up0", "cell_mask")
    pooled: dict[str, list[str]] = {}  # which blocks the head pools, read from the model itself
    for layer in model.layers:
        source, _, kind = layer.name.partition("_")
        if kind in ("avg", "max"):
            pooled.setdefault("up0" if source == "decoder" else source, []).append({"avg": "average"}.get(kind, kind))
    features = next((layer.output.shape[-1] for layer in model.layers if layer.name == "head_features"), "?")
    y = -step * depth - 1.7
    ax.add_patch(Rectangle((-0.9, y - 0.45), 4 * depth + 1.8, 0.9, fc="#f5b7b1", ec="#555"))
    ax.text(2 * depth, y, "head: global pooling of " + ", ".join(f"{name} ({' + '.join(kinds)})"
                                                                 for name, kinds in pooled.items())
            + f"\n→ {features} features → dense {info.loc['head', 'output_shape']} "
            f"({info.loc['head', 'parameters']:,} params)", ha="center", va="center", fontsize=7)
    for name in pooled:
        arrow(name, (boxes[name].get_position()[0], y + 0.45), "#b03a2e")
    box("p_leukemia", 4 * depth + 2.4, y, "#f5b7b1")
    arrow((4 * depth + 0.9, y), "p_leukemia")
    ax.set(xlim=(-3.6, 4 * depth + 3.6), ylim=(y - 0.8, 0.8))


def plot_model_diagram(model, output_dir: str | Path | None = None, synthetic: bool = False) -> Plot:
    """ANNa's block diagram (a U with its head) and ``model_blocks``; ``synthetic``: trained on synthetic cells."""
    if model.name != "anna":
        raise ValueError(f"plot_model_diagram draws ANNa (network.build_anna), not the model {model.name!r}")
    table, note = model_blocks(model), charts.synthetic_note(model_synthetic=synthetic)
    fig, ax = plt.subplots(figsize=(12, 6.5), layout="constrained")
    _draw_unet(ax, model, table.set_index("block"))
    ax.axis("off")
    ax.set_title(f"{model.name}: {int(model.count_params()):,} parameters; skip connections dashed{note}",
                 fontsize=10)
    return save_figure(fig, table, "model_diagram", "ANNa's blocks with their output shapes: a strided "
                       "convolution (stem) where the U-Net works below the image's resolution, the encoder (down, a "
                       "2x2 max-pool between two blocks), the bottleneck, the decoder (up) with the skip connections "
                       "(dashed) and the U-Net's cell mask. The classification head reads every level: each encoder "
                       "block, the bottleneck and the last decoder block, globally pooled, then a dense layer gives "
                       "P(leukemia).", TRAINING_RUN, output_dir, note)


def plot_training_history(run_dir: str | Path, output_dir: str | Path | None = None) -> Plot:
    """Learning curves of a run (``history.csv``), epochs from 1 with the restored epoch marked."""
    from modules.modeling import saving

    run = saving.load_run(run_dir)
    note = charts.synthetic_note(model_synthetic=bool((run.get("data") or {}).get("synthetic")))
    chart = charts.training_chart(run_dir, run, note)
    if chart is None:
        raise FileNotFoundError(f"{Path(run_dir) / 'history.csv'} is missing or empty: the run trained no epoch")
    return save_figure(chart.figure, chart.data, "training_curves", chart.caption, TRAINING_RUN, output_dir, note)


def plot_testing_predictions(predictions: pd.DataFrame, n_examples: int = 6, seed: int = config.DEFAULT_SEED,
                             output_dir: str | Path | None = None) -> Plot:
    """``predict.predict_images`` output: P(leukemia) histogram with the threshold and ``n_examples`` cells per
    predicted class; the table counts the cells of each."""
    threshold = float(predictions.attrs.get("threshold", 0.5))
    trained_on = predictions.get("model_trained_on", pd.Series(["unknown"]))
    model_synthetic = None if (trained_on == "unknown").all() else bool((trained_on == "synthetic").any())
    note = charts.synthetic_note(model_synthetic, manifest_is_synthetic(predictions))
    picks = [group.sample(n=min(n_examples, len(group)), random_state=seed)
             for _, group in predictions.groupby("label_name", sort=True)]
    ncols, nrows = max(n_examples, 1), max(len(picks), 1)
    fig = plt.figure(figsize=(1.9 * ncols, 3.2 + 2.1 * nrows), layout="constrained")
    grid = fig.add_gridspec(1 + nrows, ncols, height_ratios=[1.6] + [1] * nrows)
    ax = fig.add_subplot(grid[0, :])
    ax.hist(predictions["p_leukemia"], bins=np.linspace(0, 1, 26), color="#7d3c98", alpha=0.8)
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3f}")
    counts = predictions["label_name"].value_counts()
    ax.set(xlabel="predicted P(leukemia)", ylabel="cells", title=f"{len(predictions)} unlabeled cells: "
           f"{counts.get('all', 0)} called all, {counts.get('hem', 0)} called hem{note}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    for row, group in enumerate(picks, start=1):
        for col, item in enumerate(group.itertuples()):
            cell_ax = fig.add_subplot(grid[row, col], xticks=[], yticks=[])
            cell_ax.imshow(_thumbnail(item.path))
            cell_ax.set_title(f"{item.name}\ncalled {item.label_name}, p={item.p_leukemia:.2f}", fontsize=7)
    table = (predictions.groupby("label_name").agg(cells=("path", "size"), mean_p=("p_leukemia", "mean"))
             .reset_index().rename(columns={"label_name": "predicted"}).assign(threshold=threshold))
    return save_figure(fig, table, "testing_predictions", "P(leukemia) for the unlabeled testing cells with the "
                       "run's threshold, and example cells of each predicted class (no labels exist for these cells, "
                       "so no accuracy can be computed).", TEST_RUN, output_dir, note)
