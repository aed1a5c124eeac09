"""Synthetic chest phantoms: determinism, unpaired datasets on disk, CT/MR appearance, tumours, grids.

Everything is measured on the generated volumes; the tissue map is used only to say *where* to measure
(which voxels are mediastinum, muscle or heart).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from cmedl.cli import main
from cmedl.errors import ConfigError
from cmedl.phantom import (
    CHEST_WALL_TISSUES,
    LOCATIONS,
    MEDIASTINAL_TISSUES,
    TUMOUR_TABLE_COLUMNS,
    PhantomCase,
    Tissue,
    case_seed,
    make_phantom,
    measure_tumour_contrast,
    write_phantom_dataset,
)
from cmedl.volumes import list_volumes, read_volume, same_geometry, stem_of

SMALL = 96  # in-plane matrix for the quick checks (spacing about 3-5 mm)


def _arrays(case: PhantomCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        sitk.GetArrayFromImage(case.image),
        sitk.GetArrayFromImage(case.label),
        sitk.GetArrayFromImage(case.tissues),
    )


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask without its in-plane border pixels, where partial volume with neighbours is negligible."""
    return ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), dtype=bool))


def _air_inside_body(ct_slice: np.ndarray) -> np.ndarray:
    """Pixels below -300 HU that are not connected to the image border (the lung rule of a detector)."""
    air = ct_slice < -300
    labels, _ = ndimage.label(air)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return air & ~np.isin(labels, border[border > 0])


@pytest.fixture(scope="module")
def full_ct() -> PhantomCase:
    """One full-size CT: thin layers such as subcutaneous fat need real pixel sizes to be measured."""
    return make_phantom("ct", seed=11, size=512)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[tuple[int, int]]]:
    out = tmp_path_factory.mktemp("phantoms")
    calls: list[tuple[int, int]] = []
    description = write_phantom_dataset(
        out, n_ct=2, n_mr=2, seed=5, size=64, progress=lambda done, total: calls.append((done, total))
    )
    return out, description, calls


def test_same_seed_gives_identical_volumes_and_other_seeds_differ() -> None:
    for modality in ("ct", "mr"):
        first, again, other = (make_phantom(modality, seed, size=64) for seed in (3, 3, 4))
        image, label, _ = _arrays(first)
        image_again, label_again, _ = _arrays(again)
        assert image.tobytes() == image_again.tobytes()
        assert label.tobytes() == label_again.tobytes()
        assert first.tumours == again.tumours
        assert first.image.GetSpacing() == again.image.GetSpacing()
        other_image = sitk.GetArrayFromImage(other.image)
        assert other_image.shape != image.shape or not np.array_equal(other_image, image)


def test_one_seed_is_one_anatomy_in_both_modalities() -> None:
    ct, mr = make_phantom("ct", 8, size=64), make_phantom("mr", 8, size=64)
    assert same_geometry(ct.image, mr.image)
    assert np.array_equal(sitk.GetArrayFromImage(ct.tissues), sitk.GetArrayFromImage(mr.tissues))
    assert np.array_equal(sitk.GetArrayFromImage(ct.label), sitk.GetArrayFromImage(mr.label))


