"""Inference benchmarks (``cmedl bench``) against this machine's own limit: figures only, no pass/fail.

1. **Peak**: the fp32 matrix-product rate (GFLOP/s) of a large ``torch.matmul`` on the threads inference uses,
   and the bf16 rate where the CPU has native bf16 (on CUDA, fp32 and bf16/fp16). Every fraction below is of
   the peak in the precision the path runs.
2. **Networks**: for each segmentor, the FLOPs of one forward pass on a ``size`` x ``size`` slice (convolutions
   and matrix products, :func:`cmedl.inference.flops_per_forward`) and milliseconds per slice on the reference
   path (the network as trained, NCHW) and the fast path (BatchNorm folded, channels_last, native precision),
   measured alternately in one process (best of ``repeats``), so that a busy machine slows both alike; the
   achieved GFLOP/s and its fraction of the peak. Random weights: speed does not depend on them.
3. **Whole CT**: the built-in model on a 512 x 512 x 150 phantom CT (``volume_slices``), in this process, per
   path (reference, fast, fast with one tile per slice; on a GPU also fast without the prefetch thread): seconds
   by stage (read, lungs, segment, write), the network-only seconds of the same run (so that the pipeline's
   overhead is a ratio), and the peak resident memory of a child ``cmedl segment`` per path.

:func:`run_benchmarks` prints a table and returns the figures as a dict (``cmedl bench --json``).
``benchmarks/inference_speed.py`` adds the real CTs and the lung detection before and after its rewrite.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmedl.cpu import cpu_flags, native_bf16_flags
from cmedl.devices import resolve_device
from cmedl.inference import choose_precision, configure_threads, flops_per_forward, fold_batchnorm
from cmedl.nets import build_segmentor
from cmedl.progress import Progress

SLICE_SIZE = 256
PEAK_SIZE = 2048  # matrices for the peak: 17 GFLOP a product, large enough for every kernel's best blocking
VOLUME_SIZE = 512
VOLUME_SLICES = 150
#: the paths a whole CT is segmented with: (name, Segmenter keyword arguments)
PATHS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("reference", {"fast": False}),
    ("fast", {"fast": True, "tiles": "training"}),
    ("fast_slice_tiles", {"fast": True, "tiles": "slice"}),
)
#: on a GPU, the fast path once more without tiles prepared ahead: what the prefetch thread buys
GPU_PATHS: tuple[tuple[str, dict[str, Any]], ...] = (("fast_no_prefetch", {"fast": True, "prefetch": 0}),)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(
    device: torch.device, precision: str = "fp32", size: int = PEAK_SIZE, repeats: int = 10
) -> float:
    """Best GFLOP/s of ``size`` x ``size`` matrix products in ``precision`` (2 size^3 FLOPs each) on ``device``."""
    dtype = _DTYPES[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: first calls pay for allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        _synchronise(device)
        started = time.perf_counter()
        torch.matmul(a, b)
        _synchronise(device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best / 1e9


def _timed_calls(calls: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best seconds of each call, the calls run alternately ``repeats`` times after one warm-up each."""
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            _synchronise(device)
            started = time.perf_counter()
            call()
            _synchronise(device)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def network_speed(
    name: str,
    device: torch.device,
    size: int = SLICE_SIZE,
    repeats: int = 3,
    batch_size: int = 1,
    options: dict[str, Any] | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Reference and fast path of segmentor ``name`` on ``batch_size`` slices of ``size`` px, side by side.

    Returns FLOPs per slice, ms per slice of each path, the fast path's precision, GFLOP/s per path, and the
    matmul peak measured in the same alternation (``peak_gflops``, fp32; ``peak_<precision>_gflops`` when the
    fast path runs in reduced precision): on a shared machine the load changes from one minute to the next, so
    each row carries the peak of its own minutes.
    """
    network = build_segmentor(name, **(options or {})).to(device).eval()
    flops = flops_per_forward(network, (size, size))
    chosen = choose_precision(device, precision)
    fast = fold_batchnorm(network).to(memory_format=torch.channels_last)
    inputs = torch.randn(batch_size, 1, size, size, device=device)
    fast_inputs = inputs.contiguous(memory_format=torch.channels_last)
    reference_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None

    def run(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                if dtype is None:
                    return model(x)
                with torch.autocast(device.type, dtype=dtype):
                    return model(x)

        return call

    calls = {"reference": run(network, inputs, reference_dtype), "fast": run(fast, fast_inputs, chosen.dtype)}
    matrices = {}
    for precision_name in {"fp32", chosen.name}:
        a = torch.randn(PEAK_SIZE, PEAK_SIZE, device=device).to(_DTYPES[precision_name])
        matrices[precision_name] = a
        calls[f"peak_{precision_name}"] = lambda a=a: torch.matmul(a, a)
    best = _timed_calls(calls, repeats, device)
    result: dict[str, Any] = {
        "segmentor": name,
        "options": options or {},
        "size": size,
        "batch_size": batch_size,
        "gflop_per_slice": flops / 1e9,
        "precision": chosen.name,
        "reference_precision": "fp32" if reference_dtype is None else "bf16",
    }
    for path in ("reference", "fast"):
        per_slice = best[path] / batch_size
        result[f"{path}_ms"] = per_slice * 1000.0
        result[f"{path}_gflops"] = flops / per_slice / 1e9
    for precision_name in matrices:
        key = "peak_gflops" if precision_name == "fp32" else f"peak_{precision_name}_gflops"
        result[key] = 2.0 * PEAK_SIZE**3 / best[f"peak_{precision_name}"] / 1e9
    peak_of = {"fp32": result["peak_gflops"], chosen.name: result.get(f"peak_{chosen.name}_gflops")}
    result["reference_fraction_of_peak"] = result["reference_gflops"] / (
        result["peak_gflops"] if reference_dtype is None else result.get("peak_bf16_gflops") or float("nan")
    )
    result["fast_fraction_of_peak"] = result["fast_gflops"] / (peak_of[chosen.name] or result["peak_gflops"])
    return result


class _StageClock(Progress):
    """Records when each progress stage first reports, so a run splits into read, lungs, segment and write."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[str, float] = {}

    def update(self, stage: str, done: int, total: int, message: str = "") -> None:
        self.first.setdefault(stage, time.perf_counter())
        super().update(stage, done, total, message)

    def stages(self, ended: float) -> dict[str, float]:
        ordered = sorted(self.first.items(), key=lambda item: item[1])
        ends = [start for _, start in ordered[1:]] + [ended]
        return {stage: end - start for (stage, start), end in zip(ordered, ends)}


class _NetworkClock(nn.Module):
    """Wraps a network and sums the seconds spent in its forward calls (synchronised on CUDA)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model, self.device, self.seconds, self.calls = model, device, 0.0, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        _synchronise(self.device)
        started = time.perf_counter()
        outputs = self.model(inputs)
        _synchronise(self.device)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return outputs


def segment_in_process(
    ct_path: Path, model_path: Path, out_folder: Path, device: str = "cpu", **segmenter_options: Any
) -> dict[str, Any]:
    """Segment ``ct_path`` with ``segment_to_files`` in this process; seconds by stage and in the network."""
    from cmedl.modelfile import load_model
    from cmedl.segment import Segmenter, SegmentOptions, segment_to_files

    clock = _StageClock()
    segmenter = Segmenter(load_model(model_path), SegmentOptions(device=device), clock, **segmenter_options)
    network = _NetworkClock(segmenter.engine.model, segmenter.device)
    segmenter.engine.model = network  # type: ignore[assignment]
    started = time.perf_counter()
    summary = segment_to_files(segmenter, ct_path, out_folder / "out.seg.nrrd")
    ended = time.perf_counter()
    stages = clock.stages(ended)
    return {
        "seconds": ended - started,
        "stages": stages,
        "network_seconds": network.seconds,
        "network_calls": network.calls,
        "tumour_volume_ml": summary["tumour_volume_ml"],
        "slices": summary["slices_segmented"],
        "fast_path": summary.get("fast_path"),
        "precision": summary.get("precision"),
    }


def segment_in_child(ct_path: Path, model_path: Path, out_folder: Path, device: str = "cpu", fast: bool = True,
                     tiles: str = "training") -> dict[str, float]:  # fmt: skip
    """``cmedl segment`` in a child process (as Slicer runs it): wall seconds and the child's peak RSS in MiB.

    The peak is the child's own ``VmHWM`` (``/proc/self/status``): ``getrusage``'s ``ru_maxrss`` would carry over
    the parent's peak, which Linux keeps across the ``exec`` of a child started with ``vfork``.
    """
    wrapper = (
        "import resource, sys\n"
        "from cmedl.cpu import mark_cli_process\n"
        "mark_cli_process()\n"
        "from cmedl.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "try:\n"
        "    status = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "except (OSError, IndexError):\n"
        "    status = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print('CMEDL_MAXRSS_KIB', status, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    command = [sys.executable, "-c", wrapper, "segment", str(ct_path), "-o", str(out_folder / "child.seg.nrrd")]
    command += ["--model", str(model_path), "--device", device, "--progress", "none"]
    env = dict(os.environ, CMEDL_FAST_PATH="1" if fast else "0", CMEDL_TILES=tiles)
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"cmedl segment failed: {completed.stderr.strip().splitlines()[-1:]}")
    kib = [line.split()[1] for line in completed.stderr.splitlines() if line.startswith("CMEDL_MAXRSS_KIB")]
    return {"wall_seconds": wall, "peak_rss_mib": float(kib[-1]) / 1024.0 if kib else float("nan")}


def phantom_ct(folder: Path, size: int = VOLUME_SIZE, slices: int = VOLUME_SLICES, seed: int = 99) -> Path:
    """A phantom CT of ``size`` x ``size`` x ``slices`` written to ``folder`` (NIfTI)."""
    from cmedl.phantom import make_phantom
    from cmedl.volumes import write_volume

    case = make_phantom("ct", seed=seed, size=size, slices=slices)
    return write_volume(case.image, folder / f"phantom_{size}x{size}x{slices}.nii.gz")


def whole_ct(ct_path: Path, model_path: Path, device: str = "cpu", children: bool = True) -> dict[str, Any]:
    """Every path of :data:`PATHS` on one CT in process (stages, network) and, with ``children``, the reference
    and the fast path in a child (wall seconds, peak RSS)."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cmedl-bench-") as scratch:
        folder = Path(scratch)
        paths = PATHS + (GPU_PATHS if resolve_device(device).type == "cuda" else ())
        for name, options in paths:
            figures[name] = segment_in_process(ct_path, model_path, folder, device, **options)
        if children:  # the two paths a user runs (the slice-tile path differs from the fast one only in process)
            for name, options in PATHS[:2]:
                figures[name]["child"] = segment_in_child(
                    ct_path, model_path, folder, device, fast=options["fast"], tiles=options.get("tiles", "training")
                )
    return figures


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "avx2": "avx2" in cpu_flags(),
        "native_bf16": native_bf16_flags(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmarks(
    segmentors: list[str],
    batch_sizes: list[int],
    repeats: int = 3,
    device: str = "cpu",
    whole_volume: bool = True,
    threads: int | None = None,
    size: int = SLICE_SIZE,
    volume_slices: int = VOLUME_SLICES,
    quiet: bool = False,
) -> dict[str, Any]:
    """Measure, print (unless ``quiet``) and return the figures described in the module docstring."""
    from cmedl.catalogue import builtin_model_path

    target = resolve_device(device)
    choice = configure_threads(threads) if target.type == "cpu" else None
    say = (lambda *args, **kwargs: None) if quiet else print
    results: dict[str, Any] = {"machine": machine(target), "threads_reason": choice.reason if choice else None}
    fast_precision = choose_precision(target)
    peaks = {"fp32": matmul_peak_gflops(target, "fp32")}
    if fast_precision.name != "fp32":
        peaks[fast_precision.name] = matmul_peak_gflops(target, fast_precision.name)
    results["peak_gflops"] = peaks
    say(
        f"device {target}, torch {torch.__version__}, {torch.get_num_threads()} threads ({results['threads_reason']}); "
        f"fast path precision {fast_precision.name} ({fast_precision.reason})"
    )
    say("matmul peak: " + ", ".join(f"{name} {value:.0f} GFLOP/s" for name, value in peaks.items()))
    say(
        f"\n{'segmentor':<16} {'batch':>5} {'GFLOP':>7} {'reference ms':>13} {'of peak':>8} "
        f"{'fast ms':>9} {'of peak':>8} {'speed-up':>8} {'peak GFLOP/s':>13}"
    )
    rows = []
    for name in segmentors:
        for batch in batch_sizes:
            row = network_speed(name, target, size, repeats, batch)
            rows.append(row)
            say(
                f"{name:<16} {batch:>5} {row['gflop_per_slice']:>7.1f} {row['reference_ms']:>13.1f} "
                f"{row['reference_fraction_of_peak']:>8.0%} {row['fast_ms']:>9.1f} "
                f"{row['fast_fraction_of_peak']:>8.0%} {row['reference_ms'] / row['fast_ms']:>7.2f}x "
                f"{row['peak_gflops']:>13.0f}",
                flush=True,
            )
    results["networks"] = rows
    if whole_volume:
        with tempfile.TemporaryDirectory(prefix="cmedl-bench-ct-") as scratch:
            ct_path = phantom_ct(Path(scratch), slices=volume_slices)
            figures = whole_ct(ct_path, builtin_model_path(), device)
        results["whole_ct"] = {"ct": f"phantom {VOLUME_SIZE}x{VOLUME_SIZE}x{volume_slices}", "paths": figures}
        say(f"\nwhole CT: phantom {VOLUME_SIZE}x{VOLUME_SIZE}x{volume_slices}, built-in model")
        for line in whole_ct_lines(figures):
            say(line)
    return results


def whole_ct_lines(figures: dict[str, Any]) -> list[str]:
    """Table lines for :func:`whole_ct`'s figures."""
    lines = [
        f"  {'path':<17} {'total s':>8} {'read':>6} {'lungs':>6} {'segment':>8} {'write':>6} {'network':>8} "
        f"{'overhead':>9} {'child s':>8} {'child RSS MiB':>14}"
    ]
    for name, run in figures.items():
        stages = run["stages"]
        child = run.get("child", {})
        overhead = run["seconds"] / run["network_seconds"] if run["network_seconds"] else float("nan")
        lines.append(
            f"  {name:<17} {run['seconds']:>8.1f} {stages.get('read', 0):>6.1f} {stages.get('lungs', 0):>6.1f} "
            f"{stages.get('segment', 0):>8.1f} {stages.get('write', 0):>6.1f} {run['network_seconds']:>8.1f} "
            f"{overhead:>8.2f}x {child.get('wall_seconds', float('nan')):>8.1f} "
            f"{child.get('peak_rss_mib', float('nan')):>14.0f}"
        )
    return lines
