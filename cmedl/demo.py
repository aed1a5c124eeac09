"""The demonstration run behind ``make demo`` / ``cmedl demo``.

It makes a new phantom CT (with a seed the built-in model was not trained on), segments it with the
built-in model exactly as a user's CT would be segmented, writes the Slicer segmentation file and a PNG
overlay, and reports Dice against the phantom's known tumour and the time taken.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image

from cmedl.catalogue import builtin_model_path
from cmedl.filebase import peek_model_card
from cmedl.metrics import dice
from cmedl.phantom import make_phantom
from cmedl.progress import Progress
from cmedl.segment import SegmentOptions, segment_file
from cmedl.volumes import atomic_output, read_volume, write_labelmap, write_volume

OVERLAY_WINDOW_HU = (-1000.0, 400.0)


def render_overlay(
    ct: sitk.Image, prediction: sitk.Image, truth: sitk.Image | None, path: Path, columns: int = 4
) -> Path:
    """Write a PNG of up to ``columns`` axial slices through the tumour: CT in grey, prediction in red,
    truth outline in green. Slices are the ones with most truth (or predicted) tumour."""
    volume = sitk.GetArrayFromImage(ct).astype(np.float32)
    predicted = sitk.GetArrayFromImage(prediction) > 0
    reference = sitk.GetArrayFromImage(truth) > 0 if truth is not None else predicted
    area = reference.reshape(len(reference), -1).sum(axis=1)
    chosen = sorted(np.argsort(area)[::-1][:columns]) if area.any() else [len(volume) // 2]
    low, high = OVERLAY_WINDOW_HU
    tiles = []
    for z in chosen:
        grey = (np.clip((volume[z] - low) / (high - low), 0, 1) * 255).astype(np.uint8)
        rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
        red = predicted[z]
        rgb[red] = 0.5 * rgb[red] + 0.5 * np.array([255, 40, 40])
        if truth is not None:
            edge = reference[z] & ~_eroded(reference[z])
            rgb[edge] = (40, 255, 40)
        tiles.append(rgb.astype(np.uint8))
    strip = np.concatenate(tiles, axis=1)
    with atomic_output(path) as temp:
        Image.fromarray(strip).save(temp, format="PNG")
    return path


def _eroded(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask)


def run_demo(
    out: Path, seed: int = 2026, device: str = "auto", progress: Progress | None = None, size: int = 512
) -> dict[str, Any]:
    """Segment a fresh phantom with the built-in model; returns Dice, volumes, times, output paths and the model.

    ``size`` is the phantom's in-plane matrix (512 like a clinical CT; smaller ones are quicker).
    """
    progress = progress or Progress()
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    progress.update("phantom", 0, 1, "making a phantom CT")
    case = make_phantom("ct", seed=seed, size=size)
    ct_path = write_volume(case.image, out / "phantom_ct.nii.gz")
    truth_path = write_labelmap(case.label, out / "phantom_truth.nii.gz")
    progress.update("phantom", 1, 1, "making a phantom CT")

    output = out / "phantom_ct_tumour.seg.nrrd"
    segment_started = time.perf_counter()
    model_path = builtin_model_path()
    card = peek_model_card(model_path)
    summary = segment_file(ct_path, output, model_path, SegmentOptions(device=device), progress)
    segment_seconds = time.perf_counter() - segment_started

    prediction = read_volume(output)
    truth = read_volume(truth_path)
    score = dice(sitk.GetArrayViewFromImage(prediction) > 0, sitk.GetArrayViewFromImage(truth) > 0)
    overlay = render_overlay(case.image, prediction, truth, out / "overlay.png")
    voxel_ml = float(np.prod(case.image.GetSpacing())) / 1000.0
    return {
        "ct": str(ct_path),
        "truth": str(truth_path),
        "output": str(output),
        "overlay": str(overlay),
        "dice": score,
        "tumour_volume_ml": summary["tumour_volume_ml"],
        "truth_volume_ml": float(np.count_nonzero(sitk.GetArrayViewFromImage(truth))) * voxel_ml,
        "segment_seconds": segment_seconds,
        "total_seconds": time.perf_counter() - started,
        "model": summary["model"],
        "model_sha256": summary["model_sha256"],
        "model_method": card.get("method", "unknown"),
        "model_training_data": card.get("training_data", {}),
    }


def demo_report(summary: dict[str, Any]) -> str:
    """What ``cmedl demo`` prints: the score, the outputs, and which model (and training method) produced them."""
    method = {"cmedl": "CMEDL (CT student distilled from an MRI teacher)", "ct_only": "CT only (no MRI teacher)"}
    trained = method.get(summary["model_method"], summary["model_method"])
    return (
        f"demo: Dice {summary['dice']:.3f} against the phantom's truth, tumour {summary['tumour_volume_ml']:.1f} mL "
        f"(truth {summary['truth_volume_ml']:.1f} mL), segmented in {summary['segment_seconds']:.1f} s, "
        f"total {summary['total_seconds']:.1f} s\n"
        f"      model {summary['model']}, trained by {trained}\n"
        f"      result {summary['output']}\n      overlay {summary['overlay']}"
    )
