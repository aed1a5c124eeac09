"""``cmedl train`` refusing bad inputs early, in one line, and leaving files any reader can parse.

Each test reproduces a fault found by trying bad inputs on real files:

- an MRI folder given as the CT folder trained without a word (now: exit 5, the file named);
- NaN voxels in a training image surfaced steps later as a "non-finite loss, lower the learning rate" (now: exit 3
  when the file is read, with the count);
- a damaged ``checkpoint.pt`` (text, cut short, empty) failed with torch's words after the data were prepared
  (now: before the data, saying what is wrong with the file);
- relative ``--ct`` paths were stored as given, so ``--resume`` from another directory failed;
- a one-case dataset wrote a bare ``NaN`` into ``metrics.jsonl`` (not JSON) and logged "validation Dice nan";
- ``--method cmedl`` without VGG16 weights prepared the data and printed a download line before failing.

The runs are tiny: two 64x64 CT phantoms and one MRI phantom, 32x32 patches, a 4-channel U-Net, one iteration.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import PROJECT_ROOT, SECONDS_RUN

from cmedl.cli import main
from cmedl.errors import ConfigError
from cmedl.training.config import TrainConfig
from cmedl.training.runfolder import RunFolder
from cmedl.training.runs import read_run
from cmedl.training.trainer import Trainer

#: a run that takes seconds (no validation unless a test asks)
RUN = SECONDS_RUN
#: the same for CMEDL: a one-block translator, few contextual-loss positions (VGG weights chosen by each test)
CMEDL_RUN = {**RUN, "method": "cmedl", "translator_options": {"base_channels": 4, "n_blocks": 1},
             "cx_max_positions": 16}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``ct/`` with two CT phantoms and ``mr/`` with one MRI phantom (64x64 in-plane), images/ and labels/ each."""
    from cmedl.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("training_inputs")
    write_phantom_dataset(root, n_ct=2, n_mr=1, seed=3, size=64)
    return root


def write_config(path: Path, **values) -> Path:
    path.write_text(json.dumps({**RUN, **values}))
    return path


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """What the command wrote to stderr, line by line."""
    return capsys.readouterr().err.strip().splitlines()


def strict_json(text: str) -> object:
    """``json.loads`` that refuses ``NaN`` and ``Infinity``, as JavaScript, ``jq`` and most readers do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def copy_case(source: Path, target: Path, name: str) -> None:
    """Copy case ``name`` (image and label) of dataset folder ``source`` into ``target``."""
    for kind in ("images", "labels"):
        (target / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / kind / f"{name}.nii.gz", target / kind / f"{name}.nii.gz")


def with_non_finite_voxels(path: Path, value: float) -> None:
    """Rewrite the volume at ``path`` as float32 with ``value`` in a 3x3 patch of its middle slice."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[array.shape[0] // 2, :3, :3] = value
    rewritten = sitk.GetImageFromArray(array)
    rewritten.CopyInformation(image)
    sitk.WriteImage(rewritten, str(path))


# -- 1. an MRI given as CT --------------------------------------------------------------------------------------


def test_mri_images_in_the_ct_or_validation_folder_are_refused_naming_the_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--ct", str(data / "mr"), "--out", str(out)]) == 5
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert str(data / "mr" / "images" / "mr_0000.nii.gz") in lines[0] and "does not look like a CT" in lines[0]
    assert "MRI folder" in lines[0]
    assert RunFolder(out).read_status()["state"] == "failed" and not RunFolder(out).has_checkpoint()

    # The validation CTs are held to the same test; the CT phantoms pass it.
    validated = tmp_path / "validated"
    command = ["train", "--config", str(config), "--ct", str(data / "ct"), "--out", str(validated)]
    assert main([*command, "--set", f"validation={data / 'mr'}"]) == 5
    lines = error_lines(capsys)
    assert lines[-1].startswith("cmedl: error: ") and "mr_0000.nii.gz does not look like a CT" in lines[-1], lines


# -- 2. NaN and infinite voxels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damaged", "value", "method"),
    [("ct/images/ct_0001.nii.gz", np.nan, "ct_only"), ("mr/images/mr_0000.nii.gz", np.inf, "cmedl"),
     ("ct/labels/ct_0000.nii.gz", np.nan, "ct_only")],
    ids=["ct-nan", "mr-inf", "float-label-nan"],
)  # fmt: skip
def test_non_finite_voxels_are_refused_when_read_naming_file_and_count(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damaged: str, value: float, method: str
) -> None:
    copy = tmp_path / "data"
    for modality in ("ct", "mr"):
        shutil.copytree(data / modality, copy / modality)
    with_non_finite_voxels(copy / damaged, value)
    values = CMEDL_RUN | {"vgg_weights": "random"} if method == "cmedl" else RUN
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**values, "ct": str(copy / "ct"), "mr": str(copy / "mr")}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 3
    lines = error_lines(capsys)
    assert len(lines) == 1, lines  # nothing before it: the error comes as the file is read
    assert str(copy / damaged) in lines[-1] and "9 voxels" in lines[-1] and "NaN or infinite" in lines[-1], lines
    assert not RunFolder(out).has_checkpoint() and not (out / "metrics.jsonl").exists()


