"""The command line as a user runs it: real child processes, real files, exit codes and one-line errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import PROJECT_ROOT, run_cmedl, shared_data

from cmedl import __version__, cli
from cmedl.cli import build_parser, main, train_config_from_args
from cmedl.errors import InputError
from cmedl.volumes import read_volume, same_geometry


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cmedl: error:"), stderr
    return lines[0]


def test_version_and_help() -> None:
    result = run_cmedl("--version")
    assert result.returncode == 0 and __version__ in result.stdout
    result = run_cmedl("--help")
    for command in ("segment", "translate", "lungs", "train", "phantom", "info", "models", "demo", "bench"):
        assert command in result.stdout


def test_the_console_script_is_the_command_line_process_as_python_dash_m_is() -> None:
    # Inference sets torch's threads only in the command-line process: the installed `cmedl` script must mark
    # itself as `python -m cmedl` does, and calling `main` as a library must not.
    import tomllib

    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cmedl"] == "cmedl.cli:console"
    probe = (
        "import sys\n"
        "from cmedl import cli, cpu\n"
        "cli.main(['models', 'path'])\n"
        "print('library', cpu.is_cli_process())\n"
        "sys.argv = ['cmedl', 'models', 'path']\n"
        "try:\n"
        "    cli.console()\n"
        "except SystemExit as stop:\n"
        "    print('console', cpu.is_cli_process(), stop.code)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr
    assert "library False" in result.stdout and "console True 0" in result.stdout


def test_a_reader_that_stops_early_gets_no_traceback_and_no_error_line() -> None:
    # `cmedl info demo | head -1`: writing to a pipe whose reader has gone raises BrokenPipeError.
    probe = (
        "import os, sys\n"
        "from cmedl.cli import main\n"
        "_, write_end = os.pipe()\n"
        "class ClosedPipe:\n"
        "    def write(self, text): raise BrokenPipeError(32, 'Broken pipe')\n"
        "    def flush(self): pass\n"
        "    def fileno(self): return write_end\n"
        "sys.stdout = ClosedPipe()\n"
        "code = main(['info', 'demo'])\n"
        "sys.stderr.write(f'CODE {code}')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.stderr == "CODE 141", result.stderr


def test_lungs_writes_masks_on_the_ct_grid_and_reports_json(tmp_path: Path) -> None:
    ct_path = shared_data("ct_lungmask/cip_ct-64.nrrd")
    lungs_out, roi_out = tmp_path / "lungs.nii.gz", tmp_path / "roi.nrrd"
    result = run_cmedl("lungs", str(ct_path), "--lungs-out", str(lungs_out), "--roi-out", str(roi_out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    ct = read_volume(ct_path)
    lungs, roi = read_volume(lungs_out), read_volume(roi_out)
    assert same_geometry(lungs, ct) and same_geometry(roi, ct)
    lung_voxels = sitk.GetArrayFromImage(lungs).astype(bool)
    voxel_ml = np.prod(ct.GetSpacing()) / 1000
    assert summary["lung_volume_ml"] == np.count_nonzero(lung_voxels) * voxel_ml
    first, last = summary["slice_range"]
    assert np.flatnonzero(lung_voxels.any(axis=(1, 2))).tolist() == list(range(first, last + 1))
    assert (sitk.GetArrayFromImage(roi).astype(bool) >= lung_voxels).all()
    assert len(summary["roi_box"]) == 3


def test_lungs_on_an_abdomen_says_no_lungs_found_and_writes_nothing(tmp_path: Path) -> None:
    abdomen = shared_data("ct_nolabel/totalseg_example_ct_dicom")
    lungs_out, roi_out = tmp_path / "lungs.nii.gz", tmp_path / "roi.nii.gz"
    result = run_cmedl("lungs", str(abdomen), "--lungs-out", str(lungs_out), "--roi-out", str(roi_out))
    assert result.returncode == 2
    assert "no lungs found" in _one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path: Path) -> None:
    source = shared_data("ct_lungmask/cip_ct-64.nrrd")
    ct_path = tmp_path / "ct.nrrd"
    ct_path.write_bytes(source.read_bytes())
    before = hashlib.sha256(ct_path.read_bytes()).hexdigest()
    result = run_cmedl("lungs", str(ct_path), "--lungs-out", str(ct_path))
    assert result.returncode == 3
    _one_error_line(result.stderr)
    result = run_cmedl("segment", str(ct_path), "-o", str(ct_path))
    assert result.returncode == 3
    assert hashlib.sha256(ct_path.read_bytes()).hexdigest() == before


def test_phantom_writes_an_unpaired_dataset(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = run_cmedl("phantom", str(out), "--ct", "2", "--mr", "1", "--seed", "3", "--size", "64")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "ct" / "images").iterdir()) == ["ct_0000.nii.gz", "ct_0001.nii.gz"]
    assert sorted(p.name for p in (out / "ct" / "labels").iterdir()) == ["ct_0000.nii.gz", "ct_0001.nii.gz"]
    assert [p.name for p in (out / "mr" / "images").iterdir()] == ["mr_0000.nii.gz"]
    description = json.loads((out / "phantoms.json").read_text())
    assert description["paired"] is False and len(description["cases"]) == 3
    refused = run_cmedl("phantom", str(tmp_path / "none"), "--ct", "0", "--mr", "0")
    assert refused.returncode == 3
    _one_error_line(refused.stderr)
    assert not (tmp_path / "none").exists()


def test_train_vgg_weights_flag_overrides_the_config_file_and_help_names_both_methods(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"method": "cmedl", "vgg_weights": "/weights/vgg16.pth", "epochs": 3}))
    parser = build_parser()
    args = parser.parse_args(["train", "--config", str(config_file), "--vgg-weights", "random", "--seed", "2"])
    config = train_config_from_args(args)
    assert (config.vgg_weights, config.method, config.epochs, config.seed) == ("random", "cmedl", 3, 2)
    # without the flag the file's value stays; --set still applies after the named flags
    assert train_config_from_args(parser.parse_args(["train", "--config", str(config_file)])).vgg_weights == (
        "/weights/vgg16.pth"
    )
    args = parser.parse_args(["train", "--vgg-weights", "random", "--set", "vgg_weights=/other.pth"])
    assert train_config_from_args(args).vgg_weights == "/other.pth"

    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "cmedl" in text.replace("usage: cmedl", "") and "ct_only" in text and "--vgg-weights" in text


def test_the_flags_defaults_and_choices_are_the_engines() -> None:
    """The command line held its own copies of the device names (five of them), of SegmentOptions' defaults and
    checks, and of the training methods and segmentors; it takes them from the engine."""
    from cmedl.devices import DEVICES
    from cmedl.segment_options import SegmentOptions
    from cmedl.training.choices import METHODS, SEGMENTORS

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices

    def choices(command: str, flag: str) -> tuple:
        return tuple(next(action for action in commands[command]._actions if action.dest == flag).choices)

    for command in ("segment", "translate", "train", "demo", "bench"):
        assert choices(command, "device") == DEVICES, command
    assert choices("train", "method") == METHODS and choices("train", "segmentor") == SEGMENTORS
    assert cli._segment_options(parser.parse_args(["segment", "ct.nrrd", "-o", "out.nrrd"])) == SegmentOptions()
    lungs = parser.parse_args(["lungs", "ct.nrrd"])
    assert (lungs.threshold, lungs.margin) == (SegmentOptions().lung_threshold_hu, SegmentOptions().roi_margin_mm)
    for flags in (["--threshold", "1.5"], ["--batch-size", "0"]):
        args = parser.parse_args(["segment", "ct.nrrd", "-o", "out.nrrd", *flags])
        with pytest.raises(InputError) as refused:
            cli._segment_options(args)
        with pytest.raises(InputError) as engine:
            SegmentOptions(probability_threshold=args.threshold, batch_size=args.batch_size).validate()
        assert str(refused.value) == str(engine.value)


def test_runs_lists_a_folders_training_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``cmedl runs``: what CMEDL Train's runs list shows, from a shell."""
    finished = tmp_path / "runs" / "cmedl-unet"
    finished.mkdir(parents=True)
    (finished / "config.json").write_text(json.dumps({"method": "cmedl", "epochs": 5}))
    status = {"state": "finished", "epoch": 5, "epochs": 5, "best_validation_dice": 0.7123, "best_epoch": 4}
    (finished / "status.json").write_text(json.dumps(status))
    crashed = tmp_path / "runs" / "ct-only"
    crashed.mkdir()
    (crashed / "config.json").write_text(json.dumps({"method": "ct_only", "epochs": 10}))
    (crashed / "status.json").write_text(json.dumps({"state": "running", "epoch": 2, "epochs": 10}))
    (tmp_path / "runs" / "notes").mkdir()

    assert main(["runs", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "METHOD", "STATE", "EPOCH", "BEST", "VALIDATION", "DICE"] and len(lines) == 3
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows[str(finished)] == ["cmedl", "finished", "5/5", "0.712", "(epoch", "4)"]
    assert rows[str(crashed)] == ["ct_only", "interrupted", "2/10"], "a run whose process is gone is not running"
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    listed = {Path(run["run"]).name: run for run in json.loads(capsys.readouterr().out)["runs"]}
    assert listed["cmedl-unet"]["best_validation_dice"] == 0.7123 and listed["ct-only"]["alive"] is False
    assert main(["runs", str(tmp_path / "missing")]) == 3
