"""Synthetic unpaired CT and T2-weighted MRI chest phantoms with known lung tumours.

A phantom is built in two steps. First an anatomy is drawn from the seed as a tissue map (one
:class:`Tissue` code per voxel): body with subcutaneous fat and muscle, ribs and costal cartilage, sternum,
spine, two lungs with branching vessels and bronchi joined to the hila, trachea and main bronchi, heart,
aorta, venae cavae and pulmonary arteries, diaphragm, liver, and 1-3 lobulated tumours of 1-6 cm. About
60% of the tumours abut the mediastinum or the chest wall, where CT shows them with only a few HU of
contrast. Then the tissue map is rendered in one modality:

* CT: int16 Hounsfield units, lung parenchyma around -850 HU with texture and a dependent density
  gradient, tumour a few HU below mediastinal soft tissue, partial-volume blur and slightly correlated
  Gaussian noise (sigma 10-25 HU).
* MR: float32 arbitrary units (about 0..1000) with T2-weighted contrast: bright tumour, fat and fluid,
  dark lungs, flow voids in the heart and vessels, a smooth multiplicative coil bias and Rician noise.

The anatomy depends only on ``seed``, ``size``, ``slices``, ``spacing`` and ``tumour_locations``; the
modality changes only how tissues look. ``make_phantom("ct", s)`` and ``make_phantom("mr", s)`` are
therefore a *paired* case, while :func:`write_phantom_dataset` derives independent seeds per modality and
case so that its CT and MR sets are unpaired, as in the CMEDL training setting.

Tumour options: ``ct_tumour_contrast`` sets the CT tumour's mean exactly that many HU from mediastinal soft
tissue (and keeps the tissues it abuts within -2..+4 HU of that level); ``tumour_locations`` asks for one
tumour per listed site instead of random ones. ``PhantomCase.instances`` numbers the tumours, and
:func:`measure_tumour_contrast` measures each one's contrast, noise and CNR against the tissue around it.
:func:`write_phantom_dataset` can stratify tumour sites, add the MR of each CT case's anatomy, and writes
the measurements to ``tumours.csv``.

Grid: at a 512 matrix the in-plane spacing is 0.6-1.0 mm, chosen so that the 307-512 mm field of view
fits the drawn patient, and the slice thickness is drawn among 2-5 mm. A smaller ``size`` keeps the field
of view and scales the in-plane spacing up by 512/size, so small phantoms are coarser than real scans.
Arrays are SimpleITK order ``(z, y, x)``; physical coordinates are LPS millimetres (x to the patient's
left, y posterior, z superior), identity direction, field of view centred on x = y = 0, negative z origin.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from cmedl.errors import ConfigError
from cmedl.memory import available_ram_bytes, describe_bytes
from cmedl.volumes import OutputSet, atomic_output, write_labelmap, write_volume

REFERENCE_MATRIX = 512
IN_PLANE_SPACING_MM = (0.6, 1.0)  # drawn range at the reference matrix
SLICE_THICKNESSES_MM = (2.0, 2.5, 3.0, 4.0, 5.0)
MAX_SLICES = 200
MIN_SIZE = 32
MAX_SIZE = 4096  # eight times the reference matrix
# Peak memory per voxel while one case is built, rendered and written (about 10 bytes measured at 64 and 256).
PEAK_BYTES_PER_VOXEL = 16
TUMOUR_DIAMETER_MM = (14.0, 55.0)  # drawn range; clipping by bone keeps measured diameters within 1-6 cm
LOCATIONS = ("mediastinum", "chest_wall", "parenchyma")
LOCATION_ODDS = (0.35, 0.25, 0.40)
CT_TUMOUR_CONTRAST_LIMIT_HU = 200.0  # |ct_tumour_contrast| allowed; beyond it the tumour is no longer soft tissue
_CHUNK_SLICES = 8  # rendering works on slabs so temporaries stay small and reused


class Tissue(IntEnum):
    """Tissue codes of a phantom's tissue map (``PhantomCase.tissues``)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    CORTICAL_BONE = 3
    MARROW = 4
    CARTILAGE = 5
    LUNG = 6
    LUNG_VESSEL = 7
    AIRWAY = 8
    AIRWAY_WALL = 9
    MYOCARDIUM = 10
    BLOOD = 11  # heart chambers and great vessels
    MEDIASTINUM = 12
    LIVER = 13
    ABDOMEN = 14
    SPINAL_CANAL = 15
    TABLE = 16
    TUMOUR = 17
    DIAPHRAGM = 18


# What a lung borders, for tumour sites: the only fat next to a lung is epicardial, so it counts as
# mediastinum; the diaphragm is neither mediastinum nor chest wall.
MEDIASTINAL_TISSUES = (Tissue.MEDIASTINUM, Tissue.MYOCARDIUM, Tissue.BLOOD, Tissue.FAT)
CHEST_WALL_TISSUES = (Tissue.MUSCLE, Tissue.CORTICAL_BONE, Tissue.MARROW, Tissue.CARTILAGE)
LUNG_FIELD_TISSUES = (Tissue.LUNG, Tissue.LUNG_VESSEL, Tissue.AIRWAY, Tissue.AIRWAY_WALL)

# Per tissue: (CT mean HU, CT texture HU, MR mean, MR texture as a fraction of the mean). Means get a
# per-case jitter; soft tissues of the mediastinum share one drawn level so the tumour contrast is controlled.
_APPEARANCE = {
    Tissue.AIR: (-1000.0, 0.0, 0.0, 0.0),
    Tissue.FAT: (-100.0, 8.0, 500.0, 0.05),
    Tissue.MUSCLE: (48.0, 4.0, 165.0, 0.05),
    Tissue.CORTICAL_BONE: (900.0, 120.0, 15.0, 0.2),
    Tissue.MARROW: (280.0, 60.0, 400.0, 0.1),
    Tissue.CARTILAGE: (120.0, 20.0, 220.0, 0.08),
    Tissue.LUNG: (-850.0, 35.0, 28.0, 0.3),
    Tissue.LUNG_VESSEL: (40.0, 3.0, 18.0, 0.1),
    Tissue.AIRWAY: (-990.0, 5.0, 5.0, 0.0),
    Tissue.AIRWAY_WALL: (50.0, 5.0, 120.0, 0.05),
    Tissue.MYOCARDIUM: (46.0, 3.0, 150.0, 0.05),
    Tissue.BLOOD: (40.0, 2.0, 50.0, 0.15),
    Tissue.MEDIASTINUM: (45.0, 4.0, 290.0, 0.06),
    Tissue.LIVER: (58.0, 4.0, 175.0, 0.05),
    Tissue.ABDOMEN: (42.0, 6.0, 340.0, 0.06),
    Tissue.SPINAL_CANAL: (15.0, 3.0, 880.0, 0.03),
    Tissue.TABLE: (60.0, 0.0, 0.0, 0.0),
    Tissue.TUMOUR: (39.0, 6.0, 660.0, 0.1),
    Tissue.DIAPHRAGM: (48.0, 4.0, 165.0, 0.05),
}


@dataclass
class PhantomCase:
    """One synthetic chest volume with its tumour ground truth.

    Attributes:
        image: CT as int16 HU, or MR as float32 arbitrary units; size (x, y, z) = (size, size, slices).
        label: uint8 {0, 1} tumour mask on the image's grid.
        tumours: per tumour ``centre_mm`` (physical x, y, z of the painted voxels' centroid),
            ``diameter_mm`` (diameter of the sphere with the painted volume), ``location``
            ("mediastinum", "chest_wall" or "parenchyma") and ``volume_ml``.
        tissues: uint8 :class:`Tissue` codes on the image's grid (the anatomy before rendering).
        instances: uint8 map on the image's grid where tumour ``id`` k (1-based, in painting order, the
            ``"id"`` of its entry in ``tumours``) has the value k and everything else 0.
    """

    image: sitk.Image
    label: sitk.Image
    tumours: list[dict]
    tissues: sitk.Image | None = None
    instances: sitk.Image | None = None


def size_problem(size: int, slices: int | None = None, name: str = "phantom size") -> str:
    """Why a ``size`` x ``size`` phantom cannot be made here (one line starting with ``name``), or ``""``.

    Checked before anything is allocated: the range :data:`MIN_SIZE`..:data:`MAX_SIZE` and the memory one case
    needs (``size`` squared times ``slices``, at most :data:`MAX_SLICES`, times :data:`PEAK_BYTES_PER_VOXEL`)
    against the memory free now.
    """
    if size < MIN_SIZE:
        return f"{name} must be at least {MIN_SIZE}, got {size}"
    if size > MAX_SIZE:
        return f"{name} must be at most {MAX_SIZE}, got {size}"
    needed = size * size * (slices or MAX_SLICES) * PEAK_BYTES_PER_VOXEL
    free = available_ram_bytes()
    if free is not None and needed > free:
        return (
            f"{name} {size} needs about {describe_bytes(needed)} of memory per case, more than the "
            f"{describe_bytes(free)} free; choose a smaller size"
        )
    return ""


