"""What `cmedl evaluate` refuses: a CSV over an input, images that are not label maps, meaningless options, grids.

Every refusal is one line with exit code 3, and the input files are byte for byte what they were before.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cmedl

from cmedl.errors import InputError
from cmedl.evaluate import compare_predictions, evaluate, score_case, write_csv
from cmedl.metrics import segmentation_metrics

SPACING = (0.8, 0.8, 2.0)
ORIGIN = (-40.0, -30.0, 10.0)
#: (z, y, x) shape of the references: 53 slices, like the scan in the report that found the partial-grid problem
SHAPE = (53, 24, 24)


def tumour(z: tuple[int, int] = (20, 30), value: int = 1, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A box of ``value`` in slices ``z`` (in-plane 8..16), the rest 0."""
    array = np.zeros(shape, dtype=np.uint8)
    array[z[0] : z[1], 8:16, 8:16] = value
    return array


def as_image(array: np.ndarray, origin: tuple[float, float, float] = ORIGIN, pixel_type=None) -> sitk.Image:
    """``array`` (z, y, x) on the test grid, stored with ``pixel_type`` (default: the array's own type)."""
    image = sitk.GetImageFromArray(array if pixel_type is None else array.astype(pixel_type))
    image.SetSpacing(SPACING)
    image.SetOrigin(origin)
    return image


def write(path: Path, array: np.ndarray, origin: tuple[float, float, float] = ORIGIN, pixel_type=None) -> Path:
    """Write ``array`` as a real image file (what a user would hand to `cmedl evaluate`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(as_image(array, origin, pixel_type), str(path), True)
    return path


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file below ``roots`` (or the files themselves) with its bytes, to prove nothing was touched."""
    files = [path for root in roots for path in ([root] if root.is_file() else sorted(root.rglob("*")))]
    return {path: path.read_bytes() for path in files if path.is_file()}


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 3 (bad input), one line on stderr that says what is wrong, no traceback."""
    message = result.stderr.strip()
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    assert message.startswith("cmedl: error: ") and "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.fixture
def case_files(tmp_path: Path) -> tuple[Path, Path]:
    """A prediction and its reference, one tumour box each, half of the prediction's slices right."""
    prediction = write(tmp_path / "prediction.nii.gz", tumour(z=(25, 35)))
    reference = write(tmp_path / "reference.nii.gz", tumour())
    return prediction, reference


@pytest.fixture
def case_folders(tmp_path: Path) -> tuple[Path, Path]:
    """A prediction folder and a reference folder of two cases each, matched by name."""
    predictions, references = tmp_path / "predictions", tmp_path / "references"
    write(predictions / "case_a.nii.gz", tumour())
    write(predictions / "case_b.nii.gz", tumour(z=(5, 10)))
    write(references / "case_a.nii.gz", tumour())
    write(references / "case_b.nii.gz", tumour(z=(5, 15)))
    return predictions, references


# -- the CSV is never written over an input ----------------------------------------------------------------------


def test_a_csv_naming_an_input_file_is_refused_before_anything_is_read(case_files: tuple[Path, Path]) -> None:
    prediction, reference = case_files
    before = snapshot(prediction, reference)
    for target in (reference, prediction):
        assert_refused(run_cmedl("evaluate", str(prediction), str(reference), "--csv", str(target)), "--csv")
    # the same file named another way (a detour through the folder's parent) is the same file
    detour = reference.parent / ".." / reference.parent.name / reference.name
    assert_refused(run_cmedl("evaluate", str(prediction), str(reference), "--csv", str(detour)), "input file")
    # refused before the inputs are read: a CT as prediction would be the error otherwise
    ct = write(prediction.parent / "ct.nii.gz", np.full(SHAPE, -1000, dtype=np.int16))
    assert_refused(run_cmedl("evaluate", str(ct), str(reference), "--csv", str(reference)), "--csv")
    assert snapshot(prediction, reference) == before


def test_a_csv_through_a_symbolic_or_a_hard_link_to_an_input_is_refused(case_files: tuple[Path, Path]) -> None:
    prediction, reference = case_files
    symbolic = reference.parent / "scores_link.csv"
    symbolic.symlink_to(reference)
    hard = reference.parent / "scores_hard.csv"
    os.link(reference, hard)
    before = snapshot(prediction, reference)
    for target in (symbolic, hard):
        assert_refused(run_cmedl("evaluate", str(prediction), str(reference), "--csv", str(target)), str(target))
    assert symbolic.is_symlink() and symbolic.resolve() == reference.resolve()
    assert os.path.samefile(hard, reference)
    assert snapshot(prediction, reference) == before


