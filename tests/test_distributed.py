"""Training on two workers (TensorFlow's MultiWorkerMirroredStrategy), both on this machine.

The slow tests start two ``python -m modules train --strategy multi-worker`` processes whose
``TF_CONFIG`` names a cluster of two workers on 127.0.0.1, at ports the operating system picked
as free. Every process a test starts is killed when the test ends, whatever happened.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from modules import preprocessing
from modules.modeling import hardware, network, saving
from modules.modeling.training import train_model

ROOT = Path(__file__).resolve().parent.parent
#: A tiny network, the precision pinned (``auto`` picks bfloat16 on some CPUs, whose rounding would blur the
#: comparison) and the default global batch of 16, split 8 + 8 between the workers.
TINY = {"image_size": 32, "base_filters": 4, "depth": 2, "seed": 1, "policy": "float32"}
TINY_ARGS = ["--size", "32", "--base-filters", "4", "--depth", "2", "--seed", "1", "--policy", "float32"]
TIMEOUT = 600  # seconds for one worker process on a loaded 2-core machine (about a minute when idle)


def free_ports(count: int) -> list[int]:
    """Ports free on the loopback interface now: bound to port 0, the kernel picks them."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Cluster:
    """Two workers on 127.0.0.1, started (and restarted) with the same ``TF_CONFIG`` cluster."""

    def __init__(self, logs: Path):
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
        self.logs, self.processes, self.log_files, self.handles = logs, [], [], []
        self.temp = logs.parent / "worker-tmp"  # where the non-chief worker's temporary run folder goes
        self.temp.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, args: list[str]) -> list[subprocess.Popen]:
        """Start both workers of ``python -m modules train ARGS --strategy multi-worker``."""
        started = []
        for index in range(2):
            task = {"cluster": {"worker": self.addresses}, "task": {"type": "worker", "index": index}}
            log = self.logs / f"worker{index}-{len(self.processes) // 2}.log"
            self.log_files.append(log)
            self.handles.append(log.open("w"))
            env = {**os.environ, "TF_CONFIG": json.dumps(task), "TMPDIR": str(self.temp)}
            started.append(subprocess.Popen(
                [sys.executable, "-m", "modules", "train", *args, "--strategy", "multi-worker"], cwd=ROOT, env=env,
                stdout=self.handles[-1], stderr=subprocess.STDOUT))
        self.processes += started
        return started

    def wait(self, processes: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[int]:
        """The exit codes of ``processes``, once all have ended."""
        deadline = time.monotonic() + timeout
        return [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]

    def tails(self, lines: int = 15) -> str:
        """The last lines of every worker's log, for a failure message."""
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in self.log_files)

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        for handle in self.handles:
            handle.close()


@pytest.fixture
def cluster(tmp_path):
    """A ``Cluster`` whose processes are all killed at the end of the test, passed or failed."""
    workers = Cluster(tmp_path / "logs")
    try:
        yield workers
    finally:
        workers.kill_all()


@pytest.fixture
def tiny_out(synthetic_root, tmp_path) -> tuple[Path, object]:
    """An output folder with the synthetic cells prepared once, so both workers read the same cache."""
    out = tmp_path / "out"
    folder = preprocessing.prepare_arrays(synthetic_root, size=32, output_dir=out, progress=False)
    return out, preprocessing.load_arrays(folder)


def weight_distance(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(first, second, strict=True))))


def test_tf_config_names_the_cluster(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert hardware.cluster_workers() == 0
    with pytest.raises(hardware.StrategyError, match="TF_CONFIG"):
        hardware.select_strategy("multi-worker")
    cluster = {"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3"]},
               "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    assert hardware.cluster_workers() == 3


def test_one_process_is_its_own_chief():
    strategy = hardware.select_strategy("default")
    assert hardware.is_chief(strategy) and hardware.count_workers(strategy) == 1


@pytest.mark.slow
def test_two_workers_write_one_run_that_predicts_like_one_process(synthetic_root, tiny_out, tmp_path, cluster):
    out, arrays = tiny_out
    workers = cluster.start(["--data", str(synthetic_root), "--out", str(out), "--epochs", "2", *TINY_ARGS])
    # The same run in this process (one device) while the workers start up: same seed, same global batch.
    single = train_model(synthetic_root, epochs=2, output_dir=out, runs_dir=tmp_path / "single", verbose=0, **TINY)
    assert cluster.wait(workers) == [0, 0], cluster.tails()

    runs = sorted((out / "models").iterdir())
    assert len(runs) == 1, runs  # the chief's; the other worker wrote to a temporary folder, now gone
    run = saving.load_run(runs[0])
    assert (run["status"], run["workers"], run["training"]["epochs_trained"]) == ("complete", 2, 2)
    assert run["strategy"].startswith("multi-worker over 2 workers")
    assert not list(cluster.temp.iterdir())  # removed at the end

    multi_model, single_model = saving.load_model(runs[0]), saving.load_model(single)
    p_multi = saving.predict_outputs(multi_model, arrays.images)[network.PROB_OUTPUT]
    p_single = saving.predict_outputs(single_model, arrays.images)[network.PROB_OUTPUT]
    keras.utils.set_random_seed(TINY["seed"])  # the network both runs started from
    initial = network.build_anna((32, 32, 3), depth=TINY["depth"], base_filters=TINY["base_filters"]).get_weights()
    # Close, not equal to the last bit, and not meant to be: each worker draws its own dropout masks for its
    # half of a batch, and the last, uneven batch of an epoch (7 cells: 4 + 3) is averaged per worker before
    # the two are averaged. Measured: predictions within 0.007 of each other (training moved them by 0.02 from
    # the initial network's), weights 8 % apart relative to how far training moved them. The bounds leave a
    # factor of 3 for other machines' rounding.
    assert np.abs(p_multi - p_single).max() < 0.02
    moved = weight_distance(single_model.get_weights(), initial)
    assert weight_distance(multi_model.get_weights(), single_model.get_weights()) < 0.25 * moved


@pytest.mark.slow
def test_a_killed_worker_restarted_with_resume_completes_the_run(synthetic_root, tiny_out, cluster):
    out, _ = tiny_out
    first = cluster.start(["--data", str(synthetic_root), "--out", str(out), "--epochs", "3", *TINY_ARGS])
    deadline = time.monotonic() + TIMEOUT
    while not (states := list(out.glob("models/*/backup/state.json"))):  # the first epoch is saved
        assert time.monotonic() < deadline and all(p.poll() is None for p in first), cluster.tails()
        time.sleep(0.1)
    first[1].kill()
    # TensorFlow stops the chief too once the killed worker misses its heartbeats (about 10 s).
    assert cluster.wait(first, timeout=180)[0] != 0, cluster.tails()
    run_dir = states[0].parents[1]
    assert f"--resume {run_dir}" in cluster.log_files[0].read_text(), cluster.tails()

    assert cluster.wait(cluster.start(["--resume", str(run_dir)])) == [0, 0], cluster.tails()
    run = saving.load_run(run_dir)
    assert (run["status"], run["training"]["epochs_trained"]) == ("complete", 3)
    assert pd.read_csv(run_dir / saving.HISTORY_FILENAME)["epoch"].tolist() == [1, 2, 3]
    assert [path.name for path in (out / "models").iterdir()] == [run_dir.name]
    saving.load_model(run_dir)
