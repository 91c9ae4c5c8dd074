"""Find C-NMC 2019 images in the Kaggle layout and describe them in one manifest table.

``scan_dataset`` accepts the ``C-NMC_Leukemia`` root or any folder inside it (``training_data``,
one ``fold_N``, one class folder, the validation folder or the testing folder) and returns one
row per image with the columns of ``config.MANIFEST_COLUMNS``. Validation labels are joined to
the images by file name (``new_names``), never by position.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pandas as pd

from modules import config


class DatasetError(ValueError):
    """The folder or its labels do not match the C-NMC layout; the message says what to fix."""


#: ``UID_<patient>_<image>_<cell>_<all|hem>``; the patient id is digits or H + digits.
CELL_NAME = re.compile(r"^UID_(?P<patient>h?\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<cls>all|hem)$", re.IGNORECASE)
FOLD_NAME = re.compile(r"^fold_(\d+)$", re.IGNORECASE)
#: Files that operating systems and viewers leave in folders; ignored without a word.
JUNK_FILES = {"thumbs.db", "desktop.ini"}
SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}
#: Column dtypes of the manifest (patient ids stay strings: "11" is not the number 11).
MANIFEST_DTYPES = {"path": str, "name": str, "original_name": str, "patient_id": str,
                   "label": "Int8", "split": str, "fold": "Int8"}
#: The column the arrays' manifest adds: each cell's digest of its decoded pixels (``data.duplicates``).
DIGEST_COLUMN = "pixel_digest"
_LAYOUT_HINT = (
    "expected the Kaggle 'leukemia-classification' layout: C-NMC_Leukemia/training_data/fold_0..2/{all,hem}/, "
    "validation_data/C-NMC_test_prelim_phase_data/ with C-NMC_test_prelim_phase_data_labels.csv, "
    "testing_data/C-NMC_test_final_phase_data/"
)


def _child(folder: Path, name: str) -> Path | None:
    """The sub-folder called ``name``, matched case-insensitively."""
    exact = folder / name
    if exact.is_dir():
        return exact
    matches = [p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name.lower()]
    return matches[0] if matches else None


def _list_images(folder: Path) -> list[str]:
    """Paths (str) of the image files directly in ``folder``, sorted by name.

    Other entries are reported in a warning, not dropped silently.
    """
    images, others, base = [], [], str(folder)
    with os.scandir(folder) as entries:  # scandir: no stat per file, fast on 10,000-file folders
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name.lower() in JUNK_FILES:
                continue
            if os.path.splitext(entry.name)[1].lower() in config.IMAGE_EXTENSIONS and entry.is_file():
                images.append(utf8_path(os.path.join(base, entry.name)))
            else:
                others.append(entry.name + ("/" if entry.is_dir() else ""))
    if others:
        warn_ignored(folder, others, "not an image", f"; images must end in {', '.join(config.IMAGE_EXTENSIONS)}")
    return images


def utf8_path(path: str | os.PathLike) -> str:
    """``path`` as a string; refused, named with its odd bytes shown, when it is not valid UTF-8.

    Such a name (from an older encoding such as Latin-1) decodes with surrogates that no CSV or
    terminal can take, so it would fail later with an error that names nothing.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")  # the byte 0xE9 shows as \xe9
        raise DatasetError(f"{shown}: the name is not valid UTF-8 (an older encoding such as Latin-1?), so it "
                           "cannot be listed in a manifest; rename it with UTF-8 characters only") from None
    return text


def warn_ignored(folder: Path, names: list[str], reason: str, advice: str,
                 noun: tuple[str, str] = ("entry", "entries"), stacklevel: int = 4) -> None:
    """Warn ``<folder>: ignoring N entries that are <reason> (<up to 5 names>)<advice>``.

    Args:
        folder: Where the entries are.
        names: The entries left out.
        reason: Why, e.g. "not an image".
        advice: What to do, appended as is (starts with its own punctuation).
        noun: Singular and plural of what is counted.
        stacklevel: ``warnings.warn``'s, counted from this function.
    """
    listed = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
    warnings.warn(
        f"{folder}: ignoring {len(names)} {noun[0] if len(names) == 1 else noun[1]} that "
        f"{'is' if len(names) == 1 else 'are'} {reason} ({listed}){advice}",
        stacklevel=stacklevel,
    )


