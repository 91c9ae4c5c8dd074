"""Command line over the package: ``python -m modules <command> …``, plain argparse with defaults from ``config``.
Each handler imports its stage only when it runs, so ``--help`` and usage errors answer without loading TensorFlow;
a handler's docstring is its command's ``--help`` description."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from modules import config, notebooks  # notebooks: standard library only, like this module


# ----------------------------------------------------------------------------- data
def _run_synth(args: argparse.Namespace) -> None:
    """Draw a synthetic stand-in for C-NMC 2019 in the Kaggle layout (training folds, renamed validation cells with
    their labels CSV, testing cells). The last line printed is the dataset root."""
    from modules.data import synthetic

    print(synthetic.SYNTHETIC_BANNER)
    root = synthetic.make_synthetic_dataset(args.out, seed=args.seed, scale=args.scale)
    print(", ".join(f"{part}: {sum(1 for _ in (root / part).rglob('*.bmp'))} cells"
                    for part in (config.TRAINING_DIR, config.VALIDATION_DIR, config.TESTING_DIR)))
    print(root)


def _scan(data: Path):
    """``layout.scan_dataset(data)``, announced by the SYNTHETIC banner when its cells are synthetic."""
    from modules.data import layout, synthetic

    table = layout.scan_dataset(data)
    if table.attrs.get("synthetic"):
        print(synthetic.SYNTHETIC_BANNER)
    return table


def _run_scan(args: argparse.Namespace) -> None:
    """Scan a C-NMC_Leukemia folder (or any folder inside it), print the cells per split, class, fold and patient
    and the byte-identical files (subjects sharing cells are named: splits keep them together), and write
    OUT/csv/<dataset>_manifest.csv (its path is the last line)."""
    import pandas as pd

    from modules.data import duplicates, layout

    table = _scan(args.data)
    print(f"{table.attrs['dataset']}: {len(table)} cells from {table.attrs['source']}")
    with pd.option_context("display.width", 120, "display.max_rows", 200):
        print("\nper split and class:\n" + layout.summarize(table, "label").to_string(index=False))
        if table["fold"].notna().any():
            print("\nper fold:\n" + layout.summarize(table, "fold").to_string(index=False))
        patients = layout.summarize(table, "patient_id")
        patients = patients[patients["patient_id"] != ""]
        print(f"\npatients ({len(patients)}):\n" + patients.to_string(index=False))
    # Byte-identical files (scan does not decode) and the subjects they link, which every split keeps together.
    copies = duplicates.find_duplicates(table.assign(file_digest=duplicates.file_digests(table["path"].tolist())),
                                        "file_digest")
    print(f"\nidentical files: {len(copies)} cells are byte-identical copies ({copies['file_digest'].nunique()} "
          f"groups; {int(copies['crosses_splits'].sum())} of them across splits)")
    groups = duplicates.subject_groups(copies[copies["split"] == "train"], "file_digest")
    if len(groups):
        print(f"training cells filed under more than one subject ({len(groups)} groups; every patient split and "
              "CV fold keeps each group on one side):")
        for row in groups.itertuples():
            print(f"  {row.group}: {row.shared_cells} identical cell(s)")
        duplicates.warn_groups(groups, table.attrs["source"], "each group is kept on one side of every split")
    print(layout.write_manifest(table, Path(args.out) / config.CSV_SUBDIR / f"{table.attrs['dataset']}_manifest.csv"))


def _run_prepare(args: argparse.Namespace) -> None:
    """Decode every cell, crop it to its bounding box plus a margin, make it square (see --canvas), resize it and
    derive its mask; write OUT/arrays/<dataset>_<size>/ (reused while the files are unchanged) and print it last."""
    from modules import preprocessing

    folder = preprocessing.prepare_arrays(_scan(args.data), size=args.size, output_dir=args.out,
                                          skip_bad=args.skip_bad, workers=args.workers, margin=args.margin,
                                          progress=not args.no_progress, canvas=args.canvas)
    meta = preprocessing.load_arrays(folder).meta  # checked against its schema
    counts = meta["counts"]
    print(f"{meta['count']} cells at {meta['size']}x{meta['size']} px: {counts['all']} all, {counts['hem']} hem, "
          f"{counts['unlabeled']} unlabeled (prepared {meta['created']})")
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped'])} unusable image(s):")
        for entry in meta["skipped"]:
            print(f"  {entry['error']}")
    print(folder)


# ----------------------------------------------------------------------------- modeling
def _run_train(args: argparse.Namespace) -> None:
    """Train ANNa (U-Net + classification head), validated on other patients: a C-NMC fold when the data has several,
    otherwise whole patients of each class held out. Writes OUT/models/<run_id>/ and prints it last."""
    from modules.modeling import training

    # Each flag is train_model's keyword of the same name but for the few renamed here. None = not given:
    # train_model takes the default (config.ModelSettings / TrainSettings) or, with --resume, the run's own setting.
    given = {key: value for key, value in vars(args).items() if key not in ("command", "func", "data", "preset")}
    given.update(image_size=given.pop("size"), output_dir=given.pop("out"), input_transform=given.pop("input"),
                 segmentation=False if given.pop("no_segmentation") else None, skip_bad=args.skip_bad or None,
                 val_patients=[p for p in (args.val_patients or "").split(",") if p.strip()] or None)
    # Flags given explicitly win over the preset's values.
    settings = {**config.PRESETS[args.preset], **{key: value for key, value in given.items() if value is not None}}
    run_dir = training.train_model(args.data, **settings)
    print(run_dir or "this worker is done; the chief (worker 0) wrote the run folder")


# ----------------------------------------------------------------------------- evaluation
def _run_evaluate(args: argparse.Namespace) -> None:
    """Predict every labeled cell of the chosen split with the run's preprocessing and write
    OUT/evaluations/<run_id>__<dataset>_<split>[_N]/ (metrics.json, predictions.csv, per_patient.csv, charts as
    PNG+CSV, report.md, report.html). Prints that folder last. Held-out patients of a cross-validation run:
    --split test-labeled --patients unseen."""
    from modules import metrics as scores
    from modules.evaluation import evaluate

    folder = evaluate.evaluate_run(args.model, args.data, split=args.split, threshold=args.threshold,
                                   output_dir=args.out, patients=args.patients, skip_bad=args.skip_bad,
                                   n_boot=args.bootstrap, seed=args.seed, publish=not args.no_viz)
    metrics = json.loads((folder / "metrics.json").read_text())
    print(notebooks.metrics_table(metrics).to_string())  # the notebooks' table: counts, threshold, figures, intervals
    print(f"threshold {metrics['threshold_source']}"
          + (f"; 95 % intervals resample {metrics['ci_resampling']}" if metrics.get("ci") else ""))
    for item in metrics["skipped"]:
        print(f"skipped {item['path']}: {item['error']}")
    if metrics["preprocessing_check"]["matches"] is False:
        print(f"WARNING: {metrics['preprocessing_check']['note']}")
    print(scores.describe_metrics(metrics))
    print(folder)


def _run_predict(args: argparse.Namespace) -> None:
    """Predict cell images (files or folders, searched recursively) with the run's preprocessing and threshold; for
    the cells of a C-NMC testing folder, the challenge submission (new_names, labels) is written beside the
    predictions CSV as <stem>_submission.csv. Both paths are printed, the CSV last."""
    from modules.evaluation import predict

    table = predict.predict_images(args.model, args.images, threshold=args.threshold, skip_bad=args.skip_bad)
    counts = table["label_name"].value_counts()
    print(f"{len(table)} images: {counts.get('all', 0)} called all (leukemic), {counts.get('hem', 0)} called hem "
          f"(normal); threshold {table.attrs['threshold']:.3f} ({table.attrs['threshold_source']})")
    for item in table.attrs["skipped"]:
        print(f"skipped {item['path']}: {item['error']}")
    if args.csv is None and not table["testing"].any() and len(table) <= 50:
        print(table[["name", "p_leukemia", "label_name"]].to_string(index=False))
        return
    # Many cells or a testing folder: keep them in a file rather than the terminal.
    csv = predict.default_predictions_path(args.model, args.images, args.out) if args.csv is None else args.csv
    predict.write_predictions(table, csv)
    if "submission" in table.attrs:
        print(f"C-NMC challenge submission (new_names, labels): {table.attrs['submission']}")
    print(Path(csv).resolve())


def _run_cv(args: argparse.Namespace) -> None:
    """Hold out each fold's subjects in turn, train on the others (inner validation by patient picks the epoch and
    the threshold); report per fold ROC AUC, balanced accuracy, sensitivity, specificity and the share of each
    held-out subject's cells called right. Each (fold, model) job writes OUT/fold<k>_<model>/; jobs may run as
    separate processes into one OUT (--folds) and be merged (--merge-only)."""
    from modules.evaluation import cv

    if args.merge_only:
        summary = cv.merge(args.out)
    else:
        folds = [int(f) for f in args.folds.split(",")] if args.folds else None
        variants = dict(cv.parse_variant(name, assignments) for name, assignments in args.variant or [])
        summary = cv.run_cv(args.data, args.out, folds=folds, models=tuple(args.models.split(",")),
                            seed=args.seed, image_size=args.size, epochs=args.epochs, policy=args.policy,
                            variants=variants)
    print(cv.format_summary(summary))
    print(Path(args.out).resolve() / "summary.csv")


def _run_ensemble(args: argparse.Namespace) -> None:
    """Combine finished runs into one model: each member's score is centred on its own validation threshold and
    the ensemble calls a cell leukemic when their mean is above it (threshold 0.5). Writes a run folder (printed
    last) that evaluate, predict and 4.Test take like any run; its training patients are every member's."""
    from modules.modeling import ensemble

    runs = list(args.runs) + (ensemble.cv_runs(args.cv, args.cv_model) if args.cv else [])
    print(ensemble.write_ensemble(runs, args.out))


