"""Model files: safetensors + model card round trip, no pickle, corrupt files, describe_model, ``cmedl info``."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cmedl
from safetensors import safe_open
from safetensors.torch import save_file

from cmedl.errors import ModelFileError, OutputError
from cmedl.modelcard import LabelInfo, describe_model
from cmedl.modelfile import (
    CARD_KEY,
    FORMAT_KEY,
    ModelCard,
    load_model,
    read_model_card,
    save_model,
)
from cmedl.nets import build_segmentor, count_parameters
from cmedl.volumes import SegmentInfo

ROOT = Path(__file__).resolve().parents[1]
NODULE_TERMS = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^27925004^Nodule~^^~^^~^^~^^"
)


def _card(**changes) -> ModelCard:
    values = dict(
        name="tiny unet",
        architecture="unet",
        architecture_options={"base_channels": 4},
        num_classes=3,
        hu_window=(-1100.0, 400.0),
        spacing_mm=(0.8, 0.75),
        patch_size=64,
        labels=[
            LabelInfo(value=1, name="Lung tumour", color=(0.85, 0.32, 0.26), terminology=SegmentInfo().terminology),
            LabelInfo(value=2, name="Nodule", color=(0.1, 0.5, 0.9), terminology=NODULE_TERMS),
        ],
        training_data={"ct_cases": 12, "mri_cases": 7},
        metrics={"val_dice": 0.71},
        description="test network",
    )
    values.update(changes)
    return ModelCard(**values)


def _network(base_channels: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    network = build_segmentor("unet", in_channels=1, num_classes=3, base_channels=base_channels)
    # A training step's worth of batch statistics, so the buffers differ from their initial values and
    # a file that dropped them would give different outputs.
    network.train()
    with torch.no_grad():
        network(torch.randn(2, 1, 32, 32) * 3 + 1)
    return network.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module, ModelCard]:
    network = _network()
    card = _card()
    path = save_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", network, card)
    return path, network, card


def test_round_trip_outputs_and_card(saved):
    path, network, card = saved
    loaded = load_model(path)
    assert not loaded.network.training
    assert loaded.path == path
    x = torch.randn(1, 1, 48, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = network(x)
        actual = loaded.network(x)
    assert actual.shape == (1, 3, 48, 32)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)

    assert loaded.card.to_dict() == card.to_dict()
    assert loaded.card.labels == card.labels
    assert loaded.card.hu_window == (-1100.0, 400.0)
    assert loaded.card.spacing_mm == (0.8, 0.75)
    assert loaded.card.segment_infos()[1] == SegmentInfo("Nodule", 2, (0.1, 0.5, 0.9), NODULE_TERMS)
    assert read_model_card(path).to_dict() == card.to_dict()


def test_file_is_plain_safetensors_with_the_card(saved):
    path, network, card = saved
    raw = path.read_bytes()
    # safetensors layout: 8-byte little-endian header length, then a JSON header. A torch.save file is a zip
    # ("PK") around a pickle; a bare pickle starts with the 0x80 protocol opcode.
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_length])
    assert raw[:2] != b"PK" and raw[0] != 0x80
    assert "__metadata__" in header

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert metadata[FORMAT_KEY].startswith("cmedl-model/")
        assert json.loads(metadata["cmedl.model_card"]) == json.loads(json.dumps(card.to_dict()))
        state = network.state_dict()
        assert set(handle.keys()) == set(state)
        for name, tensor in state.items():
            assert torch.equal(handle.get_tensor(name), tensor), name


class _RunsCodeWhenUnpickled:
    """Creates a folder when unpickled: proof that a loader executed code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_pickle_named_safetensors_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.safetensors"
    torch.save({"weights": _RunsCodeWhenUnpickled(marker)}, path)
    for reader in (load_model, describe_model, read_model_card):
        with pytest.raises(ModelFileError, match="evil.safetensors"):
            reader(path)
    assert not marker.exists()


