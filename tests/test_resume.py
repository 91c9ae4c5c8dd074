"""One writer per run folder, resume that restores everything, leftovers of killed writers cleaned.

The training tests run ``train_model`` in subprocesses that kill themselves (SIGKILL, no cleanup)
at a chosen point: between two epochs, or in the middle of an atomic write. Each resumed run must
end exactly as the uninterrupted run with the same seed did.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from modules import preprocessing
from modules.files import LockHeldError, exclusive_lock, remove_partials

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
#: A tiny run whose learning rate is halved after epoch 3 (ReduceLROnPlateau with patience 1).
#: float32 everywhere: "auto" picks bfloat16 on CPUs with AMX, whose numerics need not halve the learning rate
#: within these 6 epochs (seen on such a machine: the reference run's one-rate history failed the fixture).
TINY = dict(image_size=32, epochs=6, batch_size=16, base_filters=4, depth=2, seed=3, patience=3, lr_patience=1,
            stem_stride=1, policy="float32")

#: Trains with the JSON settings of argv[1]. "kill" makes the process SIGKILL itself at the start of an
#: epoch (0-based: after that many epochs) or once a file it writes atomically is half written; "pause"
#: makes it write <folder>/paused at the start of an epoch and wait there for <folder>/go.
TRAIN_SCRIPT = textwrap.dedent("""
    import contextlib, json, os, signal, sys, time
    from pathlib import Path
    from modules.modeling import training

    args = json.loads(sys.argv[1])
    kill, pause = args.pop("kill", None), args.pop("pause", None)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if pause or (kill and "epoch" in kill):
        begin = training.ThroughputTimer.on_epoch_begin

        def on_epoch_begin(self, epoch, logs=None):
            if kill and epoch == kill["epoch"]:
                die()
            if pause and epoch == pause["epoch"]:
                (Path(pause["folder"]) / "paused").touch()
                while not (Path(pause["folder"]) / "go").exists():
                    time.sleep(0.1)
            begin(self, epoch, logs)

        training.ThroughputTimer.on_epoch_begin = on_epoch_begin
    elif kill:
        write = training.atomic_path

        @contextlib.contextmanager
        def dying(path):
            with write(path) as partial:
                yield partial
                if Path(path).name == kill["file"]:
                    with open(partial, "r+b") as handle:
                        handle.truncate(partial.stat().st_size // 2)
                    die()

        training.atomic_path = dying
    print(training.train_model(**args, verbose=0))
""")

HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from modules.files import exclusive_lock

    with exclusive_lock(sys.argv[1], "a test folder"):
        print("held", flush=True)
        time.sleep(300)
""")


# --------------------------------------------------------------------------- helpers
def _hold(lock: Path) -> subprocess.Popen:
    """A child process holding ``lock`` until killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(lock)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _kill(child: subprocess.Popen) -> None:
    child.kill()
    child.wait(timeout=30)
    if child.stdout:
        child.stdout.close()


def _train(**args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(args, default=str)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: int = 600) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, out, err


def _only_run(runs: Path) -> Path:
    (run,) = [path for path in runs.iterdir() if path.is_dir()]
    return run


def _assert_same_run(run: Path, reference: Path) -> None:
    """Same history, best epoch, threshold and validation predictions; nothing temporary left."""
    pd.testing.assert_frame_equal(pd.read_csv(run / "history.csv"), pd.read_csv(reference / "history.csv"),
                                  check_exact=False, rtol=1e-5, atol=1e-5)
    got, expected = (json.loads((folder / "config.json").read_text()) for folder in (run, reference))
    assert got["status"] == "complete"
    for key in ("epochs_trained", "best_epoch"):
        assert got["training"][key] == expected["training"][key], key
    assert got["threshold"] == pytest.approx(expected["threshold"], abs=1e-5)
    p_got, p_expected = (pd.read_csv(folder / "val_predictions.csv")["p_leukemia"] for folder in (run, reference))
    assert (p_got - p_expected).abs().max() < 1e-5
    assert not list(run.rglob(".*.partial*")) and not (run / "backup").exists()


# --------------------------------------------------------------------------- the lock
def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path):
    lock = tmp_path / ".lock"
    child = _hold(lock)
    try:
        pattern = rf"the folder {tmp_path} is in use by process {child.pid} on {socket.gethostname()} \(since 20"
        with pytest.raises(LockHeldError, match=pattern):
            with exclusive_lock(lock, f"the folder {tmp_path}"):
                pass
    finally:
        _kill(child)  # SIGKILL: no cleanup ran, yet the kernel dropped the lock
    with exclusive_lock(lock, "the folder") as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
    assert lock.read_text() == ""  # nobody's: no stale holder to misreport


def test_remove_partials_removes_only_temporary_files_of_atomic_writes(tmp_path):
    (tmp_path / "backup").mkdir()
    # Names as atomic_path makes them (.<stem>.<random>.partial<ext>), left by writers killed mid-write.
    left = [tmp_path / ".model.k3j4h5l6.partial.keras", tmp_path / "backup" / ".epoch-0002.x1y2z3w4.partial.npz",
            tmp_path / "backup" / ".state.abcdefgh.partial.json"]
    for path in left:
        path.write_bytes(b"half written")
    for name in ("model.keras", "history.csv", ".lock", "backup/state.json"):
        (tmp_path / name).write_text("kept")
    removed = remove_partials(tmp_path) + remove_partials(tmp_path / "backup")
    assert sorted(removed) == sorted(left)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        ".lock", "backup/state.json", "history.csv", "model.keras"]


# --------------------------------------------------------------------------- prepare's leftovers
PREPARE_KILLED_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from modules.preprocessing import arrays

    def die(path, payload):  # the arrays are written, meta.json not yet: killed before the rename
        os.kill(os.getpid(), signal.SIGKILL)

    arrays.write_json_atomic = die
    arrays.prepare_arrays(sys.argv[1], size=32, output_dir=sys.argv[2], progress=False)
""")