def _warn_unexpected(folder: Path, belongs, what: str) -> None:
    """Warn about the entries of ``folder`` that are not part of the layout (hidden ones aside).

    Args:
        folder: A folder of the layout.
        belongs: ``belongs(path) -> bool`` for the entries that are scanned.
        what: What belongs there, for the message.
    """
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                    if not p.name.startswith(".") and p.name.lower() not in JUNK_FILES and not belongs(p))
    if others:
        images = [name for name in others if os.path.splitext(name)[1].lower() in config.IMAGE_EXTENSIONS]
        hint = (f"; {len(images)} of them are images: move each cell into the class folder its name says"
                if images else "")
        warn_ignored(folder, others, "not part of the C-NMC layout", f": only {what} are read there{hint}")


def parse_cell_name(name: str) -> dict | None:
    """Split ``UID_<patient>_<image>_<cell>_<all|hem>.<ext>`` into its parts.

    Args:
        name: A file name.

    Returns:
        ``{"patient_id", "label"}`` (patient id upper-cased, label 1/0), or None when the
        name does not follow the pattern.
    """
    match = CELL_NAME.match(os.path.splitext(name)[0])
    if match is None:
        return None
    return {"patient_id": match["patient"].upper(), "label": config.CLASS_FOLDERS[match["cls"].lower()]}


def _scan_class_folder(folder: Path, label: int, fold: int | None) -> list[dict]:
    images = _list_images(folder)
    if not images:
        raise DatasetError(
            f"empty class folder {folder}: it holds no images ({', '.join(config.IMAGE_EXTENSIONS)}); "
            "copy the cells of this class there or remove the folder"
        )
    rows = []
    for path in images:
        name = os.path.basename(path)
        parts = parse_cell_name(name)
        if parts is None:
            raise DatasetError(
                f"cannot read the patient from the file name {path}: training cells must be named "
                "UID_<patient>_<image>_<cell>_<all|hem>.<ext> as in the Kaggle download; rename it"
            )
        if parts["label"] != label:
            raise DatasetError(
                f"{path} is named as {config.CLASS_NAMES[parts['label']]!r} but lies in the "
                f"{config.CLASS_NAMES[label]!r} folder; move it to the folder its name says"
            )
        rows.append({"path": path, "name": name, "original_name": name,
                     "patient_id": parts["patient_id"], "label": label, "split": "train", "fold": fold})
    return rows


def _scan_fold(folder: Path) -> list[dict]:
    match = FOLD_NAME.match(folder.name)
    fold = int(match[1]) if match else None
    rows = []
    for class_name, label in config.CLASS_FOLDERS.items():
        class_dir = _child(folder, class_name)
        if class_dir is None:
            found = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise DatasetError(
                f"missing class folder {folder / class_name}: a fold holds 'all' (leukemic blasts) and "
                f"'hem' (normal cells); found {found or 'no sub-folders'}; rename or add the folder"
            )
        rows += _scan_class_folder(class_dir, label, fold)
    unknown = [p.name for p in folder.iterdir()
               if p.is_dir() and p.name.lower() not in config.CLASS_FOLDERS and not p.name.startswith(".")]
    if unknown:
        raise DatasetError(
            f"unexpected folder(s) {unknown} in {folder}: only 'all' and 'hem' belong there; "
            "rename them to all/hem or move them out"
        )
    _warn_unexpected(folder, Path.is_dir, "the class folders 'all' and 'hem'")
    return rows


def _scan_training(folder: Path) -> list[dict]:
    folds = sorted((p for p in folder.iterdir() if p.is_dir() and FOLD_NAME.match(p.name)),
                   key=lambda p: int(FOLD_NAME.match(p.name)[1]))
    if not folds:
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        raise DatasetError(f"no fold_N folders in {folder} (found {found or 'nothing'}); {_LAYOUT_HINT}")
    _warn_unexpected(folder, lambda p: p in folds, "fold_N folders (fold_0, fold_1, …)")
    return [row for fold in folds for row in _scan_fold(fold)]


