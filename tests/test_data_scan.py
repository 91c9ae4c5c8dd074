"""Dataset discovery: the manifest table, the validation-label join and every bad layout."""
from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from modules import config
from modules.data.layout import DatasetError, dataset_name, read_manifest, scan_dataset, summarize, write_manifest

COLUMNS = list(config.MANIFEST_COLUMNS)


def write_cell(path: Path, value: int = 90) -> Path:
    """A small RGB 'cell' (a square on black) written in the format the suffix says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((24, 24, 3), np.uint8)
    image[6:18, 6:18] = (value, 40, value + 10)
    assert cv2.imwrite(str(path), image)
    return path


def make_fold(root: Path, fold: int = 0, cells: dict[str, list[str]] | None = None) -> Path:
    """training_data/fold_N/{all,hem} with a few cells of two patients each."""
    cells = cells or {"all": ["UID_11_1_1_all.bmp", "UID_11_1_2_all.bmp", "UID_12_3_1_all.bmp"],
                      "hem": ["UID_H10_1_1_hem.bmp", "UID_h3_2_1_hem.bmp"]}
    folder = root / config.TRAINING_DIR / f"fold_{fold}"
    for class_name, names in cells.items():
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_cell(folder / class_name / name)
    return folder


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_renamed_validation(source_root: Path, dest: Path, n_per_class: int = 20, seed: int = 0,
                            csv_extension: str = ".png") -> tuple[Path, dict[str, str]]:
    """A renamed, shuffled validation folder built from real training cells, like the Kaggle one.

    Returns the dataset root and {new name: sha256 of the original file}.
    """
    rng = np.random.default_rng(seed)
    originals = []
    for class_name in ("all", "hem"):
        files = sorted((source_root / "training_data" / "fold_0" / class_name).iterdir())
        picks = rng.choice(len(files), n_per_class, replace=False)
        originals += [files[i] for i in picks]
    order = rng.permutation(len(originals))
    images_dir = dest / config.VALIDATION_DIR / config.VALIDATION_IMAGES_DIR
    images_dir.mkdir(parents=True)
    rows, truth = [], {}
    for new_index, k in enumerate(order, start=1):
        original = originals[k]
        new_name = f"{new_index}{original.suffix}"
        shutil.copyfile(original, images_dir / new_name)
        truth[new_name] = file_digest(original)
        rows.append({"Patient_ID": original.with_suffix(".bmp").name, "new_names": f"{new_index}{csv_extension}",
                     "labels": 1 if original.name.endswith("_all.png") else 0})
    # The CSV lists cells in another order than 1, 2, 3…, so a positional join would scramble them.
    pd.DataFrame(rows).sort_values("Patient_ID").to_csv(
        dest / config.VALIDATION_DIR / config.VALIDATION_LABELS_CSV, index=False)
    return dest, truth


# ----------------------------------------------------------------------------- real cells

@pytest.mark.shared_data
def test_scan_real_png_fold(shared_cnmc):
    table = scan_dataset(shared_cnmc)
    assert list(table.columns) == COLUMNS
    assert len(table) == 3526
    assert table["patient_id"].nunique() == 28
    assert (table["split"] == "train").all() and (table["fold"] == 0).all()
    assert str(table["label"].dtype) == "Int8" and str(table["fold"].dtype) == "Int8"
    # Every label agrees with the class suffix of its file name and its folder.
    suffix = table["name"].str.extract(r"_(all|hem)\.png$")[0].map(config.CLASS_FOLDERS)
    assert (table["label"].astype(int) == suffix).all()
    assert (table["path"].map(lambda p: Path(p).parent.name).map(config.CLASS_FOLDERS) == table["label"]).all()
    assert table["path"].map(lambda p: Path(p).is_absolute()).all()
    assert table["path"].tolist() == sorted(table["path"])
    assert table["patient_id"].str.fullmatch(r"H?\d+").all()
    counts = summarize(table, "label").set_index("class")["cells"]
    assert counts["all"] == 2396 and counts["hem"] == 1130
    assert table.attrs["dataset"] == "cnmc" and table.attrs["synthetic"] is False


@pytest.mark.shared_data
def test_scan_any_folder_inside_the_layout(shared_cnmc, shared_cnmc_bmp):
    fold = shared_cnmc / "training_data" / "fold_0"
    assert len(scan_dataset(fold)) == 3526
    hem = scan_dataset(fold / "hem")
    assert len(hem) == 1130 and (hem["label"] == 0).all() and (hem["fold"] == 0).all()
    assert dataset_name(fold) == "cnmc_fold_0"
    assert dataset_name(fold / "hem") == "cnmc_fold_0_hem"
    bmp = scan_dataset(shared_cnmc_bmp)
    assert len(bmp) == 40 and bmp["name"].str.endswith(".bmp").all()
    assert dataset_name(shared_cnmc_bmp / "training_data") == "cnmc_bmp_train"


@pytest.mark.shared_data
@pytest.mark.parametrize("csv_extension", [".png", ".bmp"])
def test_validation_labels_joined_by_name_on_renamed_shuffled_real_cells(shared_cnmc, tmp_path, csv_extension):
    root, truth = make_renamed_validation(shared_cnmc, tmp_path / "C-NMC_Leukemia", csv_extension=csv_extension)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = scan_dataset(root)
    assert len(table) == 40 and (table["split"] == "validation").all()
    # The label of every renamed file matches the _all/_hem suffix of its original name…
    suffix = table["original_name"].str.extract(r"_(all|hem)\.bmp$")[0].map(config.CLASS_FOLDERS)
    assert (table["label"].astype(int) == suffix).all()
    # …and the original name belongs to the very file on disk (content check, not just labels).
    for row in table.itertuples():
        original = shared_cnmc / "training_data" / "fold_0" / row.original_name.rsplit("_", 1)[1][:3] / \
            row.original_name.replace(".bmp", ".png")
        assert truth[row.name] == file_digest(original) == file_digest(row.path)
    assert table["patient_id"].str.fullmatch(r"H?\d+").all()
    matched_by_stem = [w for w in caught if "without the extension" in str(w.message)]
    assert bool(matched_by_stem) == (csv_extension == ".bmp")


# ----------------------------------------------------------------------------- synthetic tree

def test_scan_synthetic_root_all_parts(synthetic_root):
    table = scan_dataset(synthetic_root)
    assert list(table.columns) == COLUMNS
    assert list(dict.fromkeys(table["split"])) == ["train", "validation", "test"]
    train, val, test = (table[table["split"] == s] for s in ("train", "validation", "test"))
    assert set(train["fold"]) == {0, 1, 2}
    assert val["fold"].isna().all() and test["fold"].isna().all()
    assert test["label"].isna().all() and (test["patient_id"] == "").all()
    suffix = val["original_name"].str.extract(r"_(all|hem)\.bmp$")[0].map(config.CLASS_FOLDERS)
    assert (val["label"].astype(int) == suffix).all()
    assert (val["name"] != val["original_name"]).all()
    assert train["patient_id"].str.fullmatch(r"H?\d+").all()  # lower-case h written upper-case
    assert table.attrs["synthetic"] is True
    assert dataset_name(synthetic_root) == "synthetic_c-nmc_leukemia"
    assert dataset_name(synthetic_root / "validation_data") == "synthetic_c-nmc_leukemia_validation"
    by_fold = summarize(table, "fold")
    assert by_fold["cells"].sum() == len(table)
    by_patient = summarize(table, "patient_id")
    assert by_patient["cells"].sum() == len(table)


def test_manifest_round_trip_keeps_dtypes(synthetic_root, tmp_path):
    table = scan_dataset(synthetic_root)
    path = write_manifest(table, tmp_path / "csv" / "m.csv")
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert str(back["label"].dtype) == "Int8" and back["patient_id"].map(type).eq(str).all()
    assert not list(tmp_path.rglob("*.partial*"))


def test_lowercase_patient_and_parts(tmp_path):
    make_fold(tmp_path / "C-NMC_Leukemia")
    table = scan_dataset(tmp_path)  # the folder the download was unpacked into
    assert sorted(table["patient_id"].unique()) == ["11", "12", "H10", "H3"]
    assert table.attrs["dataset"] == "c-nmc_leukemia"
    assert summarize(table, "label").set_index("class").loc["all", "patients"] == 2


# ----------------------------------------------------------------------------- bad input

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not_there"):
        scan_dataset(tmp_path / "not_there")


def test_folder_outside_the_layout(tmp_path):
    write_cell(tmp_path / "pictures" / "cell.png")
    with pytest.raises(DatasetError, match="not part of a C-NMC dataset"):
        scan_dataset(tmp_path / "pictures")


def test_misnamed_class_folder(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root, cells={"all": ["UID_11_1_1_all.bmp"], "normal": ["UID_H10_1_1_hem.bmp"]})
    with pytest.raises(DatasetError, match=r"missing class folder .*hem"):
        scan_dataset(root)


def test_unexpected_extra_class_folder(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root)
    write_cell(root / "training_data" / "fold_0" / "unsure" / "UID_11_9_9_all.bmp")
    with pytest.raises(DatasetError, match="unsure"):
        scan_dataset(root)


def test_misnamed_training_folder(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    write_cell(root / "training_data" / "fold0" / "all" / "UID_11_1_1_all.bmp")
    with pytest.raises(DatasetError, match="no fold_N folders"):
        scan_dataset(root)


def test_empty_class_folder(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root, cells={"all": ["UID_11_1_1_all.bmp"], "hem": []})
    with pytest.raises(DatasetError, match=r"empty class folder .*hem"):
        scan_dataset(root)


def test_file_name_without_patient(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root, cells={"all": ["UID_11_1_1_all.bmp", "IMG_0001.bmp"], "hem": ["UID_H1_1_1_hem.bmp"]})
    with pytest.raises(DatasetError, match="IMG_0001.bmp"):
        scan_dataset(root)


def test_cell_in_the_wrong_class_folder(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root, cells={"all": ["UID_11_1_1_all.bmp", "UID_H1_1_2_hem.bmp"], "hem": ["UID_H1_1_1_hem.bmp"]})
    with pytest.raises(DatasetError, match="UID_H1_1_2_hem.bmp.*'hem'"):
        scan_dataset(root)


def test_duplicate_cell_across_folds(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root, 0)
    make_fold(root, 1, cells={"all": ["UID_11_1_1_all.bmp"], "hem": ["UID_H9_1_1_hem.bmp"]})
    with pytest.raises(DatasetError, match=r"duplicate cell 'uid_11_1_1_all'.*fold_0.*fold_1"):
        scan_dataset(root)


def test_duplicate_cell_as_bmp_and_png(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root, cells={"all": ["UID_11_1_1_all.bmp", "UID_11_1_1_all.png"], "hem": ["UID_H1_1_1_hem.bmp"]})
    with pytest.raises(DatasetError, match="duplicate cell"):
        scan_dataset(root)


def test_non_image_file_is_reported_not_silently_dropped(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root)
    (root / "training_data" / "fold_0" / "all" / "notes.txt").write_text("x")
    with pytest.warns(UserWarning, match="notes.txt"):
        table = scan_dataset(root)
    assert len(table) == 5


def test_extensions_in_any_case(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root, cells={"all": ["UID_11_1_1_all.BMP", "UID_11_1_2_all.Png", "UID_11_1_3_all.jpg"],
                           "hem": ["UID_H1_1_1_hem.TIF", "UID_H1_1_2_hem.jpeg", "UID_H1_1_3_hem.tiff"]})
    assert len(scan_dataset(root)) == 6


def _validation_tree(tmp_path: Path, n: int = 6) -> Path:
    root = tmp_path / "C-NMC_Leukemia"
    images = root / config.VALIDATION_DIR / config.VALIDATION_IMAGES_DIR
    rows = []
    for i in range(1, n + 1):
        write_cell(images / f"{i}.bmp")
        label = i % 2
        rows.append({"Patient_ID": f"UID_{'5' if label else 'H5'}_{i}_1_{'all' if label else 'hem'}.bmp",
                     "new_names": f"{i}.bmp", "labels": label})
    pd.DataFrame(rows).to_csv(root / config.VALIDATION_DIR / config.VALIDATION_LABELS_CSV, index=False)
    return root


def _csv(root: Path) -> Path:
    return root / config.VALIDATION_DIR / config.VALIDATION_LABELS_CSV


def test_validation_csv_missing(tmp_path):
    root = _validation_tree(tmp_path)
    _csv(root).unlink()
    with pytest.raises(FileNotFoundError, match=config.VALIDATION_LABELS_CSV):
        scan_dataset(root)


def test_validation_csv_missing_rows(tmp_path):
    root = _validation_tree(tmp_path)
    labels = pd.read_csv(_csv(root))
    labels[labels["new_names"] != "4.bmp"].to_csv(_csv(root), index=False)
    with pytest.raises(DatasetError, match=r"have no row in .*labels.csv \(e.g. 4.bmp\)"):
        scan_dataset(root)


def test_validation_csv_extra_rows(tmp_path):
    root = _validation_tree(tmp_path)
    labels = pd.read_csv(_csv(root))
    extra = pd.DataFrame([{"Patient_ID": "UID_5_99_1_all.bmp", "new_names": "99.bmp", "labels": 1}])
    pd.concat([labels, extra]).to_csv(_csv(root), index=False)
    with pytest.raises(DatasetError, match=r"name images that are not in .*99.bmp"):
        scan_dataset(root)


@pytest.mark.parametrize("columns", [["Patient_ID", "new_names"], ["Patient_ID", "new_name", "labels"],
                                     ["Patient_ID", "new_names", "labels", "extra"]])
def test_validation_csv_wrong_columns(tmp_path, columns):
    root = _validation_tree(tmp_path)
    labels = pd.read_csv(_csv(root)).rename(columns={"new_names": columns[1]})
    labels["extra"] = 0
    labels[columns].to_csv(_csv(root), index=False)
    with pytest.raises(DatasetError, match="expected exactly"):
        scan_dataset(root)


def test_validation_csv_bad_label_and_contradiction(tmp_path):
    root = _validation_tree(tmp_path)
    labels = pd.read_csv(_csv(root), dtype=str)
    labels.loc[0, "labels"] = "2"
    labels.to_csv(_csv(root), index=False)
    with pytest.raises(DatasetError, match="must be 1 .all. or 0"):
        scan_dataset(root)
    labels.loc[0, "labels"] = "0"  # row 1.bmp is UID_5_…_all: a contradiction
    labels.to_csv(_csv(root), index=False)
    with pytest.raises(DatasetError, match="1.bmp is labelled 0"):
        scan_dataset(root)


def test_validation_duplicate_new_names(tmp_path):
    root = _validation_tree(tmp_path)
    labels = pd.read_csv(_csv(root))
    labels.loc[1, "new_names"] = "1.bmp"
    labels.to_csv(_csv(root), index=False)
    with pytest.raises(DatasetError, match="duplicate new_names"):
        scan_dataset(root)


def test_validation_two_rows_for_one_image_by_extension(tmp_path):
    # "1.bmp" matches exactly and "1.png" by its stem: one image must not get two labels.
    root = _validation_tree(tmp_path)
    labels = pd.read_csv(_csv(root))
    extra = pd.DataFrame([{"Patient_ID": "UID_H5_77_1_hem.bmp", "new_names": "1.png", "labels": 0}])
    pd.concat([labels, extra]).to_csv(_csv(root), index=False)
    with pytest.raises(DatasetError, match=r"two rows for the image 1.bmp"):
        scan_dataset(root)


def test_validation_images_folder_scanned_directly(tmp_path):
    root = _validation_tree(tmp_path)
    table = scan_dataset(root / config.VALIDATION_DIR / config.VALIDATION_IMAGES_DIR)
    assert table["name"].tolist() == sorted(f"{i}.bmp" for i in range(1, 7))
    assert (table["label"] == table["name"].str.extract(r"(\d+)")[0].astype(int) % 2).all()


def test_same_cell_in_training_and_validation_is_a_warning(tmp_path):
    root = _validation_tree(tmp_path)
    make_fold(root, cells={"all": ["UID_5_1_1_all.bmp"], "hem": ["UID_H7_1_1_hem.bmp"]})  # 1.bmp's original
    with pytest.warns(UserWarning, match="more than one split.*uid_5_1_1_all"):
        table = scan_dataset(root)
    assert len(table) == 8


@pytest.mark.parametrize("where, entry", [
    ("training_data", "fold_0_old/all/UID_99_1_1_all.bmp"),  # a folder that is not fold_N
    ("training_data", "UID_98_1_1_all.bmp"),                 # a cell directly in training_data
    ("training_data/fold_0", "UID_97_1_1_all.bmp"),          # a cell beside all/ and hem/
    ("", "extra_cells/UID_96_1_1_all.bmp"),                  # a folder beside training_data
])
def test_entries_outside_the_layout_are_reported_not_silently_dropped(tmp_path, where, entry):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root)
    write_cell(root / where / entry)
    first = entry.split("/")[0]
    with pytest.warns(UserWarning, match=rf"ignoring 1 entry that is not part of the C-NMC layout \({first}/?\)"):
        table = scan_dataset(root)
    assert len(table) == 5  # the layout's own cells, and the warning says what was left out


def test_loose_cell_warning_says_where_it_belongs(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root)
    write_cell(root / "training_data" / "fold_0" / "UID_97_1_1_all.bmp")
    with pytest.warns(UserWarning, match="1 of them are images: move each cell into the class folder"):
        scan_dataset(root)


def test_clean_layout_gives_no_warning(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    make_fold(root)
    (root / "training_data" / "fold_0" / ".DS_Store").write_text("x")  # hidden entries are not data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(scan_dataset(root)) == 5


def test_validation_row_without_a_cell_name_is_reported(tmp_path):
    root = _validation_tree(tmp_path)
    labels = pd.read_csv(_csv(root))
    labels.loc[labels["new_names"] == "2.bmp", "Patient_ID"] = "cell_0002.bmp"
    labels.to_csv(_csv(root), index=False)
    with pytest.warns(UserWarning, match=r"1 row\(s\) of .* Patient_ID that is not a C-NMC cell name .*cell_0002"):
        table = scan_dataset(root)
    assert table.set_index("name").loc["2.bmp", "patient_id"] == ""
