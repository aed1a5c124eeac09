"""The inference pipeline: CT volume -> lungs -> ROI slices -> student network -> labelmap on the CT's grid.

Steps, for one CT:

1. check the intensities look like CT in HU (an MR image is refused unless forced);
2. detect the lungs; their slices and the in-plane ROI (lungs' bounding box plus a margin, so tumours at
   the mediastinum and chest wall are inside) choose what is segmented. The lung mask never clips the tumour;
3. reorient to the closest axial LPS orientation (the orientation the networks are trained in), crop each
   ROI slice, resample it in-plane to the model's pixel spacing, window and scale the HU values;
4. cover each slice with overlapping patches, run the network on batches of patches, blend the
   probabilities and resample them back to the CT's pixels;
5. threshold, undo the reorientation and return a labelmap on exactly the input grid.

Only the probabilities of the slices whose patches are in flight are held in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from cmedl.devices import autocast_context, autocast_dtype, resolve_device
from cmedl.errors import InputError, OutputError
from cmedl.lungs import LungDetection, detect_lungs
from cmedl.modality import check_looks_like_ct
from cmedl.modelfile import LoadedModel, load_model
from cmedl.patches import predict_slices, resize_slices
from cmedl.progress import Progress
from cmedl.volumes import LABELMAP_SUFFIXES, normalise_hu, read_volume, suffix_of, write_labelmap

CANONICAL_ORIENTATION = "LPS"


@dataclass
class SegmentOptions:
    """User-adjustable inference settings.

    Attributes:
        lung_threshold_hu: HU below which a voxel counts as air for lung detection.
        roi_margin_mm: in-plane margin around the lungs' bounding box.
        probability_threshold: tumour probability at or above which a voxel is labelled.
        batch_size: patches per network call.
        overlap: fraction by which neighbouring patches overlap.
        device: ``auto`` (CUDA when usable, else CPU), ``cpu`` or ``cuda``.
        force: segment even when the image does not look like CT.
    """

    lung_threshold_hu: float = -300.0
    roi_margin_mm: float = 30.0
    probability_threshold: float = 0.5
    batch_size: int = 4
    overlap: float = 0.25
    device: str = "auto"
    force: bool = False


@dataclass
class SegmentResult:
    label: sitk.Image
    tumour_volume_ml: float
    slices_segmented: int
    device: str
    seconds: float
    lungs: LungDetection | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "tumour_volume_ml": round(self.tumour_volume_ml, 3),
            "slices_segmented": self.slices_segmented,
            "device": self.device,
            "seconds": round(self.seconds, 2),
            **self.extra,
        }


def resampled_size(size: tuple[int, int], spacing: tuple[float, float], target: tuple[float, float]) -> tuple[int, int]:
    """In-plane ``(rows, columns)`` after resampling from ``spacing`` to ``target`` (both (row, column) mm)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(size, spacing, target))  # type: ignore[return-value]


