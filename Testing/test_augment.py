"""Online augmentation of training patches: geometry, alignment of image and label, determinism, channels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cmedl.errors import ConfigError
from cmedl.training.augment import AugmentConfig, augment_pair, smooth_displacement_field, warp_pair

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

NO_TRANSFORM = dict(flip=False, rotation_deg=0.0, scale=(1.0, 1.0), p_elastic=0.0)


def square_pair(size: int = 96, low: int = 30, high: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy patch with a bright off-centre square, and the square's label."""
    rng = np.random.default_rng(11)
    image = rng.normal(-0.8, 0.05, (size, size)).astype(np.float32)
    label = np.zeros((size, size), np.uint8)
    label[low:high, low + 10 : high + 10] = 1
    image[label == 1] += 1.6
    return image, label


def centroid(weights: np.ndarray) -> np.ndarray:
    rows, cols = np.indices(weights.shape)
    return np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()


def test_identity_config_and_zero_probability_leave_the_pair_unchanged():
    image, label = square_pair()
    for config in (AugmentConfig(**NO_TRANSFORM), AugmentConfig(probability=0.0)):
        out_image, out_label = augment_pair(image, label, np.random.default_rng(0), config)
        np.testing.assert_array_equal(out_image, image)
        np.testing.assert_array_equal(out_label, label)
        assert out_image is not image and out_label is not label


def test_flip_only_flips_image_and_label_together():
    image, label = square_pair()
    config = AugmentConfig(**{**NO_TRANSFORM, "flip": True})
    outcomes = set()
    for seed in range(16):
        out_image, out_label = augment_pair(image, label, np.random.default_rng(seed), config)
        flipped = not np.array_equal(out_label, label)
        outcomes.add(flipped)
        expected_image = image[:, ::-1] if flipped else image
        expected_label = label[:, ::-1] if flipped else label
        np.testing.assert_array_equal(out_label, expected_label)
        np.testing.assert_allclose(out_image, expected_image, atol=1e-5)
    assert outcomes == {True, False}  # p = 0.5: both outcomes show up in 16 draws


def test_shapes_and_dtypes_are_kept_and_label_stays_binary():
    image, label = square_pair()
    config = AugmentConfig(p_elastic=1.0)
    for seed in range(5):
        out_image, out_label = augment_pair(image, label, np.random.default_rng(seed), config)
        assert out_image.shape == image.shape and out_image.dtype == np.float32
        assert out_label.shape == label.shape and out_label.dtype == np.uint8
        assert set(np.unique(out_label)) <= {0, 1}
        assert np.isfinite(out_image).all()


def test_label_stays_on_the_bright_region_after_random_transforms():
    image, label = square_pair()
    config = AugmentConfig(rotation_deg=30.0, scale=(0.8, 1.25), p_elastic=1.0, elastic_displacement_px=3.0)
    moved = 0
    for seed in range(10):
        out_image, out_label = augment_pair(image, label, np.random.default_rng(seed), config)
        bright = out_image > 0.0  # halfway between the dark (-0.8) and bright (0.8) levels
        intersection = np.logical_and(bright, out_label == 1).sum()
        union = np.logical_or(bright, out_label == 1).sum()
        assert intersection / union > 0.93
        moved += not np.array_equal(out_label, label)
    assert moved == 10


def test_same_seed_same_result_different_seed_different_result():
    image, label = square_pair()
    config = AugmentConfig(p_elastic=1.0)
    first = augment_pair(image, label, np.random.default_rng(42), config)
    second = augment_pair(image, label, np.random.default_rng(42), config)
    other = augment_pair(image, label, np.random.default_rng(43), config)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


def test_rotation_turns_content_counter_clockwise_on_screen():
    size, centre, offset = 65, 32, 20
    image = np.zeros((size, size), np.float32)
    label = np.zeros((size, size), np.uint8)
    image[centre, centre + offset] = 1.0  # right of the centre
    label[centre, centre + offset] = 1
    out_image, out_label = warp_pair(image, label, angle_deg=90.0)
    # Counter-clockwise by a quarter turn: from the right of the centre to above it (row 0 is at the top).
    assert np.unravel_index(np.argmax(out_image), out_image.shape) == (centre - offset, centre)
    assert list(zip(*np.nonzero(out_label))) == [(centre - offset, centre)]

    # A smooth blob at a general angle lands where the rotation formula says.
    rows, cols = np.indices((size, size))
    blob = np.exp(-((rows - centre) ** 2 + (cols - centre - offset) ** 2) / (2 * 2.0**2)).astype(np.float32)
    angle = math.radians(30.0)
    out_blob, _ = warp_pair(blob, label, angle_deg=30.0)
    expected = np.array([centre - offset * math.sin(angle), centre + offset * math.cos(angle)])
    np.testing.assert_allclose(centroid(out_blob), expected, atol=0.1)


