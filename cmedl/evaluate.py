"""Scoring segmentations against reference labels, one case or two folders matched by file name.

A prediction is scored on its reference's voxel grid: Dice, surface Dice at a tolerance (mm) and HD95 (mm) from
:mod:`cmedl.metrics`, computed in 3D with the reference's spacing, plus both volumes in mL. A prediction that
lies on the same voxel lattice but covers a different extent (a ``.seg.nrrd`` saved by Slicer is cropped to its
content) is placed on the reference grid exactly: reference voxels outside the prediction's extent count as
background there (a note says how many labelled ones that leaves missed), and a prediction with labelled voxels
outside the reference's grid is refused, since dropping them would hide false positives. One on another lattice
(other spacing, orientation or a sub-voxel shift) is refused, since resampling a label map would change the score
being measured. Every refusal names both grids.

Both files of a case must be label maps: whole-number voxels >= 0. An integer pixel type is the rule; a float
image is accepted when every voxel is a whole number (MONAI and some Slicer exports write label maps as float32),
so that a CT in HU (negative values), a probability map or a map of 0.5s is refused instead of being scored.
With ``label``, only that value of the predictions counts; a label found in no prediction and no reference of the
whole evaluation is refused as a mistyped option (one found in the references only is a real miss, scored 0).

``--csv`` is refused when it names an input file or lies inside an input folder (symbolic and hard links
included), before anything is read: the inputs are never modified.

Folders are matched by file stem (``case_001.nii.gz`` <-> ``case_001.seg.nrrd``); ``strip`` removes a suffix
from prediction stems first (``case_001_tumour`` -> ``case_001``). References without a prediction are listed and
left out of the summary; so are predictions without a reference.

Two methods' predictions of the same cases are compared case by case (:func:`compare_predictions`): each is scored
against the same references, and the paired Dice and surface Dice differences are tested with
:func:`cmedl.comparison.paired_comparison` (Wilcoxon signed-rank test, bootstrap interval of the mean difference).

Synthesised images (pseudo-MRI from ``cmedl translate``) are scored against real images of the same anatomy on
the same grid with :mod:`cmedl.image_similarity`: KL divergence of intensities, PSNR and SSIM.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from cmedl.comparison import paired_comparison
from cmedl.errors import InputError
from cmedl.image_similarity import image_similarity
from cmedl.metrics import segmentation_metrics
from cmedl.progress import Progress
from cmedl.volumes import atomic_output, list_volumes, read_volume, same_geometry, stem_of

#: how far (in voxels) a prediction's grid may be from the reference's lattice and still count as on it
LATTICE_TOLERANCE_VOXELS = 1e-3


@dataclass
class CaseScore:
    """The scores of one prediction against its reference. HD95 is inf when exactly one mask is empty."""

    case: str
    prediction: str
    reference: str
    dice: float
    surface_dice: float
    hd95_mm: float
    predicted_ml: float
    reference_ml: float


@dataclass
class EvaluationReport:
    """Per-case scores of two folders (or files) and what could not be paired."""

    tolerance_mm: float
    cases: list[CaseScore] = field(default_factory=list)
    missing_predictions: list[str] = field(default_factory=list)
    unmatched_predictions: list[str] = field(default_factory=list)
    #: the prediction and reference paths scored: :func:`write_csv` refuses to write over them
    inputs: tuple[Path, ...] = field(default=(), repr=False)

    def summary(self) -> dict[str, Any]:
        """Means and sample SDs over the scored cases; HD95 over the cases where it is finite."""
        hd95 = [c.hd95_mm for c in self.cases if math.isfinite(c.hd95_mm)]
        return {
            "cases": len(self.cases),
            "dice": _mean_sd([c.dice for c in self.cases if not math.isnan(c.dice)]),
            "surface_dice": _mean_sd([c.surface_dice for c in self.cases if not math.isnan(c.surface_dice)]),
            "hd95_mm": _mean_sd(hd95),
            "hd95_undefined_cases": len(self.cases) - len(hd95),
            "tolerance_mm": self.tolerance_mm,
            "missing_predictions": len(self.missing_predictions),
            "unmatched_predictions": len(self.unmatched_predictions),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "cases": [asdict(case) for case in self.cases],
            "missing_predictions": self.missing_predictions,
            "unmatched_predictions": self.unmatched_predictions,
        }


def _mean_sd(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "sd": float("nan")}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def describe_grid(image: sitk.Image) -> str:
    """A grid in one short phrase (size, spacing, origin), so that a refusal can show both grids side by side."""
    size = "x".join(str(value) for value in image.GetSize())
    spacing = "x".join(f"{round(value, 4):g}" for value in image.GetSpacing())
    origin = ", ".join(f"{round(value, 3):g}" for value in image.GetOrigin())
    return f"{size} voxels of {spacing} mm at ({origin})"


def _grids(prediction: sitk.Image, reference: sitk.Image) -> str:
    """Both grids, with the directions too when they differ (the one thing :func:`describe_grid` leaves out)."""
    text = f"{describe_grid(prediction)} vs the reference's {describe_grid(reference)}"
    if not np.allclose(prediction.GetDirection(), reference.GetDirection(), atol=1e-5):
        text += f"; directions {_rounded(prediction.GetDirection())} vs {_rounded(reference.GetDirection())}"
    return text


def on_reference_grid(prediction: sitk.Image, reference: sitk.Image, name: str = "prediction") -> sitk.Image:
    """``prediction`` on ``reference``'s grid: unchanged, or re-placed exactly when only the extent differs.

    Raises :class:`InputError`, naming both grids, when the two grids are different lattices, or when labelled
    voxels of the prediction lie outside the reference's grid: they would be cut off without a trace, and the
    false positives they are would vanish from the score.
    """
    if same_geometry(prediction, reference):
        return prediction
    spacing = np.array(reference.GetSpacing())
    if not (
        np.allclose(prediction.GetSpacing(), spacing, rtol=1e-5, atol=1e-6)
        and np.allclose(prediction.GetDirection(), reference.GetDirection(), atol=1e-5)
    ):
        raise InputError(
            f"{name} is not on the reference's voxel grid ({_grids(prediction, reference)}); save it on the CT's grid"
        )
    # The prediction's first voxel in reference voxel coordinates must be a whole number of voxels away.
    offset = np.array(reference.TransformPhysicalPointToContinuousIndex(prediction.GetOrigin()))
    if np.abs(offset - np.round(offset)).max() > LATTICE_TOLERANCE_VOXELS:
        raise InputError(
            f"{name} is shifted by a fraction of a voxel from the reference's grid ({_grids(prediction, reference)}); "
            f"save it on the CT's grid"
        )
    # Nearest neighbour on the same lattice copies voxels one to one; outside the prediction's extent it is 0.
    placed = sitk.Resample(
        prediction, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, prediction.GetPixelID()
    )
    labelled = np.count_nonzero(sitk.GetArrayViewFromImage(prediction))
    lost = labelled - np.count_nonzero(sitk.GetArrayViewFromImage(placed))
    if lost:
        raise InputError(
            f"{name} has {lost} of its {labelled} labelled voxels outside the reference's grid "
            f"({_grids(prediction, reference)}); save it on the CT's grid"
        )
    return placed


def reference_voxels_outside(prediction: sitk.Image, reference: sitk.Image) -> int:
    """Labelled reference voxels outside the extent of a prediction on the reference's lattice (0 when it covers all).

    They are scored as missed, which is right for a ``.seg.nrrd`` cropped to its content and misleading for a
    prediction of part of the scan only (or one with a wrong origin); the count lets the user tell which.
    Call it after :func:`on_reference_grid` accepted the prediction (same spacing and direction).
    """
    if same_geometry(prediction, reference):
        return 0
    reference_size = np.array(reference.GetSize())
    start = np.round(reference.TransformPhysicalPointToContinuousIndex(prediction.GetOrigin())).astype(int)
    low = np.clip(start, 0, reference_size)
    high = np.clip(start + np.array(prediction.GetSize()), 0, reference_size)
    truth = sitk.GetArrayViewFromImage(reference)
    covered = truth[low[2] : high[2], low[1] : high[1], low[0] : high[0]]  # the array is indexed (z, y, x)
    return int(np.count_nonzero(truth) - np.count_nonzero(covered))


def _rounded(values: tuple[float, ...]) -> list[float]:
    return [round(v, 4) for v in values]


def check_label_map(image: sitk.Image, name: str) -> None:
    """Refuse an image that is not a label map: its voxels must be whole numbers >= 0.

    The scores count voxels > 0 (or == label), so anything scores: a CT in HU gave Dice 0.004 and 6631 mL, a float
    map of 0/0.5 Dice 1.0, numbers that look like results. An integer pixel type is the rule, but a float image of
    whole numbers is accepted: MONAI's SaveImage and some Slicer exports write label maps as float32, and their
    values are exactly the labels. A CT holds negative HU (air is -1000) and is refused whatever its pixel type.
    """
    values = sitk.GetArrayViewFromImage(image)
    pixel_type = image.GetPixelIDTypeAsString()
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise InputError(f"{name} is not a label map: its {pixel_type} voxels include NaN or infinite values")
        fractional = values[values != np.floor(values)]
        if fractional.size:
            raise InputError(
                f"{name} is not a label map: its voxels are {pixel_type} with fractions (e.g. {fractional[0]:g}); "
                f"give a segmentation with whole-number labels (an integer pixel type)"
            )
    elif not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"{name} is not a label map: its voxels are {pixel_type}; expected whole-number labels")
    lowest = values.min() if values.size else 0
    if lowest < 0:
        raise InputError(
            f"{name} is not a label map: it holds negative values (down to {lowest:g}, {pixel_type}), like a CT in "
            f"HU; give the segmentation, not the image"
        )


def check_scoring_options(tolerance_mm: float, label: int | None) -> None:
    """Refuse a tolerance or label that would give numbers without meaning instead of an error.

    An infinite tolerance makes every surface Dice 1, NaN makes it 0; label 0 is the background and no label map
    holds a negative one, so both would score an empty prediction as if the method had found nothing.
    """
    if not (math.isfinite(tolerance_mm) and tolerance_mm > 0):
        raise InputError(f"the surface Dice tolerance must be a positive, finite number of mm, got {tolerance_mm}")
    if label is not None and label < 1:
        raise InputError(f"the label to score must be 1 or more (0 is the background), got {label}")


def score_case(
    prediction: sitk.Image,
    reference: sitk.Image,
    tolerance_mm: float,
    label: int | None = None,
    case: str = "case",
    names: tuple[str, str] = ("", ""),
) -> CaseScore:
    """Score one prediction against one reference.

    Args:
        prediction, reference: label maps (see :func:`check_label_map`); voxels > 0 are foreground, or
            ``== label`` when a label is given (the reference is always taken as > 0).
        tolerance_mm: surface Dice tolerance.
    """
    check_scoring_options(tolerance_mm, label)
    check_label_map(prediction, names[0] or "the prediction")
    check_label_map(reference, names[1] or "the reference")
    prediction = on_reference_grid(prediction, reference, names[0] or "prediction")
    predicted = sitk.GetArrayViewFromImage(prediction)
    predicted = predicted > 0 if label is None else predicted == label
    truth = sitk.GetArrayViewFromImage(reference) > 0
    metrics = segmentation_metrics(predicted, truth, reference.GetSpacing()[::-1], tolerance_mm)
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    return CaseScore(
        case=case,
        prediction=names[0],
        reference=names[1],
        dice=metrics["dice"],
        surface_dice=metrics["surface_dice"],
        hd95_mm=metrics["hd95"],
        predicted_ml=round(float(np.count_nonzero(predicted)) * voxel_ml, 3),
        reference_ml=round(float(np.count_nonzero(truth)) * voxel_ml, 3),
    )


Pair = tuple[str, Path, Path]


def pair_volumes(predictions: Path, references: Path, strip: str = "") -> tuple[list[Pair], list[str], list[str]]:
    """``(case, prediction, reference)`` triples, references without a prediction, predictions without a reference.

    Two files make one pair; two folders are matched by stem; a file and a folder is an error.
    """
    if predictions.is_file() and references.is_file():
        return [(stem_of(references), predictions, references)], [], []
    if not (predictions.is_dir() and references.is_dir()):
        for path in (predictions, references):
            if not path.exists():
                raise InputError(f"not found: {path}")
        raise InputError("give two files or two folders (predictions, references)")
    by_stem: dict[str, Path] = {}
    for path in list_volumes(predictions):
        stem = stem_of(path)
        if strip and stem.endswith(strip):
            stem = stem[: -len(strip)]
        if stem in by_stem:
            raise InputError(f"two predictions for case {stem}: {by_stem[stem].name} and {path.name}")
        by_stem[stem] = path
    pairs, missing = [], []
    for reference in list_volumes(references):
        stem = stem_of(reference)
        if stem in by_stem:
            pairs.append((stem, by_stem.pop(stem), reference))
        else:
            missing.append(reference.name)
    if not pairs:
        raise InputError(f"no prediction in {predictions} has the name of a reference in {references}")
    return pairs, missing, sorted(path.name for path in by_stem.values())


class _LabelSearch:
    """Whether the label to score occurs in any prediction or reference of an evaluation, and the largest value met.

    A label the files do not hold (``--label 7`` for binary maps, a typo) scores every case Dice 0 and reads like a
    method that found nothing; it is refused once all files were seen. A label in a reference only is a real miss.
    """

    def __init__(self, label: int | None) -> None:
        self.label = label
        self.found = label is None
        self.largest = 0.0

    def look(self, *images: sitk.Image) -> None:
        """Search ``images`` for the label (nothing to do once it was found)."""
        for image in images:
            if self.found:
                return
            values = sitk.GetArrayViewFromImage(image)
            if values.size:
                self.largest = max(self.largest, float(values.max()))
            self.found = bool(np.any(values == self.label))

    def refuse_if_absent(self) -> None:
        if not self.found:
            raise InputError(
                f"label {self.label} is in no prediction and no reference (the largest label in them is "
                f"{self.largest:g}); give a label the predictions hold"
            )


def evaluate(
    predictions: str | Path,
    references: str | Path,
    tolerance_mm: float = 2.0,
    label: int | None = None,
    strip: str = "",
    progress: Progress | None = None,
) -> EvaluationReport:
    """Score every prediction that has a reference (two files, or two folders matched by name).

    Raises:
        InputError: a bad tolerance or label, a missing or unreadable input, a file that is not a label map, a
            prediction off the reference's grid, or a label found in no prediction and no reference.
    """
    check_scoring_options(tolerance_mm, label)
    labels = _LabelSearch(label)
    report = _score_pairs(predictions, references, tolerance_mm, label, strip, progress or Progress(), labels)
    labels.refuse_if_absent()
    return report


def _score_pairs(
    predictions: str | Path,
    references: str | Path,
    tolerance_mm: float,
    label: int | None,
    strip: str,
    progress: Progress,
    labels: _LabelSearch,
) -> EvaluationReport:
    """The scores of one prediction folder (or file); ``labels`` is searched, refusing is the caller's call."""
    pairs, missing, unmatched = pair_volumes(Path(predictions), Path(references), strip)
    report = EvaluationReport(
        tolerance_mm=tolerance_mm,
        missing_predictions=missing,
        unmatched_predictions=unmatched,
        inputs=(Path(predictions), Path(references)),
    )
    for index, (case, prediction_path, reference_path) in enumerate(pairs):
        progress.update("evaluate", index, len(pairs), "cases")
        progress.check_cancelled()
        names = (prediction_path.name, reference_path.name)
        prediction, reference = read_volume(prediction_path), read_volume(reference_path)
        report.cases.append(score_case(prediction, reference, tolerance_mm, label, case, names))
        labels.look(prediction, reference)
        missed = reference_voxels_outside(prediction, reference)
        if missed:
            progress.log(
                f"{names[0]} covers only part of the reference's grid ({_grids(prediction, reference)}); "
                f"{missed} labelled reference voxels outside it are scored as missed"
            )
    progress.update("evaluate", len(pairs), len(pairs), "cases")
    return report


