"""What ANNa reads back from its own files, checked: a run's ``config.json``, ``backup/state.json`` and an arrays
folder's ``meta.json`` (a person or a crash may change them, and a threshold of 5.0 would pass silently).

Each schema maps a key (``a.b`` inside an object) to a ``Rule``; unlisted keys are not checked, and an absent key
passes unless its rule is ``required`` (older runs and a model copied alone record less).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple


class SchemaError(ValueError):
    """A file ANNa wrote does not hold what ANNa writes; the message names the file, the key and the fix."""


class Rule(NamedTuple):
    """The JSON types a value may have, what it must be in words, and a check of its value."""

    types: tuple[type, ...]
    must: str
    check: Callable[[Any], bool] = lambda value: True
    required: bool = False
    each: dict[str, Rule] | None = None  # a schema for every value of this object or list


def _rule(types: tuple[type, ...], must: str, check: Callable[[Any], bool], null: bool, required: bool = False) -> Rule:
    """A rule whose value may also be null (JSON ``null``, Python None) when ``null``."""
    return Rule((*types, type(None)) if null else types, must + (" or null" if null else ""),
                lambda value: value is None or check(value), required)


def whole(low: int, high: int | None = None, null: bool = False, required: bool = False) -> Rule:
    """A whole number from ``low`` (to ``high``); true/false are not numbers."""
    must = f"a whole number from {low} to {high}" if high is not None else f"a whole number of at least {low}"
    return _rule((int,), must, lambda v: low <= v and (high is None or v <= high), null, required)


def number(low: float = -math.inf, high: float = math.inf, null: bool = False) -> Rule:
    """A real number in [low, high], never NaN."""
    must = f"a number from {low:g} to {high:g}" if math.isfinite(low) and math.isfinite(high) else "a number"
    return _rule((int, float), must, lambda v: not math.isnan(v) and low <= v <= high, null)


def text(null: bool = False, required: bool = False, choices: tuple[str, ...] = ()) -> Rule:
    """A string (one of ``choices`` when given)."""
    must = f"one of {', '.join(map(repr, choices))}" if choices else "a string"
    return _rule((str,), must, lambda v: not choices or v in choices, null, required)


def texts(null: bool = False) -> Rule:
    """A list of strings (patient ids: ``["11", "H10"]``, never ``"11,H10"``)."""
    return _rule((list,), "a list of strings", lambda v: all(isinstance(item, str) for item in v), null)


FLAG = Rule((bool,), "true or false")
OBJECT = Rule((dict,), "an object")

#: A run's ``config.json`` (``training.describe_run`` and ``training.finish_run`` write it).
RUN = {
    "run_id": text(), "status": text(choices=("running", "complete")), "architecture": text(),
    "created": text(), "image_size": whole(1), "margin": whole(0, null=True),
    "background_threshold": whole(0, 255, null=True), "canvas": whole(0, null=True),
    # null while the run trains: `--threshold auto` then asks for a number instead.
    "threshold": number(0, 1, null=True), "threshold_method": text(null=True),
    "train_patients": texts(), "val_patients": texts(), "excluded_patients": texts(),
    "split_method": text(null=True), "val_fold": whole(0, null=True), "seed": whole(0),
    "model": OBJECT, "model.input_shape": Rule((list,), "a list of whole numbers",
                                               lambda v: all(type(d) is int and d > 0 for d in v)),
    "training": OBJECT, "training.epochs": whole(1), "training.batch_size": whole(1),
    "training.epochs_trained": whole(0), "training.best_epoch": whole(1, null=True),
    "data": OBJECT, "data.source": text(null=True), "data.arrays_dir": text(null=True),
    "data.synthetic": FLAG, "data.count": whole(0),
    "settings": OBJECT, "validation": OBJECT,
    **{f"settings.{key}": whole(0) for key in ("image_size", "epochs", "batch_size", "seed", "base_filters",
                                                "depth", "canvas", "patience", "lr_patience")},
    "settings.val_patients": texts(null=True), "settings.exclude_patients": texts(),
    "settings.val_fold": whole(0, null=True), "settings.architecture": text(),
}

#: One epoch's entry of ``backup/state.json`` (``training.ResumeState`` writes it).
EPOCH_STATE = {
    "best_weights": text(required=True), "checkpoint": text(required=True), "stopped": FLAG,
    "early_stopping": Rule((dict,), "an object", required=True), "reduce_lr": Rule((dict,), "an object", required=True),
    **{f"{callback}.{key}": whole(0) for callback, keys in (("early_stopping", ("wait", "best_epoch", "stopped_epoch")),
                                                            ("reduce_lr", ("wait", "cooldown_counter")))
       for key in keys},
    "early_stopping.best": number(), "reduce_lr.best": number(),
}
STATE = {"epochs": Rule((dict,), "an object of epoch numbers (from 1) to their saved state",
                        lambda v: all(key.isdigit() and int(key) >= 1 for key in v), True, EPOCH_STATE)}

#: An arrays folder's ``meta.json`` (``preprocessing.prepare_arrays`` writes it).
META = {
    "size": whole(1, required=True), "margin": whole(0), "canvas": whole(0), "background_threshold": whole(0, 255),
    "count": whole(0, required=True), "digest": text(required=True), "dataset": text(null=True),
    "source": text(null=True), "synthetic": FLAG, "meta_version": whole(0), "created": text(),
    "counts": OBJECT, **{f"counts.{name}": whole(0) for name in ("all", "hem", "unlabeled")},
    "skipped": Rule((list,), "a list of objects", each={"path": text(required=True), "error": text(required=True)}),
}

JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
              float: "a number", type(None): "null"}


def _lookup(document: dict, key: str) -> tuple[bool, Any]:
    """(found, value) of ``a.b`` in nested objects; not found where a parent is missing or not an object."""
    value = document
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _fits(value: Any, rule: Rule) -> bool:
    # bool is a subclass of int in Python: true is not a threshold of 1.
    if isinstance(value, bool) and bool not in rule.types:
        return False
    return isinstance(value, rule.types) and rule.check(value)


def validate(document: Any, schema: dict[str, Rule], file: str | Path, fix: str,
             error: type[ValueError] = SchemaError, prefix: str = "") -> dict:
    """Check a parsed JSON ``document`` against a schema and return it; raise ``error`` (naming ``file``, the key and
    ``fix``) when a key is missing, of the wrong type or out of range; ``prefix``: where ``document`` sits in it."""
    if not isinstance(document, dict):
        where = f"{file}: the key {prefix!r}" if prefix else str(file)
        raise error(f"{where} holds {JSON_NAMES.get(type(document), type(document).__name__)}, not an object; {fix}")
    for key, rule in schema.items():
        found, value = _lookup(document, key)
        name = f"{prefix}.{key}" if prefix else key
        if not found:
            if rule.required:
                raise error(f"{file} lacks the key {name!r} ({rule.must}); {fix}")
            continue
        if not _fits(value, rule):
            shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
            raise error(f"{file}: the key {name!r} holds {shown}, but it must be {rule.must}; {fix}")
        for item, member in (value.items() if isinstance(value, dict) else enumerate(value)) if rule.each else ():
            validate(member, rule.each, file, fix, error, f"{name}.{item}")
    return document


def read_json(file: str | Path, schema: dict[str, Rule], fix: str, error: type[ValueError] = SchemaError) -> dict:
    """Read a JSON file and ``validate`` it; a file that is not UTF-8 JSON raises ``error`` naming it."""
    try:
        document = json.loads(Path(file).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as problem:  # JSONDecodeError is a ValueError
        raise error(f"{file} is not valid JSON ({problem}); {fix}") from problem
    return validate(document, schema, file, fix, error)
