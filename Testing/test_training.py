"""CT-only training runs: run folder contents, export, resume after a kill, stop, bad data."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from conftest import PROJECT_ROOT, TINY, run_cmedl

from cmedl import cpu
from cmedl.devices import autocast_dtype
from cmedl.errors import InputError, TrainingError
from cmedl.modelfile import load_model
from cmedl.training.config import TrainConfig
from cmedl.training.runfolder import RunFolder
from cmedl.training.trainer import Trainer


def tiny_config(ct: Path, out: Path, **changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "ct": str(ct), "out": str(out), **changes})


def test_a_run_leaves_a_complete_run_folder_and_a_loadable_model(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    status = Trainer(tiny_config(small_phantoms / "ct", out)).fit()
    assert status["state"] == "finished"
    run = RunFolder(out)
    for name in ("config.json", "run.json", "data.json", "status.json", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file(), name
    saved = json.loads(run.config_path.read_text())
    assert saved["patch_size"] == 64 and saved["segmentor_options"] == {"base_channels": 4}
    data = json.loads((out / "data.json").read_text())
    assert len(data["ct_training"]) == 3 and len(data["ct_validation"]) == 1
    assert not set(data["ct_training"]) & set(data["ct_validation"])
    metrics = run.read_metrics()
    assert [record["epoch"] for record in metrics] == [1, 2]
    assert all(0.0 <= record["loss_seg_ct"] <= 1.0 for record in metrics)
    assert all(0.0 <= record["validation_dice"] <= 1.0 for record in metrics)
    model = load_model(run.model_path)
    assert model.card.architecture == "unet"
    assert model.card.architecture_options == {"base_channels": 4}
    assert model.card.patch_size == 64 and model.card.spacing_mm == (3.0, 3.0)
    assert model.card.intended_use.startswith("research use only")
    assert model.card.training_data["ct_training_cases"] == 3
    with torch.no_grad():
        assert model.network(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    assert "finished" in run.log_path.read_text()


def test_the_same_seed_gives_the_same_run(small_phantoms: Path, tmp_path: Path) -> None:
    first = Trainer(tiny_config(small_phantoms / "ct", tmp_path / "a", epochs=1)).fit()
    second = Trainer(tiny_config(small_phantoms / "ct", tmp_path / "b", epochs=1)).fit()
    assert first["last_losses"] == second["last_losses"]


def test_an_existing_run_folder_is_not_overwritten(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    Trainer(tiny_config(small_phantoms / "ct", out, epochs=1)).fit()
    before = (out / "metrics.jsonl").read_text()
    assert "threads (left as the host process set them)" in RunFolder(out).log_path.read_text()
    with pytest.raises(InputError, match="already holds a run"):
        Trainer(tiny_config(small_phantoms / "ct", out, epochs=1)).fit()
    assert (out / "metrics.jsonl").read_text() == before


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else "child ended early"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _start_training(ct: Path, out: Path, epochs: int) -> subprocess.Popen:
    config = tiny_config(ct, out, epochs=epochs, iterations_per_epoch=4)
    config_path = out.parent / f"{out.name}.json"
    config_path.write_text(json.dumps(config.to_dict()))
    env = {"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-m", "cmedl", "train", "--config", str(config_path), "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_run_killed_mid_epoch_resumes_and_its_metrics_continue(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = _start_training(small_phantoms / "ct", out, epochs=40)
    _wait_for(out / "checkpoint.pt", process)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
    process.wait(timeout=30)
    run = RunFolder(out)
    killed_after = run.load_checkpoint()["epoch"]
    assert killed_after >= 1
    resumed = run_cmedl("train", "--resume", str(out), "--epochs", str(killed_after + 2))
    assert resumed.returncode == 0, resumed.stderr
    epochs = [record["epoch"] for record in run.read_metrics()]
    assert epochs == list(range(1, killed_after + 3))
    # The command line chooses its CPU threads by the engine's rule (and says so); a library leaves them alone.
    starts = [line for line in run.log_path.read_text().splitlines() if "training on cpu" in line]
    assert re.search(r"NCHW layout, \d+ threads \((OMP_NUM_THREADS=\d+|\d+ physical cores)", starts[-1]), starts
    assert run.read_status()["state"] == "finished"
    assert run.model_path.is_file()


def test_stop_signal_leaves_a_resumable_stopped_run(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = _start_training(small_phantoms / "ct", out, epochs=200)
    _wait_for(out / "checkpoint.pt", process)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 130  # stopped: the exit code of a cancelled command
    run = RunFolder(out)
    status = run.read_status()
    assert status["state"] == "stopped"
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "done" and events[-1]["result"]["state"] == "stopped"
    last = run.load_checkpoint()["epoch"]
    resumed = Trainer.resume_run(out, epochs=last + 1).fit()
    assert resumed["state"] == "finished"
    assert [record["epoch"] for record in run.read_metrics()][-1] == last + 1


def test_a_resume_with_more_epochs_is_the_runs_configuration_from_then_on(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert Trainer(tiny_config(small_phantoms / "ct", out, epochs=1)).fit()["state"] == "finished"
    assert Trainer.resume_run(out, epochs=2).fit()["message"].startswith("finished 2 epochs")
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    # A plain resume of the finished run keeps its 2 epochs: nothing to train, and it says so.
    again = Trainer.resume_run(out).fit()
    assert again["state"] == "finished" and again["message"].startswith("finished 2 epochs"), again["message"]
    assert [record["epoch"] for record in RunFolder(out).read_metrics()] == [1, 2]


def test_a_non_finite_loss_stops_with_a_clear_message(small_phantoms: Path, tmp_path: Path) -> None:
    # An absurd learning rate makes the weights overflow within a few steps.
    with pytest.raises(TrainingError, match="non-finite"):
        Trainer(tiny_config(small_phantoms / "ct", tmp_path / "run", lr_segmentor=1e38)).fit()
    status = RunFolder(tmp_path / "run").read_status()
    assert status["state"] == "failed" and "non-finite" in status["message"]


def test_bad_training_data_is_refused_before_training(small_phantoms: Path, tmp_path: Path) -> None:
    data = tmp_path / "ct"
    shutil.copytree(small_phantoms / "ct", data)
    (data / "labels" / "ct_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="no label"):
        Trainer(tiny_config(data, tmp_path / "run1")).fit()
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    result = run_cmedl("train", "--ct", str(empty), "--out", str(tmp_path / "run2"), "--device", "cpu")
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("cmedl: error:")


def test_labels_without_any_tumour_are_refused(small_phantoms: Path, tmp_path: Path) -> None:
    data = tmp_path / "ct"
    shutil.copytree(small_phantoms / "ct", data)
    for label_path in (data / "labels").iterdir():
        label = sitk.ReadImage(str(label_path))
        sitk.WriteImage(label * 0, str(label_path))
    with pytest.raises(TrainingError, match="tumour"):
        Trainer(tiny_config(data, tmp_path / "run")).fit()


def test_command_line_flags_and_set_reach_the_saved_config(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cmedl(
        "train", "--ct", str(small_phantoms / "ct"), "--out", str(out), "--epochs", "1",
        "--iterations-per-epoch", "2", "--patch-size", "64", "--batch-size", "1", "--device", "cpu", "--seed", "5",
        "--set", 'segmentor_options={"base_channels": 4}', "--set", "spacing_mm=[3, 3]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["seed"] == 5 and saved["iterations_per_epoch"] == 2 and saved["spacing_mm"] == [3.0, 3.0]
    bad = run_cmedl("train", "--ct", str(small_phantoms / "ct"), "--out", str(tmp_path / "x"), "--set", "nope=1")
    assert bad.returncode == 7 and "nope" in bad.stderr


def test_training_precision_on_a_cpu_is_what_the_cpu_computes_natively() -> None:
    """bf16 only with AVX512-BF16 or AMX: elsewhere a CPU emulates it, several times slower than fp32."""
    host = torch.device("cpu")
    assert autocast_dtype(host, "auto", frozenset({"avx2", "fma"})) is None
    for flag in ("avx512_bf16", "amx_bf16"):
        assert autocast_dtype(host, "auto", frozenset({"avx2", flag})) == torch.bfloat16
    assert autocast_dtype(host, "off", frozenset({"amx_bf16"})) is None
    assert autocast_dtype(host, "bf16", frozenset()) == torch.bfloat16
    assert autocast_dtype(host, "fp16", frozenset({"amx_bf16"})) is None  # no fast fp16 on a CPU


def test_a_run_on_a_cpu_with_native_bf16_trains_in_bf16_and_exports_fp32_weights(
    small_phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    out = tmp_path / "run"
    status = Trainer(tiny_config(small_phantoms / "ct", out, epochs=1)).fit()
    assert status["state"] == "finished", status["message"]
    assert all(math.isfinite(value) for value in status["last_losses"].values())
    assert json.loads((out / "run.json").read_text())["amp"] == "torch.bfloat16"
    assert "in bf16 autocast" in (out / "train.log").read_text()
    model = load_model(out / "model.safetensors")
    assert {parameter.dtype for parameter in model.network.parameters()} == {torch.float32}


def test_cpu_training_steps_a_fused_adam_with_the_update_of_torchs_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from cmedl.training.objectives import build_objective

    config = TrainConfig.from_dict({**TINY, "ct": "ct", "out": "run", "weight_decay": 1e-4}).validate()
    torch.manual_seed(0)
    objective = build_objective(config, torch.device("cpu"), None)
    fused = objective.optimizers["student"]
    assert fused.defaults["fused"] is True
    twin = copy.deepcopy(objective.student)
    plain = torch.optim.Adam(twin.parameters(), lr=config.lr_segmentor, betas=config.betas, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for mine, theirs in zip(objective.student.parameters(), twin.parameters()):
            mine.grad = torch.randn(mine.shape, generator=generator)
            theirs.grad = mine.grad.clone()
        fused.step()
        plain.step()
    for mine, theirs in zip(objective.student.parameters(), twin.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)

    # A torch that fuses Adam on GPUs only (before 2.4) gets the plain one.
    real_adam = torch.optim.Adam

    def adam_without_cpu_fusion(parameters, **settings):
        if settings.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real_adam(parameters, **settings)

    monkeypatch.setattr(torch.optim, "Adam", adam_without_cpu_fusion)
    fallback = build_objective(config, torch.device("cpu"), None).optimizers["student"]
    assert not fallback.defaults.get("fused") and len(fallback.param_groups[0]["params"]) > 0
