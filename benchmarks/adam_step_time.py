"""Milliseconds per Adam step over a segmentor's parameters: torch's per-tensor loop, its foreach and fused forms.

Training on a CPU uses the fused form (``cmedl.training.objectives.Objective.adam``); the per-tensor loop, what
torch picks on a CPU by default, is the baseline, measured in the same process on the same gradients.

Usage::

    python benchmarks/adam_step_time.py [--threads 1] [--steps 50] [--base-channels 8,16,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from cmedl.nets import build_segmentor

FORMS = {"per-tensor (CPU default)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_ms(base_channels: int, settings: dict, steps: int) -> float:
    """Median milliseconds of one ``step()`` of Adam over a U-Net of ``base_channels`` with random gradients."""
    network = build_segmentor("unet", 1, 2, base_channels=base_channels)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4, weight_decay=1e-4, **settings)
    generator = torch.Generator().manual_seed(0)
    for parameter in network.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    for _ in range(3):  # the moment buffers are created at the first step
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--base-channels", default="8,16,64", help="U-Net widths, comma-separated")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps")
    print(f"{'U-Net base':>10} {'parameters':>11} " + " ".join(f"{name:>26}" for name in FORMS))
    for base in (int(value) for value in args.base_channels.split(",")):
        count = sum(p.numel() for p in build_segmentor("unet", 1, 2, base_channels=base).parameters())
        baseline = None
        cells = []
        for settings in FORMS.values():
            ms = step_ms(base, settings, args.steps)
            baseline = baseline or ms
            cells.append(f"{ms:9.2f} ms ({baseline / ms:4.1f}x)")
        print(f"{base:>10} {count:>11,} " + " ".join(f"{cell:>26}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
