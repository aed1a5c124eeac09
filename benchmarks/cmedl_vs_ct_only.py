"""Does cross-modality educed distillation help? CMEDL against the CT-only baseline on synthetic phantoms.

What is compared: two ways of training the same CT student network (architecture, width, data, patch size,
in-plane spacing, batch size, epochs and iterations per epoch are identical):

- ``ct_only``: the student alone, Dice loss on labelled CT patches;
- ``cmedl``: the student trained jointly with a CycleGAN (CT -> pseudo-MRI, with the contextual loss) and an
  MRI teacher, pulled toward the teacher's features by the hint loss.

"Same budget" means the same number of optimisation steps of the student (``epochs * iterations_per_epoch``,
each on a batch of ``batch_size`` patches). A CMEDL step also updates the translator and the teacher, so it
costs several times the compute of a CT-only step; the wall time of every run is recorded beside its result.
Early stopping is switched off (patience = epochs) so that no run takes fewer steps than the other; the
student that is evaluated is the one each run exported, i.e. the epoch with the best validation Dice on a
separate validation CT set (or the last epoch when ``--val 0``).

Data: one unpaired phantom set (CT with labels, MRI with labels) for training, a validation CT set and a
held-out test CT set, each drawn from its own dataset seed; the script checks that no test anatomy is also a
training or validation anatomy. Nothing is tuned here to favour either method.

Evaluation: every exported student segments every test CT through the real inference pipeline
(:class:`cmedl.segment.Segmenter`: lung detection, ROI, resampling, patch tiling, blending, labelmap on the CT's
grid) and is scored in 3D on the CT's voxel spacing with :mod:`cmedl.metrics`: Dice, surface Dice at a
tolerance (2 mm by default) and HD95 in mm. As a diagnostic only, the CMEDL teacher is also scored on the
pseudo-MRI of the test CTs (CT patch -> generator -> teacher), which tells whether the teacher learned at all.

Deviation from the paper: ImageNet VGG16 weights cannot be downloaded on an offline machine, so by default
the contextual loss uses a randomly initialised VGG16 (``--vgg-weights random``); give ``--vgg-weights PATH``
to use a saved ImageNet state dict. The output and ``results.json`` say which was used.

Usage::

    python benchmarks/cmedl_vs_ct_only.py --out OUT                  # small CPU configuration, 3 seeds
    python benchmarks/cmedl_vs_ct_only.py --out OUT --preset paper   # paper-sized networks and patches (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import SimpleITK as sitk
import torch
from scipy.stats import wilcoxon

import cmedl
from cmedl import __version__
from cmedl.evaluate import score_case, score_translation
from cmedl.modelfile import LoadedModel, load_model
from cmedl.phantom import make_phantom, write_phantom_dataset
from cmedl.progress import CallbackProgress
from cmedl.segment import Segmenter, SegmentOptions
from cmedl.training.config import TrainConfig
from cmedl.training.runfolder import RunFolder
from cmedl.training.trainer import Trainer
from cmedl.translate import load_translator, translate_volume
from cmedl.volumes import read_volume, same_geometry

METHODS = ("ct_only", "cmedl")
TEACHER_DIAGNOSTIC = "cmedl_teacher_on_pseudo_mri"
TIMING_FILE = "benchmark_run.json"

# "small": finishes on a 2-core CPU; sizes chosen for time, not for either method's benefit. It runs torch on
# one thread: these networks are so small that two threads gain little when alone, and on a shared machine
# (load above the core count) two threads were measured 40x slower than one, waiting on each other.
# "paper": the paper's patch size and full network widths (U-Net 64, ResNet generator 64 with 9 blocks, CX on
# 65x65 = 4225 positions); meant for a GPU. Its epoch budget is this script's choice: the paper trained up to
# 100 epochs over ~58,000 patches with early stopping, which is far beyond a benchmark.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "size": 128, "ct": 8, "mr": 6, "val": 2, "test": 6, "patch": 64, "spacing": 3.0, "epochs": 20,
        "iterations": 20, "batch": 2, "base_channels": 8, "translator_channels": 8, "translator_blocks": 2,
        "cx_positions": 256, "device": "cpu", "threads": 1,
    },
    "paper": {
        "size": 512, "ct": 40, "mr": 20, "val": 8, "test": 20, "patch": 256, "spacing": 1.0, "epochs": 100,
        "iterations": 100, "batch": 2, "base_channels": 64, "translator_channels": 64, "translator_blocks": 9,
        "cx_positions": 4225, "device": "auto", "threads": None,
    },
}  # fmt: skip


# -- configuration ----------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train CT-only and CMEDL students with the same budget and compare them on held-out CT.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (data, runs, results.json)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="default sizes (see the top)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per method")
    parser.add_argument("--data-seed", type=int, default=7, help="dataset seed; validation and test use +1 and +2")
    parser.add_argument("--ct", type=int, help="training CT phantoms (with labels)")
    parser.add_argument("--mr", type=int, help="training MRI phantoms (with labels, unpaired with the CTs)")
    parser.add_argument("--val", type=int, help="validation CT phantoms for model selection (0: last epoch)")
    parser.add_argument("--test", type=int, help="held-out test CT phantoms")
    parser.add_argument("--size", type=int, help="phantom in-plane matrix")
    parser.add_argument("--patch", type=int, help="training patch side in pixels (multiple of 32)")
    parser.add_argument("--spacing", type=float, help="in-plane spacing the networks work at, mm")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--iterations", type=int, help="iterations (student steps) per epoch")
    parser.add_argument("--batch", type=int, help="batch size")
    parser.add_argument("--base-channels", type=int, help="U-Net width of student and teacher")
    parser.add_argument("--translator-channels", type=int, help="CycleGAN generator/discriminator width")
    parser.add_argument("--translator-blocks", type=int, help="residual blocks of each generator")
    parser.add_argument("--cx-positions", type=int, help="feature positions the contextual loss compares")
    parser.add_argument("--vgg-weights", default="random", help="'random' or a path to ImageNet VGG16 weights")
    parser.add_argument("--device", help="training device: auto, cpu or cuda")
    parser.add_argument("--eval-device", default="cpu", help="inference device for the evaluation")
    parser.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance, mm")
    parser.add_argument("--threads", type=int, help="torch CPU threads (small preset: 1; paper: torch's choice)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra training config value (both methods)"
    )
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1 or args.ct < 1 or args.mr < 1 or args.test < 1 or args.val < 0:
        parser.error("--seeds, --ct, --mr and --test must be at least 1 and --val at least 0")
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved benchmark settings, as recorded in results.json."""
    keys = (
        "preset", "seeds", "data_seed", "ct", "mr", "val", "test", "size", "patch", "spacing", "epochs", "iterations",
        "batch", "base_channels", "translator_channels", "translator_blocks", "cx_positions", "vgg_weights", "device",
        "eval_device", "tolerance", "threads", "set",
    )  # fmt: skip
    return {key: getattr(args, key) for key in keys}


