"""The command line as a user runs it: real child processes, real files, exit codes and one-line errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import PROJECT_ROOT, run_cmedl, shared_data

from cmedl import __version__
from cmedl.cli import build_parser, main, train_config_from_args
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
