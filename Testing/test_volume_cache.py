"""The run's cache of prepared volumes (``RUN/cache/volumes``): a resumed run reads every case from it with the
arrays ``prepare_volume`` gives; a changed file or a damaged entry is prepared again and rewritten; a cache that
cannot be written never fails the run; ``cache_volumes=false`` writes none.

Runs use the session's four 128x128 phantoms, one epoch of one step and a 4-channel U-Net (``conftest.TINY``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY

import cmedl.training.trainer as trainer_module
from cmedl.errors import ConfigError
from cmedl.progress import CallbackProgress
from cmedl.training import volume_cache
from cmedl.training.config import TrainConfig
from cmedl.training.data import CasePaths, PreparedVolume, find_cases, prepare_volume
from cmedl.training.runfolder import RunFolder
from cmedl.training.trainer import Trainer, _config_differences
from cmedl.training.volume_cache import PreparedVolumeCache, cache_key
from cmedl.volumes import normalise_hu

#: no validation unless a test asks: the cache serves the validation cases through the same loop
RUN = {**TINY, "epochs": 1, "iterations_per_epoch": 1, "validation_fraction": 0.0}


def config_for(data: Path, out: Path, **changes) -> TrainConfig:
    return TrainConfig.from_dict({**RUN, "ct": str(data), "out": str(out), **changes})


def cache_folder(out: Path) -> Path:
    return out / "cache" / "volumes"


def entries(out: Path) -> dict[str, str]:
    """The run's cache entries: file name -> the case name it holds."""
    found = {}
    for path in sorted(cache_folder(out).glob("*.npz")):
        with np.load(path) as entry:
            found[path.name] = str(entry["name"])
    return found


def log_lines(out: Path, start: str) -> list[str]:
    """The messages of ``train.log`` that begin with ``start`` (without their time stamps)."""
    messages = [line.split(" ", 1)[1] for line in (out / "train.log").read_text().splitlines()]
    return [message for message in messages if message.startswith(start)]


def expected(case: CasePaths, config: TrainConfig) -> PreparedVolume:
    return prepare_volume(case, config.spacing_mm, lambda values: normalise_hu(values, config.hu_window))


def assert_same_volume(found: PreparedVolume, reference: PreparedVolume) -> None:
    assert found.name == reference.name and found.paired is None
    for field in ("image", "label", "tumour_slices", "context_slices"):
        got, want = getattr(found, field), getattr(reference, field)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), field