def train_config(args: argparse.Namespace, method: str, seed: int, data: dict[str, Path], out: Path) -> TrainConfig:
    """One run's configuration; everything but the method-specific CMEDL keys is shared by both methods."""
    values: dict[str, Any] = {
        "method": method,
        "ct": str(data["train"] / "ct"),
        "out": str(out),
        "segmentor": "unet",
        "segmentor_options": {"base_channels": args.base_channels},
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "batch_size": args.batch,
        "patch_size": args.patch,
        "spacing_mm": (args.spacing, args.spacing),
        # No early stopping: both methods take exactly epochs * iterations student steps.
        "early_stopping_patience": args.epochs,
        "seed": seed,
        "device": args.device,
        "name": f"benchmark-{method}-seed{seed}",
    }
    if args.val > 0:
        values["validation"] = str(data["val"] / "ct")
    else:
        values["validation_fraction"] = 0.0  # no validation: the last epoch's student is exported
    if method == "cmedl":
        values.update(
            {
                "mr": str(data["train"] / "mr"),
                "translator_options": {"base_channels": args.translator_channels, "n_blocks": args.translator_blocks},
                "vgg_weights": args.vgg_weights,
                "cx_max_positions": args.cx_positions,
            }
        )
    return TrainConfig.from_dict(values).with_overrides(args.set).validate()


# -- data --------------------------------------------------------------------------------------------------


