"""The model catalogue: torch-free model cards, user models, downloads with sha256, ``cmedl models ...``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, run_cmedl
from safetensors.torch import save_file

from cmedl import catalogue, filebase, modelfile
from cmedl.catalogue import (
    ModelEntry,
    add_model,
    builtin_model_path,
    cache_dir,
    cached_model_path,
    card_summary,
    cmedl_home,
    list_models,
    load_catalogue,
    remove_model,
    resolve_model,
    user_models_dir,
)
from cmedl.downloads import clear_cache, download_model
from cmedl.errors import CancelledError, ConfigError, InputError, ModelFileError
from cmedl.filebase import peek_model_card
from cmedl.modelcard import LabelInfo
from cmedl.modelfile import ModelCard, read_model_card, save_model, save_translator
from cmedl.nets import build_segmentor
from cmedl.progress import CallbackProgress, Progress
from cmedl.volumes import SegmentInfo

LICENSE = "CC-BY-NC-4.0: research use only, attribution required"
# Nothing listens on the discard port of the loopback interface: a connection there fails at once.
UNREACHABLE_URL = "http://127.0.0.1:9/models/lungnet.safetensors"


def _tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_segmentor("unet", in_channels=1, num_classes=3, base_channels=2)


def _card(**changes) -> ModelCard:
    values = dict(
        name="tiny catalogue unet",
        architecture="unet",
        architecture_options={"base_channels": 2},
        num_classes=3,
        patch_size=64,
        labels=[
            LabelInfo(value=1, name="Lung tumour", color=(0.85, 0.32, 0.26), terminology=SegmentInfo().terminology),
            LabelInfo(value=2, name="Nodule", color=(0.1, 0.5, 0.9), terminology=SegmentInfo().terminology),
        ],
        training_data={"ct_cases": 12, "real_patients": 0},
        metrics={"val_dice": 0.7123},
        license="MIT",
        description="a tiny network for catalogue tests",
    )
    values.update(changes)
    return ModelCard(**values)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A real, small CMEDL segmentation model file (kept read-only by the tests: they copy it)."""
    return save_model(tmp_path_factory.mktemp("models") / "tiny.safetensors", _tiny_unet(), _card())


