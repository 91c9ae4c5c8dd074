"""Shared fixtures.

Real-data fixtures read ``../shared/data`` beside the project. Where it is absent (a
user's clone) those tests skip with a reason; when ``CI=true`` they fail instead, so CI
always runs them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from modules import config  # noqa: E402

SHARED = config.SHARED_DATA_DIR


def _require(path: Path) -> Path:
    if path.exists():
        return path
    reason = f"real C-NMC cells not found at {path} (place the shared data beside the project)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_cnmc() -> Path:
    """Root of the real fold_0 cells as PNG (Kaggle layout: ``training_data/fold_0/{all,hem}``)."""
    return _require(SHARED / "cnmc")


@pytest.fixture(scope="session")
def shared_cnmc_bmp() -> Path:
    """Root of the 40 original BMP cells (Kaggle layout)."""
    return _require(SHARED / "cnmc_bmp")


@pytest.fixture(scope="session")
def session_output(tmp_path_factory) -> Path:
    """An ``output/``-like folder shared by the tests of one session."""
    return tmp_path_factory.mktemp("output")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic C-NMC_Leukemia tree (all three parts), made once per session."""
    from modules.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), seed=7, scale="tiny")


@pytest.fixture(scope="session")
def tiny_run_dir(synthetic_root, session_output) -> Path:
    """A tiny ANNa run trained for one epoch on the synthetic set (shared by evaluation and notebook tests)."""
    from modules.modeling.training import train_model

    return train_model(
        synthetic_root, image_size=32, epochs=1, batch_size=16, base_filters=4, depth=2,
        output_dir=session_output, seed=1, verbose=0,
    )


#: Notebook parameters small enough for CI on 2 cores.
TINY_NOTEBOOK_PARAMETERS = {"IMAGE_SIZE": 32, "EPOCHS": 1, "BATCH_SIZE": 16, "BASE_FILTERS": 4, "DEPTH": 2,
                            "SAMPLE_LIMIT": 0, "SEED": 3}


@pytest.fixture(scope="session")
def notebook_series(synthetic_root, tmp_path_factory) -> tuple[Path, list[Path]]:
    """The four notebooks executed once through papermill on the synthetic set: (output dir, executed notebooks)."""
    from modules.notebooks import run_notebooks

    output_dir = tmp_path_factory.mktemp("notebook_series")
    return output_dir, run_notebooks(synthetic_root, TINY_NOTEBOOK_PARAMETERS, output_dir, progress=False)