def _read_validation_labels(csv_path: Path) -> pd.DataFrame:
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"validation labels not found: {csv_path}; put {config.VALIDATION_LABELS_CSV} from the Kaggle "
            f"download in {csv_path.parent} (labels are joined by file name, never guessed)"
        )
    try:
        labels = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read the labels CSV {csv_path}: {error}; restore it from the download") from None
    labels.columns = [str(c).strip() for c in labels.columns]
    expected = list(config.VALIDATION_LABEL_COLUMNS)
    if sorted(labels.columns) != sorted(expected):
        raise DatasetError(
            f"labels CSV {csv_path} has columns {list(labels.columns)}; expected exactly {expected} "
            "(Patient_ID = original file name, new_names = renamed file, labels = 1 all / 0 hem)"
        )
    labels = labels.apply(lambda column: column.str.strip())
    bad = labels[~labels["labels"].isin(["0", "1"])]
    if len(bad):
        raise DatasetError(
            f"labels CSV {csv_path}: 'labels' must be 1 (all) or 0 (hem); row(s) "
            f"{', '.join(bad['new_names'].head(5))} hold {sorted(set(bad['labels']))[:5]}; fix those rows"
        )
    for column in ("new_names", "Patient_ID"):
        duplicated = labels[column][labels[column].str.lower().duplicated(keep=False)]
        if len(duplicated):
            raise DatasetError(
                f"labels CSV {csv_path}: duplicate {column} {sorted(set(duplicated))[:5]}; each cell must "
                "appear once; restore the CSV from the download"
            )
    for _, row in labels.iterrows():
        parts = parse_cell_name(row["Patient_ID"])
        if parts is not None and parts["label"] != int(row["labels"]):
            raise DatasetError(
                f"labels CSV {csv_path}: {row['new_names']} is labelled {row['labels']} but its original "
                f"name {row['Patient_ID']} says {config.CLASS_NAMES[parts['label']]!r}; the CSV is damaged"
            )
    return labels


def _scan_validation(images_dir: Path, csv_path: Path) -> list[dict]:
    labels = _read_validation_labels(csv_path)
    images = [Path(p) for p in _list_images(images_dir)]
    if not images:
        raise DatasetError(f"no images in the validation folder {images_dir}; copy the renamed cells (1.bmp …) there")
    by_name = {p.name.lower(): p for p in images}
    by_stem: dict[str, list[Path]] = {}
    for path in images:
        by_stem.setdefault(path.stem.lower(), []).append(path)
    duplicated = [paths for paths in by_stem.values() if len(paths) > 1]
    if duplicated:
        raise DatasetError(
            f"duplicate cells in {images_dir}: {[p.name for p in duplicated[0]]} share a name but differ in "
            "extension; keep one copy of each cell"
        )
    rows, missing, by_stem_count, used = [], [], 0, set()
    for _, row in labels.iterrows():
        new_name = row["new_names"]
        path = by_name.get(new_name.lower())
        if path is None:  # users who convert BMP to PNG keep the CSV's 1.bmp: match on the stem
            stem_matches = by_stem.get(Path(new_name).stem.lower(), [])
            path = stem_matches[0] if stem_matches else None
            by_stem_count += path is not None
        if path is None:
            missing.append(new_name)
            continue
        if path in used:  # two CSV rows (e.g. 1.bmp and 1.png) would label one image twice
            raise DatasetError(
                f"{csv_path} has two rows for the image {path.name} in {images_dir} (one is {new_name!r}); "
                "each image needs exactly one row: remove the extra row"
            )
        used.add(path)
        parts = parse_cell_name(row["Patient_ID"])
        rows.append({"path": str(path), "name": path.name, "original_name": row["Patient_ID"],
                     "patient_id": parts["patient_id"] if parts else "", "label": int(row["labels"]),
                     "split": "validation", "fold": None})
    unlabeled = [p.name for p in images if p not in used]
    if unlabeled:
        raise DatasetError(
            f"{len(unlabeled)} image(s) in {images_dir} have no row in {csv_path} (e.g. {', '.join(unlabeled[:5])}); "
            "the CSV is missing rows: restore it from the download or remove those images"
        )
    if missing:
        raise DatasetError(
            f"{len(missing)} row(s) of {csv_path} name images that are not in {images_dir} "
            f"(e.g. {', '.join(missing[:5])}); copy the missing images or use the CSV that came with these images"
        )
    unparsed = [row["original_name"] for row in rows if not row["patient_id"]]
    if unparsed:
        warnings.warn(
            f"{len(unparsed)} row(s) of {csv_path} have a Patient_ID that is not a C-NMC cell name "
            f"(e.g. {', '.join(unparsed[:5])}; expected UID_<patient>_<image>_<cell>_<all|hem>.bmp): those cells "
            "have no patient id, so their labels cannot be checked against the name, and an evaluation that "
            "includes them resamples cells instead of patients for its intervals; restore the CSV from the download",
            stacklevel=3,
        )
    if by_stem_count:
        warnings.warn(
            f"{by_stem_count} validation image(s) in {images_dir} matched their CSV row by name without the "
            "extension (e.g. the CSV says 1.bmp, the folder holds 1.png)", stacklevel=3,
        )
    return rows