def make_datasets(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, dict]]:
    """Write (or reuse) the training, validation and test phantom sets; return their folders and descriptions."""
    wanted = {
        "train": (args.ct, args.mr, args.data_seed),
        "val": (args.val, 0, args.data_seed + 1),
        "test": (args.test, 0, args.data_seed + 2),
    }
    folders, descriptions = {}, {}
    for name, (n_ct, n_mr, seed) in wanted.items():
        folder = args.out / "data" / name
        folders[name] = folder
        if n_ct == 0:
            continue
        index = folder / "phantoms.json"
        description = json.loads(index.read_text()) if index.exists() else None
        same = description is not None and (description["n_ct"], description["n_mr"], description["seed"]) == (
            n_ct, n_mr, seed
        ) and description["size"] == args.size  # fmt: skip
        if not same:
            if folder.exists() and any(folder.iterdir()):
                sys.exit(f"{folder} holds a different phantom set; remove it or choose another --out")
            log(f"writing {name} phantoms: {n_ct} CT, {n_mr} MRI, dataset seed {seed}, {args.size} px")
            description = write_phantom_dataset(folder, n_ct=n_ct, n_mr=n_mr, seed=seed, size=args.size)
        descriptions[name] = description
    anatomy = {name: {case["seed"] for case in d["cases"]} for name, d in descriptions.items()}
    if anatomy["test"] & (anatomy["train"] | anatomy.get("val", set())):
        sys.exit("a test phantom shares its anatomy seed with a training or validation phantom; change --data-seed")
    return folders, descriptions


def held_out_cases(description: dict, folder: Path) -> list[dict]:
    return [
        {
            "name": case["name"],
            "image": folder / case["image"],
            "label": folder / case["label"],
            "tumours": case["tumours"],
            "spacing_mm": case["spacing_mm"],
            "seed": case["seed"],
            "size": case["size"],
        }
        for case in description["cases"]
        if case["modality"] == "ct"
    ]


