"""Square 2D patches: cropping with padding (training) and tiling with blended overlaps (inference).

The networks see 256x256 patches. At inference a slice region of any size is covered by overlapping
tiles; each tile's class probabilities are weighted by a window that is largest at the tile centre (the
network sees most context there) and the weighted sum is divided by the summed weights.
Arrays are numpy ``(..., H, W)``; positions are ``(row, column)`` pixel indices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmedl.prefetch import prefetched


def tile_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``patch`` covering ``[0, length)`` with at least ``overlap`` (fraction).

    When ``length <= patch`` a single tile at 0 is returned (the caller pads). The last tile ends exactly
    at ``length``; the others are spread evenly so every overlap is at least the requested one.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= patch:
        return [0]
    stride = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((length - patch) / stride) + 1
    last = length - patch
    return [round(i * last / (count - 1)) for i in range(count)]


def tile_grid(height: int, width: int, patch: int, overlap: float) -> list[tuple[int, int]]:
    """Top-left corners ``(row, column)`` of the tiles covering an ``height x width`` region."""
    return [(row, col) for row in tile_starts(height, patch, overlap) for col in tile_starts(width, patch, overlap)]


def blending_window(patch: int, floor: float = 1e-3) -> np.ndarray:
    """A ``(patch, patch)`` float32 weight window: a separable Gaussian (sigma = patch/8) peaking at 1.

    The ``floor`` keeps border pixels that only one tile covers from being divided by ~0.
    """
    coords = np.arange(patch, dtype=np.float64) - (patch - 1) / 2.0
    sigma = patch / 8.0
    profile = np.exp(-0.5 * (coords / sigma) ** 2)
    window = np.outer(profile, profile)
    window /= window.max()
    return np.maximum(window, floor).astype(np.float32)


def pad_to_at_least(array: np.ndarray, size: int, fill: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the last two axes of ``array`` at the bottom/right up to ``size``.

    Returns the padded array and the original ``(H, W)``.
    """
    height, width = array.shape[-2:]
    pad_rows, pad_cols = max(0, size - height), max(0, size - width)
    if pad_rows == 0 and pad_cols == 0:
        return array, (height, width)
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_rows), (0, pad_cols)]
    return np.pad(array, widths, mode="constant", constant_values=fill), (height, width)


def crop_centered(array: np.ndarray, center: tuple[int, int], size: int, fill: float) -> np.ndarray:
    """The ``size x size`` window of the last two axes of ``array`` centred on ``center`` (row, column).

    Parts of the window outside the array are filled with ``fill``; ``array`` may be ``(H, W)`` or ``(C, H, W)``.
    """
    height, width = array.shape[-2:]
    top, left = int(center[0]) - size // 2, int(center[1]) - size // 2
    out = np.full(array.shape[:-2] + (size, size), fill, dtype=array.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + size, height), min(left + size, width)
    if src_bottom > src_top and src_right > src_left:
        out[..., src_top - top : src_bottom - top, src_left - left : src_right - left] = array[
            ..., src_top:src_bottom, src_left:src_right
        ]
    return out


@dataclass
class SliceBlender:
    """Accumulates blended tile probabilities for a stack of equally sized slices, one slice at a time.

    Tiles may arrive in any order; a slice is finished (and its memory freed) as soon as all of its
    tiles have arrived, so at most the slices of the batches in flight are held in memory.

    Args:
        height, width: size of each (padded) slice region.
        num_classes: number of probability channels per tile.
        patch: tile side in pixels.
        overlap: tile overlap fraction (as for :func:`tile_grid`).
    """

    height: int
    width: int
    num_classes: int
    patch: int
    overlap: float
    window: np.ndarray = field(init=False)
    tiles: list[tuple[int, int]] = field(init=False)
    _sums: dict[int, np.ndarray] = field(init=False, default_factory=dict)
    _counts: dict[int, int] = field(init=False, default_factory=dict)
    _weights: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.window = blending_window(self.patch)
        self.tiles = tile_grid(self.height, self.width, self.patch, self.overlap)
        weights = np.zeros((self.height, self.width), dtype=np.float32)
        for row, col in self.tiles:
            weights[row : row + self.patch, col : col + self.patch] += self.window
        # Every slice is tiled the same way, so one weight map serves them all.
        self._weights = weights

    def add(self, slice_index: int, tile: tuple[int, int], probabilities: np.ndarray) -> np.ndarray | None:
        """Add one tile's ``(num_classes, patch, patch)`` probabilities; returns the slice's blended
        ``(num_classes, height, width)`` probabilities once its last tile has arrived, else None."""
        row, col = tile
        total = self._sums.get(slice_index)
        if total is None:
            total = np.zeros((self.num_classes, self.height, self.width), dtype=np.float32)
            self._sums[slice_index] = total
            self._counts[slice_index] = 0
        total[:, row : row + self.patch, col : col + self.patch] += probabilities * self.window
        self._counts[slice_index] += 1
        if self._counts[slice_index] < len(self.tiles):
            return None
        del self._sums[slice_index], self._counts[slice_index]
        return total / self._weights

    @property
    def slices_in_flight(self) -> int:
        return len(self._sums)


@dataclass
class TileBatch:
    """One network call's worth of tiles, cut on the CPU.

    Attributes:
        size: ``(H, W)`` of every slice (before padding to the tile size).
        entries: ``(key, (row, column), run)`` for each tile in order; ``run`` False marks a tile of air outside
            the body that is not sent to the network.
        inputs: ``(n, 1, patch, patch)`` float32 of the tiles to run (``n`` = entries with ``run``), or None
            when none is; in pinned (page-locked) memory when asked, so that the copy to a GPU is asynchronous.
    """

    size: tuple[int, int]
    entries: list[tuple[Any, tuple[int, int], bool]]
    inputs: torch.Tensor | None


