"""Inference speed against this machine's limit, before and after the fast path, in one run.

Prints, side by side, and saves to ``benchmarks/results/inference_speed_<device>.{json,txt}``:

1. the machine's fp32 matmul peak (GFLOP/s) on the threads inference uses (and bf16 where native);
2. per segmentor (the paper's widths and the built-in model's), FLOPs and ms per 256 px slice on the reference
   path (NCHW, BatchNorm as trained) and the fast path (BatchNorm folded, channels_last, native precision),
   alternating in one process, best of N, with the fraction of the peak each reaches;
3. whole CTs with the built-in model, in process, per path (reference; fast; fast with one tile per slice):
   a 512 x 512 x 150 phantom (stages, network-only seconds, and the peak RSS of a child ``cmedl segment``) and
   every real CT of ``../shared/data``, with the Dice of each fast path's mask against the reference's;
4. lung detection on a 512 x 512 x 300 phantom and on the real CTs: the detector as it was at commit
   ``a4e0adb`` (read from git) against the current one, wall and CPU seconds, and the Dice of their lung masks;
   also a real chest CT resampled to 0.7 mm (where the current detector's coarser working grid applies);
5. the peak RSS of ``cmedl segment`` on the 512 x 512 x 300 phantom (fast path).

Run: ``.venv/bin/python benchmarks/inference_speed.py [--repeats 3] [--quick]`` (``--quick``: 128 px slices,
no 300-slice CT; for a smoke test). Figures only, no pass/fail; a busy machine slows everything, which is why
each comparison alternates its two sides in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmedl.bench import (  # noqa: E402
    machine,
    matmul_peak_gflops,
    network_speed,
    phantom_ct,
    segment_in_child,
    whole_ct,
    whole_ct_lines,
)
from cmedl.catalogue import builtin_model_path  # noqa: E402
from cmedl.inference import choose_precision, configure_threads  # noqa: E402
from cmedl.lungs import detect_lungs  # noqa: E402
from cmedl.modelfile import load_model  # noqa: E402
from cmedl.segment import Segmenter, SegmentOptions  # noqa: E402
from cmedl.volumes import read_volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
BASELINE_COMMIT = "a4e0adb"  # lung detection before the rewrite (per-slice convex hulls, full-grid labelling)
REAL_CTS = [
    "ct_lungmask/cip_ct-64.nrrd",
    "ct_lungmask/cip_ct-64Dicom",
    "ct_lungmask/elastix_3DCT_lung.mha",
    "ct_lungmask/elastix_3DCT_lung_baseline_small.mha",
    "ct_lungmask/totalseg_example_ct_sm.nii.gz",
    "ct_nolabel/totalseg_pulmonary_ct_cropped.nii.gz",
    "ct_nolabel/totalseg_example_ct.nii.gz",
    "ct_nolabel/cip_TestInput.nrrd",
    "ct_nolabel/lungmask_lidc_slice",
    "ct_nolabel/dcmqi_ct-3slice",
    "ct_nolabel/totalseg_example_ct_dicom",
]
SEGMENTORS = [
    ("unet", {}),
    ("densefcn", {}),
    ("mrrn", {}),
    ("unet", {"base_channels": 16}),  # the built-in model's width
]
PATHS = {"reference": {"fast": False}, "fast": {"fast": True}, "fast_slice_tiles": {"fast": True, "tiles": "slice"}}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def baseline_lungs() -> types.ModuleType:
    """``cmedl/lungs.py`` as it was at :data:`BASELINE_COMMIT`, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{BASELINE_COMMIT}:cmedl/lungs.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType("cmedl_lungs_baseline")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"cmedl/lungs.py@{BASELINE_COMMIT}", "exec"), module.__dict__)
    return module


def timed(call, repeats: int) -> tuple[Any, float, float]:
    """(result, best wall seconds, best CPU seconds of this process) of ``repeats`` calls."""
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = call()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return result, best_wall, best_cpu


