"""Find C-NMC 2019 images in the Kaggle layout and describe them in one manifest table.

``scan_dataset`` takes the ``C-NMC_Leukemia`` root or any folder inside it and returns one row per
image (``config.MANIFEST_COLUMNS``); validation labels are joined to the images by file name, never by position.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pandas as pd

from modules import config
from modules.files import write_csv_atomic


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
#: Folder names of the layout's parts (lower case) and the kind ``_locate`` gives them (fold_N: "fold").
PART_KINDS = {config.VALIDATION_IMAGES_DIR.lower(): "validation_images", config.VALIDATION_DIR.lower(): "validation",
              config.TESTING_IMAGES_DIR.lower(): "testing_images", config.TESTING_DIR.lower(): "testing",
              config.TRAINING_DIR.lower(): "training", **dict.fromkeys(config.CLASS_FOLDERS, "class")}
#: How many levels below the dataset root each kind of folder lies.
KIND_DEPTH = {"root": 0, "training": 1, "validation": 1, "testing": 1, "fold": 2, "validation_images": 2,
              "testing_images": 2, "class": 3}

write_manifest = write_csv_atomic  # a manifest CSV, written atomically


def _child(folder: Path, name: str) -> Path | None:
    """The sub-folder called ``name``, matched case-insensitively."""
    if (folder / name).is_dir():
        return folder / name
    return next((p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name.lower()), None)


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_FILES


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in config.IMAGE_EXTENSIONS


def _fold_number(folder: Path) -> int | None:
    match = FOLD_NAME.match(folder.name)
    return int(match[1]) if match else None


def _list_images(folder: Path, empty: str) -> list[str]:
    """Paths of the image files directly in ``folder``, sorted by name; other entries are warned about, and none
    raises DatasetError(``empty``)."""
    images, others = [], []
    with os.scandir(folder) as entries:  # scandir: no stat per file, fast on 10,000-file folders
        for entry in sorted(entries, key=lambda e: e.name):
            if _is_junk(entry.name):
                continue
            if _is_image_name(entry.name) and entry.is_file():
                images.append(utf8_path(os.path.join(folder, entry.name)))
            else:
                others.append(entry.name + ("/" if entry.is_dir() else ""))
    if others:
        warn_ignored(folder, others, "not an image", f"; images must end in {', '.join(config.IMAGE_EXTENSIONS)}")
    if not images:
        raise DatasetError(empty)
    return images


def utf8_path(path: str | os.PathLike) -> str:
    """``path`` as a string, refused (odd bytes shown) when not UTF-8: no CSV or terminal could take it."""
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
    """Warn ``<folder>: ignoring N entries that are <reason> (<up to 5 names>)<advice>``."""
    listed = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
    one = len(names) == 1
    warnings.warn(f"{folder}: ignoring {len(names)} {noun[0] if one else noun[1]} that {'is' if one else 'are'} "
                  f"{reason} ({listed}){advice}", stacklevel=stacklevel)


def _warn_unexpected(folder: Path, belongs, what: str) -> None:
    """Warn about the entries of ``folder`` for which ``belongs(path)`` is false (hidden ones aside)."""
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                    if not _is_junk(p.name) and not belongs(p))
    if others:
        images = sum(map(_is_image_name, others))
        hint = f"; {images} of them are images: move each cell into the class folder its name says" if images else ""
        warn_ignored(folder, others, "not part of the C-NMC layout", f": only {what} are read there{hint}")


def parse_cell_name(name: str) -> dict | None:
    """``{"patient_id", "label"}`` of ``UID_<patient>_<image>_<cell>_<all|hem>.<ext>`` (patient id upper-cased,
    label 1/0), or None when the name does not follow the pattern."""
    match = CELL_NAME.match(os.path.splitext(name)[0])
    if match is None:
        return None
    return {"patient_id": match["patient"].upper(), "label": config.CLASS_FOLDERS[match["cls"].lower()]}


def _scan_class_folder(folder: Path, label: int, fold: int | None) -> list[dict]:
    images = _list_images(folder, f"empty class folder {folder}: it holds no images "
                                  f"({', '.join(config.IMAGE_EXTENSIONS)}); copy the cells of this class there or "
                                  "remove the folder")
    rows = []
    for path in images:
        name = os.path.basename(path)
        parts = parse_cell_name(name)
        if parts is None:
            raise DatasetError(f"cannot read the patient from the file name {path}: training cells must be named "
                               "UID_<patient>_<image>_<cell>_<all|hem>.<ext> as in the Kaggle download; rename it")
        if parts["label"] != label:
            raise DatasetError(f"{path} is named as {config.CLASS_NAMES[parts['label']]!r} but lies in the "
                               f"{config.CLASS_NAMES[label]!r} folder; move it to the folder its name says")
        rows.append({"path": path, "name": name, "original_name": name, "patient_id": parts["patient_id"],
                     "label": label, "split": "train", "fold": fold})
    return rows


def _scan_fold(folder: Path) -> list[dict]:
    classes = {name: _child(folder, name) for name in config.CLASS_FOLDERS}
    for name, class_dir in classes.items():
        if class_dir is None:
            found = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise DatasetError(f"missing class folder {folder / name}: a fold holds 'all' (leukemic blasts) and "
                               f"'hem' (normal cells); found {found or 'no sub-folders'}; rename or add the folder")
    unknown = [p.name for p in folder.iterdir()
               if p.is_dir() and p.name.lower() not in config.CLASS_FOLDERS and not p.name.startswith(".")]
    if unknown:
        raise DatasetError(f"unexpected folder(s) {unknown} in {folder}: only 'all' and 'hem' belong there; "
                           "rename them to all/hem or move them out")
    _warn_unexpected(folder, Path.is_dir, "the class folders 'all' and 'hem'")
    return [row for name, class_dir in classes.items()
            for row in _scan_class_folder(class_dir, config.CLASS_FOLDERS[name], _fold_number(folder))]


def _scan_training(folder: Path) -> list[dict]:
    folds = sorted((p for p in folder.iterdir() if p.is_dir() and FOLD_NAME.match(p.name)), key=_fold_number)
    if not folds:
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        raise DatasetError(f"no fold_N folders in {folder} (found {found or 'nothing'}); {_LAYOUT_HINT}")
    _warn_unexpected(folder, lambda p: p in folds, "fold_N folders (fold_0, fold_1, …)")
    return [row for fold in folds for row in _scan_fold(fold)]


def _read_validation_labels(csv_path: Path) -> pd.DataFrame:
    """The validation labels CSV, checked: its columns, 0/1 labels, no name twice, labels agreeing with names."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"validation labels not found: {csv_path}; put {config.VALIDATION_LABELS_CSV} from the "
                                f"Kaggle download in {csv_path.parent} (labels are joined by file name, never guessed)")
    try:
        labels = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read the labels CSV {csv_path}: {error}; restore it from the download") from None
    labels.columns = [str(c).strip() for c in labels.columns]
    expected = list(config.VALIDATION_LABEL_COLUMNS)
    if sorted(labels.columns) != sorted(expected):
        raise DatasetError(f"labels CSV {csv_path} has columns {list(labels.columns)}; expected exactly {expected} "
                           "(Patient_ID = original file name, new_names = renamed file, labels = 1 all / 0 hem)")
    labels = labels.apply(lambda column: column.str.strip())
    bad = labels[~labels["labels"].isin(["0", "1"])]
    if len(bad):
        raise DatasetError(f"labels CSV {csv_path}: 'labels' must be 1 (all) or 0 (hem); row(s) "
                           f"{', '.join(bad['new_names'].head(5))} hold {sorted(set(bad['labels']))[:5]}; "
                           "fix those rows")
    for column in ("new_names", "Patient_ID"):
        duplicated = labels[column][labels[column].str.lower().duplicated(keep=False)]
        if len(duplicated):
            raise DatasetError(f"labels CSV {csv_path}: duplicate {column} {sorted(set(duplicated))[:5]}; each cell "
                               "must appear once; restore the CSV from the download")
    for row in labels.itertuples():
        parts = parse_cell_name(row.Patient_ID)
        if parts is not None and parts["label"] != int(row.labels):
            raise DatasetError(f"labels CSV {csv_path}: {row.new_names} is labelled {row.labels} but its original "
                               f"name {row.Patient_ID} says {config.CLASS_NAMES[parts['label']]!r}; the CSV is damaged")
    return labels


