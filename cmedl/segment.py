"""The inference pipeline: CT volume -> lungs -> ROI slices -> student network -> labelmap on the CT's grid.

Steps, for one CT:

1. check the intensities look like CT in HU (an MR image is refused unless forced);
2. detect the lungs; their slices and the in-plane ROI (lungs' bounding box plus a margin, so tumours at
   the mediastinum and chest wall are inside) choose what is segmented. The lung mask never clips the tumour;
3. reorient to the closest axial LPS orientation (the orientation the networks are trained in), crop each
   ROI slice, resample it in-plane to the model's pixel spacing, window and scale the HU values;
4. cover each slice with overlapping patches, run the network on batches of patches, blend the
   probabilities and resample them back to the CT's pixels (:class:`cmedl.inference.InferenceEngine`: by
   default the fast path, BatchNorm folded, channels_last, native precision, air tiles skipped);
5. threshold, undo the reorientation and return a labelmap on exactly the input grid;
6. split the tumour mask into lesions (3D connected components, :mod:`cmedl.lesions`), measure them and,
   when asked, drop those below a volume or a peak probability.

Only the probabilities of the slices whose patches are in flight are held as floats; the tumour probability
of every slice is kept as uint8 (0-255 for 0-1) on the CT's grid, one byte per voxel like the labelmap.
With test-time augmentation (``tta``) every slice is also segmented mirrored left-right and front-back; the
three answers are averaged and their standard deviation is the per-voxel uncertainty.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from cmedl import __version__
from cmedl.catalogue import check_model_integrity
from cmedl.devices import resolve_device
from cmedl.errors import InputError, OutputError
from cmedl.filebase import file_sha256
from cmedl.inference import OUTSIDE_BODY_HU, InferenceEngine, fast_path_enabled, tile_mode_from_env
from cmedl.lesions import (
    LESIONS_SUFFIXES,
    Lesion,
    find_lesions,
    label_lesions,
    lesions_table,
    split_by_minimums,
    write_lesions,
)
from cmedl.lungs import LpsOrder, LungDetection, detect_lungs
from cmedl.modality import check_finite_voxels, check_looks_like_ct
from cmedl.modelfile import LoadedModel, load_model
from cmedl.patches import resize_slices
from cmedl.progress import STAGE_LUNGS, STAGE_READ, STAGE_SEGMENT, STAGE_WRITE, Progress
from cmedl.segment_options import SegmentOptions
from cmedl.volumes import (
    LABELMAP_SUFFIXES,
    VOLUME_SUFFIXES,
    OutputSet,
    check_output_targets,
    dicom_series_note,
    normalise_hu,
    read_volume,
    suffix_of,
    write_labelmap,
    write_volume,
)

CANONICAL_ORIENTATION = "LPS"
# Test-time augmentation: identity, then mirrored left-right and front-back. Both mirror the chest onto a
# plausible chest (head-foot would not: the network sees one axial slice and lungs are not symmetric that way).
TTA_FLIPS = (None, "left_right", "anterior_posterior")


@dataclass
class SegmentResult:
    """What :meth:`Segmenter.segment` found in one CT; every image is on exactly the CT's grid.

    Attributes:
        label: uint8 labelmap (1 = tumour), after lesions below the minimum volume or probability are removed.
        tumour_volume_ml: volume of label 1 in mL.
        probabilities: uint8 tumour probability, 0-255 for 0-1 (round(p * 255)); 0 outside the segmented region.
        uncertainty: with ``tta`` only: uint8 standard deviation of the tumour probability over the flips,
            0-255 for 0-1 like the probability (at most 0.5, so at most 128); else None.
        lesions: the lesions of ``label``, by decreasing volume (:class:`cmedl.lesions.Lesion`).
        removed_lesions: the lesions removed by the minimum volume or probability (numbered before removal).
    """

    label: sitk.Image
    tumour_volume_ml: float
    slices_segmented: int
    device: str
    seconds: float
    lungs: LungDetection | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    probabilities: sitk.Image | None = None
    uncertainty: sitk.Image | None = None
    lesions: list[Lesion] = field(default_factory=list)
    removed_lesions: list[Lesion] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "tumour_volume_ml": round(self.tumour_volume_ml, 3),
            "slices_segmented": self.slices_segmented,
            "device": self.device,
            "seconds": round(self.seconds, 2),
            "lesion_count": len(self.lesions),
            "removed_lesion_count": len(self.removed_lesions),
            "removed_volume_ml": round(sum(lesion.volume_ml for lesion in self.removed_lesions), 3),
            **self.extra,
            "lesions": lesions_table(self.lesions),
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
        fast: the fast inference path (:mod:`cmedl.inference`: BatchNorm folded, channels_last, the CPU's or
            GPU's native precision, air tiles skipped); False runs the reference path; None (default) takes it
            unless ``CMEDL_FAST_PATH=0``.
        tiles: ``training`` (the model card's patch size and overlap) or ``slice`` (one tile per ROI slice, fast
            path only); None takes ``CMEDL_TILES`` or ``training``.
        precision: ``auto`` (native only) or a forced ``fp32``/``bf16``/``fp16`` for the fast path.
        threads: torch threads to set; None sets one per physical core in the command-line process only.
        prefetch: batches of tiles prepared ahead in a thread; None: :func:`cmedl.inference.prefetch_depth`
            (on CUDA only, unless ``CMEDL_PREFETCH`` says otherwise).
    """

    def __init__(
        self,
        model: LoadedModel,
        options: SegmentOptions | None = None,
        progress: Progress | None = None,
        *,
        fast: bool | None = None,
        tiles: str | None = None,
        precision: str = "auto",
        threads: int | None = None,
        prefetch: int | None = None,
    ):
        self.model = model
        self.options = options or SegmentOptions()
        self.progress = progress or Progress()
        self.device = resolve_device(self.options.device)
        # The fast path (cmedl.inference) unless it is turned off here or by CMEDL_FAST_PATH=0; the reference
        # path runs the network as trained. Both tile as in training unless tiles="slice" (or CMEDL_TILES=slice).
        self.engine = InferenceEngine(
            model.network,
            self.device,
            fast=fast_path_enabled() if fast is None else fast,
            precision_mode=precision,
            tiles=tile_mode_from_env() if tiles is None else tiles,
            threads=threads,
            prefetch=prefetch,
        )
        self.network = self.engine.model

    def segment(self, ct: sitk.Image, name: str = "input") -> SegmentResult:
        """Segment ``ct``: a uint8 labelmap, the probability (and with ``tta`` uncertainty) maps and the
        lesions, all on exactly ``ct``'s grid (see :class:`SegmentResult`)."""
        started = time.perf_counter()
        options, card = self.options, self.model.card
        check_finite_voxels(ct, name)  # even with force: NaN voxels would be silently called background
        if not options.force:
            check_looks_like_ct(ct, name)
        self.progress.update(STAGE_LUNGS, 0, 1, "detecting lungs")
        lungs = detect_lungs(ct, threshold_hu=options.lung_threshold_hu, margin_mm=options.roi_margin_mm, name=name)
        self.progress.update(STAGE_LUNGS, 1, 1, "detecting lungs")

        # The CANONICAL_ORIENTATION (LPS) voxel order as views of the CT's array and of the outputs' arrays (which
        # are allocated in the CT's own order): DICOMOrient's reordering without copying a voxel.
        order = LpsOrder.of(ct)
        volume = order.to_lps(sitk.GetArrayViewFromImage(ct))
        (x0, x1), (y0, y1), (z0, z1) = order.box_to_lps(lungs.roi_box)
        slices = np.arange(z0, z1 + 1)
        box = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        spacing_y, spacing_x = order.spacing_zyx[1:]
        target_x, target_y = card.spacing_mm
        region = (y1 - y0 + 1, x1 - x0 + 1)
        work_size = resampled_size(region, (spacing_y, spacing_x), (target_y, target_x))

        outputs = {"label": np.zeros(order.shape, dtype=np.uint8), "tumour": np.zeros(order.shape, dtype=np.uint8)}
        if options.tta:
            outputs["spread"] = np.zeros(order.shape, dtype=np.uint8)
        label = order.to_lps(outputs["label"])
        tumour = order.to_lps(outputs["tumour"])  # tumour probability x 255
        spread = order.to_lps(outputs["spread"]) if options.tta else None
        for z, probabilities, deviation in self._slice_probabilities(volume, slices, box, work_size):
            if card.num_classes == 2:
                mask = probabilities[1] >= options.probability_threshold
                label[z][box] = mask.astype(np.uint8)
            else:
                label[z][box] = probabilities.argmax(axis=0).astype(np.uint8)
            tumour[z][box] = _as_bytes(probabilities[1])
            if spread is not None and deviation is not None:
                spread[z][box] = _as_bytes(deviation)

        del label, tumour, spread

        def on_ct_grid(key: str) -> sitk.Image:
            image = sitk.GetImageFromArray(outputs.pop(key))  # already in the CT's voxel order
            image.CopyInformation(ct)
            return image

        result = on_ct_grid("label")
        probability_image = on_ct_grid("tumour")
        uncertainty_image = on_ct_grid("spread") if options.tta else None
        result, lesions, removed = self._lesions(result, probability_image, ct, lungs)
        voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
        tumour_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(result) == 1)) * voxel_ml
        return SegmentResult(
            label=result,
            tumour_volume_ml=tumour_ml,
            slices_segmented=len(slices),
            device=self.device.type,
            seconds=time.perf_counter() - started,
            lungs=lungs,
            extra={"tta": bool(options.tta), **self.engine.report()},
            probabilities=probability_image,
            uncertainty=uncertainty_image,
            lesions=lesions,
            removed_lesions=removed,
        )

    def _lesions(
        self, label: sitk.Image, probabilities: sitk.Image, ct: sitk.Image, lungs: LungDetection
    ) -> tuple[sitk.Image, list[Lesion], list[Lesion]]:
        """The lesions of label 1; those below the minimum volume or peak probability are removed first."""
        options = self.options
        # No progress stage of its own: it takes a fraction of a second, and the panels know the stages.
        tumour = sitk.GetArrayViewFromImage(label) == 1
        lesions = find_lesions(tumour, probabilities, ct, lungs.lung_mask)
        removed = split_by_minimums(lesions, options.min_lesion_ml, options.min_lesion_probability)[1]
        if removed:
            ids = label_lesions(tumour)
            array = sitk.GetArrayFromImage(label)
            array[np.isin(ids, [lesion.id for lesion in removed]) & (ids > 0)] = 0
            kept = sitk.GetImageFromArray(array)
            kept.CopyInformation(label)
            label = kept
            # Removing whole components leaves the others as they were; only their ids move up.
            lesions = find_lesions(array == 1, probabilities, ct, lungs.lung_mask)
        return label, lesions, removed

    def _slice_probabilities(
        self, volume: np.ndarray, slices: np.ndarray, box: tuple[slice, slice], work_size: tuple[int, int]
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Yield ``(z, probabilities, deviation)`` for every ROI slice, arrays on the box's pixels.

        ``probabilities`` is ``(C, rows, cols)``, averaged over the flips with ``tta``; ``deviation`` is the
        tumour probability's standard deviation over the flips ``(rows, cols)``, or None without ``tta``.
        """
        card, options = self.model.card, self.options
        region_size = (box[0].stop - box[0].start, box[1].stop - box[1].start)
        flips = TTA_FLIPS if options.tta else (None,)

        def prepared() -> Iterator[tuple[tuple[int, str | None], np.ndarray]]:
            for z in slices:
                pixels = normalise_hu(volume[int(z)][box], card.hu_window)
                pixels = resize_slices(pixels[None], work_size)[0]
                for flip in flips:
                    yield (int(z), flip), np.ascontiguousarray(_flipped(pixels, flip))

        total = len(slices)
        self.progress.update(STAGE_SEGMENT, 0, total, "slices")
        predictions = self.engine.predict(
            prepared(),
            num_classes=card.num_classes,
            patch=card.patch_size,
            overlap=options.overlap,
            batch_size=options.batch_size,
            outside_level=float(normalise_hu(np.float32(OUTSIDE_BODY_HU), card.hu_window)),
        )
        # predict_slices answers in input order, so the flips of one slice arrive one after the other.
        answers: list[np.ndarray] = []
        done = 0
        for (z, flip), probabilities in predictions:
            answers.append(_flipped(probabilities, flip))  # mirrored back: a flip is its own inverse
            if len(answers) < len(flips):
                continue
            stack = np.stack(answers)
            answers = []
            mean = resize_slices(stack.mean(axis=0)[None], region_size)[0]
            deviation = None
            if options.tta:
                deviation = resize_slices(stack[:, 1].std(axis=0)[None], region_size)[0]
            done += 1
            self.progress.update(STAGE_SEGMENT, done, total, "slices")
            yield z, mean, deviation


def _as_bytes(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8 0-255 (rounded)."""
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def _flipped(array: np.ndarray, flip: str | None) -> np.ndarray:
    """``array`` (..., rows, columns) of an LPS-oriented axial slice mirrored left-right or front-back."""
    if flip == "left_right":
        return array[..., :, ::-1]  # columns run right to left in LPS order
    if flip == "anterior_posterior":
        return array[..., ::-1, :]  # rows run front to back
    return array


def input_sha256(path: str | Path) -> str:
    """sha256 of an input: of the file's bytes, or for a folder (a DICOM series) of its files' sorted sha256s.

    For a folder, every visible file directly inside counts (hex digests sorted, joined by newlines, hashed),
    so the hash does not depend on file names or listing order. A header-and-data pair (.mhd, .nhdr) is
    hashed by its header only.
    """
    path = Path(path)
    if path.is_dir():
        digests = sorted(
            file_sha256(entry) for entry in path.iterdir() if entry.is_file() and not entry.name.startswith(".")
        )
        return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()
    try:
        return file_sha256(path)
    except OSError as error:
        raise InputError(f"cannot read {path.name}: {error.strerror or error}") from None


def provenance(model: LoadedModel, options: SegmentOptions, input_path: str | Path, sha256: str | None = None) -> dict:
    """Where a result comes from: model name and sha256, engine version, every option, input name and sha256.

    ``sha256`` is the input's hash when already known (see :func:`input_sha256`).
    """
    return {
        "model": model.card.name,
        "model_sha256": model.sha256,
        "engine_version": __version__,
        "options": asdict(options),
        "input": Path(input_path).name,
        "input_sha256": sha256 or input_sha256(input_path),
    }


def provenance_header(record: dict[str, Any]) -> dict[str, str]:
    """:func:`provenance` as single-line header fields ``CMEDL_<key>`` (options as compact JSON)."""
    return {
        f"CMEDL_{key}": value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)
        for key, value in record.items()
    }


