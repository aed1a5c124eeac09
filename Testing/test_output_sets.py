"""The outputs of one command: a failure keeps what existed before, names the path that failed and says why.

Three faults, each reproduced with real files: a run whose second output could not be written removed the first
output's earlier file and named the wrong path; a write on a full disk showed the temporary file's name and not
the full disk; a batch given an output name like ``out.seg.nrrd``, or failing before its first case, left a
folder behind. Full and read-only disks are real small tmpfs mounts, skipped where mounting is not permitted.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmedl.batch import run_batch
from cmedl.cli import main
from cmedl.errors import ModelFileError, OutputError
from cmedl.filebase import readable_size, write_failure
from cmedl.lesions import write_lesions
from cmedl.phantom import make_phantom
from cmedl.reference_models import write_threshold_model
from cmedl.volumes import OutputSet, atomic_output, check_output_targets, write_labelmap, write_volume

EARLIER = b"an earlier result the user keeps\n"


def _small_image(seed: int = 0) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(seed).integers(0, 200, (3, 8, 9)).astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    return image


def _random_label(shape: tuple[int, int, int] = (16, 256, 256)) -> sitk.Image:
    """1 MiB of random 0/1 voxels: at least 128 KiB however it is compressed."""
    return sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 2, shape).astype(np.uint8))


def _hidden(folder: Path) -> list[str]:
    """Temporary and backup files left in ``folder`` (their names start with a dot)."""
    return sorted(path.name for path in folder.rglob(".*"))


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def earlier_files(tmp_path: Path) -> dict[str, bytes]:
    """Files of an earlier run in ``tmp_path`` (a header + voxel pair among them), by name, with their bytes."""
    write_volume(_small_image(7), tmp_path / "b.mhd")
    (tmp_path / "a.nrrd").write_bytes(EARLIER)
    (tmp_path / "table.json").write_bytes(EARLIER)
    return {path.name: path.read_bytes() for path in tmp_path.iterdir()}


def _contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


# -- bug 1: a failing output of a set keeps every earlier file --------------------------------------------------


def test_a_member_that_is_a_folder_keeps_the_earlier_files_and_is_named(tmp_path, earlier_files):
    (tmp_path / "maps.nrrd").mkdir()
    with pytest.raises(OutputError) as caught, OutputSet():
        write_volume(_small_image(), tmp_path / "a.nrrd")
        write_volume(_small_image(), tmp_path / "b.mhd")
        with atomic_output(tmp_path / "table.json") as temp:
            temp.write_text("{}")
        write_volume(_small_image(), tmp_path / "maps.nrrd")
    assert str(caught.value) == f"cannot write {tmp_path / 'maps.nrrd'}: it is a folder, not a file"
    assert _contents(tmp_path) == earlier_files
    assert _hidden(tmp_path) == []


def _remove_temporary_file_of(folder: Path, name: str) -> None:
    (temp,) = [path for path in folder.iterdir() if path.name.startswith(f".{name}.")]
    temp.unlink()


def _make_folder_at(folder: Path, name: str) -> None:
    (folder / name).mkdir()


@pytest.mark.parametrize("sabotage", [_remove_temporary_file_of, _make_folder_at], ids=["vanished", "folder"])
def test_a_rename_failing_after_others_puts_the_earlier_files_back(
    tmp_path: Path, earlier_files: dict[str, bytes], sabotage: Callable[[Path, str], None]
):
    # Everything is written and checked; then, before the renames, the last target cannot take its file: the
    # renames done before it must be undone and the files they replaced put back.
    with pytest.raises(OutputError) as caught, OutputSet():
        write_volume(_small_image(), tmp_path / "a.nrrd")
        write_volume(_small_image(), tmp_path / "b.mhd")
        write_volume(_small_image(), tmp_path / "last.nrrd")
        sabotage(tmp_path, "last.nrrd")
    assert str(caught.value).startswith(f"cannot write {tmp_path / 'last.nrrd'}: ")
    assert "\n" not in str(caught.value)
    assert _contents(tmp_path) == earlier_files
    assert _hidden(tmp_path) == []


def test_a_completed_set_replaces_the_earlier_files_and_keeps_no_backup(tmp_path, earlier_files):
    image = _small_image(3)
    with OutputSet():
        write_volume(image, tmp_path / "a.nrrd")
        write_volume(image, tmp_path / "b.mhd")
    assert (tmp_path / "a.nrrd").read_bytes() != EARLIER
    for name in ("a.nrrd", "b.mhd"):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))
        assert np.array_equal(written, sitk.GetArrayFromImage(image))
    assert (tmp_path / "table.json").read_bytes() == EARLIER
    assert _hidden(tmp_path) == []


def test_targets_that_cannot_be_written_are_refused_by_name(tmp_path):
    (tmp_path / "taken.nrrd").mkdir()
    (tmp_path / "blocker").write_text("a file\n")
    check_output_targets([tmp_path / "new" / "fine.nrrd", None, tmp_path / "fine.json"])
    with pytest.raises(OutputError, match=re.escape(f"{tmp_path / 'taken.nrrd'}: it is a folder")):
        check_output_targets([tmp_path / "fine.nrrd", tmp_path / "taken.nrrd"])
    with pytest.raises(OutputError, match=re.escape(f"{tmp_path / 'blocker'} is a file, not a folder")):
        check_output_targets([tmp_path / "blocker" / "deeper" / "x.nrrd"])


# -- bug 1 through the commands ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> tuple[Path, Path]:
    """A small phantom chest CT file and a threshold model for it (segments in about a second on a CPU)."""
    folder = tmp_path_factory.mktemp("chest")
    image = make_phantom("ct", seed=4, size=64, slices=24, tumour_locations=("parenchyma",)).image
    ct = write_volume(image, folder / "chest.nii.gz")
    model = write_threshold_model(folder / "threshold.safetensors", 200.0, spacing_mm=image.GetSpacing()[:2])
    return ct, model


@pytest.mark.parametrize(
    "flags",
    [["--probabilities", "{folder}"], ["--lesions", "{folder}"], ["--tta", "--uncertainty", "{folder}"]],
    ids=["probabilities", "lesions", "uncertainty"],
)
def test_segment_with_an_output_that_is_a_folder_keeps_the_earlier_labelmap(chest, tmp_path, capfd, flags):
    ct, model = chest
    earlier = tmp_path / "pre.seg.nrrd"
    earlier.write_bytes(EARLIER)
    folder = tmp_path / ("isdir.csv" if "--lesions" in flags else "isdir.nrrd")
    folder.mkdir()
    extra = [flag.format(folder=folder) for flag in flags]
    code = main(["segment", str(ct), "-o", str(earlier), "--model", str(model), "--device", "cpu",
                 "--progress", "none", *extra])  # fmt: skip
    assert code == 6
    assert _one_line(capfd.readouterr().err) == f"cmedl: error: cannot write {folder}: it is a folder, not a file"
    assert earlier.read_bytes() == EARLIER
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["pre.seg.nrrd", folder.name])


def test_segment_refuses_a_folder_target_before_reading_the_ct(chest, tmp_path, capfd):
    # An unreadable CT would end in exit 3 if it were read first: the refusal comes before any work.
    _, model = chest
    unreadable = tmp_path / "ct.nii.gz"
    unreadable.write_bytes(b"not an image")
    (tmp_path / "out.seg.nrrd").mkdir()
    code = main(["segment", str(unreadable), "-o", str(tmp_path / "out.seg.nrrd"), "--model", str(model),
                 "--progress", "none"])  # fmt: skip
    assert code == 6
    assert "out.seg.nrrd: it is a folder" in _one_line(capfd.readouterr().err)


def test_lungs_with_a_second_output_that_is_a_folder_keeps_the_first(chest, tmp_path, capfd):
    ct, _ = chest
    earlier = tmp_path / "pre.nrrd"
    earlier.write_bytes(EARLIER)
    (tmp_path / "isdir.nrrd").mkdir()
    code = main(["lungs", str(ct), "--lungs-out", str(earlier), "--roi-out", str(tmp_path / "isdir.nrrd")])
    assert code == 6
    error = _one_line(capfd.readouterr().err)
    assert error == f"cmedl: error: cannot write {tmp_path / 'isdir.nrrd'}: it is a folder, not a file"
    assert earlier.read_bytes() == EARLIER
    assert sorted(path.name for path in tmp_path.iterdir()) == ["isdir.nrrd", "pre.nrrd"]


# -- bug 2: why a write failed, in words ---------------------------------------------------------------------------


def _mount_tmpfs(point: Path, options: str) -> None:
    point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 200 KiB tmpfs filled to about 12 KiB free, holding an earlier result ``pre.seg.nrrd``."""
    point = tmp_path / "full"
    _mount_tmpfs(point, "size=200k")
    try:
        (point / "pre.seg.nrrd").write_bytes(EARLIER)
        (point / "filler").write_bytes(bytes(shutil.disk_usage(point).free - 12 * 1024))
        yield point
    finally:
        subprocess.run(["umount", str(point)], capture_output=True)


