"""Reporting: chart data and captions, scikit-learn's displays, the report templates and the gallery."""
from __future__ import annotations

import json
import threading

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from modules.reporting import charts, gallery, report  # noqa: E402


def _saved(folder, names, caption="caption of {}"):
    for name in names:
        fig, ax = plt.subplots()
        ax.bar(["all", "hem"], [3, 1])
        charts.save_chart(fig, pd.DataFrame({"class": ["all", "hem"], "cells": [3, 1]}), name,
                          caption.format(name), folder)
        plt.close(fig)
    return folder


def _predictions(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    p = np.clip(labels * 0.4 + rng.random(n) * 0.6, 0, 1)
    return pd.DataFrame({"label": labels, "p_leukemia": p, "prediction": (p >= 0.5).astype(int)})


def test_synthetic_note_names_the_synthetic_side():
    assert charts.synthetic_note(True, False) == " [model trained on SYNTHETIC cells, scored on real cells]"
    assert charts.synthetic_note(False, True) == " [model trained on real cells, scored on SYNTHETIC cells]"
    assert charts.synthetic_note(True, True) == " [model trained on SYNTHETIC cells, scored on SYNTHETIC cells]"
    assert charts.synthetic_note(cells_synthetic=True) == " [SYNTHETIC cells]"
    assert charts.synthetic_note(model_synthetic=True) == " [model trained on SYNTHETIC cells]"
    assert charts.synthetic_note(False, False) == charts.synthetic_note() == ""


def test_save_chart_writes_png_csv_and_caption(tmp_path):
    folder = _saved(tmp_path / "charts", ["counts", "areas"])
    assert pd.read_csv(folder / "counts.csv")["cells"].tolist() == [3, 1]
    assert (folder / "counts.png").read_bytes()[:4] == b"\x89PNG"
    assert charts.chart_captions(folder) == {"counts": "caption of counts", "areas": "caption of areas"}
    assert not list(folder.glob(".*partial*"))
    with pytest.raises(ValueError, match="plain file stem"):
        charts.save_chart(plt.figure(), pd.DataFrame(), "../x", "", folder)


def test_metric_charts_come_from_sklearn_displays_with_their_numbers():
    predictions = _predictions()
    per_patient = pd.DataFrame({"patient_id": ["1", "2"], "cells": [120, 80], "label": [1, 0], "accuracy": [0.9, 0.5]})
    drawn = charts.metric_charts(predictions, 0.5, per_patient, charts.synthetic_note(True, False))
    assert list(drawn) == ["confusion_matrix", "roc_curve", "precision_recall_curve", "calibration_curve",
                           "probability_histogram", "per_patient_accuracy"]
    assert drawn["confusion_matrix"].data["count"].sum() == len(predictions)
    assert "model trained on SYNTHETIC cells, scored on real cells" in drawn["roc_curve"].figure.axes[0].get_title()
    calibration = drawn["calibration_curve"]
    assert calibration.data["cells"].sum() == len(predictions)
    assert [ax.get_ylabel() for ax in calibration.figure.axes] == ["observed share of leukemic cells", "cells per bin"]
    histogram = drawn["probability_histogram"].figure
    histogram.canvas.draw()
    ax = histogram.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # beside the bars, never over them
    for chart in drawn.values():
        plt.close(chart.figure)
    one_class = predictions.assign(label=1)
    assert "roc_curve" not in charts.metric_charts(one_class, 0.5, per_patient.head(0))


def test_training_curves_count_epochs_from_one_and_mark_the_restored_epoch(tmp_path):
    pd.DataFrame({"epoch": [0, 1, 2, 3], "loss": [0.9, 0.7, 0.6, 0.65], "val_loss": [1.0, 0.8, 0.7, 0.75],
                  "learning_rate": 0.001}).to_csv(tmp_path / "history.csv", index=False)
    chart = charts.training_chart(tmp_path, {"training": {"best_epoch": 3}})
    assert chart.data["epoch"].tolist() == [1, 2, 3, 4]
    ax = chart.figure.axes[0]
    chart.figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert any("restored epoch 3" in text.get_text() for text in ax.get_legend().get_texts())
    assert charts.training_chart(tmp_path / "none", {}) is None
    plt.close(chart.figure)


def _metrics(**extra) -> dict:
    return {"run_id": "20261201-205107-anna-s64", "dataset": "<b>cells</b>", "split": "validation",
            "data": "/data/x", "split_note": "all cells", "n": 3, "n_positive": 2, "n_negative": 1, "n_patients": 2,
            "cells_from_unseen_patients": 3, "cells_from_run_training_patients": 0,
            "cells_from_run_validation_patients": 0, "model": "/runs/r/model.keras", "threshold": 0.4321,
            "threshold_source": "auto: stored", "roc_auc": 0.9, "ci": {"roc_auc": [0.8, 0.95]},
            "ci_method": "bootstrap", "ci_resampling": "patients", "synthetic_data": False,
            "synthetic_model": True, "preprocessing": {"image_size": 64}, **extra}


def test_report_is_rendered_from_templates_with_html_escaped(tmp_path):
    _saved(tmp_path, ["roc_curve"])
    pd.DataFrame({"patient_id": ["11", "3"], "cells": [2, 1], "label": [1, 0], "mixed_labels": False,
                  "mean_p_leukemia": [0.7, 0.2], "share_called_leukemic": [1.0, 0.0],
                  "accuracy": [1.0, 1.0]}).to_csv(tmp_path / "per_patient.csv", index=False)
    md, page = report.write_report(tmp_path, _metrics(), {"val_patients": ["11", "3", "H2"],
                                                          "training": {"epochs_trained": 4, "best_epoch": 2}})
    text, html = md.read_text(), page.read_text()
    assert "<b>cells</b>" not in html and "&lt;b&gt;cells&lt;/b&gt;" in html  # autoescaped
    assert "SYNTHETIC: the model's training cells are synthetic" in text and "class=\"banner\"" in html
    assert "0.4321" in text and "0.800 – 0.950" in html and "validation patients: 3, 11, H2" in text
    assert "for 4 epochs (weights of epoch 2 kept)" in text
    assert "<img src='roc_curve.png'" in html and "![roc_curve](roc_curve.png)" in text
    assert text.index("| 3 |") < text.index("| 11 |")  # patients in numeric order


def test_gallery_replaces_a_rerun_in_place_with_readable_headings(tmp_path):
    viz = tmp_path / "viz"
    first = _saved(tmp_path / "eda", ["counts", "areas"])
    gallery.publish(first, viz, "1.EDA", "1.EDA — the cells", synthetic=True)
    again = _saved(tmp_path / "eda2", ["counts"], "new caption of {}")
    group = gallery.publish(again, viz, "1.EDA", "1.EDA — the cells", synthetic=True)
    assert sorted(p.name for p in group.iterdir()) == ["counts.csv", "counts.png", gallery.GROUP_JSON]
    page = (viz / "index.html").read_text()
    assert page.count("<img ") == 1 and "new caption of counts" in page and "caption of areas" not in page
    assert "1.EDA — the cells" in page and "SYNTHETIC cells or models" in page
    assert not [p for p in viz.rglob("*") if "lock" in p.name or "partial" in p.name]
    metrics = _metrics(synthetic_model=False, dataset="c-nmc")
    evaluation = gallery.publish_evaluation(first, viz, metrics, {"created": "2026-12-01T20:51:07+00:00",
                                                                  "architecture": "<i>anna</i>"})
    assert evaluation.name == "20261201-205107-anna-s64__c-nmc_validation"
    page = (viz / "index.html").read_text()
    assert "Evaluation of run 2026-12-0" in page and "(&lt;i&gt;anna&lt;/i&gt;, 64 px)" in page
    assert page.index("Evaluation of run") < page.index("1.EDA — the cells")  # newest first
    with pytest.raises(gallery.GalleryError, match="plain folder name"):
        gallery.publish(first, viz, "../elsewhere")
    with pytest.raises(FileNotFoundError, match="save_chart"):
        gallery.publish(tmp_path / "empty", viz, "x")
    (group / gallery.GROUP_JSON).write_text("{broken")
    with pytest.raises(gallery.GalleryError, match=r"1\.EDA.*gallery\.json"):
        gallery.write_index(viz)


def test_concurrent_publishers_of_different_groups_keep_every_chart(tmp_path):
    source = _saved(tmp_path / "charts", [f"chart{i}" for i in range(12)])
    viz = tmp_path / "viz"
    threads = [threading.Thread(target=gallery.publish, args=(source, viz, f"run{k}", f"run {k}")) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for k in range(3):
        meta = json.loads((viz / f"run{k}" / gallery.GROUP_JSON).read_text())
        assert meta["charts"] == charts.chart_captions(source)
    gallery.write_index(viz)
    assert (viz / "index.html").read_text().count("<img ") == 36
