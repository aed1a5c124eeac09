"""Volume I/O: geometry round trips (oblique included), DICOM series, .seg.nrrd labelmaps, errors, atomic writes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from cmedl.errors import InputError, OutputError
from cmedl.volumes import (
    SegmentInfo,
    atomic_output,
    list_volumes,
    read_segments,
    read_volume,
    stem_of,
    suffix_of,
    write_labelmap,
    write_volume,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIP_NRRD = DATA / "ct_lungmask" / "cip_ct-64.nrrd"
CIP_DICOM = DATA / "ct_lungmask" / "cip_ct-64Dicom"

# NIfTI keeps the geometry in float32 (qform quaternion and sform rows), so an oblique direction or a
# non-round spacing comes back within float32 precision, not bit for bit. NRRD and MetaImage print doubles.
GEOMETRY_TOLERANCE = {".nii.gz": 1e-5, ".nii": 1e-5, ".nrrd": 1e-9, ".nhdr": 1e-9, ".mha": 1e-9, ".mhd": 1e-9}


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(axis)


# A genuinely oblique grid: a rotation about two axes, so no row or column is a signed unit vector.
OBLIQUE = _rotation("z", 35.0) @ _rotation("x", 20.0)


def _image(array: np.ndarray, direction: np.ndarray = OBLIQUE) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin((-123.37, 45.61, -310.25))
    image.SetSpacing((0.7031, 0.7031, 2.5))
    image.SetDirection(tuple(float(v) for v in direction.flatten()))
    return image


def _ct(shape: tuple[int, int, int] = (6, 7, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 3000, size=shape).astype(np.int16)


def _mr(shape: tuple[int, int, int] = (6, 7, 8), seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 1234.5).astype(np.float32)


def _assert_geometry(actual: sitk.Image, expected: sitk.Image, tolerance: float) -> None:
    assert actual.GetSize() == expected.GetSize()
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), rtol=0, atol=tolerance * 100)
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), rtol=0, atol=tolerance)
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), rtol=0, atol=tolerance)


def _leftovers(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith(".") or ".partial" in entry.name)


def test_oblique_direction_is_not_a_permutation():
    # Guards the fixture itself: the round-trip tests only prove something if the grid is really oblique.
    np.testing.assert_allclose(OBLIQUE @ OBLIQUE.T, np.eye(3), atol=1e-12)
    assert np.count_nonzero(np.abs(OBLIQUE) > 1e-6) > 6


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii", ".mhd", ".nhdr"])
@pytest.mark.parametrize("kind", ["ct_int16", "mr_float32"])
def test_round_trip_keeps_voxels_and_oblique_geometry(tmp_path, suffix, kind):
    array = _ct() if kind == "ct_int16" else _mr()
    image = _image(array)
    path = write_volume(image, tmp_path / f"case{suffix}")
    assert path == tmp_path / f"case{suffix}"

    back = read_volume(path)
    assert back.GetDimension() == 3
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    _assert_geometry(back, image, GEOMETRY_TOLERANCE[suffix])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_axis_aligned_geometry_is_exact(tmp_path, suffix):
    # Round values and an identity-like flip survive every format exactly.
    image = sitk.GetImageFromArray(_ct())
    image.SetOrigin((-100.0, 50.0, -300.0))
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    back = read_volume(write_volume(image, tmp_path / f"flip{suffix}"))
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetDirection() == image.GetDirection()


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_detached_header_names_a_visible_voxel_file(tmp_path, suffix):
    image = _image(_ct())
    path = write_volume(image, tmp_path / f"scan{suffix}")
    names = sorted(entry.name for entry in tmp_path.iterdir())
    assert len(names) == 2 and path.name in names
    data_file = next(name for name in names if name != path.name)
    assert data_file.startswith("scan.")
    assert data_file in path.read_text(errors="replace")
    assert _leftovers(tmp_path) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        for suffix in (".nii.gz", ".nrrd", ".mhd"):
            path = write_volume(_image(_ct()), tmp_path / f"perm{suffix}")
            assert path.stat().st_mode & 0o777 == 0o640, suffix
    finally:
        os.umask(previous)


@pytest.mark.skipif(not (CIP_NRRD.is_file() and CIP_DICOM.is_dir()), reason=f"test data not found under {DATA}")
def test_dicom_series_matches_the_same_volume_as_nrrd():
    from_dicom = read_volume(CIP_DICOM)
    from_nrrd = read_volume(CIP_NRRD)
    assert from_dicom.GetSize() == from_nrrd.GetSize() == (64, 64, 79)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(from_nrrd))
    # The NRRD was written from the series with rounded header values: sub-micron agreement is expected.
    np.testing.assert_allclose(from_dicom.GetSpacing(), from_nrrd.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(from_dicom.GetOrigin(), from_nrrd.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(from_dicom.GetDirection(), from_nrrd.GetDirection(), atol=1e-6)


def _label_array(shape: tuple[int, int, int] = (5, 9, 11)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.int16)
    label[1:4, 2:6, 3:8] = 1
    label[2, 7:9, 1:3] = 2
    return label


def test_seg_nrrd_header_and_voxels(tmp_path):
    array = _label_array()
    label = _image(array)
    segments = [
        SegmentInfo(),
        SegmentInfo(name="Satellite nodule", label_value=2, color=(0.1, 0.25, 0.9), terminology="ctx~cat~type~~~~"),
    ]
    path = write_labelmap(label, tmp_path / "case.seg.nrrd", segments)

    header = sitk.ImageFileReader()
    header.SetFileName(str(path))
    header.ReadImageInformation()
    assert header.GetMetaData("Segment0_Name") == "Lung tumour"
    assert header.GetMetaData("Segment0_LabelValue") == "1"
    assert [float(v) for v in header.GetMetaData("Segment0_Color").split()] == list(SegmentInfo().color)
    assert f"TerminologyEntry:{SegmentInfo().terminology}" in header.GetMetaData("Segment0_Tags")
    assert "SCT^108369006^Neoplasm" in header.GetMetaData("Segment0_Tags")
    assert header.GetMetaData("Segment1_Name") == "Satellite nodule"
    assert header.GetMetaData("Segment1_LabelValue") == "2"
    extent = [int(v) for v in header.GetMetaData("Segment0_Extent").split()]
    assert extent == [0, label.GetSize()[0] - 1, 0, label.GetSize()[1] - 1, 0, label.GetSize()[2] - 1]

    assert read_segments(path) == segments
    # The caller's image is not decorated with the segmentation header.
    assert "Segment0_Name" not in label.GetMetaDataKeys()

    back = read_volume(path)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    _assert_geometry(back, label, GEOMETRY_TOLERANCE[".nrrd"])


def test_seg_nrrd_default_segment_is_the_lung_tumour(tmp_path):
    path = write_labelmap(_image(_label_array()), tmp_path / "default.seg.nrrd")
    assert read_segments(path) == [SegmentInfo()]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_plain_labelmaps(tmp_path, suffix):
    array = _label_array()
    label = _image(array.astype(np.float32))  # a float probability-threshold result is cast to uint8
    path = write_labelmap(label, tmp_path / f"label{suffix}")
    back = read_volume(path)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    _assert_geometry(back, label, GEOMETRY_TOLERANCE[suffix])
    assert read_segments(path) == []


@pytest.mark.parametrize("name", ["out.png", "out.txt", "out.dcm", "out"])
def test_unsupported_volume_suffix(tmp_path, name):
    with pytest.raises(OutputError) as caught:
        write_volume(_image(_ct()), tmp_path / name)
    message = str(caught.value)
    assert "\n" not in message and name in message and ".nii.gz" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["label.png", "label.nhdr", "label.vtk"])
def test_unsupported_labelmap_suffix(tmp_path, name):
    with pytest.raises(OutputError, match="unsupported output format"):
        write_labelmap(_image(_label_array()), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "absent.nii.gz"


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n")
    return path


def _folder_without_dicom(tmp_path: Path) -> Path:
    folder = tmp_path / "no_dicom"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here\n")
    return folder


@pytest.mark.parametrize("make", [_missing, _empty, _text, _folder_without_dicom])
def test_bad_inputs_raise_one_line_input_error(tmp_path, capfd, make):
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        read_volume(path)
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message
    # Nothing else on stderr: a command line reports exactly the one line of the error.
    assert capfd.readouterr().err == ""


def test_read_segments_of_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="absent.seg.nrrd"):
        read_segments(tmp_path / "absent.seg.nrrd")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mhd", ".seg.nrrd"])
def test_failed_write_leaves_nothing(tmp_path, suffix):
    # A label-map pixel type cannot be stored by any file format: the writer fails after the temporary
    # file was made, which is exactly the case the atomic write must clean up.
    unstorable = sitk.Image(4, 4, 3, sitk.sitkLabelUInt8)
    with pytest.raises(OutputError) as caught:
        write_volume(unstorable, tmp_path / f"bad{suffix}")
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_file(tmp_path):
    path = write_volume(_image(_ct()), tmp_path / "keep.nrrd")
    before = path.read_bytes()
    with pytest.raises(OutputError):
        write_volume(sitk.Image(4, 4, 3, sitk.sitkLabelUInt8), path)
    assert path.read_bytes() == before
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["keep.nrrd"]


def test_destination_that_is_a_folder(tmp_path):
    target = tmp_path / "taken.nii.gz"
    target.mkdir()
    with pytest.raises(OutputError, match="taken.nii.gz"):
        write_volume(_image(_ct()), target)
    assert [entry.name for entry in tmp_path.iterdir()] == ["taken.nii.gz"]
    assert target.is_dir() and list(target.iterdir()) == []


def test_destination_under_a_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    with pytest.raises(OutputError, match="blocker"):
        write_labelmap(_image(_label_array()), blocker / "out.seg.nrrd")
    assert [entry.name for entry in tmp_path.iterdir()] == ["blocker"]


def test_atomic_output_removes_the_temporary_file_when_the_writer_raises(tmp_path):
    seen: list[Path] = []
    with pytest.raises(ZeroDivisionError), atomic_output(tmp_path / "report.json") as temp:
        seen.append(temp)
        temp.write_text("{half")
        raise ZeroDivisionError
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".") and ".partial" in seen[0].name
    assert list(tmp_path.iterdir()) == []


def test_every_output_is_flushed_to_disk_under_its_temporary_name_before_the_rename(tmp_path, monkeypatch):
    """A crash just after the rename must not leave the final name on bytes that never reached the disk."""
    import os

    from cmedl import filebase

    flushed: list[tuple[str, bool, int]] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        name = os.readlink(f"/proc/self/fd/{descriptor}")
        flushed.append((Path(name).name, (tmp_path / "vol.nii.gz").exists(), os.fstat(descriptor).st_size))
        real_fsync(descriptor)

    monkeypatch.setattr(filebase.os, "fsync", recording_fsync)
    write_volume(_image(_mr()), tmp_path / "vol.nii.gz")
    assert len(flushed) == 1
    name, final_existed, size = flushed[0]
    assert ".partial" in name and not final_existed and size == (tmp_path / "vol.nii.gz").stat().st_size > 0


def test_successful_writes_leave_no_temporary_files(tmp_path):
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        write_volume(_image(_mr()), tmp_path / f"vol{suffix}")
    write_labelmap(_image(_label_array()), tmp_path / "lab.seg.nrrd")
    assert _leftovers(tmp_path) == []
    assert (tmp_path / "lab.seg.nrrd").is_file()


def _write_dicom_series(folder: Path, slices: int = 3) -> None:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # otherwise every slice gets a series UID of its own
    for z in range(slices):
        plane = sitk.GetImageFromArray(np.full((4, 5), z * 10, dtype=np.int16))
        plane.SetMetaData("0008|0060", "CT")
        plane.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.7.1")
        plane.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.7.2")
        plane.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.7.3.{z + 1}")
        plane.SetMetaData("0020|0013", str(z + 1))
        plane.SetMetaData("0020|0032", f"0\\0\\{2.5 * z}")
        plane.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(plane)


def test_list_volumes(tmp_path, capfd):
    small = _image(np.zeros((2, 3, 4), dtype=np.int16))
    for name in ("b_case.nrrd", "a_case.nii.gz", "c_case.mha", "c_case.seg.nrrd", ".hidden.nii.gz"):
        write_volume(small, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a volume\n")
    (tmp_path / "empty_folder").mkdir()
    _write_dicom_series(tmp_path / "d_series")
    _write_dicom_series(tmp_path / ".cache")

    found = list_volumes(tmp_path)
    expected = ["a_case.nii.gz", "b_case.nrrd", "c_case.mha", "c_case.seg.nrrd", "d_series"]
    assert [path.name for path in found] == expected
    assert all(path.parent == tmp_path for path in found)
    assert capfd.readouterr().err == ""

    series = read_volume(tmp_path / "d_series")
    assert series.GetSize() == (5, 4, 3)
    assert series.GetSpacing()[2] == pytest.approx(2.5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(series)[:, 0, 0], [0, 10, 20])


def test_list_volumes_of_a_file(tmp_path):
    path = write_volume(_image(_ct()), tmp_path / "one.nrrd")
    with pytest.raises(InputError, match="not a folder"):
        list_volumes(path)


@pytest.mark.parametrize(
    ("path", "suffix", "stem"),
    [
        ("case_001.nii.gz", ".nii.gz", "case_001"),
        ("/data/v1.2/case_001.nii", ".nii", "case_001"),
        ("Case.SEG.NRRD", ".seg.nrrd", "Case"),
        ("labels/lung.seg.nrrd", ".seg.nrrd", "lung"),
        ("scan.v2.nrrd", ".nrrd", "scan.v2"),
        ("scan.mha", ".mha", "scan"),
        ("header.nhdr", ".nhdr", "header"),
        ("README", "", "README"),
    ],
)
def test_suffix_and_stem(path, suffix, stem):
    assert suffix_of(path) == suffix
    assert stem_of(path) == stem
    assert stem_of(Path(path)) == stem


@pytest.mark.parametrize("fmt", ["nrrd", "png"])
def test_2d_image_reads_as_one_slice_volume(tmp_path, fmt):
    plane = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9) * 3
    if fmt == "png":
        path = tmp_path / "slice.png"
        Image.fromarray(plane).save(path)
        spacing, origin = (1.0, 1.0), (0.0, 0.0)
    else:
        path = tmp_path / "slice.nrrd"
        image = sitk.GetImageFromArray(plane)
        spacing, origin = (0.625, 0.8), (-12.0, 30.5)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    assert volume.GetDimension() == 3
    assert volume.GetSize() == (9, 6, 1)
    assert volume.GetSpacing()[:2] == pytest.approx(spacing)
    assert volume.GetOrigin()[:2] == pytest.approx(origin)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume)[0], plane)


def test_a_folder_of_two_dicom_series_reads_the_larger_and_says_so(tmp_path: Path) -> None:
    """A scout or a second reconstruction beside the axial CT: the series with most slices is read, and the
    choice is not silent (a note on the image, in the segment summary and in the progress log)."""
    import json
    import shutil

    from conftest import run_cmedl

    from cmedl.volumes import dicom_series_note

    mixed = tmp_path / "mixed"
    shutil.copytree(CIP_DICOM, mixed)
    for index, path in enumerate(sorted((DATA / "ct_nolabel" / "dcmqi_ct-3slice").iterdir())):
        shutil.copy(path, mixed / f"other_{index}.dcm")
    image = read_volume(mixed)
    assert image.GetSize() == (64, 64, 79)
    note = dicom_series_note(image)
    assert note is not None and "mixed holds 2 DICOM series" in note and "79 slices" in note
    assert note.endswith("left out 3 slices")
    assert dicom_series_note(read_volume(CIP_DICOM)) is None

    done = run_cmedl("segment", str(mixed), "-o", str(tmp_path / "t.seg.nrrd"), "--json", "--progress", "text")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["input_note"] == note
    assert f"note: {note}" in done.stderr
