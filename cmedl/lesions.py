"""Lesions: the connected pieces of a tumour mask, each counted, measured (RECIST 1.1) and located.

A lesion is one 3D connected component of the tumour mask on the CT's grid. For each one this module reports:

- ``id``: 1, 2, ... by decreasing volume (ties: the component met first in the voxel order);
- the centroid in LPS mm (ITK's frame), in RAS mm (Slicer's frame) and its axial slice index;
- ``volume_ml``: voxel count times the voxel volume;
- RECIST 1.1 diameters, measured on axial slices in physical mm: the long axis is the longest segment between
  two points of the lesion's outline on the axial slice where that segment is longest; the short axis is the
  lesion's extent on that slice perpendicular to the long axis (its width across the long axis). The outline
  is the marching-squares contour at half-way between inside and outside voxel centres, so a lesion of n
  voxels across measures n voxels, not n - 1; only its convex-hull vertices are compared, pairwise;
- mean and max tumour probability over its voxels;
- where it lies relative to the lungs (``location``), from the lung mask; see :func:`find_lesions`.

"Axial" is the voxel index axis whose direction is closest to the patient's head-foot axis, so a sagittal or
coronal acquisition is still measured on axial planes of its own grid, and on an oblique grid the measured
plane is the tilted slice the scanner acquired (as a reader measures it). Distances use the full index-to-
physical matrix (direction times spacing), so anisotropic and oblique grids measure correctly.

Nothing here imports torch: the Slicer side and the command line share these measurements.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import find_contours

from cmedl.errors import InputError, OutputError
from cmedl.volumes import atomic_output

# Connectivity: full (26-neighbourhood in 3D). With slices several times thicker than the pixels, one tumour
# whose outline shifts sideways from one slice to the next may touch the next slice only at an edge or a
# corner; 6-connectivity would count it as several lesions and split its diameters. Two distinct lesions
# that touch only diagonally are rarer than that, and a reader would call them one mass anyway.
FULLY_CONNECTED = True

LOCATIONS = ("inside_lung", "mediastinum", "chest_wall", "outside_lung_mask")
UNKNOWN_LOCATION = "unknown"  # no lung mask was given

# The location rule (see find_lesions) looks at a lesion's shell: the voxels outside it within this distance
# (at least one in-plane voxel, and always its face neighbours), i.e. what the lesion touches.
LUNG_CONTACT_MM = 2.0
# Share of the shell in the lung mask for "inside_lung". On phantoms (128 px), nodules surrounded by lung
# gave 0.89-1.0 and tumours against the mediastinum or chest wall 0.37-0.75.
INSIDE_LUNG_FRACTION = 0.85
MEDIAL_FRACTION = 0.5  # share of the shell's non-lung voxels between the lungs for "mediastinum"

TABLE_COLUMNS = (
    "id",
    "volume_ml",
    "voxel_count",
    "long_axis_mm",
    "short_axis_mm",
    "measured_slice",
    "slice_index",
    "centroid_r_mm",
    "centroid_a_mm",
    "centroid_s_mm",
    "centroid_lps_x_mm",
    "centroid_lps_y_mm",
    "centroid_lps_z_mm",
    "mean_probability",
    "max_probability",
    "location",
    "contact_side",
    "lung_fraction",
    "long_axis_ras_mm",
)

Vector = tuple[float, float, float]


@dataclass
class Lesion:
    """One connected component of a tumour mask.

    Attributes:
        id: 1-based, by decreasing volume.
        voxel_count: number of voxels.
        volume_ml: volume in mL.
        centroid_lps_mm: centroid of the voxel centres in LPS mm (the image's physical frame).
        centroid_ras_mm: the same point in RAS mm (Slicer's world frame).
        centroid_index: continuous voxel index (i, j, k) of the centroid.
        slice_index: the axial slice (index along the axial axis) holding the centroid.
        long_axis_mm: RECIST long-axis diameter in mm (0 for an empty lesion).
        short_axis_mm: extent perpendicular to the long axis on the same slice, mm.
        measured_slice: the axial slice index where the long axis was measured.
        long_axis_ras_mm: the long axis' two end points in RAS mm, for drawing a ruler.
        mean_probability: mean tumour probability (0-1) over the voxels, None without probabilities.
        max_probability: peak tumour probability (0-1), None without probabilities.
        location: one of :data:`LOCATIONS`, or ``"unknown"`` without a lung mask.
        contact_side: ``"medial"`` or ``"lateral"`` for a lesion touching the lung from outside, else ``""``.
        lung_fraction: share (0-1) of the voxels within the lung contact distance of the lung mask.
        axial_axis: the voxel index axis (0 i, 1 j, 2 k) taken as axial.
    """

    id: int
    voxel_count: int
    volume_ml: float
    centroid_lps_mm: Vector
    centroid_ras_mm: Vector
    centroid_index: Vector
    slice_index: int
    long_axis_mm: float
    short_axis_mm: float
    measured_slice: int
    long_axis_ras_mm: tuple[Vector, Vector]
    mean_probability: float | None = None
    max_probability: float | None = None
    location: str = UNKNOWN_LOCATION
    contact_side: str = ""
    lung_fraction: float | None = None
    axial_axis: int = 2

    def to_row(self) -> dict[str, Any]:
        """One row of the lesion table (see :data:`TABLE_COLUMNS`), rounded for reading."""
        r, a, s = self.centroid_ras_mm
        x, y, z = self.centroid_lps_mm
        return {
            "id": self.id,
            "volume_ml": round(self.volume_ml, 4),
            "voxel_count": self.voxel_count,
            "long_axis_mm": round(self.long_axis_mm, 2),
            "short_axis_mm": round(self.short_axis_mm, 2),
            "measured_slice": self.measured_slice,
            "slice_index": self.slice_index,
            "centroid_r_mm": round(r, 2),
            "centroid_a_mm": round(a, 2),
            "centroid_s_mm": round(s, 2),
            "centroid_lps_x_mm": round(x, 2),
            "centroid_lps_y_mm": round(y, 2),
            "centroid_lps_z_mm": round(z, 2),
            "mean_probability": None if self.mean_probability is None else round(self.mean_probability, 4),
            "max_probability": None if self.max_probability is None else round(self.max_probability, 4),
            "location": self.location,
            "contact_side": self.contact_side,
            "lung_fraction": None if self.lung_fraction is None else round(self.lung_fraction, 3),
            "long_axis_ras_mm": [round(v, 2) for point in self.long_axis_ras_mm for v in point],
        }


# -- geometry -------------------------------------------------------------------------------------------


class _Grid:
    """Index-to-physical mapping of an image: ``point = origin + matrix @ (i, j, k)``, in LPS mm."""

    def __init__(self, image: sitk.Image) -> None:
        if image.GetDimension() != 3:
            raise InputError(f"lesions need a 3D image grid, got {image.GetDimension()}D")
        self.size = tuple(int(n) for n in image.GetSize())  # (i, j, k)
        self.origin = np.array(image.GetOrigin(), dtype=float)
        direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        self.matrix = direction * np.array(image.GetSpacing(), dtype=float)  # column q: one step along index q
        # The axial axis: the index axis that moves most along the patient's head-foot (LPS z) direction.
        self.axial_axis = int(np.argmax(np.abs(direction[2])))
        self.voxel_ml = abs(float(np.linalg.det(self.matrix))) / 1000.0
        self.step_mm = np.linalg.norm(self.matrix, axis=0)  # physical length of one step along i, j, k
        self.in_plane_axes = tuple(q for q in range(3) if q != self.axial_axis)

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy (z, y, x) shape = reversed (i, j, k) size."""
        return self.size[::-1]  # type: ignore[return-value]

    def physical(self, index_ijk: np.ndarray) -> np.ndarray:
        """``(N, 3)`` continuous (i, j, k) indices to ``(N, 3)`` LPS mm."""
        return self.origin + np.asarray(index_ijk, dtype=float) @ self.matrix.T


def _as_array(data: sitk.Image | np.ndarray | None, grid: _Grid, what: str) -> np.ndarray | None:
    """A numpy (z, y, x) array of ``data`` on ``grid``'s shape (a view where possible)."""
    if data is None:
        return None
    if isinstance(data, sitk.Image):
        if tuple(data.GetSize()) != grid.size:
            raise InputError(f"the {what} has size {data.GetSize()}, the CT {grid.size}")
        return sitk.GetArrayViewFromImage(data)
    array = np.asarray(data)
    if array.shape != grid.shape:
        raise InputError(f"the {what} has shape {array.shape}, the CT (z, y, x) {grid.shape}")
    return array


# -- components -----------------------------------------------------------------------------------------


def _components(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int], int]:
    """Connected components inside the mask's bounding box, numbered by decreasing size.

    Returns the component ids of the box (0 background), the box's (z, y, x) offset and the count. Working on
    the box keeps a 512 x 512 x 300 CT with a few small lesions from allocating a full-size id volume.
    """
    foreground = np.asarray(mask) != 0
    if not foreground.any():
        return np.zeros((0, 0, 0), dtype=np.uint32), (0, 0, 0), 0
    bounds = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(foreground.any(axis=others))
        bounds.append((int(present[0]), int(present[-1]) + 1))
    box = tuple(slice(lo, hi) for lo, hi in bounds)
    crop = sitk.GetImageFromArray(foreground[box].astype(np.uint8))
    # RelabelComponent numbers by decreasing size; equal sizes keep ConnectedComponent's raster order.
    ids = sitk.RelabelComponent(sitk.ConnectedComponent(crop, FULLY_CONNECTED), 0, True)
    array = sitk.GetArrayFromImage(ids)
    count = int(array.max())
    return array, (bounds[0][0], bounds[1][0], bounds[2][0]), count


def label_lesions(mask: sitk.Image | np.ndarray) -> np.ndarray:
    """Lesion ids on the mask's full grid: ``(z, y, x)`` array, 0 background, k = lesion ``id`` k.

    The ids are those :func:`find_lesions` gives the same mask. The dtype is the smallest unsigned integer
    type that holds the count (uint8 for up to 255 lesions).
    """
    array = sitk.GetArrayViewFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
    ids, offset, count = _components(array)
    dtype = np.uint8 if count < 256 else np.uint16 if count < 65536 else np.uint32
    full = np.zeros(array.shape, dtype=dtype)
    if count:
        box = tuple(slice(o, o + n) for o, n in zip(offset, ids.shape))
        full[box] = ids.astype(dtype)
    return full


# -- RECIST ---------------------------------------------------------------------------------------------


@dataclass
class _Diameters:
    long_mm: float
    short_mm: float
    slice_index: int
    end_points: tuple[np.ndarray, np.ndarray]  # continuous (i, j, k) indices of the long axis' ends


def _outline_points(plane: np.ndarray) -> np.ndarray:
    """Points of the outline of a 2D boolean plane, ``(N, 2)`` in its (row, column) index coordinates."""
    padded = np.pad(plane.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return np.zeros((0, 2))
    return np.concatenate(contours) - 1.0


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    unique = np.unique(np.round(points, 6), axis=0)
    if len(unique) < 3:
        return unique
    try:
        return unique[ConvexHull(unique).vertices]
    except QhullError:  # collinear points: every point is a candidate
        return unique


def measure_recist(lesion_mask: np.ndarray, grid: _Grid, offset_zyx: Sequence[int] = (0, 0, 0)) -> _Diameters:
    """RECIST long and short axes (mm) of one lesion given as a boolean (z, y, x) array.

    ``lesion_mask`` may be a crop of the full grid whose first voxel sits at ``offset_zyx``.
    """
    axial_np = 2 - grid.axial_axis
    plane_axes_np = [a for a in range(3) if a != axial_np]  # numpy axes of a slice's rows and columns
    plane_axes_ijk = [2 - a for a in plane_axes_np]
    # An orthonormal 2D frame of the slice plane: B = Q R, and R maps (row, column) steps to in-plane mm.
    _, frame = np.linalg.qr(grid.matrix[:, plane_axes_ijk])
    best: _Diameters | None = None
    for t in range(lesion_mask.shape[axial_np]):
        plane = np.take(lesion_mask, t, axis=axial_np)
        if not plane.any():
            continue
        hull = _hull_vertices(_outline_points(plane))
        mm = hull @ frame.T
        differences = mm[:, None, :] - mm[None, :, :]
        lengths = np.einsum("abk,abk->ab", differences, differences)
        a, b = np.unravel_index(int(np.argmax(lengths)), lengths.shape)
        long_mm = math.sqrt(float(lengths[a, b]))
        if long_mm > 0:
            normal = np.array([-(mm[b, 1] - mm[a, 1]), mm[b, 0] - mm[a, 0]]) / long_mm
            across = mm @ normal
            short_mm = float(across.max() - across.min())
        else:
            short_mm = 0.0
        if (
            best is None
            or long_mm > best.long_mm + 1e-9
            or (abs(long_mm - best.long_mm) <= 1e-9 and short_mm > best.short_mm)
        ):
            slice_global = int(offset_zyx[axial_np]) + t
            ends = []
            for point in (hull[a], hull[b]):
                index_zyx = np.zeros(3)
                index_zyx[axial_np] = slice_global
                index_zyx[plane_axes_np[0]] = point[0] + offset_zyx[plane_axes_np[0]]
                index_zyx[plane_axes_np[1]] = point[1] + offset_zyx[plane_axes_np[1]]
                ends.append(index_zyx[::-1].copy())
            best = _Diameters(long_mm, short_mm, slice_global, (ends[0], ends[1]))
    if best is None:
        zero = np.zeros(3)
        return _Diameters(0.0, 0.0, int(offset_zyx[axial_np]), (zero, zero))
    return best


# -- location -------------------------------------------------------------------------------------------


def _row_ends(plane: np.ndarray) -> np.ndarray:
    """``(N, 2)`` (row, column) of the first and last set pixel of every row of a 2D boolean ``plane``.

    The convex hull of a set of pixels is that of these ends (the pixels between two ends of a row lie on the
    segment joining them), so the hull is built from two points per row instead of every lung pixel.
    """
    rows = np.flatnonzero(plane.any(axis=1))
    held = plane[rows]
    first = held.argmax(axis=1)
    last = plane.shape[1] - 1 - held[:, ::-1].argmax(axis=1)
    return np.concatenate([np.stack([rows, first], axis=1), np.stack([rows, last], axis=1)])


class _LungHulls:
    """Per axial slice, the convex hull of the lung mask: the region "between the lungs".

    The mediastinum lies between the two lungs, so inside the convex outline of both lungs on an axial slice;
    the chest wall wraps around the lungs and the diaphragm lies below them, so outside it. (Where a slice
    holds one lung only, the hull of that lung still covers its concave medial side, the mediastinum.)
    """

    def __init__(self, lung: np.ndarray, axial_axis: int) -> None:
        self.lung = lung
        self.axial_np = 2 - axial_axis
        self._hulls: dict[int, np.ndarray | None] = {}

    def _hull(self, t: int) -> np.ndarray | None:
        """The hull's half-planes ``(a, b, c)``, inside where ``a * row + b * column + c <= 0``; None if flat."""
        if t not in self._hulls:
            points = _row_ends(np.asarray(np.take(self.lung, t, axis=self.axial_np)) != 0)
            try:
                # Pixel corners rather than centres: the hull then holds every lung pixel entirely.
                corners = points[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
                self._hulls[t] = ConvexHull(corners.reshape(-1, 2)).equations if len(points) else None
            except QhullError:
                self._hulls[t] = None
        return self._hulls[t]

    def between(self, index_zyx: np.ndarray) -> np.ndarray:
        """For ``(N, 3)`` voxel indices (z, y, x): whether each lies inside the lungs' hull on its slice."""
        others = [a for a in range(3) if a != self.axial_np]
        result = np.zeros(len(index_zyx), dtype=bool)
        for t in np.unique(index_zyx[:, self.axial_np]):
            equations = self._hull(int(t))
            if equations is None:
                continue
            here = index_zyx[:, self.axial_np] == t
            points = index_zyx[here][:, others].astype(float)
            result[here] = np.all(points @ equations[:, :2].T + equations[:, 2] <= 1e-9, axis=1)
        return result


def _locate(
    lesion: np.ndarray, box: tuple[slice, ...], lung: np.ndarray, grid: _Grid, hulls: _LungHulls
) -> tuple[str, str, float]:
    """(location, contact side, lung fraction of the shell) of one lesion given as a boolean array on ``box``."""
    spacing_zyx = grid.step_mm[::-1]
    shell_mm = max(LUNG_CONTACT_MM, float(max(grid.step_mm[q] for q in grid.in_plane_axes)))
    reach = [int(math.ceil(shell_mm / s)) + 1 for s in spacing_zyx]
    grown = tuple(slice(max(0, b.start - r), min(n, b.stop + r)) for b, r, n in zip(box, reach, grid.shape))
    inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown))
    inside = np.zeros(tuple(g.stop - g.start for g in grown), dtype=bool)
    inside[inner] = lesion
    # The shell: what the lesion touches, within shell_mm, and at least its face neighbours (through thick
    # slices too).
    distance = ndimage.distance_transform_edt(~inside, sampling=spacing_zyx)
    shell = ((distance > 0) & (distance <= shell_mm)) | (ndimage.binary_dilation(inside) & ~inside)
    if not shell.any():  # the lesion fills its surroundings up to the image border
        return "outside_lung_mask", "", 0.0
    lung_crop = np.asarray(lung[grown]) != 0
    touching_lung = shell & lung_crop
    fraction = float(touching_lung.sum()) / float(shell.sum())
    if fraction >= INSIDE_LUNG_FRACTION:
        return "inside_lung", "", fraction
    if not touching_lung.any():
        return "outside_lung_mask", "", fraction
    soft_tissue = np.argwhere(shell & ~lung_crop) + np.array([g.start for g in grown])
    medial = float(hulls.between(soft_tissue).mean()) >= MEDIAL_FRACTION
    return ("mediastinum", "medial", fraction) if medial else ("chest_wall", "lateral", fraction)


# -- lesions --------------------------------------------------------------------------------------------


def find_lesions(
    mask: sitk.Image | np.ndarray,
    probabilities: sitk.Image | np.ndarray | None,
    ct_image_geometry: sitk.Image,
    lung_mask: sitk.Image | np.ndarray | None = None,
) -> list[Lesion]:
    """The lesions of a tumour mask on a CT's grid, by decreasing volume.

    Args:
        mask: tumour mask (non-zero = tumour), a ``SimpleITK.Image`` or a numpy ``(z, y, x)`` array, on the
            grid of ``ct_image_geometry``.
        probabilities: tumour probability on the same grid: floats in [0, 1], or uint8 scaled 0-255 (as
            ``cmedl segment --probabilities`` writes it); None leaves the probability columns empty.
        ct_image_geometry: any image on the CT's grid; only its size, origin, spacing and direction are used.
        lung_mask: lung mask on the same grid (non-zero = lung), e.g. :attr:`cmedl.lungs.LungDetection.lung_mask`;
            None gives location ``"unknown"``.

    Location rule, from what the lesion touches: its shell is the voxels outside it within 2 mm (at least
    one in-plane voxel, and always its face neighbours). The lung mask is found by an air threshold, so
    the lesion itself is soft tissue outside it; the shell says what surrounds it.

    - ``inside_lung``: at least 85% of the shell is lung (a nodule surrounded by lung, vessels included);
    - ``mediastinum`` / ``chest_wall``: part of the shell is lung, the rest is soft tissue or bone. That rest
      is medial (``mediastinum``) when at least half of it lies between the lungs, that is inside the convex
      hull of the lung mask on its axial slice, and lateral (``chest_wall``) otherwise; ``contact_side`` says
      which. Paravertebral tumours, inside the hull behind the heart, count as mediastinal; tumours on the
      diaphragm, below the lungs, as chest wall. On 16 phantoms (128 px) this rule agreed with the tissue a
      tumour abuts for 30 of 32 juxtamediastinal and juxtapleural tumours;
    - ``outside_lung_mask``: no shell voxel is lung (a false positive in the liver, say).
    """
    grid = _Grid(ct_image_geometry)
    mask_array = _as_array(mask, grid, "mask")
    probability_array = _as_array(probabilities, grid, "probability map")
    lung_array = _as_array(lung_mask, grid, "lung mask")
    ids, offset, count = _components(mask_array)
    if not count:
        return []
    scale = 1.0 / 255.0 if probability_array is not None and probability_array.dtype == np.uint8 else 1.0
    hulls = _LungHulls(lung_array, grid.axial_axis) if lung_array is not None else None
    lesions = []
    for number, local_box in enumerate(ndimage.find_objects(ids), start=1):
        if local_box is None:
            continue
        lesion = ids[local_box] == number
        box = tuple(slice(s.start + o, s.stop + o) for s, o in zip(local_box, offset))
        start_zyx = np.array([s.start for s in box])
        voxels = np.argwhere(lesion) + start_zyx
        centroid_ijk = voxels.mean(axis=0)[::-1]
        centroid_lps = grid.physical(centroid_ijk[None])[0]
        diameters = measure_recist(lesion, grid, start_zyx)
        ends = grid.physical(np.array(diameters.end_points))
        ends_ras = ends * np.array([-1.0, -1.0, 1.0])
        mean_p = max_p = None
        if probability_array is not None:
            values = np.asarray(probability_array[box])[lesion].astype(np.float64) * scale
            mean_p, max_p = float(values.mean()), float(values.max())
        location, side, fraction = UNKNOWN_LOCATION, "", None
        if lung_array is not None and hulls is not None:
            location, side, fraction = _locate(lesion, box, lung_array, grid, hulls)
        lesions.append(
            Lesion(
                id=number,
                voxel_count=int(lesion.sum()),
                volume_ml=float(lesion.sum()) * grid.voxel_ml,
                centroid_lps_mm=_vector(centroid_lps),
                centroid_ras_mm=_vector(centroid_lps * np.array([-1.0, -1.0, 1.0])),
                centroid_index=_vector(centroid_ijk),
                slice_index=int(round(float(centroid_ijk[grid.axial_axis]))),
                long_axis_mm=diameters.long_mm,
                short_axis_mm=diameters.short_mm,
                measured_slice=diameters.slice_index,
                long_axis_ras_mm=(_vector(ends_ras[0]), _vector(ends_ras[1])),
                mean_probability=mean_p,
                max_probability=max_p,
                location=location,
                contact_side=side,
                lung_fraction=fraction,
                axial_axis=grid.axial_axis,
            )
        )
    return lesions


def split_by_minimums(
    lesions: Sequence[Lesion], min_volume_ml: float = 0.0, min_peak_probability: float = 0.0
) -> tuple[list[Lesion], list[Lesion]]:
    """(kept, removed): a lesion is removed when it is smaller than ``min_volume_ml`` (mL) or its peak tumour
    probability is below ``min_peak_probability`` (0-1; lesions measured without probabilities are kept)."""
    kept, removed = [], []
    for lesion in lesions:
        small = lesion.volume_ml < min_volume_ml
        doubtful = lesion.max_probability is not None and lesion.max_probability < min_peak_probability
        (removed if small or doubtful else kept).append(lesion)
    return kept, removed


def _vector(values: np.ndarray) -> Vector:
    return (float(values[0]), float(values[1]), float(values[2]))


def lesions_table(lesions: Sequence[Lesion]) -> list[dict[str, Any]]:
    """The lesion table: one JSON-serialisable row per lesion with the columns of :data:`TABLE_COLUMNS`.

    Units: volume mL, diameters and centroids mm, probabilities 0-1, slices as voxel indices along the axial
    axis; ``long_axis_ras_mm`` is the long axis' two end points in RAS mm (r1, a1, s1, r2, a2, s2).
    """
    return [lesion.to_row() for lesion in lesions]


def lesion_from_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A table row as read back from JSON or CSV, with numbers as numbers (CSV gives strings)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("location", "contact_side") or value is None:
            out[key] = value
        elif key == "long_axis_ras_mm":
            out[key] = [float(v) for v in value.split()] if isinstance(value, str) else list(value)
        elif key in ("id", "voxel_count", "measured_slice", "slice_index"):
            out[key] = int(value)
        elif value == "":
            out[key] = None
        else:
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                out[key] = value
    return out


# -- files ----------------------------------------------------------------------------------------------

LESIONS_FORMAT = "cmedl-lesions"
LESIONS_SUFFIXES = (".json", ".csv")


def write_lesions(
    path: str | Path,
    lesions: Sequence[Lesion] | Sequence[dict[str, Any]],
    provenance: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write the lesion table to ``path`` (.json or .csv), atomically (temporary name, then rename).

    JSON: ``{"format": "cmedl-lesions", "version": 1, "provenance": {...}, **summary, "lesion_count": n,
    "lesions": [rows]}``. CSV: provenance and summary first, as ``# key: value`` comment lines (values that
    are not text as JSON), then a header and one row per lesion; ``long_axis_ras_mm`` is six numbers separated
    by spaces. ``pandas.read_csv(path, comment="#")`` reads it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LESIONS_SUFFIXES:
        raise OutputError(f"unsupported lesion table format {path.name!r}; use .json or .csv")
    rows = [row if isinstance(row, dict) else row.to_row() for row in lesions]
    provenance = provenance or {}
    summary = summary or {}
    if suffix == ".json":
        document = {
            "format": LESIONS_FORMAT,
            "version": 1,
            "provenance": provenance,
            **summary,
            "lesion_count": len(rows),
            "lesions": rows,
        }
        text = json.dumps(document, indent=2, default=str) + "\n"
    else:
        text = _csv_text(rows, {**{"provenance." + k: v for k, v in provenance.items()}, **summary})
    with atomic_output(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return path


def _csv_text(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    buffer = io.StringIO()
    for key, value in header.items():
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        buffer.write(f"# {key}: {' '.join(str(shown).split())}\n")
    columns = list(TABLE_COLUMNS) + [k for row in rows for k in row if k not in TABLE_COLUMNS]
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(columns)), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                key: (" ".join(f"{v:g}" for v in value) if isinstance(value, list) else "" if value is None else value)
                for key, value in row.items()
            }
        )
    return buffer.getvalue()


def read_lesions(path: str | Path) -> dict[str, Any]:
    """Read a lesion table written by :func:`write_lesions`: ``{"provenance": ..., "lesions": [rows], ...}``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"lesion table not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the lesion table {path.name}: {error}") from None
    if path.suffix.lower() == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{path.name} is not a lesion table: {error}") from None
        if not isinstance(document, dict) or document.get("format") != LESIONS_FORMAT:
            raise InputError(f"{path.name} is not a CMEDL lesion table")
        return document
    provenance: dict[str, Any] = {}
    document: dict[str, Any] = {"format": LESIONS_FORMAT, "provenance": provenance}
    lines = text.splitlines()
    body = [line for line in lines if not line.startswith("#")]
    for line in lines:
        if line.startswith("# ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            try:
                parsed: Any = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            if key.startswith("provenance."):
                provenance[key[len("provenance.") :]] = parsed
            else:
                document[key] = parsed
    document["lesions"] = [lesion_from_dict(row) for row in csv.DictReader(body)]
    document["lesion_count"] = len(document["lesions"])
    return document