def _scan_validation(images_dir: Path, csv_path: Path) -> list[dict]:
    labels = _read_validation_labels(csv_path)
    images = _images_in(images_dir, "validation", "the renamed cells (1.bmp …)")
    by_name, by_stem = {p.name.lower(): p for p in images}, {}
    for path in images:
        if (first := by_stem.setdefault(path.stem.lower(), path)) is not path:
            raise DatasetError(f"duplicate cells in {images_dir}: {[first.name, path.name]} share a name but differ "
                               "in extension; keep one copy of each cell")
    rows, missing, matched_by_stem, used = [], [], 0, set()
    for row in labels.itertuples():
        path = by_name.get(row.new_names.lower())
        if path is None:  # users who convert BMP to PNG keep the CSV's 1.bmp: match on the stem
            path = by_stem.get(Path(row.new_names).stem.lower())
            matched_by_stem += path is not None
        if path is None:
            missing.append(row.new_names)
            continue
        if path in used:  # two CSV rows (e.g. 1.bmp and 1.png) would label one image twice
            raise DatasetError(f"{csv_path} has two rows for the image {path.name} in {images_dir} (one is "
                               f"{row.new_names!r}); each image needs exactly one row: remove the extra row")
        used.add(path)
        parts = parse_cell_name(row.Patient_ID)
        rows.append({"path": str(path), "name": path.name, "original_name": row.Patient_ID, "split": "validation",
                     "patient_id": parts["patient_id"] if parts else "", "label": int(row.labels), "fold": None})
    unlabeled = [p.name for p in images if p not in used]
    if unlabeled:
        raise DatasetError(f"{len(unlabeled)} image(s) in {images_dir} have no row in {csv_path} (e.g. "
                           f"{', '.join(unlabeled[:5])}); the CSV is missing rows: restore it from the download or "
                           "remove those images")
    if missing:
        raise DatasetError(f"{len(missing)} row(s) of {csv_path} name images that are not in {images_dir} (e.g. "
                           f"{', '.join(missing[:5])}); copy the missing images or use the CSV that came with these "
                           "images")
    unparsed = [row["original_name"] for row in rows if not row["patient_id"]]
    if unparsed:
        warnings.warn(f"{len(unparsed)} row(s) of {csv_path} have a Patient_ID that is not a C-NMC cell name (e.g. "
                      f"{', '.join(unparsed[:5])}; expected UID_<patient>_<image>_<cell>_<all|hem>.bmp): those cells "
                      "have no patient id (labels unchecked, intervals by cell); restore the CSV from the download",
                      stacklevel=3)
    if matched_by_stem:
        warnings.warn(f"{matched_by_stem} validation image(s) in {images_dir} matched their CSV row by name without "
                      "the extension (e.g. the CSV says 1.bmp, the folder holds 1.png)", stacklevel=3)
    return rows


