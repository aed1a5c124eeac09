"""The inference pipeline: every voxel back where it belongs, bad inputs refused, nothing half-written."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cmedl, shared_data

from cmedl.errors import CancelledError, NotCTError
from cmedl.lungs import detect_lungs
from cmedl.metrics import dice
from cmedl.modelfile import LoadedModel, ModelCard, save_model
from cmedl.nets import build_segmentor
from cmedl.phantom import make_phantom
from cmedl.progress import CallbackProgress
from cmedl.segment import Segmenter, SegmentOptions, segment_file
from cmedl.volumes import read_segments, read_volume, same_geometry, write_volume

THRESHOLD_HU = -200.5
HU_WINDOW = (-1000.0, 500.0)


class ThresholdNetwork(torch.nn.Module):
    """Labels every pixel above THRESHOLD_HU: a network whose answer is known for any input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = HU_WINDOW
        level = (THRESHOLD_HU - low) * 2.0 / (high - low) - 1.0
        margin = (x - level) * 1000.0
        return torch.cat([-margin, margin], dim=1)


def threshold_model(spacing_mm: tuple[float, float], patch: int = 64) -> LoadedModel:
    card = ModelCard(
        name="threshold", architecture="test", hu_window=HU_WINDOW, spacing_mm=spacing_mm, patch_size=patch
    )
    return LoadedModel(network=ThresholdNetwork(), card=card, path=Path("threshold"), sha256="")


@pytest.fixture(scope="module")
def phantom_ct() -> sitk.Image:
    return make_phantom("ct", seed=5, size=128).image


def expected_label(ct: sitk.Image) -> np.ndarray:
    roi = sitk.GetArrayFromImage(detect_lungs(ct).roi_mask).astype(bool)
    return (sitk.GetArrayFromImage(ct) > THRESHOLD_HU) & roi


def segment_with(model: LoadedModel, ct: sitk.Image) -> sitk.Image:
    return Segmenter(model, SegmentOptions(device="cpu", batch_size=3)).segment(ct).label


def test_tiling_puts_every_voxel_back_without_resampling(phantom_ct: sitk.Image) -> None:
    model = threshold_model(phantom_ct.GetSpacing()[:2])
    label = segment_with(model, phantom_ct)
    assert same_geometry(label, phantom_ct, tolerance=0)
    assert label.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label).astype(bool), expected_label(phantom_ct))


def test_a_reoriented_copy_gives_the_same_voxels_in_physical_space(phantom_ct: sitk.Image) -> None:
    model = threshold_model(phantom_ct.GetSpacing()[:2])
    reference = sitk.GetArrayFromImage(segment_with(model, phantom_ct))
    for orientation in ("RAS", "PSR"):
        flipped = sitk.DICOMOrient(phantom_ct, orientation)
        label = segment_with(model, flipped)
        assert same_geometry(label, flipped, tolerance=0), orientation
        back = sitk.GetArrayFromImage(sitk.DICOMOrient(label, "LPS"))
        np.testing.assert_array_equal(back, reference, err_msg=orientation)


def test_an_oblique_grid_is_kept_exactly(phantom_ct: sitk.Image) -> None:
    angle = np.deg2rad(12.0)
    oblique = sitk.Image(phantom_ct)
    oblique.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    model = threshold_model(phantom_ct.GetSpacing()[:2])
    label = segment_with(model, oblique)
    assert label.GetDirection() == oblique.GetDirection() and label.GetOrigin() == oblique.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label).astype(bool), expected_label(oblique))