def check_output_paths(
    input_path: str | Path,
    output_path: str | Path,
    lesions_path: str | Path | None = None,
    probabilities_path: str | Path | None = None,
    uncertainty_path: str | Path | None = None,
) -> None:
    """Refuse unsupported suffixes, an output that is the input, and one path given for two outputs."""
    output_path = Path(output_path)
    if suffix_of(output_path) not in LABELMAP_SUFFIXES:
        raise OutputError(f"unsupported output format {output_path.name!r}; use one of {', '.join(LABELMAP_SUFFIXES)}")
    if lesions_path is not None and Path(lesions_path).suffix.lower() not in LESIONS_SUFFIXES:
        raise OutputError(f"unsupported lesion table format {Path(lesions_path).name!r}; use .json or .csv")
    for what, path in (("probability", probabilities_path), ("uncertainty", uncertainty_path)):
        if path is not None and suffix_of(path) not in VOLUME_SUFFIXES:
            raise OutputError(
                f"unsupported {what} map format {Path(path).name!r}; use one of {', '.join(VOLUME_SUFFIXES)}"
            )
    outputs = [Path(p) for p in (output_path, lesions_path, probabilities_path, uncertainty_path) if p is not None]
    resolved = [p.resolve() for p in outputs]
    if Path(input_path).resolve() in resolved:
        raise InputError("an output path is the input path; the input is never overwritten")
    if len(set(resolved)) != len(resolved):
        raise InputError("the same path is given for two outputs")