# ----------------------------------------------------------------------------- notebooks
def _run_demo(args: argparse.Namespace) -> None:
    """Run notebooks 1.EDA, 2.Image_preprocessing, 3.ANNa and 4.Test in order with papermill, writing the executed
    notebooks to OUT/notebooks/<timestamp>/ and the charts to OUT/viz/."""
    notebooks.demo(args.out, args.data, progress=not args.no_progress)


def _run_notebooks(args: argparse.Namespace) -> None:
    """Execute the notebooks with papermill, setting names of their `parameters` cells: DATA_DIR, OUTPUT_DIR, EPOCHS,
    IMAGE_SIZE, BATCH_SIZE, SEED, MODEL_PATH, SAMPLE_LIMIT, BASE_FILTERS, DEPTH, SPLIT, THRESHOLD, SYNTHETIC_SCALE."""
    parameters = {name: notebooks.parse_value(value) for name, value in args.parameters}
    notebooks.run_notebooks(args.data, parameters, args.out, notebooks=args.only, progress=not args.no_progress,
                            log_output=args.log_output)


# ----------------------------------------------------------------------------- parsers
#: Flags that several commands take alike.
SHARED_FLAGS = {
    "--model": {"required": True, "help": "run folder (output/models/<run_id>) or its model.keras"},
    "--out": {"help": f"output root (default {config.OUTPUT_DIR})"},
    "--threshold": {"default": "auto", "help": "'auto' (default): the threshold stored in the run, chosen on its "
                    "own patient-held-out validation cells, never on those scored; a number in [0,1] overrides it"},
    "--skip-bad": {"action": "store_true", "help": "list unreadable images and go on without them (default: stop)"},
    "--no-progress": {"action": "store_true", "help": "hide the progress bars"},
}
DATA_HELP = "the C-NMC_Leukemia root or a folder inside it (training_data, fold_0, …)"


