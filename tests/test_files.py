"""modules.files: atomic writes under unique temporary names."""
from __future__ import annotations


import pandas as pd
import pytest

from modules import files
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


def test_staged_folder_replaces_or_takes_a_free_name_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "run"
    for content in ("old", "new"):
        with files.staged_folder(target) as staged:
            assert staged.path.parent == tmp_path and staged.path.name.startswith(".run.")
            (staged.path / "f").write_text(content)
    assert (target / "f").read_text() == "new" and staged.target == target
    with files.staged_folder(target, replace=False) as staged:
        (staged.path / "f").write_text("third")
    assert staged.target == tmp_path / "run_2" and (target / "f").read_text() == "new"
    with pytest.raises(RuntimeError), files.staged_folder(target) as staged:
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run_2"] and (target / "f").read_text() == "new"
