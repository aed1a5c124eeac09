"""Dice, surface Dice and HD95 against hand-computed cases and DeepMind ``surface-distance`` reference numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmedl.errors import InputError
from cmedl.metrics import (
    DEFAULT_TOLERANCE_MM,
    dice,
    hausdorff95,
    segmentation_metrics,
    surface_dice,
    surface_distances,
)
from cmedl.volumes import read_volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def disk(radius: float, centre: tuple[int, int], shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def surface_area(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    return float(surface_distances(mask, mask, spacing).truth_areas.sum())


# method_notes.md section 4.4: DeepMind surface-distance on 2D disks, 64x64 grid, spacing (0.8, 0.8) mm.
# (truth radius, prediction radius, shift in voxels) -> Dice, robust HD95 (mm), surface Dice @1 mm, @2 mm
DEEPMIND_DISKS = [
    ((10, 12, 3), (0.7916, 4.000, 0.4581, 0.6147)),
    ((10, 10, 0), (1.0000, 0.000, 1.0000, 1.0000)),
    ((6, 9, 5), (0.5191, 6.093, 0.2939, 0.4804)),
    ((20, 17, 2), (0.8350, 4.000, 0.2057, 0.4567)),
]


@pytest.mark.parametrize("shift_axis", [0, 1])
@pytest.mark.parametrize(("case", "expected"), DEEPMIND_DISKS)
def test_reproduces_deepmind_disk_table(case, expected, shift_axis):
    truth_radius, prediction_radius, shift = case
    centre = [32, 32]
    centre[shift_axis] += shift
    truth = disk(truth_radius, (32, 32))
    prediction = disk(prediction_radius, tuple(centre))
    spacing = (0.8, 0.8)
    expected_dice, expected_hd95, expected_sdsc_1mm, expected_sdsc_2mm = expected

    distances = surface_distances(prediction, truth, spacing)
    assert dice(prediction, truth) == pytest.approx(expected_dice, abs=5e-5)
    assert hausdorff95(prediction, truth, spacing) == pytest.approx(expected_hd95, abs=5e-4)
    assert surface_dice(prediction, truth, spacing, tolerance_mm=1.0) == pytest.approx(expected_sdsc_1mm, abs=5e-5)
    assert distances.surface_dice(2.0) == pytest.approx(expected_sdsc_2mm, abs=5e-5)


def test_two_single_pixels_two_mm_apart():
    # Each pixel's contour is four corner cuts of length 0.5 * hypot(2, 1); two of the other pixel's cuts are
    # 1 mm away (shared column of corners), two are 2 mm away.
    truth = np.zeros((16, 16), bool)
    prediction = np.zeros((16, 16), bool)
    truth[5, 7] = True
    prediction[5, 9] = True
    distances = surface_distances(prediction, truth, (2.0, 1.0))
    corner_cut = 0.5 * math.hypot(2.0, 1.0)
    np.testing.assert_allclose(distances.truth_areas, [corner_cut] * 4)
    np.testing.assert_allclose(distances.truth_to_prediction_mm, [1.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(distances.prediction_to_truth_mm, [1.0, 1.0, 2.0, 2.0])
    assert distances.surface_dice(1.0) == pytest.approx(0.5)
    assert distances.robust_hausdorff(95) == pytest.approx(2.0)
    assert dice(prediction, truth) == 0.0


def test_squares_one_row_apart_with_anisotropic_spacing():
    # Truth: 2x2 square; prediction: the same square grown by one row downwards. Spacing 2 mm (rows) x 1 mm.
    truth = np.zeros((6, 6), bool)
    truth[1:3, 1:3] = True
    prediction = np.zeros((6, 6), bool)
    prediction[1:4, 1:3] = True
    spacing = (2.0, 1.0)
    distances = surface_distances(prediction, truth, spacing)

    corner_cut = 0.5 * math.hypot(*spacing)
    # Truth contour: 4 corner cuts, 2 horizontal runs of one column (1 mm), 2 vertical runs of one row (2 mm).
    np.testing.assert_allclose(np.sort(distances.truth_areas), np.sort([corner_cut] * 4 + [1.0] * 2 + [2.0] * 2))
    # Prediction contour has one more vertical run on each side.
    np.testing.assert_allclose(np.sort(distances.prediction_areas), np.sort([corner_cut] * 4 + [1.0] * 2 + [2.0] * 4))
    # Only the truth's bottom-middle corner is off the prediction's contour: 1 mm to the side runs beside it.
    np.testing.assert_allclose(distances.truth_to_prediction_mm, [0.0] * 7 + [1.0])
    # The prediction's three bottom surfels lie one row (2 mm) below the truth's bottom.
    np.testing.assert_allclose(distances.prediction_to_truth_mm, [0.0] * 7 + [2.0] * 3)

    truth_total = 4 * corner_cut + 2 * 1.0 + 2 * 2.0
    prediction_total = 4 * corner_cut + 2 * 1.0 + 4 * 2.0
    prediction_far = 2 * corner_cut + 1.0
    expected_sdsc = (truth_total + prediction_total - prediction_far) / (truth_total + prediction_total)
    assert distances.surface_dice(1.0) == pytest.approx(expected_sdsc)
    assert distances.surface_dice(2.0) == pytest.approx(1.0)
    # The far bottom surfels hold more than 5 % of each contour, so the 95th percentiles are the far distances.
    assert distances.robust_hausdorff(95) == pytest.approx(2.0)
    assert dice(prediction, truth) == pytest.approx(2 * 4 / (4 + 6))


def test_2d_diagonal_pixels_keep_their_corner_cuts_apart():
    # Two pixels touching at a corner: the block around that corner holds two opposite corner cuts, so the
    # contour is eight corner cuts, the same as for two separate pixels; likewise for the matching hole.
    spacing = (2.0, 1.0)
    corner_cut = 0.5 * math.hypot(*spacing)
    pixels = np.zeros((8, 8), bool)
    pixels[3, 3] = pixels[4, 4] = True
    assert surface_area(pixels, spacing) == pytest.approx(8 * corner_cut)
    solid = np.zeros((8, 8), bool)
    solid[1:7, 1:7] = True
    assert surface_area(solid & ~pixels, spacing) - surface_area(solid, spacing) == pytest.approx(8 * corner_cut)


def test_deepmind_3d_half_spaces_one_voxel_apart():
    # DeepMind's own test: the numbers below are theirs (3 decimals).
    truth = np.zeros((100, 100, 100), bool)
    prediction = np.zeros((100, 100, 100), bool)
    truth[:50] = True
    prediction[:51] = True
    distances = surface_distances(prediction, truth, (2.0, 1.0, 1.0))
    assert distances.surface_dice(1.0) == pytest.approx(0.836, abs=5e-4)
    assert distances.robust_hausdorff(95) == pytest.approx(2.0)
    assert distances.robust_hausdorff(100) == pytest.approx(2.0)
    assert dice(prediction, truth) == pytest.approx(0.990, abs=5e-4)
    truth_mean = np.average(distances.truth_to_prediction_mm, weights=distances.truth_areas)
    prediction_mean = np.average(distances.prediction_to_truth_mm, weights=distances.prediction_areas)
    assert truth_mean == pytest.approx(0.322, abs=5e-4)
    assert prediction_mean == pytest.approx(0.339, abs=5e-4)


def test_3d_single_voxels_two_mm_apart():
    truth = np.zeros((12, 12, 12), bool)
    prediction = np.zeros((12, 12, 12), bool)
    truth[5, 6, 4] = True
    prediction[5, 6, 6] = True
    spacing = (3.0, 2.0, 1.0)
    distances = surface_distances(prediction, truth, spacing)
    # One voxel: eight corner blocks with one inside corner each, each cut by the triangle through the midpoints
    # (a/2, 0, 0), (0, b/2, 0), (0, 0, c/2) of its three edges: area 1/8 * sqrt((bc)^2 + (ac)^2 + (ab)^2).
    corner_triangle = 0.125 * math.sqrt((2.0 * 1.0) ** 2 + (3.0 * 1.0) ** 2 + (3.0 * 2.0) ** 2)
    np.testing.assert_allclose(distances.truth_areas, [corner_triangle] * 8, rtol=1e-6)
    np.testing.assert_allclose(distances.truth_to_prediction_mm, [1.0] * 4 + [2.0] * 4)
    assert distances.surface_dice(1.0) == pytest.approx(0.5)
    assert distances.robust_hausdorff(95) == pytest.approx(2.0)


def test_3d_edge_touching_voxels_and_their_hole_have_the_same_surface():
    # Two voxels sharing only an edge: the two blocks around that edge hold diagonal corners, which the
    # DeepMind convention keeps apart (two corner triangles each), so the surface is 16 corner triangles.
    # The same two voxels cut out of a solid as a hole must have the same surface (complement symmetry).
    spacing = (3.0, 2.0, 1.0)
    corner_triangle = 0.125 * math.sqrt((2.0 * 1.0) ** 2 + (3.0 * 1.0) ** 2 + (3.0 * 2.0) ** 2)
    voxels = np.zeros((10, 10, 10), bool)
    voxels[4, 4, 4] = voxels[5, 5, 4] = True
    assert surface_area(voxels, spacing) == pytest.approx(16 * corner_triangle)

    solid = np.zeros((10, 10, 10), bool)
    solid[1:9, 1:9, 1:9] = True
    holed = solid & ~voxels
    assert surface_area(holed, spacing) - surface_area(solid, spacing) == pytest.approx(16 * corner_triangle)


@pytest.mark.parametrize("shape", [(20, 20), (8, 10, 12)])
def test_empty_mask_policy(shape):
    spacing = (1.0,) * len(shape)
    empty = np.zeros(shape, bool)
    blob = np.zeros(shape, bool)
    blob[(slice(2, 5),) * len(shape)] = True

    for prediction, truth in ((empty, blob), (blob, empty)):
        metrics = segmentation_metrics(prediction, truth, spacing)
        assert metrics["dice"] == 0.0
        assert metrics["surface_dice"] == 0.0
        assert metrics["hd95"] == math.inf

    both_empty = segmentation_metrics(empty, empty, spacing)
    assert math.isnan(both_empty["dice"])
    assert math.isnan(both_empty["surface_dice"])
    assert math.isnan(both_empty["hd95"])


def test_dice_hand_computed():
    prediction = np.zeros((4, 4), np.uint8)
    truth = np.zeros((4, 4), np.uint8)
    prediction[0, :3] = 1  # 3 pixels
    truth[0, 1:] = 1  # 3 pixels, 2 shared
    truth[1, 0] = 1  # 4 pixels in all
    assert dice(prediction, truth) == pytest.approx(2 * 2 / (3 + 4))
    assert dice(truth, truth) == 1.0
    # Any nonzero label value counts as foreground.
    assert dice(prediction * 7, truth) == pytest.approx(2 * 2 / (3 + 4))


def test_metrics_are_symmetric():
    rng = np.random.default_rng(3)
    truth = disk(9, (30, 28)) | disk(4, (45, 45))
    prediction = disk(11, (33, 30)) & (rng.random((64, 64)) > 0.05)
    spacing = (0.7, 1.3)
    forward = segmentation_metrics(prediction, truth, spacing, tolerance_mm=1.5)
    backward = segmentation_metrics(truth, prediction, spacing, tolerance_mm=1.5)
    for key in ("dice", "surface_dice", "hd95"):
        assert forward[key] == pytest.approx(backward[key])
    assert 0.0 < forward["surface_dice"] < 1.0
    assert 0.0 < forward["dice"] < 1.0


@pytest.mark.parametrize(
    ("shift_axis", "spacing", "expected_hd95"),
    [
        (0, (2.0, 1.0), 6.0),  # 3 rows of 2 mm
        (0, (1.0, 2.0), 3.0),  # 3 rows of 1 mm
        (1, (2.0, 1.0), 3.0),  # 3 columns of 1 mm
        (1, (1.0, 2.0), 6.0),  # 3 columns of 2 mm
    ],
)
def test_hd95_follows_the_spacing_of_the_shifted_axis(shift_axis, spacing, expected_hd95):
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    prediction = np.roll(truth, 3, axis=shift_axis)
    assert hausdorff95(prediction, truth, spacing) == pytest.approx(expected_hd95)


def test_surface_dice_grows_with_tolerance():
    truth = disk(12, (32, 32))
    prediction = disk(10, (35, 31))
    distances = surface_distances(prediction, truth, (0.8, 0.8))
    values = [distances.surface_dice(tolerance) for tolerance in (0.0, 0.5, 1.0, 2.0, 4.0, 10.0)]
    assert values == sorted(values)
    assert values[0] < values[-1] == pytest.approx(1.0)


def test_segmentation_metrics_match_the_single_metrics():
    truth = disk(12, (32, 32))
    prediction = disk(10, (35, 31))
    spacing = (0.8, 1.1)
    metrics = segmentation_metrics(prediction, truth, spacing)
    assert set(metrics) == {"dice", "surface_dice", "hd95", "tolerance_mm"}
    assert metrics["tolerance_mm"] == DEFAULT_TOLERANCE_MM == 1.0
    assert metrics["dice"] == dice(prediction, truth)
    assert metrics["surface_dice"] == surface_dice(prediction, truth, spacing, DEFAULT_TOLERANCE_MM)
    assert metrics["hd95"] == hausdorff95(prediction, truth, spacing)
    assert all(isinstance(value, float) for value in metrics.values())


def test_user_errors_are_reported_as_input_errors():
    square = np.ones((4, 4), bool)
    with pytest.raises(InputError, match="shape"):
        dice(square, np.ones((4, 5), bool))
    with pytest.raises(InputError, match="spacing"):
        surface_distances(square, square, (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        surface_distances(square, square, (1.0, 0.0))
    with pytest.raises(InputError, match="2D or 3D"):
        surface_distances(np.ones(4, bool), np.ones(4, bool), (1.0,))
    with pytest.raises(InputError, match="tolerance"):
        surface_dice(square, square, (1.0, 1.0), tolerance_mm=-1.0)


def test_real_tumour_label_shifted_by_one_voxel():
    label_path = DATA / "mri" / "pyradiomics_brain1_label.nrrd"
    if not label_path.exists():
        pytest.skip(f"real test data not found at {label_path}")
    image = read_volume(label_path)
    truth = sitk.GetArrayFromImage(image) > 0  # (z, y, x)
    spacing_zyx = image.GetSpacing()[::-1]  # (6.5, 0.78, 0.78) mm
    assert truth.any()

    for axis in range(3):
        prediction = np.roll(truth, 1, axis=axis)
        metrics = segmentation_metrics(prediction, truth, spacing_zyx, tolerance_mm=1.0)
        # Every surfel of a mask shifted by one voxel has its twin exactly one voxel step away.
        assert 0.0 < metrics["hd95"] <= spacing_zyx[axis] + 1e-9
        assert 0.0 < metrics["dice"] < 1.0
        if spacing_zyx[axis] > 1.0:
            assert metrics["surface_dice"] < 1.0
        else:
            assert metrics["surface_dice"] == pytest.approx(1.0)
    # A one-slice (6.5 mm) shift moves caps of the tumour far more than a one-pixel in-plane shift.
    through_plane = hausdorff95(np.roll(truth, 1, axis=0), truth, spacing_zyx)
    in_plane = hausdorff95(np.roll(truth, 1, axis=2), truth, spacing_zyx)
    assert through_plane > in_plane
