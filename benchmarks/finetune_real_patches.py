"""Fine-tune the built-in model on real CT tumour patches and measure what changes, against a from-scratch control.

What it measures
----------------
The only real CT tumour labels here are the Medical Segmentation Decathlon Task06 (lung) patches of
``../shared/data/ct_tumor`` (48x48 pixels at 2 mm, intensities scaled to [0, 1]; CC-BY-SA-4.0). This script

1. checks that their intensities are integer HU under a linear window of [-1000, 100] HU (HU = 1100 x - 1000:
   a quantisation step of exactly 1/1100, and histogram peaks where lung, fat and soft tissue belong) and refuses
   to go on when the evidence does not hold;
2. converts them into CT dataset folders the engine trains on (``images/`` and ``labels/``, one NIfTI volume per
   patient whose slices are that patient's patches, int16 HU, 2 mm spacing). The patient-level split is the
   source's own: ``val_patches.h5`` and ``test_patches.h5`` hold patches of two disjoint sets of 13 patients
   (shizoda/data, msd/lung_2mm/README.md); inside a file the patches come in blocks of 10 per patient (checked
   here from image similarity). Training: 10 patients of the val file; validation (best epoch): its other 3;
   test: all 13 patients of the test file. Exact duplicate patches are dropped;
3. fine-tunes the built-in model (``cmedl train --method ct_only --init <built-in>``, the engine's fine-tuning
   defaults: a tenth of the learning rate, 2e-5) and trains the same architecture from random weights with the same
   steps, data and seed (the control, at the from-scratch rate 2e-4), for each seed. The training patch is 64 px,
   the smallest multiple of 32 (the engine refuses 48) that holds a 48 px patch; the sampler pads with air. Optional
   arm ``finetuned_lr2e-4`` fine-tunes at the from-scratch rate;
4. scores the built-in model, the fine-tuned and the from-scratch models, and the built-in model tiled at the
   training patch size (a diagnostic: a model fine-tuned at 64 px is also applied in 64 px tiles; no phantoms),
   (a) on the held-out real test patches, run through the engine's inference pieces (``load_model``,
       ``normalise_hu`` with the model card's HU window, ``predict_slices`` with the card's patch size, padding
       with air as ``cmedl segment`` does): Dice per patch, per-patient mean Dice, detection rate (tumour patches
       whose prediction overlaps the tumour), false-positive pixels on tumour-free patches;
   (b) on the real CTs of ``../shared/data`` (none has a tumour label): predicted tumour volume with
       ``segment_to_files`` (what ``cmedl segment`` runs), which on the CTs without a known tumour is false-positive
       volume; on ``elastix_3DCT_lung``, which shows an unlabelled mass, the volume within 30 mm of the mass centre
       (placed by eye) and elsewhere; and the lung volume of ``cmedl lungs --json`` and of each segmentation run (a
       sanity check that the pipeline ran: the model must not change it);
   (c) on 6 fresh phantoms (``cmedl phantom --seed 99 --size 256``; the built-in model used seed 7): Dice from
       ``cmedl evaluate PRED REF --json``;
5. prints a table (and writes it as ``.txt`` beside the JSON) and applies the issue's rule: the built-in model
   should only be replaced when the fine-tuned one is better on real CTs without losing on phantoms. This script
   never replaces anything.

Running it (12 minutes of CPU time on one core; 28 minutes of wall time beside other jobs on two cores)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_real_patches.py --work WORK_DIR \
        --out benchmarks/results/finetune_real_patches.json

Training runs, phantoms and per-model scores are kept in ``--work`` and reused by a later invocation with the same
settings, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import uniform_filter1d
from scipy.signal import find_peaks

from cmedl.comparison import paired_comparison
from cmedl.filebase import file_sha256
from cmedl.modelfile import LoadedModel, load_model
from cmedl.patches import predict_slices
from cmedl.segment import Segmenter, SegmentOptions, segment_to_files
from cmedl.training.inventory import scan_training_data
from cmedl.volumes import normalise_hu

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BUILTIN = ROOT / "Resources" / "Models" / "cmedl-demo-unet.safetensors"

# The window the evidence points to: x = (HU + 1000) / 1100, HU clipped to [-1000, 100].
WINDOW_LOW_HU, WINDOW_WIDTH_HU = -1000, 1100
# Where the tissue peaks of the patches' histogram must lie (HU) for the window to be accepted.
EXPECTED_PEAKS_HU = {"lung parenchyma": (-920, -820), "fat": (-130, -60), "soft tissue": (0, 70)}
PATIENT_BLOCK = 10  # patches per patient in the source files (130 = 13 patients x 10)
VALIDATION_PATIENTS = 3  # of the 13 patients of the val file; the other 10 train
SPLIT_SEED = 0
SPACING_MM = 2.0
PHANTOM_SEED = 99  # not the built-in model's 7; the seed benchmarks/compare_models.py holds out
PHANTOM_CASES = 6
PHANTOM_SIZE = 256
# Real CTs of ../shared/data; none has a tumour label. elastix_3DCT_lung shows a large lower-lobe mass.
REAL_CTS = {
    "totalseg_pulmonary_ct_cropped": "ct_nolabel/totalseg_pulmonary_ct_cropped.nii.gz",
    "totalseg_example_ct": "ct_nolabel/totalseg_example_ct.nii.gz",
    "totalseg_example_ct_sm": "ct_lungmask/totalseg_example_ct_sm.nii.gz",
    "cip_TestInput": "ct_nolabel/cip_TestInput.nrrd",
    "cip_ct-64": "ct_lungmask/cip_ct-64.nrrd",
    "elastix_3DCT_lung": "ct_lungmask/elastix_3DCT_lung.mha",
}
WITH_MASS = "elastix_3DCT_lung"
# The centre of that mass, placed by eye (voxel x 45, y 56, z 37 of the file), in LPS mm; it is a blurred round
# opacity some 3-4 cm across that merges with the consolidation around it, so no reference outline is drawn.
# Predictions within MASS_RADIUS_MM of it are counted apart from those elsewhere in that CT.
MASS_CENTRE_LPS_MM = (-92.36, -73.86, -1342.0)
MASS_RADIUS_MM = 30.0
# "Losing on phantoms": a mean phantom Dice below the built-in's by more than this.
PHANTOM_MARGIN = 0.02
# The training arms: the extra ``cmedl train`` arguments of each. ``finetuned`` uses the engine's fine-tuning
# defaults (architecture, spacing and HU window from the card, a tenth of the learning rate: 2e-5);
# ``finetuned_lr2e-4`` fine-tunes at the from-scratch rate, to tell the starting weights from the rate.
ARMS = {
    "finetuned": ["--init", str(BUILTIN)],
    "scratch": ["--segmentor", "unet", "--set", 'segmentor_options={"base_channels": 16}',
                "--set", f"spacing_mm=[{SPACING_MM}, {SPACING_MM}]", "--set", "hu_window=[-1000.0, 500.0]"],
    "finetuned_lr2e-4": ["--init", str(BUILTIN), "--set", "lr_segmentor=2e-4"],
}  # fmt: skip


@dataclass
class Patches:
    """The patches of one source file, as HU, with their patient (block) numbers."""

    source: str
    hu: np.ndarray  # (N, 48, 48) int16
    label: np.ndarray  # (N, 48, 48) uint8
    patient: np.ndarray  # (N,) int: block index in the source file
    index: np.ndarray  # (N,) int: patch index in the source file


# -- the intensity evidence and the data --------------------------------------------------------------------------


def load_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as handle:
        images = np.asarray(handle["images"][:, 0], dtype=np.float64)
        labels = np.asarray(handle["labels"][:, 0])
    return images, (labels > 0.5).astype(np.uint8)


def intensity_evidence(images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """What the [0, 1] intensities say about the window they were scaled with (see the module docstring)."""
    values = np.unique(images)
    steps = np.diff(values)
    levels = images * WINDOW_WIDTH_HU
    hu = np.rint(levels).astype(np.int64) + WINDOW_LOW_HU
    counts = np.bincount((hu - WINDOW_LOW_HU).ravel(), minlength=WINDOW_WIDTH_HU + 1).astype(float)
    # Peaks of the histogram without the two clipped ends, smoothed over 21 HU.
    inner = uniform_filter1d(counts[1:-1], size=21, mode="nearest")
    peaks, _ = find_peaks(inner, prominence=0.05 * inner.max())
    peak_hu = [int(p + 1 + WINDOW_LOW_HU) for p in peaks]
    return {
        "distinct_values": int(len(values)),
        "step_min": float(steps.min()),
        "step_max": float(steps.max()),
        "step_times_1100": [
            round(float(steps.min()) * WINDOW_WIDTH_HU, 5),
            round(float(steps.max()) * WINDOW_WIDTH_HU, 5),
        ],
        "max_distance_from_integer_hu": float(np.abs(levels - np.rint(levels)).max()),
        "fraction_exactly_0": float(np.mean(images == 0.0)),
        "fraction_exactly_1": float(np.mean(images == 1.0)),
        "histogram_peaks_x": [round((h - WINDOW_LOW_HU) / WINDOW_WIDTH_HU, 4) for h in peak_hu],
        "histogram_peaks_hu": peak_hu,
        "tumour_median_hu": float(np.median(hu[labels > 0])),
        "tumour_hu_iqr": [float(v) for v in np.percentile(hu[labels > 0], [25, 75])],
    }


def check_evidence(evidence: dict[str, Any]) -> list[str]:
    """Why the [-1000, 100] HU reading does not hold (empty when it holds)."""
    problems = []
    if evidence["distinct_values"] > WINDOW_WIDTH_HU + 1:
        problems.append(f"{evidence['distinct_values']} distinct values: more than 1101 integer HU levels")
    if evidence["max_distance_from_integer_hu"] > 0.01:
        problems.append(
            f"values are not multiples of 1/1100 (off by {evidence['max_distance_from_integer_hu']:.3f} HU)"
        )
    if not all(abs(v - 1.0) < 1e-3 for v in evidence["step_times_1100"]):
        problems.append(f"quantisation step x 1100 = {evidence['step_times_1100']}, not 1")
    for tissue, (low, high) in EXPECTED_PEAKS_HU.items():
        if not any(low <= peak <= high for peak in evidence["histogram_peaks_hu"]):
            problems.append(f"no histogram peak for {tissue} within {low}..{high} HU: {evidence['histogram_peaks_hu']}")
    if not -100 <= evidence["tumour_median_hu"] <= 100:
        problems.append(f"tumour median {evidence['tumour_median_hu']} HU is not soft tissue")
    return problems


def patient_blocks(images: np.ndarray) -> dict[str, Any]:
    """How strongly the patches cluster in consecutive blocks of 10: the share of patches whose most similar other
    patch (mean squared difference, exact duplicates left out) lies in its own block, for each block offset."""
    flat = images.reshape(len(images), -1)
    distance = ((flat[:, None, :] - flat[None, :, :]) ** 2).mean(axis=-1)
    np.fill_diagonal(distance, np.inf)
    distance[distance == 0] = np.inf
    nearest = distance.argmin(axis=1)
    index = np.arange(len(images))
    shares = [
        float(np.mean((index + offset) // PATIENT_BLOCK == (nearest + offset) // PATIENT_BLOCK))
        for offset in range(PATIENT_BLOCK)
    ]
    return {"same_block_share_by_offset": [round(s, 3) for s in shares], "chance": round(9 / (len(images) - 1), 3)}


def duplicate_pairs(images: np.ndarray) -> list[tuple[int, int]]:
    """(first, later) index pairs of byte-identical patches."""
    seen: dict[bytes, int] = {}
    pairs = []
    for i, image in enumerate(images):
        key = hashlib.sha1(image.tobytes()).digest()
        if key in seen:
            pairs.append((seen[key], i))
        else:
            seen[key] = i
    return pairs


def read_patches(path: Path) -> tuple[Patches, dict[str, Any]]:
    """The patches of one file as HU, duplicates dropped, with the checks made on them."""
    images, labels = load_h5(path)
    evidence = intensity_evidence(images, labels)
    blocks = patient_blocks(images)
    duplicates = duplicate_pairs(images)
    keep = np.ones(len(images), dtype=bool)
    keep[[later for _, later in duplicates]] = False
    hu = (np.rint(images * WINDOW_WIDTH_HU) + WINDOW_LOW_HU).astype(np.int16)
    index = np.flatnonzero(keep)
    patches = Patches(path.name, hu[keep], labels[keep], index // PATIENT_BLOCK, index)
    report = {
        "file": path.name,
        "sha256": file_sha256(path),
        "patches": len(images),
        "with_tumour": int(labels.reshape(len(labels), -1).any(axis=1).sum()),
        "duplicates_dropped": [list(pair) for pair in duplicates],
        "intensity": evidence,
        "patient_blocks": blocks,
    }
    return patches, report


def write_dataset(folder: Path, patches: Patches, patients: list[int]) -> None:
    """One volume per patient: its patches as slices, int16 HU, 2 mm voxels; labels with the same names."""
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for patient in patients:
        chosen = patches.patient == patient
        name = f"{Path(patches.source).stem}_patient{patient:02d}.nii.gz"
        for sub, array in (("images", patches.hu[chosen]), ("labels", patches.label[chosen])):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((SPACING_MM, SPACING_MM, SPACING_MM))
            sitk.WriteImage(image, str(folder / sub / name), True)


def make_split(train_source: Patches) -> tuple[list[int], list[int]]:
    patients = sorted(set(train_source.patient.tolist()))
    order = np.random.default_rng(SPLIT_SEED).permutation(patients)
    validation = sorted(int(p) for p in order[:VALIDATION_PATIENTS])
    return [p for p in patients if p not in validation], validation


# -- training -----------------------------------------------------------------------------------------------------


def cmedl(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m cmedl ...`` with one torch thread; stdout and stderr are captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cmedl", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def train(run: Path, arm: str, seed: int, data: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm (see :data:`ARMS`) unless its run folder already finished; returns the command, the training
    time (sum of the epochs' seconds), the validation Dice per epoch and the log's fine-tuning lines."""
    command = ["train", "--method", "ct_only", "--ct", str(data["train"]), "--out", str(run)]
    command += ["--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations)]
    command += ["--batch-size", str(args.batch_size), "--patch-size", str(args.patch_size)]
    command += ["--device", "cpu", "--seed", str(seed), "--progress", "none"]
    command += ["--set", f"validation={data['validation']}", "--set", f"early_stopping_patience={args.epochs}"]
    command += ["--set", f"name=msd06-{arm}-seed{seed}", *ARMS[arm]]
    status_path = run / "status.json"
    if not (status_path.is_file() and json.loads(status_path.read_text()).get("state") == "finished"):
        if run.exists():
            raise SystemExit(f"{run} exists but did not finish; remove it to train again")
        cmedl(*command)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best = max(metrics, key=lambda m: m["validation_dice"])
    log = (run / "train.log").read_text().splitlines()
    config = json.loads((run / "config.json").read_text())
    init_lines = [line.split(" ", 1)[1] for line in log if any(w in line for w in ("fine-tuning", "warning", "lr_"))]
    return {
        "arm": arm,
        "seed": seed,
        "command": "cmedl " + " ".join(command),
        "train_seconds": round(sum(m["seconds"] for m in metrics), 1),
        "best_epoch": best["epoch"],
        "best_validation_dice": round(best["validation_dice"], 4),
        "validation_dice_by_epoch": [round(m["validation_dice"], 4) for m in metrics],
        "seg_loss_by_epoch": [round(m["loss_seg_ct"], 4) for m in metrics],
        "lr_segmentor": config["lr_segmentor"],
        "init_log": init_lines,
        "model": str(run / "model.safetensors"),
    }


# -- scoring ------------------------------------------------------------------------------------------------------


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = int(prediction.sum() + truth.sum())
    return 2.0 * int((prediction & truth).sum()) / total if total else math.nan


def score_patches(model: LoadedModel, test: Patches) -> dict[str, Any]:
    """Each test patch through ``predict_slices`` as ``cmedl segment`` prepares a slice: HU windowed to the card's
    window, padded with air to the card's patch size, threshold 0.5."""
    card, options = model.card, SegmentOptions()
    slices = ((i, normalise_hu(test.hu[i], card.hu_window)) for i in range(len(test.hu)))
    predicted = np.zeros(test.hu.shape, dtype=bool)
    network = model.network.eval()
    for i, probabilities in predict_slices(
        network,
        slices,
        num_classes=card.num_classes,
        patch=card.patch_size,
        overlap=options.overlap,
        batch_size=8,
        device="cpu",
    ):
        predicted[i] = probabilities[1] >= options.probability_threshold
    truth = test.label.astype(bool)
    has_tumour = truth.reshape(len(truth), -1).any(axis=1)
    per_patch = [dice(p, t) for p, t in zip(predicted, truth)]
    tumour_dice = np.array([d for d, t in zip(per_patch, has_tumour) if t])
    detected = [bool((p & t).any()) for p, t in zip(predicted, truth) if t.any()]
    free = ~has_tumour
    fp_pixels = predicted[free].reshape(int(free.sum()), -1).sum(axis=1)
    outside_pixels = (predicted & ~truth)[has_tumour].reshape(int(has_tumour.sum()), -1).sum(axis=1)
    per_patient = {}
    for patient in sorted(set(test.patient.tolist())):
        chosen = (test.patient == patient) & has_tumour
        per_patient[int(patient)] = float(np.mean(np.array(per_patch)[chosen])) if chosen.any() else math.nan
    return {
        "tumour_patches": int(has_tumour.sum()),
        "tumour_free_patches": int(free.sum()),
        "dice_mean": float(tumour_dice.mean()),
        "dice_median": float(np.median(tumour_dice)),
        "dice_pooled": dice(predicted[has_tumour], truth[has_tumour]),
        "per_patient_dice": per_patient,
        "per_patient_dice_mean": float(np.nanmean(list(per_patient.values()))),
        "detection_rate": float(np.mean(detected)),
        "fp_pixels_tumour_free_total": int(fp_pixels.sum()),
        "fp_pixels_tumour_free_mean": float(fp_pixels.mean()),
        "tumour_free_patches_with_fp": int((fp_pixels > 0).sum()),
        "fp_pixels_outside_tumour_mean": float(outside_pixels.mean()),
        "per_patch_dice": [None if math.isnan(d) else round(d, 4) for d in per_patch],
    }


def score_real_cts(model: LoadedModel, folder: Path) -> dict[str, Any]:
    """Segment every real CT with ``segment_to_files`` (the function ``cmedl segment`` calls)."""
    segmenter = Segmenter(model, SegmentOptions(device="cpu", batch_size=8))
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, relative in REAL_CTS.items():
        summary = segment_to_files(segmenter, DATA / relative, folder / f"{name}.seg.nrrd")
        found[name] = {
            "tumour_volume_ml": summary["tumour_volume_ml"],
            "lesion_count": summary["lesion_count"],
            "lung_volume_ml": round(summary["lungs"]["lung_volume_ml"], 1),
            "slices_segmented": summary["slices_segmented"],
        }
    return found


def score_phantoms(model: LoadedModel, phantoms: Path, folder: Path) -> dict[str, Any]:
    """Segment the phantom CTs and score them with ``cmedl evaluate PRED REF --json``."""
    segmenter = Segmenter(model, SegmentOptions(device="cpu", batch_size=8))
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted((phantoms / "ct" / "images").glob("*.nii.gz")):
        segment_to_files(segmenter, image, folder / image.name.replace(".nii.gz", ".seg.nrrd"))
    result = json.loads(
        cmedl("evaluate", str(folder), str(phantoms / "ct" / "labels"), "--json", "--progress", "none").stdout
    )
    return {
        "dice_mean": result["summary"]["dice"]["mean"],
        "dice_sd": result["summary"]["dice"]["sd"],
        "per_case_dice": {case["case"]: case["dice"] for case in result["cases"]},
        "predicted_ml": {case["case"]: case["predicted_ml"] for case in result["cases"]},
        "reference_ml": {case["case"]: case["reference_ml"] for case in result["cases"]},
    }


def score_model(
    name: str, model_path: Path, test: Patches, work: Path, tile: int | None = None, phantoms: bool = True
) -> dict[str, Any]:
    """All scores of one model, cached in ``work/scores`` by the model file's sha256.

    ``tile`` replaces the card's patch size in memory (a diagnostic: the built-in model tiled as a model trained on
    smaller patches is); ``phantoms=False`` leaves the phantoms out.
    """
    digest = file_sha256(model_path)
    cache = work / "scores" / f"{name}_{digest[:16]}.json"
    if cache.is_file():
        return {**json.loads(cache.read_text()), "reused_from_work": True}
    started = time.monotonic()
    model = load_model(model_path)
    if tile is not None:
        model = dataclasses.replace(model, card=dataclasses.replace(model.card, patch_size=tile))
    scores = {
        "name": name,
        "model": str(model_path),
        "sha256": digest,
        "patch_size": model.card.patch_size,
        "hu_window": list(model.card.hu_window),
        "patches": score_patches(model, test),
        "real_cts": score_real_cts(model, work / "segmentations" / name),
    }
    if phantoms:
        scores["phantoms"] = score_phantoms(model, work / "phantoms", work / "phantom_predictions" / name)
    scores["score_seconds"] = round(time.monotonic() - started, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(scores, indent=1))
    return scores


# -- the report ---------------------------------------------------------------------------------------------------


def near_mass(segmentation: Path) -> dict[str, float]:
    """Predicted tumour mL within ``MASS_RADIUS_MM`` of the mass centre of ``WITH_MASS`` and elsewhere in it."""
    label = sitk.ReadImage(str(segmentation))
    mask = sitk.GetArrayFromImage(label) > 0
    spacing = np.array(label.GetSpacing())
    centre = np.array(label.TransformPhysicalPointToContinuousIndex(MASS_CENTRE_LPS_MM))
    z, y, x = np.ogrid[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    distance = np.sqrt(
        ((x - centre[0]) * spacing[0]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2 + ((z - centre[2]) * spacing[2]) ** 2
    )
    voxel_ml = float(np.prod(spacing)) / 1000.0
    near = mask & (distance <= MASS_RADIUS_MM)
    return {
        "near_mass_ml": round(float(near.sum()) * voxel_ml, 2),
        "elsewhere_ml": round(float((mask & ~near).sum()) * voxel_ml, 2),
    }


def fp_total(scores: dict[str, Any]) -> float:
    return sum(v["tumour_volume_ml"] for k, v in scores["real_cts"].items() if k != WITH_MASS)


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Paired differences a - b: per-patient test-patch Dice and per-phantom Dice (Wilcoxon p, bootstrap CI)."""
    # JSON turns the patient numbers into text; sort them as numbers, so a reused score pairs in the same order.
    patients = sorted(a["patches"]["per_patient_dice"], key=int)
    patch = paired_comparison(
        [a["patches"]["per_patient_dice"][p] for p in patients], [b["patches"]["per_patient_dice"][p] for p in patients]
    )
    cases = sorted(a["phantoms"]["per_case_dice"])
    phantom = paired_comparison(
        [a["phantoms"]["per_case_dice"][c] for c in cases], [b["phantoms"]["per_case_dice"][c] for c in cases]
    )
    free = [k for k in a["real_cts"] if k != WITH_MASS]
    return {
        "patch_dice_per_patient": {
            k: patch[k] for k in ("n", "mean_difference", "ci_low", "ci_high", "wilcoxon_p", "a_better", "b_better")
        },
        "phantom_dice": {
            k: phantom[k] for k in ("n", "mean_difference", "ci_low", "ci_high", "wilcoxon_p", "a_better", "b_better")
        },
        "fp_ml_difference": round(fp_total(a) - fp_total(b), 3),
        "fp_lower_on": sum(a["real_cts"][k]["tumour_volume_ml"] < b["real_cts"][k]["tumour_volume_ml"] for k in free),
        "fp_higher_on": sum(a["real_cts"][k]["tumour_volume_ml"] > b["real_cts"][k]["tumour_volume_ml"] for k in free),
    }


def verdict(comparisons: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's rule, per fine-tuned model (``"<arm>_seed<n> - builtin"``): better on real CTs (per-patient
    real-patch Dice difference with a 95% CI above 0, and less false-positive volume on the CTs without a known
    tumour) and not losing on phantoms (mean Dice at most ``PHANTOM_MARGIN`` below). An arm passes when every seed
    passes; the evidence supports replacing the built-in model when some arm passes."""
    checks, arms = {}, {}
    for label, comparison in comparisons.items():
        name = label.split(" - ")[0]
        patch, phantom = comparison["patch_dice_per_patient"], comparison["phantom_dice"]
        checks[name] = {
            "real_patch_dice_better": bool(patch["ci_low"] > 0),
            "less_fp_volume_on_tumour_free_cts": bool(comparison["fp_ml_difference"] < 0),
            "not_losing_on_phantoms": bool(phantom["mean_difference"] >= -PHANTOM_MARGIN),
        }
        arm = name.rsplit("_seed", 1)[0]
        arms[arm] = arms.get(arm, True) and all(checks[name].values())
    return {"checks": checks, "arms_passing": arms, "evidence_supports_replacing_builtin": any(arms.values())}


def _training_cells(training: dict[str, Any] | None) -> tuple[str, str, str]:
    """Learning rate, training seconds and best validation Dice (at epoch) of a trained model, or dashes."""
    if not training:
        return "-", "-", "-"
    return (
        f"{training['lr_segmentor']:.0e}",
        f"{training['train_seconds']:.0f}",
        f"{training['best_validation_dice']:.3f}@{training['best_epoch']}",
    )


def table(results: dict[str, Any]) -> str:
    """The printed report: one row per model, the real CTs per model, the paired comparisons and the verdict."""
    models = results["models"]
    header = (
        f"{'model':<24} {'lr':>5} {'train s':>7} {'val Dice':>9} {'patch Dice':>10} {'per-pt':>6} {'detect':>6} "
        f"{'FP px/free':>10} {'FP mL free CTs':>14} {'mass CT mL: near/else':>21} {'phantom Dice':>13}"
    )
    lines = [header, "-" * len(header)]
    for name, model in models.items():
        lr, seconds, validation = _training_cells(model.get("training"))
        patches, phantoms, mass = model["patches"], model.get("phantoms"), model["mass_ct"]
        phantom_cell = f"{phantoms['dice_mean']:.3f}±{phantoms['dice_sd']:.3f}" if phantoms else "-"
        lines.append(
            f"{name:<24} {lr:>5} {seconds:>7} {validation:>9} {patches['dice_mean']:>10.3f} "
            f"{patches['per_patient_dice_mean']:>6.3f} {patches['detection_rate']:>6.2f} "
            f"{patches['fp_pixels_tumour_free_mean']:>10.1f} {fp_total(model):>14.1f} "
            f"{mass['near_mass_ml']:>10.1f} / {mass['elsewhere_ml']:<8.1f} {phantom_cell:>13}"
        )
    names = list(models)
    lines += [
        "",
        f"Predicted tumour volume (mL) per real CT; lungs identical for every model: {results['lungs_identical']}",
    ]
    lines.append(f"{'CT':<30} {'lungs mL':>8} " + " ".join(f"{n[:16]:>16}" for n in names))
    for ct in REAL_CTS:
        volumes = " ".join(f"{models[n]['real_cts'][ct]['tumour_volume_ml']:>16.1f}" for n in names)
        lines.append(f"{ct:<30} {results['lungs'][ct]['lung_volume_ml']:>8.0f} {volumes}")
    lines += [
        "",
        "Paired differences, first minus second: per-patient Dice on the 13 test patients and per-case Dice on the "
        "6 phantoms (mean, 95% bootstrap CI, Wilcoxon p); false-positive mL on the CTs without a known tumour",
    ]
    for label, comparison in results["comparisons"].items():
        patch, phantom = comparison["patch_dice_per_patient"], comparison["phantom_dice"]
        lines.append(
            f"{label:<42} patches {patch['mean_difference']:+.3f} ({patch['ci_low']:+.3f} to {patch['ci_high']:+.3f}, "
            f"p={patch['wilcoxon_p']:.2g}); phantoms {phantom['mean_difference']:+.3f} ({phantom['ci_low']:+.3f} to "
            f"{phantom['ci_high']:+.3f}, p={phantom['wilcoxon_p']:.2g}); FP mL {comparison['fp_ml_difference']:+.1f}"
        )
    lines.append("")
    decision = results["decision"]
    for name, checks in decision["checks"].items():
        lines.append(f"{name}: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in checks.items()))
    replace = "yes" if decision["evidence_supports_replacing_builtin"] else "no"
    lines.append(f"Evidence supports replacing the built-in model: {replace} (this script replaces nothing)")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder (datasets, runs, segmentations)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_real_patches.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of every arm")
    parser.add_argument("--arms", nargs="+", default=["finetuned", "scratch"], choices=list(ARMS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=64, help="training patch (a multiple of 32; 48 is refused)")
    return parser.parse_args(argv)


def check_sources(reports: list[dict[str, Any]]) -> None:
    """Print the evidence of each source file and refuse to go on when the HU reading or the patient blocks fail."""
    for report in reports:
        evidence, blocks = report["intensity"], report["patient_blocks"]
        shares = blocks["same_block_share_by_offset"]
        print(
            f"{report['file']}: {report['patches']} patches ({report['with_tumour']} with tumour), "
            f"{evidence['distinct_values']} distinct values, step x 1100 = {evidence['step_times_1100']}, "
            f"largest distance from an integer HU {evidence['max_distance_from_integer_hu']:.1e}, "
            f"exactly 0: {evidence['fraction_exactly_0']:.1%}, exactly 1: {evidence['fraction_exactly_1']:.1%}, "
            f"peaks at x = {evidence['histogram_peaks_x']} = {evidence['histogram_peaks_hu']} HU, tumour median "
            f"{evidence['tumour_median_hu']:.0f} HU (IQR {evidence['tumour_hu_iqr']}); nearest patch in its own "
            f"block of 10: {shares[0]:.0%} (chance {blocks['chance']:.0%}, blocks shifted by 1-9: "
            f"{min(shares[1:]):.0%}-{max(shares[1:]):.0%}); duplicates dropped {report['duplicates_dropped']}"
        )
        problems = check_evidence(evidence)
        if problems:
            raise SystemExit(f"{report['file']}: the [-1000, 100] HU window does not hold: " + "; ".join(problems))
        if shares[0] < 0.5 or shares[0] < max(shares[1:]) + 0.05:
            raise SystemExit(f"{report['file']}: the patches do not come in blocks of {PATIENT_BLOCK} per patient")
        if any(a // PATIENT_BLOCK != b // PATIENT_BLOCK for a, b in report["duplicates_dropped"]):
            raise SystemExit(f"{report['file']}: a duplicated patch spans two patient blocks")


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    torch.set_num_threads(1)
    started = time.monotonic()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    def elapsed() -> str:
        return f"{time.monotonic() - started:.0f} s so far"

    # 1. The intensity evidence and the patient blocks, per file.
    training_source, training_report = read_patches(DATA / "ct_tumor" / "msd06_2mm_val_patches.h5")
    test, test_report = read_patches(DATA / "ct_tumor" / "msd06_2mm_test_patches.h5")
    check_sources([training_report, test_report])

    # 2. Dataset folders: training and validation patients of the val file; the test file's 13 patients.
    train_patients, validation_patients = make_split(training_source)
    data = {part: work / "data" / part for part in ("train", "validation", "test")}
    if not data["test"].exists():
        write_dataset(data["train"], training_source, train_patients)
        write_dataset(data["validation"], training_source, validation_patients)
        write_dataset(data["test"], test, sorted(set(test.patient.tolist())))
    inventory = scan_training_data(data["train"] / "images", data["train"] / "labels", validation=data["validation"])
    has_tumour = test.label.reshape(len(test.label), -1).any(axis=1)
    split = {
        "train": {"file": training_source.source, "patients": train_patients,
                  "patches": int(np.isin(training_source.patient, train_patients).sum())},
        "validation": {"file": training_source.source, "patients": validation_patients,
                       "patches": int(np.isin(training_source.patient, validation_patients).sum())},
        "test": {"file": test.source, "patients": sorted(set(test.patient.tolist())), "patches": len(test.hu),
                 "tumour_patches": int(has_tumour.sum())},
    }  # fmt: skip
    print(
        f"split: train {split['train']['patches']} patches of patients {train_patients}, validation "
        f"{split['validation']['patches']} of {validation_patients} (both {training_source.source}); test "
        f"{split['test']['patches']} patches ({int(has_tumour.sum())} with tumour) of the 13 patients of {test.source}"
    )
    print("training-data check (the CMEDL Train panel's): " + ("; ".join(inventory.problems()) or "no problems"))

    # Phantoms and the lung masks of the real CTs, which no model changes.
    phantoms = work / "phantoms"
    if not (phantoms / "ct" / "labels").is_dir():
        cmedl("phantom", str(phantoms), "--ct", str(PHANTOM_CASES), "--mr", "0", "--seed", str(PHANTOM_SEED),
              "--size", str(PHANTOM_SIZE), "--progress", "none")  # fmt: skip
    lungs = {name: json.loads(cmedl("lungs", str(DATA / path), "--json").stdout) for name, path in REAL_CTS.items()}

    # 3-4. Score the built-in model (also tiled at the training patch size, a diagnostic), train and score the arms.
    models: dict[str, dict[str, Any]] = {"builtin": score_model("builtin", BUILTIN, test, work)}
    print(f"scored builtin ({elapsed()})", flush=True)
    if args.patch_size != models["builtin"]["patch_size"]:
        name = f"builtin_tiled{args.patch_size}"
        models[name] = score_model(name, BUILTIN, test, work, tile=args.patch_size, phantoms=False)
        print(f"scored {name} ({elapsed()})", flush=True)
    budget = f"e{args.epochs}_i{args.iterations}_b{args.batch_size}_p{args.patch_size}"
    for seed in args.seeds:
        for arm in args.arms:
            name = f"{arm}_seed{seed}"
            training = train(work / "runs" / budget / name, arm, seed, data, args)
            print(f"trained {name}: best validation Dice {training['best_validation_dice']} at epoch "
                  f"{training['best_epoch']} ({elapsed()})", flush=True)  # fmt: skip
            models[name] = {**score_model(name, Path(training["model"]), test, work), "training": training}
            print(f"scored {name} ({elapsed()})", flush=True)

    for name, model in models.items():
        model["mass_ct"] = near_mass(work / "segmentations" / name / f"{WITH_MASS}.seg.nrrd")
    lung_volumes = {name: round(found["lung_volume_ml"], 1) for name, found in lungs.items()}
    identical = all(
        model["real_cts"][ct]["lung_volume_ml"] == lung_volumes[ct] for model in models.values() for ct in REAL_CTS
    )
    comparisons = {}
    for arm in (arm for arm in args.arms if arm.startswith("finetuned")):
        for seed in args.seeds:
            tuned = f"{arm}_seed{seed}"
            comparisons[f"{tuned} - builtin"] = compare(models[tuned], models["builtin"])
            if "scratch" in args.arms:
                comparisons[f"{tuned} - scratch_seed{seed}"] = compare(models[tuned], models[f"scratch_seed{seed}"])
    decision = verdict({label: value for label, value in comparisons.items() if label.endswith(" - builtin")})
    results = {
        "what": "the built-in model fine-tuned on real MSD Task06 CT tumour patches, against training from scratch",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "seeds": args.seeds, "arms": {arm: ARMS[arm] for arm in args.arms}, "epochs": args.epochs,
            "iterations_per_epoch": args.iterations, "batch_size": args.batch_size, "patch_size": args.patch_size,
            "split_seed": SPLIT_SEED, "phantom_seed": PHANTOM_SEED, "phantom_cases": PHANTOM_CASES,
            "phantom_size": PHANTOM_SIZE, "torch_threads": torch.get_num_threads(),
        },
        "sources": [training_report, test_report],
        "split": split,
        "training_data_check": {"problems": inventory.problems(), "warnings": inventory.warnings()},
        "lungs": {name: {"lung_volume_ml": lung_volumes[name], "lung_count": found["lung_count"]}
                  for name, found in lungs.items()},
        "lungs_identical": identical,
        "models": models,
        "comparisons": comparisons,
        "decision": decision,
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip
    text = table(results)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.txt')} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
