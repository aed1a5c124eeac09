"""The ``cmedl`` command line (also ``python -m cmedl``).

Subcommands: ``segment``, ``translate``, ``lungs``, ``train``, ``runs``, ``phantom``, ``info``, ``evaluate``,
``models`` (``list``, ``add``, ``remove``, ``download``, ``clear-cache``, ``path``), ``demo``, ``bench``.
Every failure a user can cause ends with one line on stderr (``cmedl: error: ...``) and an exit code
that tells the outcomes apart (see :mod:`cmedl.errors`): 2 no lungs found, 3 bad input, 4 bad model
file, 5 not a CT, 6 cannot write output, 7 bad configuration, 8 training failed, 130 cancelled.
With ``--progress json`` the same error is also sent as a JSON event for a parent process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmedl import __version__
from cmedl.cpu import is_cli_process, mark_cli_process
from cmedl.devices import DEFAULT_DEVICE, DEVICES
from cmedl.errors import (
    PARTIAL_FAILURE_EXIT_CODE,
    CancelledError,
    CMEDLError,
    ConfigError,
    InputError,
    Interrupted,
    NotCTError,
)
from cmedl.interrupts import stop_signals
from cmedl.progress import JsonLinesProgress, Progress, TextProgress
from cmedl.segment_options import SegmentOptions
from cmedl.training.choices import METHODS, SEGMENTORS

if TYPE_CHECKING:  # the engine modules load on demand: `cmedl --help` stays fast
    from cmedl.evaluate import EvaluationReport
    from cmedl.training.config import TrainConfig

Handler = Callable[[argparse.Namespace, Progress], int]
# The flags' defaults are the engine's (SegmentOptions is torch-free, so building the parser stays fast).
_SEGMENT_DEFAULTS = SegmentOptions()


def _progress_for(args: argparse.Namespace) -> Progress:
    mode = getattr(args, "progress", "text")
    if mode == "json":
        return JsonLinesProgress(sys.stdout)
    if mode == "none" or not sys.stderr.isatty():
        return _QuietProgress()
    return TextProgress(sys.stderr)


class _QuietProgress(Progress):
    """No progress bar (output is not a terminal) but log lines still reach stderr."""

    def _emit(self, event: dict) -> None:
        if event["event"] == "log":
            print(event["message"], file=sys.stderr)


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str))


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows of text (the first is the header) in columns; the last column is not padded."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


# -- segment -----------------------------------------------------------------------------------------


def _add_segment(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("segment", help="segment the lung tumour in a chest CT (or a batch of CTs)")
    parser.add_argument(
        "input",
        help="CT volume file (.nii.gz, .nrrd, .mha) or DICOM series folder; for a batch, a folder of CT volumes "
        "or a .txt file listing one per line",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="output labelmap: .seg.nrrd, .nii.gz or .nrrd; for a batch, the output folder",
    )
    parser.add_argument("--model", default=None, help="model file or catalogue name (default: built-in demo model)")
    defaults = _SEGMENT_DEFAULTS
    parser.add_argument("--device", default=defaults.device, choices=DEVICES)
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=defaults.batch_size,
        metavar="N",
        help="patches per network call, or auto (the default: 4 on a CPU; on a GPU as many as its free memory "
        "allows, up to 64)",
    )
    parser.add_argument(
        "--threshold", type=float, default=defaults.probability_threshold, help="tumour probability threshold"
    )
    parser.add_argument(
        "--lung-threshold", type=float, default=defaults.lung_threshold_hu, help="lung air threshold in HU"
    )
    parser.add_argument(
        "--roi-margin", type=float, default=defaults.roi_margin_mm, help="ROI margin around the lungs in mm"
    )
    parser.add_argument("--force", action="store_true", help="segment even if the image does not look like CT")
    parser.add_argument("--lesions", metavar="FILE", help="write the lesion table: .json or .csv (one CT only)")
    parser.add_argument(
        "--probabilities",
        metavar="OUT",
        help="write the tumour probability map (uint8, 0-255 for 0-1) on the CT's grid; for a batch, a folder",
    )
    parser.add_argument(
        "--tta", action="store_true", help="test-time augmentation: average over left-right and front-back flips"
    )
    parser.add_argument(
        "--uncertainty",
        metavar="OUT",
        help="with --tta: write the per-voxel standard deviation over the flips (uint8, 0-255 for 0-1); "
        "for a batch, a folder",
    )
    parser.add_argument(
        "--min-lesion-ml",
        type=float,
        default=defaults.min_lesion_ml,
        metavar="ML",
        help="remove lesions below this volume (0: keep all)",
    )
    parser.add_argument(
        "--min-lesion-probability",
        type=float,
        default=defaults.min_lesion_probability,
        metavar="P",
        help="remove lesions whose peak tumour probability is below P (0-1; 0: keep all)",
    )
    parser.add_argument(
        "--format",
        choices=["seg.nrrd", "nii.gz"],
        default=None,
        help="batch only: labelmap format of each case (default seg.nrrd)",
    )
    parser.add_argument("--json", action="store_true", help="print the result summary as JSON")
    _add_progress_flag(parser)
    parser.set_defaults(handler=_run_segment)


def _batch_size(text: str) -> int | None:
    """``--batch-size``: ``auto`` (None: the engine chooses) or an integer (range checked by the options)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def _segment_options(args: argparse.Namespace) -> Any:
    """The :class:`cmedl.segment_options.SegmentOptions` of the ``segment`` flags, validated (by the options)."""
    if args.uncertainty and not args.tta:
        raise InputError("--uncertainty needs --tta (the uncertainty is the spread over the flips)")
    return SegmentOptions(
        lung_threshold_hu=args.lung_threshold,
        roi_margin_mm=args.roi_margin,
        probability_threshold=args.threshold,
        batch_size=args.batch_size,
        device=args.device,
        force=args.force,
        tta=args.tta,
        min_lesion_ml=args.min_lesion_ml,
        min_lesion_probability=args.min_lesion_probability,
    ).validate()