def tile_batches(
    slices: Iterable[tuple[Any, np.ndarray]],
    patch: int,
    overlap: float = 0.25,
    batch_size: int = 4,
    background: float = -1.0,
    skip_below: float | None = None,
    pin_memory: bool = False,
) -> Iterator[TileBatch]:
    """Cut 2D slices into the overlapping tiles of :func:`tile_grid`, ``batch_size`` tiles to a batch.

    The CPU half of :func:`predict_slices`, apart so that it can run ahead in a thread. Every ``image`` is a
    float32 ``(H, W)`` array of one size; a slice smaller than ``patch`` is padded with ``background``. With
    ``skip_below``, a tile whose every pixel is below it is marked not to run.
    """
    size: tuple[int, int] | None = None
    tiles: list[tuple[int, int]] = []
    entries: list[tuple[Any, tuple[int, int], bool]] = []
    pixels: list[np.ndarray] = []

    def batch() -> TileBatch:
        inputs = None
        if pixels:
            inputs = torch.from_numpy(np.stack(pixels)[:, None])
            if pin_memory:
                inputs = inputs.pin_memory()
        return TileBatch(size, entries, inputs)  # type: ignore[arg-type]

    for key, image in slices:
        if size is None:
            size = tuple(image.shape)  # type: ignore[assignment]
            tiles = tile_grid(max(size[0], patch), max(size[1], patch), patch, overlap)  # type: ignore[index]
        elif image.shape != size:
            raise ValueError(f"all slices must have one size; got {image.shape} after {size}")
        padded, _ = pad_to_at_least(np.asarray(image, dtype=np.float32), patch, background)
        for row, col in tiles:
            tile = padded[row : row + patch, col : col + patch]
            run = skip_below is None or bool(tile.max() >= skip_below)
            entries.append((key, (row, col), run))
            if run:
                pixels.append(tile)
            if len(entries) == batch_size:
                yield batch()
                entries, pixels = [], []
    if entries:
        yield batch()


def predict_slices(
    network: torch.nn.Module,
    slices: Iterable[tuple[Any, np.ndarray]],
    num_classes: int,
    patch: int,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    background: float = -1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    skip_below: float | None = None,
    prefetch: int = 0,
) -> Iterator[tuple[Any, np.ndarray]]:
    """Run ``network`` tile by tile over 2D slices and yield ``(key, probabilities)`` per slice.

    Args:
        slices: ``(key, image)`` pairs; every ``image`` is a normalised float32 ``(H, W)`` array of the same size.
            Slices smaller than ``patch`` are padded with ``background``.
        num_classes: channels of the network's logits.
        patch: tile side in pixels.
        skip_below: when given, a tile whose every pixel is below it (air outside the body) is not run: its
            probabilities are class 0 (background) everywhere.
        prefetch: batches prepared ahead in a background thread (:func:`cmedl.prefetch.prefetched`): the
            iteration of ``slices`` and the tile cutting then overlap the network calls. 0 does everything in
            the calling thread. On a CUDA device the prepared tiles are also pinned, so their copy is
            asynchronous.

    Yields:
        ``(key, probabilities)`` in input order, probabilities being float32 ``(num_classes, H, W)`` softmax
        values blended over the overlapping tiles. Only the slices whose tiles are in the current batch (and the
        ``prefetch`` batches ahead) are held in memory.
    """
    device = torch.device(device)
    autocast = autocast or contextlib.nullcontext
    blender: SliceBlender | None = None
    outside = np.zeros((num_classes, patch, patch), dtype=np.float32)
    outside[0] = 1.0
    pin = prefetch > 0 and device.type == "cuda"
    batches = tile_batches(slices, patch, overlap, batch_size, background, skip_below, pin_memory=pin)
    for batch in prefetched(batches, depth=prefetch):
        if blender is None:
            rows, cols = batch.size
            blender = SliceBlender(max(rows, patch), max(cols, patch), num_classes, patch, overlap)
        computed: Iterator[np.ndarray] = iter(())
        if batch.inputs is not None:
            inputs = batch.inputs.to(device, non_blocking=pin)
            with torch.inference_mode(), autocast():
                logits = network(inputs)
            computed = iter(torch.softmax(logits.float(), dim=1).cpu().numpy())
        # Skipped tiles stay in the batch, so that the slices still finish in input order.
        for key, tile, run in batch.entries:
            blended = blender.add(key, tile, next(computed) if run else outside)
            if blended is not None:
                yield key, blended[:, : batch.size[0], : batch.size[1]]


def resize_slices(stack: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize every slice of a ``(N, H, W)`` (or ``(N, C, H, W)``) stack to ``size`` = (rows, columns).

    Pixel centres are mapped with ``align_corners=False`` semantics: the resized slice covers exactly the
    same field of view, so resizing there and back puts every pixel where it was. ``mode`` is ``bilinear``
    for images and probabilities, ``nearest`` for labels.
    """
    if tuple(stack.shape[-2:]) == tuple(size):
        return stack
    tensor = torch.from_numpy(np.ascontiguousarray(stack))
    squeeze = tensor.dim() == 3
    if squeeze:
        tensor = tensor[:, None]
    original_dtype = tensor.dtype
    if mode == "nearest":
        resized = F.interpolate(tensor.float(), size=tuple(size), mode="nearest-exact")
    else:
        resized = F.interpolate(tensor.float(), size=tuple(size), mode=mode, align_corners=False)
    resized = resized.to(original_dtype)
    return (resized[:, 0] if squeeze else resized).numpy()
