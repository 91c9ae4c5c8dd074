"""An ensemble of runs: its score is the members' scores centred on their own thresholds, and it is a run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from modules.modeling import ensemble, saving


@pytest.fixture(scope="module")
def second_run(synthetic_root, session_output):
    from modules.modeling.training import train_model

    return train_model(synthetic_root, image_size=32, epochs=1, batch_size=16, base_filters=4, depth=2,
                       output_dir=session_output, seed=2, verbose=0, input_transform="cell_standardized")


def logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def test_ensemble_centres_each_member_on_its_threshold(tiny_run_dir, second_run, tmp_path):
    from modules import preprocessing

    run_dir = ensemble.write_ensemble([tiny_run_dir, second_run], tmp_path / "ens")
    config = saving.load_run(run_dir)
    members = [saving.load_run(r) for r in (tiny_run_dir, second_run)]
    assert config["threshold"] == 0.5 and config["ensemble"]["thresholds"] == [m["threshold"] for m in members]
    seen = {p for m in members for p in m["train_patients"] + m["val_patients"]}
    assert set(config["train_patients"]) == seen and config["val_patients"] == []

    images = preprocessing.load_arrays(members[0]["data"]["arrays_dir"]).images[:24]
    member_p = [saving.predict_outputs(saving.load_model(r), images)["p_leukemia"] for r in (tiny_run_dir, second_run)]
    expected = 1 / (1 + np.exp(-np.mean([logit(p) - logit(m["threshold"]) for p, m in zip(member_p, members)], 0)))
    combined = saving.predict_outputs(saving.load_model(run_dir), images)  # loaded in safe mode
    np.testing.assert_allclose(combined["p_leukemia"], expected, atol=1e-5)
    assert combined["cell_mask"].shape == (24, 32, 32)
    # A cell is called leukemic when the members' mean centred score is positive.
    assert ((combined["p_leukemia"] >= 0.5) == (np.mean([logit(p) - logit(m["threshold"])
                                                        for p, m in zip(member_p, members)], 0) >= 0)).all()


def test_ensemble_refuses_one_run_an_unfinished_one_and_an_existing_folder(tiny_run_dir, tmp_path):
    with pytest.raises(ensemble.EnsembleError, match="at least two"):
        ensemble.write_ensemble([tiny_run_dir], tmp_path / "one")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    config = json.loads((tiny_run_dir / saving.CONFIG_FILENAME).read_text())
    (unfinished / saving.CONFIG_FILENAME).write_text(json.dumps({**config, "status": "running", "threshold": None}))
    with pytest.raises(ensemble.EnsembleError, match="not finished"):
        ensemble.write_ensemble([tiny_run_dir, unfinished], tmp_path / "two")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ensemble.EnsembleError, match="exists already"):
        ensemble.write_ensemble([tiny_run_dir, tiny_run_dir], tmp_path / "taken")


def test_ensemble_of_a_cross_validation_needs_its_runs(tmp_path):
    with pytest.raises(ensemble.EnsembleError, match="no finished anna job"):
        ensemble.cv_runs(tmp_path)


def test_an_ensemble_loads_in_a_fresh_process_and_is_evaluated_like_a_run(tiny_run_dir, second_run, synthetic_root,
                                                                           tmp_path):
    import subprocess
    import sys

    from modules.evaluation import evaluate

    run_dir = ensemble.write_ensemble([tiny_run_dir, second_run], tmp_path / "ens")
    # A new process that never imports modules.modeling.ensemble must still load it (safe mode).
    code = ("import sys; from modules.modeling import saving; "
            f"m = saving.load_model({str(run_dir)!r}); print(m.name)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("anna_ensemble")
    folder = evaluate.evaluate_run(run_dir, synthetic_root, split="validation", output_dir=tmp_path / "out",
                                   n_boot=50, progress=False)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["threshold"] == 0.5 and (folder / "gradcam.png").is_file()
