"""Validation scores a fixed sample of each case's slices, says so while it runs, and runs on the fast path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from cmedl.errors import ConfigError
from cmedl.metrics import dice
from cmedl.modelfile import load_model
from cmedl.patches import predict_slices
from cmedl.progress import CallbackProgress
from cmedl.training.config import TrainConfig
from cmedl.training.data import CasePaths, find_cases, prepare_volume, validation_sample, weighted_dice
from cmedl.training.runfolder import RunFolder
from cmedl.training.trainer import Trainer, validation_predictor
from cmedl.volumes import normalise_hu

SPACING = TINY["spacing_mm"]
SMALL_SEGMENTORS = {
    "unet": {"base_channels": 4},
    "densefcn": {"growth_rate": 3, "stem_channels": 8, "layers_per_block": 2, "bottleneck_layers": 2},
    "mrrn": {"base_channels": 4},
}


def prepared(case: CasePaths, spacing=SPACING):
    return prepare_volume(case, spacing, lambda values: normalise_hu(values, (-1000.0, 500.0)))


def validation_volumes(run: Path):
    """The run's validation cases, prepared as the run prepares them."""
    config = json.loads((run / "config.json").read_text())
    paths = json.loads((run / "data.json").read_text())["ct_validation"]
    cases = [case for case in find_cases(config["ct"]) if str(case.image) in paths]
    return [prepared(case, tuple(config["spacing_mm"])) for case in cases]


def test_the_sample_is_fixed_spread_over_the_range_and_holds_tumour_slices(small_phantoms: Path) -> None:
    volumes = [prepared(case) for case in find_cases(small_phantoms / "ct")]
    for volume in volumes:
        first = int(min(volume.context_slices.min(), volume.tumour_slices.min()))
        last = int(max(volume.context_slices.max(), volume.tumour_slices.max()))
        sample = validation_sample(volume, 8, seed=3)
        again = validation_sample(volume, 8, seed=3)
        assert np.array_equal(sample.slices, again.slices) and np.array_equal(sample.weights, again.weights)
        assert sample.range_slices == last - first + 1 > 8
        assert len(sample.slices) == 8 and len(set(sample.slices.tolist())) == 8
        assert np.all(np.diff(sample.slices) > 0)
        assert first <= sample.slices.min() and sample.slices.max() <= last
        in_tumour = np.isin(sample.slices, volume.tumour_slices)
        # Half tumour slices (or all of them), half spread over the rest of the range.
        assert in_tumour.sum() == min(4, len(volume.tumour_slices))
        outside = sample.slices[~in_tumour]
        assert outside.min() < volume.tumour_slices.min() or outside.max() > volume.tumour_slices.max()
        # Each slice stands for its share of its stratum: the weights add up to the whole range.
        assert sample.weights.sum() == pytest.approx(sample.range_slices)
    # Another run seed draws another sample (from the same strata).
    assert any(
        not np.array_equal(validation_sample(v, 8, seed=3).slices, validation_sample(v, 8, seed=4).slices)
        for v in volumes
    )


def test_zero_or_a_count_beyond_the_range_scores_every_slice(small_phantoms: Path) -> None:
    volume = prepared(find_cases(small_phantoms / "ct")[0])
    every = validation_sample(volume, 0, seed=0)
    first, last = int(every.slices[0]), int(every.slices[-1])
    assert np.array_equal(every.slices, np.arange(first, last + 1)) and np.all(every.weights == 1.0)
    assert np.array_equal(validation_sample(volume, every.range_slices, seed=5).slices, every.slices)
    # With weights 1 the score is the plain volume Dice of those slices.
    truth = volume.label[every.slices] > 0
    predicted = np.roll(truth, 2, axis=2)
    assert weighted_dice(predicted, truth, every.weights) == pytest.approx(dice(predicted, truth))
    assert np.isnan(weighted_dice(np.zeros_like(truth), np.zeros_like(truth), every.weights))


def test_a_weighted_slice_counts_as_the_slices_it_stands_for() -> None:
    truth = np.zeros((2, 4, 4), dtype=bool)
    truth[0, :2, :2] = True  # 4 tumour voxels on slice 0
    predicted = truth.copy()
    predicted[1, 3, 3] = True  # 1 false positive on slice 1
    assert weighted_dice(predicted, truth, np.array([1.0, 1.0])) == pytest.approx(8 / 9)
    # Slice 1 standing for 4 slices: 4 false positives.
    assert weighted_dice(predicted, truth, np.array([1.0, 4.0])) == pytest.approx(8 / 12)


@pytest.mark.parametrize("value", [-1, -24])
def test_a_negative_count_is_refused(value: int) -> None:
    with pytest.raises(ConfigError, match="validation_slices_per_case must be 0 or more"):
        TrainConfig(ct="ct", out="run", validation_slices_per_case=value).validate()
    with pytest.raises(ConfigError, match="validation_slices_per_case"):
        TrainConfig(ct="ct", out="run").with_overrides([f"validation_slices_per_case={value}"]).validate()
    assert TrainConfig(ct="ct", out="run", validation_slices_per_case=0).validate().validation_slices_per_case == 0


