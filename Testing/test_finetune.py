"""Fine-tuning (issue 14): ``cmedl train --init MODEL`` starts from a model's or a CMEDL run's weights with fresh
optimisers, takes the architecture from the model card, freezes the encoder or warms up on request, records the
parent model in the new model card, and CMEDL Train's settings code fills its values in from a model."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_CMEDL
from safetensors.torch import load_file

from cmedl import cli
from cmedl.catalogue import ModelEntry, builtin_model_path
from cmedl.errors import ConfigError
from cmedl.filebase import file_sha256, peek_model_card
from cmedl.modelfile import ModelCard, read_model_card, save_model
from cmedl.nets import build_segmentor
from cmedl.progress import CallbackProgress
from cmedl.training.config import TrainConfig
from cmedl.training.finetune import apply_init, fine_tuning_lr
from cmedl.training.objectives import CMEDLObjective, CTOnlyObjective
from cmedl.training.runfolder import CYCLEGAN_FILE, RunFolder
from cmedl.training.trainer import Trainer
from CMEDLSegmentLib.model_cards import model_card_text
from CMEDLTrainLib.settings import (
    DataFolders,
    TrainingSettings,
    settings_from_model,
    settings_problem,
    start_from_model,
    training_config,
)

BUILTIN = builtin_model_path()
BUILTIN_NAME = "cmedl-demo-unet"


@pytest.fixture(scope="module")
def two_phantoms(tmp_path_factory) -> Path:
    """Two labelled CT phantoms and two MRI phantoms, small (96x96 in-plane)."""
    from cmedl.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("two_phantoms")
    write_phantom_dataset(out, n_ct=2, n_mr=2, seed=5, size=96)
    return out


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory) -> Path:
    """A random-weight U-Net (base 4) saved as a model file: a parent that fine-tunes in a second."""
    torch.manual_seed(3)
    network = build_segmentor("unet", base_channels=4)
    card = ModelCard(name="tiny-parent", architecture="unet", architecture_options={"base_channels": 4},
                     patch_size=64, spacing_mm=(4.0, 4.0), hu_window=(-900.0, 400.0))  # fmt: skip
    return save_model(tmp_path_factory.mktemp("parent") / "tiny-parent.safetensors", network, card)


@pytest.fixture(scope="module")
def cmedl_run(two_phantoms: Path, tmp_path_factory) -> Path:
    """A finished one-epoch CMEDL run (tiny networks): model.safetensors, translator.safetensors, checkpoint.pt."""
    out = tmp_path_factory.mktemp("cmedl_source") / "run"
    values = {**TINY_CMEDL, "ct": str(two_phantoms / "ct"), "mr": str(two_phantoms / "mr"), "out": str(out),
              "epochs": 1, "validation_fraction": 0.0}  # fmt: skip
    assert Trainer(TrainConfig.from_dict(values)).fit()["state"] == "finished"
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def is_parameter(name: str) -> bool:
    return not name.endswith(("running_mean", "running_var", "num_batches_tracked"))


# -- from the built-in model, through the command line -------------------------------------------------------


def test_fine_tuning_the_builtin_model_changes_its_weights_and_names_its_parent(
    two_phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    code = cli.main([
        "train", "--method", "ct_only", "--ct", str(two_phantoms / "ct"), "--out", str(out), "--init", "demo",
        "--patch-size", "64", "--epochs", "1", "--iterations-per-epoch", "2", "--batch-size", "2",
        "--device", "cpu", "--set", "validation_fraction=0", "--progress", "none",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run = RunFolder(out)
    card = read_model_card(run.model_path)
    # The architecture and the input values the user left out come from the built-in model's card.
    assert card.architecture == "unet" and card.architecture_options == {"base_channels": 16}
    assert card.spacing_mm == (2.0, 2.0) and card.hu_window == (-1000.0, 500.0) and card.patch_size == 64
    assert card.parent == {"name": BUILTIN_NAME, "sha256": file_sha256(BUILTIN), "source": str(BUILTIN.resolve())}
    assert card.fine_tuned_on["ct_folder"] == str(two_phantoms / "ct")
    assert card.fine_tuned_on["ct_training_cases"] == 2 and card.fine_tuned_on["ct_validation_cases"] == 0
    assert card.training["init"] == "demo"
    config = json.loads(run.config_path.read_text())
    assert config["lr_segmentor"] == fine_tuning_lr(TrainConfig().lr_segmentor) == 2e-05
    log = run.log_path.read_text()
    assert "warning: patch_size 64 overrides the model's 128" in log
    assert "a tenth of the from-scratch" in log and "spacing_mm" not in log  # the card's spacing: no warning

    parent, child = weights(BUILTIN), weights(run.model_path)
    assert parent.keys() == child.keys()
    parameters = [name for name in parent if is_parameter(name)]
    # Changed by the two steps, but only by small ones from the parent's values (a random start is far away).
    assert any(not torch.equal(parent[name], child[name]) for name in parameters)
    assert max(float((parent[name] - child[name]).abs().max()) for name in parameters) < 1e-3

    capsys.readouterr()
    assert cli.main(["info", str(run.model_path)]) == 0
    printed = capsys.readouterr().out
    assert f"parent:        {BUILTIN_NAME} (sha256 {file_sha256(BUILTIN)})" in printed
    assert f"fine-tuned on: {two_phantoms / 'ct'} (2 training" in printed
    entry = ModelEntry(name="mine", source="user", path=run.model_path, card=peek_model_card(run.model_path))
    text = model_card_text(entry)
    assert f"Fine-tuned from: {BUILTIN_NAME} (sha256 {file_sha256(BUILTIN)[:12]}...)" in text
    assert "Fine-tuned on: " in text


def test_a_model_trained_from_scratch_has_no_lineage() -> None:
    card = read_model_card(BUILTIN)
    assert card.parent is None and card.fine_tuned_on is None
    assert "parent" not in card.to_dict() and "fine_tuned_on" not in card.to_dict()
    entry = ModelEntry(name="demo", source="builtin", path=BUILTIN, card=peek_model_card(BUILTIN))
    assert "Fine-tuned" not in model_card_text(entry)


# -- the architecture comes from the model --------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [["--segmentor", "densefcn"], ["--set", 'segmentor_options={"base_channels": 8}']],
    ids=["segmentor", "options"],
)
def test_an_architecture_that_conflicts_with_the_model_is_refused_with_exit_7(
    flags: list[str], two_phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    arguments = ["train", "--ct", str(two_phantoms / "ct"), "--out", str(out), "--init", "demo", "--device", "cpu"]
    assert cli.main(arguments + flags + ["--progress", "none"]) == 7
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("cmedl: error: --init demo is a unet")
    assert "conflicts" in error
    assert not out.exists()  # refused before the run folder is made


def test_the_same_architecture_given_explicitly_is_accepted_and_the_trainer_checks_the_rest(
    two_phantoms: Path, tmp_path: Path
) -> None:
    values = {"ct": str(two_phantoms / "ct"), "out": str(tmp_path / "run"), "init": str(BUILTIN),
              "segmentor": "unet", "segmentor_options": {"base_channels": 16}, "lr_segmentor": 1e-3}  # fmt: skip
    config = apply_init(TrainConfig.from_dict(values), values)
    assert config.lr_segmentor == 1e-3  # given: kept
    assert config.patch_size == 128 and config.spacing_mm == (2.0, 2.0)  # not given: the model's
    assert apply_init(TrainConfig.from_dict({"ct": "x", "out": "y"}), []).init == ""  # no init: unchanged
    # Without apply_init the trainer still refuses a configuration the model's weights do not fit.
    with pytest.raises(ConfigError, match="conflicts"):
        Trainer(TrainConfig.from_dict({"ct": "x", "out": str(tmp_path / "r"), "init": "demo", "device": "cpu"}))


# -- a CMEDL run folder as init -------------------------------------------------------------------------------


def test_a_cmedl_run_folder_starts_every_network_from_its_weights_but_not_its_optimisers(
    cmedl_run: Path, two_phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = RunFolder(cmedl_run)
    source_steps = source.load_checkpoint()["objective"]["optimizers"]["student"]["state"]
    assert source_steps and all(float(state["step"]) == 2 for state in source_steps.values())
    seen: dict = {}
    original_step = CMEDLObjective.step

    def first_step_recorded(self: CMEDLObjective, batch: dict) -> dict:
        if not seen:
            seen["student"] = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            seen["teacher"] = {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}
            seen["generator"] = {k: v.detach().clone() for k, v in self.translator.g_ct_to_mr.state_dict().items()}
            seen["whole translator"] = {k: v.detach().clone() for k, v in self.translator.state_dict().items()}
            seen["optimiser states"] = {name: len(opt.state) for name, opt in self.optimizers.items()}
        return original_step(self, batch)

    monkeypatch.setattr(CMEDLObjective, "step", first_step_recorded)
    given = {"method": "cmedl", "ct": str(two_phantoms / "ct"), "mr": str(two_phantoms / "mr"),
             "out": str(tmp_path / "run"), "init": str(cmedl_run), "vgg_weights": "random", "cx_max_positions": 64,
             "batch_size": 2, "iterations_per_epoch": 1, "epochs": 1, "validation_fraction": 0.0,
             "device": "cpu", "patch_size": 64}  # fmt: skip
    config = apply_init(TrainConfig.from_dict(given), given)
    # The architecture of every network is the source run's; the learning rates are the fine-tuning defaults.
    assert config.segmentor_options == {"base_channels": 4}
    assert config.translator_options == {"base_channels": 4, "n_blocks": 1}
    assert config.lr_translator == fine_tuning_lr(TrainConfig().lr_translator)
    assert Trainer(config).fit()["state"] == "finished"

    translator = weights(cmedl_run / "translator.safetensors")
    expected = {
        "student": weights(cmedl_run / "model.safetensors"),
        "teacher": {k[len("teacher.") :]: v for k, v in translator.items() if k.startswith("teacher.")},
        "generator": {k[len("generator.") :]: v for k, v in translator.items() if k.startswith("generator.")},
        # both generators and both discriminators, from the safetensors file written beside the translator
        "whole translator": weights(cmedl_run / CYCLEGAN_FILE),
    }
    assert any(name.startswith("d_") or "disc" in name for name in expected["whole translator"])
    for network, state in expected.items():
        assert state and seen[network].keys() == state.keys(), network
        for name, tensor in state.items():
            assert torch.equal(seen[network][name], tensor), (network, name)
    assert seen["optimiser states"] == {"generators": 0, "discriminators": 0, "teacher": 0, "student": 0}
    # One step of the new run, counted from zero: the source's two steps were not carried over.
    state = RunFolder(tmp_path / "run").load_checkpoint()["objective"]
    assert all(float(s["step"]) == 1 for s in state["optimizers"]["student"]["state"].values())
    assert state["schedulers"]["student"]["last_epoch"] == 1
    card = read_model_card(tmp_path / "run" / "model.safetensors")
    assert card.parent["run"] == str(cmedl_run.resolve())
    assert card.parent["sha256"] == file_sha256(cmedl_run / "model.safetensors")
    assert "CT->MR generator" in (tmp_path / "run" / "train.log").read_text()


# -- freezing the encoder, warming up -------------------------------------------------------------------------


def test_a_frozen_encoder_keeps_its_weights_for_the_frozen_epoch_and_a_resume_keeps_the_parent(
    tiny_parent: Path, two_phantoms: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    given = {"ct": str(two_phantoms / "ct"), "out": str(out), "init": str(tiny_parent), "freeze_encoder_epochs": 1,
             "epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "validation_fraction": 0.0, "device": "cpu",
             "augment": False}  # fmt: skip
    config = apply_init(TrainConfig.from_dict(given), given)
    # Stopped once the frozen first epoch is over: its model file is the student after that epoch.
    stop = threading.Event()

    def stop_after_epoch_1(event: dict) -> None:
        if event.get("stage") == "epoch" and event.get("done") == 1:
            stop.set()

    assert Trainer(config, CallbackProgress(stop_after_epoch_1, stop)).fit()["state"] == "stopped"
    assert [record["epoch"] for record in RunFolder(out).read_metrics()] == [1]
    network = build_segmentor("unet", base_channels=4)
    encoder = {id(p) for p in network.encoder_parameters()}
    names = {name: id(p) in encoder for name, p in network.named_parameters()}
    assert 0 < sum(names.values()) < len(names)
    parent, child = weights(tiny_parent), weights(out / "model.safetensors")
    for name, in_encoder in names.items():
        if in_encoder:
            assert torch.equal(parent[name], child[name]), name
    assert any(not torch.equal(parent[name], child[name]) for name, in_encoder in names.items() if not in_encoder)
    assert "frozen for the first 1 epoch" in (out / "train.log").read_text()

    # The second epoch is not frozen; the resumed run exports a card that still names the parent.
    assert Trainer.resume_run(out).fit()["state"] == "finished"
    resumed = weights(out / "model.safetensors")
    assert any(not torch.equal(parent[name], resumed[name]) for name, in_encoder in names.items() if in_encoder)
    assert read_model_card(out / "model.safetensors").parent["name"] == "tiny-parent"


def learning_rates(objective: CTOnlyObjective, epochs: int) -> list[list[float]]:
    rates = []
    for _ in range(epochs):
        rates.append([group["lr"] for group in objective.optimizers["student"].param_groups])
        objective.end_epoch()
    return rates


# The schedules are stepped without optimiser steps here, which torch warns about; only the rates matter.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_encoder_group_is_held_at_zero_and_warm_up_rises_linearly(tiny_parent: Path) -> None:
    base = {"ct": "ct", "out": "run", "segmentor_options": {"base_channels": 4}, "epochs": 8, "lr_decay_fraction": 0.5}
    plain = CTOnlyObjective(TrainConfig.from_dict(base).validate(), torch.device("cpu"), None)
    # Unchanged without the fine-tuning options: constant for half the epochs, then a linear decay.
    assert [r[0] / 2e-4 for r in learning_rates(plain, 8)] == pytest.approx([1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    config = TrainConfig.from_dict({**base, "init": str(tiny_parent), "freeze_encoder_epochs": 2,
                                    "warmup_epochs": 3}).validate()  # fmt: skip
    rates = learning_rates(CTOnlyObjective(config, torch.device("cpu"), None), 5)
    encoder, rest = [r[0] / 2e-4 for r in rates], [r[1] / 2e-4 for r in rates]
    assert rest == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.8])
    assert encoder == pytest.approx([0.0, 0.0, 0.75, 1.0, 0.8])


def test_fine_tuning_values_are_validated() -> None:
    with pytest.raises(ConfigError, match="freeze_encoder_epochs needs init"):
        TrainConfig.from_dict({"ct": "x", "out": "y", "freeze_encoder_epochs": 2}).validate()
    with pytest.raises(ConfigError, match="warmup_epochs must be 0 or more"):
        TrainConfig.from_dict({"ct": "x", "out": "y", "warmup_epochs": -1}).validate()
    assert TrainConfig().init == "" and TrainConfig().freeze_encoder_epochs == TrainConfig().warmup_epochs == 0


# -- CMEDL Train's settings ------------------------------------------------------------------------------------


PANEL = {"epochs": 3, "iterations_per_epoch": 2, "batch_size": 1, "device": "cpu",
         "extra": {"segmentor_options": {"base_channels": 2}}}  # fmt: skip


def test_the_panel_settings_fill_in_from_a_model_card(two_phantoms: Path, tmp_path: Path) -> None:
    implied = settings_from_model("demo")
    assert implied == {
        "init": "demo", "segmentor": "unet", "patch_size": 128, "spacing_mm": 2.0, "lr_segmentor": 2e-05,
        "extra": {"segmentor_options": {"base_channels": 16}, "hu_window": (-1000.0, 500.0)},
    }  # fmt: skip
    settings = start_from_model(TrainingSettings(**PANEL, segmentor="mrrn"), "demo")
    assert settings.epochs == 3 and settings.segmentor == "unet" and settings.init == "demo"
    assert settings.extra["segmentor_options"] == {"base_channels": 16}
    folders = DataFolders(ct_images=str(two_phantoms / "ct" / "images"), ct_labels=str(two_phantoms / "ct" / "labels"))
    assert settings_problem(settings, folders) == ""
    config = training_config(settings, folders, tmp_path / "run")
    assert config.init == "demo" and config.segmentor_options == {"base_channels": 16}
    assert config.patch_size == 128 and config.spacing_mm == (2.0, 2.0) and config.lr_segmentor == 2e-05
    # A segmentor changed after the model was chosen is refused with the engine's reason.
    problem = settings_problem(dataclasses.replace(settings, segmentor="densefcn"), folders)
    assert problem.startswith("--init demo is a unet network") and "conflicts" in problem
    assert start_from_model(settings, "").init == ""


def test_the_panel_settings_fill_in_from_a_cmedl_run_folder(cmedl_run: Path) -> None:
    implied = settings_from_model(cmedl_run)
    assert implied["method"] == "cmedl" and implied["init"] == str(cmedl_run)
    assert implied["patch_size"] == 64 and implied["spacing_mm"] == 4.0
    assert implied["lr_translator"] == fine_tuning_lr(TrainConfig().lr_translator)
    assert implied["extra"]["translator"] == "cyclegan"
    assert implied["extra"]["translator_options"] == {"base_channels": 4, "n_blocks": 1}