def test_a_csv_inside_an_input_folder_is_refused(case_folders: tuple[Path, Path], tmp_path: Path) -> None:
    predictions, references = case_folders
    before = snapshot(predictions, references)
    existing = predictions / "case_b.nii.gz"
    outside_link = tmp_path / "elsewhere.csv"
    os.link(existing, outside_link)  # a hard link outside the folders to a file inside one
    for target in (existing, references / "scores.csv", predictions, outside_link):
        result = run_cmedl("evaluate", str(predictions), str(references), "--csv", str(target))
        assert_refused(result, "input folder")
    assert snapshot(predictions, references) == before
    # beside the folders, the table is written as before
    table = tmp_path / "scores.csv"
    assert run_cmedl("evaluate", str(predictions), str(references), "--csv", str(table)).returncode == 0
    assert table.read_text().startswith("case,prediction,reference,dice")


def test_write_csv_refuses_the_reports_own_inputs(case_files: tuple[Path, Path]) -> None:
    prediction, reference = case_files
    before = snapshot(prediction, reference)
    report = evaluate(prediction, reference)
    with pytest.raises(InputError, match="input file"):
        write_csv(report, reference)
    assert snapshot(prediction, reference) == before


def test_the_csv_of_a_comparison_is_refused_over_either_methods_files(
    case_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    predictions, references = case_folders
    method_b = tmp_path / "method_b"
    write(method_b / "case_a.nii.gz", tumour(z=(22, 30)))
    write(method_b / "case_b.nii.gz", tumour(z=(5, 15)))
    before = snapshot(predictions, references, method_b)
    for target in (method_b / "case_a.nii.gz", references / "case_b.nii.gz"):
        result = run_cmedl(
            "evaluate", str(predictions), str(references), "--compare", str(method_b), "--csv", str(target)
        )
        assert_refused(result, "--csv", "input folder")
    assert snapshot(predictions, references, method_b) == before


# -- only label maps are scored ------------------------------------------------------------------------------------


def test_a_ct_is_refused_as_prediction_and_as_reference(case_files: tuple[Path, Path]) -> None:
    prediction, reference = case_files
    hounsfield = np.where(tumour() > 0, 40, -1000).astype(np.int16)
    ct = write(prediction.parent / "ct.nii.gz", hounsfield)
    assert_refused(
        run_cmedl("evaluate", str(ct), str(reference)), "ct.nii.gz", "16-bit signed integer", "not a label map"
    )
    # swapped arguments: the CT given as the reference
    with pytest.raises(InputError, match="ct.nii.gz is not a label map"):
        score_case(as_image(tumour()), as_image(hounsfield), 2.0, names=("prediction.nii.gz", "ct.nii.gz"))
    # a CT resampled to float HU (fractions, negative values) is refused just the same
    float_ct = as_image(hounsfield.astype(np.float32) + 0.25)
    with pytest.raises(InputError, match="32-bit float"):
        score_case(float_ct, as_image(tumour()), 2.0, names=("ct_float.nii.gz", "reference.nii.gz"))


def test_a_float_map_of_fractions_is_refused_but_a_float_map_of_whole_labels_is_scored(
    case_files: tuple[Path, Path],
) -> None:
    _, reference = case_files
    halves = write(reference.parent / "halves.nii.gz", tumour().astype(np.float32) * 0.5)
    assert_refused(run_cmedl("evaluate", str(halves), str(reference)), "halves.nii.gz", "32-bit float", "0.5")
    # MONAI and some Slicer exports write labels as float32: whole values are labels, scored like uint8
    whole = write(reference.parent / "whole.nii.gz", tumour(z=(25, 35)), pixel_type=np.float32)
    assert sitk.ReadImage(str(whole)).GetPixelID() == sitk.sitkFloat32
    as_float = evaluate(whole, reference).cases[0]
    as_integer = score_case(as_image(tumour(z=(25, 35))), as_image(tumour()), 2.0)
    assert as_float.dice == pytest.approx(as_integer.dice) == pytest.approx(0.5)
    with pytest.raises(InputError, match="NaN or infinite"):
        score_case(as_image(np.full(SHAPE, np.nan, dtype=np.float32)), as_image(tumour()), 2.0)


# -- options that would give numbers without meaning ---------------------------------------------------------------


def test_a_label_below_one_is_refused(case_files: tuple[Path, Path]) -> None:
    prediction, reference = case_files
    for label in ("0", "-1"):
        assert_refused(run_cmedl("evaluate", str(prediction), str(reference), "--label", label), "label", label)


def test_a_label_in_no_file_is_refused_and_one_in_the_references_only_is_a_miss(tmp_path: Path) -> None:
    predictions, references = tmp_path / "predictions", tmp_path / "references"
    write(predictions / "case_a.nii.gz", tumour(value=2))  # this method writes the tumour as label 2
    write(predictions / "case_b.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    write(references / "case_a.nii.gz", tumour())
    write(references / "case_b.nii.gz", tumour(z=(5, 15)))
    with pytest.raises(InputError, match="label 7 is in no prediction and no reference"):
        evaluate(predictions, references, label=7)
    # label 2 is in one prediction only: scored (case_b missed it)
    assert [case.dice for case in evaluate(predictions, references, label=2).cases] == [1.0, 0.0]
    # label 1 is in the references only: every case a miss, scored 0 rather than refused
    assert [case.dice for case in evaluate(predictions, references, label=1).cases] == [0.0, 0.0]
    assert_refused(run_cmedl("evaluate", str(predictions), str(references), "--label", "7"), "label 7")


def test_a_comparison_refuses_a_label_that_neither_method_holds(
    case_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    predictions, references = case_folders
    method_b = tmp_path / "method_b"
    write(method_b / "case_a.nii.gz", tumour(value=3))
    write(method_b / "case_b.nii.gz", tumour(z=(5, 15)))
    # label 3 is held by method B only: A scores 0 on it, which is a result, not a typo
    report = compare_predictions(predictions, method_b, references, label=3)
    assert [(pair.a.dice, pair.b.dice) for pair in report.cases] == [(0.0, 1.0), (0.0, 0.0)]
    with pytest.raises(InputError, match="label 9 is in no prediction and no reference"):
        compare_predictions(predictions, method_b, references, label=9)


def test_a_tolerance_that_is_infinite_nan_or_negative_is_refused(case_files: tuple[Path, Path]) -> None:
    prediction, reference = case_files
    for tolerance in ("inf", "nan", "-1"):
        result = run_cmedl("evaluate", str(prediction), str(reference), "--tolerance", tolerance)
        assert_refused(result, "tolerance")
    # the metrics themselves refuse what would make every surface Dice 1 (inf) or 0 (NaN)
    for tolerance in (math.inf, math.nan):
        with pytest.raises(InputError, match="tolerance"):
            segmentation_metrics(tumour(z=(25, 35)) > 0, tumour() > 0, SPACING[::-1], tolerance)


# -- grids: an exact score or a refusal that names both grids -------------------------------------------------------


def test_a_prediction_with_labels_outside_the_reference_grid_is_refused_naming_both_grids(
    case_files: tuple[Path, Path],
) -> None:
    _, reference = case_files
    # the same lattice, 30 slices further on: 7 of its 10 tumour slices lie beyond the reference's last slice
    shifted = write(reference.parent / "shifted.nii.gz", tumour(), origin=(-40.0, -30.0, 10.0 + 30 * 2.0))
    result = run_cmedl("evaluate", str(shifted), str(reference))
    assert_refused(result, "shifted.nii.gz", "outside the reference's grid", "(-40, -30, 70)", "(-40, -30, 10)")
    assert "448 of its 640 labelled voxels" in result.stderr  # 7 slices of 8 x 8 voxels outside, of 10


def test_refusals_of_another_lattice_name_both_grids(case_files: tuple[Path, Path]) -> None:
    _, reference = case_files
    half_voxel = as_image(tumour(), origin=(-40.0, -30.0, 11.0))
    with pytest.raises(
        InputError, match=r"fraction of a voxel .*\(-40, -30, 11\) vs the reference's .*\(-40, -30, 10\)"
    ):
        score_case(half_voxel, sitk.ReadImage(str(reference)), 2.0)
    thick = sitk.GetImageFromArray(tumour()[::5].copy())
    thick.SetSpacing((0.8, 0.8, 10.0))
    thick.SetOrigin(ORIGIN)
    with pytest.raises(InputError, match=r"24x24x11 voxels of 0\.8x0\.8x10 mm .* vs the reference's 24x24x53 voxels"):
        score_case(thick, sitk.ReadImage(str(reference)), 2.0)


def test_a_prediction_of_ten_of_the_53_slices_is_placed_exactly_and_the_uncovered_slices_are_noted(
    case_files: tuple[Path, Path],
) -> None:
    _, reference = case_files
    # slices 22..31 of the reference's lattice, tumour in its first 6 (reference slices 22..27)
    part = np.zeros((10, *SHAPE[1:]), dtype=np.uint8)
    part[:6, 8:16, 8:16] = 1
    partial = write(reference.parent / "partial.nii.gz", part, origin=(-40.0, -30.0, 10.0 + 22 * 2.0))
    result = run_cmedl("evaluate", str(partial), str(reference), "--json", "--progress", "none")
    assert result.returncode == 0, result.stderr
    placed = np.zeros(SHAPE, dtype=np.uint8)
    placed[22:32] = part
    expected = segmentation_metrics(placed > 0, tumour() > 0, SPACING[::-1], 2.0)
    assert expected["dice"] == pytest.approx(2 * 6 / (6 + 10))
    scored = json.loads(result.stdout)["cases"][0]
    assert scored["dice"] == pytest.approx(expected["dice"])
    assert scored["surface_dice"] == pytest.approx(expected["surface_dice"])
    # the reference's tumour slices 20 and 21 lie outside the prediction's extent: scored as missed, and said so
    assert "partial.nii.gz covers only part of the reference's grid" in result.stderr
    assert "24x24x10 voxels" in result.stderr and "24x24x53 voxels" in result.stderr
    assert f"{2 * 8 * 8} labelled reference voxels outside it are scored as missed" in result.stderr
