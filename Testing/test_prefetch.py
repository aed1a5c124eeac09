"""Tiles prepared ahead in a thread: same answers, same order, errors and cancels reach the caller, no thread left.

The thread serves GPUs (where the CPU would otherwise wait on the network), but nothing in it needs one: these
tests run it on the CPU, as ``CMEDL_PREFETCH`` lets any run do.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cmedl.errors import CancelledError
from cmedl.inference import CPU_TILES_PER_CALL, GPU_TILES_PER_CALL_CAP, PREFETCH_ENV, InferenceEngine, prefetch_depth
from cmedl.modelfile import LoadedModel, ModelCard
from cmedl.patches import predict_slices, tile_batches
from cmedl.phantom import make_phantom
from cmedl.prefetch import prefetched
from cmedl.progress import CallbackProgress
from cmedl.segment import Segmenter, SegmentOptions


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "cmedl-prefetch"]


def counting(n: int, produced: list[int], fail_at: int | None = None):
    for index in range(n):
        if index == fail_at:
            raise KeyError(f"item {index} is missing")
        produced.append(index)
        yield index


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_every_item_arrives_in_order(depth: int) -> None:
    produced: list[int] = []
    assert list(prefetched(counting(50, produced), depth=depth)) == list(range(50))
    assert not prefetch_threads()


def test_the_items_are_produced_in_another_thread_and_at_most_depth_ahead() -> None:
    producers: set[int] = set()
    produced: list[int] = []

    def items():
        for index in range(20):
            producers.add(threading.get_ident())
            produced.append(index)
            yield index

    for index in prefetched(items(), depth=3):
        time.sleep(0.01)  # a slow consumer: the producer must wait for room, not run away
        # the one consumed, up to 3 waiting in the queue, one in the producer's hands
        assert len(produced) <= index + 1 + 3 + 1
    assert producers and threading.get_ident() not in producers


def test_a_producers_error_reaches_the_consumer_after_the_items_before_it() -> None:
    received: list[int] = []
    with pytest.raises(KeyError, match="item 7 is missing"):
        for item in prefetched(counting(20, [], fail_at=7), depth=2):
            received.append(item)
    assert received == list(range(7))
    assert not prefetch_threads()


def test_a_consumer_that_stops_early_stops_the_producer() -> None:
    produced: list[int] = []
    stream = prefetched(counting(10_000, produced), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert not prefetch_threads()
    settled = len(produced)
    time.sleep(0.2)
    assert len(produced) == settled < 10


def test_an_error_in_the_consumer_stops_the_producer() -> None:
    produced: list[int] = []
    with pytest.raises(ZeroDivisionError):
        for item in prefetched(counting(10_000, produced), depth=2):
            if item == 4:
                raise ZeroDivisionError
    assert not prefetch_threads()
    assert len(produced) < 10


def test_a_negative_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        list(prefetched(iter([1]), depth=-1))


def test_the_depth_comes_from_the_device_unless_the_environment_sets_it() -> None:
    assert prefetch_depth(torch.device("cpu"), {}) == 0
    assert prefetch_depth(torch.device("cuda"), {}) == 2
    assert prefetch_depth(torch.device("cpu"), {PREFETCH_ENV: "3"}) == 3
    assert prefetch_depth(torch.device("cuda"), {PREFETCH_ENV: "0"}) == 0
    for nonsense in ("-1", "two", "99", ""):
        assert prefetch_depth(torch.device("cpu"), {PREFETCH_ENV: nonsense}) == 0


class Smooth(torch.nn.Module):
    """A small convolutional network with fixed weights: two classes, answers that depend on every pixel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(1, 2, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def random_slices(count: int, size: tuple[int, int], seed: int = 0) -> list[tuple[int, np.ndarray]]:
    generator = np.random.default_rng(seed)
    slices = []
    for index in range(count):
        image = generator.uniform(-1.0, 1.0, size).astype(np.float32)
        if index % 3 == 0:
            image[:, : size[1] // 2] = -1.0  # a half of air: tiles there are skipped
        slices.append((index, image))
    return slices


@pytest.mark.parametrize("size", [(100, 150), (40, 30)])
def test_prefetched_tiles_give_the_same_probabilities(size: tuple[int, int]) -> None:
    slices = random_slices(7, size)
    args = {"num_classes": 2, "patch": 48, "overlap": 0.25, "batch_size": 5, "skip_below": -0.95}
    plain = list(predict_slices(Smooth().eval(), iter(slices), **args))
    ahead = list(predict_slices(Smooth().eval(), iter(slices), **args, prefetch=2))
    assert [key for key, _ in ahead] == [key for key, _ in plain] == list(range(7))
    for (_, expected), (_, got) in zip(plain, ahead):
        assert got.shape == (2, *size)
        np.testing.assert_array_equal(got, expected)


def test_tile_batches_cut_every_tile_once_and_mark_the_air() -> None:
    slices = random_slices(4, (100, 150))
    batches = list(tile_batches(iter(slices), patch=48, overlap=0.25, batch_size=5, skip_below=-0.95))
    entries = [entry for batch in batches for entry in batch.entries]
    per_slice = len(entries) // 4
    assert len(entries) == 4 * per_slice and all(len(batch.entries) <= 5 for batch in batches)
    assert [key for key, _, _ in entries] == sorted(key for key, _, _ in entries)
    for batch in batches:
        run = sum(1 for _, _, run in batch.entries if run)
        assert (batch.inputs is None and run == 0) or tuple(batch.inputs.shape) == (run, 1, 48, 48)
    skipped = [(key, corner) for key, corner, run in entries if not run]
    assert skipped and all(key % 3 == 0 and corner[1] + 48 <= 75 for key, corner in skipped)


def test_the_engine_chooses_tiles_per_call_from_the_device() -> None:
    engine = InferenceEngine(Smooth(), torch.device("cpu"), threads=1)
    assert engine.tiles_per_call(None, 128 * 128) == CPU_TILES_PER_CALL
    assert engine.tiles_per_call(7, 128 * 128) == 7
    # On a GPU the free memory decides (the pixel limit is measured there; here it is given).
    engine.device = torch.device("cuda")
    engine._pixel_limit = 10 * 128 * 128
    assert engine.tiles_per_call(None, 128 * 128) == 10
    engine._pixel_limit = 10_000 * 128 * 128
    assert engine.tiles_per_call(None, 128 * 128) == GPU_TILES_PER_CALL_CAP
    engine._pixel_limit = 128 * 128
    assert engine.tiles_per_call(None, 128 * 128) == CPU_TILES_PER_CALL
    assert engine.tiles_per_call(2, 128 * 128) == 2


HU_WINDOW = (-1000.0, 500.0)


class HalfThreshold(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = (x - 0.2) * 50.0
        return torch.cat([-margin, margin], dim=1)


def threshold_model() -> LoadedModel:
    card = ModelCard(name="t", architecture="test", hu_window=HU_WINDOW, spacing_mm=(2.0, 2.0), patch_size=64)
    return LoadedModel(network=HalfThreshold(), card=card, path=Path("t"), sha256="")


@pytest.fixture(scope="module")
def phantom() -> sitk.Image:
    return make_phantom("ct", seed=11, size=128).image


def test_a_whole_segmentation_with_prefetch_equals_one_without(phantom: sitk.Image, monkeypatch) -> None:
    monkeypatch.setenv(PREFETCH_ENV, "0")
    plain = Segmenter(threshold_model(), SegmentOptions(device="cpu", tta=True)).segment(phantom)
    monkeypatch.setenv(PREFETCH_ENV, "2")
    ahead = Segmenter(threshold_model(), SegmentOptions(device="cpu", tta=True)).segment(phantom)
    assert ahead.extra["fast_path"]["prefetch"] == 2 and plain.extra["fast_path"]["prefetch"] == 0
    for name in ("label", "probabilities", "uncertainty"):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(getattr(ahead, name)), sitk.GetArrayFromImage(getattr(plain, name)), name
        )
    assert np.count_nonzero(sitk.GetArrayFromImage(ahead.label)) > 0
    assert not prefetch_threads()


def test_a_cancelled_segmentation_with_prefetch_leaves_no_thread(phantom: sitk.Image, monkeypatch) -> None:
    monkeypatch.setenv(PREFETCH_ENV, "2")
    cancel = threading.Event()

    def listener(event: dict) -> None:
        if event["event"] == "progress" and event["stage"] == "segment" and event["done"] == 3:
            cancel.set()

    progress = CallbackProgress(listener, cancel=cancel)
    with pytest.raises(CancelledError):
        Segmenter(threshold_model(), SegmentOptions(device="cpu"), progress=progress).segment(phantom)
    assert not prefetch_threads()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_prefetched_tiles_on_the_gpu_give_the_cpus_answer() -> None:
    slices = random_slices(9, (100, 150))
    args = {"num_classes": 2, "patch": 48, "overlap": 0.25, "batch_size": 4, "skip_below": -0.95}
    expected = list(predict_slices(Smooth().eval(), iter(slices), **args))
    got = list(predict_slices(Smooth().cuda().eval(), iter(slices), **args, device="cuda", prefetch=2))
    for (_, want), (_, have) in zip(expected, got):
        np.testing.assert_allclose(have, want, atol=1e-4)