# -- training ----------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train one run (or reuse a finished one from an earlier invocation); returns its timing and curves."""
    run = RunFolder(config.out)
    record_path = run.path / TIMING_FILE
    if record_path.exists() and run.read_status().get("state") == "finished":
        # A finished run is reused only when it was trained with exactly this configuration. Keys added to the
        # engine after the run take their defaults, which keep the earlier behaviour.
        stored = TrainConfig.from_dict(run.read_json("config.json")).to_dict()
        if json.loads(json.dumps(stored)) != json.loads(json.dumps(config.to_dict())):
            sys.exit(f"{run.path} was trained with another configuration; remove it or choose another --out")
        log(f"reusing finished run {run.path}")
        return json.loads(record_path.read_text())
    if run.path.exists():
        sys.exit(f"{run.path} holds an unfinished run; remove it or choose another --out")

    def forward(event: dict) -> None:
        if event["event"] == "log":
            log(f"  {config.method} seed {config.seed}: {event['message']}")

    log(f"training {config.method} seed {config.seed} ({config.epochs} x {config.iterations_per_epoch} steps)")
    started = time.perf_counter()
    status = Trainer(config, progress=CallbackProgress(forward)).fit()
    wall_seconds = time.perf_counter() - started
    if status["state"] != "finished":
        sys.exit(f"run {run.path} ended {status['state']}: {status.get('message')}")
    epochs = run.read_metrics()
    steps = config.epochs * config.iterations_per_epoch
    record = {
        "method": config.method,
        "seed": config.seed,
        "run": str(run.path),
        "student_steps": steps,
        "epochs_run": len(epochs),
        "wall_seconds": round(wall_seconds, 1),
        "seconds_per_step": round(wall_seconds / steps, 3),
        "best_epoch": status.get("best_epoch"),
        "best_validation_dice": status.get("best_validation_dice"),
        "load_average_after": list(os.getloadavg()),
        "epochs": epochs,
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# -- evaluation --------------------------------------------------------------------------------------------


class TeacherOnPseudoMRI(torch.nn.Module):
    """CT patch -> pseudo-MRI -> MRI teacher logits, so the teacher runs through the CT inference pipeline."""

    def __init__(self, generator: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.generator(x))


def teacher_model(translator_path: Path, device: str) -> LoadedModel:
    translator = load_translator(translator_path, device)
    # The translator's card carries the student's HU window, spacing and patch size, which is what inference needs.
    card = dataclasses.replace(translator.card, kind="segmentor")
    network = TeacherOnPseudoMRI(translator.model.generator, translator.model.teacher).eval()
    return LoadedModel(network=network, card=card, path=translator_path, sha256=translator.sha256)


def evaluate(model: LoadedModel, cases: list[dict], device: str, tolerance_mm: float) -> list[dict[str, Any]]:
    """Per-case metrics of one model on the test CTs, in 3D on each CT's own voxel spacing."""
    segmenter = Segmenter(model, SegmentOptions(device=device))
    rows = []
    for case in cases:
        ct = read_volume(case["image"])
        truth = read_volume(case["label"])
        if not same_geometry(ct, truth):
            raise RuntimeError(f"{case['name']}: the truth label is not on the CT's grid")
        result = segmenter.segment(ct, name=case["name"])
        score = score_case(result.label, truth, tolerance_mm, label=1, case=case["name"])
        rows.append(
            {
                "case": case["name"],
                "dice": score.dice,
                "surface_dice": score.surface_dice,
                "hd95_mm": score.hd95_mm,
                "predicted_ml": score.predicted_ml,
                "truth_ml": score.reference_ml,
                "tumour_locations": [tumour["location"] for tumour in case["tumours"]],
                "spacing_mm": list(ct.GetSpacing()),
                "seconds": round(result.seconds, 2),
            }
        )
    return rows


def translation_rows(translator_path: Path, cases: list[dict], device: str, paired_mr: dict) -> list[dict[str, Any]]:
    """Pseudo-MRI of each test CT against the MRI phantom of the same anatomy (same phantom seed), in the body.

    The CT itself (shifted so that air is 0) is scored against the same MRI too: the floor a translator has to
    beat. ``paired_mr`` caches the MRI phantoms by case name across runs.
    """
    translator = load_translator(translator_path, device)
    rows = []
    for case in cases:
        ct = read_volume(case["image"])
        if case["name"] not in paired_mr:
            paired_mr[case["name"]] = make_phantom("mr", case["seed"], size=int(case["size"][0])).image
        mr = paired_mr[case["name"]]
        body = sitk.Cast(ct > -500, sitk.sitkUInt8)
        pseudo = translate_volume(ct, translator, torch.device(device))
        untranslated = sitk.Cast(ct, sitk.sitkFloat32) + 1024.0
        for source, image in (("pseudo_mri", pseudo), ("ct_as_is", untranslated)):
            score = score_translation(image, mr, body, case=case["name"])
            rows.append({"source": source, "case": case["name"], "kl_divergence": score.kl_divergence,
                         "psnr_db": score.psnr_db, "ssim": score.ssim})  # fmt: skip
    return rows


# -- statistics and report ---------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def summarise(rows: list[dict], runs: list[dict]) -> dict[str, Any]:
    """Means and sample SDs over all (seed, case) rows; HD95 over finite values only."""
    hd95 = [row["hd95_mm"] for row in rows]
    finite = [value for value in hd95 if math.isfinite(value)]
    minutes = [run["wall_seconds"] / 60.0 for run in runs]
    return {
        "n": len(rows),
        "dice": mean_sd([row["dice"] for row in rows]),
        "surface_dice": mean_sd([row["surface_dice"] for row in rows]),
        "hd95_mm": mean_sd(finite),
        "hd95_infinite": len(hd95) - len(finite),
        "training_minutes": mean_sd(minutes) if runs else (float("nan"), float("nan")),
        "seconds_per_step": statistics.fmean(run["seconds_per_step"] for run in runs) if runs else float("nan"),
    }


def paired_test(rows: list[dict], metric: str) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of CMEDL against CT only over matched (seed, case) pairs."""
    by_key = {
        method: {(row["seed"], row["case"]): row[metric] for row in rows if row["method"] == method}
        for method in METHODS
    }
    keys = sorted(
        key
        for key in by_key["cmedl"].keys() & by_key["ct_only"].keys()
        if math.isfinite(by_key["cmedl"][key]) and math.isfinite(by_key["ct_only"][key])
    )
    cmedl = np.array([by_key["cmedl"][key] for key in keys])
    ct_only = np.array([by_key["ct_only"][key] for key in keys])
    differences = cmedl - ct_only
    result: dict[str, Any] = {
        "pairs": len(keys),
        "cmedl_better": int((differences > 0).sum()),
        "ct_only_better": int((differences < 0).sum()),
        "ties": int((differences == 0).sum()),
        "median_difference": float(np.median(differences)) if len(keys) else float("nan"),
        "statistic": float("nan"),
        "p_value": float("nan"),
    }
    if np.any(differences != 0):
        test = wilcoxon(cmedl, ct_only, alternative="two-sided")
        result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return result


def format_table(summaries: dict[str, dict]) -> str:
    header = (
        "| method | Dice mean ± sd | surface Dice mean ± sd | HD95 mm mean ± sd (finite) | empty predictions "
        "| training min/run mean ± sd | s/step |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for method, summary in summaries.items():
        dice, surface, hd95, minutes = (
            summary["dice"], summary["surface_dice"], summary["hd95_mm"], summary["training_minutes"]
        )  # fmt: skip
        training = "-" if math.isnan(minutes[0]) else f"{minutes[0]:.1f} ± {minutes[1]:.1f}"
        per_step = "-" if math.isnan(summary["seconds_per_step"]) else f"{summary['seconds_per_step']:.2f}"
        lines.append(
            f"| {method} | {dice[0]:.3f} ± {dice[1]:.3f} | {surface[0]:.3f} ± {surface[1]:.3f} "
            f"| {hd95[0]:.1f} ± {hd95[1]:.1f} | {summary['hd95_infinite']}/{summary['n']} | {training} | {per_step} |"
        )
    return "\n".join(lines)


def curve_summary(run: dict) -> str:
    """First and last epoch of every loss term, and where validation Dice peaked."""
    first, last = run["epochs"][0], run["epochs"][-1]
    terms = [key for key in first if key.startswith("loss_")]
    changes = ", ".join(f"{key[5:]} {first[key]:.3f}->{last[key]:.3f}" for key in terms)
    best = run.get("best_validation_dice")
    best_text = f"best val Dice {best:.3f} @ epoch {run['best_epoch']}" if best is not None else "no validation"
    return f"{run['method']} seed {run['seed']}: {changes}; {best_text}"


def engine_provenance() -> dict[str, Any]:
    """Which engine code this process runs: its folder, a hash of its sources and, in a git checkout, the commit.

    Recorded because the engine may change between runs; the hash is taken at start-up, after the imports.
    """
    package = Path(cmedl.__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    provenance: dict[str, Any] = {"package": str(package), "sources_sha256": digest.hexdigest()}

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package), *arguments], capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    provenance["git_commit"] = git("rev-parse", "HEAD")
    if provenance["git_commit"]:
        changed = git("status", "--porcelain", "--", ".")
        provenance["git_uncommitted_changes"] = changed.splitlines() if changed else []
    return provenance


# -- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    engine = engine_provenance()
    vgg_note = (
        "contextual loss on a RANDOMLY INITIALISED VGG16 (ImageNet weights unavailable; deviation from the paper)"
        if args.vgg_weights == "random"
        else f"contextual loss on VGG16 weights from {args.vgg_weights}"
    )
    log(f"preset {args.preset}; {vgg_note}")
    folders, descriptions = make_datasets(args)
    cases = held_out_cases(descriptions["test"], folders["test"])

    runs: list[dict] = []
    rows: list[dict] = []
    configs: dict[str, dict] = {}
    translations: list[dict] = []
    paired_mr: dict[str, sitk.Image] = {}
    for seed in range(args.seeds):
        for method in METHODS:
            config = train_config(args, method, seed, folders, args.out / "runs" / f"{method}_seed{seed}")
            configs.setdefault(method, {k: v for k, v in config.to_dict().items() if k not in ("out", "seed", "name")})
            run = train(config)
            runs.append(run)
            log(f"evaluating {method} seed {seed} on {len(cases)} test CTs")
            model = load_model(Path(config.out) / "model.safetensors")
            for row in evaluate(model, cases, args.eval_device, args.tolerance):
                rows.append({"method": method, "seed": seed, **row})
            if method == "cmedl":
                teacher = teacher_model(Path(config.out) / "translator.safetensors", args.eval_device)
                for row in evaluate(teacher, cases, args.eval_device, args.tolerance):
                    rows.append({"method": TEACHER_DIAGNOSTIC, "seed": seed, **row})
                translator_path = Path(config.out) / "translator.safetensors"
                for row in translation_rows(translator_path, cases, args.eval_device, paired_mr):
                    translations.append({"seed": seed, **row})

    summaries = {
        method: summarise([r for r in rows if r["method"] == method], [r for r in runs if r["method"] == method])
        for method in (*METHODS, TEACHER_DIAGNOSTIC)
    }
    tests = {metric: paired_test(rows, metric) for metric in ("dice", "surface_dice")}
    translation_summary = {
        source: {
            metric: mean_sd([r[metric] for r in translations if r["source"] == source and math.isfinite(r[metric])])
            for metric in ("kl_divergence", "psnr_db", "ssim")
        }
        for source in ("pseudo_mri", "ct_as_is")
    }
    steps = args.epochs * args.iterations
    total_minutes = (time.perf_counter() - started) / 60.0

    print()
    print(f"CMEDL vs CT only: {args.seeds} seeds x {len(cases)} held-out test CTs, {steps} student steps per run")
    print(f"({args.epochs} epochs x {args.iterations} iterations, batch {args.batch}, patch {args.patch}, "
          f"{args.spacing} mm, U-Net base {args.base_channels}); {vgg_note}.")  # fmt: skip
    print(f"Surface Dice tolerance {args.tolerance} mm; HD95 mean over finite values only (an empty prediction has "
          f"HD95 = inf and is counted under 'empty predictions'). Means ± sample SD over seeds x cases.")  # fmt: skip
    print("Same budget = the same number of student optimisation steps; a CMEDL step costs more compute (see the")
    print("training minutes and seconds per step, which include data preparation, validation and checkpoints).")
    print(f"The {TEACHER_DIAGNOSTIC} row is a diagnostic (teacher on pseudo-MRI of the test CTs), not a CT student.")
    print()
    print(format_table(summaries))
    print()
    for metric, test in tests.items():
        print(
            f"Wilcoxon signed-rank (two-sided), CMEDL vs CT only, {metric}: n = {test['pairs']} pairs, "
            f"W = {test['statistic']:.1f}, p = {test['p_value']:.4g}; CMEDL better in {test['cmedl_better']}, "
            f"CT only better in {test['ct_only_better']}, ties {test['ties']}; "
            f"median difference {test['median_difference']:+.4f}"
        )
    print()
    print("Translation (diagnostic): each test CT's pseudo-MRI, and the CT itself, against the MRI phantom of the")
    print("same anatomy, inside the body (HU > -500); KL(real || synthetic) of intensities, PSNR, mean slice SSIM:")
    for source, summary in translation_summary.items():
        print(f"  {source:<10} " + ", ".join(
            f"{metric} {mean:.4f} ± {sd:.4f}" for metric, (mean, sd) in summary.items()))  # fmt: skip
    print()
    for seed in range(args.seeds):
        means = {
            method: statistics.fmean(r["dice"] for r in rows if r["method"] == method and r["seed"] == seed)
            for method in (*METHODS, TEACHER_DIAGNOSTIC)
        }
        print(f"seed {seed}: mean Dice " + ", ".join(f"{method} {value:.3f}" for method, value in means.items()))
    print()
    for run in runs:
        print(curve_summary(run))
    print()
    print(f"total wall time {total_minutes:.1f} min; load average before {load_before}, after {list(os.getloadavg())}")

    results = {
        "benchmark": "cmedl_vs_ct_only",
        "same_budget": "same number of student optimisation steps (epochs x iterations_per_epoch, same batch size)",
        "contextual_loss_vgg": vgg_note,
        "surface_dice_tolerance_mm": args.tolerance,
        "hd95_note": "inf when a prediction is empty; such cases are excluded from the HD95 mean and counted",
        "settings": settings_of(args),
        "training_configs": configs,
        "datasets": {
            name: {key: d[key] for key in ("seed", "size", "n_ct", "n_mr")} | {"folder": str(folders[name])}
            for name, d in descriptions.items()
        },
        "summary": summaries,
        "wilcoxon": tests,
        "translation_summary": translation_summary,
        "translations": translations,
        "runs": runs,
        "cases": rows,
        "total_wall_minutes": round(total_minutes, 2),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "environment": {
            "engine_version": __version__,
            "engine": engine,
            "torch": torch.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str, allow_nan=True) + "\n")
    log(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
