"""Scoring segmentations against reference labels, one case or two folders matched by file name.

A prediction is scored on its reference's voxel grid: Dice, surface Dice at a tolerance (mm) and HD95 (mm) from
:mod:`cmedl.metrics`, computed in 3D with the reference's spacing, plus both volumes in mL. A prediction that
lies on the same voxel lattice but covers a different extent (a ``.seg.nrrd`` saved by Slicer is cropped to its
content) is placed on the reference grid exactly; one on another lattice (other spacing, orientation or a
sub-voxel shift) is refused, since resampling a label map would change the score being measured.

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
import re
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


def on_reference_grid(prediction: sitk.Image, reference: sitk.Image, name: str = "prediction") -> sitk.Image:
    """``prediction`` on ``reference``'s grid: unchanged, or re-placed exactly when only the extent differs.

    Raises :class:`InputError` when the two grids are different lattices.
    """
    if same_geometry(prediction, reference):
        return prediction
    spacing = np.array(reference.GetSpacing())
    if not (
        np.allclose(prediction.GetSpacing(), spacing, rtol=1e-5, atol=1e-6)
        and np.allclose(prediction.GetDirection(), reference.GetDirection(), atol=1e-5)
    ):
        raise InputError(
            f"{name} is not on the reference's voxel grid (spacing {_rounded(prediction.GetSpacing())} vs "
            f"{_rounded(reference.GetSpacing())} mm, or another orientation); save it on the CT's grid"
        )
    # The prediction's first voxel in reference voxel coordinates must be a whole number of voxels away.
    offset = np.array(reference.TransformPhysicalPointToContinuousIndex(prediction.GetOrigin()))
    if np.abs(offset - np.round(offset)).max() > LATTICE_TOLERANCE_VOXELS:
        raise InputError(
            f"{name} is shifted by a fraction of a voxel from the reference's grid; save it on the CT's grid"
        )
    # Nearest neighbour on the same lattice copies voxels one to one; outside the prediction's extent it is 0.
    return sitk.Resample(prediction, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, prediction.GetPixelID())


def _rounded(values: tuple[float, ...]) -> list[float]:
    return [round(v, 4) for v in values]


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
        prediction, reference: label volumes; voxels > 0 are foreground, or ``== label`` when a label is given
            (the reference is always taken as > 0).
        tolerance_mm: surface Dice tolerance.
    """
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


def evaluate(
    predictions: str | Path,
    references: str | Path,
    tolerance_mm: float = 2.0,
    label: int | None = None,
    strip: str = "",
    progress: Progress | None = None,
) -> EvaluationReport:
    """Score every prediction that has a reference (two files, or two folders matched by name)."""
    if not tolerance_mm > 0:
        raise InputError(f"the surface Dice tolerance must be positive, got {tolerance_mm} mm")
    progress = progress or Progress()
    pairs, missing, unmatched = pair_volumes(Path(predictions), Path(references), strip)
    report = EvaluationReport(tolerance_mm=tolerance_mm, missing_predictions=missing, unmatched_predictions=unmatched)
    for index, (case, prediction_path, reference_path) in enumerate(pairs):
        progress.update("evaluate", index, len(pairs), "cases")
        progress.check_cancelled()
        names = (prediction_path.name, reference_path.name)
        report.cases.append(
            score_case(read_volume(prediction_path), read_volume(reference_path), tolerance_mm, label, case, names)
        )
    progress.update("evaluate", len(pairs), len(pairs), "cases")
    return report


def write_csv(report: EvaluationReport, path: str | Path) -> Path:
    """One row per scored case (the columns of :class:`CaseScore`), written atomically."""
    path = Path(path)
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
        InputError: a path is missing, the two names are empty or equal, or no case has both predictions.
    """
    name_a, name_b = (name.strip() for name in names)
    if not name_a or not name_b or name_a == name_b:
        raise InputError(f"give two different, non-empty method names, got {names[0]!r} and {names[1]!r}")
    report_a = evaluate(pred_a, reference, tolerance_mm, label, strip_a, progress)
    report_b = evaluate(pred_b, reference, tolerance_mm, label, strip_b, progress)
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
    )


def write_comparison_csv(report: ComparisonReport, path: str | Path) -> Path:
    """One row per paired case: each method's Dice, surface Dice and HD95 and the differences, written atomically.

    Column names carry the method names (``dice_cmedl``), reduced to letters, digits and underscores.
    """
    path = Path(path)
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
        raise InputError(f"{names[0] or 'the synthetic image'} is not on the real image's grid; compare images "
                         f"of the same anatomy on the same grid")  # fmt: skip
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