def segment_to_files(
    segmenter: Segmenter,
    input_path: str | Path,
    output_path: str | Path,
    *,
    lesions_path: str | Path | None = None,
    probabilities_path: str | Path | None = None,
    uncertainty_path: str | Path | None = None,
) -> dict[str, Any]:
    """Segment one CT with an already loaded model and write its outputs; returns the summary dict.

    All outputs appear together when everything is written, or none does (:class:`cmedl.volumes.OutputSet`),
    and files they replace are kept when any of them fails. A target that is a folder is refused before the CT
    is read, not after the segmentation. The labelmap header (NRRD formats) and the lesion table carry the
    provenance (:func:`provenance`); the probability and uncertainty maps are uint8 (0-255 for 0-1) on the CT's
    grid.
    """
    options, progress, model = segmenter.options, segmenter.progress, segmenter.model
    if uncertainty_path is not None and not options.tta:
        raise InputError("an uncertainty map needs test-time augmentation (tta)")
    check_output_paths(input_path, output_path, lesions_path, probabilities_path, uncertainty_path)
    check_output_targets([output_path, lesions_path, probabilities_path, uncertainty_path])
    output_path = Path(output_path)
    progress.update(STAGE_READ, 0, 1, "reading")
    ct = read_volume(input_path)
    record = provenance(model, options, input_path)
    series_note = dicom_series_note(ct)
    if series_note:
        progress.log(f"note: {series_note}")
    progress.update(STAGE_READ, 1, 1, "reading")
    result = segmenter.segment(ct, name=Path(input_path).name)
    progress.update(STAGE_WRITE, 0, 1, "writing")
    header = provenance_header(record)
    summary: dict[str, Any] = {
        "input": str(input_path),
        "output": str(output_path),
        "model": model.card.name,
        "model_sha256": model.sha256,
        "provenance": record,
        **({"input_note": series_note} if series_note else {}),
    }
    with OutputSet():
        write_labelmap(result.label, output_path, model.card.segment_infos(), metadata=header)
        for path, image, key in (
            (probabilities_path, result.probabilities, "probabilities"),
            (uncertainty_path, result.uncertainty, "uncertainty"),
        ):
            if path is not None and image is not None:
                for field_name, value in header.items():
                    image.SetMetaData(field_name, value)
                write_volume(image, path)
                summary[key] = str(path)
        if lesions_path is not None:
            table_summary = {
                "segmentation": output_path.name,
                "tumour_volume_ml": round(result.tumour_volume_ml, 3),
                "removed_lesion_count": len(result.removed_lesions),
            }
            write_lesions(lesions_path, result.lesions, record, table_summary)
            summary["lesions_file"] = str(lesions_path)
    progress.update(STAGE_WRITE, 1, 1, "writing")
    result_summary = result.summary()
    lesions = result_summary.pop("lesions")
    summary.update(result_summary)
    if result.lungs is not None:
        summary["lungs"] = result.lungs.summary()
    summary["lesions"] = lesions  # last: the longest part of the summary
    return summary


