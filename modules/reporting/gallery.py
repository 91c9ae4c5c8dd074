"""The chart gallery ``output/viz/``: a folder per notebook or evaluation, replaced by its re-run, and an index.

Each group has one writer, so no lock is taken; two publishers finishing at the same instant can at worst
leave one group out of ``index.html`` until the next ``publish`` or ``write_index``.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from modules import config
from modules.files import atomic_path, write_json_atomic, write_text_atomic
from modules.reporting import HTML_TEMPLATES, charts

#: Heading, synthetic flag, update time and captions of one group, in its folder.
GROUP_JSON = "gallery.json"


class GalleryError(ValueError):
    """A gallery group that cannot be published or read."""


def _local_time(stamp: str) -> str:
    """An ISO time as ``2026-12-01 20:51`` in this machine's time zone."""
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(stamp)


def publish(source: str | Path, viz_dir: str | Path, group: str, heading: str = "", synthetic: bool = False) -> Path:
    """Mirror the charts saved in ``source`` into ``viz_dir/<group>/`` (replaced in place) under ``heading``, marked
    ``synthetic`` (synthetic cells or a model trained on them); rewrite the index; returns the group's folder."""
    source, viz_dir = Path(source), Path(viz_dir)
    if not group or "/" in group or "\\" in group or group.startswith("."):
        raise GalleryError(f"gallery group {group!r} must be a plain folder name such as '1.EDA'")
    captions = {name: text for name, text in charts.chart_captions(source).items()
                if (source / f"{name}.png").is_file()}
    if not captions:
        raise FileNotFoundError(f"no charts in {source}: save them with charts.save_chart first")
    target = viz_dir / group
    for file in [source / f"{name}{suffix}" for name in captions for suffix in (".png", ".csv")]:
        if file.is_file():
            with atomic_path(target / file.name) as tmp:
                shutil.copyfile(file, tmp)
    for old in [*target.glob("*.png"), *target.glob("*.csv")]:
        if old.stem not in captions and not old.name.startswith("."):  # a chart the re-run no longer makes
            old.unlink()
    write_json_atomic(target / GROUP_JSON, {"heading": heading or group, "synthetic": bool(synthetic),
                                            "updated": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                                            "charts": captions})
    write_index(viz_dir)
    return target


def evaluation_heading(metrics: dict, run_config: dict) -> str:
    """``Evaluation of run 2026-12-01 20:51 (anna, 64 px) on <dataset>, validation split [which side is synthetic]``."""
    size = (metrics.get("preprocessing") or {}).get("image_size")
    details = ", ".join(str(part) for part in (run_config.get("architecture"), f"{size} px" if size else None) if part)
    created = _local_time(run_config["created"]) if run_config.get("created") else metrics["run_id"]
    patients = metrics.get("patients_filter") or []
    patients = ", ".join(map(str, [patients] if isinstance(patients, str) else patients))
    threshold = str(metrics.get("threshold_source", "auto")).startswith("auto")
    return (f"Evaluation of run {created}" + (f" ({details})" if details else "")
            + f" on {metrics['dataset']}, {metrics['split']} split" + (f", patients {patients}" if patients else "")
            + ("" if threshold else f", threshold {metrics['threshold']:.3f}")
            + charts.synthetic_note(metrics.get("synthetic_model"), metrics.get("synthetic_data")))


def publish_evaluation(folder: str | Path, viz_dir: str | Path, metrics: dict, run_config: dict) -> Path:
    """Publish an evaluation folder as the group ``<run_id>__<dataset>_<split>``: re-evaluating replaces it."""
    patients = metrics.get("patients_filter")
    group = f"{metrics['run_id']}__{metrics['dataset']}_{metrics['split']}" + (
        "" if not patients else "_unseen" if patients == "unseen" else "_patients")
    return publish(folder, viz_dir, group, evaluation_heading(metrics, run_config),
                   bool(metrics.get("synthetic_data") or metrics.get("synthetic_model")))


def _read_group(path: Path) -> dict:
    """A group's ``gallery.json`` with the charts still on disk; GalleryError naming a damaged one."""
    try:
        meta = json.loads(path.read_text())
        shown = [{"name": name, "caption": caption, "csv": (path.parent / f"{name}.csv").is_file()}
                 for name, caption in meta["charts"].items() if (path.parent / f"{name}.png").is_file()]
        return {**meta, "folder": path.parent.name, "charts": shown}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise GalleryError(f"{path} is damaged ({error}); delete {path.parent} and re-run the notebook or "
                           "evaluation that made it") from error


def write_index(viz_dir: str | Path | None = None) -> Path:
    """Rewrite ``index.html`` from every group's ``gallery.json``, newest group first; returns its path."""
    viz_dir = Path(viz_dir or config.VIZ_DIR)
    groups = sorted((_read_group(path) for path in viz_dir.glob(f"*/{GROUP_JSON}")),
                    key=lambda group: group["updated"], reverse=True)
    page = HTML_TEMPLATES.get_template("gallery.html").render(
        groups=[{**group, "updated": _local_time(group["updated"])} for group in groups],
        synthetic=any(group["synthetic"] for group in groups), count=sum(len(group["charts"]) for group in groups))
    return write_text_atomic(viz_dir / "index.html", page)