def _scan_testing(images_dir: Path) -> list[dict]:
    images = _images_in(images_dir, "testing", "the cells (1.bmp …)")
    return [{"path": str(p), "name": p.name, "original_name": p.name, "patient_id": "", "label": None,
             "split": "test", "fold": None} for p in images]


def _images_in(folder: Path, part: str, what: str) -> list[Path]:
    return [Path(p) for p in _list_images(folder, f"no images in the {part} folder {folder}; copy {what} there")]


def _images_dir(folder: Path, name: str) -> Path:
    images_dir = _child(folder, name)
    if images_dir is None:
        raise DatasetError(f"missing {folder / name}; {_LAYOUT_HINT}")
    return images_dir


def _scan_root(folder: Path) -> list[dict]:
    parts = {name: _child(folder, name) for name in (config.TRAINING_DIR, config.VALIDATION_DIR, config.TESTING_DIR)}
    _warn_unexpected(folder, lambda p: p in parts.values() or p.name == config.SYNTHETIC_MARKER,
                     f"{config.TRAINING_DIR}, {config.VALIDATION_DIR} and {config.TESTING_DIR}")
    return [row for name, part in parts.items() if part for row in SCANNERS[PART_KINDS[name.lower()]](part)]


SCANNERS = {
    "root": _scan_root, "training": _scan_training, "fold": _scan_fold,
    "class": lambda f: _scan_class_folder(f, config.CLASS_FOLDERS[f.name.lower()], _fold_number(f.parent)),
    "validation": lambda f: _scan_validation(_images_dir(f, config.VALIDATION_IMAGES_DIR),
                                             f / config.VALIDATION_LABELS_CSV),
    "validation_images": lambda f: _scan_validation(f, f.parent / config.VALIDATION_LABELS_CSV),
    "testing": lambda f: _scan_testing(_images_dir(f, config.TESTING_IMAGES_DIR)), "testing_images": _scan_testing,
}