def make_phantom(
    modality: str,
    seed: int,
    size: int = 512,
    slices: int | None = None,
    spacing: tuple[float, float, float] | None = None,
    *,
    ct_tumour_contrast: float | None = None,
    tumour_locations: Sequence[str] | None = None,
) -> PhantomCase:
    """Generate one phantom chest volume.

    Args:
        modality: "ct" or "mr" ("mri" is accepted).
        seed: any non-negative integer; the same arguments give bit-identical arrays.
        size: in-plane matrix (size x size voxels); below 512 the in-plane spacing is coarser than real.
        slices: number of axial slices; default covers the lungs from apex to base with margins
            (at most 200 slices); a different count keeps the chest centred.
        spacing: (x, y, z) voxel spacing in mm, overriding the random draw.
        ct_tumour_contrast: CT only: the tumour's mean HU minus the mediastinal soft-tissue level, exactly
            (e.g. -15). The tissues a tumour abuts (blood, lung vessels, myocardium, muscle, diaphragm) are
            then drawn within -2..+4 HU of that level so they stay apart from the tumour. None keeps the
            default draw (tumour 3-9 HU below the level). MR ignores it.
        tumour_locations: the sites of the tumours, one tumour per entry, among :data:`LOCATIONS`, instead
            of a random count and sites; a tumour that does not fit even when retried smaller is left out.
            The anatomy still does not depend on the modality.

    Returns:
        a :class:`PhantomCase`; arrays are ``(slices, size, size)`` in numpy order.
    """
    modality = _check_modality(modality)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"phantom seed must be a non-negative integer, got {seed!r}")
    problem = size_problem(size, slices)
    if problem:
        raise ConfigError(problem)
    if slices is not None and slices < 1:
        raise ConfigError(f"phantom slices must be at least 1, got {slices}")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ConfigError(f"phantom spacing must be three positive numbers in mm (x, y, z), got {spacing!r}")
    ct_tumour_contrast = _check_contrast(ct_tumour_contrast)
    locations = _check_locations(tumour_locations)

    # The anatomy draws nothing that depends on the modality, so CT and MR of one seed share it; the
    # CT-only contrast option acts in the CT render.
    anatomy_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    chest = _ChestBuilder(anatomy_rng, int(size), slices, spacing, locations)
    tissues, tumours = chest.build()
    render_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1 if modality == "ct" else 2]))
    if modality == "ct":
        array = _render_ct(tissues, chest, render_rng, ct_tumour_contrast)
    else:
        array = _render_mr(tissues, chest, render_rng)
    return PhantomCase(
        image=_image_on(array, chest),
        label=_image_on((tissues == Tissue.TUMOUR).astype(np.uint8), chest),
        tumours=tumours,
        tissues=_image_on(tissues, chest),
        instances=_image_on(chest.instance_map(), chest),
    )


# Tissues that count as the soft tissue next to a tumour when its contrast is measured.
CONTRAST_REFERENCE_TISSUES = (
    Tissue.MEDIASTINUM, Tissue.MYOCARDIUM, Tissue.BLOOD, Tissue.MUSCLE, Tissue.DIAPHRAGM,
    Tissue.LUNG_VESSEL, Tissue.AIRWAY_WALL, Tissue.LIVER, Tissue.ABDOMEN,
)
_REFERENCE_REACH_MM = 3.0  # how far out from a tumour its surroundings are sampled (at least 3 pixels)
_MIN_MEASURED_VOXELS = 20  # fewer voxels than this give too noisy a mean to use


def measure_tumour_contrast(image: sitk.Image, tissues: sitk.Image, instances: sitk.Image,
                            modality: str) -> list[dict]:
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
        raise ConfigError(f"image, tissue map and instance map differ in size: {values.shape}, {codes.shape}, "
                          f"{ids.shape}")
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

        distance = np.stack([ndimage.distance_transform_edt(~plane, sampling=(sy, sx)) if plane.any()
                             else np.full(plane.shape, np.inf) for plane in tumour])
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
        results.append({
            "id": number,
            "reference": reference_name,
            "contrast": None if contrast is None else round(contrast, 3),
            "noise": None if noise is None else round(noise, 3),
            "cnr": None if cnr is None else round(cnr, 3),
        })
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


