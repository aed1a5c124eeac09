"""Lung detection on real CTs: agreement with reference lung masks, negative controls, padding, merged lungs,
the ROI around a tumour, geometry and the summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from cmedl.errors import ConfigError, NoLungsFoundError
from cmedl.lungs import LungDetection, detect_lungs
from cmedl.volumes import image_like, read_volume, same_geometry, write_labelmap

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LUNG_DATA = DATA / "ct_lungmask"
OTHER_CT = DATA / "ct_nolabel"
TOTALSEG_LUNG_LOBES = [10, 11, 12, 13, 14]
TOTALSEG_GUT = [6, 18, 19, 20]  # stomach, small bowel, duodenum, colon

IN_SLICE = np.zeros((3, 3, 3), dtype=bool)
IN_SLICE[1] = ndimage.generate_binary_structure(2, 1)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


@pytest.fixture(scope="module")
def chest() -> tuple[sitk.Image, np.ndarray]:
    """The CIP whole-chest CT and its reference whole-lung mask (z, y, x)."""
    ct = read_volume(LUNG_DATA / "cip_ct-64.nrrd")
    reference = array(read_volume(LUNG_DATA / "cip_wholeLung-64.nrrd")) > 0
    return ct, reference


@pytest.fixture(scope="module")
def chest_detection(chest) -> LungDetection:
    return detect_lungs(chest[0])


@pytest.mark.parametrize("source", ["cip_ct-64.nrrd", "cip_ct-64Dicom"])
def test_whole_chest_agrees_with_reference_mask(source, chest):
    _, reference = chest
    ct = read_volume(LUNG_DATA / source)
    found = detect_lungs(ct)
    mask = array(found.lung_mask)
    assert same_geometry(found.lung_mask, ct) and same_geometry(found.roi_mask, ct)
    assert found.lung_mask.GetPixelID() == sitk.sitkUInt8 and set(np.unique(mask)) == {0, 1}
    assert dice(mask, reference) >= 0.95
    assert found.lung_count == 2
    reference_slices = np.flatnonzero(reference.any(axis=(1, 2)))
    # The reference leaves the trachea out; it runs above the apices here, so the slices must stop at the apex.
    assert abs(found.slice_range[0] - reference_slices[0]) <= 1
    assert abs(found.slice_range[1] - reference_slices[-1]) <= 1


def test_dicom_series_and_nrrd_give_the_same_mask(chest_detection):
    from_dicom = detect_lungs(read_volume(LUNG_DATA / "cip_ct-64Dicom"))
    assert np.array_equal(array(from_dicom.lung_mask), array(chest_detection.lung_mask))


def test_hemithorax_crop_has_one_lung():
    ct = read_volume(LUNG_DATA / "elastix_3DCT_lung.mha")
    reference = array(read_volume(LUNG_DATA / "elastix_3DCT_lung_baseline_mask.mha"))
    found = detect_lungs(ct)
    assert dice(array(found.lung_mask), reference) >= 0.90
    assert found.lung_count == 1


def test_abdomen_only_series_has_no_lungs():
    ct = read_volume(OTHER_CT / "totalseg_example_ct_dicom")
    with pytest.raises(NoLungsFoundError) as raised:
        detect_lungs(ct, name="totalseg_example_ct_dicom")
    message = str(raised.value)
    assert message.startswith("no lungs found in totalseg_example_ct_dicom: ")
    assert "\n" not in message


def test_lung_bases_above_the_abdomen_without_bowel_gas():
    ct = read_volume(LUNG_DATA / "totalseg_example_ct_sm.nii.gz")
    labels = array(read_volume(LUNG_DATA / "totalseg_example_seg.nii.gz"))
    found = detect_lungs(ct)
    mask = array(found.lung_mask) > 0
    # TotalSegmentator's lobes are a model output, not ground truth: ask for good, not perfect, agreement.
    assert dice(mask, np.isin(labels, TOTALSEG_LUNG_LOBES)) >= 0.85
    gut_gas = np.isin(labels, TOTALSEG_GUT) & (array(ct) < -300)
    assert np.count_nonzero(gut_gas) > 1000  # the scan does hold bowel gas a naive detector would take
    assert np.count_nonzero(mask & gut_gas) == 0
    assert found.lung_count == 2


@pytest.mark.parametrize(("source", "padding_value"), [("lungmask_lidc_slice", -2048), ("dcmqi_ct-3slice", -3024)])
def test_padding_is_not_lung(source, padding_value):
    ct = read_volume(OTHER_CT / source)
    hu = array(ct)
    assert np.count_nonzero(hu == padding_value) > 0.1 * hu.size
    found = detect_lungs(ct)
    mask = array(found.lung_mask) > 0
    assert np.count_nonzero(mask & (hu == padding_value)) == 0
    assert not (mask[:, 0, :].any() or mask[:, -1, :].any() or mask[:, :, 0].any() or mask[:, :, -1].any())
    assert found.lung_count == 2
    pixel_cm2 = ct.GetSpacing()[0] * ct.GetSpacing()[1] / 100.0
    assert (mask.sum(axis=(1, 2)) * pixel_cm2 >= 50.0).all()  # both lungs in every slice, not a sliver


@pytest.mark.parametrize("padding_value", [-1024, -2048, -3024])
def test_circular_field_of_view_does_not_change_the_mask(chest, chest_detection, padding_value):
    ct, reference = chest
    hu = array(ct)
    _, rows, columns = np.indices(hu.shape)
    centre = (hu.shape[1] - 1) / 2.0
    outside_view = np.hypot(rows - centre, columns - centre) > centre
    assert not (reference & outside_view).any()  # the circle crosses the body, not the lungs
    padded = image_like(np.where(outside_view, padding_value, hu).astype(hu.dtype), ct)
    assert np.array_equal(array(detect_lungs(padded).lung_mask), array(chest_detection.lung_mask))


def test_whole_padded_slices_are_not_lung(chest, chest_detection):
    ct, _ = chest
    padded = sitk.ConstantPad(ct, (0, 0, 2), (0, 0, 2), -3024)  # as a resampling beyond the scan would add
    found = detect_lungs(padded)
    assert np.array_equal(array(found.lung_mask)[2:-2], array(chest_detection.lung_mask))
    assert found.slice_range == tuple(v + 2 for v in chest_detection.slice_range)


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 5.0), (1.5, 1.5, 3.0)])
def test_other_spacings_agree_with_the_resampled_reference(chest, spacing):
    ct, reference = chest
    # Stay inside the scan so that the resampling adds no padding.
    size = [int((n - 1) * s // new) + 1 for n, s, new in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    resampled = sitk.Resample(
        ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(), -1000, ct.GetPixelID()
    )
    reference_image = image_like(reference.astype(np.uint8), ct)
    resampled_reference = sitk.Resample(reference_image, resampled, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    found = detect_lungs(resampled)
    assert dice(array(found.lung_mask), array(resampled_reference)) >= 0.95
    assert found.lung_count == 2
    reference_ml = np.count_nonzero(reference) * np.prod(ct.GetSpacing()) / 1000.0
    assert found.lung_volume_ml == pytest.approx(reference_ml, rel=0.1)


def test_trachea_alone_is_not_lung(chest):
    ct, reference = chest
    above_apices = int(np.flatnonzero(reference.any(axis=(1, 2)))[-1]) + 1
    neck = ct[:, :, above_apices:]
    assert (array(neck) < -300).any()  # the trachea and the air around the neck are there
    with pytest.raises(NoLungsFoundError):
        detect_lungs(neck)


def test_lungs_joined_by_an_air_bridge_still_count_as_two(chest):
    ct, reference = chest
    hu = array(ct).copy()
    lungs, count = ndimage.label(reference)
    assert count == 2
    # An air channel through the mediastinum, 2 rows by 3 slices, from one lung's edge to the other's.
    z, y = slice(38, 41), slice(35, 37)
    columns = [np.flatnonzero((lungs[z, y] == label).any(axis=(0, 1))) for label in (1, 2)]
    on_the_left, on_the_right = sorted(columns, key=np.mean)
    hu[z, y, on_the_left.max() : on_the_right.min() + 1] = -1000
    found = detect_lungs(image_like(hu, ct))
    mask = array(found.lung_mask) > 0
    assert ndimage.label(mask)[1] == 1  # the lungs do touch now
    assert found.lung_count == 2
    for label in (1, 2):
        one_lung = lungs == label
        assert np.count_nonzero(mask & one_lung) >= 0.95 * np.count_nonzero(one_lung)
    assert dice(mask, reference) >= 0.95


def test_roi_holds_the_lungs_and_a_tumour_against_the_mediastinum(chest):
    ct, reference = chest
    hu = array(ct).copy()
    spacing_zyx = np.array(ct.GetSpacing()[::-1])
    # An 11 mm radius soft-tissue ball centred on the right lung's medial edge: half in the lung, half in the
    # mediastinum, abutting the mediastinum in every slice it crosses (checked below on the reference mask).
    z, y = 40, 36
    medial_edge = np.flatnonzero(reference[z, y, :32]).max()
    centre = np.array([z, y, medial_edge])[:, None, None, None]
    offsets_mm = (np.indices(hu.shape) - centre) * spacing_zyx[:, None, None, None]
    tumour = np.sqrt((offsets_mm**2).sum(axis=0)) <= 11.0
    assert np.count_nonzero(reference & tumour) > 20
    tissue_next_to_tumour = ndimage.binary_dilation(tumour, structure=IN_SLICE) & ~tumour & ~reference
    assert all(tissue_next_to_tumour[k].any() for k in np.flatnonzero(tumour.any(axis=(1, 2))))
    hu[tumour] = 40
    found = detect_lungs(image_like(hu, ct))
    lungs, roi = array(found.lung_mask) > 0, array(found.roi_mask) > 0
    assert same_geometry(found.roi_mask, ct)
    assert not (lungs & tumour).any()
    assert roi[tumour].all()
    assert roi[lungs].all()
    (x0, x1), (y0, y1), (z0, z1) = found.roi_box
    box = np.zeros_like(roi)
    box[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = True
    assert np.array_equal(roi, box)  # a solid box: mediastinum and chest wall inside, no holes
    assert np.array_equal(ndimage.binary_fill_holes(roi), roi)


def test_roi_box_is_the_lung_box_grown_by_the_margins():
    ct = read_volume(LUNG_DATA / "elastix_3DCT_lung.mha")
    tight = detect_lungs(ct, margin_mm=0.0)
    lungs = array(tight.lung_mask) > 0
    bounds = []
    for axis in (2, 1, 0):
        present = np.flatnonzero(lungs.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append((present[0], present[-1]))
    assert [list(b) for b in tight.roi_box] == [list(b) for b in bounds]
    assert tight.slice_range == tuple(bounds[2])

    grown = detect_lungs(ct, margin_mm=20.0)
    size, spacing = ct.GetSize(), ct.GetSpacing()
    margins_mm = (20.0, 20.0, 10.0)  # the slice range grows by at most 10 mm
    for axis, ((lo, hi), (grown_lo, grown_hi)) in enumerate(zip(bounds, grown.roi_box)):
        step = math.ceil(margins_mm[axis] / spacing[axis])
        assert grown_lo == max(0, lo - step)
        assert grown_hi == min(size[axis] - 1, hi + step)
    assert grown.slice_range == tight.slice_range


def test_summary_is_json_and_matches_the_mask(chest_detection, tmp_path):
    summary = json.loads(json.dumps(chest_detection.summary()))
    mask = array(chest_detection.lung_mask)
    spacing = chest_detection.lung_mask.GetSpacing()
    assert summary["lung_volume_ml"] == pytest.approx(np.count_nonzero(mask) * np.prod(spacing) / 1000.0)
    assert 3000 < summary["lung_volume_ml"] < 6000  # the reference mask holds 4554 mL
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    assert summary["slice_range"] == [slices[0], slices[-1]]
    assert summary["roi_box"] == [list(bounds) for bounds in chest_detection.roi_box]
    assert summary["lung_count"] == 2 and summary["threshold_hu"] == -300.0 and summary["margin_mm"] == 30.0
    origin = chest_detection.lung_mask.GetOrigin()
    for axis, ((lo, hi), (lo_mm, hi_mm)) in enumerate(zip(summary["roi_box"], summary["roi_box_mm"])):
        assert lo_mm == pytest.approx(origin[axis] + (lo - 0.5) * spacing[axis])
        assert hi_mm == pytest.approx(origin[axis] + (hi + 0.5) * spacing[axis])

    written = write_labelmap(chest_detection.lung_mask, tmp_path / "lungs.nii.gz")
    roi_written = write_labelmap(chest_detection.roi_mask, tmp_path / "roi.nrrd")
    for path, image in ((written, chest_detection.lung_mask), (roi_written, chest_detection.roi_mask)):
        back = read_volume(path)
        assert same_geometry(back, image) and np.array_equal(array(back), array(image))


@pytest.mark.parametrize(
    "direction",
    [
        (-1, 0, 0, 0, 1, 0, 0, 0, 1),
        (1, 0, 0, 0, -1, 0, 0, 0, 1),
        (math.cos(0.5), -math.sin(0.5), 0, math.sin(0.5), math.cos(0.5), 0, 0, 0, 1),
    ],
    ids=["x-flipped", "y-flipped", "rotated"],
)
def test_direction_matrix_keeps_the_mask_voxels(chest, chest_detection, direction):
    ct = sitk.Image(chest[0])
    ct.SetDirection(direction)
    found = detect_lungs(ct)
    assert np.array_equal(array(found.lung_mask), array(chest_detection.lung_mask))
    assert found.lung_mask.GetDirection() == pytest.approx(direction)
    assert found.roi_box == chest_detection.roi_box


@pytest.mark.parametrize(
    ("reorder", "undo"),
    [
        (lambda image: sitk.PermuteAxes(image, [0, 2, 1]), lambda image: sitk.PermuteAxes(image, [0, 2, 1])),
        (lambda image: sitk.Flip(image, [True, False, True]), lambda image: sitk.Flip(image, [True, False, True])),
    ],
    ids=["stored-as-coronal-slices", "stored-flipped"],
)
def test_same_patient_stored_in_another_voxel_order_gives_the_same_lungs(chest, chest_detection, reorder, undo):
    stored = reorder(chest[0])
    assert not np.allclose(stored.GetDirection(), chest[0].GetDirection())
    found = detect_lungs(stored)
    assert same_geometry(found.lung_mask, stored) and same_geometry(found.roi_mask, stored)
    assert np.array_equal(array(undo(found.lung_mask)), array(chest_detection.lung_mask))
    assert np.array_equal(array(undo(found.roi_mask)), array(chest_detection.roi_mask))
    assert found.lung_count == 2


def test_bad_parameters_are_refused(chest):
    with pytest.raises(ConfigError):
        detect_lungs(chest[0], threshold_hu=100.0)
    with pytest.raises(ConfigError):
        detect_lungs(chest[0], margin_mm=-5.0)


@pytest.mark.parametrize(
    ("fill", "words"),
    [
        (lambda a: a.fill(40), "every voxel is 40 HU"),
        (lambda a: a.fill(-1000), "every voxel is -1000 HU"),
        (lambda a: a.__setitem__((slice(None), slice(20, 40), slice(20, 40)), -1000), "fills the image border"),
    ],
    ids=["all-40", "all-air", "only-padding-above-threshold"],
)
def test_no_body_says_what_the_image_holds(fill, words) -> None:
    values = np.zeros((20, 64, 64), dtype=np.int16)
    fill(values)
    with pytest.raises(NoLungsFoundError, match=words):
        detect_lungs(sitk.GetImageFromArray(values), name="scan.nii")
