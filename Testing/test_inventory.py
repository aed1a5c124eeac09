"""The training-data check: cases, modality from intensities, spacing, missing labels, unreadable files."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmedl.errors import CancelledError
from cmedl.phantom import write_phantom_dataset
from cmedl.training.inventory import CT, MR, UNKNOWN, guess_modality, scan_folder, scan_training_data


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """3 CT and 2 MR phantoms (128 px) with labels."""
    out = tmp_path_factory.mktemp("inventory")
    write_phantom_dataset(out, n_ct=3, n_mr=2, seed=23, size=128)
    return out


@pytest.fixture
def messy(phantoms: Path, tmp_path: Path) -> Path:
    """A CT dataset with an MR image (and its label) in it, a corrupt image, an image without label, a label
    without image and a label on another grid."""
    data = tmp_path / "ct"
    shutil.copytree(phantoms / "ct", data)
    shutil.copy(phantoms / "mr" / "images" / "mr_0000.nii.gz", data / "images" / "intruder.nii.gz")
    shutil.copy(phantoms / "mr" / "labels" / "mr_0000.nii.gz", data / "labels" / "intruder.nii.gz")
    (data / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b this is no image")
    (data / "images" / "ct_0001.nii.gz").rename(data / "images" / "unlabelled.nii.gz")
    label = sitk.ReadImage(str(data / "labels" / "ct_0002.nii.gz"))
    label.SetOrigin([value + 7.5 for value in label.GetOrigin()])
    sitk.WriteImage(label, str(data / "labels" / "ct_0002.nii.gz"))
    return data


def test_a_clean_dataset_is_summarised_and_usable(phantoms: Path) -> None:
    started = time.perf_counter()
    inventory = scan_training_data(
        phantoms / "ct" / "images", phantoms / "ct" / "labels", phantoms / "mr" / "images", None,
        method="cmedl", validation_fraction=0.34,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert inventory.ok, inventory.summary_text()
    ct, mr = inventory.folders
    assert [case.name for case in ct.cases] == ["ct_0000", "ct_0001", "ct_0002"]
    assert {case.modality for case in ct.cases} == {CT} and {case.modality for case in mr.cases} == {MR}
    assert all(case.label_voxels and not case.label_issue for case in ct.cases)
    assert all(case.label is None for case in mr.cases)
    # Spacing comes from the headers and matches what the files hold.
    low, high = ct.spacing_range()
    spacings = np.array([sitk.ReadImage(str(case.image)).GetSpacing() for case in ct.cases])
    np.testing.assert_allclose(low, spacings.min(axis=0))
    np.testing.assert_allclose(high, spacings.max(axis=0))
    assert inventory.validation_cases() == 1
    text = inventory.summary_text()
    assert "3 image(s), 3 with a label" in text and "3 CT" in text and "2 MR" in text
    assert "1 CT case(s) held out" in text and "The data can be used for training." in text
    # Unlabelled MRI is allowed and said so.
    assert any("have no label" in warning for warning in inventory.warnings())
    assert seconds < 10


def test_every_problem_is_named_with_its_file_and_reason(messy: Path) -> None:
    inventory = scan_training_data(messy / "images", messy / "labels")
    assert not inventory.ok
    ct = inventory.folders[0]
    assert [problem.path.name for problem in ct.unreadable] == ["broken.nii.gz"]
    assert ct.unreadable[0].reason  # SimpleITK's own explanation, one line
    assert "\n" not in ct.unreadable[0].reason
    assert [case.name for case in ct.without_label] == ["unlabelled"]
    assert [(case.name, case.modality) for case in ct.wrong_modality] == [("intruder", MR)]
    assert "no air or lung" in ct.wrong_modality[0].modality_reason
    assert [path.name for path in ct.labels_without_image] == ["ct_0001.nii.gz"]
    assert [case.name for case in ct.label_issues] == ["ct_0002"]
    assert "grid" in ct.label_issues[0].label_issue
    problems = "\n".join(inventory.problems())
    for expected in ("cannot be read: broken.nii.gz", "without a label: unlabelled.nii.gz",
                     "do not look like a CT", "intruder.nii.gz", "label(s) unusable: ct_0002.nii.gz"):  # fmt: skip
        assert expected in problems
    text = inventory.summary_text()
    assert "Problems (training cannot start):" in text
    assert "label without an image: ct_0001.nii.gz" in text
    assert "looks like MR: intruder.nii.gz" in text


def test_ct_in_the_mri_folder_and_missing_folders_are_problems(phantoms: Path, tmp_path: Path) -> None:
    mr = tmp_path / "mr_images"
    shutil.copytree(phantoms / "mr" / "images", mr)
    shutil.copy(phantoms / "ct" / "images" / "ct_0000.nii.gz", mr / "ct_in_mr.nii.gz")
    inventory = scan_training_data(phantoms / "ct" / "images", phantoms / "ct" / "labels", mr, method="cmedl")
    assert any("do not look like an MR image: ct_in_mr.nii.gz" in p for p in inventory.problems())

    nothing = scan_training_data(tmp_path / "nowhere", phantoms / "ct" / "labels", method="cmedl")
    problems = nothing.problems()
    assert any("does not exist" in problem for problem in problems)
    assert any("no MRI images folder" in problem for problem in problems)


def test_labels_without_tumour_and_a_validation_folder(phantoms: Path, tmp_path: Path) -> None:
    data = tmp_path / "ct"
    shutil.copytree(phantoms / "ct", data)
    for path in (data / "labels").iterdir():
        sitk.WriteImage(sitk.ReadImage(str(path)) * 0, str(path))
    inventory = scan_training_data(data / "images", data / "labels", validation=phantoms / "ct")
    assert any("no label contains a tumour" in problem for problem in inventory.problems())
    validation = inventory.folder("CT validation data")
    assert validation is not None and len(validation.labelled) == 3 and not validation.problems()
    assert inventory.validation_cases() == 3


def test_a_two_dimensional_image_and_the_modality_guess_on_arrays(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    ct_slice = np.full((64, 64), -1000, np.int16)
    ct_slice[8:56, 8:56] = rng.normal(40, 20, (48, 48)).astype(np.int16)
    ct_slice[20:30, 20:30] = -800  # lung
    image = sitk.GetImageFromArray(ct_slice)
    image.SetSpacing((0.7, 0.7))
    sitk.WriteImage(image, str(images / "slice.nrrd"))
    label = sitk.GetImageFromArray((ct_slice > 100).astype(np.uint8))
    label.CopyInformation(image)
    sitk.WriteImage(label, str(labels / "slice.nrrd"))
    folder = scan_folder(images, labels)
    assert [case.size for case in folder.cases] == [(64, 64, 1)]
    assert folder.cases[0].modality == CT and not folder.cases[0].label_issue

    offset = sitk.GetImageFromArray((ct_slice.astype(np.int32) + 1024)[None])
    modality, reason = guess_modality(offset)
    assert modality == UNKNOWN and "1024" in reason


def test_a_scan_can_be_cancelled(phantoms: Path) -> None:
    seen = []

    def progress(done: int, total: int, name: str) -> bool:
        seen.append((done, total, name))
        return True

    with pytest.raises(CancelledError):
        scan_training_data(phantoms / "ct" / "images", phantoms / "ct" / "labels", progress=progress)
    assert seen == [(1, 3, "ct_0000.nii.gz")]


def test_a_label_stored_with_flipped_axes_is_on_the_images_grid(phantoms: Path, tmp_path: Path) -> None:
    data = tmp_path / "ct"
    shutil.copytree(phantoms / "ct", data)
    path = data / "labels" / "ct_0000.nii.gz"
    label = sitk.ReadImage(str(path))
    flipped = sitk.Flip(label, [True, False, True])  # the same voxels in space, stored the other way round
    assert flipped.GetDirection() != label.GetDirection()
    sitk.WriteImage(flipped, str(path))
    folder = scan_folder(data / "images", data / "labels")
    case = next(case for case in folder.cases if case.name == "ct_0000")
    assert case.label_issue == "" and case.label_voxels == int(np.count_nonzero(sitk.GetArrayViewFromImage(label)))
    shifted = sitk.Image(flipped)
    shifted.SetOrigin([value + 0.5 for value in flipped.GetOrigin()])
    sitk.WriteImage(shifted, str(path))
    assert "grid" in scan_folder(data / "images", data / "labels").cases[0].label_issue