@pytest.fixture(scope="module")
def translator_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("translator") / "translator.safetensors"
    return save_translator(path, _tiny_unet(), _tiny_unet(), _card(name="tiny translator"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh CMEDL home; no site catalogue."""
    path = tmp_path / "cmedl-home"
    monkeypatch.setenv("CMEDL_HOME", str(path))
    monkeypatch.delenv("CMEDL_CATALOGUE", raising=False)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _serve(model_file: Path, tmp_path: Path, name: str = "lungnet", **changes) -> tuple[Path, dict]:
    """Copy ``model_file`` to a 'server' folder; returns the copy and its catalogue entry (file:// url)."""
    server = tmp_path / "server"
    server.mkdir(exist_ok=True)
    source = server / f"{name}-v1.safetensors"
    shutil.copyfile(model_file, source)
    entry = {
        "name": name,
        "title": "Lung tumour net",
        "description": "served from a folder",
        "license": LICENSE,
        "url": source.as_uri(),
        "sha256": _sha256(model_file),
        "size_bytes": model_file.stat().st_size,
    }
    entry.update(changes)
    return source, entry


def _write_catalogue(path: Path, models: list[dict], **top) -> Path:
    data = {"format": "cmedl-catalogue", "version": 1, "models": models}
    data.update(top)
    path.write_text(json.dumps(data))
    return path


def _use_catalogue(monkeypatch, tmp_path: Path, models: list[dict]) -> Path:
    path = _write_catalogue(tmp_path / "site-catalogue.json", models)
    monkeypatch.setenv("CMEDL_CATALOGUE", str(path))
    return path


def _files_in(folder: Path) -> list[str]:
    """Every file name in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- model cards without torch ------------------------------------------------------------------------


def test_peek_model_card_gives_what_read_model_card_reads(model_file):
    for path in (model_file, builtin_model_path()):
        expected = json.loads(json.dumps(read_model_card(path).to_dict()))
        assert peek_model_card(path) == expected
    assert (filebase.CARD_KEY, filebase.FORMAT_KEY, filebase.FORMAT_NAME) == (
        modelfile.CARD_KEY,
        modelfile.FORMAT_KEY,
        modelfile.FORMAT_NAME,
    )


def _truncated_weights(good: bytes) -> bytes:
    return good[:-100]


def _truncated_header(good: bytes) -> bytes:
    return good[:40]


def _trailing_bytes(good: bytes) -> bytes:
    return good + b"\0" * 16


def _absurd_header_length(good: bytes) -> bytes:
    return (10**12).to_bytes(8, "little") + good[8:]


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_truncated_weights, "truncated"),
        (_truncated_header, "truncated"),
        (_trailing_bytes, "after the weights"),
        (_absurd_header_length, "not safetensors"),
        (lambda good: good[:5], "truncated"),
        (lambda good: b"this is a text file, not a model at all\n" * 4, "not safetensors"),
    ],
)
def test_damaged_model_files_are_refused_with_one_line(model_file, tmp_path, damage, words):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damage(model_file.read_bytes()))
    with pytest.raises(ModelFileError) as caught:
        peek_model_card(path)
    message = str(caught.value)
    assert "damaged.safetensors" in message and words in message and "\n" not in message
    # The engine's own reader refuses the same files, so a file the catalogue accepts can be loaded.
    with pytest.raises(ModelFileError):
        read_model_card(path)


def test_foreign_and_card_damaged_safetensors_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(foreign), metadata={"producer": "another tool"})
    with pytest.raises(ModelFileError, match="foreign.safetensors is a safetensors file but not a CMEDL model"):
        peek_model_card(foreign)
    damaged = tmp_path / "damaged-card.safetensors"
    metadata = {modelfile.FORMAT_KEY: "cmedl-model/1", modelfile.CARD_KEY: "{not json"}
    save_file({"weight": torch.zeros(2)}, str(damaged), metadata=metadata)
    with pytest.raises(ModelFileError, match="damaged-card.safetensors has a damaged model card"):
        peek_model_card(damaged)
    nameless = tmp_path / "nameless.safetensors"
    metadata[modelfile.CARD_KEY] = json.dumps({"architecture": "unet"})
    save_file({"weight": torch.zeros(2)}, str(nameless), metadata=metadata)
    with pytest.raises(ModelFileError, match="model card lacks name"):
        peek_model_card(nameless)
    with pytest.raises(ModelFileError, match="model file not found"):
        peek_model_card(tmp_path / "missing.safetensors")


def test_card_summary_shows_what_a_card_box_needs(model_file):
    summary = card_summary(peek_model_card(model_file))
    assert summary["name"] == "tiny catalogue unet"
    assert summary["architecture"] == "unet (base_channels=2)"
    assert summary["method"] == "ct_only" and summary["kind"] == "segmentor"
    assert summary["intended_use"].startswith("research use only")
    assert summary["license"] == "MIT"
    assert summary["training_data"] == "ct_cases: 12, real_patients: 0"
    assert summary["metrics"] == "val_dice: 0.712"
    assert [(label["value"], label["name"]) for label in summary["labels"]] == [(1, "Lung tumour"), (2, "Nodule")]
    assert summary["labels"][1]["color"] == (0.1, 0.5, 0.9)
    # A card with most fields missing still gives a box to show.
    assert card_summary({"name": "bare", "architecture": "unet"})["labels"] == []


# -- where things live ---------------------------------------------------------------------------------


def test_home_comes_from_cmedl_home_or_the_user_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CMEDL_HOME", str(tmp_path / "site"))
    assert cmedl_home() == tmp_path / "site"
    assert user_models_dir() == tmp_path / "site" / "models" and cache_dir() == tmp_path / "site" / "cache"
    assert not (tmp_path / "site").exists()
    assert user_models_dir(create=True).is_dir()
    monkeypatch.delenv("CMEDL_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cmedl_home() == tmp_path / "user" / ".cmedl"


# -- user models ---------------------------------------------------------------------------------------


def test_listing_shows_the_demo_then_an_added_user_model(home, model_file):
    entries = list_models()
    assert [(e.name, e.source, e.available) for e in entries] == [("demo", "builtin", True)]
    added = add_model(model_file)
    assert added.name == "tiny" and added.source == "user"
    assert added.path == home / "models" / "tiny.safetensors"
    assert _sha256(added.path) == _sha256(model_file)
    assert _files_in(home / "models") == ["tiny.safetensors"]
    entries = list_models()
    assert [(e.name, e.source) for e in entries] == [("demo", "builtin"), ("tiny", "user")]
    user = entries[1]
    assert user.available and user.title == "tiny catalogue unet" and user.license == "MIT"
    assert user.size_bytes == model_file.stat().st_size
    assert user.card == peek_model_card(model_file)
    assert entries[0].title == peek_model_card(builtin_model_path())["name"]


def test_add_refuses_translators_bad_names_and_clashes(home, model_file, translator_file, tmp_path, monkeypatch):
    with pytest.raises(ModelFileError, match="holds a translator model, not a tumour segmentation model"):
        add_model(translator_file)
    _, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    with pytest.raises(InputError, match="name of a built-in model"):
        add_model(model_file, name="demo")
    with pytest.raises(InputError, match="name of a downloadable catalogue model"):
        add_model(model_file, name="lungnet")
    with pytest.raises(InputError, match="not a valid model name"):
        add_model(model_file, name="my model")
    assert _files_in(home / "models") == []
    first = add_model(model_file, name="mine")
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        add_model(model_file, name="mine")
    other = save_model(tmp_path / "other.safetensors", _tiny_unet(), _card(name="another tiny unet"))
    replaced = add_model(other, name="mine", overwrite=True)
    assert replaced.path == first.path and replaced.title == "another tiny unet"
    assert _files_in(home / "models") == ["mine.safetensors"]


def test_an_unreadable_user_file_is_left_out_and_reported(home, model_file):
    add_model(model_file, name="good")
    (home / "models" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    shutil.copyfile(model_file, home / "models" / "demo.safetensors")
    problems: list[str] = []
    names = [entry.name for entry in list_models(problems)]
    assert names == ["demo", "good"]
    assert len(problems) == 2
    assert any("broken.safetensors" in p and "skipped" in p for p in problems)
    assert any("demo.safetensors" in p and "built-in" in p for p in problems)
    # Without a list the listing still works; it only stays silent.
    assert [entry.name for entry in list_models()] == ["demo", "good"]


def test_remove_deletes_user_models_only(home, model_file, tmp_path, monkeypatch):
    _, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    added = add_model(model_file, name="mine")
    assert remove_model("mine") == added.path
    assert not added.path.exists()
    with pytest.raises(ModelFileError, match="no model named 'mine'"):
        resolve_model("mine")
    with pytest.raises(InputError, match="built-in model and cannot be removed"):
        remove_model("demo")
    with pytest.raises(InputError, match="clear-cache"):
        remove_model("lungnet")
    with pytest.raises(InputError, match="no user model named 'ghost'"):
        remove_model("ghost")
    assert builtin_model_path().is_file()


# -- catalogue files -----------------------------------------------------------------------------------


def test_the_shipped_catalogue_is_valid_and_empty(home):
    assert catalogue.SHIPPED_CATALOGUE.is_file()
    assert load_catalogue([catalogue.SHIPPED_CATALOGUE]) == []
    assert catalogue.catalogue_files() == [catalogue.SHIPPED_CATALOGUE]


def test_site_and_home_catalogues_are_read_and_later_entries_win(home, model_file, tmp_path, monkeypatch):
    _, entry = _serve(model_file, tmp_path)
    site = _use_catalogue(monkeypatch, tmp_path, [entry, {**entry, "name": "other", "title": "Other net"}])
    home.mkdir()
    _write_catalogue(home / "catalogue.json", [{**entry, "url": "https://models.example.org/lungnet.safetensors"}])
    assert catalogue.catalogue_files() == [catalogue.SHIPPED_CATALOGUE, site, home / "catalogue.json"]
    entries = {e.name: e for e in load_catalogue()}
    assert set(entries) == {"lungnet", "other"}
    assert entries["lungnet"].url == "https://models.example.org/lungnet.safetensors"
    assert entries["other"].title == "Other net" and entries["other"].license == LICENSE
    assert not entries["lungnet"].available and entries["lungnet"].path is None
    monkeypatch.setenv("CMEDL_CATALOGUE", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="missing.json"):
        load_catalogue()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"sha256": "abc123"}, "sha256 must be 64 hexadecimal digits"),
        ({"url": "ftp://example.org/m.safetensors"}, "must be an http://, https:// or file:// address"),
        ({"url": "relative/m.safetensors"}, "must be an http://, https:// or file:// address"),
        ({"name": "two words"}, "name 'two words' must be"),
        ({"name": "demo"}, "name of a built-in model"),
        ({"license": ""}, "license is required"),
        ({"size_bytes": "big"}, "size_bytes must be a whole number"),
        ({"title": 3}, "title must be a string"),
    ],
)
def test_malformed_catalogue_entries_name_the_file(home, model_file, tmp_path, change, words):
    _, entry = _serve(model_file, tmp_path)
    path = _write_catalogue(tmp_path / "bad-catalogue.json", [{**entry, **change}])
    with pytest.raises(ConfigError) as caught:
        load_catalogue([path])
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_malformed_catalogue_files_name_the_file(home, model_file, tmp_path):
    _, entry = _serve(model_file, tmp_path)
    cases = {
        "not-json.json": "{ this is not json",
        "wrong-format.json": json.dumps({"format": "something-else", "version": 1, "models": []}),
        "newer.json": json.dumps({"format": "cmedl-catalogue", "version": 2, "models": []}),
        "no-list.json": json.dumps({"format": "cmedl-catalogue", "version": 1, "models": {}}),
        "twice.json": json.dumps({"format": "cmedl-catalogue", "version": 1, "models": [entry, entry]}),
    }
    for file_name, text in cases.items():
        path = tmp_path / file_name
        path.write_text(text)
        with pytest.raises(ConfigError, match=file_name):
            load_catalogue([path])


# -- downloads -----------------------------------------------------------------------------------------


def test_download_from_a_file_url_then_from_the_cache(home, model_file, tmp_path, monkeypatch):
    source, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    events: list[dict] = []
    path = download_model("lungnet", accept_license=True, progress=CallbackProgress(events.append))
    assert path == home / "cache" / "lungnet.safetensors" == cached_model_path("lungnet")
    assert _sha256(path) == entry["sha256"]
    assert _files_in(home / "cache") == ["lungnet.safetensors"]
    size = model_file.stat().st_size
    steps = [(e["stage"], e["done"], e["total"]) for e in events if e["event"] == "progress"]
    assert steps[0] == ("download", 0, size) and steps[-1] == ("download", size, size)
    listed = [e for e in list_models() if e.name == "lungnet"]
    assert len(listed) == 1 and listed[0].available and listed[0].source == "download"
    assert resolve_model("lungnet") == path

    # The second call must not need the server at all.
    source.unlink()
    events.clear()
    assert download_model("lungnet", accept_license=True, progress=CallbackProgress(events.append)) == path
    assert events == []

    # A cached file that does not match its sha256 is fetched again.
    shutil.copyfile(model_file, source)
    path.write_bytes(b"not the model")
    assert download_model("lungnet", accept_license=True) == path
    assert _sha256(path) == entry["sha256"]

    assert clear_cache() == 1
    assert _files_in(home / "cache") == []
    with pytest.raises(ModelFileError, match="cmedl models download lungnet"):
        resolve_model("lungnet")


def test_a_corrupted_download_keeps_nothing(home, model_file, tmp_path, monkeypatch):
    source, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    data = bytearray(source.read_bytes())
    data[-10:] = bytes(255 - b for b in data[-10:])  # flip bytes of the weights: the header still reads
    source.write_bytes(bytes(data))
    peek_model_card(source)
    with pytest.raises(ModelFileError) as caught:
        download_model("lungnet", accept_license=True)
    message = str(caught.value)
    assert "does not match its sha256" in message and "nothing was kept" in message and entry["url"] in message
    assert _files_in(home / "cache") == []
    with pytest.raises(ModelFileError, match="not downloaded yet"):
        resolve_model("lungnet")


def test_a_file_that_is_no_model_but_matches_the_catalogue_is_not_kept(home, translator_file, tmp_path, monkeypatch):
    _, entry = _serve(translator_file, tmp_path, name="translator")
    _use_catalogue(monkeypatch, tmp_path, [entry])
    with pytest.raises(ModelFileError, match="holds a translator model.*nothing was kept"):
        download_model("translator", accept_license=True)
    assert _files_in(home / "cache") == []


def test_a_download_is_refused_until_the_license_is_accepted(home, model_file, tmp_path, monkeypatch):
    _, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    with pytest.raises(ConfigError) as caught:
        download_model("lungnet", accept_license=False)
    assert LICENSE in str(caught.value) and "--accept-license" in str(caught.value)
    assert _files_in(home / "cache") == []
    with pytest.raises(InputError, match="built-in model; there is nothing to download"):
        download_model("demo", accept_license=True)
    with pytest.raises(InputError, match="no downloadable model named 'ghost'.*lungnet"):
        download_model("ghost", accept_license=True)


def test_a_cancelled_download_leaves_no_partial_file(home, model_file, tmp_path, monkeypatch):
    _, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    cancel = threading.Event()
    seen: list[dict] = []

    def cancel_after_first_update(event: dict) -> None:
        seen.append(event)
        # The temporary file exists once the first update is sent; the next update notices the cancel.
        assert len(_files_in(home / "cache")) == 1
        cancel.set()

    with pytest.raises(CancelledError):
        download_model("lungnet", accept_license=True, progress=CallbackProgress(cancel_after_first_update, cancel))
    assert len(seen) == 1
    assert _files_in(home / "cache") == []


def test_a_file_placed_by_hand_works_without_network(home, model_file, tmp_path, monkeypatch):
    _, entry = _serve(model_file, tmp_path, url=UNREACHABLE_URL)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    target = cached_model_path("lungnet")
    with pytest.raises(InputError) as caught:
        download_model("lungnet", accept_license=True, timeout=5)
    message = str(caught.value)
    assert UNREACHABLE_URL in message and str(target) in message and "by hand" in message and "\n" not in message
    assert _files_in(home / "cache") == []
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, target)
    assert download_model("lungnet", accept_license=True, progress=Progress(), timeout=5) == target
    assert resolve_model("lungnet") == target


def test_the_shipped_built_in_model_has_its_recorded_sha256():
    """A retrained demo model needs its new sha256 in catalogue.BUILTIN_SHA256 (the value to put there is
    printed here); a damaged installed file is refused by the same comparison."""
    for name, path in catalogue.BUILTIN_MODELS.items():
        actual = _sha256(path)
        assert actual == catalogue.BUILTIN_SHA256[name], f"set BUILTIN_SHA256[{name!r}] = {actual!r}"
        catalogue.check_model_integrity(path, actual)
        with pytest.raises(ModelFileError, match="built-in model file .* is damaged.*reinstall"):
            catalogue.check_model_integrity(path, "0" * 64)


def test_a_downloaded_model_damaged_on_the_disk_is_refused(home, model_file, tmp_path, monkeypatch):
    from cmedl.phantom import make_phantom
    from cmedl.segment import SegmentOptions, segment_file
    from cmedl.volumes import write_volume

    _, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    target = download_model("lungnet", accept_license=True)
    ct = write_volume(make_phantom("ct", seed=2, size=64).image, tmp_path / "ct.nii.gz")
    segment_file(ct, tmp_path / "ok.seg.nrrd", resolve_model("lungnet"), SegmentOptions(device="cpu"))
    # One byte of the weights flips (the last byte of the file is inside the last tensor): it still loads.
    content = bytearray(target.read_bytes())
    content[-1] ^= 0x01
    target.write_bytes(bytes(content))
    modelfile.load_model(target)
    with pytest.raises(ModelFileError, match="downloaded model file lungnet.safetensors is damaged.*clear-cache"):
        segment_file(ct, tmp_path / "bad.seg.nrrd", resolve_model("lungnet"), SegmentOptions(device="cpu"))
    assert not (tmp_path / "bad.seg.nrrd").exists()
    # A user's own file has nothing to be compared with: it is used as it is.
    catalogue.check_model_integrity(model_file, "0" * 64)


# -- resolving --model -----------------------------------------------------------------------------


def test_resolve_model_for_every_source(home, model_file, tmp_path, monkeypatch):
    _, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    assert resolve_model(None) == resolve_model("demo") == builtin_model_path()
    assert resolve_model(str(model_file)) == model_file
    added = add_model(model_file, name="mine")
    assert resolve_model("mine") == added.path
    with pytest.raises(ModelFileError, match="not downloaded yet.*cmedl models download lungnet"):
        resolve_model("lungnet")
    downloaded = download_model("lungnet", accept_license=True)
    assert resolve_model("lungnet") == downloaded
    with pytest.raises(ModelFileError) as caught:
        resolve_model("ghost")
    assert "no model named 'ghost'" in str(caught.value) and "demo, mine, lungnet" in str(caught.value)


def test_importing_the_catalogue_loads_no_heavy_library():
    code = (
        "import sys, cmedl.catalogue as c; c.list_models(); "
        "heavy = [m for m in ('torch', 'numpy', 'SimpleITK', 'safetensors') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr


# -- the command line ----------------------------------------------------------------------------------


def test_cli_models_add_list_remove_and_path(home, model_file):
    result = run_cmedl("models", "add", str(model_file), "--name", "mine", timeout=60)
    assert result.returncode == 0, result.stderr
    assert (home / "models" / "mine.safetensors").is_file()
    result = run_cmedl("models", "list", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [(m["name"], m["source"], m["available"]) for m in listed["models"]] == [
        ("demo", "builtin", True),
        ("mine", "user", True),
    ]
    assert listed["models"][1]["title"] == "tiny catalogue unet" and listed["problems"] == []
    result = run_cmedl("models", "list", timeout=60)
    assert result.returncode == 0 and "mine" in result.stdout and "tiny catalogue unet" in result.stdout
    result = run_cmedl("models", "add", str(model_file), "--name", "mine", timeout=60)
    assert result.returncode == 3 and "--overwrite" in result.stderr
    result = run_cmedl("models", "path", timeout=60)
    assert result.returncode == 0 and str(home / "cache") in result.stdout
    result = run_cmedl("models", "remove", "mine", timeout=60)
    assert result.returncode == 0 and not (home / "models" / "mine.safetensors").exists()


def test_cli_models_download_needs_the_license_accepted(home, model_file, tmp_path, monkeypatch):
    _, entry = _serve(model_file, tmp_path)
    _use_catalogue(monkeypatch, tmp_path, [entry])
    result = run_cmedl("models", "download", "lungnet", timeout=60)
    assert result.returncode == 7
    assert LICENSE in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("cmedl: error:") and "--accept-license" in errors[0]
    assert _files_in(home / "cache") == []
    result = run_cmedl("models", "download", "lungnet", "--accept-license", "--progress", "json", timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1] == {"event": "done", "result": {"name": "lungnet", "path": str(cached_model_path("lungnet"))}}
    assert _sha256(cached_model_path("lungnet")) == entry["sha256"]
    result = run_cmedl("models", "clear-cache", timeout=60)
    assert result.returncode == 0 and "removed 1 downloaded model file" in result.stdout


def test_model_entry_reports_availability(tmp_path):
    entry = ModelEntry(name="x", source="download", path=tmp_path / "x.safetensors")
    assert not entry.available
    entry.path.write_bytes(b"x")
    assert entry.available and entry.to_dict()["available"] is True
