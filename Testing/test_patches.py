"""Tiling, blending and cropping of 2D patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmedl.patches import (
    SliceBlender,
    blending_window,
    crop_centered,
    predict_slices,
    resize_slices,
    tile_starts,
)


@pytest.mark.parametrize("length", [1, 100, 256, 257, 300, 511, 512, 700])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiles_cover_every_pixel_and_stay_inside(length: int, overlap: float) -> None:
    patch = 256
    starts = tile_starts(length, patch, overlap)
    covered = np.zeros(max(length, patch), dtype=int)
    for start in starts:
        covered[start : start + patch] += 1
    assert covered[:length].min() >= 1
    if length > patch:
        assert starts[-1] + patch == length
        assert all(start >= 0 for start in starts)
        # neighbouring tiles overlap by at least the requested fraction
        gaps = np.diff(starts)
        assert gaps.max() <= patch * (1 - overlap) + 1


def test_tile_starts_rejects_bad_overlap() -> None:
    with pytest.raises(ValueError):
        tile_starts(300, 256, 1.0)


def test_blending_window_peaks_in_the_centre_and_never_vanishes() -> None:
    window = blending_window(64)
    assert window.shape == (64, 64)
    assert window.max() == pytest.approx(1.0)
    assert window.min() > 0
    assert window[32, 32] > window[0, 32] and window[32, 32] > window[32, 0]
    np.testing.assert_allclose(window, window.T)


def test_blender_returns_the_tile_value_where_tiles_agree() -> None:
    blender = SliceBlender(300, 410, num_classes=2, patch=128, overlap=0.25)
    constant = np.stack([np.full((128, 128), 0.25), np.full((128, 128), 0.75)]).astype(np.float32)
    results = []
    for tile in blender.tiles:
        out = blender.add(7, tile, constant)
        results.append(out)
    assert all(r is None for r in results[:-1])
    final = results[-1]
    assert final.shape == (2, 300, 410)
    np.testing.assert_allclose(final[0], 0.25, rtol=1e-5)
    np.testing.assert_allclose(final[1], 0.75, rtol=1e-5)
    assert blender.slices_in_flight == 0


def test_crop_centered_pads_outside_and_copies_inside() -> None:
    array = np.arange(100, dtype=np.float32).reshape(10, 10)
    crop = crop_centered(array, (0, 0), 4, fill=-1)
    assert crop.shape == (4, 4)
    assert (crop[:2, :] == -1).all() and (crop[:, :2] == -1).all()
    np.testing.assert_array_equal(crop[2:, 2:], array[:2, :2])
    stacked = crop_centered(np.stack([array, array + 1000]), (5, 5), 4, fill=0)
    np.testing.assert_array_equal(stacked[1] - stacked[0], 1000)


def test_resize_there_and_back_keeps_the_field_of_view() -> None:
    stack = np.zeros((1, 60, 80), dtype=np.float32)
    stack[0, 20:40, 30:50] = 1.0
    down = resize_slices(stack, (30, 40))
    back = resize_slices(down, (60, 80))
    # the square's centre of mass stays where it was (no half-pixel shift)
    rows, cols = np.nonzero(back[0] > 0.5)
    assert rows.mean() == pytest.approx(29.5, abs=0.3)
    assert cols.mean() == pytest.approx(39.5, abs=0.3)
    labels = (stack > 0).astype(np.uint8)
    assert resize_slices(labels, (120, 160), mode="nearest").dtype == np.uint8


class _Threshold(torch.nn.Module):
    """Logits that put class 1 where the input is above zero: a network with a known answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x * 10, x * 10], dim=1)


def test_predict_slices_reproduces_a_pointwise_network_on_any_slice_size() -> None:
    rng = np.random.default_rng(0)
    slices = [(index, rng.normal(size=(90, 150)).astype(np.float32)) for index in range(3)]
    outputs = dict(predict_slices(_Threshold(), iter(slices), num_classes=2, patch=64, overlap=0.5, batch_size=5))
    assert sorted(outputs) == [0, 1, 2]
    for index, image in slices:
        probabilities = outputs[index]
        assert probabilities.shape == (2, 90, 150)
        np.testing.assert_array_equal(probabilities[1] >= 0.5, image >= 0)
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, rtol=1e-5)


def test_predict_slices_pads_slices_smaller_than_a_patch() -> None:
    image = np.linspace(-1, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    [(key, probabilities)] = list(predict_slices(_Threshold(), [("only", image)], num_classes=2, patch=64))
    assert key == "only" and probabilities.shape == (2, 40, 30)
    np.testing.assert_array_equal(probabilities[1] >= 0.5, image >= 0)
