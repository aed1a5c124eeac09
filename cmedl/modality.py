"""Does an image look like a CT in Hounsfield units? A guard before lung detection and CT segmentation.

A CT in HU holds air near -1000 (around the patient, in the lungs and bowel), fat near -100, soft tissue at
0..100 and bone up to 1000 and more, as (mostly) integers between -1024 (or padding down to -3024) and about
4000. An MR image holds arbitrary positive units (0..3000, say) with no population near -1000 HU.

The decision uses two facts that hold for every CT this project has met (whole chest, hemithorax crop,
mediastinal crop, abdomen, single slices) and for none of its MR images:

- some voxels are air or lung: at least 0.5% between -1100 and -500 HU;
- the most common value between -500 and 500 (the soft-tissue or fat peak) lies between -150 and 150 HU.

Padding (one exact value filling a large share of the image border: -1024, -2048, -3024 outside a circular
field of view) is left out of these statistics, so that padding alone never passes for air.

A CT stored without its rescale intercept (values 0..4000, air near 24) fails the first test but passes
both once 1024 is subtracted. Such an image is refused too, with a message that says to rescale it: guessing
the offset silently would hide a broken export from the user, and a wrong guess would feed an MR image to a CT
model.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from cmedl.errors import InputError, NotCTError

AIR_OR_LUNG_HU = (-1100.0, -500.0)
MIN_AIR_OR_LUNG_FRACTION = 0.005
TISSUE_WINDOW_HU = (-500.0, 500.0)
TISSUE_PEAK_HU = (-150.0, 150.0)
TISSUE_BIN_HU = 10.0
STORAGE_OFFSET = 1024.0
PADDING_BORDER_FRACTION = 0.2
MAX_SAMPLES = 2_000_000  # voxels looked at; a regular subsample keeps the check fast on large volumes


def ct_likelihood_report(image: sitk.Image) -> dict:
    """The statistics behind :func:`check_looks_like_ct`, as a JSON-serialisable dict.

    Keys: ``voxels_sampled``; ``padding_value`` (None when there is none); ``min``, ``max`` (all voxels);
    ``p1``, ``p50``, ``p99`` (image units, padding left out); ``fraction_air``
    (-1100..-900), ``fraction_air_or_lung`` (-1100..-500), ``fraction_soft_tissue`` (-150..150),
    ``fraction_integer``; ``tissue_peak_hu`` (centre of the most common 10-unit bin in -500..500, None when
    empty); ``looks_like_ct``; ``offset_1024_suspected`` (fails as HU but passes after subtracting 1024);
    ``reason`` (one line, empty when it looks like a CT).
    """
    all_values = _sample(image)
    padding = _padding_value(image)
    values = all_values if padding is None else all_values[all_values != padding]
    report = {"voxels_sampled": int(all_values.size), "padding_value": padding}
    if values.size == 0:
        return report | {"looks_like_ct": False, "offset_1024_suspected": False, "reason": "the image is empty"}
    p1, p50, p99 = (float(v) for v in np.percentile(values, [1, 50, 99]))
    stats = _hu_statistics(values)
    report |= {
        "min": float(all_values.min()),
        "max": float(all_values.max()),
        "p1": p1,
        "p50": p50,
        "p99": p99,
        "fraction_air": float(np.mean((values >= -1100) & (values <= -900))),
        "fraction_air_or_lung": stats["fraction_air_or_lung"],
        "fraction_soft_tissue": float(np.mean((values >= TISSUE_PEAK_HU[0]) & (values <= TISSUE_PEAK_HU[1]))),
        "fraction_integer": float(np.mean(values == np.round(values))),
        "tissue_peak_hu": stats["tissue_peak_hu"],
    }
    looks_like_ct = _passes(stats)
    offset_suspected = not looks_like_ct and _passes(_hu_statistics(values - STORAGE_OFFSET))
    report["looks_like_ct"] = looks_like_ct
    report["offset_1024_suspected"] = offset_suspected
    report["reason"] = "" if looks_like_ct else _reason(report, offset_suspected)
    return report


def check_looks_like_ct(image: sitk.Image, name: str = "input") -> None:
    """Raise :class:`NotCTError` (one line naming ``name``) unless ``image`` looks like a CT in HU."""
    report = ct_likelihood_report(image)
    if not report["looks_like_ct"]:
        raise NotCTError(f"{name} does not look like a CT in Hounsfield units: {report['reason']}")


def check_finite_voxels(image: sitk.Image, name: str = "input") -> None:
    """Refuse an image holding NaN or infinite voxels (an :class:`InputError`, exit 3), naming how many.

    No scanner writes them: they come from a processing step gone wrong, and a network would turn them into
    silently wrong answers (NaN compares false with every threshold). Integer images cannot hold them and are
    not scanned.
    """
    if image.GetPixelID() not in _FLOAT_PIXEL_IDS:
        return
    values = sitk.GetArrayViewFromImage(image)
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        share = bad / values.size
        raise InputError(
            f"{name} has {bad:,} voxel{'s' if bad != 1 else ''} ({share:.2%}) that are NaN or infinite; "
            "an image must hold finite values"
        )


_FLOAT_PIXEL_IDS = (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)


def _sample(image: sitk.Image) -> np.ndarray:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NotCTError(f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel; a CT has one")
    values = sitk.GetArrayViewFromImage(image).ravel()
    step = max(1, values.size // MAX_SAMPLES)
    values = np.asarray(values[::step], dtype=np.float64)
    return values[np.isfinite(values)]


def _padding_value(image: sitk.Image) -> float | None:
    """The exact value covering at least a fifth of the voxels on the in-plane edges of the slices, if any."""
    array = sitk.GetArrayViewFromImage(image)
    if array.ndim == 2:
        array = array[np.newaxis]
    edges = (array[..., 0, :], array[..., -1, :], array[..., :, 0], array[..., :, -1])
    border = np.concatenate([np.ravel(edge) for edge in edges])
    values, counts = np.unique(border, return_counts=True)
    most = int(np.argmax(counts))
    return float(values[most]) if counts[most] >= PADDING_BORDER_FRACTION * border.size else None


def _hu_statistics(values: np.ndarray) -> dict:
    low, high = AIR_OR_LUNG_HU
    in_window = values[(values >= TISSUE_WINDOW_HU[0]) & (values <= TISSUE_WINDOW_HU[1])]
    peak = None
    if in_window.size:
        bins = int(round((TISSUE_WINDOW_HU[1] - TISSUE_WINDOW_HU[0]) / TISSUE_BIN_HU))
        counts, edges = np.histogram(in_window, bins=bins, range=TISSUE_WINDOW_HU)
        most = int(np.argmax(counts))
        peak = float(0.5 * (edges[most] + edges[most + 1]))
    return {"fraction_air_or_lung": float(np.mean((values >= low) & (values <= high))), "tissue_peak_hu": peak}


def _passes(stats: dict) -> bool:
    peak = stats["tissue_peak_hu"]
    has_air = stats["fraction_air_or_lung"] >= MIN_AIR_OR_LUNG_FRACTION
    return bool(has_air and peak is not None and TISSUE_PEAK_HU[0] <= peak <= TISSUE_PEAK_HU[1])


def _reason(report: dict, offset_suspected: bool) -> str:
    value_range = f"values {report['min']:g}..{report['max']:g}"
    if offset_suspected:
        return (
            f"{value_range} look like a CT stored with a +1024 offset (air near {report['p1']:g} instead of -1000); "
            "subtract 1024 (rescale intercept -1024) to get Hounsfield units"
        )
    if report["fraction_air_or_lung"] < MIN_AIR_OR_LUNG_FRACTION:
        return f"{value_range} with no air or lung near -1000 HU (an MR image?)"
    peak = report["tissue_peak_hu"]
    where = "no values" if peak is None else f"the main peak at {peak:g}"
    return f"{value_range} with {where} between -500 and 500, where a CT has its soft-tissue peak (near 0 HU)"
