"""Time per training iteration: CMEDL against CT only, at each mixed-precision mode and memory format.

One iteration is one call of the method's ``Objective.step`` on one batch: for CT only, a forward and backward
pass of the student; for CMEDL, the generator, discriminator and segmentor updates of section III.A.3 (two
generators, two discriminators, the teacher and the student). Batches are random tensors already in memory, so
the figures are compute only; a real run also spends time drawing and augmenting patches, validating and writing
checkpoints.

The baseline is CT only in full fp32 on the same device, measured in the same process; every row gives its time
relative to it. ``--memory-formats contiguous,channels_last`` also times every configuration with the networks'
weights and the batches in channels_last (NHWC), the layout inference uses (:mod:`cmedl.inference`): whether
training gains from it too. On CUDA each timed block is closed by ``torch.cuda.synchronize()`` and the peak
GPU memory of each configuration is reported.

Usage::

    python benchmarks/train_step_time.py                      # paper sizes on the GPU, small sizes on a CPU
    python benchmarks/train_step_time.py --preset small --device cpu --steps 5
    python benchmarks/train_step_time.py --json OUT.json      # also write the figures as JSON
    python benchmarks/train_step_time.py --device cpu --preset paper --methods ct_only --memory-formats \
        contiguous,channels_last --threads 2 --steps 3 --warmup 1   # the layout question on a CPU
    python benchmarks/train_step_time.py --methods cmedl --amp bf16 --compile --warmup 5   # eager against compiled
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

from cmedl import __version__
from cmedl.devices import resolve_device
from cmedl.training.config import TrainConfig
from cmedl.training.objectives import build_objective

# "paper": U-Net 64, ResNet generator 64 with 9 blocks, 256x256 patches, batch 2, contextual loss on all
# 65x65 = 4225 positions of the VGG16 Conv7-9 maps (method_notes.md). "small": the CPU benchmark's sizes.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"patch": 256, "batch": 2, "base_channels": 64, "translator_channels": 64, "translator_blocks": 9,
              "cx_positions": 4225},
    "small": {"patch": 64, "batch": 2, "base_channels": 8, "translator_channels": 8, "translator_blocks": 2,
              "cx_positions": 256},
    "medium": {"patch": 128, "batch": 4, "base_channels": 16, "translator_channels": 16, "translator_blocks": 3,
               "cx_positions": 256},
}  # fmt: skip

AMP_MODES = ("off", "bf16", "fp16")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="sizes (default: paper on CUDA, small on CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--segmentor", default="unet", choices=("unet", "densefcn", "mrrn"))
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (cuDNN autotuning, pools)")
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per configuration")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--methods", default="ct_only,cmedl", help="comma-separated: ct_only, cmedl")
    parser.add_argument("--memory-formats", default="contiguous",
                        help="comma-separated: contiguous (NCHW, what training uses), channels_last")  # fmt: skip
    parser.add_argument("--amp", help="comma-separated autocast modes to time (default: all the device offers)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every configuration with its networks compiled (torch.compile)")  # fmt: skip
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def config_for(method: str, preset: dict[str, Any], args: argparse.Namespace, device: torch.device) -> TrainConfig:
    values: dict[str, Any] = {
        "method": method,
        "ct": "ct",
        "mr": "mr",
        "out": "run",
        "segmentor": args.segmentor,
        "segmentor_options": {"base_channels": preset["base_channels"]},
        "patch_size": preset["patch"],
        "batch_size": preset["batch"],
        "device": device.type,
    }
    if method == "cmedl":
        translator = {"base_channels": preset["translator_channels"], "n_blocks": preset["translator_blocks"]}
        values.update(
            translator_options=translator,
            vgg_weights="random",  # timing only: the weights' values do not change the cost
            cx_max_positions=preset["cx_positions"],
        )
    return TrainConfig.from_dict(values).validate()


def random_batch(preset: dict[str, Any], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """An unpaired batch like the loader's: CT patches with labels, MRI patches with labels, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    shape = (preset["batch"], 1, preset["patch"], preset["patch"])
    labels = (torch.rand(shape[0], *shape[2:], generator=generator) > 0.9).long()
    labelled = torch.ones(shape[0], dtype=torch.bool)
    return {
        "ct": (torch.rand(shape, generator=generator) * 2 - 1, labels, labelled),
        "mr": (torch.rand(shape, generator=generator) * 2 - 1, labels.flip(1), labelled),
    }


def in_memory_format(batch: dict[str, tuple[torch.Tensor, ...]], layout: torch.memory_format) -> dict[str, tuple]:
    """``batch`` with its 4D image tensors laid out in ``layout`` (labels and flags as they are)."""
    return {
        domain: tuple(t.contiguous(memory_format=layout) if t.dim() == 4 else t for t in tensors)
        for domain, tensors in batch.items()
    }


