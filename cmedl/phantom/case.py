"""One phantom case: :func:`make_phantom` draws a chest, paints its tumours and renders it as CT or MR.

The anatomy (:mod:`cmedl.phantom.anatomy`) and the tumours (:mod:`cmedl.phantom.tumours`) depend only on
``seed``, ``size``, ``slices``, ``spacing`` and ``tumour_locations``; the modality changes only how tissues
look (:mod:`cmedl.phantom.rendering`). ``make_phantom("ct", s)`` and ``make_phantom("mr", s)`` are therefore
a *paired* case. The result is a :class:`PhantomCase` of SimpleITK images on one grid: CT int16 HU or MR
float32 arbitrary units, the uint8 tumour label, tissue map and tumour instance map; arrays are
``(slices, size, size)`` in numpy order. :func:`size_problem` says up front whether a size fits in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from cmedl.errors import ConfigError
from cmedl.memory import available_ram_bytes, describe_bytes
from cmedl.phantom.anatomy import MAX_SLICES, Tissue, _ChestBuilder
from cmedl.phantom.rendering import _check_modality, _render_ct, _render_mr
from cmedl.phantom.tumours import _check_contrast, _check_locations, _TumourPainter

MIN_SIZE = 32
MAX_SIZE = 4096  # eight times the reference matrix
# Peak memory per voxel while one case is built, rendered and written (about 10 bytes measured at 64 and 256).
PEAK_BYTES_PER_VOXEL = 16


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

    # The anatomy and tumours draw nothing that depends on the modality, so CT and MR of one seed share
    # them; the CT-only contrast option acts in the CT render.
    anatomy_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    chest = _ChestBuilder(anatomy_rng, int(size), slices, spacing)
    tissues = chest.build()
    painter = _TumourPainter(chest, locations)
    tumours = painter.paint()  # into ``tissues`` itself, so the render and the label see the tumours
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
        instances=_image_on(painter.instance_map(), chest),
    )


def _image_on(array: np.ndarray, chest: _ChestBuilder) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(chest.spacing)
    image.SetOrigin(chest.origin)
    return image