def _scan_testing(images_dir: Path) -> list[dict]:
    images = [Path(p) for p in _list_images(images_dir)]
    if not images:
        raise DatasetError(f"no images in the testing folder {images_dir}; copy the cells (1.bmp …) there")
    return [{"path": str(p), "name": p.name, "original_name": p.name, "patient_id": "",
             "label": None, "split": "test", "fold": None} for p in images]


def _locate(path: Path) -> tuple[Path, str]:
    """Classify ``path`` as a part of the layout: (folder, kind)."""
    name = path.name.lower()
    if name == config.VALIDATION_IMAGES_DIR.lower():
        return path, "validation_images"
    if name == config.VALIDATION_DIR.lower():
        return path, "validation"
    if name == config.TESTING_IMAGES_DIR.lower():
        return path, "testing_images"
    if name == config.TESTING_DIR.lower():
        return path, "testing"
    if name == config.TRAINING_DIR.lower():
        return path, "training"
    if FOLD_NAME.match(path.name):
        return path, "fold"
    if name in config.CLASS_FOLDERS:
        return path, "class"
    if any(_child(path, part) for part in (config.TRAINING_DIR, config.VALIDATION_DIR, config.TESTING_DIR)):
        return path, "root"
    nested = _child(path, config.DATASET_FOLDER_NAME)
    if nested is not None:  # the folder the download was unpacked into
        return _locate(nested)
    if _child(path, "all") and _child(path, "hem"):
        return path, "fold"
    found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))[:8]
    raise DatasetError(f"{path} is not part of a C-NMC dataset (it holds {found or 'nothing'}); {_LAYOUT_HINT}")


def _dataset_root(folder: Path, kind: str) -> Path:
    levels = {"root": 0, "training": 1, "validation": 1, "testing": 1, "fold": 2,
              "validation_images": 2, "testing_images": 2, "class": 3}[kind]
    root = folder
    for _ in range(levels):
        root = root.parent
    return root


def _resolve(path: str | os.PathLike) -> Path:
    folder = Path(utf8_path(Path(path).expanduser().resolve()))
    if not folder.exists():
        raise FileNotFoundError(
            f"dataset folder not found: {folder}; download 'leukemia-classification' from Kaggle and unpack it "
            f"into {config.INPUT_DIR}, or make a synthetic one with `python -m modules synth`"
        )
    if not folder.is_dir():
        raise DatasetError(f"{folder} is a file; pass the dataset folder (C-NMC_Leukemia or a folder inside it)")
    return folder


