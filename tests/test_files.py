"""modules.files: atomic writes under unique temporary names."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from modules import config, files
from modules.files import atomic_path, write_csv_atomic, write_json_atomic, write_text_atomic


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "chart.png"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp.name.startswith(".chart.")
            tmp.write_text("half written")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"  # the reader never sees the half-written file
    assert sorted(p.name for p in target.parent.iterdir()) == ["chart.png"]  # nothing left behind


def test_atomic_files_get_the_usual_permissions_not_private_ones(tmp_path):
    """tempfile makes private files (0600); results must be readable like any file the user writes."""
    write_text_atomic(tmp_path / "report.md", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o666 & ~files._UMASK


def test_two_writers_of_one_name_get_different_temporary_files(tmp_path):
    target = tmp_path / "results.csv"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("a\n1\n")
        second.write_text("a\n2\n")
    assert target.read_text() == "a\n1\n"  # the outer writer finished last


def test_csv_and_json_round_trip(tmp_path):
    table = pd.DataFrame({"patient_id": ["H1", "11"], "p_leukemia": [0.25, 0.75]})
    csv = write_csv_atomic(table, tmp_path / "t.csv")
    pd.testing.assert_frame_equal(pd.read_csv(csv, dtype={"patient_id": str}), table)
    path = write_json_atomic(tmp_path / "m.json", {"auc": 0.5, "where": tmp_path})
    assert '"auc": 0.5' in path.read_text() and path.read_text().endswith("\n")


def _second_waits_for_first(lock) -> list[str]:
    import threading
    import time

    from modules.files import exclusive_lock

    order = []

    def second():
        with exclusive_lock(lock, timeout=10):
            order.append("second")

    with exclusive_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first")  # the other thread is still waiting
    thread.join(10)
    return order


@pytest.mark.skipif(os.name != "posix", reason="flock is a POSIX lock")
def test_os_lock_waits_for_the_holder_and_dies_with_a_killed_holder(tmp_path):
    import subprocess
    import sys
    import time

    from modules.files import exclusive_lock

    lock = tmp_path / ".lock"
    assert _second_waits_for_first(lock) == ["first", "second"]
    # A holder killed while holding: the kernel releases its lock at once, no staleness wait.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from modules.files import exclusive_lock\n"
        "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"),
        str(lock), str(config.PROJECT_ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=r"\.lock"):  # held: a clear error naming the file
            with exclusive_lock(lock, timeout=0.2):
                pass
    finally:
        holder.kill()
        holder.wait(10)
    started = time.monotonic()
    with exclusive_lock(lock, timeout=5):
        assert time.monotonic() - started < 2


def test_existence_lock_waits_for_the_holder_and_clears_stale_locks(tmp_path, monkeypatch):
    import time

    from modules import files
    from modules.files import exclusive_lock

    monkeypatch.setattr(files, "_flock", None)  # as on Windows
    lock = tmp_path / ".lock"
    assert _second_waits_for_first(lock) == ["first", "second"] and not lock.exists()
    lock.write_text("12345")  # left by a killed process an hour ago
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with exclusive_lock(lock, timeout=1):
        pass
    lock.write_text("12345")  # fresh and held: a clear error naming the file
    with pytest.raises(TimeoutError, match=r"\.lock"):
        with exclusive_lock(lock, timeout=0.2):
            pass


def test_concurrent_publishing_keeps_every_caption(tmp_path):
    import threading

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modules.reporting import charts as viz

    charts = []
    for i in range(12):
        fig, ax = plt.subplots()
        ax.plot([0, i])
        charts.append(viz.save_chart(fig, pd.DataFrame({"x": [0, i]}), f"chart{i}", f"caption {i}",
                                     tmp_path / "charts"))
        plt.close(fig)
    gallery = tmp_path / "viz"

    def publish(run: str):
        for chart in charts:
            viz.publish_to_viz([chart], gallery, run=run)

    threads = [threading.Thread(target=publish, args=(f"run{k}",)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    index = json.loads((gallery / viz.VIZ_INDEX_JSON).read_text())
    assert len(index) == 36 and all(entry["caption"].startswith("caption") for entry in index)