def test_scale_above_one_enlarges_the_content_about_the_centre():
    image = np.zeros((64, 64), np.float32)
    label = np.zeros((64, 64), np.uint8)
    image[24:40, 24:40] = 1.0
    label[24:40, 24:40] = 1
    out_image, out_label = warp_pair(image, label, scale=1.5)
    assert out_label.sum() == pytest.approx(16 * 16 * 1.5**2, rel=0.1)
    np.testing.assert_allclose(centroid(out_label.astype(float)), [31.5, 31.5], atol=0.01)
    assert out_image.sum() == pytest.approx(16 * 16 * 1.5**2, rel=0.05)


def test_pixels_from_outside_take_the_fill_value():
    image = np.ones((40, 40), np.float32)
    image[0, 0] = -3.0  # the minimum: the default background
    label = np.ones((40, 40), np.uint8)
    out_image, out_label = warp_pair(image, label, angle_deg=45.0)
    assert out_image[0, 39] == pytest.approx(-3.0) and out_label[0, 39] == 0
    assert out_image[20, 20] == pytest.approx(1.0) and out_label[20, 20] == 1
    out_image, _ = warp_pair(image, label, angle_deg=45.0, fill_value=7.0)
    assert out_image[0, 39] == pytest.approx(7.0)


def test_channel_stack_gets_the_same_transform_on_every_channel():
    image, label = square_pair()
    stack = np.stack([image, 2.0 * image, image[::-1].copy()])  # e.g. neighbouring slices for 2.5D
    config = AugmentConfig(p_elastic=1.0)
    out_stack, out_label = augment_pair(stack, label, np.random.default_rng(5), config)
    assert out_stack.shape == stack.shape and out_stack.dtype == np.float32
    for channel in range(3):
        single, single_label = augment_pair(stack[channel], label, np.random.default_rng(5), config)
        np.testing.assert_allclose(out_stack[channel], single, atol=1e-5)
        np.testing.assert_array_equal(out_label, single_label)


def test_multi_valued_label_keeps_its_values():
    image, label = square_pair()
    label = label * 2
    label[5:15, 5:15] = 3
    out_image, out_label = warp_pair(image, label, angle_deg=20.0, scale=1.1)
    assert set(np.unique(out_label)) == {0, 2, 3}
    assert out_label.dtype == label.dtype


def test_smooth_displacement_field_has_the_requested_size_and_is_smooth():
    field = smooth_displacement_field((128, 96), np.random.default_rng(1), rms_px=2.5, sigma_px=16.0)
    assert field.shape == (2, 128, 96)
    np.testing.assert_allclose(np.sqrt(np.mean(field**2, axis=(1, 2))), [2.5, 2.5], rtol=1e-6)
    # Neighbouring pixels move almost together: the field is smooth, not noise (white noise of RMS 2.5 would
    # differ by about 3.5 pixels between neighbours), and it never folds the patch over itself.
    steps = np.concatenate([np.diff(field, axis=1).ravel(), np.diff(field, axis=2).ravel()])
    assert np.sqrt(np.mean(steps**2)) < 0.2
    assert np.abs(steps).max() < 1.0


@pytest.mark.parametrize(
    "settings",
    [
        {"scale": (1.1, 0.9)},
        {"scale": (0.0, 1.0)},
        {"rotation_deg": -1.0},
        {"p_elastic": 1.5},
        {"probability": -0.1},
        {"elastic_sigma_px": 0.0},
    ],
)
def test_inconsistent_settings_are_config_errors(settings):
    with pytest.raises(ConfigError):
        AugmentConfig(**settings)


def test_real_tumour_patches_keep_their_label_on_the_tumour():
    h5py = pytest.importorskip("h5py")
    path = DATA / "ct_tumor" / "msd06_2mm_val_patches.h5"
    if not path.exists():
        pytest.skip(f"real test data not found at {path}")
    with h5py.File(path, "r") as patches:
        images = patches["images"][:40, 0].astype(np.float32)  # (N, 48, 48) in [0, 1]
        labels = patches["labels"][:40, 0].astype(np.uint8)
    rng = np.random.default_rng(7)
    config = AugmentConfig(p_elastic=1.0)
    aligned_change, misaligned_change = [], []
    for image, label in zip(images, labels):
        if label.sum() < 20:
            continue
        out_image, out_label = augment_pair(image, label, rng, config)
        if out_label.sum() < 10:
            continue
        # The label must still mark the tumour's intensities after the warp; a label 3 pixels off would not.
        tumour_mean = image[label == 1].mean()
        aligned_change.append(abs(out_image[out_label == 1].mean() - tumour_mean))
        misaligned_change.append(abs(out_image[np.roll(out_label, 3, axis=1) == 1].mean() - tumour_mean))
    assert len(aligned_change) >= 20
    assert np.mean(aligned_change) < 0.03
    assert np.mean(misaligned_change) > 3 * np.mean(aligned_change)