def case_seed(seed: int, modality: str, index: int) -> int:
    """The seed of case ``index`` of ``modality`` in a dataset drawn with ``seed``.

    Seeds come from a ``SeedSequence`` keyed by (seed, modality, index), so CT case i and MR case i are
    independent anatomies.
    """
    key = 0 if _check_modality(modality) == "ct" else 1
    words = np.random.SeedSequence([int(seed), key, int(index)]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


# Columns of ``tumours.csv``: one row per tumour of a dataset; measured values are empty where not measured.
TUMOUR_TABLE_COLUMNS = (
    "case", "modality", "tumour_id", "stratum", "volume_ml", "diameter_mm", "centre_x_mm", "centre_y_mm",
    "centre_z_mm", "ct_contrast_hu", "ct_noise_hu", "ct_cnr", "ct_reference", "mr_contrast", "mr_noise",
    "mr_cnr", "mr_reference",
)


def write_phantom_dataset(
    out: str | Path,
    n_ct: int,
    n_mr: int,
    seed: int,
    size: int = 512,
    progress: Callable[[int, int], None] | None = None,
    *,
    ct_tumour_contrast: float | None = None,
    stratified: bool = False,
    paired_mr: bool = False,
) -> dict:
    """Write an unpaired CT/MR phantom dataset and return its description.

    Layout: ``out/ct/images/ct_0000.nii.gz`` with its label ``out/ct/labels/ct_0000.nii.gz`` and its
    tumour instance map ``out/ct/instances/ct_0000.nii.gz`` (uint8, tumour k = k), the same images and
    labels under ``out/mr/`` with ``mr_0000``, ``out/phantoms.json`` (the returned dict: per case its
    name, modality, seed, requested tumour sites, relative file paths, size, spacing, origin and tumours)
    and ``out/tumours.csv`` (one row per tumour, :data:`TUMOUR_TABLE_COLUMNS`). Every file is written
    under a temporary name and verified; a case's files are renamed together only once the whole case
    is written, so a failed write (exit 6) leaves complete cases only. ``progress(done, total)`` is called
    after each case.

    Each tumour is measured with :func:`measure_tumour_contrast` on its case's image: ``ct_contrast_hu``,
    ``ct_noise_hu``, ``ct_cnr``, ``ct_reference`` for CT cases and ``mr_contrast``, ``mr_noise``,
    ``mr_cnr``, ``mr_reference`` where the MR of that anatomy is rendered; unmeasured values are None.

    Args:
        ct_tumour_contrast: the CT tumours' contrast to mediastinal soft tissue in HU (see
            :func:`make_phantom`), within -200..200; None keeps the default 3-9 HU below it.
        stratified: case i of each modality gets two tumours, at ``LOCATIONS[i % 3]`` and
            ``LOCATIONS[(i + 1) % 3]``, so every three cases hold each site twice.
        paired_mr: also write ``out/ct/paired_mr/ct_0000.nii.gz``, the MR of each CT case's anatomy on
            the CT's grid, and measure its tumours. The CT and MR sets stay unpaired (``"paired"`` is
            False); the paired MR is an extra, for experiments that need a perfect translation to compare
            with.
    """
    if n_ct < 0 or n_mr < 0:
        raise ConfigError(f"phantom case counts must not be negative (got {n_ct} CT, {n_mr} MR)")
    if seed < 0:
        raise ConfigError(f"phantom seed must be a non-negative integer, got {seed!r}")
    problem = size_problem(size)
    if problem:
        raise ConfigError(problem)
    ct_tumour_contrast = _check_contrast(ct_tumour_contrast)
    out = Path(out)
    total = n_ct + n_mr
    cases = []
    for modality, count in (("ct", n_ct), ("mr", n_mr)):
        for index in range(count):
            name = f"{modality}_{index:04d}"
            seed_of_case = case_seed(seed, modality, index)
            locations = [LOCATIONS[index % 3], LOCATIONS[(index + 1) % 3]] if stratified else None
            case = make_phantom(modality, seed_of_case, size=size, ct_tumour_contrast=ct_tumour_contrast,
                                tumour_locations=locations)
            image_path = Path(modality) / "images" / f"{name}.nii.gz"
            label_path = Path(modality) / "labels" / f"{name}.nii.gz"
            entry = {
                "name": name,
                "modality": modality,
                "seed": seed_of_case,
                "tumour_locations": locations,
                "image": image_path.as_posix(),
                "label": label_path.as_posix(),
            }
            # A case's files appear together once all are written and verified: a failure (a full disk)
            # leaves the earlier, complete cases and nothing of this one under final names.
            with OutputSet():
                write_volume(case.image, out / image_path)
                write_labelmap(case.label, out / label_path)
                measured = {modality: measure_tumour_contrast(case.image, case.tissues, case.instances, modality)}
                if modality == "ct":
                    instances_path = Path("ct") / "instances" / f"{name}.nii.gz"
                    write_labelmap(case.instances, out / instances_path)  # a plain uint8 cast: ids are kept
                    entry["instances"] = instances_path.as_posix()
                    if paired_mr:
                        mr = make_phantom("mr", seed_of_case, size=size, tumour_locations=locations)
                        _check_same_anatomy(case, mr, name)
                        paired_path = Path("ct") / "paired_mr" / f"{name}.nii.gz"
                        write_volume(mr.image, out / paired_path)
                        entry["paired_mr"] = paired_path.as_posix()
                        measured["mr"] = measure_tumour_contrast(mr.image, mr.tissues, mr.instances, "mr")
            entry.update({
                "size": list(case.image.GetSize()),
                "spacing_mm": [round(value, 6) for value in case.image.GetSpacing()],
                "origin_mm": [round(value, 6) for value in case.image.GetOrigin()],
                "tumours": [{**tumour, **_measured_columns(measured, tumour["id"])} for tumour in case.tumours],
            })
            cases.append(entry)
            if progress is not None:
                progress(len(cases), total)
    description = {
        "generator": "cmedl.phantom",
        "seed": int(seed),
        "size": int(size),
        "n_ct": int(n_ct),
        "n_mr": int(n_mr),
        "paired": False,
        "paired_mr": bool(paired_mr),
        "stratified": bool(stratified),
        "ct_tumour_contrast": ct_tumour_contrast,
        "cases": cases,
    }
    with OutputSet():  # the table and the description name the same cases: both or neither
        with atomic_output(out / "tumours.csv") as temp:
            temp.write_text(_tumour_table(cases), encoding="utf-8")
        with atomic_output(out / "phantoms.json") as temp:
            temp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return description


def _check_same_anatomy(ct: PhantomCase, mr: PhantomCase, name: str) -> None:
    """The paired MR must be the CT's anatomy on the CT's grid, or it is no pair at all."""
    same_grid = (ct.image.GetSize() == mr.image.GetSize() and ct.image.GetSpacing() == mr.image.GetSpacing()
                 and ct.image.GetOrigin() == mr.image.GetOrigin())
    if not same_grid or not np.array_equal(sitk.GetArrayViewFromImage(ct.tissues),
                                           sitk.GetArrayViewFromImage(mr.tissues)):
        raise RuntimeError(f"the paired MR of {name} does not share the CT's grid and anatomy")


def _measured_columns(measured: dict[str, list[dict]], tumour_id: int) -> dict:
    """A tumour's measured contrast columns; None for a modality that was not rendered."""
    columns = {}
    for modality, unit in (("ct", "_hu"), ("mr", "")):
        found = next((row for row in measured.get(modality) or [] if row["id"] == tumour_id), {})
        columns[f"{modality}_contrast{unit}"] = found.get("contrast")
        columns[f"{modality}_noise{unit}"] = found.get("noise")
        columns[f"{modality}_cnr"] = found.get("cnr")
        columns[f"{modality}_reference"] = found.get("reference")
    return columns


def _tumour_table(cases: list[dict]) -> str:
    """``tumours.csv`` text: one row per tumour, empty cells for values that were not measured."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TUMOUR_TABLE_COLUMNS)
    for case in cases:
        for tumour in case["tumours"]:
            row = {
                "case": case["name"],
                "modality": case["modality"],
                "tumour_id": tumour["id"],
                "stratum": tumour["location"],
                "volume_ml": tumour["volume_ml"],
                "diameter_mm": tumour["diameter_mm"],
                "centre_x_mm": tumour["centre_mm"][0],
                "centre_y_mm": tumour["centre_mm"][1],
                "centre_z_mm": tumour["centre_mm"][2],
                **{key: tumour.get(key) for key in TUMOUR_TABLE_COLUMNS[9:]},
            }
            writer.writerow(["" if row[column] is None else row[column] for column in TUMOUR_TABLE_COLUMNS])
    return buffer.getvalue()


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


def _check_modality(modality: str) -> str:
    name = str(modality).strip().lower()
    if name in ("mri", "mr"):
        return "mr"
    if name == "ct":
        return "ct"
    raise ConfigError(f"unknown phantom modality {modality!r}; use 'ct' or 'mr'")


def _image_on(array: np.ndarray, chest: _ChestBuilder) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(chest.spacing)
    image.SetOrigin(chest.origin)
    return image


def _lut(tissues: tuple[Tissue, ...] | list[Tissue]) -> np.ndarray:
    """A boolean lookup table over tissue codes, for fast ``lut[tissue_map]`` membership masks."""
    table = np.zeros(256, dtype=bool)
    table[[int(t) for t in tissues]] = True
    return table


_HARD_OR_OUTSIDE = (Tissue.AIR, Tissue.TABLE, Tissue.CORTICAL_BONE, Tissue.MARROW, Tissue.SPINAL_CANAL)
_SOFT_TISSUE_OR_LUNG = _lut([t for t in Tissue if t not in (*_HARD_OR_OUTSIDE, Tissue.CARTILAGE)])
_LUNG_ONLY = _lut([Tissue.LUNG])
_MEDIASTINAL = _lut(MEDIASTINAL_TISSUES)
_CHEST_WALL = _lut(CHEST_WALL_TISSUES)
_LUNG_FIELD = _lut(LUNG_FIELD_TISSUES)
_TUMOUR_CAN_REPLACE = _lut([t for t in Tissue if t not in _HARD_OR_OUTSIDE])


def _angle_from(theta: np.ndarray, direction: float) -> np.ndarray:
    """Absolute angular distance (radians, 0..pi) between ``theta`` and ``direction``."""
    return np.abs((theta - direction + np.pi) % (2 * np.pi) - np.pi).astype(np.float32)


class _ChestBuilder:
    """Draws one chest anatomy and paints it into a tissue map.

    All lengths are physical millimetres; ``k`` scales the patient so a small field of view holds a small
    patient instead of a clipped one.
    """

    def __init__(self, rng: np.random.Generator, size: int, slices: int | None,
                 spacing: tuple[float, float, float] | None, tumour_locations: tuple[str, ...] | None = None) -> None:
        self.rng = rng
        self.size = size
        self.tumour_locations = tumour_locations
        self.tumour_masks: list[tuple[tuple[slice, slice, slice], np.ndarray]] = []  # in painting order
        # The patient comes first; the field of view is then chosen to fit them, as a technologist would.
        patient_a = float(rng.uniform(140.0, 178.0))
        fov_wanted = 2 * patient_a * float(rng.uniform(1.2, 1.5))
        low, high = (REFERENCE_MATRIX * limit for limit in IN_PLANE_SPACING_MM)
        drawn_xy = min(max(fov_wanted, low), high) / size
        drawn_z = float(rng.choice(SLICE_THICKNESSES_MM))
        sx, sy, sz = (drawn_xy, drawn_xy, drawn_z) if spacing is None else tuple(float(v) for v in spacing)
        self.spacing = (sx, sy, sz)
        fov_x, fov_y = size * sx, size * sy

        # Body cross-section: semi-axes a (left-right) and b (antero-posterior) at mid chest. The limits keep
        # the skin (with all its wobbles, at most 1.1 a0 and 1.15 b0) inside a given field of view.
        self.a0 = min(patient_a, 0.4 * fov_x)
        self.b0 = min(self.a0 * float(rng.uniform(0.64, 0.76)), 0.32 * fov_y)
        self.k = self.a0 / 160.0
        k = self.k
        self.body_wobble = rng.uniform(-0.015, 0.015, size=(2, 4))  # radius harmonics 2..5 (amplitude, phase)
        self.body_wobble[1] = rng.uniform(0, 2 * np.pi, size=4)
        self.a_wave = (float(rng.uniform(0.5, 1.2)), float(rng.uniform(0, 2 * np.pi)))
        self.b_wave = (float(rng.uniform(0.5, 1.2)), float(rng.uniform(0, 2 * np.pi)))

        # Body on a table: centre the body plus table in the field of view.
        self.table_gap = float(rng.uniform(2.0, 8.0))
        self.table_thickness = 8.0 * k
        b_max = 1.15 * self.b0
        self.xc = float(rng.uniform(-8.0, 8.0)) * k
        self.yc = -(self.table_gap + self.table_thickness) / 2 + float(rng.uniform(-4.0, 4.0))
        self.table_top = self.yc + b_max + self.table_gap
        self.has_table = self.table_top + self.table_thickness < fov_y / 2 - 2 * sy

        # Body wall layers.
        self.fat0 = float(rng.uniform(6.0, 22.0)) * k
        self.fat_wave = rng.uniform(-0.3, 0.3, size=3), rng.uniform(0, 2 * np.pi, size=3)
        self.muscle0 = float(rng.uniform(6.0, 10.0)) * k
        self.muscle_back = float(rng.uniform(30.0, 42.0)) * k  # paraspinal muscles
        self.muscle_chest = float(rng.uniform(8.0, 20.0)) * k  # pectorals
        self.rib_thickness = float(rng.uniform(6.0, 9.0)) * k
        self.rib_height = float(rng.uniform(9.0, 13.0)) * k
        self.rib_pitch = float(rng.uniform(22.0, 27.0)) * k
        self.rib_drop = float(rng.uniform(70.0, 100.0)) * k  # anterior ends sit lower than posterior ends
        self.pleura = 1.5 * k

        # Along z: lung base (top of the diaphragm's reference level) and lung height.
        self.lung_height = float(rng.uniform(200.0, 250.0)) * k
        self.recess = float(rng.uniform(20.0, 30.0)) * k  # posterior costophrenic recess below the base
        below = float(rng.uniform(25.0, 45.0))
        above = float(rng.uniform(15.0, 30.0))
        z_start = -float(rng.uniform(150.0, 350.0))
        coverage = below + self.recess + self.lung_height + above
        default_slices = min(int(math.ceil(coverage / sz)) + 1, MAX_SLICES)
        self.nz = int(slices) if slices is not None else default_slices
        self.z_base = z_start + below + self.recess
        z_centre = z_start + coverage / 2
        origin_z = z_centre - (self.nz - 1) * sz / 2
        self.origin = (-(size - 1) * sx / 2, -(size - 1) * sy / 2, origin_z)
        self.xs = (self.origin[0] + sx * np.arange(size)).astype(np.float32)
        self.ys = (self.origin[1] + sy * np.arange(size)).astype(np.float32)
        self.zs = self.origin[2] + sz * np.arange(self.nz)

        # Diaphragm domes (right higher, over the liver) and the liver's extent to the left.
        self.dome_right = float(rng.uniform(25.0, 40.0)) * k
        self.dome_left = self.dome_right - float(rng.uniform(5.0, 15.0)) * k
        self.diaphragm_thickness = 5.0 * k
        self.liver_left_edge = float(rng.uniform(20.0, 50.0)) * k

        # Mediastinum: a central column between the lungs, wider low down around the heart.
        self.xm = self.xc + float(rng.uniform(-5.0, 5.0)) * k
        self.column_half_width = float(rng.uniform(14.0, 20.0)) * k
        self.column_widening = float(rng.uniform(5.0, 15.0)) * k
        self.column_wave = (float(rng.uniform(50.0, 90.0)) * k, float(rng.uniform(0, 2 * np.pi)))

        # Spine: canal, vertebral bodies (with discs), posterior elements; a gentle kyphosis.
        self.canal_radius = float(rng.uniform(7.0, 9.0)) * k
        self.canal_depth = float(rng.uniform(38.0, 46.0)) * k  # from the back's skin + fat
        self.vertebra_radius = float(rng.uniform(15.0, 19.0)) * k
        self.vertebra_pitch = float(rng.uniform(24.0, 28.0)) * k
        self.disc_height = float(rng.uniform(4.0, 6.0)) * k
        self.disc_phase = float(rng.uniform(0, 1))
        self.kyphosis = float(rng.uniform(4.0, 12.0)) * k
        self.sternum_half_width = float(rng.uniform(13.0, 18.0)) * k

        self.tissues = np.zeros((self.nz, size, size), dtype=np.uint8)

    # -- geometry along z --------------------------------------------------------------------------------

    def s_of(self, z: float) -> float:
        """Height as a fraction of the lung height: 0 at the lung base, 1 at the apex."""
        return (z - self.z_base) / self.lung_height

    def z_of(self, s: float) -> float:
        return self.z_base + s * self.lung_height

    def semi_axes(self, z: float) -> tuple[float, float]:
        s = self.s_of(z)
        a = self.a0 * (1 + 0.03 * math.sin(2 * math.pi * self.a_wave[0] * s + self.a_wave[1]))
        b = self.b0 * (1 + 0.03 * math.sin(2 * math.pi * self.b_wave[0] * s + self.b_wave[1]))
        b *= 1 + 0.05 * min(max(-3 * s, 0.0), 1.0)  # the abdomen bulges a little
        return a, b

    def canal_y(self, z: float) -> float:
        s = self.s_of(z)
        _, b = self.semi_axes(z)
        kyphosis = self.kyphosis * (1 - ((s - 0.5) / 0.8) ** 2)
        return self.yc + b - self.fat0 - self.canal_depth + kyphosis

    def vertebra_y(self, z: float) -> float:
        return self.canal_y(z) - (self.canal_radius + 4.0 * self.k + self.vertebra_radius)

    def column_half(self, z: float) -> float:
        s = self.s_of(z)
        return self.column_half_width + self.column_widening * min(max((0.6 - s) / 0.3, 0.0), 1.0)

    # -- indices ---------------------------------------------------------------------------------------

    def index_box(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel index slices (z, y, x) covering the physical box [low, high] (x, y, z mm), or None if outside."""
        sx, sy, sz = self.spacing
        lo = [(low[0] - self.origin[0]) / sx, (low[1] - self.origin[1]) / sy, (low[2] - self.origin[2]) / sz]
        hi = [(high[0] - self.origin[0]) / sx, (high[1] - self.origin[1]) / sy, (high[2] - self.origin[2]) / sz]
        limits = (self.size, self.size, self.nz)
        spans = []
        for axis in range(3):
            start = max(int(math.floor(lo[axis])), 0)
            stop = min(int(math.ceil(hi[axis])) + 1, limits[axis])
            if stop <= start:
                return None
            spans.append(slice(start, stop))
        return spans[2], spans[1], spans[0]

    def box_coordinates(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical coordinates of a box as broadcastable arrays shaped (z,1,1), (1,y,1), (1,1,x)."""
        z = self.zs[box[0]].astype(np.float32)[:, None, None]
        y = self.ys[box[1]][None, :, None]
        x = self.xs[box[2]][None, None, :]
        return x, y, z

    # -- build ------------------------------------------------------------------------------------------

    def build(self) -> tuple[np.ndarray, list[dict]]:
        """Paint the anatomy; returns the tissue map ``(z, y, x)`` uint8 and the tumour descriptions."""
        self._paint_slices()
        self._paint_heart()
        self._paint_great_vessels()
        self._paint_central_airways()
        self._paint_lung_trees()
        tumours = self._paint_tumours()
        return self.tissues, tumours

    def _paint_slices(self) -> None:
        """Body, wall layers, ribs, sternum, spine, lungs, diaphragm and upper abdomen, slice by slice.

        Everything that does not depend on z is computed once on the body's bounding rectangle; ribs and
        sternum are evaluated only on the pixels that can hold them (flat index lists).
        """
        k = self.k
        sx, sy, _ = self.spacing
        reach_x = 1.12 * self.a0 + 2 * sx
        reach_y = 1.2 * self.b0 + 2 * sy
        c0, c1 = np.searchsorted(self.xs, [self.xc - reach_x, self.xc + reach_x])
        r0, r1 = np.searchsorted(self.ys, [self.yc - reach_y, self.yc + reach_y])
        c0, r0 = max(c0, 0), max(r0, 0)
        x2, y2 = np.meshgrid(self.xs[c0:c1] - np.float32(self.xc), self.ys[r0:r1] - np.float32(self.yc))
        radius = np.hypot(x2, y2)
        theta = np.arctan2(y2, x2)
        cos_t = x2 / np.maximum(radius, 1e-3)
        sin_t = y2 / np.maximum(radius, 1e-3)
        wobble = np.ones_like(radius)
        for harmonic, (amplitude, phase) in enumerate(self.body_wobble.T, start=2):
            wobble += amplitude * np.cos(harmonic * theta + phase)
        fat = np.full_like(radius, self.fat0)
        for harmonic, (amplitude, phase) in enumerate(zip(*self.fat_wave), start=1):
            fat *= 1 + amplitude * np.cos(harmonic * theta + phase) / 3
        back = _angle_from(theta, np.pi / 2)  # posterior is +y
        front = _angle_from(theta, -np.pi / 2)
        muscle = self.muscle0 + self.muscle_back * np.exp(-((back / 0.42) ** 2))
        muscle += self.muscle_chest * np.exp(-(((front - 0.75) / 0.35) ** 2))
        rib_inner = fat + muscle
        rib_outer = rib_inner + self.rib_thickness
        cavity_depth = rib_outer + self.pleura
        # body radius along each ray = (a b / ellipse_norm) * wobble; depth = body radius - radius
        cos2, sin2 = cos_t**2, sin_t**2

        def depth_for(a: float, b: float) -> np.ndarray:
            return (a * b) * wobble / np.sqrt(b * b * cos2 + a * a * sin2) - radius

        axes = np.array([self.semi_axes(z) for z in self.zs])
        depth_low = depth_for(axes[:, 0].min(), axes[:, 1].min())
        depth_high = depth_for(axes[:, 0].max(), axes[:, 1].max())

        # Ribs: oblique arcs, anterior ends lower; gaps at the spine and sternum, cartilage at the front.
        ring = np.flatnonzero((depth_high > rib_inner) & (depth_low <= rib_outer + self.pleura))
        ring_inner, ring_outer = rib_inner.ravel()[ring], rib_outer.ravel()[ring]
        ring_front, ring_back = front.ravel()[ring], back.ravel()[ring]
        rib_top = self.z_of(1.0) - 8.0 * k
        ring_phase = (rib_top - self.rib_drop * (1 - sin_t.ravel()[ring]) / 2) / self.rib_pitch
        ring_kind = np.where(ring_front < 0.5, Tissue.CARTILAGE, Tissue.CORTICAL_BONE).astype(np.uint8)
        ring_kind[(ring_back < 0.14) | (ring_front < 0.12)] = 0
        ring_floating_ok = ring_back < 1.5
        ring_core_margin = 1.2 * k

        side_x = x2 - np.float32(self.xm - self.xc)
        abs_side_x = np.abs(side_x)
        sternum_px = np.flatnonzero(((abs_side_x < self.sternum_half_width) & (front < 0.5)).ravel())
        sternum_fat = fat.ravel()[sternum_px]
        sternum_outer = rib_outer.ravel()[sternum_px]
        sternum_core_x = abs_side_x.ravel()[sternum_px] < self.sternum_half_width - 1.5 * k

        # Lung-base domes: the right one higher (over the liver); lowest in the posterior recesses.
        dome = 1 - ((abs_side_x - 0.4 * self.a0) / (0.42 * self.a0)) ** 2
        dome -= ((y2 + 0.05 * self.b0) / (0.75 * self.b0)) ** 2
        dome_height = np.where(side_x < 0, self.dome_right, self.dome_left).astype(np.float32)
        diaphragm_z = self.z_base + np.maximum(dome_height * dome, -self.recess)
        # Above 55% of the lung height each lung narrows towards a rounded apex.
        apex_q = ((abs_side_x - 0.42 * self.a0) / (0.45 * self.a0)) ** 2
        apex_q += ((y2 - 0.1 * self.b0) / (0.85 * self.b0)) ** 2
        liver_side = side_x < self.liver_left_edge
        # The mediastinal column narrows towards the sternum, where the lungs nearly meet.
        vertebra_front = self.vertebra_y(self.z_of(0.5)) - self.yc
        towards_front = np.clip((vertebra_front - y2) / (vertebra_front + 0.9 * self.b0), 0, 1)
        wave = 1 + 0.12 * np.sin(2 * np.pi * y2 / self.column_wave[0] + self.column_wave[1] + 0.5 * np.sign(side_x))
        column_measure = abs_side_x / ((1 - 0.5 * towards_front**2) * wave)

        out = np.zeros(x2.shape, dtype=np.uint8)  # one slice of the body rectangle, reused
        flat = out.reshape(-1)
        for index, z in enumerate(self.zs):
            s = self.s_of(z)
            depth = depth_for(*self.semi_axes(z))
            out.fill(Tissue.AIR)
            out[depth > 0] = Tissue.FAT
            out[depth > fat] = Tissue.MUSCLE
            cavity = depth > cavity_depth
            above_diaphragm = diaphragm_z < z
            out[cavity & above_diaphragm] = Tissue.MEDIASTINUM
            below = cavity & ~above_diaphragm
            out[below & liver_side] = Tissue.LIVER
            out[below & ~liver_side] = Tissue.ABDOMEN
            lung_base = diaphragm_z < z - self.diaphragm_thickness
            out[cavity & above_diaphragm & ~lung_base] = Tissue.DIAPHRAGM
            column = (column_measure < self.column_half(z)) & (y2 < self.vertebra_y(z) - self.yc)
            lung = cavity & lung_base & ~column
            if s > 0.55:
                in_apex = apex_q < max(1 - ((s - 0.55) / 0.45) ** 2, 0.0)
                out[cavity & ~in_apex & ~column & above_diaphragm] = Tissue.MUSCLE
                lung &= in_apex
            out[lung] = Tissue.LUNG

            ring_depth = depth.ravel()[ring]
            phase = ring_phase - z / self.rib_pitch
            rib_index = np.rint(phase)
            offset = np.abs(phase - rib_index) * self.rib_pitch
            on_rib = (ring_depth > ring_inner) & (ring_depth <= ring_outer) & (offset < self.rib_height / 2)
            on_rib &= (rib_index >= 0) & (rib_index < 12) & (ring_kind > 0) & ((rib_index < 10) | ring_floating_ok)
            core = on_rib & (ring_kind == Tissue.CORTICAL_BONE) & (offset < self.rib_height / 2 - ring_core_margin)
            core &= (ring_depth > ring_inner + ring_core_margin) & (ring_depth < ring_outer - ring_core_margin)
            values = np.where(core, np.uint8(Tissue.MARROW), ring_kind)
            flat[ring[on_rib]] = values[on_rib]

            if 0.35 < s < 0.92:  # sternum: manubrium to xiphoid
                sternum_depth = depth.ravel()[sternum_px]
                bone = (sternum_depth > sternum_fat + 0.4 * self.muscle0) & (sternum_depth < sternum_outer + 2 * k)
                core = bone & sternum_core_x & (sternum_depth > sternum_fat + 0.4 * self.muscle0 + 1.5 * k)
                core &= sternum_depth < sternum_outer + 0.5 * k
                flat[sternum_px[bone]] = Tissue.CORTICAL_BONE
                flat[sternum_px[core]] = Tissue.MARROW
            self._paint_spine_slice(out, x2, y2, z)
            self.tissues[index, r0:r1, c0:c1] = out

        if self.has_table:
            j0, j1 = np.searchsorted(self.ys, [self.table_top, self.table_top + self.table_thickness])
            half_width = min(240.0, 0.45 * self.size * sx)
            i0, i1 = np.searchsorted(self.xs, [self.xc - half_width, self.xc + half_width])
            self.tissues[:, j0:j1, i0:i1] = Tissue.TABLE

    def _paint_spine_slice(self, out: np.ndarray, x2: np.ndarray, y2: np.ndarray, z: float) -> None:
        """Vertebral body (cortex, marrow, discs), canal and posterior elements; keeps the lungs off the spine."""
        k = self.k
        canal_y = self.canal_y(z) - self.yc
        body_y = self.vertebra_y(z) - self.yc
        keepout = self.vertebra_radius + 6 * k
        reach = self.vertebra_radius + self.canal_radius + 40 * k
        rows = np.flatnonzero((y2[:, 0] > body_y - keepout - 2) & (y2[:, 0] < canal_y + reach))
        cols = np.flatnonzero(np.abs(x2[0] - np.float32(self.xm - self.xc)) < reach)
        if rows.size == 0 or cols.size == 0:
            return
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        dx = x2[window] - np.float32(self.xm - self.xc)
        dy_canal = y2[window] - np.float32(canal_y)
        patch = out[window]
        body_r = np.hypot(dx, y2[window] - np.float32(body_y))
        patch[(body_r < keepout) & (patch == Tissue.LUNG)] = Tissue.MEDIASTINUM
        canal_r = np.hypot(dx, dy_canal)
        level = ((z / self.vertebra_pitch + self.disc_phase) % 1.0) * self.vertebra_pitch
        if level < 0.7 * self.vertebra_pitch:  # posterior elements are separate for each vertebra
            lamina = (canal_r < self.canal_radius + 5 * k) & (dy_canal > -2 * k)
            spinous = (np.abs(dx) < 4 * k) & (dy_canal > 0) & (dy_canal < self.canal_radius + 30 * k)
            transverse = (np.abs(dy_canal) < 5 * k) & (np.abs(dx) < self.canal_radius + 26 * k)
            patch[lamina | spinous | transverse] = Tissue.CORTICAL_BONE
        patch[canal_r < self.canal_radius] = Tissue.SPINAL_CANAL
        in_body = body_r < self.vertebra_radius
        if level < self.disc_height:
            patch[in_body] = Tissue.CARTILAGE
        else:
            patch[in_body] = Tissue.CORTICAL_BONE
            patch[body_r < self.vertebra_radius - 1.5 * k] = Tissue.MARROW

    # -- 3D structures --------------------------------------------------------------------------------

    def tube(self, p0, p1, r0: float, r1: float, tissue: Tissue, onto: np.ndarray) -> None:
        """Paint a tapered tube from ``p0`` to ``p1`` (x, y, z mm; radii r0 -> r1 mm) over tissues in ``onto``.

        Long tubes are painted in short pieces: bounding boxes of short pieces hold far fewer voxels.
        """
        p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
        floor_radius = 0.45 * min(self.spacing[0], self.spacing[1])
        length = float(np.linalg.norm(p1 - p0))
        pieces = max(1, int(math.ceil(length / max(15.0, 3 * max(r0, r1)))))
        for piece in range(pieces):
            t0, t1 = piece / pieces, (piece + 1) / pieces
            a, b = p0 + (p1 - p0) * t0, p0 + (p1 - p0) * t1
            ra = max(r0 + (r1 - r0) * t0, floor_radius)
            rb = max(r0 + (r1 - r0) * t1, floor_radius)
            self._tube_piece(a, b, ra, rb, tissue, onto)

    def _tube_piece(self, a, b, ra: float, rb: float, tissue: Tissue, onto: np.ndarray) -> None:
        reach = max(ra, rb)
        # Slices are thick: widen the box in z by half a slice so thin oblique tubes still land in a slice.
        pad = np.array([reach, reach, reach + self.spacing[2] / 2])
        box = self.index_box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if box is None:
            return
        x, y, z = self.box_coordinates(box)
        d = (b - a).astype(np.float32)
        squared = float(d @ d) or 1.0
        t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / squared
        np.clip(t, 0.0, 1.0, out=t)
        distance2 = (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
        radius = ra + (rb - ra) * t
        region = self.tissues[box]
        region[(distance2 <= radius * radius) & onto[region]] = tissue

    def ellipsoid(self, centre, axes, angle: float, tissue: Tissue, onto: np.ndarray) -> None:
        """Paint an ellipsoid with semi-axes ``axes`` (mm), rotated by ``angle`` (radians) about z."""
        reach = max(axes[0], axes[1])
        box = self.index_box(np.asarray(centre) - [reach, reach, axes[2]], np.asarray(centre) + [reach, reach, axes[2]])
        if box is None:
            return
        x, y, z = self.box_coordinates(box)
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        inside = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (dz / axes[2]) ** 2 <= 1
        region = self.tissues[box]
        region[inside & onto[region]] = tissue

    def _paint_heart(self) -> None:
        rng, k = self.rng, self.k
        self.heart_axes = np.array([rng.uniform(52, 64), rng.uniform(40, 48), rng.uniform(42, 52)]) * k
        # The long axis points to the patient's left, forwards and down; the heart rests on the left dome.
        self.heart_angle = -float(rng.uniform(0.45, 0.8))
        self.heart_centre = np.array([
            self.xm + float(rng.uniform(14, 26)) * k,
            self.yc - self.b0 * float(rng.uniform(0.12, 0.22)),
            self.z_base + self.dome_left * 0.5 + 0.65 * self.heart_axes[2],
        ])
        fat = float(rng.uniform(2.0, 5.0)) * k
        wall = float(rng.uniform(8.0, 12.0)) * k
        centre, axes, angle = self.heart_centre, self.heart_axes, self.heart_angle
        # Outwards in: a sleeve that keeps the lungs off, epicardial fat, myocardium, then the chambers.
        self.ellipsoid(centre, axes + fat + 2 * k, angle, Tissue.MEDIASTINUM, _LUNG_ONLY)
        self.ellipsoid(centre, axes + fat, angle, Tissue.FAT, _lut([Tissue.LUNG, Tissue.MEDIASTINUM, Tissue.MUSCLE]))
        self.ellipsoid(centre, axes, angle, Tissue.MYOCARDIUM, _lut([Tissue.LUNG, Tissue.MEDIASTINUM, Tissue.FAT]))
        self.ellipsoid(centre, axes - wall, angle, Tissue.BLOOD, _lut([Tissue.MYOCARDIUM]))

    def _vessel(self, points, radii, tissue: Tissue = Tissue.BLOOD, margin: float = 3.0) -> None:
        """A polyline vessel with a thin sleeve of mediastinal tissue that keeps the lungs off it."""
        margin *= self.k
        for (p0, p1), (r0, r1) in zip(zip(points[:-1], points[1:]), zip(radii[:-1], radii[1:])):
            self.tube(p0, p1, r0 + margin, r1 + margin, Tissue.MEDIASTINUM, _LUNG_ONLY)
        for (p0, p1), (r0, r1) in zip(zip(points[:-1], points[1:]), zip(radii[:-1], radii[1:])):
            self.tube(p0, p1, r0, r1, tissue, _SOFT_TISSUE_OR_LUNG)

    def hilum(self, side: int) -> np.ndarray:
        """Physical point where the main vessels and bronchus of one lung (-1 right, +1 left) enter it."""
        z = self.z_of(self.hilum_s)
        return np.array([self.xm + side * (self.column_half(z) + 8.0 * self.k), self.yc + 0.02 * self.b0, z])

    def _paint_great_vessels(self) -> None:
        rng, k = self.rng, self.k
        top = self.zs[-1] + 10.0
        bottom = self.zs[0] - 10.0
        heart_top = self.heart_centre[2] + 0.6 * self.heart_axes[2]
        self.hilum_s = float(rng.uniform(0.55, 0.6))
        arch_z = self.z_of(float(rng.uniform(0.76, 0.82)))
        vertebra_y = self.vertebra_y(arch_z)

        ascending_r = float(rng.uniform(13.0, 16.0)) * k
        descending_r = float(rng.uniform(10.0, 12.5)) * k
        ascending_xy = np.array([self.xm - float(rng.uniform(2, 10)) * k, self.yc - self.b0 * 0.2])
        descending_xy = np.array([self.xm + self.vertebra_radius * 0.7 + descending_r * 0.9,
                                  vertebra_y - self.vertebra_radius * 0.2])
        arch = [np.array([*ascending_xy, self.heart_centre[2]]), np.array([*ascending_xy, arch_z])]
        for t in np.linspace(0.2, 1.0, 5):  # the arch climbs and bends back to the left
            xy = ascending_xy + (descending_xy - ascending_xy) * t
            lift = 12.0 * k * math.sin(math.pi * t)
            arch.append(np.array([*xy, arch_z + lift * (1 - t) + lift * 0.5]))
        arch.append(np.array([*descending_xy, arch_z - 20 * k]))
        arch.append(np.array([*descending_xy, bottom]))
        radii = [ascending_r, ascending_r] + list(np.linspace(ascending_r, descending_r, 5)) + [descending_r] * 2
        self._vessel(arch, radii)

        # Superior vena cava to the right atrium; three arch branches towards the neck.
        svc_r = float(rng.uniform(8.0, 11.0)) * k
        svc_xy = [ascending_xy[0] - ascending_r - svc_r - 4 * k, ascending_xy[1] + 6 * k]
        self._vessel([[*svc_xy, top], [*svc_xy, heart_top - 10 * k]], [svc_r, svc_r])
        for t, dx in zip((0.15, 0.45, 0.75), (-14.0, 0.0, 12.0)):
            xy = ascending_xy + (descending_xy - ascending_xy) * t
            radius = float(rng.uniform(4.5, 7.0)) * k
            self._vessel([[*xy, arch_z + 5 * k], [xy[0] + dx * k, xy[1] - 5 * k, top]], [radius, radius], margin=2.0)

        # Pulmonary trunk from the right ventricle up to its bifurcation, then to each hilum.
        trunk_r = float(rng.uniform(12.0, 15.0)) * k
        trunk_start = np.array([self.xm + 12 * k, self.yc - self.b0 * 0.32, heart_top - 15 * k])
        split = np.array([self.xm + 6 * k, self.yc - self.b0 * 0.08, self.z_of(self.hilum_s + 0.05)])
        self._vessel([trunk_start, split], [trunk_r, trunk_r])
        branch_r = float(rng.uniform(9.0, 11.0)) * k
        left_atrium = self.heart_centre + [0, 0.5 * self.heart_axes[1], 0.3 * self.heart_axes[2]]
        self.vein_roots = {}
        for side in (-1, 1):
            hilum = self.hilum(side)
            self._vessel([split, hilum], [branch_r, branch_r * 0.8])
            self.vein_roots[side] = hilum + [0, 10 * k, -25 * k]
            vein_r = float(rng.uniform(6.0, 8.0)) * k
            self._vessel([self.vein_roots[side], left_atrium], [vein_r, vein_r])

        # Oesophagus, between the trachea and the spine.
        self.trachea_xy = np.array([self.xm + float(rng.uniform(-3, 3)) * k,
                                    self.vertebra_y(self.z_of(0.8)) - self.vertebra_radius - 22 * k])
        oesophagus_r = float(rng.uniform(7.0, 9.0)) * k
        oesophagus_xy = [self.xm + 8 * k, self.trachea_xy[1] + 14 * k]
        self._vessel([[*oesophagus_xy, top], [*oesophagus_xy, self.z_base - 20 * k]], [oesophagus_r] * 2,
                     tissue=Tissue.MEDIASTINUM)

    def _airway(self, p0, p1, r0: float, r1: float, wall: float, onto_wall: np.ndarray) -> None:
        self.tube(p0, p1, r0 + wall, r1 + wall, Tissue.AIRWAY_WALL, onto_wall)
        self.tube(p0, p1, r0, r1, Tissue.AIRWAY, _lut([Tissue.AIRWAY_WALL, Tissue.AIRWAY]))

    def _paint_central_airways(self) -> None:
        rng, k = self.rng, self.k
        top = self.zs[-1] + 10.0
        carina = np.array([*self.trachea_xy, self.z_of(float(rng.uniform(0.64, 0.7)))])
        trachea_r = float(rng.uniform(8.0, 10.5)) * k
        wall = 2.0 * k
        self.tube([*self.trachea_xy, top], carina, trachea_r + wall + 3 * k, trachea_r + wall + 3 * k,
                  Tissue.MEDIASTINUM, _LUNG_ONLY)
        self._airway([*self.trachea_xy, top], carina, trachea_r, trachea_r, wall, _SOFT_TISSUE_OR_LUNG)
        self.bronchus_start = {}
        for side in (-1, 1):
            hilum = self.hilum(side) + [0, 6 * k, 4 * k]  # bronchi lie behind and above the arteries
            bronchus_r = float(rng.uniform(6.0, 7.5)) * k
            sleeve = bronchus_r + wall + 2 * k
            self.tube(carina, hilum, sleeve, sleeve, Tissue.MEDIASTINUM, _LUNG_ONLY)
            self._airway(carina, hilum, bronchus_r, bronchus_r * 0.85, wall, _SOFT_TISSUE_OR_LUNG)
            self.bronchus_start[side] = (hilum, bronchus_r * 0.85)

    def _paint_lung_trees(self) -> None:
        """Branching vessels (and bronchi along the first generations) from each hilum to the periphery."""
        rng, k = self.rng, self.k
        step = (max(1, self.nz // 48), max(1, self.size // 96), max(1, self.size // 96))
        coarse = self.tissues[:: step[0], :: step[1], :: step[2]] == Tissue.LUNG
        zz, yy, xx = np.nonzero(coarse)
        points = np.stack([self.xs[xx * step[2]], self.ys[yy * step[1]], self.zs[zz * step[0]]], axis=1)
        vessels: list[tuple[np.ndarray, np.ndarray, float, float]] = []
        bronchi: list[tuple[np.ndarray, np.ndarray, float, float]] = []
        for side in (-1, 1):
            on_side = points[(points[:, 0] - self.xm) * side > 0]
            if len(on_side) < 8:
                continue
            # Two trees per lung: arteries from the hilum, veins from a point below it (towards the atrium).
            arteries: list[tuple[np.ndarray, np.ndarray, float, float, int]] = []
            for tree_index, root in enumerate((self.hilum(side), self.vein_roots[side])):
                targets = on_side[rng.choice(len(on_side), size=min(150, len(on_side)), replace=False)]
                tree: list[tuple[np.ndarray, np.ndarray, float, float, int]] = []
                self._grow(root, targets, float(rng.uniform(6.0, 7.5)) * k, 0, tree)
                vessels += [segment[:4] for segment in tree]
                if tree_index == 0:
                    arteries = tree
            # Bronchi run beside the arteries of the first generations.
            hilum_bronchus, bronchus_r = self.bronchus_start[side]
            for start, end, r0, r1, generation in arteries:
                if generation > 2:
                    continue
                shift = np.cross(end - start, [0.0, 0.0, 1.0])
                norm = float(np.linalg.norm(shift))
                shift = shift / norm * (1.7 * r0 + 2.5 * k) if norm > 1e-6 else np.zeros(3)
                origin = hilum_bronchus if generation == 0 else start + shift
                bronchi.append((origin, end + shift, bronchus_r if generation == 0 else 0.7 * r0, 0.7 * r1))
        self.splat_tubes(vessels, Tissue.LUNG_VESSEL, _LUNG_ONLY)
        wall = 1.2 * k
        self.splat_tubes([(a, b, r0 + wall, r1 + wall) for a, b, r0, r1 in bronchi], Tissue.AIRWAY_WALL, _LUNG_ONLY)
        self.splat_tubes(bronchi, Tissue.AIRWAY, _lut([Tissue.AIRWAY_WALL]))

    def splat_tubes(self, segments: list, tissue: Tissue, onto: np.ndarray) -> None:
        """Paint many thin tapered tubes ``(p0, p1, r0, r1)`` (mm) as chains of balls, all at once.

        Points are spaced at most half a radius apart, so the chain of balls reads as a smooth tube; balls
        are rounded to the nearest voxel and grouped by radius so each group is one vectorised write.
        """
        if not segments:
            return
        sx, sy, sz = self.spacing
        floor = 0.5 * min(sx, sy)
        centres, radii = [], []
        for p0, p1, r0, r1 in segments:
            p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
            spacing_along = max(0.5 * max(min(r0, r1), floor), floor)
            count = int(math.ceil(float(np.linalg.norm(p1 - p0)) / spacing_along)) + 1
            t = np.linspace(0.0, 1.0, count)[:, None]
            centres.append(p0 + t * (p1 - p0))
            radii.append(np.maximum(r0 + (r1 - r0) * t[:, 0], floor))
        centre = np.concatenate(centres)
        radius = np.concatenate(radii)
        index = np.rint((centre - np.asarray(self.origin)) / np.asarray(self.spacing)).astype(np.int64)
        inside = np.all((index >= 0) & (index < [self.size, self.size, self.nz]), axis=1)
        index, radius = index[inside], radius[inside]
        quantum = 0.25 * min(sx, sy)
        bins = np.rint(radius / quantum).astype(np.int64)
        flat = self.tissues.reshape(-1)
        plane = self.size * self.size
        for bin_value in np.unique(bins):
            chosen = index[bins == bin_value]
            offsets = self._ball_offsets(bin_value * quantum)
            x = chosen[:, 0:1] + offsets[:, 0]
            y = chosen[:, 1:2] + offsets[:, 1]
            z = chosen[:, 2:3] + offsets[:, 2]
            valid = (x >= 0) & (x < self.size) & (y >= 0) & (y < self.size) & (z >= 0) & (z < self.nz)
            voxels = (z * plane + y * self.size + x)[valid]
            voxels = voxels[onto[flat[voxels]]]
            flat[voxels] = tissue

    def _ball_offsets(self, radius: float) -> np.ndarray:
        """Integer (x, y, z) voxel offsets within ``radius`` mm of a voxel centre, the centre always included."""
        reach = [int(radius // spacing) for spacing in self.spacing]
        grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), axis=-1).reshape(-1, 3)
        inside = np.sum((grid * np.asarray(self.spacing)) ** 2, axis=1) <= radius**2
        return grid[inside]

    def _grow(self, start: np.ndarray, targets: np.ndarray, radius: float, generation: int,
              segments: list) -> None:
        """Split the targets in two along their widest direction and branch towards each half."""
        rng = self.rng
        if len(targets) <= 2 or radius < 1.0 * self.k:
            for target in targets:
                segments.append((start, target, radius, max(0.6 * radius, 0.7), generation))
            return
        spread = targets - targets.mean(axis=0)
        axis = np.linalg.svd(spread, full_matrices=False)[2][0]
        order = np.argsort(spread @ axis)
        for half in (targets[order[: len(order) // 2]], targets[order[len(order) // 2 :]]):
            centre = half.mean(axis=0)
            end = start + (centre - start) * float(rng.uniform(0.4, 0.6)) + rng.normal(0, 3.0, size=3)
            segments.append((start, end, radius, 0.85 * radius, generation))
            self._grow(end, half, 0.78 * radius, generation + 1, segments)

    # -- tumours --------------------------------------------------------------------------------------

    def _paint_tumours(self) -> list[dict]:
        """Place and paint the tumours; returns their descriptions measured on the painted voxels.

        Without requested sites: 1-3 tumours at random sites. With them: one tumour per requested site.
        """
        rng = self.rng
        if self.tumour_locations is None:
            wanted = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
            requests = [(str(rng.choice(LOCATIONS, p=LOCATION_ODDS)), float(rng.uniform(*TUMOUR_DIAMETER_MM)))
                        for _ in range(wanted)]
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
        instances = np.zeros(self.tissues.shape, dtype=np.uint8)
        for number, (box, mask) in enumerate(self.tumour_masks, start=1):
            instances[box][mask] = number  # a voxel painted twice belongs to the later tumour
        for box, _ in self.tumour_masks:
            instances[box][self.tissues[box] != Tissue.TUMOUR] = 0
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
        region = self.tissues[box]
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
        rng = self.rng
        sz = self.spacing[2]
        # Keep the whole tumour inside the covered slices, within the lungs' middle heights.
        z_low = max(self.z_of(0.15), self.zs[0] + radius)
        z_high = min(self.z_of(0.85), self.zs[-1] - radius)
        candidates_z = np.flatnonzero((self.zs >= z_low) & (self.zs <= z_high))
        if candidates_z.size == 0:
            candidates_z = np.flatnonzero((self.zs >= self.z_of(0.1)) & (self.zs <= self.z_of(0.9)))
            if candidates_z.size == 0:
                return None
        index = int(rng.choice(candidates_z))
        tissue_slice = self.tissues[index]
        field = _LUNG_FIELD[tissue_slice]
        if not field.any():
            return None
        distance, nearest = ndimage.distance_transform_edt(field, sampling=self.spacing[1::-1], return_indices=True)
        nearest_tissue = tissue_slice[nearest[0], nearest[1]]
        if location == "parenchyma":
            chosen = field & (distance > 1.35 * radius + 3.0)
        else:
            wanted = _MEDIASTINAL if location == "mediastinum" else _CHEST_WALL
            chosen = field & (distance > 0.45 * radius) & (distance < 0.75 * radius) & wanted[nearest_tissue]
        rows, cols = np.nonzero(chosen)
        if rows.size == 0:
            return None
        gap = max(6.0, 2 * sz, 2 * self.spacing[0])
        for pick in rng.permutation(rows.size)[:20]:
            centre = np.array([self.xs[cols[pick]], self.ys[rows[pick]], self.zs[index]], dtype=np.float64)
            if all(np.linalg.norm(centre - other) > 1.35 * (radius + other_r) + gap for other, other_r in placed):
                return centre
        return None

    def _tumour_blob(self, centre: np.ndarray, radius: float) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """A lobulated blob of about the volume of a sphere of ``radius`` mm: a rough ellipsoid plus lobes.

        Returns the voxel box (z, y, x slices) and the blob's boolean mask inside it. The blob is rescaled
        once so that its voxel volume matches the requested sphere.
        """
        rng = self.rng
        elongation = rng.uniform(0.85, 1.18, size=3)
        elongation /= elongation.prod() ** (1 / 3)
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        lobes = []
        for _ in range(int(rng.integers(2, 5))):
            direction = rng.normal(size=3)
            lobes.append((direction / np.linalg.norm(direction) * rng.uniform(0.5, 0.7), rng.uniform(0.3, 0.5)))
        roughness_seed = int(rng.integers(2**31))
        reach = 1.75 * radius + max(self.spacing)
        box = self.index_box(centre - reach, centre + reach)
        x, y, z = self.box_coordinates(box)
        dx, dy, dz = x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])
        u, v, w = (dx * np.float32(rotation[0, i]) + dy * np.float32(rotation[1, i]) + dz * np.float32(rotation[2, i])
                   for i in range(3))
        roughness = np.random.default_rng(roughness_seed).standard_normal(u.shape, dtype=np.float32)
        sigma = [max(0.25 * radius / spacing, 0.5) for spacing in self.spacing[::-1]]
        roughness = ndimage.gaussian_filter(roughness, sigma)
        roughness *= 0.06 / max(float(roughness.std()), 1e-6)
        np.clip(roughness, -0.15, 0.15, out=roughness)
        boundary = (1 + roughness) ** 2
        target_voxels = 4 / 3 * math.pi * radius**3 / float(np.prod(self.spacing))

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
        voxels = int(mask.sum())
        volume_mm3 = voxels * float(np.prod(self.spacing))
        zz, yy, xx = np.nonzero(mask)
        centre = [float(self.xs[box[2]][xx].mean()), float(self.ys[box[1]][yy].mean()),
                  float(self.zs[box[0]][zz].mean())]
        return {
            "centre_mm": [round(value, 2) for value in centre],
            "diameter_mm": round((6 * volume_mm3 / math.pi) ** (1 / 3), 2),
            "location": location,
            "volume_ml": round(volume_mm3 / 1000, 3),
        }


# -- rendering ------------------------------------------------------------------------------------------


def _appearance_tables(rng: np.random.Generator, modality: str,
                       ct_tumour_contrast: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-tissue mean and texture amplitude (256-entry lookup tables) with this case's jitter.

    ``ct_tumour_contrast`` (CT only) sets the tumour's mean relative to the mediastinal level exactly.
    """
    means = np.zeros(256, dtype=np.float32)
    textures = np.zeros(256, dtype=np.float32)
    for tissue, (ct_mean, ct_texture, mr_mean, mr_texture) in _APPEARANCE.items():
        if modality == "ct":
            jitter = 0.0 if tissue in (Tissue.AIR, Tissue.AIRWAY) else float(rng.normal(0, 0.04 * abs(ct_mean) + 1))
            means[tissue], textures[tissue] = ct_mean + jitter, ct_texture
        else:
            means[tissue] = mr_mean * float(rng.uniform(0.9, 1.1))
            textures[tissue] = mr_texture * means[tissue]
    if modality == "ct":
        soft = float(rng.uniform(40.0, 50.0))
        means[Tissue.MEDIASTINUM] = soft
        if ct_tumour_contrast is None:
            # The default low-contrast setting: mediastinal soft tissue 40-50 HU, the tumour 3-9 HU below it.
            means[Tissue.MYOCARDIUM] = soft + float(rng.uniform(-2.0, 3.0))
            means[Tissue.BLOOD] = soft - float(rng.uniform(0.0, 6.0))
            means[Tissue.MUSCLE] = soft + float(rng.uniform(-3.0, 5.0))
            means[Tissue.TUMOUR] = soft - float(rng.uniform(3.0, 9.0))
        else:
            # A set contrast: the tissues a tumour abuts stay within -2..+4 HU of the mediastinal level, so
            # a tumour c HU below it (c < 0) is at least |c| - 2 HU from each of them.
            means[Tissue.MYOCARDIUM] = soft + float(rng.uniform(-1.0, 3.0))
            means[Tissue.BLOOD] = soft - float(rng.uniform(0.0, 2.0))
            means[Tissue.MUSCLE] = soft + float(rng.uniform(0.0, 4.0))
            means[Tissue.TUMOUR] = soft + ct_tumour_contrast
        means[Tissue.LUNG_VESSEL] = means[Tissue.BLOOD]
        means[Tissue.DIAPHRAGM] = means[Tissue.MUSCLE]
    return means, textures


class _SmoothField:
    """A zero-mean, unit-variance random field correlated over about ``correlation_mm``, shape (z, y, x).

    It is drawn on a coarse in-plane grid and upsampled bilinearly one slab at a time, which is far
    cheaper than filtering a full-size volume.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], spacing, correlation_mm: float):
        nz, ny, nx = shape
        factor = max(1, int(round(correlation_mm / (2 * spacing[0]))))
        coarse = rng.standard_normal((nz, ny // factor + 2, nx // factor + 2), dtype=np.float32)
        coarse = ndimage.gaussian_filter(coarse, (correlation_mm / (2 * spacing[2]), 1.0, 1.0), mode="wrap")
        coarse /= max(float(coarse.std()), 1e-6)
        self.coarse = coarse
        self.rows = _bilinear_taps(ny, coarse.shape[1], factor)
        self.cols = _bilinear_taps(nx, coarse.shape[2], factor)

    def slab(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start:stop`` of the full-size field, float32 ``(stop - start, y, x)``."""
        (r0, r1, rw), (c0, c1, cw) = self.rows, self.cols
        coarse = self.coarse[start:stop]
        # Columns first, on the small array; the row gather then copies whole contiguous rows.
        columns = coarse[:, :, c0] * (1 - cw) + coarse[:, :, c1] * cw
        field = columns[:, r0, :]
        field *= (1 - rw)[:, None]
        field += columns[:, r1, :] * rw[:, None]
        return field


def _bilinear_taps(fine: int, coarse: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each fine index: the two coarse neighbours and the weight of the second (float32)."""
    position = (np.arange(fine) + 0.5) / factor
    lower = np.clip(np.floor(position).astype(np.intp), 0, coarse - 2)
    return lower, lower + 1, (position - lower).astype(np.float32)


_BLUR_TRUNCATE = 3.0


def _gaussian_noise_gain(sigma_px: float) -> float:
    """Standard deviation left in unit white noise after the in-plane partial-volume blur."""
    impulse = np.zeros((1, 33, 33), dtype=np.float64)
    impulse[0, 16, 16] = 1.0
    kernel = ndimage.gaussian_filter(impulse, (0, sigma_px, sigma_px), truncate=_BLUR_TRUNCATE)
    return float(np.sqrt(np.sum(kernel**2)))


def _blur_sigma(spacing) -> float:
    """In-plane partial-volume blur in pixels: about 0.6 mm of scanner blur, at least half a pixel."""
    return max(0.5, 0.6 / spacing[0])


def _render_ct(tissues: np.ndarray, chest: _ChestBuilder, rng: np.random.Generator,
               ct_tumour_contrast: float | None = None) -> np.ndarray:
    """CT in int16 HU from the tissue map ``(z, y, x)``.

    Noise is added before the blur so that it comes out slightly correlated, as in reconstructed CT.
    """
    means, textures = _appearance_tables(rng, "ct", ct_tumour_contrast)
    noise_sigma = float(rng.uniform(10.0, 25.0))
    gravity = float(rng.uniform(20.0, 50.0))  # HU denser at the back of the lungs (dependent lung)
    texture = _SmoothField(rng, tissues.shape, chest.spacing, 4.0)
    gradient = (gravity * np.clip((chest.ys - chest.yc) / chest.b0, -1, 1)).astype(np.float32)[:, None]
    blur = _blur_sigma(chest.spacing)
    noise_scale = np.float32(noise_sigma / _gaussian_noise_gain(blur))
    out = np.empty(tissues.shape, dtype=np.int16)
    for start in range(0, tissues.shape[0], _CHUNK_SLICES):
        codes = tissues[start : start + _CHUNK_SLICES]
        values = means[codes]
        values += textures[codes] * texture.slab(start, start + codes.shape[0])
        values += (codes == Tissue.LUNG) * gradient
        noise = rng.standard_normal(codes.shape, dtype=np.float32)
        noise *= noise_scale
        values += noise
        ndimage.gaussian_filter(values, (0, blur, blur), output=noise, truncate=_BLUR_TRUNCATE)
        np.rint(noise, out=noise)
        np.clip(noise, -1024, 3071, out=noise)
        out[start : start + codes.shape[0]] = noise
    return out


def _render_mr(tissues: np.ndarray, chest: _ChestBuilder, rng: np.random.Generator) -> np.ndarray:
    """T2-weighted-like MR in float32 arbitrary units from the tissue map ``(z, y, x)``."""
    means, textures = _appearance_tables(rng, "mr")
    noise_sigma = np.float32(rng.uniform(10.0, 20.0))
    texture = _SmoothField(rng, tissues.shape, chest.spacing, 5.0)
    bias_xy, bias_z = _bias_field(rng, chest)
    blur = _blur_sigma(chest.spacing)
    out = np.empty(tissues.shape, dtype=np.float32)
    for start in range(0, tissues.shape[0], _CHUNK_SLICES):
        codes = tissues[start : start + _CHUNK_SLICES]
        stop = start + codes.shape[0]
        values = means[codes]
        values += textures[codes] * texture.slab(start, stop)
        np.maximum(values, 0, out=values)
        signal = ndimage.gaussian_filter(values, (0, blur, blur), truncate=_BLUR_TRUNCATE)
        signal *= bias_xy[None]
        signal *= bias_z[start:stop, None, None]
        # Rician: the magnitude of a complex signal with Gaussian noise in both channels.
        rng.standard_normal(codes.shape, dtype=np.float32, out=values)
        values *= noise_sigma
        signal += values
        rng.standard_normal(codes.shape, dtype=np.float32, out=values)
        values *= noise_sigma
        signal *= signal
        values *= values
        signal += values
        np.sqrt(signal, out=out[start:stop])
    return out


def _bias_field(rng: np.random.Generator, chest: _ChestBuilder) -> tuple[np.ndarray, np.ndarray]:
    """A smooth multiplicative coil sensitivity, separable as (y, x) times z, within about 0.7-1.3."""
    x = (chest.xs - chest.xc) / (1.2 * chest.a0)
    y = (chest.ys - chest.yc) / (1.2 * chest.b0)
    x2, y2 = np.meshgrid(x, y)
    c = rng.uniform(-1, 1, size=5) * [0.12, 0.12, 0.1, 0.1, 0.06]
    log_xy = c[0] * x2 + c[1] * y2 + c[2] * x2**2 + c[3] * y2**2 + c[4] * x2 * y2
    z = (chest.zs - chest.zs.mean()) / max(float(np.ptp(chest.zs)) / 2, 1.0) if chest.nz > 1 else np.zeros(1)
    log_z = rng.uniform(-0.1, 0.1) * z + rng.uniform(-0.05, 0.05) * z**2
    return np.exp(np.clip(log_xy, -0.3, 0.3)).astype(np.float32), np.exp(log_z).astype(np.float32)