def _truncated(tmp_path: Path, good: Path) -> Path:
    data = good.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_bytes(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    return path


def _empty(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return path


def _missing(tmp_path: Path, good: Path) -> Path:
    return tmp_path / "absent.safetensors"


def _no_card(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(path))
    return path


def _unknown_architecture(tmp_path: Path, good: Path) -> Path:
    return save_model(tmp_path / "unknown_arch.safetensors", _network(), _card(architecture="transunet"))


def _options_do_not_match(tmp_path: Path, good: Path) -> Path:
    card = _card(architecture_options={"base_channels": 8})
    return save_model(tmp_path / "mismatch.safetensors", _network(base_channels=4), card)


def _damaged_card(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "damaged_card.safetensors"
    card = {"name": "x", "architecture": "unet", "labels": [{"value": 1}]}
    save_file({"weight": torch.zeros(2)}, str(path), metadata={FORMAT_KEY: "cmedl-model/1", CARD_KEY: json.dumps(card)})
    return path


def _card_not_an_object(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "list_card.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={FORMAT_KEY: "cmedl-model/1", CARD_KEY: "[1, 2]"})
    return path


def _nan_weights(tmp_path: Path, good: Path) -> Path:
    network = _network()
    with torch.no_grad():
        next(network.parameters())[0].fill_(float("nan"))
    return save_model(tmp_path / "diverged.safetensors", network, _card())


def _folder(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "models.safetensors"
    path.mkdir()
    return path


BROKEN = [
    _folder,
    _nan_weights,
    _truncated,
    _random_bytes,
    _empty,
    _missing,
    _no_card,
    _unknown_architecture,
    _options_do_not_match,
    _damaged_card,
    _card_not_an_object,
]


@pytest.mark.parametrize("make", BROKEN)
def test_broken_model_files_raise_one_line_model_file_error(tmp_path, saved, make):
    path = make(tmp_path, saved[0])
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message


@pytest.mark.parametrize("make", [_truncated, _random_bytes, _empty, _no_card, _damaged_card])
def test_describe_refuses_unreadable_files(tmp_path, saved, make):
    with pytest.raises(ModelFileError):
        describe_model(make(tmp_path, saved[0]))


def test_a_folder_is_called_a_folder(tmp_path, saved):
    with pytest.raises(ModelFileError, match="is a folder, not a model file"):
        load_model(_folder(tmp_path, saved[0]))


def test_non_finite_weights_are_named_and_refused_by_models_add_too(tmp_path, saved, monkeypatch):
    path = _nan_weights(tmp_path, saved[0])
    with pytest.raises(ModelFileError, match="NaN or infinite values .first: .*diverged"):
        load_model(path)
    monkeypatch.setenv("CMEDL_HOME", str(tmp_path / "home"))
    added = run_cmedl("models", "add", str(path), "--name", "diverged")
    assert added.returncode == 4 and added.stderr.count("\n") == 1 and "NaN or infinite" in added.stderr


def test_mismatch_message_names_the_disagreement(tmp_path, saved):
    with pytest.raises(ModelFileError) as caught:
        load_model(_options_do_not_match(tmp_path, saved[0]))
    message = str(caught.value)
    assert "base_channels" in message and "size mismatch" in message


def test_describe_model(saved):
    path, network, card = saved
    info = describe_model(path)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["parameters"] == count_parameters(network)
    assert info["size_bytes"] == path.stat().st_size
    assert Path(info["file"]) == path
    assert info["model_card"] == card.to_dict()
    assert load_model(path).sha256 == info["sha256"]


def test_save_is_atomic_and_readable_by_others(tmp_path):
    taken = tmp_path / "taken.safetensors"
    taken.mkdir()
    with pytest.raises(OutputError):
        save_model(taken, _network(), _card())
    assert [entry.name for entry in tmp_path.iterdir()] == ["taken.safetensors"]

    previous = os.umask(0o022)
    try:
        path = save_model(tmp_path / "shared.safetensors", _network(), _card())
    finally:
        os.umask(previous)
    # A model registered for other users of the workstation must be readable by them.
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["shared.safetensors", "taken.safetensors"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "cmedl", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_info(saved):
    path, network, card = saved
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    result = _cli("info", str(path))
    assert result.returncode == 0, result.stderr
    assert sha256 in result.stdout
    assert card.name in result.stdout

    result = _cli("info", str(path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["sha256"] == sha256
    assert info["parameters"] == count_parameters(network)
    assert info["model_card"]["labels"][1]["name"] == "Nodule"


@pytest.mark.parametrize("make", [_truncated, _damaged_card])
def test_cli_info_on_a_corrupt_model(tmp_path, saved, make):
    path = make(tmp_path, saved[0])
    result = _cli("info", str(path))
    assert result.returncode == 4
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cmedl: error:") and path.name in lines[0]
