"""Lung detection on CT by an air threshold: lung mask, lung slices and the region of interest (ROI).

The lung mask only chooses the slices and the ROI that tumour segmentation looks at. It never clips the
tumour: a tumour is soft tissue, so an air threshold leaves it out of the lung mask, but the ROI (the lungs'
bounding box grown by a margin) holds it together with the mediastinum and the chest wall.

How the lungs are found, on the voxels reordered to LPS (so that the rules read patient directions: feet to
head, front to back, right to left, whatever the stored order), on a working grid of about 2 x 2 x 2.5 mm (so
that the rules, written in mm, cm² and mL, act the same at any resolution, and a 512 x 512 x 150 CT takes a
few seconds):

1. Padding: a value that fills a large part of the image border exactly (-1024, -2048, -3024, a circular
   field of view, or 0 after a resampling) is neither air nor tissue.
2. Body: the largest connected region of tissue (HU at or above the threshold). Its convex hull, slice by
   slice, is "inside the patient"; the hull rather than the filled outline, so that lungs cut by a cropped
   field of view (a hemithorax, a mediastinal crop) stay inside.
3. Air regions (HU below the threshold, 3D connected): a region with most of its voxels outside the hull is
   the air around the patient, under the table or between the arms.
4. Lung rules for the remaining regions: a cross-section of at least 20 cm² in some slice (the trachea, bowel
   loops and small pockets are smaller); a mean position no further forward than a quarter of the way from
   the body's centre to its front (in a supine patient bowel and stomach gas rises anteriorly, while the lungs,
   their bases above all, lie posterior and lateral); and at least 5% of the volume of the largest lung region
   (stomach gas next to whole lungs). A prone patient or a wrong direction header weakens the position rule.
5. Airway: the trachea and the main bronchi are removed, because the reference lung masks this project
   compares against (CIP whole-lung, elastix) leave them out and because the trachea would stretch the lung
   slices up into the neck. The airway is a chain of small (<= 6 cm²) air sections, central in the body,
   starting at the top or bottom end of the lung region and running at least 30 mm along the slices (a lung
   apex outgrows 6 cm² within a few millimetres).
6. Full resolution: the lung regions are brought back to the CT grid, intersected with the full-resolution
   air mask, and each slice's enclosed holes (vessels, airway walls, small nodules) are filled.
7. ROI: the lung voxels' bounding box grown by ``margin_mm`` left-right and front-back and by
   ``min(margin_mm, 10 mm)`` head-foot, clipped to the image; for the usual axial CT that is the lung slices
   grown by up to 10 mm times the lungs' in-plane box grown by ``margin_mm``. The head-foot growth keeps
   tumours at the apex or on the diaphragm that reach past the last aerated slice; it is kept small because
   the slices above the apex are neck and shoulders.
8. Lung count: 2 when the lung regions hold two large parts side by side (left and right). Lungs that touch
   (at the anterior junction, through an airway left in) are parted by eroding them up to 20 mm; a single
   lung does not split into two parts side by side.

Known limits: air around the patient that reaches the lungs through the airway (a scan including the nose
or mouth, a tracheostomy) makes the lungs part of the outside air; a nodule surrounded by lung in a slice is
filled into the lung mask (it stays inside the ROI either way).

Arrays are in SimpleITK's numpy order (z, y, x); boxes and slice ranges are reported as voxel indices of the
input image in SimpleITK's (x, y, z) order. Slices are the input's third index axis, whatever its direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.measure import block_reduce
from skimage.morphology import convex_hull_image

from cmedl.errors import ConfigError, InputError, NoLungsFoundError
from cmedl.volumes import image_like

WORKING_SPACING_MM = (2.5, 2.0, 2.0)  # (z, y, x): the working grid is at least this coarse
PADDING_BORDER_FRACTION = 0.2  # one exact value on this share of a slice's border voxels is padding
OUTSIDE_HULL_FRACTION = 0.5  # air with more than this share outside the body hull surrounds the patient
MIN_LUNG_SECTION_CM2 = 20.0  # largest axial section of a lung region
MAX_ANTERIOR_POSITION = -0.25  # -1 anterior body edge, 0 body centre, +1 posterior edge
MIN_SHARE_OF_LARGEST_LUNG = 0.05
AIRWAY_MAX_SECTION_CM2 = 6.0
AIRWAY_MIN_SECTION_CM2 = 0.3
AIRWAY_MAX_CENTRAL_OFFSET = 0.3  # |left-right position| of the tracheal seed, in body half-widths
AIRWAY_MIN_LENGTH_MM = 30.0
SPLIT_EROSION_DEPTHS_MM = tuple(float(d) for d in range(2, 22, 2))
MIN_SHARE_OF_SECOND_LUNG = 0.1
MIN_LUNG_SEPARATION_MM = 40.0
SLICE_MARGIN_MAX_MM = 10.0

# Connectivity within one slice only: per-slice padding, holes and sections.
_IN_SLICE = np.zeros((3, 3, 3), dtype=bool)
_IN_SLICE[1] = ndimage.generate_binary_structure(2, 1)

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class LungDetection:
    """What :func:`detect_lungs` found in one CT.

    ``lung_mask`` and ``roi_mask`` are uint8 {0, 1} images on the CT's grid. ``slice_range`` is the first and
    last slice index (third index axis, inclusive) holding lung. ``roi_box`` is the ROI's inclusive voxel index
    bounds ``((x0, x1), (y0, y1), (z0, z1))``. ``lung_count`` is 2 when both lungs are present (also when they
    touch), 1 for a single lung (a hemithorax crop).
    """

    lung_mask: sitk.Image
    roi_mask: sitk.Image
    slice_range: tuple[int, int]
    roi_box: Box
    lung_volume_ml: float
    lung_count: int
    threshold_hu: float = -300.0
    margin_mm: float = 30.0

    def summary(self) -> dict:
        """JSON-serialisable description.

        ``roi_box_mm`` is the physical extent of the ROI (outer voxel edges) as ``[[min, max]]`` per patient
        axis (x, y, z, in the image's physical frame, mm); ``roi_size_mm`` its size along the index axes.
        """
        spacing = self.lung_mask.GetSpacing()
        return {
            "lung_volume_ml": float(self.lung_volume_ml),
            "slice_range": [int(v) for v in self.slice_range],
            "roi_box": [[int(lo), int(hi)] for lo, hi in self.roi_box],
            "roi_box_mm": _physical_extent(self.roi_mask, self.roi_box),
            "roi_size_mm": [float((hi - lo + 1) * s) for (lo, hi), s in zip(self.roi_box, spacing)],
            "lung_count": int(self.lung_count),
            "threshold_hu": float(self.threshold_hu),
            "margin_mm": float(self.margin_mm),
        }


def detect_lungs(
    ct: sitk.Image, threshold_hu: float = -300.0, margin_mm: float = 30.0, *, name: str = "the CT"
) -> LungDetection:
    """Find the lungs in ``ct`` (a 3D CT in Hounsfield units) and the ROI around them.

    ``threshold_hu``: voxels below it are air or lung. ``margin_mm``: growth of the ROI around the lungs
    left-right and front-back (head-foot it grows by ``min(margin_mm, 10)`` mm). ``name`` names the image in
    error messages. The masks are on ``ct``'s grid whatever its voxel order or direction.
    Raises :class:`NoLungsFoundError` when no lung is present (an abdomen-only scan, a neck scan).
    """
    if not -1000.0 < threshold_hu < 0.0:
        raise ConfigError(f"lung threshold must lie between -1000 and 0 HU, got {threshold_hu:g}")
    if margin_mm < 0.0:
        raise ConfigError(f"ROI margin must not be negative, got {margin_mm:g} mm")
    ct = _as_volume(ct, name)
    # In LPS order the numpy axes run feet to head, front to back and right to left, whatever the stored order.
    oriented = sitk.DICOMOrient(ct, "LPS")
    hu = sitk.GetArrayViewFromImage(oriented)
    spacing_zyx = np.array(oriented.GetSpacing()[::-1], dtype=float)

    padding = _padding_mask(hu)
    factors = tuple(max(1, int(math.floor(w / s + 1e-6))) for w, s in zip(WORKING_SPACING_MM, spacing_zyx))
    working, working_padding = _working_grid(hu, padding, factors)
    grid = _Grid(spacing_zyx * np.array(factors))

    hull = _body_hull(working >= threshold_hu, working_padding)
    if not hull.any():
        raise NoLungsFoundError(f"no lungs found in {name}: no body (no voxel at or above {threshold_hu:g} HU)")
    inner_air = _inner_air_regions(working < threshold_hu, working_padding, hull)
    lungs = _select_lung_regions(inner_air, hull, grid, name)
    airway = _airway_mask(lungs, hull, grid)
    lungs &= ~airway

    full_lungs = _to_full_resolution(lungs, airway, hu < threshold_hu, padding, factors)
    if not full_lungs.any():
        raise NoLungsFoundError(f"no lungs found in {name}: the lung regions vanish at full resolution")
    lung_count = _count_lungs(lungs, grid)

    roi = np.zeros(full_lungs.shape, dtype=np.uint8)
    (x0, x1), (y0, y1), (z0, z1) = _roi_box(full_lungs, spacing_zyx, margin_mm)
    roi[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = 1
    lung_mask = _on_input_grid(full_lungs.astype(np.uint8), oriented, ct)
    roi_mask = _on_input_grid(roi, oriented, ct)
    (_, _, lung_slices) = _bounding_box(sitk.GetArrayViewFromImage(lung_mask))
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    return LungDetection(
        lung_mask=lung_mask,
        roi_mask=roi_mask,
        slice_range=lung_slices,
        roi_box=_bounding_box(sitk.GetArrayViewFromImage(roi_mask)),
        lung_volume_ml=float(np.count_nonzero(full_lungs)) * voxel_ml,
        lung_count=lung_count,
        threshold_hu=float(threshold_hu),
        margin_mm=float(margin_mm),
    )


def _as_volume(ct: sitk.Image, name: str) -> sitk.Image:
    if ct.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {ct.GetNumberOfComponentsPerPixel()} components per voxel; expected a CT")
    if ct.GetDimension() != 3:
        raise InputError(f"{name} is {ct.GetDimension()}D; expected a 3D CT (cmedl.volumes.read_volume makes one)")
    return ct


@dataclass(frozen=True)
class _Grid:
    """Voxel size of the working grid (numpy order z, y, x, in mm)."""

    spacing_zyx: np.ndarray

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_zyx)) / 1000.0

    @property
    def pixel_cm2(self) -> float:
        return float(self.spacing_zyx[1] * self.spacing_zyx[2]) / 100.0


def _on_input_grid(array: np.ndarray, oriented: sitk.Image, ct: sitk.Image) -> sitk.Image:
    """``array`` (on the LPS-ordered grid ``oriented``) as an image on the grid of the input ``ct``."""
    order = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ct.GetDirection())
    image = sitk.DICOMOrient(image_like(array, oriented), order)
    image.CopyInformation(ct)  # the reordering is exact; this only drops rounding in the origin
    return image


def _padding_mask(hu: np.ndarray) -> np.ndarray:
    """Voxels holding their slice's padding value, connected within the slice to the image border.

    A slice's padding value is the one exact value that covers a large share of its border voxels; real air
    is noisy and never does (a scanner that clips air at -1024 makes it padding, which is harmless). Deciding
    slice by slice also catches whole padded slices added by a resampling or a registration.
    """
    padded = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[0]):
        border = _border_voxels(hu[z : z + 1])
        values, counts = np.unique(border, return_counts=True)
        most = int(np.argmax(counts))
        if counts[most] >= PADDING_BORDER_FRACTION * border.size:
            padded[z] = hu[z] == values[most]
    if not padded.any():
        return padded
    labels, count = ndimage.label(padded, structure=_IN_SLICE)
    on_border = np.zeros(count + 1, dtype=bool)
    on_border[_labels_on_border(labels)] = True
    return on_border[labels]


def _border_voxels(volume: np.ndarray) -> np.ndarray:
    """The voxels on the in-plane edges of every slice, flattened."""
    edges = (volume[:, 0, :], volume[:, -1, :], volume[:, :, 0], volume[:, :, -1])
    return np.concatenate([edge.ravel() for edge in edges])


def _labels_on_border(labels: np.ndarray) -> np.ndarray:
    on_border = np.unique(_border_voxels(labels))
    return on_border[on_border > 0]


def _working_grid(hu: np.ndarray, padding: np.ndarray, factors: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """HU averaged over blocks of ``factors`` voxels, padding left out, and the blocks that are mostly padding.

    Leaving padding out of the averages keeps a padding value (0, -3024) from inventing air or tissue along
    the edge of the field of view.
    """
    valid = ~padding
    values = np.where(valid, np.clip(hu, -1024, 3071), 0).astype(np.float32)
    if all(f == 1 for f in factors):
        return values, padding.copy()
    sums = _block_sum(values, factors)
    counts = _block_sum(valid.astype(np.float32), factors)
    working = np.where(counts > 0, sums / np.maximum(counts, 1.0), -1024.0).astype(np.float32)
    return working, counts < 0.5 * float(np.prod(factors))


def _block_sum(volume: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    # Repeating the last voxels fills the partial blocks at the far edges without inventing air or tissue.
    missing = [(0, (-n) % f) for n, f in zip(volume.shape, factors)]
    padded = np.pad(volume, missing, mode="edge") if any(m for _, m in missing) else volume
    return block_reduce(padded, factors, np.sum)


def _body_hull(tissue: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """Per-slice convex hull of the body (the largest connected tissue region), as a (z, y, x) bool array.

    A one-voxel in-slice opening first detaches thin things touching the patient (blanket, table edge).
    """
    opened = ndimage.binary_opening(tissue & ~padding, structure=_IN_SLICE)
    labels, count = ndimage.label(opened)
    if count == 0:
        return np.zeros(tissue.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    hull = np.zeros_like(body)
    for z in np.flatnonzero(body.any(axis=(1, 2))):
        if np.count_nonzero(body[z]) >= 3:
            hull[z] = convex_hull_image(body[z])
    return hull


def _inner_air_regions(air: np.ndarray, padding: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """Labelled 3D air regions lying (mostly) inside the body hull; air around the patient gets label 0."""
    labels, count = ndimage.label(air & ~padding)
    if count == 0:
        return labels
    index = np.arange(1, count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    inside = ndimage.sum_labels(hull, labels, index)
    outside = np.zeros(count + 1, dtype=bool)
    outside[index[inside < (1.0 - OUTSIDE_HULL_FRACTION) * sizes]] = True
    labels[outside[labels]] = 0
    return labels


def _select_lung_regions(labels: np.ndarray, hull: np.ndarray, grid: _Grid, name: str) -> np.ndarray:
    """The union of the air regions that pass the lung rules (see the module docstring)."""
    regions = ndimage.find_objects(labels)
    accepted: list[tuple[int, float]] = []
    rejected: list[tuple[float, str]] = []
    for label_id, box in enumerate(regions, start=1):
        if box is None:
            continue
        region = labels[box] == label_id
        volume_ml = np.count_nonzero(region) * grid.voxel_ml
        section_cm2 = region.sum(axis=(1, 2)).max() * grid.pixel_cm2
        if section_cm2 < MIN_LUNG_SECTION_CM2:
            why = f"the air inside the body is in small pockets (largest section {section_cm2:.0f} cm²)"
            rejected.append((volume_ml, why))
        elif _anterior_posterior_position(region, box, hull) < MAX_ANTERIOR_POSITION:
            why = f"the largest air region inside the body ({volume_ml:.0f} mL) lies anteriorly, like bowel gas"
            rejected.append((volume_ml, why))
        else:
            accepted.append((label_id, volume_ml))
    if not accepted:
        reason = max(rejected)[1] if rejected else "no air inside the body"
        raise NoLungsFoundError(f"no lungs found in {name}: {reason}")
    largest = max(volume for _, volume in accepted)
    keep = np.zeros(len(regions) + 1, dtype=bool)
    for label_id, volume in accepted:
        keep[label_id] = volume >= MIN_SHARE_OF_LARGEST_LUNG * largest
    return keep[labels]


def _anterior_posterior_position(region: np.ndarray, box: tuple[slice, ...], hull: np.ndarray) -> float:
    """Mean position of ``region`` between the body's anterior (-1) and posterior (+1) edges, in its slices.

    ``region`` is the part of an LPS-ordered array inside ``box``; numpy axis 1 runs front to back.
    """
    rows = np.nonzero(region)[1] + box[1].start
    body_rows = np.flatnonzero(hull[box[0]].any(axis=(0, 2)))
    centre = 0.5 * (body_rows[0] + body_rows[-1])
    half_depth = max(0.5 * (body_rows[-1] - body_rows[0]), 1.0)
    return float((rows.mean() - centre) / half_depth)


def _airway_mask(lungs: np.ndarray, hull: np.ndarray, grid: _Grid) -> np.ndarray:
    """Trachea and main bronchi inside ``lungs``: a chain of small, central sections from one end of the slices.

    Both ends are tried, so that a direction header that swaps head and feet does not matter.
    """
    airway = np.zeros_like(lungs)
    slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    if slices.size == 0:
        return airway
    max_pixels = AIRWAY_MAX_SECTION_CM2 / grid.pixel_cm2
    min_pixels = AIRWAY_MIN_SECTION_CM2 / grid.pixel_cm2
    min_slices = AIRWAY_MIN_LENGTH_MM / grid.spacing_zyx[0]
    for start, step in ((slices[-1], -1), (slices[0], 1)):
        seed = _airway_seed(lungs[start], hull[start], min_pixels, max_pixels)
        if seed is None:
            continue
        chain = _follow_airway(lungs, start, step, seed, max_pixels)
        if len(chain) >= min_slices:
            for z, section in chain:
                airway[z] |= section
    return airway


def _airway_seed(
    lung_slice: np.ndarray, hull_slice: np.ndarray, min_pixels: float, max_pixels: float
) -> np.ndarray | None:
    """The small air section nearest the body's left-right centre in an end slice (y, x), if central enough."""
    labels, count = ndimage.label(lung_slice)
    if count == 0 or not hull_slice.any():
        return None
    body_extent = np.flatnonzero(hull_slice.any(axis=0))
    centre = 0.5 * (body_extent[0] + body_extent[-1])
    half_width = max(0.5 * (body_extent[-1] - body_extent[0]), 1.0)
    best, best_offset = None, AIRWAY_MAX_CENTRAL_OFFSET
    for label_id in range(1, count + 1):
        section = labels == label_id
        pixels = np.count_nonzero(section)
        if not min_pixels <= pixels <= max_pixels:
            continue
        offset = abs(np.nonzero(section)[1].mean() - centre) / half_width
        if offset <= best_offset:
            best, best_offset = section, offset
    return best


def _follow_airway(
    lungs: np.ndarray, start: int, step: int, seed: np.ndarray, max_pixels: float
) -> list[tuple[int, np.ndarray]]:
    """Sections overlapping the previous slice's airway and no larger than ``max_pixels``, slice after slice."""
    chain = [(start, seed)]
    current = seed
    z = start + step
    while 0 <= z < lungs.shape[0]:
        labels, _ = ndimage.label(lungs[z])
        touching = np.unique(labels[current & (labels > 0)])
        following = np.zeros_like(current)
        for label_id in touching:
            section = labels == label_id
            if np.count_nonzero(section) <= max_pixels:
                following |= section
        if not following.any():
            break
        chain.append((z, following))
        current = following
        z += step
    return chain


def _to_full_resolution(
    lungs: np.ndarray, airway: np.ndarray, full_air: np.ndarray, padding: np.ndarray, factors: tuple[int, ...]
) -> np.ndarray:
    """The lung regions on the CT grid: full-resolution air near the working-grid lungs, holes filled per slice.

    The working-grid lungs are grown by one working voxel so that their boundary follows the full-resolution
    air; full-resolution air pockets that do not touch the working-grid lungs themselves are dropped. The work
    is done inside the lungs' bounding box.
    """
    near_working = ndimage.binary_dilation(lungs, structure=np.ones((3, 3, 3), dtype=bool))
    result = np.zeros(full_air.shape, dtype=bool)
    box = ndimage.find_objects(near_working.astype(np.uint8))
    if not box:
        return result
    working_box = box[0]
    full_box = tuple(
        slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(working_box, factors, full_air.shape)
    )
    shape = tuple(b.stop - b.start for b in full_box)
    near = _upsample(near_working[working_box], factors, shape)
    core = _upsample(lungs[working_box], factors, shape)
    candidate = full_air[full_box] & ~padding[full_box] & near & ~_upsample(airway[working_box], factors, shape)
    labels, count = ndimage.label(candidate)
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[core & (labels > 0)])] = True
    keep[0] = False
    result[full_box] = _fill_holes_per_slice(keep[labels])
    return result


