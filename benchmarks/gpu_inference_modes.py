"""Would torch.compile or CUDA graphs make GPU inference faster? Milliseconds per 256 px slice, per mode.

Modes, all on the inference fast path's network (BatchNorm folded, channels_last) with bf16 autocast:

- ``eager``: the network as ``cmedl segment`` runs it today;
- ``cuda_graph``: the same forward pass captured once into a CUDA graph and replayed (static input buffer), which
  removes the per-kernel launch cost that dominates small batches;
- ``compiled``: ``torch.compile`` (default mode: fused kernels, no graphs); its compile time is reported apart.

Each mode is timed alternately with the others (best of ``--repeats`` rounds of ``--calls`` calls), so a busy GPU
slows them alike. Figures are appended to ``--json`` after every measurement, so a run stopped by its time limit
still leaves what it measured. Random weights: speed does not depend on them.

Usage: python benchmarks/gpu_inference_modes.py --json OUT.json [--segmentors unet,builtin] [--batch-sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cmedl.inference import fold_batchnorm
from cmedl.nets import build_segmentor

SEGMENTORS = {"unet": ("unet", {}), "builtin": ("unet", {"base_channels": 16})}


def timed(call: Callable[[], Any], calls: int) -> float:
    """Seconds per call, averaged over ``calls`` back-to-back calls (the GPU is synchronised at both ends)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def graph_call(network: torch.nn.Module, static_input: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A replay function for ``network`` on ``static_input``, captured after warm-up on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            network(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), torch.cuda.graph(graph):
        static_output = network(static_input)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_output

    return replay


def measure(segmentor: str, batch_size: int, repeats: int, calls: int) -> dict[str, Any]:
    name, options = SEGMENTORS[segmentor]
    network = fold_batchnorm(build_segmentor(name, **options).cuda().eval()).to(memory_format=torch.channels_last)
    inputs = torch.randn(batch_size, 1, 256, 256, device="cuda").contiguous(memory_format=torch.channels_last)

    def eager() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return network(inputs)

    modes: dict[str, Callable[[], Any]] = {"eager": eager, "cuda_graph": graph_call(network, inputs)}
    result: dict[str, Any] = {"segmentor": segmentor, "batch_size": batch_size}
    compiled_network = torch.compile(network)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        compiled_network(inputs)
    torch.cuda.synchronize()
    result["compile_s"] = time.perf_counter() - start

    def compiled() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return compiled_network(inputs)

    modes["compiled"] = compiled
    best = {mode: float("inf") for mode in modes}
    for _ in range(repeats):
        for mode, call in modes.items():
            call()  # warm
            best[mode] = min(best[mode], timed(call, calls))
    for mode, seconds in best.items():
        result[f"{mode}_ms_per_slice"] = seconds * 1000.0 / batch_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--segmentors", default="builtin,unet")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_inference_modes: needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    figures: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for segmentor in args.segmentors.split(","):
        for batch_size in (int(value) for value in args.batch_sizes.split(",")):
            row = measure(segmentor, batch_size, args.repeats, args.calls)
            figures["rows"].append(row)
            args.json.write_text(json.dumps(figures, indent=1))
            print(" ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in row.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
