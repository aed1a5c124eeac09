"""CMEDL joint training: the objective's updates, its loss switches, a tiny real run and its exports."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, TINY_CMEDL, run_cmedl

from cmedl.errors import ConfigError
from cmedl.modelfile import load_model
from cmedl.training.config import TrainConfig
from cmedl.training.objectives import CMEDLObjective, hint_loss
from cmedl.training.runfolder import RunFolder
from cmedl.training.trainer import Trainer


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> Path:
    from cmedl.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("unpaired")
    write_phantom_dataset(out, n_ct=3, n_mr=2, seed=21, size=96)
    return out


def config_for(data: Path, out: Path, **changes) -> TrainConfig:
    return TrainConfig.from_dict(
        {**TINY_CMEDL, "ct": str(data / "ct"), "mr": str(data / "mr"), "out": str(out), **changes}
    )


def random_batch(seed: int = 0, labelled_mr: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, 64, 64, generator=generator) * 2 - 1
    labels = (torch.rand(2, 64, 64, generator=generator) > 0.8).long()
    mr = torch.rand(2, 1, 64, 64, generator=generator) * 2 - 1
    return {
        "ct": (images, labels, torch.ones(2, dtype=torch.bool)),
        "mr": (mr, labels.flip(1), torch.full((2,), labelled_mr)),
    }


def objective_for(**changes) -> CMEDLObjective:
    torch.manual_seed(0)
    config = TrainConfig.from_dict({**TINY_CMEDL, "ct": "ct", "mr": "mr", "out": "run", **changes}).validate()
    return CMEDLObjective(config, torch.device("cpu"), None)


def parameters_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_one_step_reports_every_loss_term_and_updates_every_network() -> None:
    objective = objective_for()
    before = {name: parameters_of(net) for name, net in objective.networks.items()}
    losses = objective.step(random_batch())
    assert set(losses) == {"adv_g", "cyc", "cx", "adv_d", "seg_ct", "seg_pm", "seg_rm", "hint"}
    assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
    for name, net in objective.networks.items():
        assert changed(before[name], net), name


def test_repeated_steps_on_a_fixed_batch_lower_the_losses_each_network_is_trained_on() -> None:
    objective = objective_for()
    batch = random_batch(seed=4)
    history = [objective.step(batch) for _ in range(12)]
    # the hint loss (student toward teacher), the cycle loss (generators) and the Dice losses of the student on CT
    # and of the teacher on real MRI all fall; the adversarial terms trade off against each other and need not
    for term in ("hint", "cyc", "seg_ct", "seg_rm"):
        assert history[-1][term] < history[0][term], (term, [round(h[term], 4) for h in history])


def test_loss_terms_switch_off_one_by_one() -> None:
    assert "cx" not in objective_for(use_cx=False).step(random_batch())
    assert "cyc" not in objective_for(use_cycle=False).step(random_batch())
    assert "seg_rm" not in objective_for(use_seg_rm=False).step(random_batch())
    assert "seg_pm" not in objective_for(use_seg_pm=False).step(random_batch())
    # unlabelled MRI: the teacher learns from pseudo-MRI only
    assert "seg_rm" not in objective_for().step(random_batch(labelled_mr=False))


def test_hint_gradient_reaches_the_teacher_only_when_asked() -> None:
    kept = objective_for(hint_to_teacher=False, use_seg_pm=False, use_seg_rm=False)
    before = parameters_of(kept.teacher)
    kept.step(random_batch())
    assert not changed(before, kept.teacher)
    pulled = objective_for(hint_to_teacher=True, use_seg_pm=False, use_seg_rm=False)
    before = parameters_of(pulled.teacher)
    pulled.step(random_batch())
    assert changed(before, pulled.teacher)


def test_hint_and_pmri_segmentation_reach_the_generator_only_when_asked() -> None:
    generators = []
    for reach in (False, True):
        objective = objective_for(hint_to_generator=reach, seg_pm_to_generator=reach)
        objective.step(random_batch())
        generators.append(parameters_of(objective.translator.g_ct_to_mr))
    assert any(not torch.equal(a, b) for a, b in zip(*generators))


def test_the_hint_loss_waits_for_hint_start_epoch_and_is_logged_meanwhile() -> None:
    delayed = objective_for(hint_start_epoch=1)
    without = objective_for(lambda_hint=0.0)
    losses = delayed.step(random_batch())
    without.step(random_batch())
    assert "hint" in losses  # computed and logged even while its weight is 0
    # in the first epoch every network takes exactly the step it takes without any hint loss
    for name in ("translator", "teacher", "student"):
        assert all(torch.equal(a, b) for a, b in zip(delayed.networks[name].parameters(),
                                                     without.networks[name].parameters())), name  # fmt: skip
    delayed.end_epoch()
    without.end_epoch()
    assert delayed.hint_weight() == 1.0 and without.hint_weight() == 0.0
    delayed.step(random_batch(seed=1))
    without.step(random_batch(seed=1))
    assert any(not torch.equal(a, b) for a, b in zip(delayed.student.parameters(), without.student.parameters()))
    with pytest.raises(ConfigError, match="hint_start_epoch"):
        TrainConfig.from_dict({**TINY_CMEDL, "ct": "ct", "mr": "mr", "out": "run", "hint_start_epoch": -1}).validate()


def test_hint_reductions() -> None:
    student = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 8, 8)]
    teacher = [torch.ones(2, 3, 4, 4), torch.full((2, 5, 8, 8), 2.0)]
    assert float(hint_loss(student, teacher, "mean")) == pytest.approx(1.0 + 4.0)
    # squared Frobenius norm per sample: 3*4*4*1 + 5*8*8*4
    assert float(hint_loss(student, teacher, "sum")) == pytest.approx(48 + 1280)


def test_a_tiny_cmedl_run_exports_a_student_that_segments(unpaired: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    status = Trainer(config_for(unpaired, out)).fit()
    assert status["state"] == "finished"
    run = RunFolder(out)
    records = run.read_metrics()
    assert [r["epoch"] for r in records] == [1, 2]
    for term in ("adv_g", "cyc", "cx", "adv_d", "seg_ct", "seg_pm", "seg_rm", "hint"):
        assert f"loss_{term}" in records[0], term
    data = json.loads((out / "data.json").read_text())
    assert len(data["mr"]) == 2 and len(data["mr_labelled"]) == 2
    assert (out / "previews" / "epoch_002.png").is_file()
    columns = json.loads((out / "previews" / "columns.json").read_text())["columns"]
    assert columns == ["CT", "pseudo-MRI", "student", "teacher"]
    model = load_model(run.model_path)
    assert model.card.method == "cmedl"
    assert model.card.training["lambda_cyc"] == 10.0 and model.card.training["lambda_seg"] == 5.0
    assert any("randomly initialised VGG16" in line for line in model.card.training["deviations"])
    info = run_cmedl("info", str(run.model_path))
    assert "deviations from the paper:" in info.stdout and "hint_to_teacher=false" in info.stdout
    assert model.card.training_data["paired"] is False and model.card.training_data["mr_cases"] == 2
    with torch.no_grad():
        assert model.network(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_a_cmedl_run_resumes_with_its_translator_and_pools(unpaired: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    Trainer(config_for(unpaired, out, epochs=1)).fit()
    checkpoint = RunFolder(out).load_checkpoint()
    assert set(checkpoint["objective"]["networks"]) == {"translator", "teacher", "student"}
    assert len(checkpoint["objective"]["extra"]["pool_mr"]["images"]) > 0
    status = Trainer.resume_run(out, epochs=2).fit()
    assert status["state"] == "finished"
    assert [r["epoch"] for r in RunFolder(out).read_metrics()] == [1, 2]


def test_a_cmedl_run_killed_mid_epoch_resumes_and_its_metrics_continue(unpaired: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(config_for(unpaired, out, epochs=40, iterations_per_epoch=4).to_dict()))
    process = subprocess.Popen(
        [sys.executable, "-m", "cmedl", "train", "--config", str(config_path), "--progress", "none"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoint.pt").exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the next epoch
    finally:
        process.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
        process.wait(timeout=30)
    run = RunFolder(out)
    killed_after = run.load_checkpoint()["epoch"]
    assert killed_after >= 1
    resumed = run_cmedl("train", "--resume", str(out), "--epochs", str(killed_after + 1), "--progress", "none")
    assert resumed.returncode == 0, resumed.stderr
    records = run.read_metrics()
    assert [record["epoch"] for record in records] == list(range(1, killed_after + 2))
    assert all("loss_hint" in record and "loss_cx" in record for record in records)
    assert run.read_status()["state"] == "finished"
    assert load_model(run.model_path).card.method == "cmedl" and (out / "translator.safetensors").is_file()


def test_mr_without_labels_trains_the_teacher_on_pseudo_mri_only(unpaired: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(unpaired, data)
    shutil.rmtree(data / "mr" / "labels")
    out = tmp_path / "run"
    Trainer(config_for(data, out, epochs=1)).fit()
    record = RunFolder(out).read_metrics()[0]
    assert "loss_seg_rm" not in record and "loss_seg_pm" in record


def test_the_translator_export_makes_pseudo_mri_on_the_ct_grid(unpaired: Path, tmp_path: Path) -> None:
    from cmedl.volumes import read_volume, same_geometry

    out = tmp_path / "run"
    Trainer(config_for(unpaired, out, epochs=1)).fit()
    translator = out / "translator.safetensors"
    assert translator.is_file()
    ct_path = sorted((unpaired / "ct" / "images").iterdir())[0]
    pseudo_path = tmp_path / "pseudo_mr.nii.gz"
    result = run_cmedl("translate", str(ct_path), "-o", str(pseudo_path), "--model", str(translator), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    pseudo, ct = read_volume(pseudo_path), read_volume(ct_path)
    assert same_geometry(pseudo, ct)
    values = sitk_array(pseudo)
    assert values.min() >= 0.0 and values.max() <= 1000.0 and values.std() > 0
    # each file is refused where the other kind is expected
    wrong = run_cmedl("segment", str(ct_path), "-o", str(tmp_path / "x.nii.gz"), "--model", str(translator))
    assert wrong.returncode == 4 and "translator" in wrong.stderr
    wrong = run_cmedl(
        "translate", str(ct_path), "-o", str(tmp_path / "y.nii.gz"), "--model", str(out / "model.safetensors")
    )
    assert wrong.returncode == 4
    # a pseudo-MRI is no segmentation, and an MRI is no CT (the one line says how to go on anyway)
    named = run_cmedl("translate", str(ct_path), "-o", str(tmp_path / "p.seg.nrrd"), "--model", str(translator))
    assert named.returncode == 3 and "not a segmentation" in named.stderr and not (tmp_path / "p.seg.nrrd").exists()
    mr_path = sorted((unpaired / "mr" / "images").iterdir())[0]
    refused = run_cmedl("translate", str(mr_path), "-o", str(tmp_path / "m.nii.gz"), "--model", str(translator))
    assert refused.returncode == 5 and "--force translates it anyway" in refused.stderr


def sitk_array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


def test_a_cmedl_run_on_a_cpu_with_native_bf16_trains_every_network_in_bf16(
    unpaired: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The contextual loss, the VGG features and the hint losses all run under CPU bf16 autocast."""
    from cmedl import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    out = tmp_path / "run"
    status = Trainer(config_for(unpaired, out, epochs=1)).fit()
    assert status["state"] == "finished", status["message"]
    assert all(math.isfinite(value) for value in status["last_losses"].values())
    assert json.loads((out / "run.json").read_text())["amp"] == "torch.bfloat16"
    for name in ("model.safetensors", "translator.safetensors"):
        assert (out / name).is_file()
