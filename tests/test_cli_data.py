"""The data commands: ``python -m modules synth | scan | prepare``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from modules import config
from modules.cli import build_parser, main

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_synth_command_through_python_m(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modules", "synth", "--out", str(tmp_path), "--seed", "3", "--scale", "tiny"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "SYNTHETIC" in lines[0]
    root = Path(lines[-1])
    assert root == tmp_path / config.DATASET_FOLDER_NAME and (root / config.SYNTHETIC_MARKER).is_file()
    assert "seed: 3" in (root / config.SYNTHETIC_MARKER).read_text()


def test_scan_command(synthetic_root, tmp_path, capsys):
    assert main(["scan", "--data", str(synthetic_root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "per fold" in out and "patients" in out
    manifest_path = Path(out.strip().splitlines()[-1])
    assert manifest_path == tmp_path / "csv" / "synthetic_c-nmc_leukemia_manifest.csv"
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    assert list(manifest.columns) == list(config.MANIFEST_COLUMNS)
    assert set(manifest["split"]) == {"train", "validation", "test"}
    assert f"{len(manifest)} cells" in out


@pytest.mark.shared_data
def test_scan_real_fold_prints_counts(shared_cnmc, tmp_path, capsys):
    assert main(["scan", "--data", str(shared_cnmc / "training_data" / "fold_0"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3526 cells" in out and "2396" in out and "1130" in out and "patients (28)" in out
    assert "SYNTHETIC" not in out


def test_prepare_command(synthetic_root, tmp_path, capsys):
    argv = ["prepare", "--data", str(synthetic_root / "training_data"), "--size", "24", "--out", str(tmp_path),
            "--workers", "1", "--no-progress", "--margin", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    folder = Path(out.strip().splitlines()[-1])
    assert folder == tmp_path / "arrays" / "synthetic_c-nmc_leukemia_train_24_margin2"  # not the default cache
    assert (folder / "images.npy").is_file() and "SYNTHETIC" in out


@pytest.mark.shared_data
def test_prepare_command_bad_image_and_skip_bad(shared_cnmc_bmp, tmp_path, capsys):
    root = tmp_path / "C-NMC_Leukemia"
    for path in sorted(shared_cnmc_bmp.glob("training_data/fold_0/*/*.bmp"))[::4]:
        target = root / path.relative_to(shared_cnmc_bmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    bad = sorted(root.rglob("*_all.bmp"))[0]
    bad.write_bytes(b"")
    argv = ["prepare", "--data", str(root), "--size", "16", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and bad.name in captured.err and "--skip-bad" in captured.err
    assert main(argv + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unusable image" in out and bad.name in out and "empty (0 bytes)" in out


def test_scan_command_missing_folder(tmp_path, capsys):
    assert main(["scan", "--data", str(tmp_path / "nowhere")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["synth", "scan", "prepare"])
def test_every_option_has_help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"
    text = sub.format_help()
    assert "--out" in text


@pytest.mark.parametrize("arguments, code", [([], 2), (["foo"], 2), (["train", "--help"], 0), (["cv", "--help"], 0)])
def test_usage_errors_and_help_answer_without_importing_tensorflow(arguments, code):
    # TensorFlow takes 10 s or more to import: a usage error or a help page must not wait for it.
    probe = ("import sys, runpy; sys.argv = ['modules', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('modules', run_name='__main__')\n"
             "except SystemExit as exit:\n    print('tensorflow' in sys.modules, exit.code)")
    result = subprocess.run([sys.executable, "-c", probe, *arguments], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split()[-2:] == ["False", str(code)], result.stdout + result.stderr
