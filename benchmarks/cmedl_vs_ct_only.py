"""Does cross-modality educed distillation help, and if not, why? A controlled comparison on phantoms.

Arms (every one through the same trainer, the same student network, data, patch size, spacing, batch size,
number of student steps and learning-rate schedule; only the losses differ):

- ``ct_only``: the student alone, Dice loss on labelled CT patches;
- ``cmedl``: CMEDL as the engine trains it by default (CycleGAN with the contextual loss, MRI teacher on the
  pseudo-MRI and on the unpaired real MRI, hint loss from the teacher's last two feature layers to the student's);
- ``oracle``: CMEDL with a perfect translator: the teacher sees the real MRI phantom of each training CT's own
  anatomy instead of a pseudo-MRI (``teacher_input = paired_mr``; phantoms only). It is the upper bound of what
  the hint mechanism can pass on;
- controls: ``cmedl_hint0`` / ``oracle_hint0`` (lambda_hint = 0: the student gets no hint and must match CT only
  within noise), ``cmedl_hint_to_teacher`` / ``oracle_hint_to_teacher`` (the paper's update rule, in which the
  hint loss also trains the teacher), ``oracle_seg5`` (Dice terms weighted 5 in the segmentor update, the paper's
  total-loss reading).

Data (``cmedl.phantom``, written once per output folder): for each CT tumour contrast level (HU offset of the
tumour from the mediastinal soft tissue) a training set of ``--ct`` labelled CTs with the paired MRI of each
anatomy (used by the oracle arms only) and ``--mr`` unpaired labelled MRIs, a validation set and a held-out test
set. Every CT holds two tumours in two of three strata (juxta-mediastinal, chest wall, parenchymal), so the test
set is balanced over strata. The anatomies are the same at every contrast level (same dataset seeds); only the CT
tumour's intensity differs. Test anatomies never appear in training or validation.

Scoring: each run's exported student (best validation epoch) segments every test CT through the real inference
pipeline (:class:`cmedl.segment.Segmenter`). Per case: 3D Dice, surface Dice and HD95 on the CT's grid. Per tumour
(from the phantom's instance map): Dice of the prediction inside the tumour's neighbourhood (the tumour dilated
by ``--tumour-margin`` mm, so that a neighbouring tumour's prediction does not count against it) and whether it
was detected (any overlap). Statistics: scores are averaged over training seeds per anatomy (per tumour), then each
arm is compared with CT only by :func:`cmedl.comparison.paired_comparison` (two-sided paired Wilcoxon p and a
bootstrap 95% CI of the mean difference), overall, per contrast level and per stratum.

Budget: runs are listed in a fixed order (the main arms seed by seed, then the control arms) and any number of
worker processes started on the same ``--out`` share them, each claiming the next run nobody holds; a finished
run (and its evaluation) is reused by every later invocation, so the experiment grows over several invocations
and a worker that died is taken over. ``--report-only`` writes ``results.json`` from what is finished.

Usage::

    python benchmarks/cmedl_vs_ct_only.py --out OUT --prepare-only
    python benchmarks/cmedl_vs_ct_only.py --out OUT &    # two workers, one torch thread each
    python benchmarks/cmedl_vs_ct_only.py --out OUT
    python benchmarks/cmedl_vs_ct_only.py --out OUT --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

import cmedl
from cmedl import __version__
from cmedl.comparison import paired_comparison
from cmedl.evaluate import score_case, score_translation
from cmedl.modelfile import LoadedModel, load_model
from cmedl.phantom import LOCATIONS, write_phantom_dataset
from cmedl.progress import CallbackProgress
from cmedl.segment import Segmenter, SegmentOptions
from cmedl.training.config import TrainConfig
from cmedl.training.runfolder import RunFolder
from cmedl.training.trainer import Trainer
from cmedl.translate import load_translator, translate_volume
from cmedl.volumes import read_volume, same_geometry

TIMING_FILE = "benchmark_run.json"
EVALUATION_FILE = "benchmark_evaluation.json"

# What each arm changes in the training configuration; everything else is shared.
ARMS: dict[str, dict[str, Any]] = {
    "ct_only": {"method": "ct_only"},
    "cmedl": {"method": "cmedl"},
    "oracle": {"method": "cmedl", "teacher_input": "paired_mr"},
    "cmedl_hint0": {"method": "cmedl", "lambda_hint": 0.0},
    "oracle_hint0": {"method": "cmedl", "teacher_input": "paired_mr", "lambda_hint": 0.0},
    "cmedl_hint_to_teacher": {"method": "cmedl", "hint_to_teacher": True},
    "oracle_hint_to_teacher": {"method": "cmedl", "teacher_input": "paired_mr", "hint_to_teacher": True},
    "oracle_seg5": {"method": "cmedl", "teacher_input": "paired_mr", "segmentor_seg_weight": 5.0},
}

# "cpu": the core comparison (ct_only, cmedl, oracle; 3 seeds; two contrast levels) in about two hours on a
# 2-core machine as two single-thread processes; the controls at one contrast level in another such session.
# Labelled CT is kept scarce (8 cases), where distillation is expected to matter most; MRI is more plentiful.
# Its segmentor learning rate is 5e-4 (the paper's 2e-4 in the GPU preset), the same in every arm: at 2e-4 the
# CT-only student's validation Dice was still climbing steeply after 1,200 steps (0.10 at the last epoch), while
# at 5e-4 it levelled off within 2,000 steps (0.18-0.23 over the last 8 epochs at -8 HU), which the comparison
# needs: a baseline that has stopped improving within the budget.
# "gpu": larger phantoms, networks and budgets for a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "size": 128, "ct": 8, "mr": 16, "val": 6, "test": 24, "patch": 64, "spacing": 3.0, "epochs": 16,
        "iterations": 125, "batch": 2, "base_channels": 8, "translator_channels": 8, "translator_blocks": 2,
        "cx_positions": 256, "device": "cpu", "threads": 1, "contrasts": "-25,-8",
        "arms": "ct_only,oracle,cmedl", "seeds": 3,
        "control_arms": "oracle_hint0,oracle_hint_to_teacher,oracle_seg5,cmedl_hint_to_teacher,cmedl_hint0",
        "control_contrast": -8.0, "lr_segmentor": 5e-4,
    },
    "gpu": {
        "size": 256, "ct": 8, "mr": 24, "val": 8, "test": 30, "patch": 128, "spacing": 2.0, "epochs": 40,
        "iterations": 100, "batch": 8, "base_channels": 16, "translator_channels": 32, "translator_blocks": 6,
        "cx_positions": 1024, "device": "auto", "threads": None, "contrasts": "-25,-15,-8",
        "arms": "ct_only,oracle,cmedl", "seeds": 3,
        "control_arms": "oracle_hint0,cmedl_hint0,oracle_hint_to_teacher,cmedl_hint_to_teacher,oracle_seg5",
        "control_contrast": -8.0, "lr_segmentor": 2e-4,
    },
}  # fmt: skip


# -- configuration ----------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Controlled comparison of CMEDL arms against CT only on phantoms.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (data, runs, results.json)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--arms", help=f"comma-separated arms among {', '.join(ARMS)}")
    parser.add_argument("--contrasts", help="CT tumour contrast levels in HU, comma-separated (e.g. -25,-8)")
    parser.add_argument("--control-arms", help="arms trained after the others, at --control-contrast only")
    parser.add_argument("--control-contrast", type=float, help="the contrast level of the control arms")
    parser.add_argument("--seeds", type=int, help="training seeds 0..N-1 per arm and contrast")
    parser.add_argument("--data-seed", type=int, default=7, help="dataset seed; validation and test use +1 and +2")
    for name in ("ct", "mr", "val", "test", "size", "patch", "epochs", "iterations", "batch", "base-channels",
                 "translator-channels", "translator-blocks", "cx-positions", "threads"):  # fmt: skip
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--spacing", type=float, help="in-plane spacing the networks work at, mm")
    parser.add_argument("--lr-segmentor", type=float, help="learning rate of student and teacher, every arm")
    parser.add_argument("--vgg-weights", default="random", help="'random' or a path to ImageNet VGG16 weights")
    parser.add_argument("--device", help="training device: auto, cpu or cuda")
    parser.add_argument("--eval-device", default="cpu")
    parser.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance, mm")
    parser.add_argument("--tumour-margin", type=float, default=10.0, help="per-tumour neighbourhood, mm")
    parser.add_argument("--prepare-only", action="store_true", help="write the phantom sets and stop")
    parser.add_argument("--report-only", action="store_true", help="no training: report the finished runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training value, all arms")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.arms = [arm.strip() for arm in str(args.arms).split(",") if arm.strip()]
    args.control_arms = [arm.strip() for arm in str(args.control_arms or "").split(",") if arm.strip()]
    unknown = [arm for arm in args.arms + args.control_arms if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s): {', '.join(unknown)}")
    args.contrasts = [float(value) for value in str(args.contrasts).split(",") if value.strip()]
    if args.control_arms and args.control_contrast not in args.contrasts:
        parser.error("--control-contrast must be one of --contrasts (the control arms need its ct_only runs)")
    return args


def contrast_tag(contrast: float) -> str:
    return f"c{contrast:+g}".replace("+", "p").replace("-", "m")


def planned_runs(args: argparse.Namespace) -> list[tuple[int, float, str]]:
    """(seed, contrast, arm) in the order they are trained: the main arms seed by seed, so that a partial
    experiment is balanced, then each control arm with all its seeds, so that a partial one has complete arms."""
    main = [(seed, contrast, arm) for seed in range(args.seeds) for contrast in args.contrasts for arm in args.arms]
    controls = [(seed, args.control_contrast, arm) for arm in args.control_arms for seed in range(args.seeds)]
    return main + controls


def claim(run: Path) -> bool:
    """Take ``run`` for this process unless another live process holds it (workers share one plan this way)."""
    marker = run.parent / f"{run.name}.claim"
    marker.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(marker.read_text() or "0")
                os.kill(holder, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                marker.unlink(missing_ok=True)  # its holder died: take it over
                continue
            except PermissionError:
                return False
            return holder == os.getpid()
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def train_config(args: argparse.Namespace, arm: str, seed: int, data: Path, out: Path) -> TrainConfig:
    values: dict[str, Any] = {
        "ct": str(data / "train" / "ct"),
        "validation": str(data / "val" / "ct"),
        "validation_max_cases": args.val,
        "validation_slices_per_case": 0,  # every slice, as when the committed results were trained: reproducible
        "out": str(out),
        "segmentor": "unet",
        "segmentor_options": {"base_channels": args.base_channels},
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "batch_size": args.batch,
        "lr_segmentor": args.lr_segmentor,
        "patch_size": args.patch,
        "spacing_mm": (args.spacing, args.spacing),
        "early_stopping_patience": args.epochs,  # every arm takes all its student steps
        "seed": seed,
        "device": args.device,
        "name": f"benchmark-{arm}-seed{seed}",
        **ARMS[arm],
    }
    if values["method"] == "cmedl":
        values.update(
            {
                "mr": str(data / "train" / "mr"),
                "translator_options": {"base_channels": args.translator_channels, "n_blocks": args.translator_blocks},
                "vgg_weights": args.vgg_weights,
                "cx_max_positions": args.cx_positions,
            }
        )
        if values.get("teacher_input") == "paired_mr":
            values["paired_mr"] = str(data / "train" / "ct" / "paired_mr")
    return TrainConfig.from_dict(values).with_overrides(args.set).validate()


# -- data --------------------------------------------------------------------------------------------------


def make_datasets(args: argparse.Namespace, contrast: float) -> tuple[Path, dict[str, dict]]:
    """Write (or reuse) the training, validation and test sets of one contrast level."""
    root = args.out / "data" / contrast_tag(contrast)
    wanted = {
        "train": (args.ct, args.mr, args.data_seed),
        "val": (args.val, 0, args.data_seed + 1),
        "test": (args.test, 0, args.data_seed + 2),
    }
    descriptions = {}
    for name, (n_ct, n_mr, seed) in wanted.items():
        folder = root / name
        index = folder / "phantoms.json"
        description = json.loads(index.read_text()) if index.exists() else None
        key = (n_ct, n_mr, seed, args.size, contrast)
        if description is None or key != (
            description["n_ct"], description["n_mr"], description["seed"], description["size"],
            description.get("ct_tumour_contrast"),
        ):  # fmt: skip
            if folder.exists() and any(folder.iterdir()):
                sys.exit(f"{folder} holds a different phantom set; remove it or choose another --out")
            log(f"writing {name} phantoms at contrast {contrast:+g} HU: {n_ct} CT, {n_mr} MRI, seed {seed}")
            description = write_phantom_dataset(
                folder, n_ct=n_ct, n_mr=n_mr, seed=seed, size=args.size, ct_tumour_contrast=contrast,
                stratified=True, paired_mr=True,
            )  # fmt: skip
        descriptions[name] = description
    anatomy = {name: {case["seed"] for case in d["cases"]} for name, d in descriptions.items()}
    if anatomy["test"] & (anatomy["train"] | anatomy["val"]):
        sys.exit("a test phantom shares its anatomy with a training or validation phantom; change --data-seed")
    return root, descriptions


def test_cases(description: dict, folder: Path) -> list[dict]:
    return [
        {**case, "image": folder / case["image"], "label": folder / case["label"],
         "instances": folder / case["instances"], "paired_mr": folder / case["paired_mr"]}
        for case in description["cases"]
        if case["modality"] == "ct"
    ]  # fmt: skip


# -- training ----------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def comparable(config: dict[str, Any]) -> str:
    # A config.json written before validation sampling existed scored every slice.
    config = {"validation_slices_per_case": 0, **config}
    return json.dumps(TrainConfig.from_dict(config).to_dict(), sort_keys=True, default=str)


def train(config: TrainConfig, arm: str) -> dict[str, Any] | None:
    """Train one run, or reuse it when finished with exactly this configuration; None when it cannot be reused."""
    run = RunFolder(config.out)
    record_path = run.path / TIMING_FILE
    if record_path.exists() and run.read_status().get("state") == "finished":
        if comparable(run.read_json("config.json")) != comparable(config.to_dict()):
            sys.exit(f"{run.path} was trained with another configuration; remove it or choose another --out")
        return json.loads(record_path.read_text())
    if run.path.exists():
        log(f"{run.path} holds an unfinished run: resuming it")

    def forward(event: dict) -> None:
        if event["event"] == "log":
            log(f"  {arm} seed {config.seed}: {event['message']}")

    log(f"training {arm} seed {config.seed} -> {run.path} ({config.epochs} x {config.iterations_per_epoch} steps)")
    started = time.perf_counter()
    if run.path.exists() and (run.path / "checkpoint.pt").exists():
        status = Trainer.resume_run(run.path, progress=CallbackProgress(forward)).fit()
    else:
        if run.path.exists():
            import shutil

            shutil.rmtree(run.path)  # never started training: nothing to keep
        status = Trainer(config, progress=CallbackProgress(forward)).fit()
    wall_seconds = time.perf_counter() - started
    if status["state"] != "finished":
        sys.exit(f"run {run.path} ended {status['state']}: {status.get('message')}")
    steps = config.epochs * config.iterations_per_epoch
    record = {
        "arm": arm,
        "seed": config.seed,
        "run": str(run.path),
        "student_steps": steps,
        "wall_seconds": round(wall_seconds, 1),
        "seconds_per_step": round(wall_seconds / steps, 3),
        "best_epoch": status.get("best_epoch"),
        "best_validation_dice": status.get("best_validation_dice"),
        "load_average_after": list(os.getloadavg()),
        "epochs": run.read_metrics(),
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
    card = dataclasses.replace(translator.card, kind="segmentor")
    network = TeacherOnPseudoMRI(translator.model.generator, translator.model.teacher).eval()
    return LoadedModel(network=network, card=card, path=translator_path, sha256=translator.sha256)


def tumour_scores(prediction: np.ndarray, instances: np.ndarray, spacing_zyx: tuple, margin_mm: float) -> list[dict]:
    """Per tumour: Dice of the prediction inside the tumour's neighbourhood, and whether any of it was found."""
    rows = []
    for tumour_id in (int(value) for value in np.unique(instances) if value):
        tumour = instances == tumour_id
        outside = ndimage.distance_transform_edt(~tumour, sampling=spacing_zyx)
        neighbourhood = (outside <= margin_mm) & ((instances == 0) | tumour)
        hit = int(np.count_nonzero(prediction & tumour))
        predicted = int(np.count_nonzero(prediction & neighbourhood))
        size = int(np.count_nonzero(tumour))
        rows.append({"tumour_id": tumour_id, "dice": 2 * hit / (predicted + size), "detected": hit > 0})
    return rows


