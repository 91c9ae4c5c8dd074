"""Command line over the package: ``python -m modules <command> …``.

Plain argparse with defaults from ``config``. Each handler imports its stage only when it runs, so ``--help`` and
usage errors answer without loading TensorFlow; a handler's docstring is its command's ``--help`` description.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from modules import config
from modules.notebooks import NotebookError  # standard library only, like this module


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


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

    from modules.data import layout

    table = _scan(args.data)
    print(f"{table.attrs['dataset']}: {len(table)} cells from {table.attrs['source']}")
    with pd.option_context("display.width", 120, "display.max_rows", 200):
        print("\nper split and class:\n" + layout.summarize(table, "label").to_string(index=False))
        if table["fold"].notna().any():
            print("\nper fold:\n" + layout.summarize(table, "fold").to_string(index=False))
        patients = layout.summarize(table, "patient_id")
        patients = patients[patients["patient_id"] != ""]
        print(f"\npatients ({len(patients)}):\n" + patients.to_string(index=False))
    _print_duplicates(table)
    print(layout.write_manifest(table, Path(args.out) / config.CSV_SUBDIR / f"{table.attrs['dataset']}_manifest.csv"))


def _print_duplicates(table) -> None:
    """Byte-identical files (scan does not decode) and the subjects they link, which every split keeps together."""
    from modules.data import duplicates

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


def _run_prepare(args: argparse.Namespace) -> None:
    """Decode every cell, crop it to its bounding box plus a margin, make it square (tightly by default, so each cell
    fills the frame; with --canvas C on a black square of at least C source pixels, so cells keep their relative
    size), resize it and derive its mask; write OUT/arrays/<dataset>_<size>/ (reused while the files are
    unchanged). The last line printed is that folder."""
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
    """Train ANNa (U-Net + classification head). Validation is always patient-disjoint: by C-NMC fold when the data
    has several folds, otherwise whole patients of each class are held out. Writes OUT/models/<run_id>/ and prints
    that folder as the last line."""
    from modules.modeling import training

    val_patients = [p for p in (args.val_patients or "").split(",") if p.strip()] or None
    # None = not given: train_model takes the default (config.ModelSettings / TrainSettings) or, with
    # --resume, the run's own setting.
    run_dir = training.train_model(
        args.data, image_size=args.size, epochs=args.epochs, batch_size=args.batch_size,
        val_patients=val_patients, val_fold=args.val_fold, seed=args.seed, output_dir=args.out,
        base_filters=args.base_filters, depth=args.depth, segmentation=False if args.no_segmentation else None,
        policy=args.policy, resume=args.resume, skip_bad=args.skip_bad or None, canvas=args.canvas,
        strategy=args.strategy,
    )
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
    print(f"{metrics['n']} cells ({metrics['n_positive']} all, {metrics['n_negative']} hem), "
          f"threshold {metrics['threshold']:.3f} ({metrics['threshold_source']})")
    for name in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "weighted_f1"):
        value, interval = metrics[name], (metrics.get("ci") or {}).get(name)
        ci = f"  [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        print(f"  {name:18s} {'n/a' if value is None else f'{value:.3f}'}{ci}")
    if metrics.get("ci"):
        print(f"  95 % intervals resample {metrics['ci_resampling']}")
    for item in metrics["skipped"]:
        print(f"skipped {item['path']}: {item['error']}")
    if metrics["preprocessing_check"]["matches"] is False:
        print(f"WARNING: {metrics['preprocessing_check']['note']}")
    print(scores.describe_metrics(metrics))
    print(folder)


def _run_predict(args: argparse.Namespace) -> None:
    """Predict cell images (files or folders, searched recursively) with the run's preprocessing and threshold. For
    cells of a C-NMC testing folder (testing_data or C-NMC_test_final_phase_data) the challenge submission
    (new_names, labels) is written beside the predictions CSV as <stem>_submission.csv; both paths are printed,
    the CSV last."""
    from modules.evaluation import predict

    table = predict.predict_images(args.model, args.images, threshold=args.threshold, skip_bad=args.skip_bad)
    counts = table["label_name"].value_counts()
    print(f"{len(table)} images: {counts.get('all', 0)} called all (leukemic), {counts.get('hem', 0)} called hem "
          f"(normal); threshold {table.attrs['threshold']:.3f} ({table.attrs['threshold_source']})")
    for item in table.attrs["skipped"]:
        print(f"skipped {item['path']}: {item['error']}")
    csv = args.csv
    if csv is None and not table["testing"].any() and len(table) <= 50:
        print(table[["name", "p_leukemia", "label_name"]].to_string(index=False))
        return
    if csv is None:  # many cells or a testing folder: keep them in a file rather than the terminal
        csv = predict.default_predictions_path(args.model, args.images, args.out)
    predict.write_predictions(table, csv)
    if "submission" in table.attrs:
        print(f"C-NMC challenge submission (new_names, labels): {table.attrs['submission']}")
    print(Path(csv).resolve())


def _run_cv(args: argparse.Namespace) -> None:
    """Hold out each fold's subjects in turn, train on the others (inner validation by patient picks the epoch and
    the threshold), and report per fold ROC AUC, balanced accuracy, sensitivity, specificity and, per held-out
    subject, the share of its cells called right (mean and worst over healthy subjects). Each (fold, model) job
    writes OUT/fold<k>_<model>/; jobs may run as separate processes into one OUT (--folds) and be merged
    (--merge-only)."""
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


# ----------------------------------------------------------------------------- notebooks
def _run_demo(args: argparse.Namespace) -> None:
    """Run notebooks 1.EDA, 2.Image_preprocessing, 3.ANNa and 4.Test in order with papermill, writing the executed
    notebooks to OUT/notebooks/<timestamp>/ and the charts to OUT/viz/."""
    from modules import notebooks

    notebooks.demo(args.out, args.data, progress=not args.no_progress)


def _run_notebooks(args: argparse.Namespace) -> None:
    """Execute the notebooks with papermill. Parameters are the names in each notebook's `parameters` cell:
    DATA_DIR, OUTPUT_DIR, IMAGE_SIZE, EPOCHS, BATCH_SIZE, SEED, MODEL_PATH, SAMPLE_LIMIT, BASE_FILTERS, DEPTH,
    SPLIT, THRESHOLD, SYNTHETIC_SCALE."""
    from modules import notebooks

    parameters = {name: notebooks.parse_value(value) for name, value in args.parameters}
    notebooks.run_notebooks(args.data, parameters, args.out, notebooks=args.only, progress=not args.no_progress,
                            log_output=args.log_output)


# ----------------------------------------------------------------------------- parsers
def _data_argument(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--data", type=Path, help="the C-NMC_Leukemia root or a folder inside it "
                                                  "(training_data, fold_0, …)", **kwargs)


def _add_data_commands(subparsers) -> None:
    synth = subparsers.add_parser(
        "synth", help="write a synthetic C-NMC_Leukemia dataset (Kaggle layout)",
        description="Draw a synthetic stand-in for C-NMC 2019 in the Kaggle layout (training folds, renamed "
                    "validation cells with their labels CSV, testing cells). The last line printed is the "
                    "dataset root.")
    synth.add_argument("--out", type=Path, default=config.SYNTHETIC_DATA_DIR.parent,
                       help="folder that will hold C-NMC_Leukemia/ (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    synth.add_argument("--scale", choices=config.SYNTHETIC_SCALES, default="small",
                       help="tiny: ~90 cells for tests; small: ~470 cells for the demo (default: small)")
    synth.set_defaults(func=_run_synth)

    scan = subparsers.add_parser(
        "scan", help="list the images of a C-NMC dataset and count them",
        description="Scan a C-NMC_Leukemia folder (or any folder inside it), print the cells per split, "
                    "class, fold and patient and the byte-identical files (subjects sharing cells are named: "
                    "splits keep them together), and write OUT/csv/<dataset>_manifest.csv (its path is the last "
                    "line).")
    _data_argument(scan, required=True)
    scan.add_argument("--out", type=Path, default=config.OUTPUT_DIR,
                      help="output root; the manifest goes to OUT/csv/ (default: %(default)s)")
    scan.set_defaults(func=_run_scan)

    prepare = subparsers.add_parser(
        "prepare", help="crop, mask and resize the cells into cached .npy arrays",
        description="Decode every cell, crop it to its bounding box plus a margin, make it square (tightly by "
                    "default, so each cell fills the frame; with --canvas C on a black square of at least C "
                    "source pixels, so cells keep their relative size), resize it and derive its mask; write "
                    "OUT/arrays/<dataset>_<size>/ (reused while the files are unchanged). "
                    "The last line printed is that folder.")
    _data_argument(prepare, required=True)
    prepare.add_argument("--size", type=int, default=config.DEFAULT_IMAGE_SIZE,
                         help="side of the square images in pixels (default: %(default)s)")
    prepare.add_argument("--out", type=Path, default=config.OUTPUT_DIR,
                         help="output root; arrays go to OUT/arrays/ (default: %(default)s)")
    prepare.add_argument("--skip-bad", action="store_true",
                         help="leave out unreadable images (listed in the summary and meta.json) instead of stopping")
    prepare.add_argument("--workers", type=int, default=None,
                         help="parallel threads (default: one per core; one for a few images)")
    prepare.add_argument("--margin", type=int, default=config.DEFAULT_MARGIN,
                         help="background pixels kept around each cell, at the source resolution "
                              "(default: %(default)s)")
    prepare.add_argument("--canvas", type=int, default=config.DEFAULT_CANVAS,
                         help="smallest side of the square around each cell, in source pixels, so that cells "
                              "keep their relative size; 0 crops tightly (each cell fills the frame; its size is "
                              "lost) (default: %(default)s)")
    prepare.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    prepare.set_defaults(func=_run_prepare)


def _add_train_command(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train ANNa on patient-disjoint splits; prints the run folder last",
        description="Train ANNa (U-Net + classification head). Validation is always patient-disjoint: by "
                    "C-NMC fold when the data has several folds, otherwise whole patients of each class are "
                    "held out. Writes OUT/models/<run_id>/ and prints that folder as the last line.")
    train.add_argument("--data", help="C-NMC_Leukemia folder (or any folder inside it); prepared first "
                                      "when its arrays are missing (optional with --resume)")
    train.add_argument("--size", type=int, default=None,
                       help=f"image side in pixels (default {config.DEFAULT_IMAGE_SIZE})")
    train.add_argument("--epochs", type=int, default=None,
                       help=f"maximum epochs; early stopping may end sooner (default {config.DEFAULT_EPOCHS})")
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"cells per batch (default {config.TrainSettings.batch_size})")
    group = train.add_mutually_exclusive_group()
    group.add_argument("--val-patients", help="comma-separated patient ids to validate on, e.g. 11,H10")
    group.add_argument("--val-fold", type=int, default=None,
                       help="C-NMC fold to validate on (default: the last fold when there are several)")
    train.add_argument("--seed", type=int, default=None, help=f"random seed (default {config.TrainSettings.seed})")
    train.add_argument("--out", default=None, help="output folder (default output/)")
    train.add_argument("--policy", default=None, choices=config.POLICIES,
                       help="precision: auto = mixed_float16 on CUDA, mixed_bfloat16 on a CPU with "
                            "AMX/AVX512-BF16, float32 otherwise")
    train.add_argument("--strategy", default=None, choices=config.STRATEGIES,
                       help="tf.distribute strategy: auto = multi-worker when TF_CONFIG names several workers, "
                            "TPU on a TPU host, mirrored over several GPUs, one device otherwise; multi-worker: "
                            "run the same command on every machine, each with its TF_CONFIG (README, "
                            "'More than one machine')")
    train.add_argument("--base-filters", type=int, default=None,
                       help=f"U-Net filters at the first level (default {config.ModelSettings.base_filters})")
    train.add_argument("--depth", type=int, default=None,
                       help=f"U-Net down-sampling steps (default {config.ModelSettings.depth})")
    train.add_argument("--no-segmentation", action="store_true", help="train the classifier only, no cell_mask")
    train.add_argument("--skip-bad", action="store_true", help="skip unreadable images when preparing (listed)")
    train.add_argument("--canvas", type=int, default=None,
                       help="smallest side of the square around each cell in source pixels, as for prepare; "
                            f"0 crops tightly (default {config.DEFAULT_CANVAS}; the run's own on --resume)")
    train.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue an interrupted run from its last finished epoch, with its own settings "
                            "(only --epochs may change)")
    train.set_defaults(func=_run_train)


def _add_evaluation_commands(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate", help="score a saved run on labeled cells: metrics, charts, report",
        description="Predict every labeled cell of the chosen split with the run's preprocessing and write "
                    "OUT/evaluations/<run_id>__<dataset>_<split>[_N]/ (metrics.json, predictions.csv, "
                    "per_patient.csv, charts as PNG+CSV, report.md, report.html). Prints that folder last. "
                    "Held-out patients of a cross-validation run: --split test-labeled --patients unseen.")
    evaluate.add_argument("--model", required=True, help="run folder (output/models/<run_id>) or its model.keras")
    evaluate.add_argument("--data", required=True, metavar="DIR",
                          help="dataset folder in the Kaggle layout (root or any part)")
    evaluate.add_argument("--split", choices=config.EVALUATION_SPLITS, default="validation", help=SPLIT_HELP)
    evaluate.add_argument("--threshold", default="auto",
                          help="'auto' (default): the threshold stored in the run, chosen on its own patient-held-"
                               "out validation predictions; a number in [0,1] overrides it. Never tuned on DIR.")
    evaluate.add_argument("--patients", default=None,
                          help="'unseen': keep only patients the run neither trained nor validated on (e.g. the "
                               "held-out patients of a cross-validation fold); or a comma list of patient ids")
    evaluate.add_argument("--out", default=None, help=f"output root (default {config.OUTPUT_DIR})")
    evaluate.add_argument("--skip-bad", action="store_true",
                          help="list images that fail to decode and go on (default: stop at the first)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the 95%% intervals")
    evaluate.add_argument("--seed", type=int, default=0, help="seed for the bootstrap and the image samples")
    evaluate.add_argument("--no-viz", action="store_true", help="do not copy the charts to OUT/viz")
    evaluate.set_defaults(func=_run_evaluate)

    predict = subparsers.add_parser(
        "predict", help="P(leukemia) and the label for any cell images",
        description="Predict cell images (files or folders, searched recursively) with the run's preprocessing "
                    "and threshold. For cells of a C-NMC testing folder (testing_data or "
                    "C-NMC_test_final_phase_data) the challenge submission (new_names, labels) is written beside "
                    "the predictions CSV as <stem>_submission.csv; both paths are printed, the CSV last.")
    predict.add_argument("--model", required=True, help="run folder (output/models/<run_id>) or its model.keras")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    predict.add_argument("--csv", default=None,
                         help="write path, name, p_leukemia, prediction, label_name, testing, model_trained_on here; "
                              "by default up to 50 cells are printed and more (or any testing cells) go to "
                              "OUT/predictions/<run_id>__<dataset>[_N].csv")
    predict.add_argument("--out", default=None, help=f"output root for the default CSV (default {config.OUTPUT_DIR})")
    predict.add_argument("--threshold", default="auto", help="'auto' (the run's stored threshold) or a number")
    predict.add_argument("--skip-bad", action="store_true", help="list images that fail to decode and go on")
    predict.set_defaults(func=_run_predict)

    cv = subparsers.add_parser(
        "cv", help="patient-grouped cross-validation with subject-level figures (the README's table)",
        description="Hold out each fold's subjects in turn, train on the others (inner validation by patient "
                    "picks the epoch and the threshold), and report per fold ROC AUC, balanced accuracy, "
                    "sensitivity, specificity and, per held-out subject, the share of its cells called right "
                    "(mean and worst over healthy subjects). Each (fold, model) job writes OUT/fold<k>_<model>/; "
                    "jobs may run as separate processes into one OUT (--folds) and be merged (--merge-only).")
    cv.add_argument("--data", type=Path, default=config.SHARED_DATA_DIR / "cnmc",
                    help="a C-NMC training folder (default: %(default)s)")
    cv.add_argument("--out", type=Path, default=config.OUTPUT_DIR / "cv",
                    help="folder of the jobs and merged tables (default: %(default)s)")
    cv.add_argument("--folds", default=None, help="comma-separated folds to run, e.g. 1 (default: all)")
    cv.add_argument("--models", default="anna,cell_area",
                    help="comma-separated: anna, cell_area (cell size alone), legacy (default: %(default)s)")
    cv.add_argument("--seed", type=int, default=config.DEFAULT_SEED, help="base seed; fold k uses seed + k")
    cv.add_argument("--size", type=int, default=config.DEFAULT_IMAGE_SIZE, help="ANNa image side in pixels")
    cv.add_argument("--epochs", type=int, default=None, help="ANNa maximum epochs (default: the training default)")
    cv.add_argument("--policy", default="auto", choices=config.POLICIES, help="precision policy for training")
    cv.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "KEY=VALUE,..."),
                    help="ANNa with settings changed, run as model NAME (list it in --models), e.g. "
                         "--variant stain colour_augment=stain,input_transform=od")
    cv.add_argument("--merge-only", action="store_true", help="only merge the finished jobs in --out")
    cv.set_defaults(func=_run_cv)


def _add_notebook_commands(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the four notebooks headless with small parameters (synthetic data unless "
                     "input/C-NMC_Leukemia exists)",
        description="Run notebooks 1.EDA, 2.Image_preprocessing, 3.ANNa and 4.Test in order with papermill, "
                    "writing the executed notebooks to OUT/notebooks/<timestamp>/ and the charts to OUT/viz/.")
    demo.add_argument("--data", default=None,
                      help="C-NMC_Leukemia folder (default: input/C-NMC_Leukemia if present, else a "
                           "synthetic set generated under OUT/synthetic)")
    demo.add_argument("--out", default=None, help="output folder (default: output/)")
    demo.add_argument("--no-progress", action="store_true", help="hide the per-cell progress bars")
    demo.set_defaults(func=_run_demo)

    run = subparsers.add_parser(
        "run-notebooks", help="run the notebook series headless with any parameters",
        description="Execute the notebooks with papermill. Parameters are the names in each notebook's "
                    "`parameters` cell: DATA_DIR, OUTPUT_DIR, IMAGE_SIZE, EPOCHS, BATCH_SIZE, SEED, "
                    "MODEL_PATH, SAMPLE_LIMIT, BASE_FILTERS, DEPTH, SPLIT, THRESHOLD, SYNTHETIC_SCALE.")
    run.add_argument("--data", default=None,
                     help="C-NMC_Leukemia folder (default: input/C-NMC_Leukemia if present, else synthetic)")
    run.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", default=[],
                     metavar=("NAME", "VALUE"), help="set a notebook parameter, e.g. -p EPOCHS 5 (repeatable)")
    run.add_argument("--out", default=None, help="output folder (OUTPUT_DIR; default: output/)")
    run.add_argument("--only", nargs="+", default=None, metavar="NOTEBOOK",
                     help="run only these notebooks, e.g. --only 4 (4.Test on the newest run)")
    run.add_argument("--log-output", action="store_true",
                     help="stream the notebooks' output (e.g. training epochs) to the terminal")
    run.add_argument("--no-progress", action="store_true", help="hide the per-cell progress bars")
    run.set_defaults(func=_run_notebooks)


def check_out(out: str | Path) -> None:
    """Refuse ``--out`` before any work when it, or a folder above it, is a file (it is made when missing)."""
    path = Path(out).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise CommandError(f"--out {out}: {folder} is a file, not a folder; pass a folder (made if missing)")
            return


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each sub-parser carries ``func``, which imports its stage when run."""
    parser = argparse.ArgumentParser(
        prog="python -m modules",
        description="ANNa: tell leukemic blasts (ALL) from normal cells (HEM) in C-NMC 2019 images.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_data_commands(subparsers)
    _add_train_command(subparsers)
    _add_evaluation_commands(subparsers)
    _add_notebook_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The process exit code.
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if getattr(args, "out", None) is not None:
            check_out(args.out)
        return int(args.func(args) or 0)
    except (CommandError, ValueError, FileNotFoundError) as error:
        # Errors meant for users name the file and the fix; no traceback needed.
        if os.environ.get("ANNA_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
