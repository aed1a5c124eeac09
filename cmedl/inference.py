"""The fast inference path: the network as the hardware runs it best, on the tiles the reference path uses.

What :class:`InferenceEngine` does differently from the reference path (:func:`cmedl.patches.predict_slices` on
training-size tiles with the network as trained):

* **BatchNorm folded** into the convolution before it (:func:`fold_batchnorm`): in inference BatchNorm is a
  per-channel affine map, so ``conv -> BN`` is one convolution with rescaled weights and a new bias, and a pass
  over every activation disappears. Only a BatchNorm that directly follows a convolution in an ``nn.Sequential``
  is folded (U-Net and MRRN: every ``conv3x3 -> BN -> ReLU``); FC-DenseNet's ``BN -> ReLU -> conv`` has a ReLU
  between BatchNorm and the next convolution and its BatchNorms stay.
* **channels_last** memory format for the weights and the input: oneDNN's convolutions on CPU (and cuDNN's with
  tensor cores) work in NHWC; with NCHW tensors every convolution converts its input and output.
* **Precision the hardware runs natively** (:func:`choose_precision`): bf16 autocast on a CPU with AVX512-BF16 or
  AMX (``/proc/cpuinfo`` flags), bf16 or fp16 on CUDA as :func:`cmedl.devices.autocast_dtype` decides, fp32
  elsewhere. On a CPU without those flags bf16 is emulated and several times slower than fp32.
* **Tiles of air outside the body are not run** (every pixel below :data:`OUTSIDE_BODY_HU`): their
  probabilities are background.
* **One tile per slice, on request** (``tiles="slice"``): the networks are fully convolutional, so an ROI slice
  can be padded to the network's required multiple (:func:`required_multiple`: 16 for U-Net and MRRN with four
  poolings, 32 for FC-DenseNet with five) and run whole, instead of being cut into overlapping training-size
  tiles whose overlaps are computed two to four times. Only a slice whose activations would exceed the memory
  budget (:func:`tile_pixel_limit`) is then tiled, with the largest tiles that fit. This is NOT the default:
  a network trained on small patches answers differently with a whole slice of context and no tile borders.
  With the built-in model the masks agree with the reference only to Dice 0.89-0.93 on phantoms and 0.10-0.87
  on the real CTs where it finds anything (small false-positive regions that move with the context), below the
  0.99 this path must keep; so the default (``tiles="training"``) keeps the reference's tiles and blending
  (``benchmarks/README.md`` has the figures). A model trained or validated on whole slices could use it.
* **Tiles per call from the free memory on a GPU** (``batch_size`` None, the default): as many training-size
  tiles as the activation budget allows, up to :data:`GPU_TILES_PER_CALL_CAP`; a GPU runs a few small tiles no
  faster than many. A CPU keeps :data:`CPU_TILES_PER_CALL` (its speed hardly depends on the batch).
* **Tiles prepared ahead on a GPU** (:data:`GPU_PREFETCH_DEPTH` batches, :func:`cmedl.prefetch.prefetched`):
  a background thread normalises, resizes and cuts the next slices into pinned tiles while the GPU runs the
  current ones. On a CPU the network already keeps every core busy, so the thread is not started there
  (:data:`PREFETCH_ENV` sets the depth on any device, to compare).
* **Threads** (:func:`configure_threads`): one per idle physical core, by the rule of :mod:`cmedl.cpu`; set only
  in the command-line process, never when the engine is imported as a library.

With the default tiles the two paths give the same masks (Dice 1.0) on phantoms and on every real CT of the
test data, probabilities within one step of 255 (``Testing/test_inference_speed.py`` checks a phantom and a
real CT); the reference path stays available (``Segmenter(..., fast=False)`` or ``CMEDL_FAST_PATH=0``) for that
check and for ``cmedl bench``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cmedl.cpu import ThreadChoice, inference_threads, is_cli_process, native_bf16_flags
from cmedl.devices import autocast_dtype, precision_name
from cmedl.memory import available_ram_bytes
from cmedl.patches import predict_slices
from cmedl.prefetch import prefetched

#: environment variable that turns the fast path off ("0", "false", "no", "off") for a comparison or a workaround
FAST_PATH_ENV = "CMEDL_FAST_PATH"
#: share of the free memory (RAM on CPU, GPU memory on CUDA) one network call may plan to use for activations
ACTIVATION_MEMORY_SHARE = 0.25
#: the most activation memory one network call plans for, even on a machine with much more free
ACTIVATION_MEMORY_CAP = 4 * 1024**3
#: how inference tiles a slice: as in training (the reference's tiles) or one tile per slice
TILE_MODES = ("training", "slice")
#: environment variable choosing the fast path's tile mode (one of TILE_MODES) where no caller does
TILES_ENV = "CMEDL_TILES"
#: training-size tiles per network call on a CPU when the caller leaves the batch size to the engine
CPU_TILES_PER_CALL = 4
#: the most tiles per network call on a GPU when the batch size is left to the engine (larger calls gain nothing
#: measurable and delay the first answers)
GPU_TILES_PER_CALL_CAP = 64
#: batches of tiles a background thread prepares ahead of a GPU (none on a CPU)
GPU_PREFETCH_DEPTH = 2
#: environment variable setting the prefetch depth (batches prepared ahead in a thread; 0: none) where no caller
#: does, on any device: to compare, or to measure the thread on a CPU
PREFETCH_ENV = "CMEDL_PREFETCH"
#: HU below which a whole tile is air outside the body (outside air reads about -1000 HU; lung tissue with its
#: vessels and any tumour reads well above it somewhere in a tile)
OUTSIDE_BODY_HU = -900.0


@dataclass(frozen=True)
class Precision:
    """The arithmetic the network runs in: ``dtype`` None is plain fp32; ``reason`` is one line for a summary."""

    name: str
    dtype: torch.dtype | None
    reason: str


def fast_path_enabled(environ: dict[str, str] | None = None) -> bool:
    """True unless :data:`FAST_PATH_ENV` turns the fast path off."""
    value = (os.environ if environ is None else environ).get(FAST_PATH_ENV, "").strip().lower()
    return value not in ("0", "false", "no", "off")


def tile_mode_from_env(environ: dict[str, str] | None = None) -> str:
    """The tile mode :data:`TILES_ENV` asks for (``training`` when unset or unknown)."""
    value = (os.environ if environ is None else environ).get(TILES_ENV, "").strip().lower()
    return value if value in TILE_MODES else "training"


def prefetch_depth(device: torch.device, environ: dict[str, str] | None = None) -> int:
    """Batches to prepare ahead: :data:`PREFETCH_ENV` when set to an integer from 0 to 16, else
    :data:`GPU_PREFETCH_DEPTH` on CUDA and 0 elsewhere (on a CPU the network keeps every core busy)."""
    value = (os.environ if environ is None else environ).get(PREFETCH_ENV, "").strip()
    if value.isdigit() and int(value) <= 16:
        return int(value)
    return GPU_PREFETCH_DEPTH if device.type == "cuda" else 0


def choose_precision(device: torch.device, mode: str = "auto", flags: frozenset[str] | None = None) -> Precision:
    """The precision for inference on ``device``, and why.

    ``mode`` ``auto`` takes reduced precision only where the hardware computes it natively: on CUDA what
    :func:`cmedl.devices.autocast_dtype` picks (bf16 where supported, else fp16); on a CPU bf16 when its flags
    (``flags``, default ``/proc/cpuinfo``) include ``avx512_bf16`` or ``amx_bf16``, else fp32. ``fp32``, ``bf16``
    and ``fp16`` force a precision (to measure, or to compare).
    """
    if mode not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision mode {mode!r}; use auto, fp32, bf16 or fp16")
    if mode == "fp32":
        return Precision("fp32", None, "fp32 as asked")
    if mode in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        return Precision(mode, dtype, f"{mode} autocast as asked")
    # The decision is autocast_dtype's, which training follows too; only the reason is worded here.
    dtype = autocast_dtype(device, "auto", flags)
    name = precision_name(dtype)
    if device.type == "cuda":
        return Precision(name, dtype, f"{name} autocast on CUDA ({'bf16 supported' if name == 'bf16' else 'no bf16'})")
    if device.type == "cpu":
        if dtype is not None:
            return Precision(name, dtype, f"bf16 autocast: the CPU has {' and '.join(native_bf16_flags(flags))}")
        return Precision("fp32", None, "fp32: the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)")
    return Precision("fp32", None, f"fp32 on {device.type}")


def configure_threads(explicit: int | None = None, count_busy_cores: bool = True) -> ThreadChoice:
    """Set torch's intra-op threads by the rule of :func:`cmedl.cpu.inference_threads`; returns the choice.

    ``count_busy_cores`` False leaves out the cores other processes keep busy without measuring them (a 0.2 s
    sample): for a GPU run, where the CPU threads only prepare the tiles.
    """
    choice = inference_threads(explicit, busy=None if count_busy_cores else 0)
    torch.set_num_threads(choice.count)
    return choice


def required_multiple(network: nn.Module) -> int:
    """The multiple the network's input height and width must be (``size_divisor``; 1 for a pointwise network)."""
    return max(1, int(getattr(network, "size_divisor", 1) or 1))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An equivalent copy of ``model`` for inference with every ``Conv2d -> BatchNorm2d`` pair merged.

    In evaluation BatchNorm computes ``(x - mean) / sqrt(var + eps) * gamma + beta`` per channel with its
    running statistics; applied to a convolution's output this is the convolution with weights scaled by
    ``s = gamma / sqrt(var + eps)`` per output channel and bias ``(b - mean) * s + beta``. The BatchNorm is
    replaced by ``nn.Identity``. A pair counts only when the BatchNorm directly follows the convolution inside an
    ``nn.Sequential`` (so nothing else consumes the convolution's output) and has running statistics; any other
    BatchNorm is left as it is (FC-DenseNet's ``BN -> ReLU -> conv``).

    The copy is in evaluation mode, its parameters do not require gradients, and it refuses ``train()``: the
    folded weights hold the running statistics and must not be trained or saved as the model. Its attribute
    ``folded_batchnorm`` counts the folded layers. ``model`` itself is not changed.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if _foldable(conv, norm):
                _fold_into(conv, norm)  # type: ignore[arg-type]
                module._modules[second] = nn.Identity()
                count += 1
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    folded.folded_batchnorm = count  # type: ignore[assignment]
    folded.train = _refuse_training.__get__(folded)  # type: ignore[method-assign]
    return folded


def _foldable(conv: nn.Module | None, norm: nn.Module | None) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(norm, nn.BatchNorm2d)
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm.num_features == conv.out_channels
    )


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = torch.zeros_like(scale)
    if norm.affine:
        scale, shift = scale * norm.weight, norm.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    new_bias = (bias - norm.running_mean) * scale + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def _refuse_training(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError("this network has its BatchNorm folded for inference; train the original model")
    return nn.Module.train(self, False)


def activation_bytes_per_pixel(
    network: nn.Module, device: torch.device, in_channels: int = 1, multiple: int | None = None
) -> float:
    """An upper bound of the activation memory of one forward pass, in bytes per input pixel.

    Measured once on a small probe input: the outputs of all leaf modules summed, as if none were freed (in
    fact most are released as soon as the next layer has read them, so this overestimates the live set two to
    four times, which is the safety margin). ``multiple`` is the network's required input multiple (default
    :func:`required_multiple`).
    """
    side = 4 * (multiple or required_multiple(network))
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * 4  # fp32; reduced precision only lowers it
        return None

    leaves = [module for module in network.modules() if not list(module.children())]
    handles = [module.register_forward_hook(count) for module in leaves]
    try:
        with torch.inference_mode():
            network(torch.zeros(1, in_channels, side, side, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return max(total, 4 * side * side) / float(side * side)


def activation_budget_bytes(device: torch.device) -> int:
    """Activation memory one network call may plan for: a share of the free memory, capped."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_ram_bytes() or 8 * 1024**3
    return int(min(ACTIVATION_MEMORY_CAP, ACTIVATION_MEMORY_SHARE * free))


def tile_pixel_limit(
    network: nn.Module, device: torch.device, budget_bytes: int | None = None, multiple: int | None = None
) -> int:
    """The most input pixels (all slices of one call together) whose activations fit the memory budget."""
    budget = activation_budget_bytes(device) if budget_bytes is None else budget_bytes
    return max(1, int(budget / activation_bytes_per_pixel(network, device, multiple=multiple)))


def padded_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """``(rows, columns)`` rounded up to ``multiple`` (at least one multiple)."""
    return tuple(max(multiple, -(-n // multiple) * multiple) for n in size)  # type: ignore[return-value]


@dataclass
class InferenceEngine:
    """A network ready for inference on ``device`` and the way it is run over 2D slices.

    Args:
        network: the trained network (not changed: the fast path works on a folded copy).
        device: where it runs.
        fast: the fast path (see the module docstring); False runs the reference path.
        tiles: ``training`` (the model card's patch size and overlap, as the reference) or ``slice`` (one tile per
            ROI slice; see the module docstring). The reference path always uses training-size tiles.
        precision: ``auto`` or a forced precision (see :func:`choose_precision`); the reference path uses what
            :func:`cmedl.devices.autocast_dtype` picks (mixed precision on CUDA only).
        threads: a thread count to set; None sets the rule's count in the command-line process only.
        budget_bytes: activation memory one call may use (default :func:`activation_budget_bytes`).
        prefetch: batches of tiles prepared ahead in a background thread; None: :func:`prefetch_depth`.
    """

    network: nn.Module
    device: torch.device
    fast: bool = True
    precision_mode: str = "auto"
    tiles: str = "training"
    threads: int | None = None
    budget_bytes: int | None = None
    prefetch: int | None = None
    precision: Precision = field(init=False)
    thread_choice: ThreadChoice | None = field(init=False, default=None)
    model: nn.Module = field(init=False)
    folded: int = field(init=False, default=0)
    multiple: int = field(init=False, default=1)
    tiling: str = field(init=False, default="")
    _pixel_limit: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.tiles not in TILE_MODES:
            raise ValueError(f"unknown tile mode {self.tiles!r}; use {' or '.join(TILE_MODES)}")
        if self.threads is not None or is_cli_process():
            # On a GPU the CPU threads only prepare tiles: not worth 0.2 s of sampling the other processes.
            self.thread_choice = configure_threads(self.threads, count_busy_cores=self.device.type != "cuda")
        self.multiple = required_multiple(self.network)
        if self.prefetch is None:
            self.prefetch = prefetch_depth(self.device)
        if not self.fast:
            self.model = self.network.to(self.device).eval()
            # The reference stays the network as trained: fp32 on a CPU, whatever the CPU offers.
            dtype = autocast_dtype(self.device, "auto") if self.device.type == "cuda" else None
            self.precision = Precision(precision_name(dtype), dtype, "reference path: mixed precision on CUDA only")
            return
        self.precision = choose_precision(self.device, self.precision_mode)
        model = fold_batchnorm(self.network.to(self.device))
        self.folded = int(getattr(model, "folded_batchnorm", 0))
        self.model = model.to(memory_format=torch.channels_last)

    @property
    def pixel_limit(self) -> int:
        """Input pixels one network call may take (measured on first use)."""
        if self._pixel_limit is None:
            self._pixel_limit = tile_pixel_limit(self.model, self.device, self.budget_bytes, self.multiple)
        return self._pixel_limit

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the chosen precision (a no-op for fp32)."""
        if self.precision.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def report(self) -> dict[str, Any]:
        """What the segment summary says about the path: ``{"precision": ..., "fast_path": {...}}``."""
        threads = self.thread_choice
        fast_path: dict[str, Any] = {"enabled": self.fast}
        if self.fast:
            fast_path.update(channels_last=True, batchnorm_folded=self.folded, tiles=self.tiles)
        if self.tiling:
            fast_path["tiling"] = self.tiling
        fast_path["prefetch"] = self.prefetch
        fast_path["threads"] = threads.count if threads else torch.get_num_threads()
        fast_path["threads_reason"] = threads.reason if threads else "left as the host process set them"
        return {"precision": self.precision.name, "precision_reason": self.precision.reason, "fast_path": fast_path}

    def tiles_per_call(self, batch_size: int | None, tile_pixels: int) -> int:
        """Tiles of ``tile_pixels`` pixels per network call: ``batch_size`` when given, else chosen here.

        On a GPU as many as the activation budget allows (:attr:`pixel_limit`), between
        :data:`CPU_TILES_PER_CALL` and :data:`GPU_TILES_PER_CALL_CAP`; on a CPU :data:`CPU_TILES_PER_CALL`.
        """
        if batch_size is not None:
            return batch_size
        if self.device.type != "cuda":
            return CPU_TILES_PER_CALL
        fitting = self.pixel_limit // max(1, tile_pixels)
        return int(min(GPU_TILES_PER_CALL_CAP, max(CPU_TILES_PER_CALL, fitting)))

    def predict(
        self,
        slices: Iterable[tuple[Any, np.ndarray]],
        num_classes: int,
        patch: int,
        overlap: float,
        batch_size: int | None,
        background: float = -1.0,
        outside_level: float | None = None,
    ) -> Iterator[tuple[Any, np.ndarray]]:
        """Class probabilities ``(num_classes, H, W)`` float32 for each ``(key, image)``, in input order.

        ``image`` is a normalised float32 ``(H, W)`` slice, all of one size. With training-size tiles (the
        reference path, and the fast path by default) the slices are cut into ``patch`` tiles overlapping by
        ``overlap``, ``batch_size`` tiles per call (None: :meth:`tiles_per_call` chooses). With
        ``tiles="slice"`` up to ``batch_size`` whole slices go into one call (fewer when the memory budget asks),
        or, for a slice too large for one call, tiles as large as fit. On the fast path, tiles below
        ``outside_level`` (normalised) everywhere are air outside the body and not run.
        """
        skip_below = outside_level if self.fast else None
        if not self.fast or self.tiles == "training":
            per_call = self.tiles_per_call(batch_size, patch * patch)
            self.tiling = f"{patch}-px tiles overlapping by {overlap:g}, {per_call} per call"
            yield from predict_slices(
                self.model, slices, num_classes=num_classes, patch=patch, overlap=overlap, batch_size=per_call,
                device=self.device, background=background, autocast=self.autocast, skip_below=skip_below,
                prefetch=self.prefetch or 0,
            )  # fmt: skip
            return
        iterator = iter(slices)
        first = next(iterator, None)
        if first is None:
            return
        size = tuple(first[1].shape)
        padded = padded_size(size, self.multiple)  # type: ignore[arg-type]
        pixels = padded[0] * padded[1]
        if pixels > self.pixel_limit:
            side = max(patch, int(math.isqrt(self.pixel_limit)) // self.multiple * self.multiple)
            self.tiling = f"{side}-px tiles (a {size[0]}x{size[1]} slice exceeds the memory budget)"
            yield from predict_slices(
                self.model, _chain(first, iterator), num_classes=num_classes, patch=side, overlap=overlap,
                batch_size=1, device=self.device, background=background, autocast=self.autocast,
                skip_below=skip_below, prefetch=self.prefetch or 0,
            )  # fmt: skip
            return
        per_call = max(1, min(self.tiles_per_call(batch_size, pixels), self.pixel_limit // pixels))
        self.tiling = f"one {padded[0]}x{padded[1]} tile per slice, {per_call} per call"
        top, left = (padded[0] - size[0]) // 2, (padded[1] - size[1]) // 2
        window = (slice(top, top + size[0]), slice(left, left + size[1]))
        pin = bool(self.prefetch) and self.device.type == "cuda"

        def stacks() -> Iterator[tuple[list[Any], torch.Tensor]]:
            keys: list[Any] = []
            images: list[np.ndarray] = []
            for key, image in _chain(first, iterator):
                if image.shape != size:
                    raise ValueError(f"all slices must have one size; got {image.shape} after {size}")
                keys.append(key)
                images.append(image)
                if len(keys) == per_call:
                    yield keys, _padded_stack(images, padded, window, background, pin)
                    keys, images = [], []
            if keys:
                yield keys, _padded_stack(images, padded, window, background, pin)

        for keys, stack in prefetched(stacks(), depth=self.prefetch or 0):
            probabilities = self._forward(stack)[:, :, window[0], window[1]]
            yield from zip(keys, probabilities.numpy())

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32, on the CPU) of a ``(B, C, H, W)`` batch."""
        inputs = inputs.to(self.device, non_blocking=inputs.is_pinned())
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            logits = self.model(inputs)
        return torch.softmax(logits.float(), dim=1).cpu()


def _padded_stack(
    images: list[np.ndarray], padded: tuple[int, int], window: tuple[slice, slice], background: float, pin: bool
) -> torch.Tensor:
    """``(len(images), 1, *padded)`` float32: each image in the ``window`` of its plane, ``background`` around."""
    stack = np.full((len(images), 1, *padded), background, dtype=np.float32)
    for index, image in enumerate(images):
        stack[index, 0][window] = image
    tensor = torch.from_numpy(stack)
    return tensor.pin_memory() if pin else tensor


def _chain(first: tuple[Any, np.ndarray], rest: Iterator[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray]]:
    yield first
    yield from rest


def flops_per_forward(network: nn.Module, size: tuple[int, int], in_channels: int = 1) -> int:
    """Floating-point operations (multiply and add counted apart) of one forward pass at ``size`` (rows, columns).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`: convolutions, transposed convolutions and
    matrix products; BatchNorm, activations, pooling and interpolation are memory-bound and not counted (they
    are what folding and channels_last save).
    """
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(torch.zeros(1, in_channels, *size, device=device))
    return int(counter.get_total_flops())


__all__ = [
    "CPU_TILES_PER_CALL",
    "FAST_PATH_ENV",
    "GPU_PREFETCH_DEPTH",
    "GPU_TILES_PER_CALL_CAP",
    "InferenceEngine",
    "OUTSIDE_BODY_HU",
    "PREFETCH_ENV",
    "TILES_ENV",
    "TILE_MODES",
    "Precision",
    "activation_bytes_per_pixel",
    "choose_precision",
    "configure_threads",
    "fast_path_enabled",
    "flops_per_forward",
    "fold_batchnorm",
    "padded_size",
    "prefetch_depth",
    "required_multiple",
    "tile_mode_from_env",
    "tile_pixel_limit",
]