def _locate(path: Path) -> tuple[Path, str]:
    """Classify ``path`` as a part of the layout: (folder, kind of ``KIND_DEPTH``)."""
    kind = "fold" if FOLD_NAME.match(path.name) else PART_KINDS.get(path.name.lower())
    if kind:
        return path, kind
    if any(_child(path, part) for part in (config.TRAINING_DIR, config.VALIDATION_DIR, config.TESTING_DIR)):
        return path, "root"
    nested = _child(path, config.DATASET_FOLDER_NAME)
    if nested is not None:  # the folder the download was unpacked into
        return _locate(nested)
    if _child(path, "all") and _child(path, "hem"):
        return path, "fold"
    found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))[:8]
    raise DatasetError(f"{path} is not part of a C-NMC dataset (it holds {found or 'nothing'}); {_LAYOUT_HINT}")


def _resolve(path: str | os.PathLike) -> Path:
    folder = Path(utf8_path(Path(path).expanduser().resolve()))
    if not folder.exists():
        raise FileNotFoundError(f"dataset folder not found: {folder}; download 'leukemia-classification' from Kaggle "
                                f"and unpack it into {config.INPUT_DIR}, or make a synthetic one with "
                                "`python -m modules synth`")
    if not folder.is_dir():
        raise DatasetError(f"{folder} is a file; pass the dataset folder (C-NMC_Leukemia or a folder inside it)")
    return folder


