"""Reading a .nii.gz with one decompression: the same image as SimpleITK's own read, voxel for voxel and in
every geometry field, or SimpleITK's read itself where the file needs it."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_data

from cmedl import niftigz, volumes
from cmedl.errors import InputError
from cmedl.volumes import read_volume

PIXEL_TYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64")


def assert_same_image(ours: sitk.Image, theirs: sitk.Image) -> None:
    assert ours.GetPixelID() == theirs.GetPixelID()
    assert ours.GetSize() == theirs.GetSize()
    assert ours.GetOrigin() == theirs.GetOrigin()
    assert ours.GetSpacing() == theirs.GetSpacing()
    assert ours.GetDirection() == theirs.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs))


def oblique_image(pixel_type: str, shape=(7, 9, 11)) -> sitk.Image:
    values = np.random.default_rng(3).integers(0, 120, size=shape).astype(pixel_type)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-120.5, 33.25, 410.0))
    angle = np.radians(12.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple(rotation.ravel()))
    return image


@pytest.mark.parametrize("pixel_type", PIXEL_TYPES)
def test_every_plain_pixel_type_reads_as_simpleitk_reads_it(pixel_type: str, tmp_path: Path) -> None:
    path = tmp_path / f"ct_{pixel_type}.nii.gz"
    sitk.WriteImage(oblique_image(pixel_type), str(path))
    content = gzip.decompress(path.read_bytes())
    ours = niftigz.image_from_nifti_content(path, content)
    assert ours is not None, "the one-decompression path should take a plain 3D NIfTI"
    assert_same_image(ours, sitk.ReadImage(str(path)))
    assert_same_image(read_volume(path), sitk.ReadImage(str(path)))


def test_the_real_nifti_files_read_as_simpleitk_reads_them() -> None:
    files = sorted(shared_data(".").rglob("*.nii.gz"))
    assert len(files) >= 4
    for path in files:
        content = gzip.decompress(path.read_bytes())
        assert niftigz.image_from_nifti_content(path, content) is not None, path.name
        assert_same_image(read_volume(path), sitk.ReadImage(str(path)))


def nifti1(values: np.ndarray, order: str, datatype: int, slope: float = 0.0, inter: float = 0.0,
           dims: tuple[int, ...] | None = None, qfac: float = 1.0, quaternion: tuple[float, float, float] = (0, 0, 0),
           ) -> bytes:  # fmt: skip
    """A NIfTI-1 file (header, 4 bytes of extension flag, voxels) in byte order ``order``; its qform rotates by
    ``quaternion`` (b, c, d) and ``qfac`` -1 mirrors the slice axis."""
    dims = dims or (3, *values.shape[::-1])
    header = bytearray(348)
    struct.pack_into(order + "i", header, 0, 348)
    struct.pack_into(order + "8h", header, 40, *dims, *([1] * (8 - len(dims))))
    struct.pack_into(order + "2h", header, 70, datatype, values.dtype.itemsize * 8)
    struct.pack_into(order + "8f", header, 76, qfac, 0.8, 0.8, 2.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into(order + "f", header, 108, 352.0)
    struct.pack_into(order + "2f", header, 112, slope, inter)
    struct.pack_into(order + "2h", header, 252, 1, 0)  # qform_code 1 (scanner), sform_code 0
    struct.pack_into(order + "6f", header, 256, *quaternion, -40.0, 25.0, -60.0)
    header[344:348] = b"n+1\0"
    voxels = values.astype(values.dtype.newbyteorder(order)).tobytes()
    return bytes(header) + b"\0\0\0\0" + voxels


@pytest.mark.parametrize(
    "qform",
    [{}, {"qfac": -1.0}, {"quaternion": (0.0, 0.0, 1.0)}, {"qfac": -1.0, "quaternion": (0.1, 0.2, 0.3)}],
    ids=["axes", "mirrored_slices", "rotated_180", "oblique_mirrored"],
)
def test_big_endian_files_read_as_simpleitk_reads_them(qform: dict, tmp_path: Path) -> None:
    values = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 37 - 1000
    path = tmp_path / "big_endian.nii.gz"
    path.write_bytes(gzip.compress(nifti1(values, ">", 4, **qform)))
    theirs = sitk.ReadImage(str(path))
    assert niftigz.image_from_nifti_content(path, gzip.decompress(path.read_bytes())) is not None
    assert_same_image(read_volume(path), theirs)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(theirs), values)


@pytest.mark.parametrize("case", ["scaled", "offset", "four_dimensional", "int64"], ids=lambda case: case)
def test_files_the_fast_path_does_not_reproduce_go_to_simpleitk(case: str, tmp_path: Path) -> None:
    values = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    content = {
        "scaled": lambda: nifti1(values, "<", 4, slope=2.0),
        "offset": lambda: nifti1(values, "<", 4, slope=1.0, inter=-1024.0),
        "four_dimensional": lambda: nifti1(values, "<", 4, dims=(4, 5, 4, 3, 1)),
        "int64": lambda: nifti1(values.astype(np.int64), "<", 1024),
    }[case]()
    path = tmp_path / f"{case}.nii.gz"
    path.write_bytes(gzip.compress(content))
    assert niftigz.image_from_nifti_content(path, content) is None
    ours, theirs = read_volume(path), sitk.ReadImage(str(path))
    if theirs.GetDimension() == 4:
        theirs = theirs[:, :, :, 0]
    assert_same_image(ours, theirs)
    if case == "scaled":
        assert sitk.GetArrayViewFromImage(ours)[1, 2, 3] == 2.0 * values[1, 2, 3]


def test_a_truncated_or_damaged_file_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(oblique_image("int16", shape=(40, 50, 60)), str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated|end early"):
        read_volume(path)
    short = gzip.compress(gzip.decompress(whole)[:-1000])
    path.write_bytes(short)
    with pytest.raises(InputError, match="truncated"):
        read_volume(path)


def test_one_decompression_only_where_memory_allows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass read holds the file and the image at once; with too little memory the input is checked as it
    streams and SimpleITK reads it, as before, and the image is the same."""
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(oblique_image("int16", shape=(20, 30, 40)), str(path))
    needed = 2 * (352 + 20 * 30 * 40 * 2)
    assert niftigz.one_pass_fits(path, available=2 * needed)
    assert not niftigz.one_pass_fits(path, available=2 * needed - 1)
    (tmp_path / "not_gzip.nii.gz").write_bytes(b"plain bytes")
    assert not niftigz.one_pass_fits(tmp_path / "not_gzip.nii.gz", available=1 << 40)
    monkeypatch.setattr(niftigz, "available_ram_bytes", lambda: needed)
    monkeypatch.setattr(
        volumes, "image_from_nifti_content", lambda *args: pytest.fail("no one-pass read without the memory")
    )
    assert_same_image(read_volume(path), sitk.ReadImage(str(path)))
