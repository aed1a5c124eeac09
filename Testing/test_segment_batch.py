"""Segmentation results beyond the mask: probability and uncertainty maps, lesions, provenance, batches."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cmedl

import cmedl.batch
from cmedl import __version__
from cmedl.batch import is_batch_input, read_summary
from cmedl.cli import main
from cmedl.errors import PARTIAL_FAILURE_EXIT_CODE
from cmedl.filebase import file_sha256
from cmedl.lesions import read_lesions
from cmedl.modelfile import ModelCard, load_model, save_model
from cmedl.nets import build_segmentor
from cmedl.phantom import make_phantom
from cmedl.reference_models import write_threshold_model
from cmedl.segment import Segmenter, SegmentOptions, input_sha256, segment_file
from cmedl.volumes import read_volume, same_geometry, write_volume

LEVEL_HU = 200.0  # the threshold model labels bone: many lesions of known probability 1


def small_ct(seed: int = 4) -> sitk.Image:
    return make_phantom("ct", seed=seed, size=64, slices=24, tumour_locations=("parenchyma", "chest_wall")).image


def oblique(image: sitk.Image) -> sitk.Image:
    a, b = math.radians(20), math.radians(8)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rotated = sitk.Image(image)
    rotated.SetDirection(tuple((about_x @ about_z).flatten()))
    rotated.SetOrigin((-31.5, 12.25, -140.0))
    return rotated


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return oblique(small_ct())


@pytest.fixture(scope="module")
def models(tmp_path_factory, ct: sitk.Image) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    spacing = ct.GetSpacing()[:2]
    torch.manual_seed(0)
    card = ModelCard(
        name="tiny", architecture="unet", architecture_options={"base_channels": 4}, spacing_mm=spacing, patch_size=64
    )
    # A soft threshold (300 HU, gentle slope): probabilities of every value, lesions of many peak probabilities.
    soft = {"level": 0.3, "sharpness": 10.0}
    soft_card = ModelCard(
        name="soft", architecture="threshold", architecture_options=soft, spacing_mm=spacing, patch_size=64,
        hu_window=(-1000.0, 1000.0),
    )  # fmt: skip
    return {
        "threshold": write_threshold_model(folder / "threshold.safetensors", LEVEL_HU, spacing_mm=spacing),
        "soft": save_model(folder / "soft.safetensors", build_segmentor("threshold", 1, 2, **soft), soft_card),
        "unet": save_model(folder / "tiny.safetensors", build_segmentor("unet", base_channels=4), card),
    }


def segment(model: Path, image: sitk.Image, **options):
    return Segmenter(load_model(model), SegmentOptions(device="cpu", **options)).segment(image)


def test_the_probability_map_is_on_the_cts_grid_and_agrees_with_the_label(
    ct: sitk.Image, models: dict[str, Path]
) -> None:
    result = segment(models["soft"], ct)
    probabilities = result.probabilities
    assert same_geometry(probabilities, ct, tolerance=0) and probabilities.GetPixelID() == sitk.sitkUInt8
    values = sitk.GetArrayFromImage(probabilities)
    label = sitk.GetArrayFromImage(result.label)
    assert values.max() > values.min() and label.any()
    # round(p * 255) >= 128 exactly when p >= 0.5, the threshold: every voxel agrees, on an oblique grid too.
    np.testing.assert_array_equal(label == 1, values >= 128)
    roi = sitk.GetArrayFromImage(result.lungs.roi_mask).astype(bool)
    assert not values[~roi].any()
    assert result.uncertainty is None


def test_tta_mirrors_back_what_it_mirrored(ct: sitk.Image, models: dict[str, Path]) -> None:
    # The threshold network answers each pixel on its own: every flip, mirrored back, gives the same answer.
    plain = segment(models["threshold"], ct)
    mirrored = segment(models["threshold"], ct, tta=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mirrored.label), sitk.GetArrayFromImage(plain.label))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(mirrored.probabilities), sitk.GetArrayFromImage(plain.probabilities)
    )
    assert same_geometry(mirrored.uncertainty, ct, tolerance=0)
    assert not sitk.GetArrayFromImage(mirrored.uncertainty).any()
    assert mirrored.summary()["tta"] is True


def test_tta_uncertainty_shows_where_the_flips_disagree(ct: sitk.Image, models: dict[str, Path]) -> None:
    result = segment(models["unet"], ct, tta=True)
    spread = sitk.GetArrayFromImage(result.uncertainty)
    roi = sitk.GetArrayFromImage(result.lungs.roi_mask).astype(bool)
    assert spread[roi].max() > 0 and not spread[~roi].any()
    assert spread.max() <= 128  # the standard deviation of values in [0, 1] is at most 0.5
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(result.label) == 1, sitk.GetArrayFromImage(result.probabilities) >= 128
    )


def test_small_and_doubtful_lesions_are_removed_when_asked(ct: sitk.Image, models: dict[str, Path]) -> None:
    everything = segment(models["threshold"], ct)
    volumes = sorted(lesion.volume_ml for lesion in everything.lesions)
    assert len(volumes) >= 4 and not everything.removed_lesions
    floor = volumes[len(volumes) // 2]
    kept = segment(models["threshold"], ct, min_lesion_ml=floor)
    assert [lesion.id for lesion in kept.lesions] == list(range(1, len(kept.lesions) + 1))
    assert all(lesion.volume_ml >= floor for lesion in kept.lesions)
    assert sorted(lesion.volume_ml for lesion in kept.lesions) == [v for v in volumes if v >= floor]
    assert kept.tumour_volume_ml == pytest.approx(everything.tumour_volume_ml - sum(v for v in volumes if v < floor))
    # The removed voxels are gone from the label, the others untouched.
    before, after = sitk.GetArrayFromImage(everything.label), sitk.GetArrayFromImage(kept.label)
    assert (after <= before).all() and after.sum() < before.sum()

    doubtful = segment(models["soft"], ct)
    peaks = sorted(lesion.max_probability for lesion in doubtful.lesions)
    assert len(set(peaks)) >= 2
    cut = peaks[len(peaks) // 2]
    sure = segment(models["soft"], ct, min_lesion_probability=cut)
    assert sure.lesions and all(lesion.max_probability >= cut for lesion in sure.lesions)
    assert len(sure.removed_lesions) == sum(peak < cut for peak in peaks)


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory, ct: sitk.Image) -> Path:
    return write_volume(ct, tmp_path_factory.mktemp("ct") / "chest.nii.gz")


def test_every_output_carries_its_provenance(ct_file: Path, models: dict[str, Path], tmp_path: Path) -> None:
    output, table, probabilities = tmp_path / "chest.seg.nrrd", tmp_path / "chest.json", tmp_path / "p.nrrd"
    options = SegmentOptions(device="cpu", min_lesion_ml=0.01)
    summary = segment_file(
        ct_file, output, models["threshold"], options, lesions_path=table, probabilities_path=probabilities
    )
    expected = {
        "CMEDL_model": "threshold-reference",
        "CMEDL_model_sha256": file_sha256(models["threshold"]),
        "CMEDL_engine_version": __version__,
        "CMEDL_input": "chest.nii.gz",
        "CMEDL_input_sha256": hashlib.sha256(ct_file.read_bytes()).hexdigest(),
    }
    for path in (output, probabilities):
        header = sitk.ReadImage(str(path))
        for key, value in expected.items():
            assert header.GetMetaData(key) == value, (path.name, key)
        recorded = json.loads(header.GetMetaData("CMEDL_options"))
        assert recorded["min_lesion_ml"] == 0.01 and recorded["tta"] is False and recorded["device"] == "cpu"
    document = read_lesions(table)
    assert document["provenance"] == summary["provenance"]
    assert {f"CMEDL_{key}": value for key, value in document["provenance"].items() if key != "options"} == expected
    assert document["lesion_count"] == summary["lesion_count"] == len(summary["lesions"]) > 0
    assert document["lesions"] == summary["lesions"]
    assert same_geometry(read_volume(probabilities), read_volume(ct_file), tolerance=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.json", "chest.seg.nrrd", "p.nrrd"]


def test_a_folders_hash_is_the_hash_of_its_sorted_file_hashes(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for name, content in (("b.dcm", b"second"), ("a.dcm", b"first"), ("c.dcm", b"third")):
        (folder / name).write_bytes(content)
    digests = sorted(hashlib.sha256(content).hexdigest() for content in (b"first", b"second", b"third"))
    assert input_sha256(folder) == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    (folder / "a.dcm").rename(folder / "z.dcm")  # names do not count
    assert input_sha256(folder) == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    (folder / "c.dcm").write_bytes(b"changed")
    assert input_sha256(folder) != hashlib.sha256("\n".join(digests).encode()).hexdigest()


def test_the_command_line_reports_lesions_and_refuses_inconsistent_options(
    ct_file: Path, models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    output, table = tmp_path / "out.seg.nrrd", tmp_path / "lesions.csv"
    code = main([
        "segment", str(ct_file), "-o", str(output), "--model", str(models["threshold"]), "--device", "cpu",
        "--lesions", str(table), "--progress", "json",
    ])  # fmt: skip
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    done = events[-1]
    assert done["event"] == "done"
    assert done["result"]["lesion_count"] == len(done["result"]["lesions"]) == len(read_lesions(table)["lesions"])
    assert {"segment", "write"} <= {event["stage"] for event in events if event["event"] == "progress"}

    for extra, message in (
        (["--uncertainty", str(tmp_path / "u.nrrd")], "--uncertainty needs --tta"),
        (["--format", "nii.gz"], "--format is for a batch"),
        (["--min-lesion-probability", "1.5"], "minimum lesion probability"),
        (["--min-lesion-ml", "-1"], "minimum lesion volume"),
    ):
        code = main(["segment", str(ct_file), "-o", str(tmp_path / "x.seg.nrrd"), "--progress", "none", *extra])
        assert code == 3, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.seg.nrrd").exists()


# -- batch ----------------------------------------------------------------------------------------------


@pytest.fixture
def batch_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cts"
    folder.mkdir()
    write_volume(small_ct(4), folder / "alpha.nii.gz")
    write_volume(small_ct(5), folder / "beta.nrrd")
    (folder / "broken.nii.gz").write_bytes(b"not an image at all" * 20)
    return folder


def rows_by_case(out: Path) -> dict[str, dict]:
    return {row["case"]: row for row in read_summary(out / "summary.csv")}


def test_a_batch_survives_a_broken_case_and_resumes(
    batch_folder: Path, models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "results"
    model = str(models["threshold"])
    # As a user runs it: a child process, one error line, the documented exit code.
    first = run_cmedl("segment", str(batch_folder), "-o", str(out), "--model", model, "--device", "cpu")
    assert first.returncode == PARTIAL_FAILURE_EXIT_CODE, first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("cmedl: error:")]
    assert errors == [f"cmedl: error: 1 of 3 cases failed; see {out / 'summary.csv'}"]
    rows = rows_by_case(out)
    assert {case: row["status"] for case, row in rows.items()} == {"alpha": "ok", "beta": "ok", "broken": "failed"}
    assert "broken.nii.gz" in rows["broken"]["error"] and rows["broken"]["tumour_volume_ml"] == ""
    for case in ("alpha", "beta"):
        document = read_lesions(out / f"{case}.lesions.json")
        assert int(rows[case]["lesion_count"]) == document["lesion_count"] > 0
        assert float(rows[case]["tumour_volume_ml"]) == document["tumour_volume_ml"]
        assert document["provenance"]["model_sha256"] == file_sha256(models["threshold"])
    written = sorted(p.name for p in out.iterdir())
    assert written == ["alpha.lesions.json", "alpha.seg.nrrd", "beta.lesions.json", "beta.seg.nrrd", "summary.csv"]
    stamps = {name: os.stat(out / name).st_mtime_ns for name in written if name != "summary.csv"}

    # Again, in process: the finished cases are skipped, the broken one is tried again; one model load.
    loads = []
    monkeypatch.setattr(cmedl.batch, "load_model", lambda path: loads.append(path) or load_model(path))
    assert main(["segment", str(batch_folder), "-o", str(out), "--model", model, "--progress", "none"]) == 9
    assert len(loads) == 1
    rows = rows_by_case(out)
    assert {case: row["status"] for case, row in rows.items()} == {
        "alpha": "skipped", "beta": "skipped", "broken": "failed"
    }  # fmt: skip
    assert rows["alpha"]["lesion_count"] != "" and rows["alpha"]["tumour_volume_ml"] != ""
    assert {name: os.stat(out / name).st_mtime_ns for name in stamps} == stamps

    # The broken case repaired: it runs, the others stay skipped, and the batch succeeds.
    (batch_folder / "broken.nii.gz").unlink()
    write_volume(small_ct(6), batch_folder / "broken.nii.gz")
    assert main(["segment", str(batch_folder), "-o", str(out), "--model", model, "--progress", "none"]) == 0
    assert [row["status"] for row in rows_by_case(out).values()] == ["skipped", "skipped", "ok"]

    # Options that change the result start the cases again; the device does not.
    assert main(["segment", str(batch_folder), "-o", str(out), "--model", model, "--progress", "none",
                 "--device", "cpu", "--batch-size", "2"]) == 0  # fmt: skip
    assert {row["status"] for row in rows_by_case(out).values()} == {"skipped"}
    assert main(["segment", str(batch_folder), "-o", str(out), "--model", model, "--progress", "none",
                 "--min-lesion-ml", "0.5"]) == 0  # fmt: skip
    assert {row["status"] for row in rows_by_case(out).values()} == {"ok"}
    assert read_lesions(out / "alpha.lesions.json")["provenance"]["options"]["min_lesion_ml"] == 0.5


def test_a_list_file_batch_with_nifti_results_and_probability_maps(
    batch_folder: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    listing = tmp_path / "cases.txt"
    listing.write_text(f"# two of the cases\n\n{batch_folder / 'alpha.nii.gz'}\n../{tmp_path.name}/cts/beta.nrrd\n")
    out, maps = tmp_path / "out", tmp_path / "maps"
    code = main([
        "segment", str(listing), "-o", str(out), "--model", str(models["threshold"]), "--progress", "none",
        "--format", "nii.gz", "--probabilities", str(maps),
    ])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "alpha.lesions.json", "alpha.nii.gz", "beta.lesions.json", "beta.nii.gz", "summary.csv"
    ]  # fmt: skip
    assert sorted(p.name for p in maps.iterdir()) == ["alpha.probability.nii.gz", "beta.probability.nii.gz"]
    ct = read_volume(batch_folder / "beta.nrrd")
    assert same_geometry(read_volume(maps / "beta.probability.nii.gz"), ct)
    assert same_geometry(read_volume(out / "beta.nii.gz"), ct)


def test_what_counts_as_a_batch(batch_folder: Path, tmp_path: Path, models: dict[str, Path], capsys) -> None:
    assert is_batch_input(batch_folder) and not is_batch_input(batch_folder / "alpha.nii.gz")
    listing = tmp_path / "list.txt"
    listing.write_text("alpha.nii.gz\n")
    assert is_batch_input(listing)
    # A folder holding one DICOM series is one CT, not a batch.
    series = tmp_path / "series"
    series.mkdir()
    volume = sitk.Cast(small_ct()[:, :, :3], sitk.sitkInt16)
    for index in range(3):
        slice_image = volume[:, :, index]
        for tag, value in (
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.42"),
            ("0020|0013", str(index + 1)),
            ("0020|0032", f"0\\0\\{index * 5.0}"),
            ("0008|0060", "CT"),
        ):
            slice_image.SetMetaData(tag, value)
        sitk.WriteImage(slice_image, str(series / f"slice{index}.dcm"))
    assert not is_batch_input(series)
    # Two inputs with one case name would overwrite each other's results.
    write_volume(small_ct(7), batch_folder / "alpha.nrrd")
    code = main(["segment", str(batch_folder), "-o", str(tmp_path / "o"), "--model", str(models["threshold"]),
                 "--progress", "none"])  # fmt: skip
    assert code == 3 and "case name 'alpha'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