def test_every_epoch_and_a_resume_score_one_sample_and_the_status_says_validating(
    small_phantoms: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    events: list[dict] = []
    stages: list[tuple[str, str, str]] = []

    def record(event: dict) -> None:
        events.append(event)
        if event.get("event") == "progress" and event["stage"] in ("validation", "iteration"):
            status = RunFolder(out).read_status()
            stages.append((event["stage"], status.get("stage"), status.get("message", "")))

    config = TrainConfig.from_dict({**TINY, "ct": str(small_phantoms / "ct"), "out": str(out), "epochs": 2})
    count = config.validation_slices_per_case  # the default
    assert Trainer(config, progress=CallbackProgress(record)).fit()["state"] == "finished"
    resumed = Trainer.resume_run(out, progress=CallbackProgress(record), epochs=3)
    assert resumed.config.validation_slices_per_case == count
    assert resumed.fit()["state"] == "finished"

    samples = [validation_sample(v, count, config.seed) for v in validation_volumes(out)]
    expected = sum(len(sample.slices) for sample in samples)
    assert 0 < expected < sum(sample.range_slices for sample in samples)  # a sample, not every slice
    validation = [event for event in events if event.get("stage") == "validation"]
    totals = {event["message"]: event["total"] for event in validation}
    assert totals == {"epoch 1": expected, "epoch 2": expected, "epoch 3": expected}
    assert [event["done"] for event in validation if event["message"] == "epoch 3"] == list(range(expected + 1))
    # status.json tells what the run does: validating (with its slice count) between epochs, else training.
    seen = {(stage, written) for stage, written, _ in stages}
    assert seen == {("validation", "validation"), ("iteration", "training")}
    assert any(message == f"validating epoch 3/3 ({expected} slices)" for _, _, message in stages)
    run = RunFolder(out)
    assert "stage" not in run.read_status()
    records = run.read_metrics()
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert all(0.0 < record["validation_seconds"] <= record["seconds"] for record in records)
    told = [line.split(" ", 1)[1] for line in run.log_path.read_text().splitlines() if " validation: " in line]
    assert len(told) == 2 and told[0] == told[1] and f"{expected} of " in told[0]

    # A run folder from before sampling existed (no such key) goes on scoring every slice when resumed.
    saved = json.loads(run.config_path.read_text())
    del saved["validation_slices_per_case"]
    run.config_path.write_text(json.dumps(saved))
    assert Trainer.resume_run(out, epochs=4).config.validation_slices_per_case == 0
    assert Trainer.resume_run(out, epochs=4, validation_slices_per_case=6).config.validation_slices_per_case == 6


@pytest.mark.parametrize("segmentor", sorted(SMALL_SEGMENTORS))
def test_validation_on_the_fast_path_gives_the_reference_probabilities(
    segmentor: str, small_phantoms: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = TrainConfig.from_dict(
        {**TINY, "ct": str(small_phantoms / "ct"), "out": str(out), "epochs": 1, "segmentor": segmentor,
         "segmentor_options": SMALL_SEGMENTORS[segmentor]}
    )  # fmt: skip
    assert Trainer(config).fit()["state"] == "finished"
    network = load_model(RunFolder(out).model_path).network  # the student after a few steps
    before = {key: value.clone() for key, value in network.state_dict().items()}
    volume = validation_volumes(out)[0]
    sample = validation_sample(volume, config.validation_slices_per_case, config.seed)
    slices = [(int(z), volume.image[z].astype(np.float32)) for z in sample.slices]
    options = {"num_classes": 2, "patch": config.patch_size, "overlap": config.validation_overlap, "batch_size": 8}
    reference = dict(predict_slices(network.eval(), slices, device="cpu", **options))
    # amp off: fp32 even on a CPU with native bf16, so that the comparison is to float tolerance.
    fast = dict(validation_predictor(network, torch.device("cpu"), amp="off", fast=True)(slices, **options))
    assert list(fast) == list(reference) == [z for z, _ in slices]
    for z in fast:
        np.testing.assert_allclose(fast[z], reference[z], atol=1e-4)
        # The same masks, wherever the probability is not within the tolerance of the threshold.
        clear = np.abs(reference[z][1] - 0.5) > 1e-4
        assert np.array_equal((fast[z][1] >= 0.5)[clear], (reference[z][1] >= 0.5)[clear])
    after = network.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # the student itself is not changed


def test_the_status_says_how_far_the_data_preparation_is(small_phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[tuple[int, str, str]] = []

    def record(event: dict) -> None:
        if event.get("event") == "progress" and event["stage"] == "data":
            status = RunFolder(out).read_status()
            seen.append((event["done"], status.get("stage"), status.get("message", "")))

    config = TrainConfig.from_dict({**TINY, "ct": str(small_phantoms / "ct"), "out": str(out), "epochs": 1})
    assert Trainer(config, progress=CallbackProgress(record)).fit()["state"] == "finished"
    assert seen[0] == (0, "data", "preparing data: case 1 of 4")
    assert all(stage == "data" and message.startswith("preparing data: case ") for _, stage, message in seen)
