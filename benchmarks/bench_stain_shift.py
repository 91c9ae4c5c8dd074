"""How a finished cross-validation's networks hold up when the held-out cells come from another stain batch.

Subjects outside fold_0 differ from it in stain (the README's unseen-subject figures); fold_0's folds barely do.
This scores every ANNa job of ``python -m modules cv --out DIR`` (at its own threshold) on its held-out cells
as they are and with every cell's stain changed alike: the haematoxylin or the eosin amount (scikit-image's
colour deconvolution, ``rgb2hed``) or both scaled, the background kept black. A proxy for a lab's other batch,
not a measurement on other subjects. Printed per model and shift: the means over the folds of ROC AUC,
sensitivity and specificity, and the mean and worst share of cells right over the held-out healthy subjects.

    python benchmarks/bench_stain_shift.py output/cv/S42 [--models anna,cstd]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import skimage.color  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

#: (haematoxylin, eosin) scale of each shift: a paler, a stronger stain, and each stain alone.
SHIFTS = {"none": (1.0, 1.0), "both x0.8": (0.8, 0.8), "both x1.25": (1.25, 1.25), "haematoxylin x0.8": (0.8, 1.0),
          "haematoxylin x1.25": (1.25, 1.0), "eosin x0.8": (1.0, 0.8), "eosin x1.25": (1.0, 1.25)}


def shift_stain(images: np.ndarray, haematoxylin: float, eosin: float) -> np.ndarray:
    """(N, S, S, 3) uint8 RGB cells with each stain's amount scaled; black background pixels stay black."""
    if haematoxylin == eosin == 1.0:
        return images
    hed = skimage.color.rgb2hed(images)
    hed[..., 0] *= haematoxylin
    hed[..., 1] *= eosin
    shifted = np.clip(np.rint(skimage.color.hed2rgb(hed) * 255), 0, 255).astype(np.uint8)
    return np.where(images.max(-1, keepdims=True) > 4, shifted, images)


def score(labels: np.ndarray, patients: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    called = p >= threshold
    right = pd.Series(called == (labels == 1))
    healthy = right[labels == 0].groupby(patients[labels == 0]).mean()
    return {"roc_auc": roc_auc_score(labels, p), "sensitivity": called[labels == 1].mean(),
            "specificity": (~called[labels == 0]).mean(), "healthy": healthy.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path)
    parser.add_argument("--models", default=None, help="comma-separated cv models (default: every ANNa job)")
    args = parser.parse_args()
    from modules import preprocessing
    from modules.modeling import saving

    rows = []
    for job in sorted(args.cv_dir.glob("fold*_*/")):
        model = job.name.split("_", 1)[1]
        if not (job / "result.json").is_file() or model == "cell_area" or (
                args.models and model not in args.models.split(",")):
            continue
        result = json.loads((job / "result.json").read_text())
        run_dir = job / "runs" / Path(result["run_dir"]).name  # recorded relative to where cv ran
        run = saving.load_run(run_dir)
        arrays = preprocessing.load_arrays(run["data"]["arrays_dir"])
        heldout = pd.read_csv(job / "heldout.csv", dtype={"patient_id": str}).set_index("name")
        index = np.flatnonzero(arrays.manifest["name"].isin(heldout.index))
        cells = heldout.loc[arrays.manifest["name"].iloc[index]]  # joined by name, never by order
        if len(cells) != len(heldout):
            raise SystemExit(f"{job}: {len(heldout) - len(cells)} held-out cells are not in {arrays.path}")
        images = np.asarray(arrays.images[index])
        network = saving.load_model(run_dir)
        for shift, (haematoxylin, eosin) in SHIFTS.items():
            p = saving.predict_outputs(network, shift_stain(images, haematoxylin, eosin))["p_leukemia"]
            rows.append({"model": model, "fold": result["fold"], "shift": shift,
                         **score(cells["label"].to_numpy(), cells["patient_id"].to_numpy(), p, result["threshold"])})
        print(f"{job.name}: scored", flush=True)
    table = pd.DataFrame(rows)
    for (model, shift), group in table.groupby(["model", "shift"], sort=False):
        healthy = pd.Series({k: v for d in group["healthy"] for k, v in d.items()})
        print(f"{model:<8} | {shift:<18} | folds {len(group)} | ROC AUC {group['roc_auc'].mean():.3f} | sensitivity "
              f"{group['sensitivity'].mean():.3f} | specificity {group['specificity'].mean():.3f} | healthy subjects "
              f"mean {healthy.mean():.2f} worst {healthy.min():.2f}")


if __name__ == "__main__":
    main()