# -- 3. a damaged checkpoint --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(data: Path, tmp_path_factory) -> Path:
    """A finished one-epoch run (a checkpoint and a model), to copy and damage."""
    out = tmp_path_factory.mktemp("finished") / "run"
    config = TrainConfig.from_dict({**RUN, "ct": str(data / "ct"), "out": str(out)})
    assert Trainer(config).fit()["state"] == "finished"
    return out


@pytest.mark.parametrize(
    ("damage", "expected"),
    [("text", "is not a training checkpoint"), ("truncated", "is truncated or damaged"), ("empty", "is empty")],
)
def test_a_damaged_checkpoint_is_named_before_the_data_are_read_and_kept(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage: str, expected: str
) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    run = RunFolder(out)
    whole = run.checkpoint_path.read_bytes()
    damaged = {"text": b"not a checkpoint\n", "truncated": whole[: len(whole) // 2], "empty": b""}[damage]
    run.checkpoint_path.write_bytes(damaged)
    metrics, model = run.metrics_path.read_text(), run.model_path.read_bytes()
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 3
    lines = error_lines(capsys)
    # One line and nothing before it: the data were not prepared ("data: ... prepared" would come first).
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cmedl: error: checkpoint {run.checkpoint_path} {expected}"), lines
    assert f"--init {out}" in lines[0]  # the way on from the run's best model
    assert "data:" not in run.log_path.read_text().split("finished 1 epochs")[-1]
    # Nothing is lost: the damaged file, the metrics and the model are as they were; the run says why it failed.
    assert run.checkpoint_path.read_bytes() == damaged
    assert run.metrics_path.read_text() == metrics and run.model_path.read_bytes() == model
    assert run.read_status()["state"] == "failed" and expected in run.read_status()["message"]
    assert not run.lock_path.exists()


# -- 4. relative data paths ------------------------------------------------------------------------------------


def test_relative_data_paths_are_stored_absolute_so_a_resume_works_from_anywhere(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    (start / "data").symlink_to(data)
    config = write_config(tmp_path / "config.json")
    monkeypatch.chdir(start)
    assert main(["train", "--config", str(config), "--ct", "data/ct", "--out", "run"]) == 0
    run = RunFolder(start / "run")
    # Absolute, and still the path as given (the link is not resolved).
    assert json.loads(run.config_path.read_text())["ct"] == str(start / "data" / "ct")

    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(run.path), "--epochs", "2"]) == 0
    assert [record["epoch"] for record in run.read_metrics()] == [1, 2]

    # A run whose config.json holds a relative path (written by an older version): from elsewhere it is refused in
    # one line that says why, and nothing changes; from the directory it was started in it resumes, and from then
    # on its config.json holds the absolute path.
    saved = json.loads(run.config_path.read_text())
    run.write_json("config.json", {**saved, "ct": "data/ct"})
    capsys.readouterr()
    assert main(["train", "--resume", str(run.path), "--epochs", "3"]) == 3
    lines = error_lines(capsys)
    assert len(lines) == 1 and str(run.config_path) in lines[0] and "'data/ct'" in lines[0], lines
    assert "directory the run was started in" in lines[0]
    assert [record["epoch"] for record in run.read_metrics()] == [1, 2]
    monkeypatch.chdir(start)
    assert main(["train", "--resume", str(run.path), "--epochs", "3"]) == 0
    assert [record["epoch"] for record in run.read_metrics()] == [1, 2, 3]
    assert json.loads(run.config_path.read_text())["ct"] == str(start / "data" / "ct")


# -- 5. no validation score --------------------------------------------------------------------------------------


def test_a_one_case_dataset_writes_strict_json_and_says_once_why_there_is_no_validation_dice(
    data: Path, tmp_path: Path
) -> None:
    one = tmp_path / "one"
    copy_case(data / "ct", one, "ct_0000")
    out = tmp_path / "run"
    config = TrainConfig.from_dict({**RUN, "ct": str(one), "out": str(out), "epochs": 2, "validation_fraction": 0.2})
    assert Trainer(config).fit()["state"] == "finished"
    run = RunFolder(out)
    lines = run.metrics_path.read_text().splitlines()
    records = [strict_json(line) for line in lines]
    assert [record["epoch"] for record in records] == [1, 2]
    assert all(record["validation_dice"] is None for record in records)
    strict_json(run.status_path.read_text())
    log = run.log_path.read_text()
    assert log.count("validation: none") == 1 and "holds 1 case(s)" in log, log
    assert "Dice nan" not in log
    # The readers take the nulls: the run's own, and what CMEDL Train and `cmedl runs` show.
    assert [record["validation_dice"] for record in run.read_metrics()] == [None, None]
    snapshot = read_run(out)
    assert snapshot.best_validation_dice is None and set(snapshot.last_losses) == {"seg_ct"}
    assert "finished" in snapshot.summary_line()


def test_non_finite_values_of_older_files_are_read_as_none_and_written_as_null(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.metrics_path.write_text(
        '{"epoch": 1, "loss_seg_ct": 0.5, "validation_dice": NaN}\n{"epoch": 2, "loss_seg_ct": Infinity}\n'
    )
    assert run.read_metrics() == [
        {"epoch": 1, "loss_seg_ct": 0.5, "validation_dice": None},
        {"epoch": 2, "loss_seg_ct": None},
    ]
    assert read_run(tmp_path).last_losses == {}  # a term without a number is left out, not a crash
    run.truncate_metrics(1)  # what a resume does: the kept lines are rewritten as strict JSON
    assert [strict_json(line) for line in run.metrics_path.read_text().splitlines()] == [
        {"epoch": 1, "loss_seg_ct": 0.5, "validation_dice": None}
    ]
    run.append_metrics({"epoch": 2, "validation_dice": np.float32("nan"), "loss_seg_ct": float("inf")})
    run.write_status({"state": "running", "best_validation_dice": -float("inf"), "last_losses": {"a": np.nan}})
    assert strict_json(run.metrics_path.read_text().splitlines()[-1]) == {
        "epoch": 2, "validation_dice": None, "loss_seg_ct": None
    }  # fmt: skip
    assert strict_json(run.status_path.read_text()) == {
        "state": "running", "best_validation_dice": None, "last_losses": {"a": None}
    }  # fmt: skip


# -- 6. the contextual loss's VGG16 weights -------------------------------------------------------------------------


def test_a_missing_vgg_weights_file_fails_before_the_data_are_read(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    absent = tmp_path / "vgg16.pth"
    config = TrainConfig.from_dict(
        {**CMEDL_RUN, "ct": str(data / "ct"), "mr": str(data / "mr"), "out": str(out), "vgg_weights": str(absent)}
    )
    with pytest.raises(ConfigError, match=f"VGG16 weights file not found: {absent}"):
        Trainer(config).fit()
    run = RunFolder(out)
    assert not run.volume_cache_path.exists() and "data:" not in run.log_path.read_text()
    assert run.read_status()["state"] == "failed" and "VGG16" in run.read_status()["message"]


def test_a_failed_vgg_download_fails_before_the_data_in_one_line_and_prints_nothing_else(
    data: Path, tmp_path: Path
) -> None:
    # A proxy nobody listens on: the download from torch hub fails at once, without the network, as it does on a
    # machine that is offline (without CMEDL_OFFLINE=1, which skips the download).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if key.lower() not in ("no_proxy", "cmedl_offline")}
    env.update(PYTHONPATH=str(PROJECT_ROOT), TORCH_HOME=str(tmp_path / "torch"), https_proxy=proxy,
               HTTPS_PROXY=proxy, http_proxy=proxy, HTTP_PROXY=proxy, OMP_NUM_THREADS="1")  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CMEDL_RUN, "ct": str(data / "ct"), "mr": str(data / "mr")}))
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cmedl", "train", "--config", str(config), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert result.stdout == ""  # torch hub's "Downloading: ..." line is not let through
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmedl: error: no ImageNet VGG16 weights"), lines
    assert "download failed" in lines[0] and "--vgg-weights random" in lines[0]
    run = RunFolder(out)
    assert not run.volume_cache_path.exists() and "data:" not in run.log_path.read_text()
    assert not any((tmp_path / "torch").rglob("*.pth"))


def test_validation_without_a_score_still_exports_a_model_and_does_not_stop_early(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation cases without tumour, where the student marks none either, have no Dice (weighted_dice's NaN:
    both masks empty; stood in for here, since a barely trained student's false positives are not controllable).
    Such epochs must neither leave the run without a model nor count towards early stopping."""
    from cmedl.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "weighted_dice", lambda predicted, truth, weights: float("nan"))
    out = tmp_path / "run"
    config = TrainConfig.from_dict({**RUN, "ct": str(data / "ct"), "out": str(out), "epochs": 3,
                                    "validation_fraction": 0.5, "early_stopping_patience": 1})  # fmt: skip
    status = Trainer(config).fit()
    assert status["state"] == "finished" and "early stopping" not in status["message"], status["message"]
    run = RunFolder(out)
    assert [record["epoch"] for record in run.read_metrics()] == [1, 2, 3]
    assert run.model_path.is_file()
    log = run.log_path.read_text()
    assert log.count("is undefined") == 1 and "the latest student is exported" in log
