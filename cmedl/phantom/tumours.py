"""Tumours of the phantoms: their sites, placement and painting, and measuring their contrast.

Sites (strata) are :data:`LOCATIONS`: abutting the mediastinum, abutting the chest wall, or in the lung
parenchyma away from both. Without requested sites a chest gets 1-3 lobulated tumours of 1-6 cm at random
sites (:data:`LOCATION_ODDS`), so about 60% abut the mediastinum or the chest wall, where CT shows them
with only a few HU of contrast; ``tumour_locations`` asks for one tumour per listed site instead.
:class:`_TumourPainter` paints them as :attr:`Tissue.TUMOUR <cmedl.phantom.anatomy.Tissue.TUMOUR>` into a
drawn chest's tissue map ``(z, y, x)`` and numbers them 1, 2, ... in painting order (the instance map).

The CT contrast option (``ct_tumour_contrast``, checked by :func:`_check_contrast`, at most
:data:`CT_TUMOUR_CONTRAST_LIMIT_HU`) sets the CT tumour's mean exactly that many HU from mediastinal soft
tissue, and keeps the tissues it abuts within -2..+4 HU of that level; it acts in the CT render
(:mod:`cmedl.phantom.rendering`). :func:`measure_tumour_contrast` measures each tumour's contrast, noise and
CNR against the tissue around it on a rendered image (HU for CT, arbitrary units for MR); it imports the
renderer's blur width to keep its reference voxels clear of partial volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from cmedl.errors import ConfigError
from cmedl.phantom.anatomy import _HARD_OR_OUTSIDE, _LUNG_ONLY, Tissue, _ChestBuilder, _lut
from cmedl.phantom.rendering import _blur_sigma, _check_modality

TUMOUR_DIAMETER_MM = (14.0, 55.0)  # drawn range; clipping by bone keeps measured diameters within 1-6 cm
LOCATIONS = ("mediastinum", "chest_wall", "parenchyma")
LOCATION_ODDS = (0.35, 0.25, 0.40)
CT_TUMOUR_CONTRAST_LIMIT_HU = 200.0  # |ct_tumour_contrast| allowed; beyond it the tumour is no longer soft tissue

# What a lung borders, for tumour sites: the only fat next to a lung is epicardial, so it counts as
# mediastinum; the diaphragm is neither mediastinum nor chest wall.
MEDIASTINAL_TISSUES = (Tissue.MEDIASTINUM, Tissue.MYOCARDIUM, Tissue.BLOOD, Tissue.FAT)
CHEST_WALL_TISSUES = (Tissue.MUSCLE, Tissue.CORTICAL_BONE, Tissue.MARROW, Tissue.CARTILAGE)
LUNG_FIELD_TISSUES = (Tissue.LUNG, Tissue.LUNG_VESSEL, Tissue.AIRWAY, Tissue.AIRWAY_WALL)
_MEDIASTINAL = _lut(MEDIASTINAL_TISSUES)
_CHEST_WALL = _lut(CHEST_WALL_TISSUES)
_LUNG_FIELD = _lut(LUNG_FIELD_TISSUES)
_TUMOUR_CAN_REPLACE = _lut([t for t in Tissue if t not in _HARD_OR_OUTSIDE])


class _TumourPainter:
    """Places the tumours of one drawn chest and paints them into its tissue map.

    It draws on the chest's own random generator, after the anatomy, so the one seed fixes both.
    ``tumour_masks`` holds each tumour's voxel box and mask, in painting order, for :meth:`instance_map`.
    """

    def __init__(self, chest: _ChestBuilder, tumour_locations: tuple[str, ...] | None = None) -> None:
        self.chest = chest
        self.rng = chest.rng
        self.tumour_locations = tumour_locations
        self.tumour_masks: list[tuple[tuple[slice, slice, slice], np.ndarray]] = []  # in painting order

    def paint(self) -> list[dict]:
        """Place and paint the tumours; returns their descriptions measured on the painted voxels.

        Without requested sites: 1-3 tumours at random sites. With them: one tumour per requested site.
        """
        rng = self.rng
        if self.tumour_locations is None:
            wanted = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
            requests = [
                (str(rng.choice(LOCATIONS, p=LOCATION_ODDS)), float(rng.uniform(*TUMOUR_DIAMETER_MM)))
                for _ in range(wanted)
            ]
            fallback_sites = LOCATIONS
        else:
            requests = [(location, float(rng.uniform(*TUMOUR_DIAMETER_MM))) for location in self.tumour_locations]
            fallback_sites = tuple(dict.fromkeys(self.tumour_locations))  # never a site that was not asked for
        placed: list[tuple[np.ndarray, float]] = []
        painted = [found for found in (self._place_tumour(*request, placed) for request in requests) if found]
        # On an unusual grid none may fit: then the smallest tumour goes wherever it fits.
        for location in fallback_sites:
            if painted:
                break
            found = self._place_tumour(location, TUMOUR_DIAMETER_MM[0], placed)
            painted += [found] if found else []
        return [{"id": number, **tumour} for number, tumour in enumerate(painted, start=1)]

    def instance_map(self) -> np.ndarray:
        """uint8 ``(z, y, x)``: tumour k (1-based, painting order) as k where it is in the tissue map, else 0."""
        instances = np.zeros(self.chest.tissues.shape, dtype=np.uint8)
        for number, (box, mask) in enumerate(self.tumour_masks, start=1):
            instances[box][mask] = number  # a voxel painted twice belongs to the later tumour
        for box, _ in self.tumour_masks:
            instances[box][self.chest.tissues[box] != Tissue.TUMOUR] = 0
        return instances

    def _place_tumour(self, location: str, diameter: float, placed: list) -> dict | None:
        """Find a site, paint one tumour there and describe it; None when no site fits."""
        centre = None
        for attempt in range(12):
            if attempt == 8:
                diameter = max(TUMOUR_DIAMETER_MM[0], diameter * 0.6)  # a smaller one may still fit
            centre = self._tumour_site(location, diameter / 2, placed)
            if centre is not None:
                break
        if centre is None:
            return None
        placed.append((centre, diameter / 2))
        box, mask = self._tumour_blob(centre, diameter / 2)
        region = self.chest.tissues[box]
        mask &= _TUMOUR_CAN_REPLACE[region]
        # Bone is never replaced; a sliver cut off beyond a rib would read as a second tumour, so drop it.
        pieces, piece_count = ndimage.label(mask)
        if piece_count > 1:
            mask = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
        if not mask.any():
            return None
        region[mask] = Tissue.TUMOUR
        self.tumour_masks.append((box, mask))
        return self._describe(box, mask, location)

    def _tumour_site(self, location: str, radius: float, placed: list) -> np.ndarray | None:
        """A centre for a tumour of ``radius`` mm at ``location``, chosen on one axial slice, or None."""
        rng, chest = self.rng, self.chest
        sz = chest.spacing[2]
        # Keep the whole tumour inside the covered slices, within the lungs' middle heights.
        z_low = max(chest.z_of(0.15), chest.zs[0] + radius)
        z_high = min(chest.z_of(0.85), chest.zs[-1] - radius)
        candidates_z = np.flatnonzero((chest.zs >= z_low) & (chest.zs <= z_high))
        if candidates_z.size == 0:
            candidates_z = np.flatnonzero((chest.zs >= chest.z_of(0.1)) & (chest.zs <= chest.z_of(0.9)))
            if candidates_z.size == 0:
                return None
        index = int(rng.choice(candidates_z))
        tissue_slice = chest.tissues[index]
        field = _LUNG_FIELD[tissue_slice]
        if not field.any():
            return None
        distance, nearest = ndimage.distance_transform_edt(field, sampling=chest.spacing[1::-1], return_indices=True)
        nearest_tissue = tissue_slice[nearest[0], nearest[1]]
        if location == "parenchyma":
            chosen = field & (distance > 1.35 * radius + 3.0)
        else:
            wanted = _MEDIASTINAL if location == "mediastinum" else _CHEST_WALL
            chosen = field & (distance > 0.45 * radius) & (distance < 0.75 * radius) & wanted[nearest_tissue]
        rows, cols = np.nonzero(chosen)
        if rows.size == 0:
            return None
        gap = max(6.0, 2 * sz, 2 * chest.spacing[0])
        for pick in rng.permutation(rows.size)[:20]:
            centre = np.array([chest.xs[cols[pick]], chest.ys[rows[pick]], chest.zs[index]], dtype=np.float64)
            if all(np.linalg.norm(centre - other) > 1.35 * (radius + other_r) + gap for other, other_r in placed):
                return centre
        return None

    def _tumour_blob(self, centre: np.ndarray, radius: float) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """A lobulated blob of about the volume of a sphere of ``radius`` mm: a rough ellipsoid plus lobes.

        Returns the voxel box (z, y, x slices) and the blob's boolean mask inside it. The blob is rescaled
        once so that its voxel volume matches the requested sphere.
        """
        rng, chest = self.rng, self.chest
        elongation = rng.uniform(0.85, 1.18, size=3)
        elongation /= elongation.prod() ** (1 / 3)
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        lobes = []
        for _ in range(int(rng.integers(2, 5))):
            direction = rng.normal(size=3)
            lobes.append((direction / np.linalg.norm(direction) * rng.uniform(0.5, 0.7), rng.uniform(0.3, 0.5)))
        roughness_seed = int(rng.integers(2**31))
        reach = 1.75 * radius + max(chest.spacing)
        box = chest.index_box(centre - reach, centre + reach)
        x, y, z = chest.box_coordinates(box)
        dx, dy, dz = x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])
        u, v, w = (
            dx * np.float32(rotation[0, i]) + dy * np.float32(rotation[1, i]) + dz * np.float32(rotation[2, i])
            for i in range(3)
        )
        roughness = np.random.default_rng(roughness_seed).standard_normal(u.shape, dtype=np.float32)
        sigma = [max(0.25 * radius / spacing, 0.5) for spacing in chest.spacing[::-1]]
        roughness = ndimage.gaussian_filter(roughness, sigma)
        roughness *= 0.06 / max(float(roughness.std()), 1e-6)
        np.clip(roughness, -0.15, 0.15, out=roughness)
        boundary = (1 + roughness) ** 2
        target_voxels = 4 / 3 * math.pi * radius**3 / float(np.prod(chest.spacing))

        def blob(scale: float) -> np.ndarray:
            r = radius * scale
            ellipsoid = (u / (r * elongation[0])) ** 2 + (v / (r * elongation[1])) ** 2 + (w / (r * elongation[2])) ** 2
            inside = ellipsoid < boundary
            for offset, lobe_radius in lobes:
                lobe = (u - offset[0] * r) ** 2 + (v - offset[1] * r) ** 2 + (w - offset[2] * r) ** 2
                inside |= lobe < (lobe_radius * r) ** 2
            return inside

        scale = (target_voxels / max(int(blob(1.0).sum()), 1)) ** (1 / 3)
        return box, blob(float(np.clip(scale, 0.75, 1.15)))

    def _describe(self, box, mask: np.ndarray, location: str) -> dict:
        chest = self.chest
        voxels = int(mask.sum())
        volume_mm3 = voxels * float(np.prod(chest.spacing))
        zz, yy, xx = np.nonzero(mask)
        centre = [
            float(chest.xs[box[2]][xx].mean()),
            float(chest.ys[box[1]][yy].mean()),
            float(chest.zs[box[0]][zz].mean()),
        ]
        return {
            "centre_mm": [round(value, 2) for value in centre],
            "diameter_mm": round((6 * volume_mm3 / math.pi) ** (1 / 3), 2),
            "location": location,
            "volume_ml": round(volume_mm3 / 1000, 3),
        }


# Tissues that count as the soft tissue next to a tumour when its contrast is measured.
CONTRAST_REFERENCE_TISSUES = (
    Tissue.MEDIASTINUM,
    Tissue.MYOCARDIUM,
    Tissue.BLOOD,
    Tissue.MUSCLE,
    Tissue.DIAPHRAGM,
    Tissue.LUNG_VESSEL,
    Tissue.AIRWAY_WALL,
    Tissue.LIVER,
    Tissue.ABDOMEN,
)
_REFERENCE_REACH_MM = 3.0  # how far out from a tumour its surroundings are sampled (at least 3 pixels)
_MIN_MEASURED_VOXELS = 20  # fewer voxels than this give too noisy a mean to use


def measure_tumour_contrast(image: sitk.Image, tissues: sitk.Image, instances: sitk.Image, modality: str) -> list[dict]:
    """Measure each tumour's contrast against its surroundings on a rendered phantom image.

    Per tumour ``id`` of ``instances`` (see :attr:`PhantomCase.instances`), slice by slice (slices are
    thick, so everything is in-plane):

    * interior: the tumour's voxels at least 2 pixels inside its border, or all of them when fewer than 20
      remain;
    * reference: voxels 2 pixels to 3 mm (at least 3 pixels) outside the tumour whose tissue is one of
      :data:`CONTRAST_REFERENCE_TISSUES`, skipping those within the partial-volume blur of any other
      tissue (lung, fat, bone). When fewer than 20 are left, the tumour is surrounded by lung and the
      adjacent lung voxels are the reference instead.

    Returns one dict per tumour, by id: ``id``, ``reference`` ("soft_tissue" or "lung"), ``contrast``
    (mean interior minus mean reference), ``noise`` (standard deviation of the reference) and ``cnr``
    (contrast / noise), rounded to 3 decimals; HU for CT, arbitrary units for MR. A value that cannot be
    measured (no reference voxels at all) is None.
    """
    _check_modality(modality)
    values = sitk.GetArrayViewFromImage(image)
    codes = sitk.GetArrayViewFromImage(tissues)
    ids = sitk.GetArrayViewFromImage(instances)
    if not values.shape == codes.shape == ids.shape:
        raise ConfigError(
            f"image, tissue map and instance map differ in size: {values.shape}, {codes.shape}, {ids.shape}"
        )
    sx, sy, _ = image.GetSpacing()
    pixel = max(sx, sy)
    reach_mm = max(_REFERENCE_REACH_MM, 3 * pixel)
    # A voxel this many pixels from another tissue is clear of the in-plane partial-volume blur.
    rim = max(1, math.ceil(3 * _blur_sigma((sx, sy)) - 0.5))
    margin = math.ceil(reach_mm / min(sx, sy)) + rim + 2
    soft_tissue = _lut(CONTRAST_REFERENCE_TISSUES)
    results = []
    for number, found in enumerate(ndimage.find_objects(ids), start=1):
        if found is None:
            continue
        rows = slice(max(found[1].start - margin, 0), found[1].stop + margin)
        cols = slice(max(found[2].start - margin, 0), found[2].stop + margin)
        box = (found[0], rows, cols)
        tumour = ids[box] == number
        box_values = values[box].astype(np.float64)
        box_codes = codes[box]

        interior = _tumour_interior(tumour)

        distance = np.stack(
            [
                ndimage.distance_transform_edt(~plane, sampling=(sy, sx))
                if plane.any()
                else np.full(plane.shape, np.inf)
                for plane in tumour
            ]
        )
        ring = (distance > 1.5 * pixel) & (distance <= reach_mm)  # beyond the tumour's own blurred rim
        reference_name, reference = "soft_tissue", _clear_of_others(box_codes, soft_tissue, ring, rim)
        if reference.sum() < _MIN_MEASURED_VOXELS:
            reference_name, reference = "lung", _clear_of_others(box_codes, _LUNG_ONLY, ring, rim)
            if reference.sum() < _MIN_MEASURED_VOXELS:
                reference = ring & _LUNG_ONLY[box_codes]  # a lung full of vessels: take what there is
        contrast = noise = cnr = None
        if reference.any():
            contrast = float(box_values[interior].mean() - box_values[reference].mean())
            noise = float(box_values[reference].std())
            cnr = contrast / noise if noise > 0 else None
        results.append(
            {
                "id": number,
                "reference": reference_name,
                "contrast": None if contrast is None else round(contrast, 3),
                "noise": None if noise is None else round(noise, 3),
                "cnr": None if cnr is None else round(cnr, 3),
            }
        )
    return results


def _tumour_interior(tumour: np.ndarray) -> np.ndarray:
    """The tumour's voxels 2 pixels in from its in-plane border, or 1 pixel when that leaves too few.

    On coarse grids a 2-pixel erosion may leave almost nothing, and the border pixels are partial volume
    with lung (tens of HU off on CT): a few voxels 1 pixel in are a better estimate than all of them,
    which are used only when no voxel is 1 pixel in.
    """
    in_plane = np.ones((1, 3, 3), dtype=bool)
    padded = np.pad(tumour, ((0, 0), (2, 2), (2, 2)))  # so the box edge does not count as tumour border
    fallback = tumour
    for depth in (2, 1):
        interior = ndimage.binary_erosion(padded, in_plane, iterations=depth)[:, 2:-2, 2:-2]
        if interior.sum() >= _MIN_MEASURED_VOXELS:
            return interior
        if interior.any() and fallback is tumour:
            fallback = interior
    return fallback


def _clear_of_others(codes: np.ndarray, allowed: np.ndarray, ring: np.ndarray, rim: int) -> np.ndarray:
    """Ring voxels of an ``allowed`` tissue at least ``rim + 1`` pixels in-plane from any tissue that is neither
    allowed nor tumour (whose values would leak in through the partial-volume blur)."""
    wanted = allowed[codes]
    others = ~(wanted | (codes == Tissue.TUMOUR))
    near_others = ndimage.binary_dilation(others, np.ones((1, 3, 3), dtype=bool), iterations=rim)
    return ring & wanted & ~near_others


def _check_contrast(contrast: float | None) -> float | None:
    if contrast is None:
        return None
    try:
        value = float(contrast)
    except (TypeError, ValueError):
        raise ConfigError(f"CT tumour contrast must be a number of HU, got {contrast!r}") from None
    if not math.isfinite(value) or abs(value) > CT_TUMOUR_CONTRAST_LIMIT_HU:
        limit = CT_TUMOUR_CONTRAST_LIMIT_HU
        raise ConfigError(f"CT tumour contrast must be within -{limit:g}..{limit:g} HU, got {contrast!r}")
    return value


def _check_locations(locations: Sequence[str] | None) -> tuple[str, ...] | None:
    if locations is None:
        return None
    if isinstance(locations, str):  # a bare string would be read as a list of letters
        raise ConfigError(f"tumour locations must be a list of sites, got the string {locations!r}")
    chosen = tuple(locations)
    if not chosen:
        raise ConfigError("tumour locations must name at least one site")
    for location in chosen:
        if location not in LOCATIONS:
            raise ConfigError(f"unknown tumour location {location!r}; use one of {', '.join(LOCATIONS)}")
    return chosen
