"""ANNa — Artificial Neural Network anti-Leukemia.

Helper package behind the notebooks in ``notebooks/`` and the command line
``python -m modules``. Each submodule has one job:

- ``config``: paths and defaults.
- ``data``: find C-NMC images in the Kaggle layout and build the manifest table.
- ``preprocess``: decode, crop, pad, resize, derive cell masks, cache arrays.
- ``synth``: the procedural synthetic stand-in dataset.
- ``model``: the Keras U-Net with its classification head (and the legacy baseline).
- ``train``: patient-disjoint training runs.
- ``evaluate``, ``explain``, ``viz``, ``report``: metrics, Grad-CAM, charts, reports.
- ``notebooks``: running the notebook series headless (papermill).
- ``cli``: the command line.

Submodules are imported lazily so that ``import modules`` stays fast and does not
load TensorFlow until a model is needed.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = (
    "config", "data", "preprocess", "synth", "model", "train", "evaluate",
    "explain", "viz", "report", "notebooks", "cli",
)


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'modules' has no attribute {name!r}")