def _command(subparsers, name: str, func: Callable, summary: str, *shared: str) -> argparse.ArgumentParser:
    """A sub-command running ``func``, described by its docstring, with the ``SHARED_FLAGS`` named."""
    parser = subparsers.add_parser(name, help=summary, description=func.__doc__)
    parser.set_defaults(func=func)
    for flag in shared:
        parser.add_argument(flag, **SHARED_FLAGS[flag])
    return parser


def check_out(out: str | Path) -> None:
    """Refuse ``--out`` before any work when it, or a folder above it, is a file (it is made when missing)."""
    path = Path(out).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {out}: {folder} is a file, not a folder; pass a folder (made if missing)")
            return


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each sub-parser carries ``func``, which imports its stage when run."""
    parser = argparse.ArgumentParser(prog="python -m modules", description="ANNa: tell leukemic blasts (ALL) from "
                                     "normal cells (HEM) in C-NMC 2019 images.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # data
    synth = _command(subparsers, "synth", _run_synth, "write a synthetic C-NMC_Leukemia dataset (Kaggle layout)")
    synth.add_argument("--out", type=Path, default=config.SYNTHETIC_DATA_DIR.parent,
                       help="folder that will hold C-NMC_Leukemia/ (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    synth.add_argument("--scale", choices=config.SYNTHETIC_SCALES, default="small",
                       help="tiny: ~90 cells for tests; small: ~470 cells for the demo (default: small)")
    scan = _command(subparsers, "scan", _run_scan, "list the images of a C-NMC dataset and count them")
    prepare = _command(subparsers, "prepare", _run_prepare, "crop, mask and resize the cells into cached .npy arrays",
                       "--skip-bad", "--no-progress")
    for command, what in ((scan, "the manifest goes to OUT/csv/"), (prepare, "arrays go to OUT/arrays/")):
        command.add_argument("--data", type=Path, required=True, help=DATA_HELP)
        command.add_argument("--out", type=Path, default=config.OUTPUT_DIR,
                             help=f"output root; {what} (default: %(default)s)")
    prepare.add_argument("--size", type=int, default=config.DEFAULT_IMAGE_SIZE,
                         help="side of the square images in pixels (default: %(default)s)")
    prepare.add_argument("--workers", type=int, help="parallel threads (default: one per core; one for a few images)")
    prepare.add_argument("--margin", type=int, default=config.DEFAULT_MARGIN,
                         help="background pixels kept around each cell, in source pixels (default: %(default)s)")
    prepare.add_argument("--canvas", type=int, default=config.DEFAULT_CANVAS,
                         help="smallest side of the square around each cell, in source pixels, so that cells keep "
                              "their relative size; 0 crops tightly (each cell fills the frame; its size is lost) "
                              "(default: %(default)s)")

    # modeling
    train = _command(subparsers, "train", _run_train,
                     "train ANNa on patient-disjoint splits; prints the run folder last", "--out", "--skip-bad")
    # Every flag but --preset defaults to None, "not given": the preset's value, else the one its help names.
    add, model, fit = train.add_argument, config.ModelSettings, config.TrainSettings
    add("--data", help="C-NMC_Leukemia folder (or any folder inside it); prepared first when its arrays are missing "
        "(optional with --resume)")
    add("--size", type=int, help=f"image side in pixels (default {config.DEFAULT_IMAGE_SIZE})")
    add("--epochs", type=int, help=f"maximum epochs; early stopping may end sooner (default {config.DEFAULT_EPOCHS})")
    add("--preset", default="cpu", choices=tuple(config.PRESETS), help="cpu: the defaults; gpu: "
        + ", ".join(f"{k} {v}" for k, v in config.PRESETS["gpu"].items()) + " (not measured)")
    add("--batch-size", type=int, help=f"cells per batch (default {fit.batch_size})")
    group = train.add_mutually_exclusive_group()
    group.add_argument("--val-patients", help="comma-separated patient ids to validate on, e.g. 11,H10")
    group.add_argument("--val-fold", type=int,
                       help="C-NMC fold to validate on (default: the last fold when there are several)")
    add("--seed", type=int, help=f"random seed (default {fit.seed})")
    add("--policy", choices=config.POLICIES, help="precision: auto = mixed_float16 on CUDA, mixed_bfloat16 on a CPU "
        "with AMX/AVX512-BF16, float32 otherwise")
    add("--strategy", choices=config.STRATEGIES, help="tf.distribute strategy: auto = multi-worker when TF_CONFIG "
        "names several workers, TPU on a TPU host, mirrored over several GPUs, one device otherwise (README, "
        "'More than one machine')")
    add("--base-filters", type=int, help=f"U-Net filters at the first level (default {model.base_filters})")
    add("--depth", type=int, help=f"U-Net down-sampling steps (default {model.depth})")
    add("--no-segmentation", action="store_true", help="train the classifier only, no cell_mask")
    add("--input", choices=config.INPUT_TRANSFORMS, help="what the network sees: RGB or each cell's colours "
        f"standardized (default {model.input_transform})")
    add("--stem-stride", type=int, help="2: a strided convolution first, the U-Net at half the image's side "
        f"(default {model.stem_stride})")
    add("--mask-target", choices=config.MASK_TARGETS, help=f"what the U-Net segments (default {fit.mask_target})")
    add("--threshold-rule", choices=config.THRESHOLD_RULES,
        help=f"how the threshold is chosen on validation (default {fit.threshold_rule})")
    add("--target-sensitivity", type=float, help="share of validation blasts the 'sensitivity' rule calls leukemic "
        f"(default {fit.target_sensitivity})")
    add("--canvas", type=int, help="smallest side of the square around each cell in source pixels, as for prepare; "
        f"0 crops tightly (default {config.DEFAULT_CANVAS}; the run's own on --resume)")
    add("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished epoch, with its own "
        "settings (only --epochs may change)")

    # evaluation
    evaluate = _command(subparsers, "evaluate", _run_evaluate, "score a saved run on labeled cells: metrics, charts, "
                        "report", "--model", "--out", "--threshold", "--skip-bad")
    evaluate.add_argument("--data", required=True, metavar="DIR", help=DATA_HELP)
    evaluate.add_argument("--split", choices=config.EVALUATION_SPLITS, default="validation", help=(
        "which labeled cells of DIR to score. 'validation' (default): the Kaggle validation_data cells (labels "
        "joined by file name from its CSV). 'train': training_data cells; they may be the very cells the model "
        "learned from, so the report says how many belong to the run's training and validation patients. "
        "'test-labeled': every labeled cell in DIR, for a labeled folder of OTHER patients; refused when any of its "
        "patients trained or validated the run (add --patients unseen to keep only the others)."))
    evaluate.add_argument("--patients", help="'unseen': keep only patients the run neither trained nor validated on "
                          "(e.g. the held-out patients of a cross-validation fold); or a comma list of patient ids")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the 95%% intervals")
    evaluate.add_argument("--seed", type=int, default=0, help="seed for the bootstrap and the image samples")
    evaluate.add_argument("--no-viz", action="store_true", help="do not copy the charts to OUT/viz")

    predict = _command(subparsers, "predict", _run_predict, "P(leukemia) and the label for any cell images",
                       "--model", "--out", "--threshold", "--skip-bad")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    predict.add_argument("--csv", help="write path, name, p_leukemia, prediction, label_name, testing, "
                         "model_trained_on here; by default up to 50 cells are printed and more (or any testing "
                         "cells) go to OUT/predictions/<run_id>__<dataset>[_N].csv")

    cv = _command(subparsers, "cv", _run_cv,
                  "patient-grouped cross-validation with subject-level figures (the README's table)")
    cv.add_argument("--data", type=Path, default=config.SHARED_DATA_DIR / "cnmc",
                    help="a C-NMC training folder (default: %(default)s)")
    cv.add_argument("--out", type=Path, default=config.OUTPUT_DIR / "cv",
                    help="folder of the jobs and merged tables (default: %(default)s)")
    cv.add_argument("--folds", help="comma-separated folds to run, e.g. 1 (default: all)")
    cv.add_argument("--models", default="anna,cell_area",
                    help="comma-separated: anna, cell_area (cell size alone), legacy (default: %(default)s)")
    cv.add_argument("--seed", type=int, default=config.DEFAULT_SEED, help="base seed; fold k uses seed + k")
    cv.add_argument("--size", type=int, default=config.DEFAULT_IMAGE_SIZE, help="ANNa image side in pixels")
    cv.add_argument("--epochs", type=int, help="ANNa maximum epochs (default: the training default)")
    cv.add_argument("--policy", default="auto", choices=config.POLICIES, help="precision policy for training")
    cv.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "KEY=VALUE,..."),
                    help="ANNa with settings changed, run as model NAME (list it in --models), e.g. "
                         "--variant s192 image_size=192,stem_stride=2")
    cv.add_argument("--merge-only", action="store_true", help="only merge the finished jobs in --out")
    ensemble = _command(subparsers, "ensemble", _run_ensemble, "combine finished runs (e.g. a cross-validation's) "
                        "into one run folder that evaluate and predict take")
    ensemble.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders to combine (two or more)")
    ensemble.add_argument("--cv", type=Path, metavar="DIR",
                          help="take the runs of a cross-validation's anna jobs (python -m modules cv --out DIR)")
    ensemble.add_argument("--cv-model", default="anna", help="which model's jobs of --cv (default: %(default)s)")
    ensemble.add_argument("--out", type=Path, help="the new run folder (default output/models/<id>)")

    # notebooks
    demo = _command(subparsers, "demo", _run_demo, "run the four notebooks headless with small parameters "
                    "(synthetic data unless input/C-NMC_Leukemia exists)", "--out", "--no-progress")
    run = _command(subparsers, "run-notebooks", _run_notebooks, "run the notebook series headless with any "
                   "parameters", "--out", "--no-progress")
    for command in (demo, run):
        command.add_argument("--data", help="C-NMC_Leukemia folder (default: input/C-NMC_Leukemia if present, else a "
                             "synthetic set generated under OUT/synthetic)")
    run.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", default=[],
                     metavar=("NAME", "VALUE"), help="set a notebook parameter, e.g. -p EPOCHS 5 (repeatable)")
    run.add_argument("--only", nargs="+", metavar="NOTEBOOK",
                     help="run only these notebooks, e.g. --only 4 (4.Test on the newest run)")
    run.add_argument("--log-output", action="store_true",
                     help="stream the notebooks' output (e.g. training epochs) to the terminal")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv`` without the program name, ``sys.argv[1:]`` by default); returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if getattr(args, "out", None) is not None:
            check_out(args.out)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, notebooks.NotebookError) as error:
        # Errors meant for users name the file and the fix; no traceback needed. A failed notebook exits 1.
        if os.environ.get("ANNA_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, notebooks.NotebookError) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