def test_dataset_layout_pairs_images_and_labels_by_name(dataset) -> None:
    out, description, calls = dataset
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    on_disk = json.loads((out / "phantoms.json").read_text(encoding="utf-8"))
    assert on_disk == description
    assert [case["name"] for case in description["cases"]] == ["ct_0000", "ct_0001", "mr_0000", "mr_0001"]
    for modality in ("ct", "mr"):
        images = list_volumes(out / modality / "images")
        labels = list_volumes(out / modality / "labels")
        assert [stem_of(p) for p in images] == [stem_of(p) for p in labels] == [f"{modality}_0000", f"{modality}_0001"]
    assert not list(out.rglob("*.partial*")), "temporary files were left behind"

    for case in description["cases"]:
        image = read_volume(out / case["image"])
        label = read_volume(out / case["label"])
        assert Path(case["image"]).name == Path(case["label"]).name
        assert same_geometry(image, label)
        expected_type = sitk.sitkInt16 if case["modality"] == "ct" else sitk.sitkFloat32
        assert image.GetPixelID() == expected_type
        assert list(image.GetSize()) == case["size"]
        assert np.allclose(image.GetSpacing(), case["spacing_mm"])
        assert np.allclose(image.GetOrigin(), case["origin_mm"])
        mask = sitk.GetArrayFromImage(label)
        assert set(np.unique(mask)) == {0, 1}
        _, components = ndimage.label(mask)
        assert components == len(case["tumours"])
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000
        listed_ml = sum(tumour["volume_ml"] for tumour in case["tumours"])
        assert mask.sum() * voxel_ml == pytest.approx(listed_ml, rel=1e-3, abs=1e-3)
        for tumour in case["tumours"]:
            index = image.TransformPhysicalPointToIndex(tumour["centre_mm"])
            assert all(0 <= i < n for i, n in zip(index, image.GetSize()))


def test_dataset_cases_are_unpaired_but_reproducible(dataset) -> None:
    out, description, _ = dataset
    cases = {case["name"]: case for case in description["cases"]}
    for index in range(2):
        ct_case, mr_case = cases[f"ct_{index:04d}"], cases[f"mr_{index:04d}"]
        assert ct_case["seed"] != mr_case["seed"]
        assert ct_case["seed"] == case_seed(5, "ct", index) and mr_case["seed"] == case_seed(5, "mr", index)
        # Rebuild the MR case's anatomy as a CT: its body and lungs must differ from the CT case's.
        ct = read_volume(out / ct_case["image"])
        mr_anatomy_as_ct = make_phantom("ct", mr_case["seed"], size=64)
        masks = []
        for image in (ct, mr_anatomy_as_ct.image):
            array = sitk.GetArrayFromImage(image)
            lungs = np.stack([_air_inside_body(plane) for plane in array])
            body = ndimage.binary_fill_holes(array > -500)
            voxel_ml = float(np.prod(image.GetSpacing())) / 1000
            masks.append((lungs.sum() * voxel_ml, body.sum() * voxel_ml))
        (lungs_ct, body_ct), (lungs_mr, body_mr) = masks
        assert abs(lungs_ct - lungs_mr) > 0.01 * lungs_ct or abs(body_ct - body_mr) > 0.01 * body_ct
        # And the MR file is exactly what its recorded seed generates.
        mr_on_disk = sitk.GetArrayFromImage(read_volume(out / mr_case["image"]))
        assert np.array_equal(mr_on_disk, sitk.GetArrayFromImage(make_phantom("mr", mr_case["seed"], size=64).image))


def test_empty_modalities_are_allowed(tmp_path: Path) -> None:
    description = write_phantom_dataset(tmp_path, n_ct=1, n_mr=0, seed=1, size=48)
    assert [case["name"] for case in description["cases"]] == ["ct_0000"]
    assert [stem_of(p) for p in list_volumes(tmp_path / "ct" / "labels")] == ["ct_0000"]
    assert not (tmp_path / "mr").exists()


def test_ct_has_realistic_hounsfield_units_and_a_low_contrast_tumour(full_ct: PhantomCase) -> None:
    image, label, tissues = _arrays(full_ct)
    assert image.dtype == np.int16
    assert np.mean(image < -950) > 0.2  # air around the patient
    lungs = _interior(tissues == Tissue.LUNG)
    assert -900 < np.median(image[lungs]) < -780
    fat = _interior(tissues == Tissue.FAT)
    assert -130 < np.median(image[fat]) < -70
    muscle = _interior(tissues == Tissue.MUSCLE)
    assert 30 < np.median(image[muscle]) < 65
    assert np.percentile(image[tissues == Tissue.CORTICAL_BONE], 90) > 500
    assert image.max() > 700

    liver = _interior(_interior(tissues == Tissue.LIVER))
    noise = float(np.std(image[liver]))
    assert 5 < noise < 30

    mediastinum = _interior(np.isin(tissues, [Tissue.MEDIASTINUM, Tissue.MYOCARDIUM, Tissue.BLOOD]))
    tumour = _interior(label.astype(bool))
    assert tumour.sum() > 20
    contrast = float(image[tumour].mean() - image[mediastinum].mean())
    assert abs(contrast) < 15, f"tumour vs mediastinum {contrast:.1f} HU"
    assert float(image[tumour].mean() - image[lungs].mean()) > 700


