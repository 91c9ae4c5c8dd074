"""Patient-disjoint training/validation splits of the labeled training cells (never by image).

Subjects that share identical cells (``data.duplicates``: the arrays' ``pixel_digest``) count as one group: it goes
whole to one side, or is excluded whole, so no cell is on both sides. Cross-validation folds are in ``data.folds``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from modules import config
from modules.data import duplicates


class SplitError(ValueError):
    """The cells cannot be split by patient as asked; the message says what to change."""


@dataclass
class PatientSplit:
    """Row indices of the training and validation cells, and how they were chosen."""

    train_index: np.ndarray
    val_index: np.ndarray
    train_patients: list[str]
    val_patients: list[str]
    method: str  # "fold", "patients" (named) or "patients_stratified" (drawn)
    val_fold: int | None = None
    excluded_patients: list[str] = field(default_factory=list)


def _usable_cells(manifest: pd.DataFrame, labels: np.ndarray, excluded: list[str],
                  source: str) -> tuple[pd.DataFrame, list[str]]:
    """The labeled training cells not excluded (row, patient, label, fold, group), and the patients excluded: those
    asked for and every subject grouped with them (subjects linked by identical cells are warned about)."""
    patient_ids = manifest["patient_id"].fillna("").astype(str).str.upper().to_numpy()
    unknown = set(excluded) - set(patient_ids)
    if unknown:
        raise SplitError(f"patients to exclude not found in {source}: {', '.join(sorted(unknown))}")
    training = (manifest["split"].astype(str) == "train").to_numpy() & (labels >= 0)
    groups = duplicates.subject_groups(manifest[training])  # none in a manifest never prepared
    duplicates.warn_groups(groups, source, "each group stays whole on one side of the split (or is excluded "
                           "whole), so that no cell is on both", stacklevel=4)
    group = duplicates.group_of(pd.Series(patient_ids), groups).to_numpy()
    linked = np.isin(group, group[np.isin(patient_ids, excluded)])
    excluded = sorted(set(excluded) | set(patient_ids[training & linked]))
    usable = training & ~np.isin(patient_ids, excluded)
    if not usable.any():
        raise SplitError(f"{source} has no labeled training cells (training_data/fold_N/{{all,hem}}); point --data "
                         "at a C-NMC_Leukemia root or a training fold")
    if (patient_ids[usable] == "").any():
        raise SplitError(f"{source}: some training cells have no patient id, so they cannot be split "
                         "by patient; name files UID_<patient>_<image>_<cell>_<all|hem>")
    return pd.DataFrame({"row": np.flatnonzero(usable), "patient_id": patient_ids[usable], "group": group[usable],
                         "label": labels[usable].astype(int), "fold": manifest["fold"].to_numpy()[usable]}), excluded


def _fold_patients(table: pd.DataFrame, val_fold: int | None, folds: list[int], source: str) -> tuple[list, int]:
    """The patients of one C-NMC fold (the last by default), checked to appear in no other fold."""
    val_fold = folds[-1] if val_fold is None else int(val_fold)
    if val_fold not in folds:
        raise SplitError(f"validation fold {val_fold} not in {source} (folds: {folds or 'none'}); "
                         "use --val-patients when the data has a single fold")
    chosen = sorted(set(table.loc[table["fold"] == val_fold, "patient_id"]))
    shared = set(chosen) & set(table.loc[table["fold"] != val_fold, "patient_id"])
    if shared:
        raise SplitError(f"patients {', '.join(sorted(shared))} appear in fold {val_fold} and in other folds "
                         f"of {source}; a fold split would not be patient-disjoint, use --val-patients")
    return chosen, val_fold


def _drawn_patients(patient_class: pd.Series, val_fraction: float, seed: int, source: str) -> list[str]:
    """``val_fraction`` of each class's patients (at least one, never all), drawn with ``seed``; a group
    of subjects sharing cells is drawn as one."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(patient_class.unique()):
        members = sorted(patient_class.index[patient_class == label])
        if len(members) < 2:
            raise SplitError(f"{source} has only {len(members)} {config.CLASS_NAMES[label]} patient(s); at least "
                             "two per class are needed to hold whole patients out for validation")
        count = min(len(members) - 1, max(1, int(round(val_fraction * len(members)))))
        chosen += list(rng.choice(members, size=count, replace=False))
    return sorted(chosen)


def split_patients(manifest: pd.DataFrame, labels: np.ndarray, val_patients: list[str] | None = None,
                   val_fold: int | None = None, val_fraction: float = config.TrainSettings.val_fraction,
                   seed: int = config.DEFAULT_SEED, exclude_patients: tuple[str, ...] | list[str] = (),
                   source: str = "the data") -> PatientSplit:
    """Split the labeled training cells of the arrays' manifest (``labels`` aligned with it: 1, 0 or -1) into
    patient-disjoint sets: by the named ``val_patients``, by C-NMC fold when the data has several (``val_fold``, the
    last by default), or else by drawing ``val_fraction`` of each class's patients with ``seed``. ``exclude_patients``
    are left out of both (held out for cross-validation); ``source`` names the data in a SplitError."""
    if val_patients and val_fold is not None:
        raise SplitError("give either validation patients or a validation fold, not both")
    table, excluded = _usable_cells(manifest, labels, sorted({str(p).upper() for p in exclude_patients}), source)
    group_class = table.groupby("group")["label"].agg(lambda s: int(s.mode().iloc[0]))
    folds = sorted(int(f) for f in pd.unique(table["fold"].dropna()))
    if val_patients:
        chosen = sorted({str(p).strip().upper() for p in val_patients if str(p).strip()})
        missing = sorted(set(chosen) - set(table["patient_id"]))
        if missing:
            raise SplitError(f"validation patients not among the training patients of {source}: "
                             f"{', '.join(missing)}; available: {', '.join(sorted(set(table['patient_id'])))}")
        method = "patients"
    elif val_fold is not None or len(folds) > 1:
        (chosen, val_fold), method = _fold_patients(table, val_fold, folds, source), "fold"
    else:
        chosen, method = _drawn_patients(group_class, val_fraction, seed, source), "patients_stratified"
    # Whole groups: a subject sharing cells with a validation subject validates too.
    is_val = table["group"].isin(table.loc[table["patient_id"].isin(chosen) | table["group"].isin(chosen),
                                           "group"]).to_numpy()
    split = PatientSplit(
        train_index=table["row"].to_numpy()[~is_val], val_index=table["row"].to_numpy()[is_val],
        train_patients=sorted(set(table.loc[~is_val, "patient_id"])),
        val_patients=sorted(set(table.loc[is_val, "patient_id"])),
        method=method, val_fold=val_fold if method == "fold" else None, excluded_patients=excluded)
    _check_classes(split, labels, source)
    return split


def _check_classes(split: PatientSplit, labels: np.ndarray, source: str) -> None:
    """Both classes on each side, or an error naming the missing one."""
    train_classes = set(labels[split.train_index].tolist())
    if len(train_classes) < 2:
        only = ", ".join(config.CLASS_NAMES[c] for c in sorted(train_classes)) or "no"
        raise SplitError(f"the training cells of {source} hold one class only ({only}); both all and hem "
                         "cells are needed (check the data folder and the validation patients)")
    val_classes = set(labels[split.val_index].tolist())
    if val_classes != {0, 1}:
        lacking = ", ".join(config.CLASS_NAMES[c] for c in (0, 1) if c not in val_classes)
        raise SplitError(f"the validation split ({split.method}: {', '.join(split.val_patients)}) has no {lacking} "
                         "patient; name patients of both classes with --val-patients or pick another --val-fold")
