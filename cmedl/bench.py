"""Inference benchmarks (``cmedl bench``): figures only, no pass/fail.

1. Network speed: milliseconds per 256x256 slice for each segmentor in fp32 at several batch sizes
   (random weights: speed does not depend on them). Batch size 1 is the baseline each row is compared to.
2. Whole CT: ``cmedl segment`` on a 512x512x150 phantom CT with a full-width U-Net, run as a child process
   so that its wall time and peak resident memory are its own. The baseline in the same run is a child that
   only reads the same CT: the difference is what segmentation adds.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cmedl.devices import resolve_device
from cmedl.modelfile import ModelCard, save_model
from cmedl.nets import build_segmentor, count_parameters
from cmedl.phantom import make_phantom
from cmedl.volumes import write_volume

PATCH = 256
VOLUME_SLICES = 150


def time_network(name: str, batch_size: int, repeats: int, device: torch.device) -> float:
    """Median milliseconds per slice of one forward pass of ``name`` at ``batch_size``."""
    network = build_segmentor(name).to(device).eval()
    inputs = torch.randn(batch_size, 1, PATCH, PATCH, device=device)
    timings = []
    with torch.inference_mode():
        network(inputs)  # warm-up: first calls pay for allocation and kernel selection
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            network(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - started) * 1000.0 / batch_size)
    timings.sort()
    return timings[len(timings) // 2]


def _child_peak(command: list[str]) -> tuple[float, float]:
    """Run ``command``; returns (wall seconds, peak RSS of that child in MiB)."""
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far; each measured child must be the largest
    # of its kind, so children are run in increasing order of expected size.
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed: {completed.stderr.strip().splitlines()[-1:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib / 1024.0


def run_benchmarks(
    segmentors: list[str], batch_sizes: list[int], repeats: int = 3, device: str = "cpu", whole_volume: bool = True
) -> None:
    target = resolve_device(device)
    print(f"device {target}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {PATCH}x{PATCH}")
    print(f"{'segmentor':<10} {'params':>12} " + " ".join(f"{'b=' + str(b) + ' ms/slice':>16}" for b in batch_sizes))
    for name in segmentors:
        figures = [time_network(name, b, repeats, target) for b in batch_sizes]
        baseline = figures[0]
        cells = " ".join(f"{ms:>9.1f} ({baseline / ms:>4.2f}x)" for ms in figures)
        print(f"{name:<10} {count_parameters(build_segmentor(name)):>12,} {cells}", flush=True)
    if not whole_volume:
        return
    with tempfile.TemporaryDirectory(prefix="cmedl-bench-") as scratch:
        folder = Path(scratch)
        case = make_phantom("ct", seed=99, size=512, slices=VOLUME_SLICES)
        ct_path = write_volume(case.image, folder / "ct.nii.gz")
        model_path = folder / "unet.safetensors"
        save_model(model_path, build_segmentor("unet"), ModelCard(name="bench-unet", architecture="unet"))
        size = case.image.GetSize()
        spacing = tuple(round(s, 2) for s in case.image.GetSpacing())
        print(f"\nwhole CT {size[0]}x{size[1]}x{size[2]}, spacing {spacing} mm")
        read_only = [sys.executable, "-c", f"from cmedl.volumes import read_volume; read_volume({str(ct_path)!r})"]
        wall, peak = _child_peak(read_only)
        print(f"  baseline (read the CT only): {wall:7.1f} s, peak RSS {peak:7.0f} MiB")
        command = [sys.executable, "-m", "cmedl", "segment", str(ct_path), "-o", str(folder / "out.nii.gz")]
        command += ["--model", str(model_path), "--device", device, "--batch-size", "4", "--progress", "none"]
        wall, peak_segment = _child_peak(command)
        print(f"  segment (U-Net, batch 4):   {wall:7.1f} s, peak RSS {peak_segment:7.0f} MiB")