def test_mr_is_t2_like_with_rician_noise() -> None:
    case = make_phantom("mr", seed=21, size=128)
    image, label, tissues = _arrays(case)
    assert image.dtype == np.float32
    assert image.min() >= 0
    tumour = image[_interior(label.astype(bool))].mean()
    muscle = image[_interior(tissues == Tissue.MUSCLE)].mean()
    heart = image[_interior(np.isin(tissues, [Tissue.MYOCARDIUM, Tissue.BLOOD]))].mean()
    lungs = image[_interior(tissues == Tissue.LUNG)].mean()
    assert tumour > 2.5 * muscle and tumour > 2.5 * heart, (tumour, muscle, heart)
    assert lungs < 0.15 * tumour
    # Outside the body the signal is pure Rician noise: positive mean, never Gaussian around zero.
    air = image[tissues == Tissue.AIR]
    assert 3 < air.mean() < 40 and np.mean(air < 1) < 0.05
    assert image.max() < 3000


def test_tumours_count_size_and_sites_over_many_cases() -> None:
    abutting = total = 0
    for seed in range(20):
        case = make_phantom("ct", seed, size=SMALL)
        _, label, tissues = _arrays(case)
        components, count = ndimage.label(label)
        assert 1 <= count <= 3 and count == len(case.tumours)
        voxel_mm3 = float(np.prod(case.image.GetSpacing()))
        for index in range(1, count + 1):
            tumour = components == index
            diameter = (6 * tumour.sum() * voxel_mm3 / np.pi) ** (1 / 3)
            assert 10 <= diameter <= 60, f"seed {seed}: {diameter:.1f} mm"
            ring = ndimage.binary_dilation(tumour, np.ones((1, 3, 3), dtype=bool)) & ~tumour
            near_mediastinum = np.isin(tissues[ring], MEDIASTINAL_TISSUES).mean() > 0.05
            near_wall = np.isin(tissues[ring], CHEST_WALL_TISSUES).mean() > 0.05
            centre = np.argwhere(tumour).mean(axis=0)
            listed = min(
                case.tumours,
                key=lambda t: np.linalg.norm(
                    np.array(case.image.TransformPhysicalPointToContinuousIndex(t["centre_mm"]))[::-1] - centre
                ),
            )
            if listed["location"] == "mediastinum":
                assert near_mediastinum, f"seed {seed}: a 'mediastinum' tumour does not touch the mediastinum"
            elif listed["location"] == "chest_wall":
                assert near_wall, f"seed {seed}: a 'chest_wall' tumour does not touch the chest wall"
            else:
                assert not (near_mediastinum or near_wall), f"seed {seed}: a 'parenchyma' tumour touches the wall"
            abutting += near_mediastinum or near_wall
            total += 1
    assert abutting / total >= 0.4, f"only {abutting} of {total} tumours abut the mediastinum or chest wall"


