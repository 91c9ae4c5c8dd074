"""Identical cells under different names, and the subjects they link.

The C-NMC download files some cells under two subjects (71 cells of fold_0 subject 20 are fold_2 subject 21's); a
split by patient that puts such subjects on two sides leaks them. ``pixel_digest`` (of the decoded pixels, stored per
cell by ``prepare``; it also matches a BMP and a PNG of one cell) finds them for the patient splits and the EDA,
``file_digest`` (of the bytes) for ``scan`` and CV folds of a scan's manifest.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import xxhash
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from modules.data.layout import DIGEST_COLUMN, patient_sort_key

def pixel_digest(image: np.ndarray, bgr: bool = False) -> str:
    """xxh3_128 of an (H, W, 3) image's pixels in BGR order (OpenCV's: ``prepare`` hashes its decoded buffer
    without a copy, ``bgr=True``) and its shape. XXH3 is 25 times faster than sha256; 128 bits leave no chance
    collision among millions of cells."""
    digest = xxhash.xxh3_128(np.ascontiguousarray(image if bgr else image[..., ::-1]).data)
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str | None:
    """xxh3_128 of a file's bytes; None when it cannot be read (``prepare`` names such files)."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, xxhash.xxh3_128).hexdigest()
    except OSError:
        return None


def file_digests(paths: Sequence[str], workers: int = 8) -> list[str | None]:
    """``file_digest`` of each path on a few threads (hashlib releases the GIL on large reads)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(file_digest, paths))


def find_duplicates(table: pd.DataFrame, column: str = DIGEST_COLUMN) -> pd.DataFrame:
    """The rows whose digest (``column``) another row shares, by digest then path: ``column, copies``, the
    table's ``path, name, patient_id, class, label, split`` (those it has) and whether the copies carry different
    labels (``label_conflict``), splits (``crosses_splits``: a leak) or subjects (``crosses_subjects``)."""
    copies = table.groupby(column)[column].transform("size")
    kept = [c for c in (column, "path", "name", "patient_id", "class", "label", "split") if c in table]
    duplicates = table.loc[copies > 1, kept].copy()
    duplicates.insert(1, "copies", copies[copies > 1])
    groups = duplicates.groupby(column)
    labelled = "class" if "class" in duplicates else "label"
    duplicates["label_conflict"] = groups[labelled].transform("nunique") > 1
    duplicates["crosses_splits"] = groups["split"].transform("nunique") > 1
    subjects = duplicates["patient_id"].astype(str).str.upper().replace("", pd.NA)
    duplicates["crosses_subjects"] = subjects.groupby(duplicates[column]).transform("nunique") > 1
    return duplicates.sort_values([column, "path"], ignore_index=True)


def subject_groups(table: pd.DataFrame, column: str = DIGEST_COLUMN) -> pd.DataFrame:
    """Subjects linked by identical cells, directly or through others: one row per group of two or more, largest
    first, ``group`` (``20+21``), ``subjects`` and ``shared_cells`` (digests under more than one of them). Rows
    without a patient id are left out; a table without ``column`` (a manifest never prepared) has no groups."""
    if column not in table:
        return pd.DataFrame(columns=["group", "subjects", "shared_cells"])
    rows = table.assign(patient_id=table["patient_id"].astype(str).str.upper())
    rows = rows[(rows["patient_id"] != "") & rows[column].notna() & (rows[column].astype(str) != "")]
    subject_codes, subjects = pd.factorize(rows["patient_id"])
    digest_codes, digests = pd.factorize(rows[column])
    # A graph of subjects and digests, an edge for each cell: its components are the groups.
    nodes = len(subjects) + len(digests)
    edges = coo_matrix((np.ones(len(rows)), (subject_codes, len(subjects) + digest_codes)), shape=(nodes, nodes))
    _, component = connected_components(edges, directed=False)
    members = pd.Series(subjects, index=component[:len(subjects)])
    shared = rows.groupby(column)["patient_id"].nunique()
    shared_component = pd.Series(component[len(subjects) + digests.get_indexer(shared.index)], index=shared.index)
    result = []
    for _, names in members.groupby(level=0):
        if len(names) > 1:
            ordered = names.sort_values(key=patient_sort_key).tolist()
            cells = int((shared[shared_component == names.index[0]] > 1).sum())
            result.append({"group": "+".join(ordered), "subjects": ordered, "shared_cells": cells})
    groups = pd.DataFrame(result, columns=["group", "subjects", "shared_cells"])
    return groups.sort_values(["shared_cells", "group"], ascending=[False, True], ignore_index=True)


def group_of(patient_ids: pd.Series, groups: pd.DataFrame) -> pd.Series:
    """Each patient id's group name (``subject_groups``), or the id itself when it is in none."""
    names = {subject: row.group for row in groups.itertuples() for subject in row.subjects}
    return patient_ids.astype(str).str.upper().replace(names)


def warn_groups(groups: pd.DataFrame, source: str, consequence: str, stacklevel: int = 3) -> None:
    """Warn that ``source`` files identical cells under several subjects (``20+21 (71 identical cells), …``)."""
    if len(groups):
        listed = ", ".join(f"{row.group} ({row.shared_cells} identical cell{'s' if row.shared_cells != 1 else ''})"
                           for row in groups.head(10).itertuples())
        more = f" and {len(groups) - 10} more groups" if len(groups) > 10 else ""
        warnings.warn(f"{source}: identical cells are filed under more than one subject: {listed}{more}; "
                      f"{consequence}", stacklevel=stacklevel)