def scan_dataset(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest: one row per image under ``path`` (the root, the folder it was unpacked into, or any folder
    inside the layout), sorted by split, fold and path; ``attrs``: ``dataset``, ``source``, ``synthetic``, ``rows``."""
    from modules.data.synthetic import is_synthetic

    folder, kind = _locate(_resolve(path))
    table = pd.DataFrame(SCANNERS[kind](folder), columns=list(config.MANIFEST_COLUMNS)).astype(MANIFEST_DTYPES)
    table = table.sort_values(["split", "fold", "path"], key=lambda c: c.map(SPLIT_ORDER) if c.name == "split" else c,
                              na_position="last", kind="stable", ignore_index=True)
    _check_duplicates(table)
    table.attrs.update({"dataset": dataset_name(folder), "source": str(folder), "synthetic": is_synthetic(folder),
                        "rows": len(table)})
    return table


def _check_duplicates(table: pd.DataFrame) -> None:
    """One cell twice in a split (in two folds, or as .bmp and .png) is an error; in two splits, a warning."""
    keys = pd.Series([os.path.splitext(n)[0].lower() for n in table["original_name"]], index=table.index)
    keys = keys.where(table["split"] != "test", table["path"])  # testing cells have no original name
    duplicated = table[(keys + "|" + table["split"]).duplicated(keep=False)]
    if len(duplicated):
        first = keys[duplicated.index[0]]
        raise DatasetError(f"duplicate cell {first!r} at {table.loc[keys == first, 'path'].tolist()}: each cell must "
                           "appear once (same name in two folders, or the same cell as .bmp and .png); delete the "
                           "extra copies")
    shared = table[keys.duplicated(keep=False)]
    if len(shared):
        examples = sorted(set(keys[shared.index]))[:5]
        warnings.warn(f"{len(shared)} cells appear in more than one split (e.g. {', '.join(examples)}): results on "
                      "the later split would be optimistic; remove the copies from one of them", stacklevel=3)


def dataset_name(path: str | os.PathLike) -> str:
    """Short, filesystem-safe name of the dataset part at ``path``: the root's name and the part, lower-case
    (``c-nmc_leukemia_fold_0_all``), prefixed ``synthetic_`` for synthetic data so caches never mix."""
    from modules.data.synthetic import is_synthetic

    folder, kind = _locate(_resolve(path))
    depth = KIND_DEPTH[kind]
    root = folder.parents[depth - 1] if depth else folder
    part = {"root": "", "training": "train", "validation": "validation", "validation_images": "validation",
            "testing": "test", "testing_images": "test", "fold": folder.name,
            "class": f"{folder.parent.name}_{folder.name}"}[kind]
    if kind == "fold" and root == folder.parent:  # a bare folder with all/ and hem/
        root, part = folder, ""
    name = re.sub(r"[^a-z0-9_.-]+", "-", "_".join(p for p in (root.name, part) if p).lower()).strip("-.") or "dataset"
    return f"synthetic_{name}" if is_synthetic(folder) else name


def summarize(table: pd.DataFrame, by: str = "label") -> pd.DataFrame:
    """Cells per split and class, patient or fold (``by``): ``cells, all, hem, unlabeled`` and, except by
    patient, ``patients``."""
    if by not in ("label", "patient_id", "fold"):
        raise ValueError(f"summarize: by must be 'label', 'patient_id' or 'fold', not {by!r}")
    frame = table.assign(
        all=(table["label"] == 1).fillna(False).astype(int), hem=(table["label"] == 0).fillna(False).astype(int),
        unlabeled=table["label"].isna().astype(int),
        class_name=table["label"].map(config.CLASS_NAMES, na_action="ignore").fillna("unlabeled").astype(str))
    aggregations = {"cells": ("path", "size"), "all": ("all", "sum"), "hem": ("hem", "sum"),
                    "unlabeled": ("unlabeled", "sum")}
    if by != "patient_id":
        aggregations["patients"] = ("patient_id", lambda ids: ids[ids != ""].nunique())
    key = "class_name" if by == "label" else by
    summary = frame.groupby(["split", key], dropna=False, sort=False).agg(**aggregations).reset_index()
    summary = summary.rename(columns={"class_name": "class"})
    return summary.sort_values(["split", summary.columns[1]], kind="stable", ignore_index=True, key=lambda c: (
        c.map(SPLIT_ORDER) if c.name == "split" else patient_sort_key(c) if c.name == "patient_id" else c))


def patient_sort_key(ids: pd.Series) -> pd.Series:
    """Key for ``sort_values`` that orders patient ids by number: 1, 3, 11, …, H1, H6, H11."""
    return ids.astype(str).str.replace(r"\d+", lambda m: m.group().zfill(9), regex=True)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A manifest CSV written by ``scan`` or ``prepare_arrays`` with its dtypes (``label`` and ``fold`` nullable
    Int8, the rest strings), with ``DIGEST_COLUMN`` when the file has it."""
    table = pd.read_csv(path, dtype={**{c: str for c, t in MANIFEST_DTYPES.items() if t is str}, DIGEST_COLUMN: str},
                        keep_default_na=False, na_values={"label": [""], "fold": [""]})
    missing = [c for c in config.MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{path} is not a manifest (missing columns {missing}); write it with `python -m modules "
                           "scan`")
    table = table[[*config.MANIFEST_COLUMNS, *([DIGEST_COLUMN] if DIGEST_COLUMN in table else [])]]
    return table.astype({"label": "Int8", "fold": "Int8"})
