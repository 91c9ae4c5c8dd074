"""Run the notebook series headless (papermill) and the helpers the notebooks share.

- ``run_notebooks(data, parameters, output_dir)``: execute ``1.EDA`` … ``4.Test`` in order with
  papermill, on the kernel of the current interpreter, writing the executed copies under
  ``<output_dir>/notebooks/<timestamp>/``.
- ``demo()``: the README's first command; small parameters on a synthetic set generated on the
  spot, or on the real data when ``input/C-NMC_Leukemia`` is present.
- ``resolve_data_dir``, ``show_data_banner``, ``find_model``, ``show_evaluation``: what the
  notebooks call so that their cells stay short.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from modules import config

if TYPE_CHECKING:  # pandas loads lazily: the CLI's --help stays fast
    import pandas

#: The series, in the order it runs.
NOTEBOOK_NAMES = ("1.EDA.ipynb", "2.Image_preprocessing.ipynb", "3.ANNa.ipynb", "4.Test.ipynb")
#: The kernel name written in the notebooks (resolved to the current interpreter when run).
KERNEL_NAME = "python3"
#: Demo settings on the synthetic stand-in: small enough for a 2-core CPU in a few minutes.
DEMO_SYNTHETIC_PARAMETERS = {"IMAGE_SIZE": 64, "EPOCHS": 12, "BATCH_SIZE": 32, "BASE_FILTERS": 8,
                             "DEPTH": 3, "SAMPLE_LIMIT": 0, "SYNTHETIC_SCALE": "small"}
#: Demo settings on the real data: a short look, not a full training run.
DEMO_REAL_PARAMETERS = {"IMAGE_SIZE": 64, "EPOCHS": 3, "BATCH_SIZE": 32, "BASE_FILTERS": 8,
                        "DEPTH": 3, "SAMPLE_LIMIT": 600}
SYNTHETIC_SEED = 0


class NotebookError(RuntimeError):
    """A notebook of the series failed; the message names it and its executed copy."""


# ----------------------------------------------------------------------------- data and models
def resolve_data_dir(data: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
                     scale: str = "small", seed: int = SYNTHETIC_SEED) -> Path:
    """The dataset to use: ``data`` if given, else the real data, else a synthetic stand-in.

    Args:
        data: A C-NMC_Leukemia root (or a folder inside one); empty/None to choose.
        output_dir: Root of the outputs; the synthetic set goes to ``<output_dir>/synthetic``
            (``config.SYNTHETIC_DATA_DIR``'s parent by default).
        scale: Size of the synthetic set (``synth.SCALES``).
        seed: Seed of the synthetic set.

    Returns:
        The absolute dataset path. A synthetic set is reused when already generated.

    Raises:
        FileNotFoundError: ``data`` was given but does not exist.
    """
    if data:
        path = Path(data).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"data folder {path} not found: pass the C-NMC_Leukemia folder "
                                    "(see input/README.md) or leave DATA_DIR empty for the synthetic set")
        return path
    if config.REAL_DATA_DIR.is_dir():
        return config.REAL_DATA_DIR.resolve()
    from modules.data import synthetic as synth

    parent = Path(output_dir) / "synthetic" if output_dir else config.SYNTHETIC_DATA_DIR.parent
    return synth.make_synthetic_dataset(parent, seed=seed, scale=scale)


def is_synthetic(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies in a synthetic dataset (see ``synth.is_synthetic``)."""
    from modules.data import synthetic as synth

    return synth.is_synthetic(path)


def data_banner_html(data_dir: str | os.PathLike) -> str:
    """HTML banner saying which data the numbers come from (red and loud when synthetic)."""
    import html

    from modules.data import synthetic as synth

    if synth.is_synthetic(data_dir):
        return ("<div style='border:3px solid #c0392b;background:#fdecea;color:#922b21;padding:10px;"
                "font-size:1.1em;font-weight:bold'>&#9888; " + html.escape(synth.SYNTHETIC_BANNER)
                + f"<br><span style='font-weight:normal'>data: {html.escape(str(data_dir))}</span></div>")
    return ("<div style='border:1px solid #aaa;background:#f4f6f7;padding:6px'>Data: real C-NMC 2019 cells "
            f"from <code>{html.escape(str(data_dir))}</code></div>")


def show_data_banner(data_dir: str | os.PathLike) -> None:
    """Display ``data_banner_html`` in the notebook (and print it on a terminal)."""
    from IPython.display import HTML, display

    from modules.data import synthetic as synth

    display(HTML(data_banner_html(data_dir)))
    if synth.is_synthetic(data_dir):
        print(synth.SYNTHETIC_BANNER)


def find_model(model_path: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None) -> Path:
    """The run folder (or ``.keras`` file) to evaluate: ``model_path``, else the newest run.

    Args:
        model_path: A run folder or a ``.keras`` file; empty/None for the newest run.
        output_dir: Root of the outputs (``config.OUTPUT_DIR`` by default); runs are in ``models/``.

    Returns:
        The path.

    Raises:
        FileNotFoundError: The path does not exist, or there is no finished run yet.
    """
    if model_path:
        path = Path(model_path).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"MODEL_PATH {path} not found: pass a run folder under "
                                    "output/models or its model.keras")
        return path
    models_dir = Path(output_dir or config.OUTPUT_DIR) / config.MODELS_SUBDIR
    runs = [run for run in models_dir.glob("*/") if (run / "model.keras").is_file()
            and _run_status(run) == "complete"]
    if not runs:
        raise FileNotFoundError(f"no trained run in {models_dir}: run notebooks/3.ANNa.ipynb or "
                                "`python -m modules train` first, or set MODEL_PATH")
    return max(runs, key=_run_created)