def test_prepare_removes_staging_folders_of_a_killed_prepare(synthetic_root, tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", PREPARE_KILLED_SCRIPT, str(synthetic_root), str(out)], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (staging,) = (out / "arrays").glob(".*.partial")
    assert (staging / "images.npy").is_file()  # what the killed prepare left
    target = preprocessing.prepare_arrays(synthetic_root, size=32, output_dir=out, progress=False)
    assert not staging.exists() and not list(target.parent.glob(".*.partial"))
    assert len(preprocessing.load_arrays(target)) > 0


def test_prepare_waits_for_a_live_writer_and_keeps_its_staging(synthetic_root, tmp_path, capfd):
    out = tmp_path / "out"
    target = preprocessing.prepare_arrays(synthetic_root, size=32, output_dir=out, progress=False)
    (target / "meta.json").unlink()  # no longer a complete cache: the next prepare rebuilds it
    staging = target.parent / f".{target.name}.livewrtr.partial"
    staging.mkdir()
    child = _hold(target.parent / f".{target.name}.lock")  # as a prepare of these arrays does while it writes
    result: list[Path] = []
    worker = threading.Thread(target=lambda: result.append(preprocessing.prepare_arrays(
        synthetic_root, size=32, output_dir=out, progress=False)))
    try:
        worker.start()
        time.sleep(2)
        assert worker.is_alive() and staging.is_dir()  # waits; the live writer's folder is untouched
        assert f"waiting for process {child.pid} on {socket.gethostname()}" in capfd.readouterr().err
    finally:
        _kill(child)
    worker.join(timeout=120)
    assert result == [target] and (target / "meta.json").is_file()
    assert not staging.exists()  # its writer died: removed by the next prepare


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def arrays_dir(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic tiny set prepared once at 32 px for every run of this module."""
    return preprocessing.prepare_arrays(synthetic_root, size=32, output_dir=tmp_path_factory.mktemp("resume_out"),
                                        progress=False)


@pytest.fixture(scope="module")
def reference_run(arrays_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    runs = tmp_path_factory.mktemp("reference")
    code, out, err = _finish(_train(data=arrays_dir, runs_dir=runs, **TINY))
    assert code == 0, err[-3000:]
    run = _only_run(runs)
    history = pd.read_csv(run / "history.csv")
    # The schedule acts within the run, so a resume must restore its state to reproduce it.
    assert len(history) == TINY["epochs"] and history["learning_rate"].nunique() == 2
    return run


@pytest.mark.slow
def test_run_killed_between_epochs_resumes_to_the_same_history_with_one_writer(arrays_dir, reference_run, tmp_path):
    runs = tmp_path / "runs"
    code, _, err = _finish(_train(data=arrays_dir, runs_dir=runs, kill={"epoch": 3}, **TINY))
    assert code == -signal.SIGKILL, err[-3000:]
    run = _only_run(runs)
    state = json.loads((run / "backup" / "state.json").read_text())["epochs"]
    assert list(state) == ["3"] and pd.read_csv(run / "history.csv")["epoch"].max() == 3
    assert set(state["3"]["early_stopping"]) == {"wait", "best", "best_epoch", "stopped_epoch"}
    assert set(state["3"]["reduce_lr"]) == {"wait", "best", "cooldown_counter"}
    # The rate was halved at the end of epoch 3: the resumed epoch 4 must train at the halved rate.
    assert pd.read_csv(reference_run / "history.csv")["learning_rate"].tolist()[2:4] == pytest.approx([1e-3, 5e-4])
    assert json.loads((run / "config.json").read_text())["status"] == "running"

    # A second resume while the first one trains (held at its first epoch) is turned away, naming it.
    first = _train(resume=run, pause={"epoch": 3, "folder": tmp_path})
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "paused").exists(), first.stderr.read()[-3000:] if first.poll() is not None else "slow"
        second = subprocess.run([sys.executable, "-m", "modules", "train", "--resume", str(run)], cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by process {first.pid} on {socket.gethostname()} (since 20" in second.stderr
    finally:
        (tmp_path / "go").touch()
    code, out, err = _finish(first)
    assert code == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == str(run)
    _assert_same_run(run, reference_run)


@pytest.mark.slow
def test_run_killed_while_writing_checkpoints_resumes_to_the_same_history(arrays_dir, reference_run, tmp_path):
    runs = tmp_path / "runs"
    code, _, err = _finish(_train(data=arrays_dir, runs_dir=runs, kill={"file": "epoch-0002.npz"}, **TINY))
    assert code == -signal.SIGKILL, err[-3000:]
    run = _only_run(runs)
    assert list(json.loads((run / "backup" / "state.json").read_text())["epochs"]) == ["1"]
    assert len(list((run / "backup").glob(".epoch-0002.*.partial.npz"))) == 1  # half written
    assert pd.read_csv(run / "history.csv")["epoch"].max() == 2  # written before the checkpoint: ignored

    # Resumed, and killed again while it writes the final model.
    code, _, err = _finish(_train(resume=run, kill={"file": "model.keras"}))
    assert code == -signal.SIGKILL, err[-3000:]
    assert len(list(run.glob(".model.*.partial.keras"))) == 1
    assert json.loads((run / "config.json").read_text())["status"] == "running"

    code, out, err = _finish(_train(resume=run))  # trains nothing more: saves the best epoch
    assert code == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == str(run)
    _assert_same_run(run, reference_run)