def test_in_plane_resampling_there_and_back_neither_shifts_nor_loses_voxels(phantom_ct: sitk.Image) -> None:
    spacing = phantom_ct.GetSpacing()
    exact = expected_label(phantom_ct)
    for factor in (0.5, 1.7):
        model = threshold_model((spacing[0] * factor, spacing[1] * factor))
        label = sitk.GetArrayFromImage(segment_with(model, phantom_ct)).astype(bool)
        assert dice(label, exact) > 0.95, factor
        # in-plane centroid (rows, columns): a half-pixel convention error would move it by ~0.5
        shift = np.array(np.nonzero(label)).mean(axis=1)[1:] - np.array(np.nonzero(exact)).mean(axis=1)[1:]
        assert np.abs(shift).max() < 0.2, (factor, shift)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    card = ModelCard(
        name="tiny",
        architecture="unet",
        architecture_options={"base_channels": 4},
        spacing_mm=(3.0, 3.0),
        patch_size=64,
    )
    save_model(path, build_segmentor("unet", base_channels=4), card)
    return path


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory, phantom_ct: sitk.Image) -> Path:
    return write_volume(phantom_ct, tmp_path_factory.mktemp("ct") / "chest.nii.gz")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_segment_file_writes_a_named_segment_and_leaves_the_input_alone(
    phantom_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    before = _sha256(phantom_file)
    output = tmp_path / "result.seg.nrrd"
    events: list[dict] = []
    summary = segment_file(
        phantom_file, output, tiny_model, SegmentOptions(device="cpu"), CallbackProgress(events.append)
    )
    assert _sha256(phantom_file) == before
    label = read_volume(output)
    assert same_geometry(label, read_volume(phantom_file))
    assert [segment.name for segment in read_segments(output)] == ["Lung tumour"]
    assert summary["output"] == str(output) and summary["tumour_volume_ml"] >= 0
    voxel_ml = np.prod(label.GetSpacing()) / 1000
    assert summary["tumour_volume_ml"] == pytest.approx(np.count_nonzero(sitk.GetArrayFromImage(label)) * voxel_ml)
    steps = [e for e in events if e["event"] == "progress" and e["stage"] == "segment"]
    assert [e["done"] for e in steps] == list(range(steps[0]["total"] + 1))
    assert [p.name for p in tmp_path.iterdir()] == ["result.seg.nrrd"]


def test_cancel_stops_the_run_and_writes_nothing(phantom_file: Path, tiny_model: Path, tmp_path: Path) -> None:
    cancel = threading.Event()

    def listener(event: dict) -> None:
        if event["event"] == "progress" and event["stage"] == "segment" and event["done"] == 2:
            cancel.set()

    with pytest.raises(CancelledError):
        segment_file(phantom_file, tmp_path / "out.nii.gz", tiny_model, SegmentOptions(device="cpu"),
                     CallbackProgress(listener, cancel=cancel))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_an_mr_image_is_refused_unless_forced(tiny_model: Path) -> None:
    mr = read_volume(shared_data("mri/totalseg_example_mr_sm.nii.gz"))
    model = threshold_model((3.0, 3.0))
    with pytest.raises(NotCTError):
        Segmenter(model, SegmentOptions(device="cpu")).segment(mr)


def _single_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("cmedl: error:")
    return lines[0]


def test_command_line_outcomes_and_exit_codes(phantom_file: Path, tiny_model: Path, tmp_path: Path) -> None:
    ok = run_cmedl("segment", str(phantom_file), "-o", str(tmp_path / "ok.nii.gz"), "--model", str(tiny_model),
                   "--device", "cpu", "--progress", "json")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    events = [json.loads(line) for line in ok.stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["result"]["output"] == str(tmp_path / "ok.nii.gz")

    abdomen = shared_data("ct_nolabel/totalseg_example_ct_dicom")
    out = tmp_path / "abdomen.nii.gz"
    result = run_cmedl("segment", str(abdomen), "-o", str(out), "--model", str(tiny_model), "--device", "cpu")
    assert result.returncode == 2
    assert "no lungs found" in _single_error_line(result.stderr)
    assert not out.exists()

    mr = shared_data("mri/totalseg_example_mr_sm.nii.gz")
    result = run_cmedl("segment", str(mr), "-o", str(tmp_path / "mr.nii.gz"), "--model", str(tiny_model))
    assert result.returncode == 5 and "--force" in _single_error_line(result.stderr)

    result = run_cmedl("segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "x.nii.gz"))
    assert result.returncode == 3 and "not found" in _single_error_line(result.stderr)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_model.read_bytes()[:1000])
    result = run_cmedl("segment", str(phantom_file), "-o", str(tmp_path / "y.nii.gz"), "--model", str(broken))
    assert result.returncode == 4
    _single_error_line(result.stderr)

    result = run_cmedl("segment", str(phantom_file), "-o", str(tmp_path / "z.png"), "--model", str(tiny_model))
    assert result.returncode == 6
    _single_error_line(result.stderr)

    produced = sorted(p.name for p in tmp_path.iterdir())
    assert produced == ["broken.safetensors", "ok.nii.gz"]
