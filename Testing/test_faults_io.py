"""Faults of issue 12 around files: outputs that are not complete, inputs that are not what they claim.

Each test reproduces one fault found by trying bad inputs (a full disk that SimpleITK's NIfTI writer does
not report, truncated or damaged inputs read as if complete, impossible geometry, DICOM series with a
missing, duplicate or truncated slice, model cards and segment options that ended in exit 1 or nothing at
all) and checks the documented outcome: one line, the documented exit code, nothing left half-written.
"""

from __future__ import annotations

import gzip
import math
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import SafetensorError

from cmedl.catalogue import add_model
from cmedl.cli import main
from cmedl.errors import InputError, ModelFileError, OutputError
from cmedl.modelfile import ModelCard, check_model_file, load_model, read_model_card, save_model
from cmedl.nets import build_segmentor
from cmedl.phantom import make_phantom
from cmedl.segment import SegmentOptions
from cmedl.volumes import (
    OutputSet,
    atomic_output,
    read_volume,
    verify_written,
    write_labelmap,
    write_volume,
)

REAL_WRITE_IMAGE = sitk.WriteImage


def _ct_like(shape: tuple[int, int, int] = (16, 128, 128), seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, shape).astype(np.int16))
    image.SetSpacing((0.7, 0.7, 2.5))
    return image


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _everything_in(folder: Path) -> list[str]:
    """Every file below ``folder`` (hidden temporary files included), relative and sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def _truncating_writer(when: Callable[[Path], bool] = lambda path: True) -> Callable[..., None]:
    """A stand-in for ``sitk.WriteImage`` that behaves like SimpleITK's NIfTI writer on a full disk.

    It writes the file, then cuts the voxel data to half (the header file of a header + voxel-file pair
    stays whole) and returns without an error. Files for which ``when(path)`` is false are written whole.
    """

    def write(image: sitk.Image, name: str, compress: bool = False, *args: object) -> None:
        REAL_WRITE_IMAGE(image, name, compress, *args)
        path = Path(name)
        if not when(path):
            return
        targets = [path]
        if path.name.endswith((".mhd", ".nhdr")):
            targets = [entry for entry in path.parent.iterdir() if entry != path]
        for target in targets:
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 2])

    return write


# -- full disk ----------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real full disk. Skipped where mounting is not permitted (not root, a container)."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_full_disk_is_an_output_error_not_a_finished_file(full_disk, capfd, suffix):
    # SimpleITK's NIfTI writer prints an error on a full disk and returns; the file looked finished.
    target = full_disk / f"label{suffix}"
    labels = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 2, (16, 256, 256)).astype(np.uint8))
    with pytest.raises(OutputError, match="no space left on the disk") as caught:
        write_labelmap(labels, target)  # 1 MiB of voxels, at least 128 KiB compressed: more than the disk
    assert "\n" not in str(caught.value)
    assert _everything_in(full_disk) == []
    assert capfd.readouterr().err == ""  # ITK's own complaint is held back: the error is the one line


def test_a_full_disk_under_a_volume_write(full_disk):
    with pytest.raises(OutputError, match="pmri.nii.gz"):
        write_volume(_ct_like(), full_disk / "pmri.nii.gz")  # what `cmedl translate -o x.nii.gz` writes
    assert _everything_in(full_disk) == []


def test_a_model_file_on_a_full_disk_is_an_output_error(full_disk):
    # safetensors raises its own error type on a full disk: it ended as "unexpected error", exit 1.
    network = build_segmentor("unet", in_channels=1, num_classes=2, base_channels=8)
    with pytest.raises(OutputError, match="cannot write"):
        save_model(full_disk / "model.safetensors", network, ModelCard(name="m", architecture="unet"))
    assert _everything_in(full_disk) == []


def test_a_safetensors_failure_inside_atomic_output_is_an_output_error(tmp_path):
    # The OS error inside safetensors' text ("os error 28") is said in words, like an OSError's.
    with pytest.raises(OutputError, match="no space left on"), atomic_output(tmp_path / "m.safetensors") as temp:
        temp.write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _everything_in(tmp_path) == []


# -- writes that fail without an error ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd"])
def test_a_silently_truncated_write_is_refused_and_leaves_nothing(tmp_path, monkeypatch, capfd, suffix):
    monkeypatch.setattr(sitk, "WriteImage", _truncating_writer())
    image = sitk.Cast(_ct_like() > 0, sitk.sitkUInt8) if suffix == ".seg.nrrd" else _ct_like()
    writer = write_labelmap if suffix == ".seg.nrrd" else write_volume
    with pytest.raises(OutputError) as caught:
        writer(image, tmp_path / f"out{suffix}")
    assert f"out{suffix}" in str(caught.value) and "\n" not in str(caught.value)
    assert _everything_in(tmp_path) == []
    assert capfd.readouterr().err == ""


def test_verify_written_accepts_complete_files_of_every_format(tmp_path):
    image = _ct_like((4, 9, 11))
    for suffix in (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd"):
        path = write_volume(image, tmp_path / f"v{suffix}")
        verify_written(image, path)
    with pytest.raises(OutputError, match="reads back as size"):
        verify_written(_ct_like((5, 9, 11)), tmp_path / "v.nii")


# -- commands with several outputs --------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest_ct(tmp_path_factory) -> Path:
    """A small phantom chest CT file (64 x 64 in-plane) that `cmedl lungs` finds lungs in."""
    path = tmp_path_factory.mktemp("chest") / "chest.nii.gz"
    write_volume(make_phantom("ct", 3, size=64).image, path)
    return path


def test_lungs_removes_its_first_output_when_the_second_fails(chest_ct, tmp_path, capfd):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    lungs_out, roi_out = tmp_path / "lungs.nii.gz", blocker / "roi.nii.gz"
    code = main(["lungs", str(chest_ct), "--lungs-out", str(lungs_out), "--roi-out", str(roi_out)])
    assert code == 6
    assert "blocker" in _one_line(capfd.readouterr().err)
    assert _everything_in(tmp_path) == ["blocker"]


def test_lungs_with_a_silently_truncated_second_output(chest_ct, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sitk, "WriteImage", _truncating_writer(lambda path: "roi" in path.name))
    lungs_out, roi_out = tmp_path / "lungs.nii", tmp_path / "roi.nii"
    code = main(["lungs", str(chest_ct), "--lungs-out", str(lungs_out), "--roi-out", str(roi_out)])
    assert code == 6
    assert "roi.nii" in _one_line(capfd.readouterr().err)
    assert _everything_in(tmp_path) == []


def test_lungs_on_a_full_disk(chest_ct, tmp_path, full_disk, capfd):
    lungs_out, roi_out = tmp_path / "lungs.nii.gz", full_disk / "roi.nii"
    code = main(["lungs", str(chest_ct), "--lungs-out", str(lungs_out), "--roi-out", str(roi_out)])
    assert code == 6
    _one_line(capfd.readouterr().err)
    assert not lungs_out.exists() and _everything_in(full_disk) == []


def test_phantom_keeps_complete_cases_only(tmp_path, monkeypatch, capfd):
    # The label of the second case is cut short without an error: that case must vanish entirely.
    broken = _truncating_writer(lambda path: "ct_0001" in path.name and path.parent.name == "labels")
    monkeypatch.setattr(sitk, "WriteImage", broken)
    out = tmp_path / "data"
    code = main(["phantom", str(out), "--ct", "2", "--mr", "0", "--seed", "3", "--size", "64", "--progress", "none"])
    assert code == 6
    assert "ct_0001" in _one_line(capfd.readouterr().err)
    assert _everything_in(out) == [
        "ct/images/ct_0000.nii.gz",
        "ct/instances/ct_0000.nii.gz",
        "ct/labels/ct_0000.nii.gz",
    ]
    for name in _everything_in(out):
        read_volume(out / name)  # complete, readable files only


def test_output_set_renames_all_or_nothing(tmp_path):
    image = _ct_like((3, 4, 5))
    with pytest.raises(ZeroDivisionError), OutputSet():
        write_volume(image, tmp_path / "a.nrrd")
        write_volume(image, tmp_path / "b.mhd")
        with atomic_output(tmp_path / "c.json") as temp:
            temp.write_text("{}")
        raise ZeroDivisionError
    assert _everything_in(tmp_path) == []
    with OutputSet() as outputs:
        write_volume(image, tmp_path / "a.nrrd")
        with OutputSet():  # a nested set hands its files to the outer one
            write_volume(image, tmp_path / "b.mhd")
        assert all(name.startswith(".") for name in _everything_in(tmp_path))  # nothing under final names yet
        assert [path.name for path in outputs.paths] == ["a.nrrd", "b.mhd"]
    written = _everything_in(tmp_path)
    assert {"a.nrrd", "b.mhd"} <= set(written) and len(written) == 3  # and b.mhd's voxel file
    assert not any(name.startswith(".") for name in written)
    with pytest.raises(OutputError, match="twice"), OutputSet():
        write_volume(image, tmp_path / "d.nrrd")
        write_volume(image, tmp_path / "d.nrrd")
    assert _everything_in(tmp_path) == written


# -- inputs that hold less than their header promises --------------------------------------------------


def _written(tmp_path: Path, name: str, compress: bool = False) -> tuple[Path, Path]:
    """An image file and the file holding its voxels (the same file unless header and voxels are apart)."""
    path = tmp_path / name
    REAL_WRITE_IMAGE(_ct_like(), str(path), compress)
    data = [entry for entry in tmp_path.iterdir() if entry != path]
    return path, (data[0] if data else path)


@pytest.mark.parametrize("fraction", [0.9, 0.5])
@pytest.mark.parametrize(
    "name, compress",
    [("ct.nii", False), ("ct.nii.gz", True), ("ct.nrrd", False), ("ct.nhdr", False), ("ct.mha", False),
     ("ct.mhd", False), ("ct.mha", True)],
)  # fmt: skip
def test_truncated_inputs_are_refused(tmp_path, capfd, name, compress, fraction):
    path, data = _written(tmp_path, name, compress)
    content = data.read_bytes()
    data.write_bytes(content[: int(len(content) * fraction)])
    with pytest.raises(InputError, match="truncated") as caught:
        read_volume(path)
    assert name in str(caught.value) and "\n" not in str(caught.value)
    assert capfd.readouterr().err == ""  # MetaIO's "data not read completely" stays out


def test_a_damaged_gzip_input_is_refused(tmp_path):
    path, _ = _written(tmp_path, "ct.nii.gz", True)
    content = bytearray(path.read_bytes())
    content[len(content) // 2 : len(content) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(content))
    with pytest.raises(InputError, match="compressed data"):
        read_volume(path)


def test_a_truncated_input_ends_segment_with_exit_3(tmp_path, capfd):
    path, _ = _written(tmp_path, "ct.nii")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.9)])
    code = main(["segment", str(path), "-o", str(tmp_path / "tumour.nii.gz"), "--progress", "none"])
    assert code == 3
    assert "truncated" in _one_line(capfd.readouterr().err)
    assert not (tmp_path / "tumour.nii.gz").exists()


def _nifti_with_pixdim(tmp_path: Path, value: float, compressed: bool) -> Path:
    path = tmp_path / "ct.nii"
    REAL_WRITE_IMAGE(_ct_like((4, 8, 8)), str(path))
    header = bytearray(path.read_bytes())
    header[80:84] = struct.pack("<f", value)  # pixdim[1], the x spacing
    if compressed:
        path.unlink()
        path = tmp_path / "ct.nii.gz"
        path.write_bytes(gzip.compress(bytes(header)))
    else:
        path.write_bytes(bytes(header))
    return path


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -0.7])
@pytest.mark.parametrize("compressed", [False, True])
def test_a_nifti_pixdim_that_is_not_a_spacing_is_refused(tmp_path, value, compressed):
    # SimpleITK reads such a file with 1 mm in its place.
    with pytest.raises(InputError, match=r"pixdim\[1\]"):
        read_volume(_nifti_with_pixdim(tmp_path, value, compressed))


@pytest.mark.parametrize("spacing", [1e6, 1e-6, 60.0, 0.005])
def test_impossible_spacings_are_refused(tmp_path, capfd, spacing):
    image = _ct_like((4, 8, 8))
    image.SetSpacing((0.7, 0.7, spacing))
    REAL_WRITE_IMAGE(image, str(tmp_path / "ct.nrrd"))
    code = main(["lungs", str(tmp_path / "ct.nrrd")])
    assert code == 3  # was exit 1 ("unexpected error") or a run on nonsense geometry
    assert "spacing" in _one_line(capfd.readouterr().err)


@pytest.mark.parametrize("matrix", ["1 0 0 0 1 0 0 1 0", "1 0 0 0 1 0 0 0 nan"])
def test_a_singular_or_non_finite_direction_is_refused(tmp_path, matrix):
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        f"TransformMatrix = {matrix}\nOffset = 0 0 0\nElementSpacing = 1 1 1\nDimSize = 6 5 4\n"
        "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path = tmp_path / "ct.mha"
    path.write_bytes(header.encode() + bytes(6 * 5 * 4 * 2))
    with pytest.raises(InputError, match="direction"):
        read_volume(path)


# -- DICOM series ------------------------------------------------------------------------------------


def _dicom_series(folder: Path, heights: list[float]) -> list[Path]:
    """One CT series, a 32 x 32 slice per entry of ``heights`` (mm along the slice normal); returns the files."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # otherwise every slice gets a series UID of its own
    files = []
    for index, height in enumerate(heights):
        plane = sitk.GetImageFromArray(np.full((32, 32), index * 10, dtype=np.int16))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.12.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.12.2",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.12.3.{index + 1}",
            "0020|0013": str(index + 1),
            "0020|0032": f"-10\\-20\\{height}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.8\\0.8",
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        files.append(folder / f"slice{index:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(plane)
    return files


@pytest.mark.parametrize(
    "heights, words, culprit",
    [
        ([0.0, 2.5, 5.0, 10.0, 12.5, 15.0], "1 missing slice", "slice002.dcm and slice003.dcm"),
        ([0.0, 2.5, 5.0, 5.0, 7.5, 10.0], "same position", "slice002.dcm and slice003.dcm"),
        ([0.0, 2.5, 5.0, 6.5, 9.0, 11.5], "uneven slice spacing", "slice002.dcm and slice003.dcm"),
    ],
)
def test_dicom_series_with_missing_duplicate_or_uneven_slices_are_refused(tmp_path, capfd, heights, words, culprit):
    regular = read_volume(_dicom_series(tmp_path / "regular", [0.0, 2.5, 5.0, 7.5, 10.0])[0].parent)
    assert regular.GetSize() == (32, 32, 5) and regular.GetSpacing()[2] == pytest.approx(2.5)
    # ITK read these with the missing slice left out and one averaged spacing (or a slice twice): exit 0.
    folder = _dicom_series(tmp_path / "series", heights)[0].parent
    code = main(["lungs", str(folder)])
    assert code == 3
    line = _one_line(capfd.readouterr().err)  # ITK's "non uniform sampling" warning stays out
    assert words in line and culprit in line


@pytest.mark.parametrize("fraction", [0.999, 0.5])
def test_a_dicom_series_with_a_truncated_slice_is_refused(tmp_path, fraction):
    files = _dicom_series(tmp_path / "series", [0.0, 2.5, 5.0, 7.5, 10.0])
    content = files[2].read_bytes()
    files[2].write_bytes(content[: int(len(content) * fraction)])
    with pytest.raises(InputError, match="slice002.dcm .*truncated"):
        read_volume(files[0].parent)


def test_an_empty_slice_file_is_named_not_read_as_a_missing_slice(tmp_path):
    files = _dicom_series(tmp_path / "series", [0.0, 2.5, 5.0, 7.5, 10.0])
    files[2].write_bytes(b"")  # a copy that never finished
    with pytest.raises(InputError, match=r"slice file slice002.dcm is empty \(0 bytes\)"):
        read_volume(files[0].parent)
    (files[0].parent / "notes.txt").write_bytes(b"")  # an empty file of another kind is no slice
    files[2].unlink()
    with pytest.raises(InputError, match="1 missing slice"):
        read_volume(files[0].parent)


# -- model cards ---------------------------------------------------------------------------------------


def _model(path: Path, network_channels: int = 2, **card_values: object) -> Path:
    """A tiny U-Net model file whose card holds ``card_values`` as given (saving checks nothing)."""
    torch.manual_seed(0)
    network = build_segmentor("unet", in_channels=1, num_classes=2, base_channels=network_channels)
    card = ModelCard(name="faulty", architecture="unet", architecture_options={"base_channels": 2}, patch_size=64)
    return save_model(path, network, ModelCard.from_dict({**card.to_dict(), **card_values}))


BAD_CARDS = [
    ({"patch_size": 0}, "patch_size 0"),
    ({"patch_size": 100000}, "patch_size"),
    ({"spacing_mm": [0.0, 0.0]}, "spacing_mm"),
    ({"spacing_mm": [math.nan, 1.0]}, "spacing_mm"),
    ({"spacing_mm": [1e6, 1e6]}, "spacing_mm"),
    ({"hu_window": [500.0, 500.0]}, "empty or reversed"),
    ({"hu_window": [500.0, -1000.0]}, "empty or reversed"),
    ({"hu_window": [math.nan, 500.0]}, "hu_window"),
    ({"architecture_options": {"base_channels": 10**6}}, "base_channels"),
    ({"num_classes": 1}, "num_classes"),
    ({"labels": [{"value": 2, "name": "x", "color": [1, 0, 0], "terminology": ""}]}, "label value 2"),
    ({"labels": [{"value": -1, "name": "x", "color": [1, 0, 0], "terminology": ""}]}, "label value -1"),
    ({"labels": [{"value": 0.5, "name": "x", "color": [1, 0, 0], "terminology": ""}]}, "label value 0.5"),
]


@pytest.mark.parametrize("values, words", BAD_CARDS, ids=[words for _, words in BAD_CARDS])
def test_unusable_model_cards_are_refused_on_load(tmp_path, values, words):
    path = _model(tmp_path / "bad.safetensors", **values)
    with pytest.raises(ModelFileError, match=words) as caught:
        read_model_card(path)
    assert "bad.safetensors" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ModelFileError):
        load_model(path)