class Segmenter:
    """Runs one loaded model over CT volumes.

    Args:
        model: a :class:`cmedl.modelfile.LoadedModel` (network + model card).
        options: inference settings.
        progress: where progress goes (and where a cancel request is noticed).
    """

    def __init__(self, model: LoadedModel, options: SegmentOptions | None = None, progress: Progress | None = None):
        self.model = model
        self.options = options or SegmentOptions()
        self.progress = progress or Progress()
        self.device = resolve_device(self.options.device)
        self.network = model.network.to(self.device).eval()

    def segment(self, ct: sitk.Image, name: str = "input") -> SegmentResult:
        """Segment ``ct``; returns a uint8 labelmap on exactly ``ct``'s grid."""
        started = time.perf_counter()
        options, card = self.options, self.model.card
        if not options.force:
            check_looks_like_ct(ct, name)
        self.progress.update("lungs", 0, 1, "detecting lungs")
        lungs = detect_lungs(ct, threshold_hu=options.lung_threshold_hu, margin_mm=options.roi_margin_mm, name=name)
        self.progress.update("lungs", 1, 1, "detecting lungs")

        oriented_ct = sitk.DICOMOrient(ct, CANONICAL_ORIENTATION)
        oriented_roi = sitk.DICOMOrient(lungs.roi_mask, CANONICAL_ORIENTATION)
        roi = sitk.GetArrayViewFromImage(oriented_roi)
        slices = np.flatnonzero(roi.any(axis=(1, 2)))
        rows = np.flatnonzero(roi.any(axis=(0, 2)))
        cols = np.flatnonzero(roi.any(axis=(0, 1)))
        volume = sitk.GetArrayViewFromImage(oriented_ct)
        label = np.zeros(volume.shape, dtype=np.uint8)
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        spacing_x, spacing_y = oriented_ct.GetSpacing()[:2]
        target_x, target_y = card.spacing_mm
        region = (len(rows), len(cols))
        work_size = resampled_size(region, (spacing_y, spacing_x), (target_y, target_x))

        for z, probabilities in self._slice_probabilities(volume, slices, box, work_size):
            if card.num_classes == 2:
                mask = probabilities[1] >= options.probability_threshold
                label[z][box] = mask.astype(np.uint8)
            else:
                label[z][box] = probabilities.argmax(axis=0).astype(np.uint8)

        oriented_label = sitk.GetImageFromArray(label)
        oriented_label.CopyInformation(oriented_ct)
        original_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ct.GetDirection())
        result = sitk.DICOMOrient(oriented_label, original_orientation)
        result.CopyInformation(ct)  # the same voxels, with the input's exact origin and direction
        voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
        tumour_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(result) == 1)) * voxel_ml
        return SegmentResult(
            label=result,
            tumour_volume_ml=tumour_ml,
            slices_segmented=len(slices),
            device=self.device.type,
            seconds=time.perf_counter() - started,
            lungs=lungs,
        )

    def _slice_probabilities(
        self, volume: np.ndarray, slices: np.ndarray, box: tuple[slice, slice], work_size: tuple[int, int]
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(z, probabilities)`` for every ROI slice; probabilities are ``(C, rows, cols)`` of the box."""
        card, options = self.model.card, self.options
        region_size = (box[0].stop - box[0].start, box[1].stop - box[1].start)

        def prepared() -> Iterator[tuple[int, np.ndarray]]:
            for z in slices:
                pixels = normalise_hu(volume[int(z)][box], card.hu_window)
                yield int(z), resize_slices(pixels[None], work_size)[0]

        total = len(slices)
        self.progress.update("segment", 0, total, "slices")
        predictions = predict_slices(
            self.network,
            prepared(),
            num_classes=card.num_classes,
            patch=card.patch_size,
            overlap=options.overlap,
            batch_size=options.batch_size,
            device=self.device,
            autocast=self._autocast,
        )
        for done, (z, probabilities) in enumerate(predictions, start=1):
            probabilities = resize_slices(probabilities[None], region_size)[0]
            self.progress.update("segment", done, total, "slices")
            yield z, probabilities

    def _autocast(self):
        return autocast_context(self.device, autocast_dtype(self.device, "auto"))


def segment_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path,
    options: SegmentOptions | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Read a CT file or DICOM folder, segment it and write the labelmap (.nii.gz, .nrrd or .seg.nrrd).

    The output is written under a temporary name and renamed at the end; on any error nothing is left
    at ``output_path``. Returns a summary dict (output path, tumour volume in mL, timing, model).
    """
    progress = progress or Progress()
    options = options or SegmentOptions()
    output_path = Path(output_path)
    if Path(input_path).resolve() == output_path.resolve():
        raise InputError("the output path is the input path; the input is never overwritten")
    if suffix_of(output_path) not in LABELMAP_SUFFIXES:
        raise OutputError(f"unsupported output format {output_path.name!r}; use one of {', '.join(LABELMAP_SUFFIXES)}")
    progress.update("read", 0, 1, "reading")
    ct = read_volume(input_path)
    progress.update("read", 1, 1, "reading")
    model = load_model(model_path)
    result = Segmenter(model, options, progress).segment(ct, name=Path(input_path).name)
    progress.update("write", 0, 1, "writing")
    write_labelmap(result.label, output_path, model.card.segment_infos())
    progress.update("write", 1, 1, "writing")
    summary = {
        "input": str(input_path),
        "output": str(output_path),
        "model": model.card.name,
        "model_sha256": model.sha256,
        **result.summary(),
    }
    if result.lungs is not None:
        summary["lungs"] = result.lungs.summary()
    return summary