def _run_segment(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.batch import is_batch_input
    from cmedl.catalogue import resolve_model
    from cmedl.segment import segment_file

    if not Path(args.input).exists():
        raise InputError(f"input not found: {args.input}")
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise InputError("the output path is the input path; the input is never overwritten")
    options = _segment_options(args)
    if is_batch_input(args.input):
        return _run_segment_batch(args, progress, options)
    if args.format:
        raise InputError("--format is for a batch; for one CT the output's suffix chooses the format")
    try:
        summary = segment_file(
            args.input,
            args.output,
            resolve_model(args.model),
            options,
            progress,
            lesions_path=args.lesions,
            probabilities_path=args.probabilities,
            uncertainty_path=args.uncertainty,
        )
    except NotCTError as error:
        raise NotCTError(f"{error} (--force segments it anyway)") from None
    progress.done(summary)
    if args.json:
        _print_json(summary)
    elif args.progress != "json":
        count = summary["lesion_count"]
        print(
            f"{summary['output']}: lung tumour {summary['tumour_volume_ml']:.1f} mL in {count} "
            f"lesion{'s' if count != 1 else ''}, {summary['slices_segmented']} slices, "
            f"{summary['seconds']:.1f} s on {summary['device']}"
        )
        for line in _lesion_lines(summary["lesions"]):
            print(line)
    return 0


def _lesion_lines(rows: list[dict], shown: int = 10) -> list[str]:
    """One line per lesion for a person at a terminal (the first ``shown``, then a count of the rest)."""
    lines = []
    for row in rows[:shown]:
        peak = "" if row["max_probability"] is None else f", peak p {row['max_probability']:.2f}"
        lines.append(
            f"  lesion {row['id']}: {row['volume_ml']:.2f} mL, {row['long_axis_mm']:.1f} x "
            f"{row['short_axis_mm']:.1f} mm (slice {row['measured_slice']}){peak}, {row['location']}"
        )
    if len(rows) > shown:
        lines.append(f"  ... and {len(rows) - shown} more (--lesions FILE writes them all)")
    return lines


def _run_segment_batch(args: argparse.Namespace, progress: Progress, options: Any) -> int:
    """``cmedl segment FOLDER|LIST.txt -o OUT``: see :mod:`cmedl.batch`."""
    from cmedl.batch import batch_inputs, run_batch
    from cmedl.catalogue import resolve_model

    if args.lesions:
        raise InputError("--lesions is for one CT; a batch writes OUT/<case>.lesions.json for every case")
    inputs = batch_inputs(args.input)
    result = run_batch(
        inputs,
        args.output,
        resolve_model(args.model),
        options,
        progress,
        output_format=args.format or "seg.nrrd",
        probabilities_folder=args.probabilities,
        uncertainty_folder=args.uncertainty,
    )
    progress.done(result)
    counts = result["counts"]
    if args.json:
        _print_json(result)
    elif args.progress != "json":
        print(
            f"{result['out']}: {result['cases_total']} cases, {counts['ok']} segmented, {counts['skipped']} "
            f"already done, {counts['failed']} failed; {result['summary_csv']}"
        )
    if counts["failed"]:
        return _report(
            progress,
            f"{counts['failed']} of {result['cases_total']} cases failed; see {result['summary_csv']}",
            PARTIAL_FAILURE_EXIT_CODE,
        )
    return 0


# -- translate ---------------------------------------------------------------------------------------


def _add_translate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("translate", help="pseudo-MRI of a CT with a CMEDL run's translator.safetensors")
    parser.add_argument("input", help="CT volume file or DICOM series folder")
    parser.add_argument("-o", "--output", required=True, help="pseudo-MRI volume (.nii.gz, .nrrd, .mha)")
    parser.add_argument("--model", required=True, help="translator model file of a CMEDL run")
    parser.add_argument("--device", default=DEFAULT_DEVICE, choices=DEVICES)
    parser.add_argument("--force", action="store_true", help="translate even if the image does not look like CT")
    _add_progress_flag(parser)
    parser.set_defaults(handler=_run_translate)


def _run_translate(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.translate import translate_file

    if not Path(args.input).exists():
        raise InputError(f"input not found: {args.input}")
    if str(args.output).lower().endswith(".seg.nrrd"):
        raise InputError(f"{args.output}: a pseudo-MRI is an image, not a segmentation; write .nii.gz, .nrrd or .mha")
    try:
        summary = translate_file(args.input, args.output, args.model, args.device, args.force, progress)
    except NotCTError as error:
        raise NotCTError(f"{error} (--force translates it anyway)") from None
    progress.done(summary)
    if args.progress != "json":
        print(f"{summary['output']}: pseudo-MRI in {summary['seconds']:.1f} s on {summary['device']}")
    return 0


# -- lungs -------------------------------------------------------------------------------------------


def _add_lungs(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("lungs", help="detect the lungs: lung mask, slice range and ROI")
    parser.add_argument("input", help="CT volume file or DICOM series folder")
    parser.add_argument("--lungs-out", help="write the lung mask here")
    parser.add_argument("--roi-out", help="write the ROI mask here")
    defaults = _SEGMENT_DEFAULTS
    parser.add_argument("--threshold", type=float, default=defaults.lung_threshold_hu, help="air threshold in HU")
    parser.add_argument("--margin", type=float, default=defaults.roi_margin_mm, help="ROI margin around the lungs (mm)")
    parser.add_argument("--json", action="store_true", help="print lung volume, slice range and ROI box as JSON")
    parser.set_defaults(handler=_run_lungs, progress="none")


def _run_lungs(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.lungs import detect_lungs, write_lung_masks
    from cmedl.volumes import read_volume

    for out in (args.lungs_out, args.roi_out):
        if out and Path(out).resolve() == Path(args.input).resolve():
            raise InputError("an output path is the input path; the input is never overwritten")
    detection = detect_lungs(read_volume(args.input), threshold_hu=args.threshold, margin_mm=args.margin)
    write_lung_masks(detection, args.lungs_out, args.roi_out)
    summary = detection.summary()
    if args.json:
        _print_json(summary)
    else:
        first, last = summary["slice_range"]
        print(f"lungs: {summary['lung_volume_ml']:.0f} mL, slices {first}-{last}")
    return 0


# -- train -------------------------------------------------------------------------------------------


def _add_train(commands: argparse._SubParsersAction) -> None:
    about = (
        "train a segmentor with either method: ct_only on CT images/ and labels/, or cmedl (CT plus unpaired MRI "
        "images/ given with --mr and --method cmedl)"
    )
    parser = commands.add_parser("train", help=about, description=about)
    parser.add_argument("--config", help="JSON configuration file (command-line values override it)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--ct", help="CT dataset folder with images/ and labels/")
    parser.add_argument("--mr", help="MRI dataset folder with images/ (and optional labels/)")
    parser.add_argument("--out", help="run folder to create")
    parser.add_argument("--segmentor", choices=SEGMENTORS)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--iterations-per-epoch", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--device", choices=DEVICES)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--vgg-weights",
        metavar="PATH|random",
        help="VGG16 weights of the cmedl contextual loss: a torchvision state dict file, or 'random' "
        "(default: ImageNet weights from the torch hub cache)",
    )
    parser.add_argument(
        "--init",
        metavar="MODEL",
        help="fine-tune: start from this model file, catalogue name or run folder (a CMEDL run folder also starts "
        "the teacher and translator); architecture, patch size, spacing and HU window come from its model card, "
        "learning rates default to a tenth",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config value")
    _add_progress_flag(parser)
    parser.set_defaults(handler=_run_train)


def _named_train_values(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration values given with named flags (the ones left out are None and not returned)."""
    named = {
        "method": args.method,
        "ct": args.ct,
        "mr": args.mr,
        "out": args.out,
        "segmentor": args.segmentor,
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations_per_epoch,
        "batch_size": args.batch_size,
        "patch_size": args.patch_size,
        "device": args.device,
        "seed": args.seed,
        "vgg_weights": args.vgg_weights,
        "init": args.init,
    }
    return {key: value for key, value in named.items() if value is not None}


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A new run's configuration: the --config file, then the named flags, then --set, each overriding the last."""
    from cmedl.training.config import TrainConfig

    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    return TrainConfig.from_dict({**config.to_dict(), **_named_train_values(args)}).with_overrides(args.set)


def _run_train(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.training.config import TrainConfig
    from cmedl.training.finetune import apply_init
    from cmedl.training.trainer import Trainer

    named = _named_train_values(args)
    set_keys = {assignment.split("=", 1)[0].strip() for assignment in args.set}
    if args.resume:
        if args.config or {"method", "ct", "mr", "out", "segmentor", "init"} & set(named) or "init" in set_keys:
            raise InputError("--resume continues a run as configured; only --epochs, --device and --set may change")
        overrides = TrainConfig.from_dict({}).with_overrides(args.set)
        changed = {key: getattr(overrides, key) for key in set_keys}
        # --set is applied last, as for a new run (and a key given both ways is then passed once)
        trainer = Trainer.resume_run(args.resume, progress, **{**named, **changed})
    else:
        config = train_config_from_args(args)
        if config.init:
            # What the user gave (config file, flags, --set) stays; the rest comes from the model (fine-tuning).
            given = set(json.loads(Path(args.config).read_text())) if args.config else set()
            config = apply_init(config, given | set(named) | set_keys)
        trainer = Trainer(config, progress)
    status = trainer.fit()
    progress.done({"run": str(trainer.run.path), **status})
    if args.progress != "json":
        print(f"{trainer.run.path}: {status['state']} ({status.get('message', '')})")
    if status["state"] == "stopped":
        from cmedl.training.distributed import launch_from_environment

        # torchrun takes a worker's non-zero exit for a failure of the whole launch (tracebacks, exit 1): its
        # workers end with 0, and status.json and the line above say that the run stopped.
        return 0 if launch_from_environment() is not None else CancelledError.exit_code
    return 0 if status["state"] == "finished" else 8


# -- runs --------------------------------------------------------------------------------------------


def _add_runs(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "runs", help="list the training runs in a folder (CMEDL Train's runs folder): state, epoch, best Dice"
    )
    parser.add_argument("root", help="the folder that holds the run folders")
    parser.add_argument("--json", action="store_true", help="print every run's values as JSON")
    parser.set_defaults(handler=_run_runs, progress="none")


def _run_runs(args: argparse.Namespace, progress: Progress) -> int:
    """``cmedl runs ROOT``: what CMEDL Train's runs list shows, newest first (:mod:`cmedl.training.runs`)."""
    from cmedl.training.runs import list_runs, read_run

    if not Path(args.root).is_dir():
        raise InputError(f"runs folder not found: {args.root}")
    snapshots = [read_run(path) for path in list_runs(args.root)]
    if args.json:
        keys = ("method", "state", "alive", "epoch", "epochs", "best_validation_dice", "best_epoch", "error")
        _print_json({"runs": [{"run": str(run.path), **{key: getattr(run, key) for key in keys}} for run in snapshots]})
        return 0
    rows = [("RUN", "METHOD", "STATE", "EPOCH", "BEST VALIDATION DICE")]
    for run in snapshots:
        best = run.best_validation_dice
        dice = "" if best is None else f"{best:.3f}" + (f" (epoch {run.best_epoch})" if run.best_epoch else "")
        epoch = f"{run.epoch}/{run.epochs}" if run.epochs else ""
        rows.append((str(run.path), run.method, run.state, epoch, dice))
    _print_table(rows)
    return 0


# -- phantom -----------------------------------------------------------------------------------------


def _add_phantom(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("phantom", help="write synthetic unpaired CT/MRI chest phantoms with tumours")
    parser.add_argument("out", help="dataset folder to write (ct/ and mr/ with images/ and labels/)")
    parser.add_argument("--ct", type=int, default=4, help="number of CT cases")
    parser.add_argument("--mr", type=int, default=4, help="number of MRI cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="in-plane matrix size (smaller = coarser spacing)")
    parser.add_argument(
        "--ct-contrast",
        type=float,
        default=None,
        metavar="HU",
        help="CT tumour minus mediastinal soft tissue in HU, e.g. -15 (default: 3-9 HU below)",
    )
    parser.add_argument(
        "--stratified",
        action="store_true",
        help="two tumours per case at set sites, each site in two of every three cases",
    )
    parser.add_argument(
        "--paired-mr", action="store_true", help="also write the MR of each CT case's anatomy under ct/paired_mr/"
    )
    _add_progress_flag(parser)
    parser.set_defaults(handler=_run_phantom)


def _run_phantom(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.phantom import size_problem, write_phantom_dataset

    if args.ct < 0 or args.mr < 0 or args.ct + args.mr == 0:
        raise InputError("ask for at least one case (--ct N and/or --mr M, not negative)")
    if args.size < 64:
        raise InputError("--size must be at least 64")
    problem = size_problem(args.size, name="--size")  # the range, and the memory one case needs
    if problem:
        raise InputError(problem)
    summary = write_phantom_dataset(
        args.out,
        n_ct=args.ct,
        n_mr=args.mr,
        seed=args.seed,
        size=args.size,
        progress=lambda done, total: progress.update("phantom", done, total, "cases"),
        ct_tumour_contrast=args.ct_contrast,
        stratified=args.stratified,
        paired_mr=args.paired_mr,
    )
    progress.done({"out": str(args.out)})
    if args.progress != "json":
        contrast = "" if args.ct_contrast is None else f", CT tumour contrast {args.ct_contrast:+g} HU"
        print(f"{args.out}: {args.ct} CT and {args.mr} MRI phantom cases{contrast}")
    return 0 if summary is not None else 1


# -- info --------------------------------------------------------------------------------------------


def _add_info(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("info", help="show a model file's model card and sha256")
    parser.add_argument("model", nargs="?", default=None, help="model file or catalogue name (default: demo)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_info, progress="none")


def _run_info(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.catalogue import resolve_model
    from cmedl.modelcard import describe_model
    from cmedl.training.finetune import fine_tuned_on_line, parent_line

    info = describe_model(resolve_model(args.model))
    if args.json:
        _print_json(info)
        return 0
    card = info["model_card"]
    lines = [
        f"file:          {info['file']}",
        f"sha256:        {info['sha256']}",
        f"name:          {card['name']}",
        f"architecture:  {card['architecture']} {card['architecture_options']} ({info['parameters']:,} parameters)",
        f"method:        {card['method']}",
        f"input:         CT, HU window {card['hu_window']}, spacing {card['spacing_mm']} mm, "
        f"patch {card['patch_size']}",
        f"labels:        {', '.join(label['name'] for label in card['labels'])}",
        f"training data: {card['training_data']}",
        f"metrics:       {card['metrics']}",
        f"license:       {card['license']}",
        f"intended use:  {card['intended_use']}",
        f"engine:        {card['engine_version']}",
    ]
    if card.get("description"):
        lines.append(f"description:   {card['description']}")
    if parent_line(card):
        lines.append(f"parent:        {parent_line(card)}")
    if fine_tuned_on_line(card):
        lines.append(f"fine-tuned on: {fine_tuned_on_line(card)}")
    deviations = (card.get("training") or {}).get("deviations") or []
    if deviations:
        lines.append("deviations from the paper:")
        lines.extend(f"  - {deviation}" for deviation in deviations)
    print("\n".join(lines))
    return 0


# -- evaluate ----------------------------------------------------------------------------------------


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate", help="score segmentations against reference labels: Dice, surface Dice, HD95, volumes"
    )
    parser.add_argument("predictions", help="a label file, or a folder of them (with --images: synthesised images)")
    parser.add_argument("references", help="the reference label file, or a folder matched by file name")
    parser.add_argument(
        "--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm, positive and finite (default 2)"
    )
    parser.add_argument(
        "--label", type=int, default=None, help="score only this label value (1 or more) of the predictions"
    )
    parser.add_argument("--strip", default="", help="suffix removed from prediction names before matching")
    parser.add_argument(
        "--csv",
        default=None,
        help="also write one row per case to this CSV file (not an input, nor inside an input folder)",
    )
    parser.add_argument("--json", action="store_true", help="print the cases and the summary as JSON")
    parser.add_argument(
        "--compare",
        metavar="PRED_B",
        default=None,
        help="a second method's predictions of the same cases: paired Dice and surface Dice differences, "
        "Wilcoxon signed-rank p and bootstrap 95%% CI of the mean difference",
    )
    parser.add_argument("--strip-b", default=None, help="suffix removed from PRED_B names (default: --strip)")
    parser.add_argument("--names", default="A,B", help="names of the two methods with --compare (default A,B)")
    parser.add_argument(
        "--images",
        action="store_true",
        help="compare synthesised images (pseudo-MRI) with real images instead: KL divergence, PSNR, SSIM",
    )
    _add_progress_flag(parser)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.evaluate import evaluate, evaluate_translations, refuse_output_among_inputs, write_csv

    if args.images:
        if args.csv or args.label is not None or args.compare:
            raise InputError("--csv, --label and --compare apply to label maps, not to --images")
        result = evaluate_translations(args.predictions, args.references, args.strip, progress)
        progress.done(result["summary"])
        if args.json:
            _print_json(result)
        else:
            _print_translation_scores(result)
        return 0
    if args.compare:
        return _run_compare(args, progress)
    if args.csv:  # before anything is read: the table must never replace an input
        refuse_output_among_inputs(args.csv, [args.predictions, args.references])
    report = evaluate(args.predictions, args.references, args.tolerance, args.label, args.strip, progress)
    if args.csv:
        write_csv(report, args.csv)
    progress.done(report.summary())
    if args.json:
        _print_json(report.to_dict())
    else:
        _print_segmentation_scores(report)
    return 0


def _run_compare(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.evaluate import compare_predictions, format_comparison, refuse_output_among_inputs, write_comparison_csv

    if args.csv:  # before anything is read: the table must never replace an input
        refuse_output_among_inputs(args.csv, [args.predictions, args.compare, args.references])
    names = args.names.split(",")
    if len(names) != 2:
        raise InputError(f"--names takes two names separated by a comma, got {args.names!r}")
    report = compare_predictions(
        args.predictions,
        args.compare,
        args.references,
        strip_a=args.strip,
        strip_b=args.strip if args.strip_b is None else args.strip_b,
        tolerance_mm=args.tolerance,
        label=args.label,
        names=(names[0], names[1]),
        progress=progress,
    )
    if args.csv:
        write_comparison_csv(report, args.csv)
    result = report.to_dict()
    progress.done(result["comparison"])
    if args.json:
        _print_json(result)
    else:
        print(format_comparison(report))
    return 0


def _print_segmentation_scores(report: EvaluationReport) -> None:
    print(f"{'case':<28} {'Dice':>7} {'sDSC':>7} {'HD95 mm':>9} {'pred mL':>9} {'ref mL':>9}")
    for case in report.cases:
        print(f"{case.case:<28} {case.dice:7.3f} {case.surface_dice:7.3f} {case.hd95_mm:9.1f} "
              f"{case.predicted_ml:9.2f} {case.reference_ml:9.2f}")  # fmt: skip
    summary = report.summary()
    dice, surface, hd95 = summary["dice"], summary["surface_dice"], summary["hd95_mm"]
    print(f"{summary['cases']} cases: Dice {dice['mean']:.3f} ± {dice['sd']:.3f}, surface Dice "
          f"({summary['tolerance_mm']:g} mm) {surface['mean']:.3f} ± {surface['sd']:.3f}, "
          f"HD95 {hd95['mean']:.1f} ± {hd95['sd']:.1f} mm")  # fmt: skip
    if summary["hd95_undefined_cases"]:
        print(f"HD95 left out of the mean for {summary['hd95_undefined_cases']} case(s) with an empty mask")
    for name in report.missing_predictions:
        print(f"no prediction for reference {name}")
    for name in report.unmatched_predictions:
        print(f"no reference for prediction {name}")


def _print_translation_scores(result: dict) -> None:
    print(f"{'case':<28} {'KL nats':>8} {'PSNR dB':>8} {'SSIM':>7}")
    for case in result["cases"]:
        print(f"{case['case']:<28} {case['kl_divergence']:8.4f} {case['psnr_db']:8.2f} {case['ssim']:7.4f}")
    summary = result["summary"]
    kl, psnr, ssim = summary["kl_divergence"], summary["psnr_db"], summary["ssim"]
    print(f"{summary['cases']} cases: KL {kl['mean']:.4f} ± {kl['sd']:.4f}, PSNR {psnr['mean']:.2f} ± "
          f"{psnr['sd']:.2f} dB, SSIM {ssim['mean']:.4f} ± {ssim['sd']:.4f}")  # fmt: skip
    for name in result["missing_synthetic"]:
        print(f"no synthetic image for real image {name}")
    for name in result["unmatched_synthetic"]:
        print(f"no real image for synthetic image {name}")


# -- models ------------------------------------------------------------------------------------------


def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="the model catalogue: list, add, remove, download models")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="built-in, user and downloadable models")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_run_models_list, progress="none")

    add = actions.add_parser("add", help="register a segmentation model file under a name")
    add.add_argument("file", help="a CMEDL segmentation model file (.safetensors)")
    add.add_argument("--name", help="catalogue name (default: the file name without .safetensors)")
    add.add_argument("--overwrite", action="store_true", help="replace a user model of the same name")
    add.set_defaults(handler=_run_models_add, progress="none")

    remove = actions.add_parser("remove", help="delete a user model")
    remove.add_argument("name")
    remove.set_defaults(handler=_run_models_remove, progress="none")

    download = actions.add_parser("download", help="fetch a downloadable model into the cache")
    download.add_argument("name")
    download.add_argument("--accept-license", action="store_true", help="accept the model's license")
    download.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    _add_progress_flag(download)
    download.set_defaults(handler=_run_models_download)

    clear = actions.add_parser("clear-cache", help="delete every downloaded model file")
    clear.set_defaults(handler=_run_models_clear_cache, progress="none")

    where = actions.add_parser("path", help="print the CMEDL home, user models and cache folders")
    where.set_defaults(handler=_run_models_path, progress="none")


def _run_models_list(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.catalogue import list_models

    problems: list[str] = []
    entries = list_models(problems)
    if args.json:
        _print_json({"models": [entry.to_dict() for entry in entries], "problems": problems})
        return 0
    rows = [("NAME", "SOURCE", "AVAILABLE", "TITLE", "LICENSE")]
    for entry in entries:
        # A multi-line title or license would break the table's rows.
        title, license_text = (" ".join(text.split()) for text in (entry.title, entry.license))
        rows.append((entry.name, entry.source, "yes" if entry.available else "no", title, license_text))
    _print_table(rows)
    for problem in problems:
        print(f"cmedl: warning: {problem}", file=sys.stderr)
    return 0


def _run_models_add(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.catalogue import add_model
    from cmedl.modelfile import check_model_file

    # The full check (network built, weights loaded) refuses a file that would only fail at segment time.
    entry = add_model(args.file, name=args.name, overwrite=args.overwrite, check=check_model_file)
    print(f"added {entry.name}: {entry.path}")
    return 0


def _run_models_remove(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.catalogue import remove_model

    path = remove_model(args.name)
    print(f"removed {args.name} ({path})")
    return 0


def _run_models_download(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.catalogue import SOURCE_DOWNLOAD, find_model
    from cmedl.downloads import download_model

    entry = find_model(args.name)
    if not args.accept_license and entry.source == SOURCE_DOWNLOAD:
        notice = f"{entry.name}: {entry.title}\nsource: {entry.url}\nlicense: {entry.license}"
        if args.progress == "json":
            progress.log(notice)
        else:
            print(notice)
        raise ConfigError(f"{entry.name} is downloaded only once its license is accepted: pass --accept-license")
    path = download_model(args.name, accept_license=args.accept_license, progress=progress, timeout=args.timeout)
    progress.done({"name": args.name, "path": str(path)})
    if args.progress != "json":
        print(f"{args.name}: {path}")
    return 0


def _run_models_clear_cache(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.catalogue import cache_dir
    from cmedl.downloads import clear_cache

    count = clear_cache()
    print(f"removed {count} downloaded model file{'s' if count != 1 else ''} from {cache_dir()}")
    return 0


def _run_models_path(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.catalogue import cache_dir, cmedl_home, user_models_dir

    print(f"home:        {cmedl_home()}")
    print(f"user models: {user_models_dir()}")
    print(f"cache:       {cache_dir()}")
    return 0


# -- demo and bench ----------------------------------------------------------------------------------


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="segment a new phantom CT with the built-in model and report Dice")
    parser.add_argument("--out", default="demo_output", help="folder for the phantom, result and overlay")
    parser.add_argument("--seed", type=int, default=2026, help="phantom seed (not one used to train the model)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, choices=DEVICES)
    _add_progress_flag(parser)
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.demo import demo_report, run_demo

    summary = run_demo(Path(args.out), seed=args.seed, device=args.device, progress=progress)
    progress.done(summary)
    print(demo_report(summary))
    return 0


def _add_bench(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="inference speed against this machine's matmul peak: reference vs fast path per segmentor, whole CT",
    )
    parser.add_argument("--segmentors", default="unet,densefcn,mrrn")
    parser.add_argument("--batch-sizes", default="1", help="slices per network call, comma-separated")
    parser.add_argument("--size", type=int, default=256, help="slice side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs, paths alternating")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per physical core)")
    parser.add_argument("--skip-volume", action="store_true", help="skip the whole-CT figures")
    parser.add_argument("--slices", type=int, default=150, help="slices of the whole 512x512 phantom CT")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    parser.set_defaults(handler=_run_bench, progress="none")


def _run_bench(args: argparse.Namespace, progress: Progress) -> int:
    from cmedl.bench import run_benchmarks

    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be at least 1")
    if args.size < 32 or args.repeats < 1 or args.slices < 16:
        raise InputError("--size must be at least 32, --repeats at least 1 and --slices at least 16")
    figures = run_benchmarks(
        segmentors=[s for s in args.segmentors.split(",") if s],
        batch_sizes=[int(b) for b in args.batch_sizes.split(",") if b],
        repeats=args.repeats,
        device=args.device,
        whole_volume=not args.skip_volume,
        threads=args.threads,
        size=args.size,
        volume_slices=args.slices,
        quiet=args.json,
    )
    if args.json:
        _print_json(figures)
    return 0


# -- entry point -------------------------------------------------------------------------------------


def _add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=["text", "json", "none"],
        default="text",
        help="progress display: a bar (text), JSON lines on stdout for a parent process (json), or none",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmedl",
        description="CMEDL: lung tumour segmentation on CT with cross-modality educed distillation.",
    )
    parser.add_argument("--version", action="version", version=f"cmedl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_segment,
        _add_translate,
        _add_lungs,
        _add_train,
        _add_runs,
        _add_phantom,
        _add_info,
        _add_evaluate,
        _add_models,
        _add_demo,
        _add_bench,
    ):
        add(commands)
    return parser


# Commands that write all their outputs or none: stopped, they have written nothing.
_ALL_OR_NOTHING = ("segment", "translate", "lungs", "evaluate", "info", "models")


def console() -> None:
    """The ``cmedl`` console script: the command-line process, as ``python -m cmedl`` is (see ``__main__``)."""
    mark_cli_process()
    raise SystemExit(main())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = _progress_for(args)
    handler: Handler = args.handler
    try:
        # SIGTERM and SIGINT: `train` stops at its next consistent point and saves it; every other command stops
        # at once, its temporary files removed as the exception passes (see cmedl.interrupts).
        # In the command-line process a signal after the command's end is ignored: the outcome is decided.
        with stop_signals(cooperative=args.command == "train", ignore_after=is_cli_process()):
            return handler(args, progress)
    except Interrupted as stop:
        return _report(progress, _stopped_message(args, stop.signal_name), stop.exit_code)
    except CMEDLError as error:
        return _report(progress, str(error) or type(error).__name__, error.exit_code)
    except KeyboardInterrupt:
        return _report(progress, "interrupted", 130)
    except BrokenPipeError:
        # The reader went away (`cmedl info | head`): nothing more can be said to it, and Python's own flush at
        # exit would fail again, so stdout points to nowhere from here on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except MemoryError:
        return _report(progress, "out of memory; try a smaller --batch-size or another device", 1)
    except Exception as error:  # a bug, not a user error: one line, the traceback only on request
        if os.environ.get("CMEDL_DEBUG"):
            traceback.print_exc()
        if type(error).__name__ == "OutOfMemoryError":
            return _report(progress, "the GPU ran out of memory; try a smaller --batch-size or --device cpu", 1)
        first = str(error).splitlines()[0] if str(error) else ""
        return _report(progress, f"unexpected {type(error).__name__}: {first} (CMEDL_DEBUG=1 for more)", 1)


def _stopped_message(args: argparse.Namespace, signal_name: str) -> str:
    """The one line of a command stopped by a signal: what it leaves behind."""
    if args.command in _ALL_OR_NOTHING and not (args.command == "segment" and _is_batch(args)):
        return f"stopped by {signal_name}; nothing written"
    return f"stopped by {signal_name}; outputs completed before are kept, none is left half-written"


def _is_batch(args: argparse.Namespace) -> bool:
    try:
        from cmedl.batch import is_batch_input

        return bool(is_batch_input(args.input))
    except Exception:  # a stop message must not fail; a batch is the careful assumption
        return True


def _report(progress: Progress, message: str, exit_code: int) -> int:
    """Print the one-line error on stderr (and as a JSON event for a parent process); return the exit code."""
    message = message.splitlines()[0]
    if isinstance(progress, JsonLinesProgress):
        progress.error(message, exit_code)
    print(f"cmedl: error: {message}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