def test_info_on_an_unusable_card_exits_4(tmp_path, capfd):
    path = _model(tmp_path / "bad.safetensors", hu_window=[500.0, 500.0])  # was a ZeroDivisionError, exit 1
    assert main(["info", str(path)]) == 4
    assert "hu_window" in _one_line(capfd.readouterr().err)


def test_segment_with_a_reversed_window_model_exits_4(tmp_path, capfd):
    # A reversed HU window inverted the image and segmented it: exit 0 with a wrong result.
    model = _model(tmp_path / "reversed.safetensors", hu_window=[500.0, -1000.0])
    ct = tmp_path / "ct.nrrd"
    REAL_WRITE_IMAGE(_ct_like((4, 16, 16)), str(ct))
    code = main(["segment", str(ct), "-o", str(tmp_path / "t.nii.gz"), "--model", str(model), "--progress", "none"])
    assert code == 4
    assert "reversed" in _one_line(capfd.readouterr().err)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("CMEDL_HOME", str(path))
    monkeypatch.delenv("CMEDL_CATALOGUE", raising=False)
    return path


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda folder: _model(folder / "shapes.safetensors", network_channels=4), "do not match"),
        (lambda folder: _model(folder / "arch.safetensors", architecture="vnet"), "cannot build"),
        (lambda folder: _model(folder / "window.safetensors", hu_window=[500.0, -1000.0]), "reversed"),
    ],
    ids=["wrong tensor shapes", "unknown architecture", "reversed window"],
)
def test_models_add_refuses_files_that_cannot_be_loaded(tmp_path, home, capfd, make, words):
    path = make(tmp_path)
    assert main(["models", "add", str(path)]) == 4
    assert words in _one_line(capfd.readouterr().err)
    assert not (home / "models").exists() or _everything_in(home / "models") == []
    with pytest.raises(ModelFileError, match=words):
        add_model(path, check=check_model_file)
    # The same command registers a sound file.
    assert main(["models", "add", str(_model(tmp_path / "good.safetensors"))]) == 0
    assert _everything_in(home / "models") == ["good.safetensors"]