def refuse_output_among_inputs(output: str | Path, inputs: Sequence[str | Path], option: str = "--csv") -> None:
    """Raise :class:`InputError` when writing ``output`` would replace an input file or change an input folder.

    ``--csv REF`` used to replace the reference label map with the table, exit 0: an expert's annotation lost.
    Paths are compared resolved (symbolic links followed) and, when ``output`` exists, by device and inode, which
    also catches a hard link under another name. Nothing is written inside an input folder either, at any depth:
    a new file there is read with the folder's volumes next time (a name like a case's, a stray file in a DICOM
    series folder).
    """
    target = Path(output)
    resolved = target.resolve()
    identity = _file_identity(target)
    for given in inputs:
        source = Path(given)
        if source.is_dir():
            folder = source.resolve()
            if resolved == folder or folder in resolved.parents:
                raise InputError(f"{option} {output} is inside the input folder {given}; write it outside the inputs")
            if identity is not None and identity in _file_identities_below(source):
                raise InputError(
                    f"{option} {output} is a link to a file in the input folder {given}; write it outside the inputs"
                )
        elif resolved == source.resolve() or (identity is not None and identity == _file_identity(source)):
            raise InputError(f"{option} {output} is the input file {given}; it would be overwritten, name another file")


def _file_identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of what ``path`` names, links followed; None when there is nothing there."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _file_identities_below(folder: Path) -> set[tuple[int, int]]:
    """The identities of every file below ``folder``, through linked folders too (each folder visited once)."""
    identities: set[tuple[int, int]] = set()
    visited: set[tuple[int, int] | None] = set()
    for root, subfolders, files in os.walk(folder, followlinks=True):
        here = _file_identity(Path(root))
        if here in visited:  # a link back up the tree: do not go round it again
            subfolders.clear()
            continue
        visited.add(here)
        identities.update(filter(None, (_file_identity(Path(root, name)) for name in files)))
    return identities