def evaluate_model(model: LoadedModel, cases: list[dict], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per case and per tumour scores of one model on the test CTs."""
    segmenter = Segmenter(model, SegmentOptions(device=args.eval_device))
    rows = []
    for case in cases:
        ct, truth, instances = (read_volume(case[key]) for key in ("image", "label", "instances"))
        if not (same_geometry(ct, truth) and same_geometry(ct, instances)):
            raise RuntimeError(f"{case['name']}: label or instance map not on the CT's grid")
        result = segmenter.segment(ct, name=case["name"])
        score = score_case(result.label, truth, args.tolerance, label=1, case=case["name"])
        prediction = sitk.GetArrayFromImage(result.label) > 0
        spacing_zyx = tuple(reversed(ct.GetSpacing()))
        by_id = {tumour["id"]: tumour for tumour in case["tumours"]}
        tumours = [
            {**row, "stratum": by_id[row["tumour_id"]]["location"], "volume_ml": by_id[row["tumour_id"]]["volume_ml"],
             "ct_cnr": by_id[row["tumour_id"]].get("ct_cnr")}
            for row in tumour_scores(prediction, sitk.GetArrayFromImage(instances), spacing_zyx, args.tumour_margin)
        ]  # fmt: skip
        rows.append(
            {"case": case["name"], "dice": score.dice, "surface_dice": score.surface_dice, "hd95_mm": score.hd95_mm,
             "predicted_ml": score.predicted_ml, "truth_ml": score.reference_ml, "tumours": tumours}
        )  # fmt: skip
    return rows


def translation_scores(translator_path: Path, cases: list[dict], device: str) -> list[dict[str, Any]]:
    """Each test CT's pseudo-MRI against the real MRI of the same anatomy, inside the body (HU > -500)."""
    translator = load_translator(translator_path, device)
    rows = []
    for case in cases:
        ct, mr = read_volume(case["image"]), read_volume(case["paired_mr"])
        body = sitk.Cast(ct > -500, sitk.sitkUInt8)
        pseudo = translate_volume(ct, translator, torch.device(device))
        score = score_translation(pseudo, mr, body, case=case["name"])
        rows.append({"case": case["name"], "kl_divergence": score.kl_divergence, "psnr_db": score.psnr_db,
                     "ssim": score.ssim})  # fmt: skip
    return rows


def evaluate_run(config: TrainConfig, arm: str, cases: list[dict], test_key: str, args) -> dict[str, Any]:
    """Scores of one finished run (cached in the run folder, keyed by the test set and the scoring settings)."""
    path = Path(config.out) / EVALUATION_FILE
    key = {"test": test_key, "tolerance": args.tolerance, "tumour_margin": args.tumour_margin}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    log(f"evaluating {arm} seed {config.seed} on {len(cases)} test CTs")
    evaluation: dict[str, Any] = {
        "key": key,
        "student": evaluate_model(load_model(Path(config.out) / "model.safetensors"), cases, args),
    }
    translator_path = Path(config.out) / "translator.safetensors"
    if translator_path.exists():
        evaluation["teacher_on_pseudo_mri"] = evaluate_model(
            teacher_model(translator_path, args.eval_device), cases, args
        )
        evaluation["translation"] = translation_scores(translator_path, cases, args.eval_device)
    path.write_text(json.dumps(evaluation, indent=1, default=str) + "\n")
    return evaluation


# -- statistics --------------------------------------------------------------------------------------------


def seed_means(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, float]:
    """Mean of ``value`` over training seeds for each combination of ``keys`` (e.g. arm, contrast, case)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(float(row[value]))
    return {group: float(np.mean(values)) for group, values in groups.items()}


def compare_arms(
    rows: list[dict], unit: tuple[str, ...], value: str, arms: list[str], where=None, reference: str = "ct_only"
) -> dict[str, Any]:
    """Each arm against ``reference``, paired over units (seed-averaged), among the rows ``where`` accepts.

    Only the training seeds both arms finished are averaged, so that an arm with fewer finished seeds is compared
    with ct_only on the same seeds; the seeds used are recorded with each result.
    """
    selected = [row for row in rows if where is None or where(row)]
    out = {}
    for arm in arms:
        if arm == reference:
            continue
        seeds = sorted({r["seed"] for r in selected if r["arm"] == arm} & {r["seed"] for r in selected
                                                                           if r["arm"] == reference})  # fmt: skip
        means = seed_means([r for r in selected if r["seed"] in seeds], ("arm", *unit), value)
        units = sorted(key[1:] for key in means if key[0] == arm and (reference, *key[1:]) in means)
        if not units:
            continue
        out[arm] = paired_comparison(
            [means[(arm, *u)] for u in units], [means[(reference, *u)] for u in units], n_bootstrap=10000, seed=0
        )
        out[arm]["seeds"] = seeds
    return out


def training_curves(records: list[dict]) -> dict[str, Any]:
    """Mean validation Dice per epoch over seeds, per arm and contrast."""
    curves: dict[str, dict[int, list[float]]] = {}
    for record in records:
        name = f"{record['arm']} {record['contrast']:+g}"
        for epoch in record["epochs"]:
            if epoch.get("validation_dice") is not None:
                curves.setdefault(name, {}).setdefault(epoch["epoch"], []).append(epoch["validation_dice"])
    return {name: {epoch: float(np.mean(v)) for epoch, v in sorted(by.items())} for name, by in curves.items()}


def engine_provenance() -> dict[str, Any]:
    package = Path(cmedl.__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return {"package": str(package), "sources_sha256": digest.hexdigest()}


def fmt(result: dict[str, Any]) -> str:
    return (
        f"{result['mean_a']:.3f} vs {result['mean_b']:.3f}, diff {result['mean_difference']:+.3f} "
        f"[{result['ci_low']:+.3f}, {result['ci_high']:+.3f}], p = {result['wilcoxon_p']:.3g} "
        f"(n {result['n']}; better {result['a_better']} / worse {result['b_better']} / ties {result['ties']}; "
        f"seeds {','.join(str(seed) for seed in result['seeds'])})"
    )


def report(args: argparse.Namespace, records: list[dict], case_rows: list[dict], tumour_rows: list[dict],
           teacher_rows: list[dict], translation_rows: list[dict]) -> dict[str, Any]:  # fmt: skip
    arms = [arm for arm in ARMS if any(row["arm"] == arm for row in case_rows)]
    contrasts = sorted({row["contrast"] for row in case_rows})
    comparisons: dict[str, Any] = {
        "case_dice": compare_arms(case_rows, ("contrast", "case"), "dice", arms),
        "tumour_dice": compare_arms(tumour_rows, ("contrast", "case", "tumour_id"), "dice", arms),
        "tumour_detected": compare_arms(tumour_rows, ("contrast", "case", "tumour_id"), "detected", arms),
    }
    for contrast in contrasts:
        comparisons[f"case_dice {contrast:+g}"] = compare_arms(
            case_rows, ("case",), "dice", arms, lambda r, c=contrast: r["contrast"] == c
        )
        comparisons[f"tumour_dice {contrast:+g}"] = compare_arms(
            tumour_rows, ("case", "tumour_id"), "dice", arms, lambda r, c=contrast: r["contrast"] == c
        )
        comparisons[f"tumour_detected {contrast:+g}"] = compare_arms(
            tumour_rows, ("case", "tumour_id"), "detected", arms, lambda r, c=contrast: r["contrast"] == c
        )
        for stratum in LOCATIONS:
            comparisons[f"tumour_dice {contrast:+g} {stratum}"] = compare_arms(
                tumour_rows, ("case", "tumour_id"), "dice", arms,
                lambda r, c=contrast, s=stratum: r["contrast"] == c and r["stratum"] == s,
            )  # fmt: skip
    # The hint's own effect: each arm against its lambda_hint = 0 twin, which shares its seeds, initial weights and
    # every patch drawn (only the hint term differs), so training noise largely cancels out of the difference.
    twins = {"oracle": "oracle_hint0", "oracle_seg5": "oracle_hint0", "oracle_hint_to_teacher": "oracle_hint0",
             "cmedl": "cmedl_hint0", "cmedl_hint_to_teacher": "cmedl_hint0"}  # fmt: skip
    for arm, twin in twins.items():
        if arm not in arms or twin not in arms:
            continue
        for contrast in contrasts:

            def at(r, c=contrast):
                return r["contrast"] == c

            for name, rows_, unit, value in (
                ("case_dice", case_rows, ("case",), "dice"),
                ("tumour_dice", tumour_rows, ("case", "tumour_id"), "dice"),
                ("tumour_detected", tumour_rows, ("case", "tumour_id"), "detected"),
            ):
                found = compare_arms(rows_, unit, value, [arm], at, reference=twin)
                if found:
                    comparisons.setdefault(f"{name} {contrast:+g} vs {twin}", {}).update(found)
            for stratum in LOCATIONS:
                found = compare_arms(
                    tumour_rows, ("case", "tumour_id"), "dice", [arm],
                    lambda r, c=contrast, s=stratum: r["contrast"] == c and r["stratum"] == s, reference=twin,
                )  # fmt: skip
                if found:
                    comparisons.setdefault(f"tumour_dice {contrast:+g} {stratum} vs {twin}", {}).update(found)
    print()
    print("Each arm against ct_only (or the twin named): mean (seed-averaged) score, arm vs reference, mean difference")
    print("[bootstrap 95% CI],")
    print("two-sided paired Wilcoxon p, over test anatomies (case) or test tumours (tumour).")
    for name, by_arm in comparisons.items():
        for arm, result in by_arm.items():
            print(f"  {name:<34} {arm:<24} {fmt(result)}")
    summary = {}
    for arm in arms:
        for contrast in contrasts:
            selected = [r for r in case_rows if r["arm"] == arm and r["contrast"] == contrast]
            tumours = [r for r in tumour_rows if r["arm"] == arm and r["contrast"] == contrast]
            runs = [r for r in records if r["arm"] == arm and r["contrast"] == contrast]
            if not selected:
                continue
            summary[f"{arm} {contrast:+g}"] = {
                "runs": len(runs),
                "case_dice": float(np.mean([r["dice"] for r in selected])),
                "surface_dice": float(np.mean([r["surface_dice"] for r in selected])),
                "predicted_over_true_volume": float(np.median([r["predicted_ml"] / r["truth_ml"] for r in selected])),
                "tumour_dice": {
                    s: float(np.mean([r["dice"] for r in tumours if r["stratum"] == s])) for s in LOCATIONS
                },
                "detected": {
                    s: float(np.mean([r["detected"] for r in tumours if r["stratum"] == s])) for s in LOCATIONS
                },
                "best_validation_dice": [r["best_validation_dice"] for r in runs],
                "training_minutes": float(np.mean([r["wall_seconds"] for r in runs]) / 60),
            }
    print()
    print(
        "| arm | contrast HU | runs | case Dice | surface Dice | predicted / true mL (median) "
        "| tumour Dice: mediastinum / chest wall / parenchyma | detected: med / wall / par "
        "| best val Dice per seed | training min/run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        arm, contrast = name.rsplit(" ", 1)
        print(f"| {arm} | {contrast} | {s['runs']} | {s['case_dice']:.3f} | {s['surface_dice']:.3f} | "
              f"{s['predicted_over_true_volume']:.2f} | "
              + " / ".join(f"{s['tumour_dice'][k]:.3f}" for k in LOCATIONS) + " | "
              + " / ".join(f"{s['detected'][k]:.2f}" for k in LOCATIONS) + " | "
              + ", ".join(f"{v:.3f}" for v in s["best_validation_dice"])
              + f" | {s['training_minutes']:.1f} |")  # fmt: skip
    final_losses: dict[str, dict[str, float]] = {}
    for arm in arms:
        for contrast in contrasts:
            last = [r["epochs"][-1] for r in records if r["arm"] == arm and r["contrast"] == contrast]
            terms = sorted({key for epoch in last for key in epoch if key.startswith("loss_")})
            if last:
                final_losses[f"{arm} {contrast:+g}"] = {
                    term[5:]: float(np.mean([epoch[term] for epoch in last if term in epoch])) for term in terms
                }
    print()
    print("Loss terms of the last epoch (mean over seeds):")
    for name, terms in final_losses.items():
        print(f"  {name:<28} " + ", ".join(f"{term} {value:.3f}" for term, value in terms.items()))
    curves = training_curves(records)
    print()
    print("Validation Dice (mean over seeds) by epoch:")
    for name, curve in curves.items():
        shown = [f"{epoch}:{value:.3f}" for epoch, value in curve.items() if epoch % 2 == 0 or epoch == 1]
        print(f"  {name:<28} " + " ".join(shown))
    teacher = {}
    for arm in arms:
        for contrast in contrasts:
            rows = [r for r in teacher_rows if r["arm"] == arm and r["contrast"] == contrast]
            trans = [r for r in translation_rows if r["arm"] == arm and r["contrast"] == contrast]
            if rows:
                teacher[f"{arm} {contrast:+g}"] = {
                    "teacher_dice_on_pseudo_mri": float(np.mean([r["dice"] for r in rows])),
                    "pseudo_mri_ssim": float(np.mean([r["ssim"] for r in trans])),
                    "pseudo_mri_psnr_db": float(np.mean([r["psnr_db"] for r in trans])),
                    "pseudo_mri_kl": float(np.mean([r["kl_divergence"] for r in trans])),
                }
    if teacher:
        print()
        print("Translator and teacher (diagnostic): teacher Dice on pseudo-MRI of the test CTs; pseudo-MRI vs real MRI")
        for name, values in teacher.items():
            print(f"  {name:<28} " + ", ".join(f"{key} {value:.3f}" for key, value in values.items()))
    return {"comparisons": comparisons, "summary": summary, "validation_curves": curves, "translator_teacher": teacher,
            "final_losses": final_losses}  # fmt: skip


# -- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = {contrast: make_datasets(args, contrast) for contrast in args.contrasts}
    if args.prepare_only:
        log("phantom sets ready")
        return 0
    plan = planned_runs(args)
    records, case_rows, tumour_rows, teacher_rows, translation_rows, configs = [], [], [], [], [], {}
    for seed, contrast, arm in plan:
        root, descriptions = data[contrast]
        config = train_config(args, arm, seed, root, args.out / "runs" / contrast_tag(contrast) / f"{arm}_seed{seed}")
        configs.setdefault(arm, {k: v for k, v in config.to_dict().items() if k not in ("out", "seed", "name")})
        evaluated = (Path(config.out) / EVALUATION_FILE).exists()
        if args.report_only:
            if not evaluated:
                continue
        elif not evaluated and not claim(Path(config.out)):
            continue  # another worker trains and evaluates it
        record = train(config, arm)
        cases = test_cases(descriptions["test"], root / "test")
        test_key = hashlib.sha256(json.dumps(descriptions["test"], sort_keys=True).encode()).hexdigest()[:16]
        evaluation = evaluate_run(config, arm, cases, test_key, args)
        records.append({**record, "contrast": contrast})
        base = {"arm": arm, "seed": seed, "contrast": contrast}
        for row in evaluation["student"]:
            case_rows.append({**base, **{k: v for k, v in row.items() if k != "tumours"}})
            tumour_rows.extend({**base, "case": row["case"], **tumour} for tumour in row["tumours"])
        for row in evaluation.get("teacher_on_pseudo_mri", []):
            teacher_rows.append({**base, **{k: v for k, v in row.items() if k != "tumours"}})
        translation_rows.extend({**base, **row} for row in evaluation.get("translation", []))
    log(f"{len(records)} of {len(plan)} planned runs finished and evaluated")
    if not records:
        return 0
    analysis = report(args, records, case_rows, tumour_rows, teacher_rows, translation_rows)
    results = {
        "benchmark": "cmedl_vs_ct_only (controlled)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "arms": {arm: ARMS[arm] for arm in args.arms},
        "training_configs": configs,
        "datasets": {
            f"{contrast:+g}": {name: {k: d.get(k) for k in ("seed", "size", "n_ct", "n_mr", "ct_tumour_contrast")}
                               for name, d in descriptions.items()}
            for contrast, (_, descriptions) in data.items()
        },
        "test_tumours": [
            {"contrast": f"{contrast:+g}", "case": case["name"], **tumour}
            for contrast, (_, descriptions) in data.items()
            for case in descriptions["test"]["cases"]
            for tumour in case["tumours"]
        ],
        **analysis,
        "runs": [{k: v for k, v in r.items()} for r in records],
        "cases": case_rows,
        "tumours": tumour_rows,
        "teacher_on_pseudo_mri": teacher_rows,
        "translation": translation_rows,
        "wall_minutes_this_invocation": round((time.perf_counter() - started) / 60, 2),
        "environment": {
            "engine_version": __version__, "engine": engine_provenance(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        },
    }  # fmt: skip
    name = "results.json" if args.report_only else f"results_worker{os.getpid()}.json"
    (args.out / name).write_text(json.dumps(results, indent=1, default=str, allow_nan=True) + "\n")
    log(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
