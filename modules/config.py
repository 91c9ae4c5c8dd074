"""Paths and defaults shared by every ANNa module, notebook and the command line: defined here only."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Root of the repository (the folder holding ``modules/``).
PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent
#: Where users put the real data (``input/C-NMC_Leukemia``).
INPUT_DIR: Path = PROJECT_ROOT / "input"
#: Everything generated: arrays, CSVs, models, charts, executed notebooks.
OUTPUT_DIR: Path = Path(os.environ.get("ANNA_OUTPUT_DIR", PROJECT_ROOT / "output"))
ARRAYS_SUBDIR, CSV_SUBDIR, MODELS_SUBDIR, VIZ_SUBDIR = "arrays", "csv", "models", "viz"
EVALUATIONS_SUBDIR, NOTEBOOKS_SUBDIR = "evaluations", "notebooks"
#: ``charts/<notebook>/``: a notebook's charts before they are published to viz/.
CHARTS_SUBDIR = "charts"
#: ``predictions/<run_id>__<dataset>.csv``: what ``predict`` writes when no --csv is given.
PREDICTIONS_SUBDIR = "predictions"
VIZ_DIR: Path = OUTPUT_DIR / VIZ_SUBDIR
NOTEBOOKS_DIR: Path = PROJECT_ROOT / "notebooks"

#: The Kaggle "leukemia-classification" download unpacks to this folder name.
DATASET_FOLDER_NAME = "C-NMC_Leukemia"
REAL_DATA_DIR: Path = INPUT_DIR / DATASET_FOLDER_NAME
#: Where the synthetic stand-in is generated when the real data is absent.
SYNTHETIC_DATA_DIR: Path = OUTPUT_DIR / "synthetic" / DATASET_FOLDER_NAME
#: Marker file written at the root of every synthetic dataset.
SYNTHETIC_MARKER = "SYNTHETIC_CELLS.txt"
#: Real C-NMC cells for tests and benchmarks (never copied into the repository).
SHARED_DATA_DIR: Path = PROJECT_ROOT.parent / "shared" / "data"

# Kaggle layout names.
TRAINING_DIR = "training_data"
VALIDATION_DIR = "validation_data"
VALIDATION_IMAGES_DIR = "C-NMC_test_prelim_phase_data"
VALIDATION_LABELS_CSV = "C-NMC_test_prelim_phase_data_labels.csv"
VALIDATION_LABEL_COLUMNS = ("Patient_ID", "new_names", "labels")
TESTING_DIR = "testing_data"
TESTING_IMAGES_DIR = "C-NMC_test_final_phase_data"
CLASS_FOLDERS = {"all": 1, "hem": 0}
#: Positive class = ``all`` (leukemic blast) = 1, as in the Kaggle labels CSV.
CLASS_NAMES = {1: "all", 0: "hem"}
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
MANIFEST_COLUMNS = ("path", "name", "original_name", "patient_id", "label", "split", "fold")

# Preprocessing defaults.
DEFAULT_IMAGE_SIZE = 96
DEFAULT_MARGIN = 4  # pixels of background kept around the cell's bounding box (at 450 px)
#: Smallest side (source pixels) of the square a cell is padded to. 0 crops tightly (each cell fills the
#: frame); a 320 px canvas keeps one scale, but the network then leaned on cell size: grouped CV at 96 px,
#: mean ROC AUC 0.90-0.92 tight against 0.84-0.86 on the canvas (docs/BENCHMARKS.md).
DEFAULT_CANVAS = 0
#: A pixel belongs to the cell when any channel exceeds this value (background is black).
BACKGROUND_THRESHOLD = 4

#: Choices the command line offers without importing the stage that uses them.
SYNTHETIC_SCALES = ("tiny", "small")
POLICIES = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "default", "mirrored", "tpu", "multi-worker")
EVALUATION_SPLITS = ("validation", "train", "test-labeled")
#: What the network sees (``modeling.network``), how its training cells are augmented (``modeling.inputs``),
#: what the U-Net learns and how the threshold is chosen (``modeling.training``).
INPUT_TRANSFORMS = ("rgb", "cell_standardized")
MASK_TARGETS = ("cell", "nucleus")
THRESHOLD_RULES = ("youden", "sensitivity")


@dataclass(frozen=True)
class ModelSettings:
    """Defaults of the ANNa network (``modeling.network.build_anna``); the CLI and notebooks read them."""

    image_size: int = DEFAULT_IMAGE_SIZE
    depth: int = 4  # down-sampling steps; image_size must be divisible by 2**depth
    base_filters: int = 8  # filters of the first level, doubled at each level down
    batch_norm: bool | str = True  # True, "instance" or False
    dropout: float = 0.1
    segmentation: bool = True  # the cell_mask output
    head_units: int = 64
    #: "rgb" (scaled to [0, 1]) or "cell_standardized" (each cell's colours standardized, see modeling.network)
    input_transform: str = "rgb"
    stem_stride: int = 1  # 2: a strided convolution first, the U-Net at half the image's side


@dataclass(frozen=True)
class TrainSettings:
    """Defaults of a training run (``modeling.training.train_model``)."""

    epochs: int = 30  # the most; early stopping may end sooner
    batch_size: int = 16
    learning_rate: float = 1e-3
    mask_loss_weight: float = 0.25
    #: What the U-Net's second output learns: "cell" (the cell's non-black region) or "nucleus"
    #: (``preprocessing.nucleus``: the nucleus found from the stain's colour).
    mask_target: str = "cell"
    patience: int = 8  # early stopping, epochs without a better validation AUC
    lr_patience: int = 3  # epochs without improvement before the learning rate is halved
    val_fraction: float = 0.2  # share of each class's patients held out when there is one fold
    seed: int = 42
    augment: bool = True
    class_weighting: bool = True
    #: "youden": Youden's J over the validation cells; "sensitivity": the highest threshold that calls
    #: ``target_sensitivity`` of the validation blasts leukemic.
    threshold_rule: str = "youden"
    target_sensitivity: float = 0.9
    policy: str = "auto"  # see POLICIES
    strategy: str = "auto"  # see STRATEGIES


#: ``train --preset gpu``: a larger network for a GPU (e.g. Colab's), the resolution published C-NMC systems use;
#: built and tested for building only, its accuracy not measured (this project's machines have no GPU).
PRESETS = {"cpu": {}, "gpu": {"image_size": 384, "stem_stride": 2, "base_filters": 16, "batch_size": 32}}

#: Single values of the settings above, for the stages that need one (never restated elsewhere).
DEFAULT_SEED = TrainSettings.seed
DEFAULT_EPOCHS = TrainSettings.epochs


def arrays_dir(dataset: str, size: int, output_dir: Path | None = None, canvas: int = DEFAULT_CANVAS,
               margin: int = DEFAULT_MARGIN) -> Path:
    """``<output_dir>/arrays/<dataset>_<size>``, plus ``_canvas<C>`` / ``_margin<M>`` where not the default
    (so settings never replace each other's cache)."""
    suffix = "" if int(canvas) == DEFAULT_CANVAS else f"_canvas{int(canvas)}"
    suffix += "" if int(margin) == DEFAULT_MARGIN else f"_margin{int(margin)}"
    return Path(output_dir or OUTPUT_DIR) / ARRAYS_SUBDIR / f"{dataset}_{size}{suffix}"
