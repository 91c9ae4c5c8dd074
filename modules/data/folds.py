"""Cross-validation folds by subject: every subject held out exactly once, classes spread evenly.

Subjects that share identical cells (``data.duplicates``) are held out together, in one fold.
"""
from __future__ import annotations

import pandas as pd

from modules.data import duplicates
from modules.data.layout import DIGEST_COLUMN

#: Held-out subjects of the shared training fold_0 (28 subjects: 19 ALL, 9 healthy), fixed so that
#: every run of the cross-validation scores the same people: 6-7 ALL (~800 cells) and 3 healthy each.
FOLD0_FOLDS = {
    0: ["52", "26", "14", "20", "43", "3", "19", "H24", "H6", "H7"],
    1: ["48", "35", "4", "22", "28", "15", "H12", "H16", "H11"],
    2: ["45", "50", "5", "11", "17", "1", "H15", "H17", "H19"],
}


class FoldError(ValueError):
    """The data cannot be split into the folds asked for."""


def cv_folds(manifest: pd.DataFrame, n_folds: int = 3) -> dict[int, list[str]]:
    """Held-out subjects per fold of a manifest's labeled training cells: ``FOLD0_FOLDS`` for the shared fold_0,
    else each group of subjects sharing cells (by ``pixel_digest`` or file bytes), largest first, dealt to the fold
    with the fewest cells of its class. FoldError: fewer groups of a class than folds."""
    cells = manifest[(manifest["split"] == "train") & manifest["label"].notna()]
    cells = cells.assign(patient_id=cells["patient_id"].astype(str).str.upper())
    if DIGEST_COLUMN not in cells:
        cells = cells.assign(**{DIGEST_COLUMN: duplicates.file_digests(cells["path"].tolist())})
    groups = duplicates.subject_groups(cells)
    duplicates.warn_groups(groups, "the cross-validation data", "each group is held out in one fold")
    cells = cells.assign(group=duplicates.group_of(cells["patient_id"], groups))
    linked = [set(subjects) for subjects in groups["subjects"]]
    if set(cells["patient_id"]) == {s for fold in FOLD0_FOLDS.values() for s in fold} and \
            n_folds == len(FOLD0_FOLDS) and all(any(g <= set(f) for f in FOLD0_FOLDS.values()) for g in linked):
        return {fold: list(members) for fold, members in FOLD0_FOLDS.items()}
    sizes = cells.groupby("group").agg(label=("label", lambda s: int(s.mode().iloc[0])), cells=("label", "size"))
    members = cells.groupby("group")["patient_id"].unique()
    folds: dict[int, list[str]] = {fold: [] for fold in range(n_folds)}
    for label, group in sizes.groupby("label"):
        if len(group) < n_folds:
            raise FoldError(f"only {len(group)} subject group(s) of class {int(label)} for {n_folds} folds; "
                            "use fewer folds or more subjects")
        load = [0] * n_folds
        for name, row in group.sort_values(["cells", "label"], ascending=False).iterrows():
            fold = min(range(n_folds), key=lambda f: (load[f], f))
            folds[fold] += sorted(members[name])
            load[fold] += int(row["cells"])
    return folds
