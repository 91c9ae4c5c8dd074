"""The notebook series: ``run_notebooks`` executes ``1.EDA`` … ``4.Test`` headless (papermill) on this
interpreter's kernel, ``demo`` is the README's first command, the other functions keep the cells short."""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import subprocess
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

NOTEBOOK_NAMES = ("1.EDA.ipynb", "2.Image_preprocessing.ipynb", "3.ANNa.ipynb", "4.Test.ipynb")
#: The kernel name written in the notebooks (resolved to the current interpreter when run).
KERNEL_NAME = "python3"
#: What the notebooks import; ``setup_session`` installs requirements.txt when one is missing.
REQUIRED_IMPORTS = ("cv2", "keras", "matplotlib", "pandas", "sklearn", "tensorflow", "tqdm")
#: Demo settings on the synthetic stand-in: small enough for a 2-core CPU in a few minutes.
DEMO_SYNTHETIC_PARAMETERS = {"IMAGE_SIZE": 64, "EPOCHS": 12, "BATCH_SIZE": 32, "BASE_FILTERS": 8,
                             "DEPTH": 3, "SAMPLE_LIMIT": 0, "SYNTHETIC_SCALE": "small"}
#: Demo settings on the real data: a short look, not a full training run.
DEMO_REAL_PARAMETERS = {"IMAGE_SIZE": 64, "EPOCHS": 3, "BATCH_SIZE": 32, "BASE_FILTERS": 8,
                        "DEPTH": 3, "SAMPLE_LIMIT": 600}


class NotebookError(RuntimeError):
    """A notebook of the series failed; the message names it and its executed copy."""


def setup_session(drive_data_dir: str = "") -> None:
    """Work from the repository root, install requirements.txt if an import is missing, mount Drive if asked
    (standard library only: the setup cell calls it before anything is installed)."""
    os.chdir(config.PROJECT_ROOT)
    missing = [name for name in REQUIRED_IMPORTS if importlib.util.find_spec(name) is None]
    if missing:
        print(f"installing requirements.txt (missing: {', '.join(missing)})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                        str(config.PROJECT_ROOT / "requirements.txt")], check=True)
    in_colab = "google.colab" in sys.modules
    if in_colab and drive_data_dir:
        from google.colab import drive

        drive.mount("/content/drive")
    print(f"ANNa repository: {config.PROJECT_ROOT} (Colab: {in_colab})")


def resolve_data_dir(data: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
                     scale: str = "small") -> Path:
    """The dataset: ``data`` if given (it must exist), else ``input/C-NMC_Leukemia``, else a synthetic
    stand-in drawn once under ``<output_dir>/synthetic`` and reused."""
    if data:
        path = Path(data).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"data folder {path} not found: pass the C-NMC_Leukemia folder "
                                    "(see input/README.md) or leave DATA_DIR empty for the synthetic set")
        return path
    if config.REAL_DATA_DIR.is_dir():
        return config.REAL_DATA_DIR.resolve()
    from modules.data import synthetic

    parent = Path(output_dir) / "synthetic" if output_dir else config.SYNTHETIC_DATA_DIR.parent
    return synthetic.make_synthetic_dataset(parent, scale=scale)


def data_banner_html(data_dir: str | os.PathLike) -> str:
    """HTML banner saying which data the numbers come from (red and loud when synthetic)."""
    import html

    from modules.data import synthetic

    if synthetic.is_synthetic(data_dir):
        return ("<div style='border:3px solid #c0392b;background:#fdecea;color:#922b21;padding:10px;"
                "font-size:1.1em;font-weight:bold'>&#9888; " + html.escape(synthetic.SYNTHETIC_BANNER)
                + f"<br><span style='font-weight:normal'>data: {html.escape(str(data_dir))}</span></div>")
    return ("<div style='border:1px solid #aaa;background:#f4f6f7;padding:6px'>Data: real C-NMC 2019 cells "
            f"from <code>{html.escape(str(data_dir))}</code></div>")


def show_data_banner(data_dir: str | os.PathLike) -> None:
    """Display ``data_banner_html`` (and print the synthetic banner for the terminal)."""
    from IPython.display import HTML, display

    from modules.data import synthetic

    display(HTML(data_banner_html(data_dir)))
    if synthetic.is_synthetic(data_dir):
        print(synthetic.SYNTHETIC_BANNER)


def find_model(model_path: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None) -> Path:
    """The run folder (or ``.keras`` file) to evaluate: ``model_path`` (it must exist), else the newest
    finished run under ``<output_dir>/models`` (FileNotFoundError when there is none)."""
    if model_path:
        path = Path(model_path).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"MODEL_PATH {path} not found: pass a run folder under "
                                    "output/models or its model.keras")
        return path
    from modules.modeling import saving

    models_dir = Path(output_dir or config.OUTPUT_DIR) / config.MODELS_SUBDIR
    runs = {}
    for run in models_dir.glob("*/"):
        with contextlib.suppress(OSError, ValueError):  # an unreadable config.json: never the newest run
            runs[run] = saving.load_run(run) if (run / saving.MODEL_FILENAME).is_file() else {}
    finished = [run for run, conf in runs.items() if conf and conf.get("status", "complete") == "complete"]
    if not finished:
        raise FileNotFoundError(f"no trained run in {models_dir}: run notebooks/3.ANNa.ipynb or "
                                "`python -m modules train` first, or set MODEL_PATH")
    return max(finished, key=lambda run: (str(runs[run].get("created", "")), run.stat().st_mtime))