def _run_status(run: Path) -> str:
    """``complete`` for a finished run (older runs without a status count as finished)."""
    try:
        return str(json.loads((run / "config.json").read_text()).get("status", "complete"))
    except (OSError, ValueError):
        return "unreadable"


def _run_created(run: Path) -> tuple[str, float]:
    """Sort key: the run's ``created`` time from config.json, then the folder's mtime."""
    try:
        created = str(json.loads((run / "config.json").read_text()).get("created", ""))
    except (OSError, ValueError):
        created = ""
    return created, run.stat().st_mtime


def evaluation_split(data_dir: str | os.PathLike, run: Mapping, split: str = "auto"
                     ) -> tuple[str, list[str] | None, str]:
    """Which labeled cells 4.Test scores: the validation_data cells when the data has them.

    Without labeled validation_data (e.g. training folds only), the run's own held-out
    validation patients are scored instead; their cells steered early stopping and the
    threshold, so those numbers lean optimistic, and the note says so.

    Args:
        data_dir: The dataset.
        run: The run's config.json (``train.load_run``).
        split: ``auto`` or an ``evaluate.SPLITS`` value to force.

    Returns:
        ``(split, patients, note)`` for ``evaluate.evaluate_run``.
    """
    from modules.data import layout as data

    if split != "auto":
        return split, None, f"split {split!r} as requested"
    manifest = data.scan_dataset(data_dir)
    if ((manifest["split"] == "validation") & manifest["label"].notna()).any():
        return "validation", None, "the labeled C-NMC validation cells (patients the run never trained on)"
    patients = [str(p) for p in run.get("val_patients") or []]
    if not patients:
        raise ValueError(f"{data_dir} has no labeled validation_data and the run records no validation "
                         "patients: set SPLIT (e.g. 'test-labeled') on data of other patients")
    return "train", patients, ("no labeled validation_data here: scoring the run's held-out validation patients "
                               f"({', '.join(patients)}); they chose the threshold and the best epoch, so "
                               "these numbers lean optimistic")


