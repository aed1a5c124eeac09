"""The CT-or-not guard on every real CT and MR image of the test data, and on CTs stored with an offset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmedl.errors import NotCTError
from cmedl.modality import check_looks_like_ct, ct_likelihood_report
from cmedl.volumes import image_like, list_volumes, read_volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABEL_MAPS = {
    "cip_wholeLung-64.nrrd",
    "cip_lm-64.nrrd",
    "elastix_3DCT_lung_baseline_mask.mha",
    "totalseg_example_seg.nii.gz",
    "dcmqi_liver_spine_seg.nrrd",
    "pyradiomics_brain1_label.nrrd",
    "pyradiomics_brain2_label.nrrd",
    "pyradiomics_breast1_label.nrrd",
    "totalseg_example_seg_mr.nii.gz",
}


def volumes_in(*folders: str, label_maps: bool = False) -> list[Path]:
    """Images (or, with ``label_maps``, only the label maps) in the data folders; empty without the data."""
    if not DATA.is_dir():
        return []
    found = [path for folder in folders for path in list_volumes(DATA / folder)]
    return [path for path in found if (path.name in LABEL_MAPS) == label_maps]


def labelled_by_name(paths: list[Path]):
    return pytest.mark.parametrize("path", paths, ids=[path.name for path in paths])


CT_IMAGES = volumes_in("ct_lungmask", "ct_nolabel")
MR_IMAGES = volumes_in("mri")
LABEL_FILES = volumes_in("ct_lungmask", "ct_nolabel", "mri", label_maps=True)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")


def test_the_data_holds_the_expected_images():
    names = {path.name for path in CT_IMAGES}
    assert {"cip_ct-64Dicom", "lungmask_lidc_slice", "dcmqi_ct-3slice", "totalseg_pulmonary_ct_cropped.nii.gz"} <= names
    assert len(CT_IMAGES) >= 10 and len(MR_IMAGES) >= 4


@labelled_by_name(CT_IMAGES)
def test_every_ct_is_accepted(path):
    image = read_volume(path)
    check_looks_like_ct(image, name=path.name)
    report = ct_likelihood_report(image)
    assert report["looks_like_ct"] and report["reason"] == ""
    assert -150 <= report["tissue_peak_hu"] <= 150


@labelled_by_name(MR_IMAGES)
def test_every_mr_is_refused(path):
    image = read_volume(path)
    with pytest.raises(NotCTError) as raised:
        check_looks_like_ct(image, name=path.name)
    message = str(raised.value)
    assert message.startswith(f"{path.name} does not look like a CT in Hounsfield units: ")
    assert "\n" not in message
    assert not ct_likelihood_report(image)["offset_1024_suspected"]


@labelled_by_name(LABEL_FILES)
def test_label_maps_are_refused(path):
    with pytest.raises(NotCTError):
        check_looks_like_ct(read_volume(path))


@pytest.mark.parametrize("source", ["ct_lungmask/cip_ct-64.nrrd", "ct_nolabel/dcmqi_ct-3slice"])
def test_ct_stored_with_a_1024_offset_is_refused_with_a_rescale_hint(source):
    hu = read_volume(DATA / source)
    stored = image_like(sitk.GetArrayFromImage(hu).astype(np.int32) + 1024, hu)
    report = ct_likelihood_report(stored)
    assert not report["looks_like_ct"] and report["offset_1024_suspected"]
    with pytest.raises(NotCTError, match="subtract 1024"):
        check_looks_like_ct(stored, name="raw.nrrd")


def test_report_is_json_and_describes_the_histogram():
    image = read_volume(DATA / "ct_lungmask" / "cip_ct-64.nrrd")
    report = json.loads(json.dumps(ct_likelihood_report(image)))
    values = sitk.GetArrayFromImage(image)
    assert report["min"] == values.min() and report["max"] == values.max()
    assert report["voxels_sampled"] == values.size
    assert report["fraction_air"] == pytest.approx(np.mean((values >= -1100) & (values <= -900)))
    assert report["fraction_integer"] == 1.0
    assert report["padding_value"] is None


def test_padding_is_reported_and_does_not_count_as_air():
    image = read_volume(DATA / "ct_nolabel" / "lungmask_lidc_slice")
    report = ct_likelihood_report(image)
    assert report["padding_value"] == -2048
    assert report["min"] == -2048 and report["p1"] > -2048
    # Padding alone is not air: a uniform soft-tissue image with a padded border is refused.
    padded_water = np.full((4, 64, 64), 40, dtype=np.int16)
    padded_water[:, :8, :] = -1024
    with pytest.raises(NotCTError):
        check_looks_like_ct(sitk.GetImageFromArray(padded_water))


def test_resampled_float_ct_is_accepted():
    image = read_volume(DATA / "ct_lungmask" / "cip_ct-64.nrrd")
    resampled = sitk.Cast(image, sitk.sitkFloat32) + 0.25
    report = ct_likelihood_report(resampled)
    assert report["fraction_integer"] == 0.0 and report["looks_like_ct"]


def test_constant_image_is_refused():
    with pytest.raises(NotCTError):
        check_looks_like_ct(sitk.Image(16, 16, 4, sitk.sitkInt16))
