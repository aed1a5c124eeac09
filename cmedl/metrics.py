"""Overlap and surface metrics of a binary segmentation against its ground truth: Dice, surface Dice, HD95.

References, one per metric:

- **Dice** = 2|P ∩ T| / (|P| + |T|), counted in voxels (the volumetric Dice of DeepMind ``surface-distance`` and
  nnU-Net).
- **Surface Dice at a tolerance** and **robust Hausdorff (HD95)** follow the semantics of DeepMind's
  ``surface-distance`` package (``compute_surface_distances``, ``compute_surface_dice_at_tolerance``,
  ``compute_robust_hausdorff``; Nikolov et al. 2018):

  * the surface is made of surface elements ("surfels") located at voxel *corners*: every 2x2 (2D) or 2x2x2 (3D)
    block of voxels whose members are neither all inside nor all outside the mask holds one surfel;
  * each surfel carries the length (2D, mm) or area (3D, mm²) of the marching-squares / marching-cubes surface
    that crosses its block, with the spacing applied, so anisotropic grids are weighted correctly;
  * distances from the surfels of one mask to the surfels of the other are Euclidean, in mm
    (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``);
  * HD95 is, for each direction, the area-weighted 95th percentile of the distances (the first sorted distance
    whose normalised cumulative area reaches 0.95, no interpolation), and then the larger of the two directions;
  * surface Dice = (truth area within tolerance of the prediction + prediction area within tolerance of the truth)
    / (total truth area + total prediction area), with "within" meaning distance <= tolerance.

  The surfel sizes are computed here rather than tabulated: 2D lengths from scikit-image's marching squares,
  3D areas from scikit-image's marching cubes with the classic Lorensen case table, applied to whichever of a
  block and its complement has fewer inside corners. That last rule gives a block and its complement the same
  area and separates diagonal corners on an ambiguous face, which is how DeepMind's table resolves those cases.

Empty masks (P = prediction, T = truth):

============  ======  ============  ======
case          Dice    surface Dice  HD95
============  ======  ============  ======
one empty     0.0     0.0           inf
both empty    NaN     NaN           NaN
============  ======  ============  ======

For both masks empty DeepMind returns HD95 = inf; here it is NaN (as in MONAI) because nothing is wrong with
such a case, it is only undefined, and NaN drops out of ``np.nanmean`` just like the NaN Dice does.

Masks are numpy arrays of the same 2D or 3D shape; any nonzero value counts as foreground. ``spacing_mm`` is
given in *array axis order*: for an array from ``SimpleITK.GetArrayFromImage`` (order z, y, x) that is
``image.GetSpacing()[::-1]``.

The surface-Dice tolerance of the CMEDL paper is not known; :func:`segmentation_metrics` uses
:data:`DEFAULT_TOLERANCE_MM` = 1 mm as this project's choice and records it with the results.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure

from cmedl.errors import InputError

DEFAULT_TOLERANCE_MM = 1.0
"""Surface-Dice tolerance used by :func:`segmentation_metrics` (this project's choice, not the paper's)."""


@dataclass(frozen=True)
class SurfaceDistances:
    """Distances between the surfels of two masks, each direction sorted by increasing distance.

    ``truth_to_prediction_mm`` (N_t,) are the distances in mm from each truth surfel to the nearest prediction
    surfel and ``truth_areas`` (N_t,) the areas of those truth surfels (mm² in 3D, mm of contour in 2D);
    ``prediction_to_truth_mm`` (N_p,) and ``prediction_areas`` (N_p,) the same the other way round. A mask
    without surface (empty) has N = 0; the distances *to* an empty mask are ``inf``.
    """

    truth_to_prediction_mm: np.ndarray
    truth_areas: np.ndarray
    prediction_to_truth_mm: np.ndarray
    prediction_areas: np.ndarray

    def surface_dice(self, tolerance_mm: float) -> float:
        """Fraction of the combined surface area lying within ``tolerance_mm`` of the other surface."""
        # NaN fails every comparison (surface Dice 0) and inf passes them all (surface Dice 1): both are refused.
        if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
            raise InputError(f"surface Dice tolerance must be a finite number >= 0 mm, got {tolerance_mm}")
        total = self.truth_areas.sum() + self.prediction_areas.sum()
        if total == 0:
            return float("nan")
        within = (
            self.truth_areas[self.truth_to_prediction_mm <= tolerance_mm].sum()
            + self.prediction_areas[self.prediction_to_truth_mm <= tolerance_mm].sum()
        )
        return float(within / total)

    def robust_hausdorff(self, percent: float = 95.0) -> float:
        """The larger of the two directional area-weighted ``percent``-th percentile distances, in mm."""
        if not 0.0 <= percent <= 100.0:
            raise InputError(f"Hausdorff percentile must lie in [0, 100], got {percent}")
        truth_empty = self.truth_areas.size == 0
        prediction_empty = self.prediction_areas.size == 0
        if truth_empty and prediction_empty:
            return float("nan")
        if truth_empty or prediction_empty:
            return float("inf")
        return max(
            _area_weighted_percentile(self.truth_to_prediction_mm, self.truth_areas, percent),
            _area_weighted_percentile(self.prediction_to_truth_mm, self.prediction_areas, percent),
        )


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Volumetric Dice 2|P ∩ T| / (|P| + |T|) of two masks of equal shape; NaN when both are empty."""
    prediction_mask, truth_mask = _as_mask_pair(prediction, truth)
    size_sum = int(prediction_mask.sum()) + int(truth_mask.sum())
    if size_sum == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(prediction_mask, truth_mask).sum()) / size_sum