def compare_lungs(ct: sitk.Image, old: types.ModuleType, repeats: int, old_repeats: int = 1) -> dict[str, Any]:
    """Old and new lung detection on one CT: times and the agreement of their masks."""
    try:
        before, old_wall, old_cpu = timed(lambda: old.detect_lungs(ct), old_repeats)
        after, new_wall, new_cpu = timed(lambda: detect_lungs(ct), repeats)
    except Exception as error:  # a negative control: both must refuse it
        return {"error": f"{type(error).__name__}: {error}"}
    a = sitk.GetArrayViewFromImage(before.lung_mask) > 0
    b = sitk.GetArrayViewFromImage(after.lung_mask) > 0
    return {
        "size": list(ct.GetSize()),
        "old_wall_s": old_wall,
        "old_cpu_s": old_cpu,
        "new_wall_s": new_wall,
        "new_cpu_s": new_cpu,
        "dice": dice(a, b),
        "voxels_differing": int(np.count_nonzero(a != b)),
        "same_slices_and_roi": before.slice_range == after.slice_range and before.roi_box == after.roi_box,
        "lung_count": [before.lung_count, after.lung_count],
    }


def real_ct_paths(model_path: Path) -> list[dict[str, Any]]:
    """Every real CT through every path, in process: seconds, and each fast path's Dice against the reference."""
    model = load_model(model_path)
    segmenters = {name: Segmenter(model, SegmentOptions(device="cpu"), **kw) for name, kw in PATHS.items()}
    rows = []
    for relative in REAL_CTS:
        path = DATA / relative
        ct = read_volume(path)
        row: dict[str, Any] = {"ct": relative, "size": list(ct.GetSize())}
        masks = {}
        try:
            for name, segmenter in segmenters.items():
                result, wall, _ = timed(lambda s=segmenter, c=ct, n=path.name: s.segment(c, n), 1)
                masks[name] = sitk.GetArrayFromImage(result.label) == 1
                row[f"{name}_s"] = wall
                row[f"{name}_voxels"] = int(np.count_nonzero(masks[name]))
        except Exception as error:  # no lungs (the negative control) or not a CT
            row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            continue
        for name in ("fast", "fast_slice_tiles"):
            row[f"{name}_dice"] = dice(masks["reference"], masks[name])
        rows.append(row)
    return rows


