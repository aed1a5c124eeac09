"""Lesions: components counted and ordered, RECIST diameters on known shapes, location, table files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from cmedl.errors import OutputError
from cmedl.lesions import (
    TABLE_COLUMNS,
    find_lesions,
    label_lesions,
    lesions_table,
    read_lesions,
    write_lesions,
)
from cmedl.lungs import detect_lungs
from cmedl.phantom import make_phantom


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# (name, spacing (i, j, k) mm, direction): isotropic, anisotropic in-plane and through-plane, oblique (a rotated
# and tilted grid), and a sagittal acquisition whose axial planes are spanned by the first and third index axes.
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
GRIDS = [
    ("isotropic", (1.0, 1.0, 1.0), np.eye(3)),
    ("anisotropic", (0.7, 1.1, 3.0), np.eye(3)),
    ("oblique", (0.8, 0.8, 2.5), rotation("x", 10) @ rotation("z", 30)),
    ("oblique-anisotropic", (0.6, 1.2, 2.0), rotation("y", 8) @ rotation("z", -40)),
    ("sagittal", (2.0, 0.9, 0.8), SAGITTAL),
]


def ellipsoid_on(grid: tuple, semi_axes: tuple[float, float, float], angle: float, size=(96, 96, 40)):
    """A binary ellipsoid image on ``grid`` with semi-axes (a, b) in the grid's axial plane, rotated by ``angle``
    (radians) in that plane, and c along its normal; centred on a voxel of a slice. Returns (image, axial axis)."""
    _, spacing, direction = grid
    direction = np.asarray(direction, dtype=float)
    axial = int(np.argmax(np.abs(direction[2])))
    in_plane = [q for q in range(3) if q != axial]
    size = list(size)
    size[axial] = 40
    size[in_plane[0]] = size[in_plane[1]] = 96
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.flatten()))
    image.SetOrigin((-20.0, 13.0, -50.0))
    matrix = direction * np.array(spacing)
    centre = np.array([(n - 1) / 2.0 for n in size])
    centre[axial] = 20  # a whole slice through the centre: the largest section is exactly 2a x 2b
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    offsets = (np.stack([i, j, k], axis=-1) - centre) @ matrix.T
    e1 = direction[:, in_plane[0]]
    e2 = direction[:, in_plane[1]] - (direction[:, in_plane[1]] @ e1) * e1
    e2 /= np.linalg.norm(e2)
    u_dir = math.cos(angle) * e1 + math.sin(angle) * e2
    v_dir = -math.sin(angle) * e1 + math.cos(angle) * e2
    normal = np.cross(e1, e2)
    a, b, c = semi_axes
    inside = (offsets @ u_dir / a) ** 2 + (offsets @ v_dir / b) ** 2 + (offsets @ normal / c) ** 2 <= 1.0
    result = sitk.GetImageFromArray(inside.astype(np.uint8))
    result.CopyInformation(image)
    return result, axial


ELLIPSOIDS = [((20.0, 8.0, 10.0), 0.4), ((12.0, 11.0, 6.0), 1.1), ((5.0, 3.0, 4.0), 0.0)]  # semi-axes mm, angle


@pytest.mark.parametrize("grid", GRIDS, ids=[g[0] for g in GRIDS])
@pytest.mark.parametrize("semi_axes,angle", ELLIPSOIDS)
def test_recist_diameters_of_ellipsoids_on_any_grid(grid, semi_axes, angle) -> None:
    image, axial = ellipsoid_on(grid, semi_axes, angle)
    lesions = find_lesions(image, None, image)
    assert len(lesions) == 1
    lesion = lesions[0]
    a, b, c = semi_axes
    in_plane_step = max(s for q, s in enumerate(grid[1]) if q != axial)
    # Within one in-plane voxel of the true diameters: the outline is a voxel boundary, not a smooth curve.
    assert abs(lesion.long_axis_mm - 2 * a) <= in_plane_step, (lesion.long_axis_mm, 2 * a)
    assert abs(lesion.short_axis_mm - 2 * b) <= in_plane_step, (lesion.short_axis_mm, 2 * b)
    assert lesion.axial_axis == axial
    assert lesion.slice_index == 20  # the centroid's slice
    # Thin slices next to the centre hold a section as large as the centre's once cut into voxels.
    assert abs(lesion.measured_slice - 20) <= 1
    # The end points drawn for a ruler are the long axis.
    start, end = (np.array(p) for p in lesion.long_axis_ras_mm)
    assert np.linalg.norm(end - start) == pytest.approx(lesion.long_axis_mm, abs=1e-6)
    volume = 4.0 / 3.0 * math.pi * a * b * c / 1000.0
    assert lesion.volume_ml == pytest.approx(volume, rel=0.25 if a < 8 else 0.08)


def test_physical_not_index_distances_measure_a_sphere_on_a_stretched_grid() -> None:
    # A sphere of radius 10 mm on 0.5 x 2 mm pixels spans 40 x 10 pixels: only mm make it round.
    grid = ("stretched", (0.5, 2.0, 2.0), np.eye(3))
    image, _ = ellipsoid_on(grid, (10.0, 10.0, 10.0), 0.0)
    lesion = find_lesions(image, None, image)[0]
    assert lesion.long_axis_mm == pytest.approx(20.0, abs=2.0)
    assert lesion.short_axis_mm == pytest.approx(20.0, abs=2.0)


def test_lesions_are_numbered_by_volume_and_diagonal_contact_joins_them() -> None:
    mask = np.zeros((12, 20, 20), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[3:6, 3:6, 3:6] = 1  # 27 voxels touching the first only at a corner: one lesion (26-connectivity)
    mask[8:11, 10:18, 10:18] = 1  # 192 voxels
    mask[0, 18, 0] = 1  # a single voxel
    image = sitk.GetImageFromArray(mask)
    lesions = find_lesions(mask, None, image)
    assert [lesion.voxel_count for lesion in lesions] == [192, 35, 1]
    assert [lesion.id for lesion in lesions] == [1, 2, 3]
    ids = label_lesions(mask)
    assert ids.dtype == np.uint8 and ids.shape == mask.shape
    assert [int(np.count_nonzero(ids == k)) for k in (1, 2, 3)] == [192, 35, 1]
    assert ids[2, 2, 2] == ids[3, 3, 3] == 2
    assert find_lesions(np.zeros_like(mask), None, image) == []
    assert not label_lesions(np.zeros_like(mask)).any()


def test_probability_statistics_from_floats_and_from_bytes() -> None:
    mask = np.zeros((4, 10, 10), dtype=np.uint8)
    mask[1:3, 2:5, 2:5] = 1
    probabilities = np.zeros(mask.shape, dtype=np.float32)
    probabilities[1:3, 2:5, 2:5] = 0.6
    probabilities[2, 3, 3] = 0.95
    probabilities[0, 0, 0] = 1.0  # outside the lesion: ignored
    image = sitk.GetImageFromArray(mask)
    lesion = find_lesions(mask, probabilities, image)[0]
    assert lesion.max_probability == pytest.approx(0.95)
    assert lesion.mean_probability == pytest.approx((17 * 0.6 + 0.95) / 18)
    as_bytes = np.rint(probabilities * 255).astype(np.uint8)
    from_bytes = find_lesions(mask, sitk.GetImageFromArray(as_bytes), image)[0]
    assert from_bytes.max_probability == pytest.approx(0.95, abs=0.5 / 255)
    assert find_lesions(mask, None, image)[0].max_probability is None


def test_location_from_what_the_lesion_touches() -> None:
    """Two box lungs; nodules inside one, between them, lateral to one, and away from both."""
    shape = (12, 80, 100)  # z, y (front to back), x (right to left)
    lung = np.zeros(shape, dtype=np.uint8)
    lung[:, 20:60, 10:40] = 1  # right lung
    lung[:, 20:60, 60:90] = 1  # left lung
    mask = np.zeros(shape, dtype=np.uint8)
    mask[4:8, 30:36, 20:26] = 1  # inside the right lung (a hole in the lung mask, as detect_lungs may leave)
    lung[4:8, 30:36, 20:26] = 0
    mask[3:9, 40:48, 40:48] = 1  # against the right lung's medial side, between the lungs
    mask[3:9, 30:38, 90:96] = 1  # against the left lung's lateral side
    mask[3:9, 2:8, 45:55] = 1  # in front of both, touching neither
    image = sitk.GetImageFromArray(np.zeros(shape, dtype=np.int16))
    image.SetSpacing((1.5, 1.5, 3.0))
    lesions = find_lesions(mask, None, image, sitk.GetImageFromArray(lung))
    by_position = {int(lesion.centroid_index[0]): lesion for lesion in lesions}
    assert by_position[22].location == "inside_lung" and by_position[22].lung_fraction == 1.0
    assert (by_position[43].location, by_position[43].contact_side) == ("mediastinum", "medial")
    assert (by_position[92].location, by_position[92].contact_side) == ("chest_wall", "lateral")
    assert by_position[49].location == "outside_lung_mask" and by_position[49].lung_fraction == 0.0
    assert {lesion.location for lesion in find_lesions(mask, None, image)} == {"unknown"}


def test_the_lungs_hull_from_row_ends_is_the_hull_of_every_lung_pixel() -> None:
    """The hull is built from each row's first and last lung pixel; it must hold exactly the points that the
    hull of every lung pixel holds (irregular masks with holes, concave sides and single-pixel rows)."""
    from scipy.spatial import ConvexHull

    from cmedl.lesions import _LungHulls

    rng = np.random.default_rng(5)
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    for _ in range(20):
        plane = ndimage.binary_opening(rng.random((40, 50)) < rng.uniform(0.2, 0.7))
        plane[rng.integers(40), rng.integers(50)] = True  # at least one pixel, sometimes a lone one
        every = np.argwhere(plane)
        reference = ConvexHull((every[:, None, :] + corners).reshape(-1, 2)).equations
        hulls = _LungHulls(plane[None].astype(np.uint8), axial_axis=2)
        queries = np.column_stack([np.zeros(4000), rng.uniform(-2, 42, 4000), rng.uniform(-2, 52, 4000)])
        expected = np.all(queries[:, 1:] @ reference[:, :2].T + reference[:, 2] <= 1e-9, axis=1)
        np.testing.assert_array_equal(hulls.between(queries), expected)


@pytest.fixture(scope="module")
def two_tumours():
    case = make_phantom("ct", seed=0, size=96, tumour_locations=("parenchyma", "mediastinum"))
    assert len(case.tumours) == 2
    return case, detect_lungs(case.image)


def test_the_table_of_a_phantom_finds_both_tumours_with_their_volumes(two_tumours) -> None:
    case, lungs = two_tumours
    lesions = find_lesions(case.label, None, case.image, lungs.lung_mask)
    assert len(lesions) == 2
    truth = sorted(case.tumours, key=lambda tumour: -tumour["volume_ml"])
    instances = sitk.GetArrayFromImage(case.instances)
    ids = label_lesions(case.label)
    for lesion, tumour in zip(lesions, truth):
        assert lesion.volume_ml == pytest.approx(tumour["volume_ml"], rel=1e-3)
        np.testing.assert_allclose(lesion.centroid_lps_mm, tumour["centre_mm"], atol=0.02)
        x, y, z = lesion.centroid_lps_mm
        assert lesion.centroid_ras_mm == pytest.approx((-x, -y, z))
        np.testing.assert_array_equal(ids == lesion.id, instances == tumour["id"])
        # A tumour of d mm (volume-equivalent sphere) measures close to d across; lobes make it longer.
        assert 0.7 * tumour["diameter_mm"] < lesion.long_axis_mm < 1.8 * tumour["diameter_mm"]
        assert lesion.short_axis_mm <= lesion.long_axis_mm
    parenchymal = next(lesion for lesion, tumour in zip(lesions, truth) if tumour["location"] == "parenchyma")
    assert parenchymal.location == "inside_lung"
    other = next(lesion for lesion in lesions if lesion is not parenchymal)
    assert other.location in ("mediastinum", "chest_wall") and other.contact_side in ("medial", "lateral")


def test_lesion_tables_round_trip_through_json_and_csv(two_tumours, tmp_path: Path) -> None:
    case, lungs = two_tumours
    probabilities = sitk.Cast(case.label, sitk.sitkUInt8) * 200
    lesions = find_lesions(case.label, probabilities, case.image, lungs.lung_mask)
    rows = lesions_table(lesions)
    assert all(list(row) == list(TABLE_COLUMNS) for row in rows)
    json.dumps(rows)  # plain JSON values only
    provenance = {"model": "m", "model_sha256": "ab" * 32, "options": {"tta": True}, "input_sha256": "cd" * 32}
    for name in ("lesions.json", "lesions.csv"):
        path = write_lesions(tmp_path / name, lesions, provenance, {"tumour_volume_ml": 12.5})
        document = read_lesions(path)
        assert document["provenance"] == provenance
        assert document["tumour_volume_ml"] == 12.5 and document["lesion_count"] == 2
        for read, written in zip(document["lesions"], rows):
            for key, value in written.items():
                if isinstance(value, float):
                    assert read[key] == pytest.approx(value), (name, key)
                else:
                    assert read[key] == value, (name, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesions.csv", "lesions.json"]  # no temporary left
    with pytest.raises(OutputError, match="lesion table format"):
        write_lesions(tmp_path / "lesions.txt", lesions)