def write_csv(report: EvaluationReport, path: str | Path) -> Path:
    """One row per scored case (the columns of :class:`CaseScore`), written atomically.

    Refuses (:class:`InputError`) a path that is one of the report's inputs or lies inside an input folder.
    """
    path = Path(path)
    refuse_output_among_inputs(path, report.inputs)
    columns = list(CaseScore.__dataclass_fields__)
    with atomic_output(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for case in report.cases:
            writer.writerow(asdict(case))
    return path


#: the metrics two methods are compared on; HD95 is left out, since it is infinite for an empty mask
COMPARED_METRICS = ("dice", "surface_dice")


@dataclass
class PairedScores:
    """One case scored for both methods against the same reference."""

    case: str
    a: CaseScore
    b: CaseScore

    def difference(self, metric: str) -> float:
        """``metric`` of A minus that of B (positive: A scored higher)."""
        return float(getattr(self.a, metric) - getattr(self.b, metric))


@dataclass
class ComparisonReport:
    """Two methods' predictions scored against one reference folder, paired by case."""

    names: tuple[str, str]
    tolerance_mm: float
    cases: list[PairedScores] = field(default_factory=list)
    #: per method name: reference cases without a prediction of that method (left out of the comparison)
    missing: dict[str, list[str]] = field(default_factory=dict)
    #: per method name: prediction files without a reference
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    #: both methods' prediction paths and the reference path: :func:`write_comparison_csv` refuses to write over them
    inputs: tuple[Path, ...] = field(default=(), repr=False)

    def comparison(self, n_bootstrap: int = 10000, seed: int = 0) -> dict[str, dict[str, Any]]:
        """Per compared metric, :func:`cmedl.comparison.paired_comparison` of A against B over the paired cases."""
        return {
            metric: paired_comparison(
                [getattr(pair.a, metric) for pair in self.cases],
                [getattr(pair.b, metric) for pair in self.cases],
                n_bootstrap=n_bootstrap,
                seed=seed,
            )
            for metric in COMPARED_METRICS
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "tolerance_mm": self.tolerance_mm,
            "cases": [
                {
                    "case": pair.case,
                    "a": asdict(pair.a),
                    "b": asdict(pair.b),
                    "difference": {metric: pair.difference(metric) for metric in COMPARED_METRICS},
                }
                for pair in self.cases
            ],
            "comparison": self.comparison(),
            "missing": self.missing,
            "unmatched": self.unmatched,
        }


def compare_predictions(
    pred_a: str | Path,
    pred_b: str | Path,
    reference: str | Path,
    *,
    strip_a: str = "",
    strip_b: str = "",
    tolerance_mm: float = 2.0,
    label: int | None = None,
    names: tuple[str, str] = ("A", "B"),
    progress: Progress | None = None,
) -> ComparisonReport:
    """Score two methods' predictions (files or folders) against the same references and pair them by case.

    Each folder is scored with :func:`evaluate`; only cases with a prediction of both methods are compared, the
    others are listed in ``missing`` under the name of the method that has no prediction for them.

    Raises:
        InputError: a path is missing, the two names are empty or equal, no case has both predictions, or
            :func:`evaluate` refuses an option or a file. A label is refused only when neither method's predictions
            nor the references hold it (one method never predicting it is a result).
    """
    name_a, name_b = (name.strip() for name in names)
    if not name_a or not name_b or name_a == name_b:
        raise InputError(f"give two different, non-empty method names, got {names[0]!r} and {names[1]!r}")
    check_scoring_options(tolerance_mm, label)
    progress = progress or Progress()
    labels = _LabelSearch(label)
    report_a = _score_pairs(pred_a, reference, tolerance_mm, label, strip_a, progress, labels)
    report_b = _score_pairs(pred_b, reference, tolerance_mm, label, strip_b, progress, labels)
    labels.refuse_if_absent()
    scores_b = {score.case: score for score in report_b.cases}
    pairs = [PairedScores(a.case, a, scores_b[a.case]) for a in report_a.cases if a.case in scores_b]
    if not pairs:
        raise InputError(f"no case has a prediction in both {pred_a} and {pred_b}")
    return ComparisonReport(
        names=(name_a, name_b),
        tolerance_mm=tolerance_mm,
        cases=pairs,
        # a reference either method did not predict; stems, so that the lists name cases, not files
        missing={
            name_a: sorted(stem_of(name) for name in report_a.missing_predictions),
            name_b: sorted(stem_of(name) for name in report_b.missing_predictions),
        },
        unmatched={name_a: report_a.unmatched_predictions, name_b: report_b.unmatched_predictions},
        inputs=(Path(pred_a), Path(pred_b), Path(reference)),
    )


def write_comparison_csv(report: ComparisonReport, path: str | Path) -> Path:
    """One row per paired case: each method's Dice, surface Dice and HD95 and the differences, written atomically.

    Column names carry the method names (``dice_cmedl``), reduced to letters, digits and underscores. Refuses
    (:class:`InputError`) a path that is one of the report's inputs or lies inside an input folder.
    """
    path = Path(path)
    refuse_output_among_inputs(path, report.inputs)
    label_a, label_b = (_column_name(name) for name in report.names)
    if label_a == label_b:
        raise InputError(f"the method names {report.names[0]!r} and {report.names[1]!r} give the same CSV columns")
    columns = ["case"]
    for metric in COMPARED_METRICS:
        columns += [f"{metric}_{label_a}", f"{metric}_{label_b}", f"{metric}_diff"]
    columns += [f"hd95_{label_a}", f"hd95_{label_b}"]
    with atomic_output(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for pair in report.cases:
            row: list[Any] = [pair.case]
            for metric in COMPARED_METRICS:
                row += [getattr(pair.a, metric), getattr(pair.b, metric), pair.difference(metric)]
            row += [pair.a.hd95_mm, pair.b.hd95_mm]
            writer.writerow(row)
    return path


def format_comparison(report: ComparisonReport) -> str:
    """The comparison as text: a per-case table, one summary line per metric, then what was left out."""
    name_a, name_b = report.names
    titles = {"dice": "Dice", "surface_dice": f"surface Dice ({report.tolerance_mm:g} mm)"}
    short = {"dice": "Dice", "surface_dice": "sDSC"}
    headers = []
    for metric in COMPARED_METRICS:
        headers += [f"{short[metric]} {name_a}", f"{short[metric]} {name_b}", f"{short[metric]} diff"]
    widths = [max(7, len(header)) for header in headers]
    case_width = max(28, *(len(pair.case) for pair in report.cases))
    lines = [f"{'case':<{case_width}} " + " ".join(f"{h:>{w}}" for h, w in zip(headers, widths))]
    for pair in report.cases:
        cells = []
        for metric in COMPARED_METRICS:
            a, b = getattr(pair.a, metric), getattr(pair.b, metric)
            cells += [f"{a:.3f}", f"{b:.3f}", f"{pair.difference(metric):+.3f}"]
        lines.append(f"{pair.case:<{case_width}} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    for metric, result in report.comparison().items():
        line = (
            f"{titles[metric]}: {name_a} {result['mean_a']:.3f} vs {name_b} {result['mean_b']:.3f}, "
            f"mean difference {result['mean_difference']:+.3f} ({result['confidence'] * 100:g}% CI "
            f"{result['ci_low']:+.3f} to {result['ci_high']:+.3f}), {name_a} better in {result['a_better']}, "
            f"{name_b} in {result['b_better']}, ties {result['ties']}, Wilcoxon p = {result['wilcoxon_p']:.2g} "
            f"(n = {result['n']})"
        )
        if result["dropped"]:
            line += f", {result['dropped']} case(s) with an undefined score left out"
        if result["note"]:
            line += f"; {result['note']}"
        lines.append(line)
    for name in report.names:
        lines += [f"no prediction of {name} for case {case}: not compared" for case in report.missing[name]]
        lines += [f"no reference for {name} prediction {file}" for file in report.unmatched[name]]
    return "\n".join(lines)


def _column_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "method"


@dataclass
class TranslationScore:
    """Similarity of one synthesised image to the real image of the same anatomy."""

    case: str
    synthetic: str
    real: str
    kl_divergence: float
    psnr_db: float
    ssim: float


def score_translation(synthetic: sitk.Image, real: sitk.Image, mask: sitk.Image | None = None,
                      case: str = "case", names: tuple[str, str] = ("", "")) -> TranslationScore:  # fmt: skip
    """KL divergence, PSNR and SSIM of ``synthetic`` against ``real`` (same grid; voxels of ``mask`` > 0 only)."""
    if not same_geometry(synthetic, real):
        raise InputError(f"{names[0] or 'the synthetic image'} is not on the real image's grid "
                         f"({describe_grid(synthetic)} vs {describe_grid(real)}); compare images of the same anatomy "
                         f"on the same grid")  # fmt: skip
    mask_array = None
    if mask is not None:
        if not same_geometry(mask, real):
            raise InputError("the mask is not on the real image's grid")
        mask_array = sitk.GetArrayViewFromImage(mask) > 0
    try:
        scores = image_similarity(sitk.GetArrayViewFromImage(real), sitk.GetArrayViewFromImage(synthetic), mask_array)
    except ValueError as error:
        raise InputError(f"{names[0] or case}: {error}") from None
    return TranslationScore(case=case, synthetic=names[0], real=names[1], **scores)


def evaluate_translations(synthetic: str | Path, real: str | Path, strip: str = "",
                          progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Score synthesised images against real ones (two files, or two folders matched by name like labels)."""
    progress = progress or Progress()
    pairs, missing, unmatched = pair_volumes(Path(synthetic), Path(real), strip)
    cases = []
    for index, (case, synthetic_path, real_path) in enumerate(pairs):
        progress.update("evaluate", index, len(pairs), "cases")
        progress.check_cancelled()
        names = (synthetic_path.name, real_path.name)
        cases.append(score_translation(read_volume(synthetic_path), read_volume(real_path), None, case, names))
    progress.update("evaluate", len(pairs), len(pairs), "cases")
    finite_psnr = [c.psnr_db for c in cases if math.isfinite(c.psnr_db)]
    return {
        "summary": {
            "cases": len(cases),
            "kl_divergence": _mean_sd([c.kl_divergence for c in cases]),
            "psnr_db": _mean_sd(finite_psnr),
            "identical_cases": len(cases) - len(finite_psnr),
            "ssim": _mean_sd([c.ssim for c in cases]),
            "missing_synthetic": len(missing),
            "unmatched_synthetic": len(unmatched),
        },
        "cases": [asdict(c) for c in cases],
        "missing_synthetic": missing,
        "unmatched_synthetic": unmatched,
    }