@pytest.fixture
def prepared_from_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the cases the trainer prepares from their files (those it does not read from the cache)."""
    names: list[str] = []

    def counting(case: CasePaths, *args, **kwargs) -> PreparedVolume:
        names.append(case.name)
        return prepare_volume(case, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "prepare_volume", counting)
    return names


def test_a_resumed_run_reads_every_case_from_the_cache(
    small_phantoms: Path, tmp_path: Path, prepared_from_files: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = config_for(small_phantoms / "ct", out, validation_fraction=0.25)
    assert Trainer(config).fit()["state"] == "finished"
    cases = find_cases(small_phantoms / "ct")
    assert sorted(prepared_from_files) == [case.name for case in cases]
    assert sorted(entries(out).values()) == [case.name for case in cases]
    assert log_lines(out, "data:") == ["data: 4 case(s) prepared, 0 of them from the run's cache"]
    # What a write killed half-way leaves: removed when the next run claims the folder.
    leftover = cache_folder(out) / f".{next(iter(entries(out)))}.k3j9.partial.npz"
    leftover.write_bytes(b"PK\x03\x04 half a zip")

    seen: list = []
    loop = Trainer._loop

    def capturing(self: Trainer, datasets, *args, **kwargs) -> dict:
        seen.append(datasets)
        return loop(self, datasets, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_loop", capturing)
    prepared_from_files.clear()
    events: list[dict] = []
    resumed = Trainer.resume_run(out, progress=CallbackProgress(events.append), epochs=2)
    assert resumed.fit()["state"] == "finished"
    assert prepared_from_files == []
    assert not leftover.exists()
    assert log_lines(out, "data:")[-1] == "data: 4 case(s) prepared, 4 of them from the run's cache"
    assert log_lines(out, "cache:") == []
    progress = [(e["done"], e["total"], e["message"]) for e in events if e.get("stage") == "data"]
    assert progress == [(done, 4, "cases") for done in range(5)]
    datasets = seen[0]
    assert len(datasets.ct_training) == 3 and len(datasets.ct_validation) == 1 and datasets.mr == []
    by_name = {case.name: case for case in cases}
    for volume in datasets.ct_training + datasets.ct_validation:
        assert_same_volume(volume, expected(by_name[volume.name], config))


def test_a_rewritten_label_invalidates_that_cases_entry_only(
    small_phantoms: Path, tmp_path: Path, prepared_from_files: list[str]
) -> None:
    data, out = tmp_path / "ct", tmp_path / "run"
    shutil.copytree(small_phantoms / "ct", data)
    config = config_for(data, out)
    assert Trainer(config).fit()["state"] == "finished"
    before = {name: (cache_folder(out) / name).stat().st_mtime_ns for name in entries(out)}
    changed = find_cases(data)[1]
    old = sitk.ReadImage(str(changed.label))
    erased = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(old)))
    erased.CopyInformation(old)
    sitk.WriteImage(erased, str(changed.label))

    # Started again in place (no checkpoint: the run never finished an epoch), which keeps the cache.
    RunFolder(out).checkpoint_path.unlink()
    prepared_from_files.clear()
    assert Trainer(config).fit()["state"] == "finished"
    assert prepared_from_files == [changed.name]
    assert log_lines(out, "data:")[-1] == (
        "data: 4 case(s) prepared, 3 of them from the run's cache; 1 entry of changed files removed"
    )
    after = entries(out)
    # The changed case's old entry is gone (nothing would read it again), its new one is there.
    assert len(after) == 4 and sorted(after.values()).count(changed.name) == 1
    assert len(set(after) - set(before)) == 1
    # The other entries were read, not rewritten.
    kept = set(after) & set(before)
    assert len(kept) == 3 and all((cache_folder(out) / name).stat().st_mtime_ns == before[name] for name in kept)
    settings = {"hu_window": list(config.hu_window)}
    key = cache_key(changed, config.spacing_mm, settings, is_ct=True, label_value=1)
    volume = PreparedVolumeCache(cache_folder(out), writable=False, log=pytest.fail).load(key, changed.name)
    assert volume is not None and len(volume.tumour_slices) == 0 and not volume.label.any()
    assert_same_volume(volume, expected(changed, config))


def test_a_truncated_or_foreign_entry_is_logged_ignored_and_rewritten(
    small_phantoms: Path, tmp_path: Path, prepared_from_files: list[str]
) -> None:
    out = tmp_path / "run"
    config = config_for(small_phantoms / "ct", out)
    assert Trainer(config).fit()["state"] == "finished"
    held = entries(out)
    truncated, garbage, foreign, intact = (cache_folder(out) / name for name in held)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(b"not a zip file at all")
    shutil.copyfile(intact, foreign)  # a well-formed entry, of another key and case

    prepared_from_files.clear()
    assert Trainer.resume_run(out).fit()["state"] == "finished"
    assert sorted(prepared_from_files) == sorted(held[path.name] for path in (truncated, garbage, foreign))
    damaged = log_lines(out, "cache:")
    assert len(damaged) == 3
    for path in (truncated, garbage, foreign):
        assert sum(path.name in line and "preparing the case again" in line for line in damaged) == 1
    assert any(garbage.name in line and "not an .npz archive" in line for line in damaged)
    assert not any("unsafe" in line or "pickle" in line for line in damaged)  # numpy's advice stays out
    assert log_lines(out, "data:")[-1] == "data: 4 case(s) prepared, 1 of them from the run's cache"
    # Rewritten: every entry reads again, with the arrays prepare_volume gives.
    assert entries(out) == held
    cache = PreparedVolumeCache(cache_folder(out), writable=False, log=pytest.fail)
    by_name = {case.name: case for case in find_cases(small_phantoms / "ct")}
    for name, case_name in held.items():
        assert_same_volume(cache.load(name.removesuffix(".npz"), case_name), expected(by_name[case_name], config))


def test_a_cache_folder_that_cannot_be_created_does_not_fail_the_run(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "cache").write_text("a file where the cache folder would go\n")
    assert Trainer(config_for(small_phantoms / "ct", out)).fit()["state"] == "finished"
    failures = log_lines(out, "cache:")
    assert len(failures) == 1, failures
    assert "cache/volumes" in failures[0] and "is a file, not a folder" in failures[0]
    assert "training goes on without" in failures[0]
    assert log_lines(out, "data:") == ["data: 4 case(s) prepared, 0 of them from the run's cache"]
    assert (out / "cache").read_text() == "a file where the cache folder would go\n"
    assert RunFolder(out).read_metrics()[0]["epoch"] == 1


def test_cache_volumes_false_writes_no_cache(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = config_for(small_phantoms / "ct", out, cache_volumes="false")
    assert config.cache_volumes is False
    assert Trainer(config).fit()["state"] == "finished"
    assert not (out / "cache").exists()
    assert log_lines(out, "data:") == [] and log_lines(out, "cache:") == []
    assert json.loads((out / "config.json").read_text())["cache_volumes"] is False


def test_the_setting_parses_defaults_for_old_runs_and_may_differ_on_a_restart() -> None:
    assert TrainConfig().cache_volumes is True
    assert TrainConfig().with_overrides(["cache_volumes=false"]).cache_volumes is False
    with pytest.raises(ConfigError, match="cache_volumes"):
        TrainConfig().with_overrides(["cache_volumes=sometimes"])
    saved = TrainConfig(ct="ct", out="run").to_dict()
    del saved["cache_volumes"]  # a run folder from before the setting existed
    assert TrainConfig.from_dict(saved).validate().cache_volumes is True
    assert _config_differences(saved, TrainConfig(ct="ct", out="run", cache_volumes=False)) == ""


def test_entries_round_trip_and_refuse_what_does_not_fit(tmp_path: Path) -> None:
    logged: list[str] = []
    cache = PreparedVolumeCache(tmp_path / "volumes", writable=True, log=logged.append)
    image = np.random.default_rng(0).random((5, 7, 9)).astype(np.float16)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[2, 3:5, 4:8] = 1
    slices = (np.array([2], dtype=np.int64), np.arange(5, dtype=np.int64))
    cache.store("a" * 64, PreparedVolume("case", image, label, *slices))
    cache.store("b" * 64, PreparedVolume("mr", image, None, np.zeros(0, dtype=np.int64), slices[1]))
    assert_same_volume(cache.load("a" * 64, "case"), PreparedVolume("case", image, label, *slices))
    unlabelled = cache.load("b" * 64, "mr")
    assert unlabelled.label is None and np.array_equal(unlabelled.image, image)
    assert cache.load("c" * 64, "case") is None and logged == []  # no entry: a plain miss
    assert cache.load("a" * 64, "another") is None and "holds case 'case'" in logged[-1]
    # A label that does not fit its image is refused, not reshaped.
    with np.load(cache.path_of("a" * 64)) as entry:
        arrays = dict(entry)
    arrays["label_shape"] = np.array([5, 9, 7], dtype=np.int64)
    with open(cache.path_of("a" * 64), "wb") as handle:
        np.savez(handle, **arrays)
    assert cache.load("a" * 64, "case") is None and "label of shape (5, 9, 7)" in logged[-1]
    # A flipped byte in the image fails the zip's checksum.
    damaged = bytearray(cache.path_of("b" * 64).read_bytes())
    damaged[damaged.find(b"image.npy") + 400] ^= 0xFF
    cache.path_of("b" * 64).write_bytes(bytes(damaged))
    assert cache.load("b" * 64, "mr") is None and "Bad CRC-32" in logged[-1]
    # Not writable (another process of a data-parallel run): nothing is written.
    PreparedVolumeCache(tmp_path / "volumes", writable=False, log=pytest.fail).store("d" * 64, unlabelled)
    assert not cache.path_of("d" * 64).exists()


def test_entries_leave_room_for_the_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[str] = []
    cache = PreparedVolumeCache(tmp_path / "run" / "cache" / "volumes", writable=True, log=logged.append)
    volume = PreparedVolume("case", np.zeros((4, 256, 256), np.float16), None, np.zeros(0, np.int64), np.arange(4))
    free = {"bytes": volume_cache.RESERVE_BYTES + 2 * volume.image.nbytes}
    monkeypatch.setattr(volume_cache.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    cache.store("a" * 64, volume)
    assert cache.path_of("a" * 64).is_file() and logged == []
    free["bytes"] = volume_cache.RESERVE_BYTES + volume.image.nbytes // 2  # the entry would eat into the reserve
    cache.store("b" * 64, volume)
    free["bytes"] *= 10
    cache.store("c" * 64, volume)  # the first refusal ends the run's writes
    assert not cache.path_of("b" * 64).exists() and not cache.path_of("c" * 64).exists()
    assert len(logged) == 1 and "free on the disk" in logged[0] and "training goes on without" in logged[0]


def test_the_key_follows_the_files_and_the_settings(tmp_path: Path) -> None:
    def key_of(name="case", label=None, spacing=(1.0, 1.0), window=(-1000.0, 500.0), is_ct=True, value=1) -> str:
        return cache_key(CasePaths(name, image, label), spacing, {"hu_window": list(window)}, is_ct, value)

    image = tmp_path / "image.nii.gz"
    image.write_bytes(b"image")
    series = tmp_path / "series"  # a DICOM series is a folder: every file in it counts
    series.mkdir()
    (series / "slice_1.dcm").write_bytes(b"one")
    key = key_of()
    assert key == key_of() and len(key) == 64 and int(key, 16) >= 0
    others = [key_of(name="other"), key_of(spacing=(1.5, 1.0)), key_of(window=(-1000.0, 400.0)),
              key_of(is_ct=False), key_of(value=2), key_of(label=series)]  # fmt: skip
    assert len({key, *others}) == len(others) + 1
    (series / "slice_2.dcm").write_bytes(b"two")
    assert key_of(label=series) != others[-1]
    image.write_bytes(b"another image")
    assert key_of() != key


def test_a_file_replaced_or_rewritten_with_its_size_and_time_kept_gets_a_new_key(tmp_path: Path) -> None:
    """``cp -p`` of another case over the file, or a rewrite in place with the time set back: the size and the
    modification time are the old ones, the content is not, so the key must change."""
    image = tmp_path / "image.nii.gz"
    image.write_bytes(b"first content")
    kept = image.stat()

    def key_now() -> str:
        return cache_key(CasePaths("case", image, None), (1.0, 1.0), {"hu_window": [-1000.0, 500.0]}, True, 1)

    before = key_now()
    copy = tmp_path / "copy"
    copy.write_bytes(b"other content")  # same size
    os.utime(copy, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    os.replace(copy, image)
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)
    replaced = key_now()
    assert replaced != before

    time.sleep(0.01)
    with open(image, "r+b") as handle:
        handle.write(b"third")
    os.utime(image, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)
    assert key_now() not in (before, replaced)