def scan_dataset(path: str | os.PathLike) -> pd.DataFrame:
    """Build the manifest: one row per image under ``path``.

    Args:
        path: The ``C-NMC_Leukemia`` root, the folder it was unpacked into, or any folder
            inside the layout (``training_data``, ``fold_N``, a class folder, the
            validation or testing folder).

    Returns:
        DataFrame with columns ``path, name, original_name, patient_id, label, split, fold``
        sorted by split (train, validation, test), fold and path. ``attrs`` holds
        ``dataset`` (see ``dataset_name``), ``source`` and ``synthetic``.

    Raises:
        FileNotFoundError: The folder or the validation labels CSV does not exist.
        DatasetError: The layout, a file name or the labels CSV is wrong (the message says how).
    """
    from modules.data.synthetic import is_synthetic

    folder, kind = _locate(_resolve(path))
    rows: list[dict] = []
    if kind == "root":
        parts = {p: _child(folder, p) for p in (config.TRAINING_DIR, config.VALIDATION_DIR, config.TESTING_DIR)}
        _warn_unexpected(folder, lambda p: p in parts.values() or p.name == config.SYNTHETIC_MARKER,
                         f"{config.TRAINING_DIR}, {config.VALIDATION_DIR} and {config.TESTING_DIR}")
        if parts[config.TRAINING_DIR]:
            rows += _scan_training(parts[config.TRAINING_DIR])
        if parts[config.VALIDATION_DIR]:
            rows += _scan_validation_part(parts[config.VALIDATION_DIR])
        if parts[config.TESTING_DIR]:
            rows += _scan_testing_part(parts[config.TESTING_DIR])
    elif kind == "training":
        rows = _scan_training(folder)
    elif kind == "fold":
        rows = _scan_fold(folder)
    elif kind == "class":
        match = FOLD_NAME.match(folder.parent.name)
        rows = _scan_class_folder(folder, config.CLASS_FOLDERS[folder.name.lower()], int(match[1]) if match else None)
    elif kind == "validation":
        rows = _scan_validation_part(folder)
    elif kind == "validation_images":
        rows = _scan_validation(folder, folder.parent / config.VALIDATION_LABELS_CSV)
    elif kind == "testing":
        rows = _scan_testing_part(folder)
    else:
        rows = _scan_testing(folder)
    table = _to_frame(rows)
    _check_duplicates(table)
    table.attrs.update({"dataset": dataset_name(folder), "source": str(folder), "synthetic": is_synthetic(folder),
                        "rows": len(table)})
    return table


def _scan_validation_part(folder: Path) -> list[dict]:
    images_dir = _child(folder, config.VALIDATION_IMAGES_DIR)
    if images_dir is None:
        raise DatasetError(f"missing {folder / config.VALIDATION_IMAGES_DIR}; {_LAYOUT_HINT}")
    return _scan_validation(images_dir, folder / config.VALIDATION_LABELS_CSV)


def _scan_testing_part(folder: Path) -> list[dict]:
    images_dir = _child(folder, config.TESTING_IMAGES_DIR)
    if images_dir is None:
        raise DatasetError(f"missing {folder / config.TESTING_IMAGES_DIR}; {_LAYOUT_HINT}")
    return _scan_testing(images_dir)


def _to_frame(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=list(config.MANIFEST_COLUMNS))
    for column in ("path", "name", "original_name", "patient_id", "split"):
        table[column] = table[column].astype(str)
    table["label"] = pd.array(table["label"].tolist(), dtype="Int8")
    table["fold"] = pd.array(table["fold"].tolist(), dtype="Int8")
    table = table.sort_values(["split", "fold", "path"], key=lambda c: c.map(SPLIT_ORDER) if c.name == "split" else c,
                              na_position="last", kind="stable")
    return table.reset_index(drop=True)


def _check_duplicates(table: pd.DataFrame) -> None:
    """One cell must not appear twice in a split (copied into two folds, or as .bmp and .png).

    The same cell in two splits (say, training and validation) is a leak rather than a layout
    error: it is reported as a warning.
    """
    keys = pd.Series([os.path.splitext(n)[0].lower() for n in table["original_name"]], index=table.index)
    keys = keys.where(table["split"] != "test", table["path"])  # testing cells have no original name
    duplicated = table[(keys + "|" + table["split"]).duplicated(keep=False)]
    if len(duplicated):
        first = keys[duplicated.index[0]]
        paths = table.loc[keys == first, "path"].tolist()
        raise DatasetError(
            f"duplicate cell {first!r} at {paths}: each cell must appear once (same name in two folders, or "
            "the same cell as .bmp and .png); delete the extra copies"
        )
    shared = table[keys.duplicated(keep=False)]
    if len(shared):
        examples = sorted(set(keys[shared.index]))[:5]
        warnings.warn(
            f"{len(shared)} cells appear in more than one split (e.g. {', '.join(examples)}): results on the "
            "later split would be optimistic; remove the copies from one of them", stacklevel=3,
        )