def time_configuration(method: str, amp: str, preset: dict[str, Any], args: argparse.Namespace,
                       device: torch.device, memory_format: str = "contiguous",
                       compiled: bool = False) -> dict[str, Any]:  # fmt: skip
    """Seconds per iteration (median and spread over ``args.steps``) and peak GPU memory of one configuration;
    ``compiled``: every network of the objective compiled in place (``nn.Module.compile``) first, the compilation
    paid in the warm-up iterations (their seconds are reported as ``warmup_s``)."""
    torch.manual_seed(0)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    objective = build_objective(config_for(method, preset, args, device), device, amp_dtype)
    layout = MEMORY_FORMATS[memory_format]
    for network in objective.networks.values():
        # In place: the optimisers keep the same parameter objects, now in the new layout.
        network.to(memory_format=layout)
        if compiled:
            network.compile()
    objective.train()
    batches = [in_memory_format(random_batch(preset, seed), layout) for seed in range(4)]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    warmup_started = time.perf_counter()
    for index in range(args.warmup):
        objective.step(batches[index % len(batches)])
    synchronize()
    warmup_seconds = time.perf_counter() - warmup_started
    seconds = []
    for index in range(args.steps):
        start = time.perf_counter()
        losses = objective.step(batches[index % len(batches)])
        synchronize()
        seconds.append(time.perf_counter() - start)
    row = {
        "method": method,
        "amp": amp,
        "memory_format": memory_format,
        "compiled": compiled,
        "warmup_s": warmup_seconds,
        "s_per_iteration": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "finite_losses": all(torch.isfinite(torch.tensor(v)).item() for v in losses.values()),
    }
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del objective
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset_name = args.preset or ("paper" if device.type == "cuda" else "small")
    preset = PRESETS[preset_name]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        modes = [m for m in AMP_MODES if m != "bf16" or torch.cuda.is_bf16_supported()]
        device_name = torch.cuda.get_device_name(device)
    else:
        modes = ["off"]  # the engine uses mixed precision on CUDA only
        device_name = platform.processor() or platform.machine()
    print(f"cmedl {__version__}, torch {torch.__version__}, {device_name}, {torch.get_num_threads()} CPU threads")
    print(f"preset {preset_name}: {json.dumps(preset)}, segmentor {args.segmentor}, "
          f"{args.warmup} warm-up + {args.steps} timed iterations")  # fmt: skip
    methods = [name for name in args.methods.split(",") if name]
    layouts = [name for name in args.memory_formats.split(",") if name]
    unknown = [name for name in layouts if name not in MEMORY_FORMATS] + [
        name for name in methods if name not in ("ct_only", "cmedl")
    ]
    if unknown:
        raise SystemExit(f"unknown method or memory format: {', '.join(unknown)}")
    if args.amp:
        modes = [mode for mode in modes if mode in args.amp.split(",")]
    rows = []
    for method in methods:
        for amp in modes:
            for layout in layouts:
                for compiled in (False, True) if args.compile else (False,):
                    row = time_configuration(method, amp, preset, args, device, layout, compiled)
                    rows.append(row)
                    how = " compiled" if compiled else ""
                    print(f"  measured {method} amp={amp} {layout}{how}: {row['s_per_iteration']:.4f} s "
                          f"(warm-up {row['warmup_s']:.1f} s)", flush=True)  # fmt: skip
    baseline = rows[0]["s_per_iteration"]
    print()
    print(f"{'method':<8} {'amp':<5} {'layout':<13} {'compiled':<8} {'s/iteration':>12} {'min':>8} {'max':>8} "
          f"{'x first row':>12} {'peak MiB':>9}")  # fmt: skip
    for row in rows:
        peak = f"{row['peak_gpu_mib']:9.0f}" if "peak_gpu_mib" in row else f"{'-':>9}"
        flag = "" if row["finite_losses"] else "  NON-FINITE LOSS"
        ratio = row["s_per_iteration"] / baseline
        print(f"{row['method']:<8} {row['amp']:<5} {row['memory_format']:<13} {str(row['compiled']):<8} "
              f"{row['s_per_iteration']:12.4f} "
              f"{row['min_s']:8.4f} {row['max_s']:8.4f} {ratio:12.2f} {peak}{flag}")  # fmt: skip
    if args.json:
        record = {"engine_version": __version__, "torch": torch.__version__, "device": device_name,
                  "preset": preset_name, "sizes": preset, "segmentor": args.segmentor, "warmup": args.warmup,
                  "steps": args.steps, "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