FULL_DISK = re.compile(r"no space left on the disk \((\d+(\.\d)? (bytes|KiB)) free in (.+)\)$")


@pytest.mark.parametrize("name", ["y.seg.nrrd", "y.nrrd", "y.nii.gz", "y.nii", "y.mha", "y.mhd", "pre.seg.nrrd"])
def test_a_full_disk_is_said_with_its_free_space_and_no_temporary_name(full_disk, capfd, name):
    writer = write_volume if name.endswith(".mhd") else write_labelmap  # a labelmap is never a header + voxel pair
    with pytest.raises(OutputError) as caught:
        writer(_random_label(), full_disk / name)
    message = str(caught.value)
    assert message.startswith(f"cannot write {full_disk / name}: "), message
    found = FULL_DISK.search(message)
    assert found, message
    assert found.group(4) == str(full_disk)
    assert ".partial" not in message and "\n" not in message
    assert sorted(path.name for path in full_disk.iterdir()) == ["filler", "pre.seg.nrrd"]
    assert (full_disk / "pre.seg.nrrd").read_bytes() == EARLIER
    assert capfd.readouterr().err == ""


def test_a_lesion_table_on_a_full_disk(full_disk):
    (full_disk / "filler2").write_bytes(bytes(shutil.disk_usage(full_disk).free))  # not one block left
    with pytest.raises(OutputError) as caught:
        write_lesions(full_disk / "t.json", [], {"model": "x" * 10_000})
    assert FULL_DISK.search(str(caught.value)), caught.value
    assert sorted(path.name for path in full_disk.iterdir()) == ["filler", "filler2", "pre.seg.nrrd"]


