"""Images whose voxel values no scanner writes: NaN and infinity are refused in one line, not silently segmented."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cmedl

from cmedl.errors import InputError
from cmedl.modality import check_finite_voxels
from cmedl.phantom import make_phantom


def _float_ct(tmp_path: Path, bad: float | None, count: int = 24) -> Path:
    image = sitk.Cast(make_phantom("ct", seed=3, size=64).image, sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(image)
    if bad is not None:
        values.reshape(-1)[values.size // 2 : values.size // 2 + count] = bad
    damaged = sitk.GetImageFromArray(values)
    damaged.CopyInformation(image)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(damaged, str(path))
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("force", [False, True])
def test_segment_refuses_a_ct_with_non_finite_voxels(tmp_path: Path, bad: float, force: bool) -> None:
    path = _float_ct(tmp_path, bad)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    output = tmp_path / "out" / "tumour.seg.nrrd"
    done = run_cmedl("segment", str(path), "-o", str(output), "--progress", "none", *(["--force"] if force else []))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 3 and len(lines) == 1, done.stderr
    assert "ct.nii.gz has 24 voxels" in lines[0] and "NaN or infinite" in lines[0]
    assert not output.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_finite_float_ct_is_segmented(tmp_path: Path) -> None:
    output = tmp_path / "tumour.seg.nrrd"
    done = run_cmedl("segment", str(_float_ct(tmp_path, None)), "-o", str(output), "--progress", "none")
    assert done.returncode == 0, done.stderr
    assert output.is_file()


def test_the_check_counts_every_kind_and_skips_integer_images() -> None:
    values = np.zeros((2, 3, 4), dtype=np.float64)
    values[0, 0, :3] = [np.nan, np.inf, -np.inf]
    with pytest.raises(InputError, match=r"^scan.nii has 3 voxels \(12.50%\) that are NaN or infinite"):
        check_finite_voxels(sitk.GetImageFromArray(values), "scan.nii")
    values[0, 0, :3] = 0.0
    values[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="has 1 voxel "):
        check_finite_voxels(sitk.GetImageFromArray(values), "scan.nii")
    check_finite_voxels(sitk.GetImageFromArray(np.zeros((2, 3, 4), dtype=np.int16)), "scan.nii")
    check_finite_voxels(sitk.GetImageFromArray(np.ones((2, 3, 4), dtype=np.float32)), "scan.nii")