def _upsample(mask: np.ndarray, factors: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    for axis, factor in enumerate(factors):
        if factor > 1:
            mask = np.repeat(mask, factor, axis=axis)
    return mask[: shape[0], : shape[1], : shape[2]]


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the background enclosed by ``mask`` within each slice (vessels and airway walls inside the lungs)."""
    labels, count = ndimage.label(~mask, structure=_IN_SLICE)
    enclosed = np.ones(count + 1, dtype=bool)
    enclosed[_labels_on_border(labels)] = False
    enclosed[0] = False
    return mask | enclosed[labels]


def _count_lungs(lungs: np.ndarray, grid: _Grid) -> int:
    """2 when the lungs hold two large parts side by side (left and right), else 1.

    Lungs touching each other (through an airway left over, or where the anterior junction is thinner than
    the working grid) are split by eroding them a few millimetres at a time.
    """
    if _two_lungs_side_by_side(lungs, grid):
        return 2
    box = ndimage.find_objects(lungs.astype(np.uint8))[0]
    depth_mm = ndimage.distance_transform_edt(np.pad(lungs[box], 1), sampling=grid.spacing_zyx)
    for depth in SPLIT_EROSION_DEPTHS_MM:
        core = depth_mm > depth
        if not core.any():
            break
        if _two_lungs_side_by_side(core, grid):
            return 2
    return 1


def _two_lungs_side_by_side(mask: np.ndarray, grid: _Grid) -> bool:
    labels, count = ndimage.label(mask)
    if count < 2:
        return False
    sizes = np.bincount(labels.ravel())[1:]
    first, second = np.argsort(sizes)[::-1][:2]
    if sizes[second] < MIN_SHARE_OF_SECOND_LUNG * sizes[first]:
        return False
    centres = np.array(ndimage.center_of_mass(mask, labels, [first + 1, second + 1])) * grid.spacing_zyx
    head_foot, front_back, right_left = np.abs(centres[0] - centres[1])
    side_by_side = right_left > front_back and right_left > head_foot
    return bool(side_by_side and right_left >= MIN_LUNG_SEPARATION_MM)


def _roi_box(lungs: np.ndarray, spacing_zyx: np.ndarray, margin_mm: float) -> Box:
    """Inclusive (x, y, z) index bounds of the lungs (LPS-ordered) grown by the margins, clipped to the image."""
    margins_mm = (min(margin_mm, SLICE_MARGIN_MAX_MM), margin_mm, margin_mm)
    grown = []
    for axis, (lo, hi) in zip((2, 1, 0), _bounding_box(lungs)):
        step = int(math.ceil(margins_mm[axis] / spacing_zyx[axis] - 1e-6))
        grown.append((max(0, lo - step), min(lungs.shape[axis] - 1, hi + step)))
    return grown[0], grown[1], grown[2]


def _bounding_box(mask: np.ndarray) -> Box:
    """Inclusive (x, y, z) index bounds of the nonzero voxels of a (z, y, x) array."""
    bounds = []
    for axis in (2, 1, 0):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append((int(present[0]), int(present[-1])))
    return bounds[0], bounds[1], bounds[2]


def _physical_extent(image: sitk.Image, box: Box) -> list[list[float]]:
    """[min, max] per physical axis (mm) of the box's outer voxel edges."""
    corners = [
        image.TransformContinuousIndexToPhysicalPoint((x, y, z))
        for x in (box[0][0] - 0.5, box[0][1] + 0.5)
        for y in (box[1][0] - 0.5, box[1][1] + 0.5)
        for z in (box[2][0] - 0.5, box[2][1] + 0.5)
    ]
    points = np.array(corners)
    return [[float(points[:, axis].min()), float(points[:, axis].max())] for axis in range(3)]