def dataset_name(path: str | os.PathLike) -> str:
    """Short, filesystem-safe name of the dataset part at ``path``.

    The root folder's name plus the part scanned, lower-case: ``c-nmc_leukemia``,
    ``c-nmc_leukemia_fold_0``, ``c-nmc_leukemia_fold_0_all``, ``c-nmc_leukemia_validation``;
    synthetic datasets are prefixed ``synthetic_`` so that their caches never mix with real ones.

    Args:
        path: A folder ``scan_dataset`` accepts.

    Returns:
        The name.
    """
    from modules.data.synthetic import is_synthetic

    folder, kind = _locate(_resolve(path))
    root = _dataset_root(folder, kind)
    part = {
        "root": "", "training": "train", "validation": "validation", "validation_images": "validation",
        "testing": "test", "testing_images": "test", "fold": folder.name,
        "class": f"{folder.parent.name}_{folder.name}",
    }[kind]
    if kind == "fold" and root == folder.parent:  # a bare folder with all/ and hem/
        root, part = folder, ""
    name = "_".join(p for p in (root.name, part) if p).lower()
    name = re.sub(r"[^a-z0-9_.-]+", "-", name).strip("-.") or "dataset"
    return f"synthetic_{name}" if is_synthetic(folder) else name


def summarize(table: pd.DataFrame, by: str = "label") -> pd.DataFrame:
    """Count cells per class, patient or fold.

    Args:
        table: A manifest from ``scan_dataset``.
        by: ``"label"``, ``"patient_id"`` or ``"fold"``.

    Returns:
        One row per split and value of ``by``, with ``cells``, ``all``, ``hem``, ``unlabeled``
        and (except ``by="patient_id"``) ``patients``.
    """
    if by not in ("label", "patient_id", "fold"):
        raise ValueError(f"summarize: by must be 'label', 'patient_id' or 'fold', not {by!r}")
    frame = table.assign(
        all=(table["label"] == 1).fillna(False).astype(int),
        hem=(table["label"] == 0).fillna(False).astype(int),
        unlabeled=table["label"].isna().astype(int),
        class_name=table["label"].map(config.CLASS_NAMES, na_action="ignore").fillna("unlabeled").astype(str),
    )
    key = "class_name" if by == "label" else by
    aggregations = {"cells": ("path", "size"), "all": ("all", "sum"), "hem": ("hem", "sum"),
                    "unlabeled": ("unlabeled", "sum")}
    if by != "patient_id":
        aggregations["patients"] = ("patient_id", lambda ids: ids[ids != ""].nunique())
    summary = frame.groupby(["split", key], dropna=False, sort=False).agg(**aggregations).reset_index()
    summary = summary.rename(columns={"class_name": "class"})
    order = summary["split"].map(SPLIT_ORDER)
    summary = summary.assign(_order=order).sort_values(
        ["_order", summary.columns[1]], kind="stable",
        key=lambda c: patient_sort_key(c) if c.name == "patient_id" else c)
    return summary.drop(columns="_order").reset_index(drop=True)


def patient_sort_key(ids: pd.Series) -> pd.Series:
    """Key for ``sort_values`` that orders patient ids by number: 1, 3, 11, …, H1, H6, H11."""
    return ids.astype(str).str.replace(r"\d+", lambda m: m.group().zfill(9), regex=True)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest CSV written by ``scan`` or ``prepare_arrays`` with its dtypes.

    Args:
        path: The CSV file.

    Returns:
        The manifest table (``label`` and ``fold`` nullable Int8, the rest strings), with
        ``DIGEST_COLUMN`` when the file has it (the arrays' manifest).
    """
    table = pd.read_csv(path, dtype={**{c: str for c, t in MANIFEST_DTYPES.items() if t is str}, DIGEST_COLUMN: str},
                        keep_default_na=False, na_values={"label": [""], "fold": [""]})
    missing = [c for c in config.MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{path} is not a manifest (missing columns {missing}); "
                           "write it with `python -m modules scan`")
    table = table[[*config.MANIFEST_COLUMNS, *([DIGEST_COLUMN] if DIGEST_COLUMN in table else [])]]
    return table.astype({"label": "Int8", "fold": "Int8"})


def write_manifest(table: pd.DataFrame, path: Path) -> Path:
    """Write a manifest CSV atomically (temporary name, then rename)."""
    from modules.files import write_csv_atomic

    return write_csv_atomic(table, path)
