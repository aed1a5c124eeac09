"""CUDA code paths: mixed-precision training steps, a whole run on the GPU, GPU inference against CPU inference.

Every test here needs a CUDA device and is skipped without one (CI has none); run them with ``pytest -m gpu``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_CMEDL

from cmedl.catalogue import builtin_model_path
from cmedl.devices import autocast_dtype, resolve_device
from cmedl.metrics import dice
from cmedl.modelfile import load_model
from cmedl.phantom import make_phantom, write_phantom_dataset
from cmedl.segment import Segmenter, SegmentOptions
from cmedl.training.config import TrainConfig
from cmedl.training.objectives import CMEDLObjective, CTOnlyObjective
from cmedl.training.runfolder import RunFolder
from cmedl.training.trainer import Trainer
from cmedl.translate import load_translator, translate_volume

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_batch(seed: int = 0, size: int = 64) -> dict:
    """One unpaired batch of two CT patches with labels and two labelled MRI patches, on the CPU like the loader's."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, size, size, generator=generator) * 2 - 1
    labels = (torch.rand(2, size, size, generator=generator) > 0.8).long()
    mr = torch.rand(2, 1, size, size, generator=generator) * 2 - 1
    return {
        "ct": (images, labels, torch.ones(2, dtype=torch.bool)),
        "mr": (mr, labels.flip(1), torch.ones(2, dtype=torch.bool)),
    }


def cmedl_objective(amp: str, **changes) -> CMEDLObjective:
    torch.manual_seed(0)
    config = TrainConfig.from_dict({**TINY_CMEDL, "ct": "ct", "mr": "mr", "out": "run", "device": "cuda", **changes})
    return CMEDLObjective(config.validate(), CUDA, AMP_DTYPES[amp])


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_auto_mixed_precision_is_bf16_where_the_gpu_has_it() -> None:
    assert resolve_device("auto").type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert autocast_dtype(CUDA, "auto") == expected
    assert autocast_dtype(CUDA, "off") is None


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_a_cmedl_step_on_the_gpu_updates_all_six_networks(amp: str) -> None:
    objective = cmedl_objective(amp)
    assert objective.scaler.is_enabled() == (amp == "fp16")
    before = {name: snapshot(net) for name, net in objective.networks.items()}
    # fp16's loss scaler skips the optimizer steps whose scaled gradients overflow while it lowers its scale
    for _ in range(1 if amp != "fp16" else 8):
        losses = objective.step(cuda_batch())
    assert set(losses) == {"adv_g", "cyc", "cx", "adv_d", "seg_ct", "seg_pm", "seg_rm", "hint"}
    assert all(np.isfinite(value) for value in losses.values()), losses
    for name, net in objective.networks.items():
        parameters = list(net.parameters())
        # autocast computes in half precision but the weights themselves stay float32 on the GPU
        assert all(p.is_cuda and p.dtype == torch.float32 for p in parameters), name
        assert any(not torch.equal(a, b) for a, b in zip(before[name], parameters)), name


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_the_hint_loss_falls_on_a_fixed_batch_under_mixed_precision(amp: str) -> None:
    objective = cmedl_objective(amp)
    batch = cuda_batch(seed=3)
    hints = [objective.step(batch)["hint"] for _ in range(8)]
    assert hints[-1] < hints[0], hints


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_a_ct_only_step_on_the_gpu_lowers_the_dice_loss_on_a_fixed_batch(amp: str) -> None:
    torch.manual_seed(0)
    config = TrainConfig.from_dict({"ct": "ct", "out": "run", "segmentor_options": {"base_channels": 8}})
    objective = CTOnlyObjective(config.validate(), CUDA, AMP_DTYPES[amp])
    batch = {"ct": cuda_batch(seed=5)["ct"]}
    losses = [objective.step(batch)["seg_ct"] for _ in range(10)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unpaired_gpu")
    write_phantom_dataset(out, n_ct=3, n_mr=2, seed=21, size=96)
    return out


def test_a_cmedl_run_on_the_gpu_records_its_precision_and_exports_a_student_that_runs_on_cpu(
    unpaired: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = TrainConfig.from_dict(
        {**TINY_CMEDL, "ct": str(unpaired / "ct"), "mr": str(unpaired / "mr"), "out": str(out), "device": "cuda"}
    )
    status = Trainer(config).fit()
    assert status["state"] == "finished"
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["device"].startswith("cuda") and recorded["amp"] == str(autocast_dtype(CUDA, "auto"))
    model = load_model(RunFolder(out).model_path, device="cpu")
    assert model.card.method == "cmedl"
    assert next(model.network.parameters()).device.type == "cpu"
    ct = make_phantom("ct", seed=4, size=96, slices=12).image
    label = Segmenter(model, SegmentOptions(device="cpu")).segment(ct).label
    assert label.GetSize() == ct.GetSize()
    pseudo_mr = translate_volume(ct, load_translator(out / "translator.safetensors", CUDA), CUDA)
    assert pseudo_mr.GetSize() == ct.GetSize() and np.isfinite(sitk.GetArrayFromImage(pseudo_mr)).all()


def test_gpu_inference_with_autocast_matches_cpu_inference() -> None:
    model = load_model(builtin_model_path())
    ct = make_phantom("ct", seed=3, size=256, slices=24).image
    on_cpu = Segmenter(model, SegmentOptions(device="cpu")).segment(ct)
    on_gpu = Segmenter(load_model(builtin_model_path()), SegmentOptions(device="cuda")).segment(ct)
    assert on_gpu.device.startswith("cuda") and on_cpu.device == "cpu"
    cpu_mask = sitk.GetArrayFromImage(on_cpu.label) > 0
    gpu_mask = sitk.GetArrayFromImage(on_gpu.label) > 0
    assert cpu_mask.any()
    # bf16 logits move a few boundary voxels across the 0.5 threshold, no more
    assert dice(gpu_mask, cpu_mask) > 0.97
