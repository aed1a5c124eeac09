"""What preparing tiles ahead in a thread buys, measured on this machine's CPU.

On a GPU the CPU waits while the network runs; the prefetch thread (``cmedl.prefetch``) fills that wait with
the next slices' preparation. This script measures the segment stage of a whole phantom CT (built-in model's
card, 512 x 512 x ``--slices``) with prefetch depth 0 and 2, alternately, in two settings:

* ``gpu_stand_in``: the network replaced by a stand-in that sleeps ``--tile-ms`` per tile and answers
  "background". Sleeping releases the CPU and the GIL as a GPU wait does, so this is the GPU pipeline's CPU side
  with the GPU's time (default 1.0 ms per 128-px tile: the H200's 0.25 s for 238 tiles in
  ``results/cmedl_bench_h200.json``). It shows how much of the wait the thread fills, not a GPU's figures.
* ``cpu_network``: the real built-in network on the CPU, where it keeps every core busy: the setting in which
  the engine leaves the thread off.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/prefetch_overlap.py [--slices 150] [--rounds 3] [--json F]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmedl.bench import _StageClock, phantom_ct
from cmedl.catalogue import builtin_model_path
from cmedl.modelfile import LoadedModel, load_model
from cmedl.segment import Segmenter, SegmentOptions
from cmedl.volumes import read_volume


class SleepingNetwork(torch.nn.Module):
    """Answers background for every pixel after sleeping ``tile_ms`` per tile: a GPU's wait, without a GPU."""

    def __init__(self, tile_ms: float) -> None:
        super().__init__()
        self.tile_seconds = tile_ms / 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.tile_seconds * x.shape[0])
        logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
        logits[:, 0] = 10.0
        return logits


def segment_stage_seconds(model: LoadedModel, ct, prefetch: int) -> float:
    clock = _StageClock()
    segmenter = Segmenter(model, SegmentOptions(device="cpu"), clock, prefetch=prefetch)
    segmenter.segment(ct)
    return clock.stages(time.perf_counter())["segment"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tile-ms", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    real = load_model(builtin_model_path())
    settings = {
        "gpu_stand_in": LoadedModel(SleepingNetwork(args.tile_ms), real.card, real.path, real.sha256),
        "cpu_network": real,
    }
    results: dict = {"threads": torch.get_num_threads(), "tile_ms": args.tile_ms, "slices": args.slices}
    with tempfile.TemporaryDirectory() as scratch:
        ct = read_volume(phantom_ct(Path(scratch), slices=args.slices))
    for name, model in settings.items():
        times: dict[int, list[float]] = {0: [], 2: []}
        for _ in range(args.rounds):
            for depth in times:
                times[depth].append(segment_stage_seconds(model, ct, depth))
        median = {depth: statistics.median(values) for depth, values in times.items()}
        results[name] = {"segment_seconds": times, "median": median, "speed_up": median[0] / median[2]}
        print(
            f"{name:<13} segment stage, median of {args.rounds}: no prefetch {median[0]:.2f} s, "
            f"prefetch 2 {median[2]:.2f} s ({median[0] / median[2]:.2f}x)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
