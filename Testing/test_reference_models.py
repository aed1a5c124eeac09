"""The threshold reference model: a model file whose segmentation is known voxel by voxel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cmedl

from cmedl.errors import ConfigError
from cmedl.lungs import detect_lungs
from cmedl.modelfile import load_model
from cmedl.nets import SEGMENTOR_NAMES, build_segmentor
from cmedl.phantom import make_phantom
from cmedl.reference_models import THRESHOLD_MODEL_NAME, write_threshold_model


def test_the_threshold_network_marks_exactly_the_values_above_its_level() -> None:
    network = build_segmentor("threshold", in_channels=1, num_classes=2, level=0.25, sharpness=1000.0)
    x = torch.tensor([-1.0, 0.0, 0.249, 0.251, 0.9]).view(1, 1, 1, 5)
    logits, hints = network(x, return_hints=True)
    assert logits.argmax(1).flatten().tolist() == [0, 0, 0, 1, 1]
    assert hints[0] is x and network.hint_channels == (1, 1)
    assert "threshold" not in SEGMENTOR_NAMES, "the reference network is never offered for training"


def test_threshold_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        build_segmentor("threshold", in_channels=1, num_classes=1)
    with pytest.raises(ConfigError):
        build_segmentor("threshold", in_channels=1, num_classes=2, level="high")
    with pytest.raises(ConfigError, match="inside the HU window"):
        write_threshold_model(tmp_path / "m.safetensors", level_hu=2000.0)
    assert not (tmp_path / "m.safetensors").exists()


def test_the_model_file_reloads_with_its_card(tmp_path: Path) -> None:
    path = write_threshold_model(tmp_path / "t.safetensors", level_hu=100.0, spacing_mm=(0.8, 0.9), patch_size=96)
    model = load_model(path)
    assert model.card.name == THRESHOLD_MODEL_NAME and model.card.method == "reference"
    assert model.card.spacing_mm == (0.8, 0.9) and model.card.patch_size == 96
    assert "does not segment tumours" in model.card.intended_use
    # 100 HU in the window (-1000, 1000) is 0.1 in the network's units.
    x = torch.tensor([0.09, 0.11]).view(1, 1, 1, 2)
    assert model.network(x).argmax(1).flatten().tolist() == [0, 1]


def test_cmedl_segment_with_the_threshold_model_gives_the_known_answer(tmp_path: Path) -> None:
    ct = make_phantom("ct", seed=8, size=128).image
    ct_path = tmp_path / "ct.nrrd"
    sitk.WriteImage(ct, str(ct_path))
    model = write_threshold_model(tmp_path / "t.safetensors", level_hu=-200.5, spacing_mm=ct.GetSpacing()[:2])
    result = run_cmedl("segment", str(ct_path), "-o", str(tmp_path / "out.nii.gz"), "--model", str(model),
                       "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz"))).astype(bool)
    roi = sitk.GetArrayFromImage(detect_lungs(ct).roi_mask).astype(bool)
    np.testing.assert_array_equal(label, (sitk.GetArrayFromImage(ct) > -200.5) & roi)