# -- segment options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, words",
    [
        ({"roi_margin_mm": math.inf}, "ROI margin"),
        ({"roi_margin_mm": math.nan}, "ROI margin"),
        ({"roi_margin_mm": 501.0}, "ROI margin"),
        ({"lung_threshold_hu": math.nan}, "lung threshold"),
        ({"probability_threshold": 1.0}, "probability threshold"),
        ({"probability_threshold": math.nan}, "probability threshold"),
        ({"batch_size": 100_000_000}, "batch size"),
        ({"batch_size": 0}, "batch size"),
        ({"overlap": 1.0}, "overlap"),
    ],
)
def test_segment_options_validate(change, words):
    assert SegmentOptions().validate() == SegmentOptions()
    with pytest.raises(InputError, match=words):
        SegmentOptions(**change).validate()


@pytest.mark.parametrize(
    "flags",
    [["--roi-margin", "inf"], ["--roi-margin", "nan"], ["--lung-threshold", "nan"], ["--batch-size", "100000000"]],
)
def test_segment_refuses_unusable_options_with_exit_3(tmp_path, capfd, flags):
    ct = tmp_path / "ct.nrrd"
    REAL_WRITE_IMAGE(_ct_like((4, 16, 16)), str(ct))
    code = main(["segment", str(ct), "-o", str(tmp_path / "t.nii.gz"), "--progress", "none", *flags])
    assert code == 3  # --roi-margin inf was exit 1; a huge batch ran minutes before running out of memory
    _one_line(capfd.readouterr().err)