def resampled_chest() -> sitk.Image:
    """The CIP whole-chest CT on a clinical grid: 0.7 mm in-plane, 2 mm slices (linear interpolation)."""
    ct = read_volume(DATA / "ct_lungmask/cip_ct-64.nrrd")
    spacing = (0.7, 0.7, 2.0)
    size = [int((n - 1) * s // new) + 1 for n, s, new in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    return sitk.Resample(
        ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(), -1000, ct.GetPixelID()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="128 px slices, no 300-slice CT (a smoke test)")
    args = parser.parse_args()

    out = io.StringIO()

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.write(line + "\n")

    import torch

    device = torch.device("cpu")
    choice = configure_threads(args.threads)
    precision = choose_precision(device)
    figures: dict[str, Any] = {"machine": machine(device), "threads_reason": choice.reason}
    say(f"# inference speed, {time.strftime('%Y-%m-%d %H:%M')}")
    info = figures["machine"]
    say(
        f"torch {info['torch']}, {info['threads']} threads ({choice.reason}), AVX2 {info['avx2']}, native bf16 "
        f"{info['native_bf16'] or 'none'}; load average {info['load_average']}"
    )
    say(f"fast path precision: {precision.name} ({precision.reason})")
    peaks = {"fp32": matmul_peak_gflops(device, "fp32")}
    if precision.name != "fp32":
        peaks[precision.name] = matmul_peak_gflops(device, precision.name)
    figures["peak_gflops"] = peaks
    at_start = ", ".join(f"{name} {value:.1f} GFLOP/s" for name, value in peaks.items())
    say(f"matmul peak (2048^2, best of 10), at the start: {at_start}")

    size = 128 if args.quick else 256
    say(f"\n## networks, one {size}x{size} slice per call, best of {args.repeats}, paths alternating")
    say(
        "| segmentor | GFLOP/slice | reference ms | ref. % of peak | fast ms | fast % of peak | speed-up | "
        "peak GFLOP/s (same minutes) |\n|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, options in SEGMENTORS:
        row = network_speed(name, device, size, args.repeats, 1, options)
        rows.append(row)
        label = name + (f" {options}" if options else "")
        say(
            f"| {label} | {row['gflop_per_slice']:.2f} | {row['reference_ms']:.1f} | "
            f"{row['reference_fraction_of_peak']:.0%} | {row['fast_ms']:.1f} | {row['fast_fraction_of_peak']:.0%} | "
            f"{row['reference_ms'] / row['fast_ms']:.2f}x | {row['peak_gflops']:.1f} |"
        )
    figures["networks"] = rows

    model_path = builtin_model_path()
    old = baseline_lungs()
    with tempfile.TemporaryDirectory(prefix="cmedl-speed-") as scratch:
        folder = Path(scratch)
        slices = 40 if args.quick else 150
        ct_path = phantom_ct(folder, slices=slices)
        say(f"\n## whole CT: phantom 512x512x{slices}, built-in model (in process; child = cmedl segment)")
        whole = whole_ct(ct_path, model_path)
        figures["whole_ct_phantom"] = whole
        for line in whole_ct_lines(whole):
            say(line)

        say("\n## real CTs, built-in model: seconds per path and agreement with the reference path")
        say("| CT | size | reference s | fast s | Dice fast | slice-tiles s | Dice slice-tiles | voxels r/f/s |")
        say("|---|---|---|---|---|---|---|---|")
        real = real_ct_paths(model_path)
        figures["real_cts"] = real
        for row in real:
            if "error" in row:
                say(f"| {row['ct']} | {row['size']} | {row['error']} |")
                continue
            say(
                f"| {row['ct']} | {row['size']} | {row['reference_s']:.1f} | {row['fast_s']:.1f} | "
                f"{row['fast_dice']:.4f} | {row['fast_slice_tiles_s']:.1f} | {row['fast_slice_tiles_dice']:.4f} | "
                f"{row['reference_voxels']}/{row['fast_voxels']}/{row['fast_slice_tiles_voxels']} |"
            )

        say("\n## lung detection: at commit " + BASELINE_COMMIT + " vs now (wall = elapsed, cpu = this process)")
        say("| CT | size | old wall s | old cpu s | new wall s | new cpu s | Dice old/new | same slices+ROI |")
        say("|---|---|---|---|---|---|---|---|")
        lungs: dict[str, Any] = {}
        cases: list[tuple[str, Any]] = []
        if not args.quick:
            big = phantom_ct(folder, slices=300, seed=3)
            cases.append(("phantom 512x512x300", lambda: read_volume(big)))
        cases.append(("CIP chest resampled to 0.7x0.7x2 mm", resampled_chest))
        cases += [(relative, lambda r=relative: read_volume(DATA / r)) for relative in REAL_CTS]
        for name, load in cases:
            row = compare_lungs(load(), old, args.repeats)
            lungs[name] = row
            if "error" in row:
                say(f"| {name} | | both: {row['error'][:70]} |")
                continue
            say(
                f"| {name} | {row['size']} | {row['old_wall_s']:.2f} | {row['old_cpu_s']:.2f} | "
                f"{row['new_wall_s']:.2f} | {row['new_cpu_s']:.2f} | {row['dice']:.5f} | {row['same_slices_and_roi']} |"
            )
        figures["lungs"] = lungs

        if not args.quick:
            say("\n## peak memory: cmedl segment on the 512x512x300 phantom, fast path, child process")
            child = segment_in_child(big, model_path, folder)
            figures["segment_512x512x300_child"] = child
            say(f"wall {child['wall_seconds']:.1f} s, peak RSS {child['peak_rss_mib']:.0f} MiB")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "inference_speed_cpu" + ("_quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.txt").write_text(out.getvalue())
    with contextlib.suppress(Exception):
        print(f"\nsaved {RESULTS / (stem + '.json')} and .txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
