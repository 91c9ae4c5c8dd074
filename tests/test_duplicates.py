"""One cell filed under two subjects: found by scan, and kept on one side of every split and CV fold."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modules import config
from modules.cli import main
from modules.data import duplicates, layout, splits
from modules.data import folds as data_folds

#: Subjects of the shared fold_0 copied into two folds, as C-NMC files them (fold_0 subject 20's cells
#: reappear as fold_2 subject 21's): subject 1's first cell is copied as subject 3's, H6's as H7's.
LAYOUT = {"fold_0": {"all": ["1", "19", "17"], "hem": ["H6", "H11", "H16"]},
          "fold_1": {"all": ["3", "15", "11"], "hem": ["H7", "H19", "H17"]}}
CELLS = 4  # per subject: enough for two classes on each side, few enough to prepare in seconds
COPIES = {("1", "all", "fold_0"): ("3", "fold_1"), ("H6", "hem", "fold_0"): ("H7", "fold_1")}


@pytest.fixture(scope="module")
def duplicated_root(shared_cnmc, tmp_path_factory) -> Path:
    """A C-NMC_Leukemia tree of real cells in which two cells are also filed under another subject."""
    source = shared_cnmc / config.TRAINING_DIR / "fold_0"
    root = tmp_path_factory.mktemp("dupes") / "C-NMC_Leukemia"
    for fold, classes in LAYOUT.items():
        for class_name, subjects in classes.items():
            folder = root / config.TRAINING_DIR / fold / class_name
            folder.mkdir(parents=True)
            for subject in subjects:
                for cell in sorted((source / class_name).glob(f"UID_{subject}_*.png"))[:CELLS]:
                    shutil.copy(cell, folder / cell.name)
    for (subject, class_name, fold), (other, other_fold) in COPIES.items():
        first = sorted((root / config.TRAINING_DIR / fold / class_name).glob(f"UID_{subject}_*.png"))[0]
        shutil.copy(first, root / config.TRAINING_DIR / other_fold / class_name / f"UID_{other}_99_1_{class_name}.png")
    return root


@pytest.fixture(scope="module")
def duplicated_arrays(duplicated_root, tmp_path_factory):
    from modules import preprocessing

    folder = preprocessing.prepare_arrays(duplicated_root, size=32, output_dir=tmp_path_factory.mktemp("out"),
                                          progress=False)
    arrays = preprocessing.load_arrays(folder)
    return arrays.manifest, np.asarray(arrays.labels).astype(int)


def _sides(split: splits.PatientSplit) -> dict[str, str]:
    return {**{p: "train" for p in split.train_patients}, **{p: "val" for p in split.val_patients}}


def _split(manifest: pd.DataFrame, labels: np.ndarray, **kwargs) -> tuple[splits.PatientSplit, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = splits.split_patients(manifest, labels, **kwargs)
    return split, [str(w.message) for w in caught]


def test_groups_are_linked_through_shared_digests():
    table = pd.DataFrame({"patient_id": ["1", "3", "3", "19", "h6", "H7", "9"],
                          "pixel_digest": ["a", "a", "b", "b", "x", "x", "z"]})
    groups = duplicates.subject_groups(table)
    assert groups["group"].tolist() == ["1+3+19", "H6+H7"]  # 1 and 19 share no cell, but both share one with 3
    assert groups["shared_cells"].tolist() == [2, 1]
    assert duplicates.group_of(table["patient_id"], groups).tolist() == ["1+3+19"] * 4 + ["H6+H7"] * 2 + ["9"]
    assert duplicates.subject_groups(table.drop(columns="pixel_digest")).empty  # a manifest never prepared


@pytest.mark.shared_data
def test_prepare_records_the_pixel_digest_of_each_cell(duplicated_root, duplicated_arrays):
    from modules import preprocessing

    manifest, _ = duplicated_arrays
    assert manifest[layout.DIGEST_COLUMN].str.fullmatch("[0-9a-f]{32}").all()
    row = manifest.iloc[5]
    assert row[layout.DIGEST_COLUMN] == duplicates.pixel_digest(preprocessing.load_rgb(row["path"]))
    copies = duplicates.find_duplicates(manifest)
    assert len(copies) == 4 and copies["crosses_subjects"].all() and not copies["label_conflict"].any()
    assert set(copies["patient_id"]) == {"1", "3", "H6", "H7"}


@pytest.mark.shared_data
def test_fold_split_keeps_subjects_sharing_cells_together(duplicated_arrays):
    manifest, labels = duplicated_arrays
    split, messages = _split(manifest, labels)  # two folds: validation on fold_1, which holds 3's and H7's copies
    assert split.method == "fold"
    sides = _sides(split)
    assert sides["1"] == sides["3"] == "val" and sides["H6"] == sides["H7"] == "val"
    digests = manifest[layout.DIGEST_COLUMN].to_numpy()
    assert set(digests[split.train_index]).isdisjoint(digests[split.val_index])  # no cell on both sides
    warned = [m for m in messages if "more than one subject" in m]
    assert len(warned) == 1 and "1+3" in warned[0] and "H6+H7" in warned[0]


@pytest.mark.shared_data
def test_drawn_named_and_excluded_splits_take_whole_groups(duplicated_arrays):
    manifest, labels = duplicated_arrays
    one_fold = manifest.assign(fold=pd.array([0] * len(manifest), dtype="Int8"))  # no fold split: drawn
    chosen_together = False
    for seed in range(12):
        split, _ = _split(one_fold, labels, seed=seed)
        sides = _sides(split)
        assert split.method == "patients_stratified"
        assert sides["1"] == sides["3"] and sides["H6"] == sides["H7"]
        chosen_together |= sides["1"] == "val"
    assert chosen_together  # the group was drawn for validation at least once, whole
    named, _ = _split(one_fold, labels, val_patients=["3", "h19"])
    assert named.val_patients == ["1", "3", "H19"]
    excluded, _ = _split(manifest, labels, exclude_patients=["H7"])
    assert excluded.excluded_patients == ["H6", "H7"]
    assert not {"H6", "H7"} & set(excluded.train_patients + excluded.val_patients)


@pytest.mark.shared_data
def test_cv_folds_hold_out_subjects_sharing_cells_together(duplicated_root, duplicated_arrays):
    manifest, _ = duplicated_arrays
    scanned = layout.scan_dataset(duplicated_root)  # no pixel digests: the files' bytes are compared
    for table in (scanned, manifest):
        with pytest.warns(UserWarning, match=r"1\+3.*H6\+H7"):
            folds = data_folds.cv_folds(table)
        fold_of = {subject: fold for fold, members in folds.items() for subject in members}
        assert fold_of["1"] == fold_of["3"] and fold_of["H6"] == fold_of["H7"]
        assert sorted(fold_of) == sorted({s for classes in LAYOUT.values() for group in classes.values()
                                          for s in group})


@pytest.mark.shared_data
def test_scan_names_the_subjects_sharing_cells(duplicated_root, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"1\+3"):
        assert main(["scan", "--data", str(duplicated_root), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "identical files: 4 cells are byte-identical copies (2 groups" in printed
    assert "  1+3: 1 identical cell(s)" in printed and "  H6+H7: 1 identical cell(s)" in printed