def test_lungs_are_two_large_air_regions_inside_a_body_surrounded_by_air() -> None:
    for seed in (1, 2, 3):
        image = sitk.GetArrayFromImage(make_phantom("ct", seed, size=SMALL).image)
        border = np.concatenate([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], axis=None)
        assert np.mean(border < -900) > 0.99  # the body does not touch the image edge
        with_lungs = [z for z, plane in enumerate(image) if _air_inside_body(plane).sum() > 50]
        assert with_lungs[0] > 0 and with_lungs[-1] < image.shape[0] - 1  # margins below and above the lungs
        middle = image[(with_lungs[0] + with_lungs[-1]) // 2]
        components, count = ndimage.label(_air_inside_body(middle))
        sizes = np.bincount(components.ravel())[1:]
        largest = np.argsort(sizes)[::-1][:2] + 1
        assert count >= 2 and sizes[largest[1] - 1] > 0.3 * sizes[largest[0] - 1]
        assert sizes[largest - 1].sum() > 0.9 * sizes.sum()
        columns = [np.argwhere(components == lung)[:, 1].mean() for lung in largest]
        assert min(columns) < middle.shape[1] / 2 < max(columns)  # one lung on each side


def test_full_size_grid_is_realistic(full_ct: PhantomCase) -> None:
    case = full_ct
    sx, sy, sz = case.image.GetSpacing()
    assert 0.6 <= sx == sy <= 1.0 and 2.0 <= sz <= 5.0
    assert 300 <= 512 * sx <= 520
    assert case.image.GetSize()[:2] == (512, 512) and case.image.GetSize()[2] * sz > 200
    origin = case.image.GetOrigin()
    assert origin[0] == pytest.approx(-(511 * sx) / 2) and origin[1] == pytest.approx(-(511 * sy) / 2)
    assert origin[2] < 0
    assert case.image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    image = sitk.GetArrayViewFromImage(case.image)
    # More air than the trachea holds (about 3 cm2) means lung.
    with_lungs = [z for z, plane in enumerate(image) if _air_inside_body(plane).sum() * sx * sy > 1000]
    assert with_lungs[0] > 0 and with_lungs[-1] < image.shape[0] - 1
    assert (with_lungs[-1] - with_lungs[0]) * sz > 150  # most of the apex-to-base height of an adult lung
    middle = image[(with_lungs[0] + with_lungs[-1]) // 2]
    assert _air_inside_body(middle).sum() * sx * sy > 100 * 100  # over 100 cm2 of lung


def test_small_matrices_keep_the_field_of_view() -> None:
    for seed in range(4):
        sx, sy, sz = make_phantom("ct", seed, size=64, slices=4).image.GetSpacing()
        assert 0.6 * 8 <= sx == sy <= 1.0 * 8 and 2.0 <= sz <= 5.0


def test_explicit_spacing_and_slices_override_the_draw() -> None:
    case = make_phantom("mr", seed=2, size=64, slices=30, spacing=(5.0, 5.0, 6.0))
    assert case.image.GetSize() == (64, 64, 30)
    assert case.image.GetSpacing() == (5.0, 5.0, 6.0)
    assert same_geometry(case.image, case.label)
    assert sitk.GetArrayViewFromImage(case.label).any()


@pytest.mark.parametrize(
    "arguments",
    [
        {"modality": "pet", "seed": 1},
        {"modality": "ct", "seed": -1},
        {"modality": "ct", "seed": 1, "size": 8},
        {"modality": "ct", "seed": 1, "slices": 0},
        {"modality": "ct", "seed": 1, "spacing": (1.0, 0.0, 2.0)},
    ],
)
def test_bad_arguments_raise_config_errors(arguments: dict) -> None:
    with pytest.raises(ConfigError):
        make_phantom(**arguments)


def test_negative_case_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_phantom_dataset(tmp_path, n_ct=-1, n_mr=1, seed=0, size=48)


# -- tumour contrast, sites, instances and the per-tumour table ------------------------------------------


def test_default_options_keep_phantoms_bit_identical() -> None:
    # Regression check: these digests were taken before the tumour options existed; the defaults must
    # keep drawing the same random numbers in the same order.
    expected = {
        "ct": "4d677fd8a03c06562f437a8a5802e848727a70f81d4ceb54415d0dd08d1c7c3d",
        "mr": "be9bdc4d2b9c852af0b17f2b88ccbe829c0ae62f819e068811ce36d3d85cbb0c",
    }
    for modality, digest in expected.items():
        image = sitk.GetArrayFromImage(make_phantom(modality, 5, size=64).image)
        assert hashlib.sha256(image.tobytes()).hexdigest() == digest, modality


def _strata(seed: int) -> list[str]:
    return [LOCATIONS[seed % 3], LOCATIONS[(seed + 1) % 3]]


def test_set_ct_tumour_contrast_is_measured_back() -> None:
    measured: dict[float, dict[tuple[int, int], dict]] = {}
    for setting in (-15.0, -30.0):
        measured[setting] = {}
        for seed in (0, 1, 3, 5, 6, 7):
            case = make_phantom("ct", seed, size=SMALL, ct_tumour_contrast=setting, tumour_locations=_strata(seed))
            for row in measure_tumour_contrast(case.image, case.tissues, case.instances, "ct"):
                if row["reference"] == "soft_tissue":
                    measured[setting][seed, row["id"]] = row
    assert measured[-15.0].keys() == measured[-30.0].keys() and len(measured[-15.0]) >= 6
    for setting, rows in measured.items():
        contrasts = [row["contrast"] for row in rows.values()]
        # At this matrix a tumour's interior holds only tens of voxels (noise 10-25 HU, 6 HU texture) and
        # its surroundings mix mediastinum, muscle and liver, so single tumours scatter by up to about
        # 10 HU. Their mean comes within 4 HU; a wrong sign or a factor of 2 would be 7.5 HU off or more.
        assert abs(float(np.mean(contrasts)) - setting) < 4, (setting, contrasts)
        assert all(abs(contrast - setting) < 12 for contrast in contrasts), (setting, contrasts)
        for row in rows.values():
            assert 5 < row["noise"] < 40  # the CT noise sigma is drawn within 10-25 HU, plus tissue texture
            assert row["cnr"] == pytest.approx(row["contrast"] / row["noise"], abs=2e-3)
    for key, weak in measured[-15.0].items():
        strong = measured[-30.0][key]
        # Same anatomy and noise: only the tumour's level moves, by exactly 15 HU.
        assert strong["contrast"] - weak["contrast"] == pytest.approx(-15.0, abs=1.5)
        assert abs(strong["cnr"]) > abs(weak["cnr"])


def test_requested_tumour_sites_are_painted_and_shared_by_both_modalities() -> None:
    for seed, sites in ((2, ["parenchyma", "chest_wall"]), (7, ["mediastinum", "parenchyma", "mediastinum"])):
        ct = make_phantom("ct", seed, size=SMALL, tumour_locations=sites)
        mr = make_phantom("mr", seed, size=SMALL, tumour_locations=sites)
        assert [tumour["location"] for tumour in ct.tumours] == sites
        assert [tumour["id"] for tumour in ct.tumours] == list(range(1, len(sites) + 1))
        assert ct.tumours == mr.tumours
        for name in ("tissues", "label", "instances"):
            ct_array = sitk.GetArrayFromImage(getattr(ct, name))
            assert np.array_equal(ct_array, sitk.GetArrayFromImage(getattr(mr, name))), name
        instances = sitk.GetArrayFromImage(ct.instances)
        assert np.array_equal(instances > 0, sitk.GetArrayFromImage(ct.label) > 0)
        assert sorted(np.unique(instances[instances > 0])) == [tumour["id"] for tumour in ct.tumours]


def test_stratified_dataset_with_paired_mr_and_tumour_table(tmp_path: Path) -> None:
    description = write_phantom_dataset(
        tmp_path, n_ct=3, n_mr=1, seed=5, size=64, stratified=True, paired_mr=True, ct_tumour_contrast=-20
    )
    assert description["paired"] is False and description["paired_mr"] is True
    assert description["stratified"] is True and description["ct_tumour_contrast"] == -20
    assert json.loads((tmp_path / "phantoms.json").read_text(encoding="utf-8")) == description
    ct_strata = []
    for case in description["cases"]:
        index = int(case["name"].split("_")[1])
        assert case["tumour_locations"] == _strata(index)
        assert [tumour["location"] for tumour in case["tumours"]] == _strata(index)
        image = read_volume(tmp_path / case["image"])
        if case["modality"] == "ct":
            ct_strata += _strata(index)
            paired = read_volume(tmp_path / case["paired_mr"])
            instances = read_volume(tmp_path / case["instances"])
            assert same_geometry(image, paired) and same_geometry(image, instances)
            assert paired.GetPixelID() == sitk.sitkFloat32 and instances.GetPixelID() == sitk.sitkUInt8
            ids = sitk.GetArrayFromImage(instances)
            assert sorted(np.unique(ids[ids > 0])) == [tumour["id"] for tumour in case["tumours"]]
            label = sitk.GetArrayFromImage(read_volume(tmp_path / case["label"]))
            assert np.array_equal(ids > 0, label > 0)
        else:
            assert "paired_mr" not in case and "instances" not in case
        for tumour in case["tumours"]:
            assert (tumour["ct_cnr"] is None) == (case["modality"] == "mr")
            assert tumour["mr_cnr"] is not None  # MR cases, and CT cases with their paired MR
    assert sorted(ct_strata) == sorted(LOCATIONS * 2)  # three cases hold each site twice

    with (tmp_path / "tumours.csv").open(newline="", encoding="utf-8") as table:
        rows = list(csv.DictReader(table))
    assert list(rows[0].keys()) == list(TUMOUR_TABLE_COLUMNS)
    listed = [(case["name"], tumour) for case in description["cases"] for tumour in case["tumours"]]
    assert len(rows) == len(listed)
    for row, (name, tumour) in zip(rows, listed):
        assert (row["case"], int(row["tumour_id"]), row["stratum"]) == (name, tumour["id"], tumour["location"])
        assert row["ct_reference"] == (tumour["ct_reference"] or "")
        assert float(row["mr_contrast"]) == tumour["mr_contrast"]
    assert not list(tmp_path.rglob("*.partial*"))


def test_phantom_command_passes_the_tumour_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "data"
    code = main(
        [
            "phantom",
            str(out),
            "--ct",
            "1",
            "--mr",
            "0",
            "--seed",
            "2",
            "--size",
            "64",
            "--ct-contrast",
            "-25",
            "--stratified",
            "--paired-mr",
        ]
    )
    assert code == 0
    assert "-25 HU" in capsys.readouterr().out
    description = json.loads((out / "phantoms.json").read_text(encoding="utf-8"))
    assert description["ct_tumour_contrast"] == -25 and description["stratified"] and description["paired_mr"]
    assert (out / "ct" / "paired_mr" / "ct_0000.nii.gz").exists()
    rows = (out / "tumours.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split(",") == list(TUMOUR_TABLE_COLUMNS) and len(rows) == 1 + len(description["cases"][0]["tumours"])


@pytest.mark.parametrize("contrast", [math.nan, math.inf, 1000.0, -200.5])
def test_bad_tumour_contrast_is_refused(tmp_path: Path, contrast: float) -> None:
    with pytest.raises(ConfigError):
        make_phantom("ct", 1, size=48, ct_tumour_contrast=contrast)
    with pytest.raises(ConfigError):
        write_phantom_dataset(tmp_path, n_ct=1, n_mr=0, seed=0, size=48, ct_tumour_contrast=contrast)
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("sites", [["mediastinum", "lung"], [], "parenchyma"])
def test_bad_tumour_sites_are_refused(sites) -> None:
    with pytest.raises(ConfigError, match="lung" if "lung" in sites else "site"):
        make_phantom("mr", 1, size=48, tumour_locations=sites)