def surface_distances(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> SurfaceDistances:
    """Surfel distances and areas of two 2D or 3D masks of equal shape; ``spacing_mm`` in array axis order."""
    prediction_mask, truth_mask = _as_mask_pair(prediction, truth)
    spacing = _validated_spacing(spacing_mm, truth_mask.ndim)
    empty = np.zeros(0)
    union = prediction_mask | truth_mask
    if not union.any():
        return SurfaceDistances(empty, empty, empty, empty)

    # Only the union's bounding box matters: every surfel lies within it (plus the one-voxel padding below).
    box = ndimage.find_objects(union.astype(np.uint8))[0]
    area_table = _surfel_area_table(spacing)
    truth_surfels = _surfels(truth_mask[box])
    prediction_surfels = _surfels(prediction_mask[box])
    truth_distance_map = _distance_to(truth_surfels[0], spacing)
    prediction_distance_map = _distance_to(prediction_surfels[0], spacing)

    def sorted_direction(surfels: tuple[np.ndarray, np.ndarray], other_distance_map: np.ndarray):
        surface, codes = surfels
        distances = other_distance_map[surface]
        areas = area_table[codes[surface]]
        order = np.argsort(distances, kind="stable")
        return distances[order], areas[order]

    truth_to_prediction, truth_areas = sorted_direction(truth_surfels, prediction_distance_map)
    prediction_to_truth, prediction_areas = sorted_direction(prediction_surfels, truth_distance_map)
    return SurfaceDistances(truth_to_prediction, truth_areas, prediction_to_truth, prediction_areas)


def surface_dice(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float) -> float:
    """Surface Dice (normalised surface distance) at ``tolerance_mm``; 0 if one mask is empty, NaN if both are."""
    return surface_distances(prediction, truth, spacing_mm).surface_dice(tolerance_mm)


def hausdorff95(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Robust (95th percentile) Hausdorff distance in mm; inf if one mask is empty, NaN if both are."""
    return surface_distances(prediction, truth, spacing_mm).robust_hausdorff(95.0)


def segmentation_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> dict[str, float]:
    """Dice, surface Dice at ``tolerance_mm`` and HD95 (mm) of one case, computing the surfaces once.

    Returns ``{"dice", "surface_dice", "hd95", "tolerance_mm"}``, all floats.
    """
    distances = surface_distances(prediction, truth, spacing_mm)
    return {
        "dice": dice(prediction, truth),
        "surface_dice": distances.surface_dice(tolerance_mm),
        "hd95": distances.robust_hausdorff(95.0),
        "tolerance_mm": float(tolerance_mm),
    }


def _as_mask_pair(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction_mask = np.asarray(prediction) != 0
    truth_mask = np.asarray(truth) != 0
    if prediction_mask.shape != truth_mask.shape:
        raise InputError(f"prediction and ground truth differ in shape: {prediction_mask.shape} vs {truth_mask.shape}")
    return prediction_mask, truth_mask


def _validated_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    if ndim not in (2, 3):
        raise InputError(f"surface metrics need 2D or 3D masks, got {ndim}D")
    spacing = tuple(float(value) for value in spacing_mm)
    if len(spacing) != ndim:
        raise InputError(f"spacing has {len(spacing)} values for a {ndim}D mask")
    if not all(np.isfinite(value) and value > 0 for value in spacing):
        raise InputError(f"spacing must be positive and finite, got {spacing}")
    return spacing


def _corner_offsets(ndim: int) -> list[tuple[int, ...]]:
    """Offsets of the 2**ndim voxels around a corner; offset number k is bit k of the neighbour code."""
    return list(itertools.product((0, 1), repeat=ndim))


def _surfels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the corner grid of ``mask`` holds surfels, and every corner's neighbour code.

    For a mask of shape (n_0, ..., n_d) both arrays have shape (n_0 + 1, ..., n_d + 1): corner i sits between
    voxels i - 1 and i along every axis, so the zero padding closes surfaces that touch the array border.
    """
    padded = np.pad(mask, 1).astype(np.uint8)
    codes = np.zeros(tuple(size - 1 for size in padded.shape), dtype=np.uint8)
    for bit, offset in enumerate(_corner_offsets(mask.ndim)):
        window = tuple(slice(start, start + size) for start, size in zip(offset, codes.shape))
        codes |= padded[window] << bit
    full = 2 ** (2**mask.ndim) - 1
    return (codes != 0) & (codes != full), codes


def _distance_to(surface: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance in mm from every corner to the nearest surfel of ``surface``; inf everywhere if there is none."""
    if not surface.any():
        return np.full(surface.shape, np.inf)
    return ndimage.distance_transform_edt(~surface, sampling=spacing)


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Surfel size for every neighbour code: contour length in mm (2D) or surface area in mm² (3D).

    The surface through a block of 2**ndim voxels is the iso-0.5 line/surface of the block's 0/1 values, so its
    vertices sit at the midpoints of the block's edges (marching squares / marching cubes).
    """
    ndim = len(spacing)
    offsets = _corner_offsets(ndim)
    sizes = np.zeros(2 ** len(offsets))
    for code in range(1, sizes.size - 1):
        block = np.zeros((2,) * ndim)
        for bit, offset in enumerate(offsets):
            block[offset] = (code >> bit) & 1
        if ndim == 2:
            sizes[code] = sum(
                np.linalg.norm(np.diff(contour * np.asarray(spacing), axis=0), axis=1).sum()
                for contour in measure.find_contours(block, 0.5)
            )
        else:
            # Triangulating the minority side keeps ambiguous faces split the same way for a block and its complement.
            if block.sum() > block.size // 2:
                block = 1.0 - block
            vertices, faces, _, _ = measure.marching_cubes(block, 0.5, spacing=spacing, method="lorensen")
            sizes[code] = measure.mesh_surface_area(vertices, faces)
    return sizes


def _area_weighted_percentile(sorted_distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """First sorted distance whose normalised cumulative area reaches ``percent`` / 100 (no interpolation)."""
    cumulative = np.cumsum(areas) / areas.sum()
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(sorted_distances[min(index, sorted_distances.size - 1)])
