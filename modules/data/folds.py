"""Cross-validation folds by subject: every subject held out exactly once, classes spread evenly."""
from __future__ import annotations

import pandas as pd

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
    """Held-out subjects per fold for the labeled training cells of a manifest.

    The shared fold_0 gets ``FOLD0_FOLDS``; other data is dealt subject by subject, largest first, to
    the fold with the fewest cells of that subject's class, so that each fold holds both classes and a
    similar number of cells.

    Raises:
        FoldError: Fewer subjects of a class than folds.
    """
    cells = manifest[(manifest["split"] == "train") & manifest["label"].notna()]
    subjects = cells.assign(patient_id=cells["patient_id"].astype(str).str.upper()).groupby("patient_id").agg(
        label=("label", "first"), cells=("label", "size"))
    if set(subjects.index) == {s for fold in FOLD0_FOLDS.values() for s in fold} and n_folds == len(FOLD0_FOLDS):
        return {fold: list(members) for fold, members in FOLD0_FOLDS.items()}
    folds: dict[int, list[str]] = {fold: [] for fold in range(n_folds)}
    for label, group in subjects.groupby("label"):
        if len(group) < n_folds:
            raise FoldError(f"only {len(group)} subject(s) of class {int(label)} for {n_folds} folds; "
                            "use fewer folds or more subjects")
        load = [0] * n_folds
        for subject, row in group.sort_values(["cells", "label"], ascending=False).iterrows():
            fold = min(range(n_folds), key=lambda f: (load[f], f))
            folds[fold].append(str(subject))
            load[fold] += int(row["cells"])
    return folds