def segment_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path,
    options: SegmentOptions | None = None,
    progress: Progress | None = None,
    *,
    lesions_path: str | Path | None = None,
    probabilities_path: str | Path | None = None,
    uncertainty_path: str | Path | None = None,
) -> dict[str, Any]:
    """Read a CT file or DICOM folder, segment it and write the labelmap (.nii.gz, .nrrd or .seg.nrrd).

    Optional outputs: the lesion table (``lesions_path``, .json or .csv), the tumour probability map and,
    with ``options.tta``, the uncertainty map (any volume format; uint8, 0-255 for 0-1, on the CT's grid).
    Every output is written under a temporary name and renamed at the end, all together; on any error
    nothing is left at any output path. Returns a summary dict (output path, tumour volume in mL, lesion
    count and table, timing, model, provenance).
    """
    progress = progress or Progress()
    options = options or SegmentOptions()
    if uncertainty_path is not None and not options.tta:
        raise InputError("an uncertainty map needs test-time augmentation (tta)")
    check_output_paths(input_path, output_path, lesions_path, probabilities_path, uncertainty_path)
    model = load_model(model_path)
    check_model_integrity(model.path, model.sha256)
    return segment_to_files(
        Segmenter(model, options, progress),
        input_path,
        output_path,
        lesions_path=lesions_path,
        probabilities_path=probabilities_path,
        uncertainty_path=uncertainty_path,
    )
