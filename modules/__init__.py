"""ANNa — Artificial Neural Network anti-Leukemia.

Helper package behind the notebooks in ``notebooks/`` and the command line
``python -m modules``. One subpackage per pipeline stage:

- ``data``: the Kaggle layout scan and manifest, the synthetic stand-in, patient splits and CV folds.
- ``preprocessing``: decode, crop, resize and mask each cell; cache the arrays.
- ``modeling``: the Keras U-Net with its classification head, hardware choices, training, saving.
- ``evaluation``: metrics, evaluating a run, predicting new cells, Grad-CAM, cross-validation.
- ``reporting``: charts (PNG + CSV), the evaluation report, the chart gallery, EDA figures.

Beside them: ``config`` (paths and defaults), ``files`` (atomic writes), ``notebooks``
(the series headless through papermill) and ``cli`` (the command line).

Subpackages are imported lazily so that ``import modules`` stays fast and does not
load TensorFlow until a model is needed.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = ("config", "files", "data", "preprocessing", "modeling", "evaluation", "reporting",
               "notebooks", "cli")


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'modules' has no attribute {name!r}")
