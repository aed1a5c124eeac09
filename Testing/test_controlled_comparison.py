"""What the controlled CMEDL-against-CT-only comparison relies on: equal learning-rate schedules, BatchNorm
statistics that only training passes change, the oracle teacher input, and the list of paper deviations."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_CMEDL

from cmedl.errors import ConfigError, InputError
from cmedl.training.config import TrainConfig, paper_deviations
from cmedl.training.data import CasePaths, PatchSampler, attach_paired, draw_batch, prepare_volume
from cmedl.training.objectives import CMEDLObjective, CTOnlyObjective, batchnorm_statistics_kept
from cmedl.training.trainer import Trainer
from cmedl.volumes import normalise_hu, normalise_mr


def tiny_config(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY_CMEDL, "ct": "ct", "mr": "mr", "out": "run", **changes}).validate()


def random_batch(seed: int = 0, paired: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ct = torch.rand(2, 1, 64, 64, generator=generator) * 2 - 1
    labels = (torch.rand(2, 64, 64, generator=generator) > 0.8).long()
    mr = torch.rand(2, 1, 64, 64, generator=generator) * 2 - 1
    everyone = torch.ones(2, dtype=torch.bool)
    batch = {"ct": (ct, labels, everyone), "mr": (mr, labels.flip(1), everyone)}
    if paired:
        batch["paired_mr"] = (torch.rand(2, 1, 64, 64, generator=generator) * 2 - 1, labels, everyone)
    return batch


def batchnorm_updates(module: torch.nn.Module) -> set[int]:
    return {int(layer.num_batches_tracked) for layer in module.modules() if isinstance(layer, torch.nn.BatchNorm2d)}


def running_means(module: torch.nn.Module) -> list[torch.Tensor]:
    return [layer.running_mean.clone() for layer in module.modules() if isinstance(layer, torch.nn.BatchNorm2d)]


def learning_rates(objective, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        rates.append(objective.optimizers["student"].param_groups[0]["lr"])
        objective.end_epoch()
    return rates


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no optimiser steps here
def test_ct_only_and_cmedl_students_follow_the_same_learning_rate_schedule() -> None:
    config = tiny_config(epochs=8, lr_decay_fraction=0.5)
    torch.manual_seed(0)
    ct_only_config = TrainConfig.from_dict({**config.to_dict(), "method": "ct_only"})
    ct_only = CTOnlyObjective(ct_only_config, torch.device("cpu"), None)
    cmedl = CMEDLObjective(config, torch.device("cpu"), None)
    rates_ct_only, rates_cmedl = learning_rates(ct_only, 8), learning_rates(cmedl, 8)
    assert rates_ct_only == pytest.approx(rates_cmedl)
    # constant for the first half, then falling: the schedule is really there, for both
    assert rates_ct_only[0] == rates_ct_only[3] == config.lr_segmentor
    assert rates_ct_only[4] < rates_ct_only[3] and rates_ct_only[7] < rates_ct_only[4]


def test_one_cmedl_step_updates_batchnorm_statistics_only_in_the_segmentors_own_training_passes() -> None:
    torch.manual_seed(0)
    objective = CMEDLObjective(tiny_config(), torch.device("cpu"), None)
    objective.train()
    objective.step(random_batch())
    # The student is trained on CT once per step; the teacher on the pseudo-MRI and on the real MRI. The generator
    # update's passes through both segmentors must not count.
    assert batchnorm_updates(objective.student) == {1}
    assert batchnorm_updates(objective.teacher) == {2}
    objective.step(random_batch(seed=1))
    assert batchnorm_updates(objective.student) == {2}
    assert batchnorm_updates(objective.teacher) == {4}


def test_passes_inside_the_guard_use_batch_statistics_but_leave_running_statistics_alone() -> None:
    torch.manual_seed(0)
    network = CMEDLObjective(tiny_config(), torch.device("cpu"), None).student.train()
    images = torch.randn(2, 1, 64, 64) * 3 + 1
    before = running_means(network)
    with batchnorm_statistics_kept(network):
        guarded = network(images)
    assert all(torch.equal(a, b) for a, b in zip(before, running_means(network)))
    unguarded = network(images)  # the same training-mode pass, now allowed to update the statistics
    assert torch.allclose(guarded, unguarded)
    assert not all(torch.equal(a, b) for a, b in zip(before, running_means(network)))


def test_the_oracle_teacher_is_trained_on_the_paired_images_and_no_translator_exists() -> None:
    torch.manual_seed(0)
    objective = CMEDLObjective(tiny_config(teacher_input="paired_mr", paired_mr="paired"), torch.device("cpu"), None)
    assert objective.translator is None and "translator" not in objective.networks
    assert set(objective.optimizers) == {"teacher", "student"}
    assert "paired_mr" in objective.domains
    batch = random_batch(paired=True)
    losses = objective.step(batch)
    assert set(losses) == {"seg_ct", "seg_pm", "seg_rm", "hint"}
    # The teacher's view is the paired image: its Dice on the paired patches is what seg_pm reports.
    objective.teacher.eval()
    with torch.no_grad():
        on_paired = objective.teacher(batch["paired_mr"][0])
    assert on_paired.shape[-2:] == (64, 64)
    with pytest.raises(KeyError):
        objective.step(random_batch(paired=False))


def test_oracle_needs_a_paired_folder_and_an_unknown_teacher_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="paired_mr folder"):
        tiny_config(teacher_input="paired_mr")
    with pytest.raises(ConfigError, match="teacher_input"):
        tiny_config(teacher_input="mri")
    with pytest.raises(ConfigError, match="segmentor_seg_weight"):
        tiny_config(segmentor_seg_weight=0)


def test_the_segmentor_seg_weight_scales_the_students_dice_gradient() -> None:
    gradients = []
    for weight in (1.0, 5.0):
        torch.manual_seed(0)
        objective = CMEDLObjective(
            tiny_config(segmentor_seg_weight=weight, lambda_hint=0.0, teacher_input="paired_mr", paired_mr="p"),
            torch.device("cpu"),
            None,
        )
        objective.train()
        for optimizer in objective.optimizers.values():
            optimizer.step = lambda *args, **kwargs: None  # keep the weights: only the gradient is compared
        objective.step(random_batch(paired=True))
        gradients.append(torch.cat([p.grad.flatten() for p in objective.student.parameters()]))
    assert float((gradients[1] - 5.0 * gradients[0]).norm() / gradients[1].norm()) < 1e-4


def test_paired_patches_are_cut_and_augmented_with_the_ct_patch(tmp_path: Path) -> None:
    # A CT and a "paired" image that is the same anatomy in another intensity scale: after preparation, cropping
    # and augmentation, channel 1 must still be the same affine function of channel 0 wherever both are inside.
    rng = np.random.default_rng(0)
    hu = rng.uniform(-900, 200, size=(6, 48, 48)).astype(np.float32)
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[2:4, 20:28, 20:28] = 1
    for name, array in (("images", hu), ("labels", label), ("paired", hu + 1000.0)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 3.0))
        (tmp_path / name).mkdir()
        sitk.WriteImage(image, str(tmp_path / name / "case.nii.gz"))
    case = CasePaths("case", tmp_path / "images" / "case.nii.gz", tmp_path / "labels" / "case.nii.gz")
    volume = prepare_volume(case, (2.0, 2.0), lambda v: normalise_hu(v, (-1000.0, 500.0)))
    attach_paired([volume], [case], tmp_path / "paired", (2.0, 2.0), lambda v: normalise_mr(v, 100.0))
    assert volume.paired is not None and volume.paired.shape == volume.image.shape
    sampler = PatchSampler([volume], 32, 1.0, None, np.random.default_rng(1))
    batch = draw_batch({"ct": sampler}, ("ct", "paired_mr"), 4)
    assert batch["ct"][0].shape == (4, 1, 32, 32) and batch["paired_mr"][0].shape == (4, 1, 32, 32)
    assert torch.equal(batch["paired_mr"][1], batch["ct"][1])
    ct, paired = batch["ct"][0].numpy().ravel(), batch["paired_mr"][0].numpy().ravel()
    inside = (ct > -0.99) & (paired > -0.99)
    slope, intercept = np.polyfit(ct[inside], paired[inside], 1)
    assert np.abs(paired[inside] - (slope * ct[inside] + intercept)).max() < 0.02

    shutil.rmtree(tmp_path / "paired")
    (tmp_path / "paired").mkdir()
    with pytest.raises(InputError, match="no paired image"):
        attach_paired([volume], [case], tmp_path / "paired", (2.0, 2.0), lambda v: v)


def test_a_tiny_oracle_run_trains_and_exports_only_the_student(tmp_path: Path) -> None:
    from cmedl.phantom import make_phantom
    from cmedl.volumes import write_labelmap, write_volume

    for modality, folder in (("ct", "ct"), ("mr", "mr")):
        for index in range(2):
            seed = 40 + index + (0 if modality == "ct" else 10)
            case = make_phantom(modality, seed, size=64)
            write_volume(case.image, tmp_path / folder / "images" / f"c{index}.nii.gz")
            write_labelmap(case.label, tmp_path / folder / "labels" / f"c{index}.nii.gz")
            if modality == "ct":
                write_volume(make_phantom("mr", seed, size=64).image, tmp_path / "paired" / f"c{index}.nii.gz")
    config = TrainConfig.from_dict(
        {**TINY_CMEDL, "ct": str(tmp_path / "ct"), "mr": str(tmp_path / "mr"), "out": str(tmp_path / "run"),
         "teacher_input": "paired_mr", "paired_mr": str(tmp_path / "paired"), "epochs": 1, "iterations_per_epoch": 2,
         "validation_fraction": 0.0}
    )  # fmt: skip
    Trainer(config).fit()
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "translator.safetensors").exists()


def test_paper_deviations_name_each_departure_and_ct_only_has_none() -> None:
    paper = tiny_config(
        hint_to_teacher=True, hint_reduction="sum", vgg_weights="", lambda_cx=1.0, lambda_hint=1.0, lambda_seg=5.0
    )
    assert paper_deviations(paper) == []
    ours = tiny_config(hint_to_teacher=False, vgg_weights="random", lambda_hint=0.0)
    found = "\n".join(paper_deviations(ours))
    assert "hint_to_teacher=false" in found and "randomly initialised VGG16" in found and "lambda_hint=0" in found
    assert paper_deviations(TrainConfig.from_dict({**ours.to_dict(), "method": "ct_only"})) == []
