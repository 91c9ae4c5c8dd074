"""ANNa (Artificial Neural Network anti-Leukemia): the package behind ``notebooks/`` and ``python -m modules``.

One subpackage per stage: ``data``, ``preprocessing``, ``modeling``, ``evaluation``, ``reporting``; beside them
``config``, ``files``, ``notebooks`` and ``cli``. Imported lazily, so ``import modules`` never loads TensorFlow.
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