def evaluation_split(data_dir: str | os.PathLike, run: Mapping, split: str = "auto"
                     ) -> tuple[str, list[str] | None, str]:
    """``(split, patients, note)`` for ``evaluate_run``: the labeled validation_data cells when the data has
    them, else the run's held-out validation patients, who chose the best epoch and the threshold (the note says so)."""
    from modules.data import layout

    if split != "auto":
        return split, None, f"split {split!r} as requested"
    manifest = layout.scan_dataset(data_dir)
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
    """The headline metrics with their 95 % bootstrap intervals, one row each, as text: counts as integers,
    figures to 3 decimals, "n/a" where undefined, interval cells empty where there is no interval."""
    import pandas as pd

    def shown(value) -> str:
        return "n/a" if value is None else str(value) if isinstance(value, int) else f"{value:.3f}"

    names = ("n", "n_positive", "n_negative", "threshold", "roc_auc", "balanced_accuracy", "sensitivity",
             "specificity", "precision", "f1", "weighted_f1", "accuracy", "pr_auc", "mcc", "mask_dice_mean")
    intervals = metrics.get("ci") or {}
    rows = []
    for name in (name for name in names if name in metrics):
        low, high = (shown(bound) for bound in intervals[name][:2]) if intervals.get(name) else ("", "")
        rows.append({"metric": name, "value": shown(metrics[name]), "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows).set_index("metric")


def describe_subjects(per_patient: pandas.DataFrame) -> str:
    """Per class, the mean and the worst share of a subject's cells called right, each subject counted once."""
    sentences = []
    for label, noun, called in ((0, "healthy", "normal"), (1, "leukemic", "leukemic")):
        rows = per_patient[(per_patient["label"] == label) & ~per_patient["mixed_labels"].astype(bool)]
        if rows.empty:
            continue
        worst = rows.loc[rows["accuracy"].idxmin()]
        sentences.append(f"{len(rows)} {noun} subject{'s' * (len(rows) > 1)}: on average {rows['accuracy'].mean():.0%} "
                         f"of a subject's cells were called {called}; the worst, {worst['patient_id']}, "
                         f"{worst['accuracy']:.0%} of its {int(worst['cells'])} cells.")
    return " ".join(sentences) or "No patient ids are known for these cells: no subject-level figures."


def show_charts(folder: str | os.PathLike, names: Sequence[str] | None = None) -> list[Path]:
    """Display the charts of a folder (PNG + caption) in the order saved, or only ``names``; returns those shown."""
    from IPython.display import Image, Markdown, display

    from modules.reporting import charts as viz

    folder = Path(folder)
    captions = viz.chart_captions(folder)
    wanted = list(names) if names is not None else list(captions) + sorted(
        p.stem for p in folder.glob("*.png") if p.stem not in captions)
    shown = [png for name in wanted if (png := folder / f"{name}.png").is_file()]
    for png in shown:
        display(Markdown(f"**{png.stem}**: {captions.get(png.stem, '')}"), Image(filename=str(png)))
    return shown


def parse_value(text: str):
    """A ``-p NAME VALUE`` string as the int, float, bool or None it reads as, else as itself."""
    with contextlib.suppress(ValueError, SyntaxError):
        value = ast.literal_eval(text)
        if value is None or isinstance(value, (int, float)):
            return value
    return text


@contextlib.contextmanager
def _kernel_environment() -> Iterator[None]:
    """A temporary ``python3`` kernelspec, first on ``JUPYTER_PATH``, that runs ``sys.executable`` (this virtual
    environment, whatever other kernels exist), with matplotlib inline even when ``MPLBACKEND=Agg`` is set."""
    settings = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    saved = {key: os.environ.get(key) for key in ("JUPYTER_PATH", "PYTHONPATH", *settings)}
    with tempfile.TemporaryDirectory(prefix="anna-kernel-") as folder:
        spec_dir = Path(folder) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        # The kernel app's own log is noise for a local kernel (its plain-TCP notice at every start, the
        # "KeyboardInterrupt caught in kernel" of an interrupt-then-shutdown); the cells' own output stays.
        spec = {"argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher",
                         "-f", "{connection_file}", "--IPKernelApp.log_level=CRITICAL"],
                "display_name": "Python 3 (ANNa)", "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        os.environ.update(settings)
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [folder, saved["JUPYTER_PATH"]]))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(config.PROJECT_ROOT), saved["PYTHONPATH"]]))
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _new_folder(parent: Path) -> Path:
    """``parent/<UTC timestamp>``, suffixed so that two runs in the same second never share it."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for name in (stamp, *(f"{stamp}-{n}" for n in range(1, 100))):
        with contextlib.suppress(FileExistsError):
            (parent / name).mkdir(parents=True)
            return parent / name
    raise FileExistsError(f"100 notebook folders named {stamp}* in {parent}: remove some")


def run_notebooks(data: str | os.PathLike | None, parameters: Mapping[str, object] | None = None,
                  output_dir: str | os.PathLike | None = None, notebooks: Sequence[str] | None = None,
                  progress: bool = True, log_output: bool = False) -> list[Path]:
    """Execute the notebooks (all, or names/prefixes such as ``"4"``) in order with papermill into
    ``<output_dir>/notebooks/<timestamp>/``; ``data`` resolves as ``resolve_data_dir`` does, ``parameters`` are the
    notebooks' (``EPOCHS``, …). NotebookError names a failed notebook, ValueError an unknown parameter."""
    import papermill

    from modules.data import synthetic

    params = dict(parameters or {})
    selected = select_notebooks(notebooks)
    known = set(papermill.inspect_notebook(str(config.NOTEBOOKS_DIR / selected[0])))
    if unknown := sorted(set(params) - known):  # a typo such as EPOCH would otherwise be injected and silently ignored
        raise ValueError(f"unknown notebook parameter(s) {', '.join(unknown)}; the notebooks take "
                         f"{', '.join(sorted(known))}")
    # DATA_DIR / OUTPUT_DIR given as parameters count like the arguments.
    data = data or params.pop("DATA_DIR", None) or None
    output_dir = Path(output_dir or params.pop("OUTPUT_DIR", None) or config.OUTPUT_DIR).expanduser().resolve()
    params["OUTPUT_DIR"] = str(output_dir)
    scale = str(params.get("SYNTHETIC_SCALE") or "small")
    params["DATA_DIR"] = str(resolve_data_dir(data, output_dir if not data else None, scale=scale))
    target = _new_folder(output_dir / config.NOTEBOOKS_SUBDIR)
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("DATA_DIR", "OUTPUT_DIR"))
    print(f"data: {params['DATA_DIR']}\noutputs: {output_dir}\nparameters: {shown or '(notebook defaults)'}",
          flush=True)
    if synthetic.is_synthetic(params["DATA_DIR"]):
        print(synthetic.SYNTHETIC_BANNER, flush=True)
    started = time.perf_counter()
    with _kernel_environment():
        for index, name in enumerate(selected, 1):
            out_path, tic = target / name, time.perf_counter()
            print(f"[{index}/{len(selected)}] {name} …", flush=True)
            try:
                papermill.execute_notebook(str(config.NOTEBOOKS_DIR / name), str(out_path), parameters=params,
                                           kernel_name=KERNEL_NAME, progress_bar=progress, log_output=log_output,
                                           cwd=str(config.NOTEBOOKS_DIR), start_timeout=120)
            except papermill.PapermillExecutionError as error:
                raise NotebookError(f"{name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                                    f"see the executed notebook {out_path}") from error
            print(f"[{index}/{len(selected)}] {name} done in {time.perf_counter() - tic:.0f} s -> {out_path}",
                  flush=True)
    print(f"{len(selected)} notebook(s) in {time.perf_counter() - started:.0f} s; charts: "
          f"{output_dir / config.VIZ_SUBDIR / 'index.html'}", flush=True)
    return [target / name for name in selected]


def select_notebooks(notebooks: Sequence[str] | None = None) -> list[str]:
    """File names from ``NOTEBOOK_NAMES`` for names or prefixes (``"1"``, ``"4.Test"``), in series order."""
    chosen = []
    for wanted in notebooks or NOTEBOOK_NAMES:
        matches = [n for n in NOTEBOOK_NAMES if wanted in (n, n.removesuffix(".ipynb")) or n.startswith(f"{wanted}.")]
        if not matches:
            raise ValueError(f"no notebook {wanted!r}; choose from {', '.join(NOTEBOOK_NAMES)}")
        chosen += matches
    return [n for n in NOTEBOOK_NAMES if n in chosen]


def demo(output_dir: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
         progress: bool = True) -> list[Path]:
    """Run the four notebooks with small parameters (the README's first command) on ``data``, else
    ``input/C-NMC_Leukemia`` when present, else a synthetic set drawn once under the outputs."""
    from modules.data import synthetic

    real = (not synthetic.is_synthetic(data)) if data else config.REAL_DATA_DIR.is_dir()
    parameters = DEMO_REAL_PARAMETERS if real else DEMO_SYNTHETIC_PARAMETERS
    if real:
        print("real data found: a short demo run (few epochs at 64 px); train longer with "
              "`python -m modules train` or run-notebooks -p EPOCHS 30", flush=True)
    return run_notebooks(data, parameters, output_dir, progress=progress)
