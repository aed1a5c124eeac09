"""Scoring segmentations against references: grids, pairing by name, the summary and the command line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cmedl

from cmedl.cli import main
from cmedl.errors import InputError
from cmedl.evaluate import compare_predictions, evaluate, on_reference_grid, score_case
from cmedl.metrics import segmentation_metrics


def label_image(array: np.ndarray, spacing=(0.8, 0.8, 2.0), origin=(-40.0, -30.0, 10.0)) -> sitk.Image:
    """A (z, y, x) uint8 array as an image with an oblique-free, non-zero-origin grid."""
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def box(shape=(12, 40, 40), z=(3, 9), y=(10, 20), x=(10, 20), value: int = 1) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    array[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = value
    return array


def test_two_overlapping_boxes_score_the_hand_computed_dice_and_volumes() -> None:
    reference = label_image(box())  # 6 x 10 x 10 = 600 voxels
    prediction = label_image(box(x=(15, 25)))  # same size, half of it overlapping: 300 voxels in common
    score = score_case(prediction, reference, tolerance_mm=1.0)
    assert score.dice == pytest.approx(2 * 300 / (600 + 600))
    voxel_ml = 0.8 * 0.8 * 2.0 / 1000
    assert score.predicted_ml == pytest.approx(600 * voxel_ml, abs=1e-3)
    assert score.reference_ml == pytest.approx(600 * voxel_ml, abs=1e-3)
    # the same numbers as the metrics module computes on the arrays with the reference's (z, y, x) spacing
    expected = segmentation_metrics(box(x=(15, 25)) > 0, box() > 0, (2.0, 0.8, 0.8), 1.0)
    assert score.surface_dice == pytest.approx(expected["surface_dice"])
    assert score.hd95_mm == pytest.approx(expected["hd95"])
    assert 0 < score.hd95_mm <= 5 * 0.8 + 1e-6


def test_a_perfect_prediction_and_an_empty_one() -> None:
    reference = label_image(box())
    perfect = score_case(label_image(box()), reference, 2.0)
    assert (perfect.dice, perfect.surface_dice, perfect.hd95_mm) == (1.0, 1.0, 0.0)
    empty = score_case(label_image(np.zeros((12, 40, 40))), reference, 2.0)
    assert empty.dice == 0.0 and math.isinf(empty.hd95_mm) and empty.predicted_ml == 0.0


def test_only_the_chosen_label_of_a_multi_label_prediction_counts() -> None:
    reference = label_image(box())
    prediction = box() + box(x=(25, 35), value=2)  # label 1 exactly right, label 2 elsewhere
    assert score_case(label_image(prediction), reference, 2.0, label=1).dice == 1.0
    assert score_case(label_image(prediction), reference, 2.0).dice < 1.0


def test_a_cropped_prediction_on_the_same_lattice_is_placed_exactly() -> None:
    reference = label_image(box())
    full = label_image(box(x=(15, 25)))
    # crop to z 2..10, y 8..24, x 12..30 and keep the physical position, as Slicer does for .seg.nrrd
    cropped = sitk.RegionOfInterest(full, (18, 16, 8), (12, 8, 2))
    assert cropped.GetSize() != reference.GetSize()
    placed = on_reference_grid(cropped, reference)
    assert placed.GetSize() == reference.GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(placed), sitk.GetArrayFromImage(full))
    assert score_case(cropped, reference, 2.0).dice == score_case(full, reference, 2.0).dice


def test_a_prediction_on_another_lattice_is_refused() -> None:
    reference = label_image(box())
    with pytest.raises(InputError, match="not on the reference's voxel grid"):
        score_case(label_image(box(), spacing=(1.0, 1.0, 2.0)), reference, 2.0)
    with pytest.raises(InputError, match="fraction of a voxel"):
        score_case(label_image(box(), origin=(-39.6, -30.0, 10.0)), reference, 2.0)


def write_case(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sitk.WriteImage(label_image(array), str(path), True)
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    references, predictions = tmp_path / "labels", tmp_path / "predictions"
    write_case(references, "case_a.nii.gz", box())
    write_case(references, "case_b.nii.gz", box(y=(20, 30)))
    write_case(references, "case_c.nii.gz", box(z=(0, 4)))
    write_case(predictions, "case_a_tumour.seg.nrrd", box())
    write_case(predictions, "case_b_tumour.nrrd", box(y=(25, 35)))
    write_case(predictions, "case_x_tumour.nii.gz", box())
    return predictions, references


def test_folders_are_paired_by_name_and_what_has_no_partner_is_listed(folders: tuple[Path, Path]) -> None:
    predictions, references = folders
    report = evaluate(predictions, references, tolerance_mm=2.0, strip="_tumour")
    assert [case.case for case in report.cases] == ["case_a", "case_b"]
    assert report.cases[0].dice == 1.0 and report.cases[1].dice == pytest.approx(0.5)
    assert report.missing_predictions == ["case_c.nii.gz"]
    assert report.unmatched_predictions == ["case_x_tumour.nii.gz"]
    summary = report.summary()
    assert summary["cases"] == 2 and summary["dice"]["mean"] == pytest.approx(0.75)
    assert summary["dice"]["sd"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    with pytest.raises(InputError, match="no prediction"):
        evaluate(predictions, references)  # without --strip no name matches


def test_two_predictions_for_one_case_are_refused(folders: tuple[Path, Path]) -> None:
    predictions, references = folders
    write_case(predictions, "case_a.nii.gz", box())
    with pytest.raises(InputError, match="two predictions for case case_a"):
        evaluate(predictions, references, strip="_tumour")


def test_the_command_line_scores_folders_writes_a_csv_and_leaves_the_inputs_alone(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    predictions, references = folders
    before = {path: path.read_bytes() for path in [*predictions.iterdir(), *references.iterdir()]}
    table = tmp_path / "out" / "scores.csv"
    result = run_cmedl(
        "evaluate", str(predictions), str(references), "--strip", "_tumour", "--csv", str(table), "--json"
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["summary"]["cases"] == 2 and printed["missing_predictions"] == ["case_c.nii.gz"]
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == ["case_a", "case_b"] and float(rows[1]["dice"]) == pytest.approx(0.5)
    assert [p.name for p in table.parent.iterdir()] == ["scores.csv"]  # no temporary file left behind
    assert {path: path.read_bytes() for path in before} == before
    text = run_cmedl("evaluate", str(predictions), str(references), "--strip", "_tumour")
    assert "2 cases: Dice 0.750" in text.stdout and "no prediction for reference case_c.nii.gz" in text.stdout


def test_the_command_line_gives_one_line_for_bad_input(folders: tuple[Path, Path], tmp_path: Path) -> None:
    predictions, references = folders
    missing = run_cmedl("evaluate", str(tmp_path / "nowhere"), str(references))
    assert missing.returncode == 3 and missing.stderr.strip().count("\n") == 0 and "not found" in missing.stderr
    mixed = run_cmedl("evaluate", str(predictions / "case_a_tumour.seg.nrrd"), str(references))
    assert mixed.returncode == 3 and "two files or two folders" in mixed.stderr
    bad_grid = write_case(tmp_path / "other", "case_a.nii.gz", box())
    sitk.WriteImage(label_image(box(), spacing=(1.0, 1.0, 1.0)), str(bad_grid))
    refused = run_cmedl("evaluate", str(bad_grid), str(references / "case_a.nii.gz"))
    assert refused.returncode == 3 and "voxel grid" in refused.stderr


def test_a_cmedl_segmentation_of_a_phantom_scores_like_the_metrics_on_its_arrays(tmp_path: Path) -> None:
    from cmedl.phantom import make_phantom
    from cmedl.reference_models import write_threshold_model
    from cmedl.volumes import write_labelmap, write_volume

    case = make_phantom("ct", seed=5, size=96, slices=10)
    ct = write_volume(case.image, tmp_path / "ct.nii.gz")
    truth = write_labelmap(case.label, tmp_path / "truth.nii.gz")
    model = write_threshold_model(tmp_path / "threshold.safetensors")
    output = tmp_path / "ct_tumour.seg.nrrd"
    segmented = run_cmedl("segment", str(ct), "-o", str(output), "--model", str(model), "--device", "cpu")
    assert segmented.returncode == 0, segmented.stderr
    scored = run_cmedl("evaluate", str(output), str(truth), "--tolerance", "1.5", "--json")
    assert scored.returncode == 0, scored.stderr
    case_score = json.loads(scored.stdout)["cases"][0]
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(output))) > 0
    truth_array = sitk.GetArrayFromImage(case.label) > 0
    expected = segmentation_metrics(prediction, truth_array, case.image.GetSpacing()[::-1], 1.5)
    assert case_score["dice"] == pytest.approx(expected["dice"])
    assert case_score["surface_dice"] == pytest.approx(expected["surface_dice"])


# -- synthesised images: KL divergence, PSNR, SSIM --------------------------------------------------------


def test_image_similarity_of_identical_and_of_hand_computed_images() -> None:
    from cmedl.image_similarity import image_similarity, intensity_kl_divergence, unit_scale

    rng = np.random.default_rng(0)
    real = rng.uniform(0, 1000, size=(3, 32, 32)).astype(np.float32)
    same = image_similarity(real, real.copy())
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-9) and math.isinf(same["psnr_db"])
    assert same["ssim"] == pytest.approx(1.0)
    # scale does not matter: both images go to [0, 1] by their own 99.5th percentile
    assert image_similarity(real, real * 3.0)["ssim"] == pytest.approx(1.0, abs=1e-5)
    # PSNR of a uniform 0.1 offset on the unit scale: 10 log10(1 / 0.01) = 20 dB
    scaled = unit_scale(real)
    offset = np.clip(scaled + 0.1, 0, 1)
    expected_mse = float(np.mean((offset - scaled) ** 2))
    from skimage.metrics import peak_signal_noise_ratio

    assert peak_signal_noise_ratio(scaled, offset, data_range=1.0) == pytest.approx(10 * np.log10(1 / expected_mse))
    # KL of two histograms, one bin each way: half the voxels in bin 0 and half in bin 1 against all in bin 0
    p = np.array([0.0] * 50 + [0.99] * 50)
    q = np.zeros(100)
    eps = 1e-6
    p_bins = np.array([50 + eps, 50 + eps]) / (100 + 2 * eps)
    q_bins = np.array([100 + eps, eps]) / (100 + 2 * eps)
    assert intensity_kl_divergence(p, q, bins=2) == pytest.approx(float(np.sum(p_bins * np.log(p_bins / q_bins))))
    assert intensity_kl_divergence(p, q, bins=2) != pytest.approx(intensity_kl_divergence(q, p, bins=2))


def test_an_mri_phantom_is_closer_to_its_own_anatomy_than_a_ct_of_it_is() -> None:
    from cmedl.evaluate import score_translation
    from cmedl.phantom import make_phantom

    mr = make_phantom("mr", seed=12, size=96, slices=8).image
    other_mr = make_phantom("mr", seed=12, size=96, slices=8).image  # bit-identical: the same anatomy and noise
    ct = make_phantom("ct", seed=12, size=96, slices=8).image  # same anatomy, CT contrast
    identical = score_translation(other_mr, mr)
    assert math.isinf(identical.psnr_db) and identical.ssim == pytest.approx(1.0)
    wrong_contrast = score_translation(sitk.Cast(ct, sitk.sitkFloat32) + 1024.0, mr)
    assert wrong_contrast.ssim < 0.9 and wrong_contrast.kl_divergence > 0.01


def test_the_command_line_compares_a_pseudo_mri_with_the_real_mri(tmp_path: Path) -> None:
    from cmedl.phantom import make_phantom
    from cmedl.volumes import write_volume

    mr = write_volume(make_phantom("mr", seed=3, size=96, slices=8).image, tmp_path / "real" / "case.nii.gz")
    blurred = sitk.SmoothingRecursiveGaussian(sitk.ReadImage(str(mr), sitk.sitkFloat32), 2.0)
    write_volume(blurred, tmp_path / "pseudo" / "case.nii.gz")
    result = run_cmedl("evaluate", "--images", str(tmp_path / "pseudo"), str(tmp_path / "real"), "--json")
    assert result.returncode == 0, result.stderr
    case = json.loads(result.stdout)["cases"][0]
    assert 0 < case["ssim"] < 1 and 10 < case["psnr_db"] < 60 and case["kl_divergence"] > 0
    shifted = sitk.ReadImage(str(tmp_path / "pseudo" / "case.nii.gz"))
    shifted.SetOrigin((0.0, 0.0, 0.0))
    write_volume(shifted, tmp_path / "moved.nii.gz")
    refused = run_cmedl("evaluate", "--images", str(tmp_path / "moved.nii.gz"), str(mr))
    assert refused.returncode == 3 and "not on the real image's grid" in refused.stderr
    wrong = run_cmedl("evaluate", "--images", "--csv", str(tmp_path / "x.csv"), str(mr), str(mr))
    assert wrong.returncode == 3 and not (tmp_path / "x.csv").exists()


# -- two methods compared case by case ------------------------------------------------------------------------

# 16 x 16 x 8 volumes; the reference is a 4 x 8 x 8 = 256-voxel box
SMALL = (8, 16, 16)
REFERENCE = box(SMALL, z=(2, 6), y=(4, 12), x=(4, 12))
PERFECT = REFERENCE  # Dice 1
HALF = box(SMALL, z=(2, 6), y=(4, 12), x=(8, 16))  # 128 of 256 voxels overlap: Dice 2 * 128 / 512 = 0.5
INSIDE = box(SMALL, z=(2, 6), y=(4, 12), x=(4, 8))  # 128 voxels, all inside: Dice 2 * 128 / 384 = 2/3
EMPTY = np.zeros(SMALL, dtype=np.uint8)  # Dice 0, HD95 infinite


@pytest.fixture
def two_methods(tmp_path: Path) -> tuple[Path, Path, Path]:
    """References c1-c4; method A predicts all four, method B (suffix _b) all but c3."""
    references, method_a, method_b = tmp_path / "labels", tmp_path / "a", tmp_path / "b"
    for case in ("c1", "c2", "c3", "c4"):
        write_case(references, f"{case}.nii.gz", REFERENCE)
    for case, array in (("c1", PERFECT), ("c2", INSIDE), ("c3", HALF), ("c4", PERFECT)):
        write_case(method_a, f"{case}.nii.gz", array)
    for case, array in (("c1", HALF), ("c2", INSIDE), ("c4", EMPTY)):
        write_case(method_b, f"{case}_b.nii.gz", array)
    return method_a, method_b, references


def surface_dice(array: np.ndarray) -> float:
    return segmentation_metrics(array > 0, REFERENCE > 0, (2.0, 0.8, 0.8), 2.0)["surface_dice"]


def test_two_methods_are_paired_by_case_and_compared(two_methods: tuple[Path, Path, Path]) -> None:
    method_a, method_b, references = two_methods
    report = compare_predictions(method_a, method_b, references, strip_b="_b", names=("cmedl", "ct_only"))
    assert [pair.case for pair in report.cases] == ["c1", "c2", "c4"]
    assert report.missing == {"cmedl": [], "ct_only": ["c3"]}
    # Dice A - B: c1 1 - 0.5, c2 2/3 - 2/3, c4 1 - 0
    assert [pair.difference("dice") for pair in report.cases] == pytest.approx([0.5, 0.0, 1.0])
    expected_surface = [1.0 - surface_dice(HALF), 0.0, 1.0 - surface_dice(EMPTY)]
    assert [pair.difference("surface_dice") for pair in report.cases] == pytest.approx(expected_surface)
    dice = report.comparison()["dice"]
    assert (dice["n"], dice["a_better"], dice["b_better"], dice["ties"]) == (3, 2, 0, 1)
    assert dice["mean_a"] == pytest.approx((1 + 2 / 3 + 1) / 3) and dice["mean_difference"] == pytest.approx(0.5)
    # the tie is dropped; two positive differences ranked 1 and 2: W = 0, exact two-sided p = 2 * 1/4
    assert dice["wilcoxon_statistic"] == 0 and dice["wilcoxon_p"] == pytest.approx(0.5)
    assert math.isinf(report.cases[2].b.hd95_mm)


def test_the_command_line_compares_two_methods_as_json_csv_and_text(
    two_methods: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    method_a, method_b, references = two_methods
    table = tmp_path / "paired.csv"
    arguments = ["evaluate", str(method_a), str(references), "--compare", str(method_b), "--strip-b", "_b"]
    assert main([*arguments, "--names", "cmedl,ct only", "--csv", str(table), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["names"] == ["cmedl", "ct only"] and printed["missing"] == {"cmedl": [], "ct only": ["c3"]}
    assert [case["case"] for case in printed["cases"]] == ["c1", "c2", "c4"]
    assert printed["cases"][0]["difference"]["dice"] == pytest.approx(0.5)
    assert printed["cases"][2]["b"]["hd95_mm"] == math.inf  # written as Infinity, like the single-method output
    dice = printed["comparison"]["dice"]
    assert (dice["n"], dice["a_better"], dice["b_better"], dice["ties"]) == (3, 2, 0, 1)
    assert set(printed["comparison"]) == {"dice", "surface_dice"}

    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "case", "dice_cmedl", "dice_ct_only", "dice_diff", "surface_dice_cmedl", "surface_dice_ct_only",
        "surface_dice_diff", "hd95_cmedl", "hd95_ct_only",
    ]  # fmt: skip
    assert [row["case"] for row in rows] == ["c1", "c2", "c4"]
    assert [float(row["dice_diff"]) for row in rows] == pytest.approx([0.5, 0.0, 1.0])
    assert float(rows[1]["dice_cmedl"]) == pytest.approx(2 / 3) and rows[2]["hd95_ct_only"] == "inf"

    assert main(arguments) == 0
    text = capsys.readouterr().out
    assert "Dice: A 0.889 vs B 0.389, mean difference +0.500" in text
    assert "A better in 2, B in 0, ties 1, Wilcoxon p = 0.5 (n = 3)" in text
    assert "no prediction of B for case c3: not compared" in text


def test_comparing_without_a_common_case_or_with_a_missing_folder_is_bad_input(
    two_methods: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    method_a, method_b, references = two_methods
    only_c3 = tmp_path / "only_c3"
    write_case(only_c3, "c3.nii.gz", HALF)
    with pytest.raises(InputError, match="no case has a prediction in both"):
        compare_predictions(only_c3, method_b, references, strip_b="_b")
    assert main(["evaluate", str(method_a), str(references), "--compare", str(tmp_path / "nowhere")]) == 3
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not found" in error
    assert main(["evaluate", str(method_a), str(references), "--compare", str(method_b), "--names", "x"]) == 3