def test_segment_on_a_full_disk_keeps_the_earlier_result(chest, full_disk, capfd):
    ct, model = chest
    (full_disk / "filler2").write_bytes(bytes(shutil.disk_usage(full_disk).free - 4096))  # room for a labelmap
    code = main(["segment", str(ct), "-o", str(full_disk / "pre.seg.nrrd"), "--probabilities",
                 str(full_disk / "p.nrrd"), "--model", str(model), "--progress", "none"])  # fmt: skip
    assert code == 6
    error = _one_line(capfd.readouterr().err)
    assert error.startswith(f"cmedl: error: cannot write {full_disk}/"), error
    assert FULL_DISK.search(error) and ".partial" not in error, error
    assert (full_disk / "pre.seg.nrrd").read_bytes() == EARLIER
    assert sorted(path.name for path in full_disk.iterdir()) == ["filler", "filler2", "pre.seg.nrrd"]


def test_a_read_only_file_system_is_said(tmp_path):
    point = tmp_path / "ro"
    _mount_tmpfs(point, "ro,size=64k")
    try:
        with pytest.raises(OutputError) as caught:
            write_labelmap(_random_label((2, 4, 4)), point / "y.seg.nrrd")
        assert str(caught.value) == f"cannot write {point / 'y.seg.nrrd'}: the file system is read-only ({point})"
    finally:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_a_folder_without_write_permission_is_said(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user may write in any folder (root)")
        with pytest.raises(OutputError) as caught:
            write_labelmap(_random_label((2, 4, 4)), locked / "y.seg.nrrd")
        expected = f"cannot write {locked / 'y.seg.nrrd'}: permission denied (no right to write in {locked})"
        assert str(caught.value) == expected
    finally:
        locked.chmod(0o700)


def test_write_failure_says_each_cause_in_words(tmp_path):
    target = tmp_path / "out" / "y.seg.nrrd"  # its folder does not exist yet: the nearest one that does counts
    partial = tmp_path / ".y.seg.nrrd.k3j9.partial.seg.nrrd"
    partial.write_bytes(bytes(3000))
    full = str(write_failure(target, OSError(errno.ENOSPC, "No space left on device"), partial))
    found = re.fullmatch(r"cannot write (.+): no space left on the disk \((.+) free in (.+)\)", full)
    assert found and found.group(1) == str(target) and found.group(3) == str(tmp_path), full
    quota = write_failure(target, OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert str(quota) == f"cannot write {target}: the disk quota is exceeded (in {tmp_path})"
    rust = write_failure(target, "Error while serializing: I/O error: No space left on device (os error 28)")
    assert "no space left on the disk (" in str(rust)
    assert str(write_failure(target, OSError(errno.EISDIR, "Is a directory"))).endswith(": it is a folder, not a file")
    assert str(write_failure(target, OSError(errno.EACCES, "Permission denied"))).endswith(
        f"permission denied (no right to write in {tmp_path})"
    )
    # Any other reason is kept, with the temporary name replaced by the final one.
    read_back = write_failure(target, f'cannot be read back (no reader for "{partial}")', partial)
    assert str(read_back) == f'cannot write {target}: cannot be read back (no reader for "{target}")'
    assert ".partial" not in str(write_failure(target, "failed on /elsewhere/.y.nii.abcd.partial.nii here"))
    assert [readable_size(size) for size in (0, 1023, 12 * 1024, 5 * 1024**3)] == [
        "0 bytes", "1023 bytes", "12 KiB", "5.0 GiB"
    ]  # fmt: skip


# -- bug 3: a batch leaves no folder it should not have made -----------------------------------------------------


@pytest.fixture
def ct_folder(tmp_path: Path, chest: tuple[Path, Path]) -> Path:
    folder = tmp_path / "cts"
    folder.mkdir()
    shutil.copy(chest[0], folder / "chest.nii.gz")
    return folder


@pytest.mark.parametrize("name", ["out7.seg.nrrd", "out7.nii.gz", "out7.NII", "out7.nrrd", "out7.mha"])
def test_a_batch_refuses_an_output_named_like_a_labelmap(ct_folder, tmp_path, capfd, chest, name):
    code = main(["segment", str(ct_folder), "-o", str(tmp_path / name), "--model", str(chest[1]),
                 "--progress", "none"])  # fmt: skip
    assert code == 6
    assert f"{tmp_path / name} is named like a volume file" in _one_line(capfd.readouterr().err)
    assert not (tmp_path / name).exists()


def test_a_batch_refused_for_its_probability_folder_makes_no_output_folder(ct_folder, tmp_path, capfd, chest):
    existing = tmp_path / "some_existing_file"
    existing.write_text("not a folder\n")
    code = main(["segment", str(ct_folder), "-o", str(tmp_path / "out6"), "--probabilities", str(existing),
                 "--model", str(chest[1]), "--progress", "none"])  # fmt: skip
    assert code == 6
    assert str(existing) in _one_line(capfd.readouterr().err)
    assert not (tmp_path / "out6").exists()


def test_a_batch_with_an_unusable_model_removes_the_folders_it_made(ct_folder, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ModelFileError):
        run_batch([ct_folder / "chest.nii.gz"], tmp_path / "a" / "b" / "out", damaged,
                  probabilities_folder=kept / "maps")  # fmt: skip
    assert not (tmp_path / "a").exists()
    assert kept.is_dir() and list(kept.iterdir()) == []  # a folder that was there before stays