def metrics_table(metrics: Mapping) -> pandas.DataFrame:
    """The headline metrics with their 95 % bootstrap intervals, one row each."""
    import pandas as pd

    names = ("n", "n_positive", "n_negative", "threshold", "roc_auc", "balanced_accuracy", "sensitivity",
             "specificity", "precision", "f1", "weighted_f1", "accuracy", "pr_auc", "mcc", "mask_dice_mean")
    intervals = metrics.get("ci") or {}
    rows = []
    for name in names:
        if name in metrics:
            low, high = (intervals.get(name) or (None, None))[:2]
            rows.append({"metric": name, "value": metrics[name], "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows).set_index("metric")


def show_charts(folder: str | os.PathLike, names: Sequence[str] | None = None) -> list[Path]:
    """Display the charts of a folder (PNG + caption), in the order they were saved.

    Args:
        folder: A folder written with ``viz.save_chart`` (an evaluation, ``charts/<notebook>``).
        names: Chart stems to show; all by default. Missing names are skipped.

    Returns:
        The PNGs shown.
    """
    from IPython.display import Image, Markdown, display

    from modules.reporting import charts as viz

    folder = Path(folder)
    captions = viz.chart_captions(folder)
    wanted = list(names) if names is not None else list(captions) + sorted(
        p.stem for p in folder.glob("*.png") if p.stem not in captions)
    shown = []
    for name in wanted:
        png = folder / f"{name}.png"
        if png.is_file():
            display(Markdown(f"**{name}**: {captions.get(name, '')}"), Image(filename=str(png)))
            shown.append(png)
    return shown


def show_evaluation(evaluation_dir: str | os.PathLike, max_rows: int = 40) -> dict:
    """Show an evaluation folder inline: metrics, every chart with its caption, per-patient table.

    Args:
        evaluation_dir: A folder written by ``evaluate.evaluate_run``.
        max_rows: Rows of the per-patient table shown.

    Returns:
        The metrics (``metrics.json``).
    """
    import pandas as pd
    from IPython.display import Markdown, display

    folder = Path(evaluation_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    display(metrics_table(metrics))
    show_charts(folder)
    per_patient = folder / "per_patient.csv"
    if per_patient.is_file():
        display(Markdown("**Per patient**"), pd.read_csv(per_patient).head(max_rows))
    return metrics


# ----------------------------------------------------------------------------- running
def parse_value(text: str):
    """Turn a ``-p NAME VALUE`` string into int, float, bool or None when it reads as one."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@contextlib.contextmanager
def _kernel_environment() -> Iterator[None]:
    """Point the ``python3`` kernel at this interpreter and give the kernel sane settings.

    A temporary kernelspec on ``JUPYTER_PATH`` (searched before the user's) runs
    ``sys.executable``, so the notebooks use this virtual environment whatever other
    kernels are installed; matplotlib draws inline even when ``MPLBACKEND=Agg`` is set.
    """
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "MPLBACKEND", "TF_CPP_MIN_LOG_LEVEL",
                                             "PYTHONPATH", "PYDEVD_DISABLE_FILE_VALIDATION")}
    with tempfile.TemporaryDirectory(prefix="anna-kernel-") as folder:
        spec_dir = Path(folder) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        # The kernel app's own log stays at ERROR: its plain-TCP notice on every start is noise for a
        # local, loopback-only kernel. Warnings and errors from the notebooks' code are not affected.
        spec = {"argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher",
                         "-f", "{connection_file}", "--IPKernelApp.log_level=ERROR"],
                "display_name": "Python 3 (ANNa)", "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [folder, saved["JUPYTER_PATH"]]))
        os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = saved["TF_CPP_MIN_LOG_LEVEL"] or "2"
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(config.PROJECT_ROOT), saved["PYTHONPATH"]]))
        os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_notebooks(data: str | os.PathLike | None, parameters: Mapping[str, object] | None = None,
                  output_dir: str | os.PathLike | None = None, notebooks: Sequence[str] | None = None,
                  progress: bool = True, log_output: bool = False) -> list[Path]:
    """Execute the notebook series headless with papermill, in order.

    Args:
        data: Dataset root (``DATA_DIR``); empty/None resolves as ``resolve_data_dir`` does.
        parameters: Further notebook parameters (``IMAGE_SIZE``, ``EPOCHS``, …).
        output_dir: Root of the outputs (``OUTPUT_DIR``); ``config.OUTPUT_DIR`` by default.
        notebooks: Names (or prefixes such as ``"4"``) of the notebooks to run; all by default.
        progress: Show papermill's per-cell progress bar.
        log_output: Stream the notebooks' own output (training epochs…) to the terminal.

    Returns:
        The executed notebooks, under ``<output_dir>/notebooks/<timestamp>/``.

    Raises:
        NotebookError: A cell failed; the message names the notebook and its executed copy.
        ValueError: A parameter name that the notebooks do not have.
    """
    import papermill

    params = dict(parameters or {})
    selected = select_notebooks(notebooks)
    known = set(papermill.inspect_notebook(str(config.NOTEBOOKS_DIR / selected[0])))
    unknown = sorted(set(params) - known)
    if unknown:  # a typo such as EPOCH would otherwise be injected and silently ignored
        raise ValueError(f"unknown notebook parameter(s) {', '.join(unknown)}; the notebooks take "
                         f"{', '.join(sorted(known))}")
    # DATA_DIR / OUTPUT_DIR given as parameters count like the arguments.
    data = data or params.pop("DATA_DIR", None) or None
    output_dir = output_dir or params.pop("OUTPUT_DIR", None) or None
    output_dir = Path(output_dir or config.OUTPUT_DIR).expanduser().resolve()
    params["OUTPUT_DIR"] = str(output_dir)
    scale = str(params.get("SYNTHETIC_SCALE") or "small")
    params["DATA_DIR"] = str(resolve_data_dir(data, output_dir if not data else None, scale=scale))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = output_dir / config.NOTEBOOKS_SUBDIR / stamp
    for suffix in range(1, 100):  # two runs in the same second never share a folder
        if not target.exists():
            break
        target = output_dir / config.NOTEBOOKS_SUBDIR / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("DATA_DIR", "OUTPUT_DIR"))
    print(f"data: {params['DATA_DIR']}\noutputs: {output_dir}\nparameters: {shown or '(notebook defaults)'}",
          flush=True)
    if is_synthetic(params["DATA_DIR"]):
        from modules.data import synthetic as synth

        print(synth.SYNTHETIC_BANNER, flush=True)
    executed = []
    started = time.perf_counter()
    with _kernel_environment():
        for index, name in enumerate(selected, 1):
            out_path = target / name
            print(f"[{index}/{len(selected)}] {name} …", flush=True)
            tic = time.perf_counter()
            try:
                papermill.execute_notebook(
                    str(config.NOTEBOOKS_DIR / name), str(out_path), parameters=params,
                    kernel_name=KERNEL_NAME, progress_bar=progress, log_output=log_output,
                    cwd=str(config.NOTEBOOKS_DIR), start_timeout=120)
            except papermill.PapermillExecutionError as error:
                raise NotebookError(f"{name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                                    f"see the executed notebook {out_path}") from error
            print(f"[{index}/{len(selected)}] {name} done in {time.perf_counter() - tic:.0f} s -> {out_path}",
                  flush=True)
            executed.append(out_path)
    print(f"{len(executed)} notebook(s) in {time.perf_counter() - started:.0f} s; charts: "
          f"{output_dir / config.VIZ_SUBDIR / 'index.html'}", flush=True)
    return executed


def select_notebooks(notebooks: Sequence[str] | None = None) -> list[str]:
    """Names of the notebooks to run, in series order.

    Args:
        notebooks: Names or prefixes (``"1"``, ``"4.Test"``); None for all four.

    Returns:
        File names from ``NOTEBOOK_NAMES``.
    """
    if not notebooks:
        return list(NOTEBOOK_NAMES)
    chosen = []
    for wanted in notebooks:
        matches = [n for n in NOTEBOOK_NAMES if n == wanted or n.startswith(f"{wanted}.")
                   or n.removesuffix(".ipynb") == wanted]
        if not matches:
            raise ValueError(f"no notebook {wanted!r}; choose from {', '.join(NOTEBOOK_NAMES)}")
        chosen += matches
    return [n for n in NOTEBOOK_NAMES if n in chosen]


def demo(output_dir: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
         progress: bool = True) -> list[Path]:
    """Run the four notebooks with small parameters: the README's first command.

    Args:
        output_dir: Root of the outputs; ``config.OUTPUT_DIR`` by default.
        data: Dataset root; by default the real data when ``input/C-NMC_Leukemia`` exists,
            else a synthetic set generated (once) under the outputs.
        progress: Show papermill's progress bars.

    Returns:
        The executed notebooks.
    """
    real = (not is_synthetic(data)) if data else config.REAL_DATA_DIR.is_dir()
    parameters = DEMO_REAL_PARAMETERS if real else DEMO_SYNTHETIC_PARAMETERS
    if real:
        print("real data found: a short demo run (few epochs at 64 px); train longer with "
              "`python -m modules train` or run-notebooks -p EPOCHS 30", flush=True)
    return run_notebooks(data, parameters, output_dir, progress=progress)
