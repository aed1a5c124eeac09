"""Training configuration parsing and the progress event protocol."""

from __future__ import annotations

import io
import json
import threading

import pytest

from cmedl.errors import CancelledError, ConfigError
from cmedl.progress import (
    SEGMENT_STAGE_SPANS,
    STAGE_LUNGS,
    STAGE_READ,
    STAGE_SEGMENT,
    STAGE_WRITE,
    CallbackProgress,
    JsonLinesProgress,
    TextProgress,
    overall_fraction,
    parse_event,
)
from cmedl.training.config import TrainConfig


def test_overrides_are_typed_like_the_defaults() -> None:
    config = TrainConfig().with_overrides(
        ["epochs=3", "spacing_mm=[1.5, 1.5]", "augment=false", "lr_segmentor=1e-3", 'segmentor_options={"a": 1}']
    )
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.spacing_mm == (1.5, 1.5)
    assert config.augment is False
    assert config.lr_segmentor == pytest.approx(1e-3)
    assert config.segmentor_options == {"a": 1}


@pytest.mark.parametrize(
    "assignment", ["epochs=two", "nonsense=1", "epochs", "spacing_mm=[1, 2, 3]", "augment=maybe", "epochs=1.5"]
)
def test_bad_overrides_are_refused_with_the_key_named(assignment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TrainConfig().with_overrides([assignment])
    assert "\n" not in str(caught.value)


def test_validate_names_the_inconsistent_value() -> None:
    base = TrainConfig(ct="ct", out="run")
    assert base.validate() is base
    with pytest.raises(ConfigError, match="method"):
        TrainConfig(ct="ct", out="run", method="magic").validate()
    with pytest.raises(ConfigError, match="MRI"):
        TrainConfig(ct="ct", out="run", method="cmedl").validate()
    with pytest.raises(ConfigError, match="patch_size"):
        TrainConfig(ct="ct", out="run", patch_size=100).validate()
    with pytest.raises(ConfigError, match="CT folder"):
        TrainConfig(out="run").validate()


def test_config_file_round_trip(tmp_path) -> None:
    config = TrainConfig(ct="a", out="b", epochs=7, spacing_mm=(0.8, 0.8))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert TrainConfig.from_file(path) == config
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_file(path)
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_file(tmp_path / "missing.json")


def test_json_lines_progress_speaks_the_protocol() -> None:
    stream = io.StringIO()
    progress = JsonLinesProgress(stream)
    progress.update("segment", 3, 10, "slices")
    progress.log("hello")
    progress.error("no lungs found", 2)
    progress.done({"output": "x"})
    events = [parse_event(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["progress", "log", "error", "done"]
    assert events[0] == {"event": "progress", "stage": "segment", "done": 3, "total": 10, "message": "slices"}
    assert events[2]["exit_code"] == 2
    assert parse_event("plain text") is None
    assert parse_event('{"event": "unknown"}') is None
    assert parse_event("{broken") is None


def test_cancel_event_stops_at_the_next_update() -> None:
    cancel = threading.Event()
    seen = []
    progress = CallbackProgress(seen.append, cancel=cancel)
    progress.update("segment", 1, 5)
    cancel.set()
    with pytest.raises(CancelledError):
        progress.update("segment", 2, 5)
    assert len(seen) == 1


def test_text_progress_draws_a_bar_and_ends_the_line() -> None:
    stream = io.StringIO()
    progress = TextProgress(stream, width=10)
    progress.update("segment", 0, 4, "slices")
    progress.update("segment", 4, 4, "slices")
    text = stream.getvalue()
    assert "[##########] 4/4 slices" in text
    assert text.endswith("\n")


def test_a_segment_runs_stages_fill_one_bar_once() -> None:
    """The stages ``cmedl segment`` reports and their shares of one bar are the engine's (CMEDL Segment kept a
    copy of both); the shares follow each other from 0 to 1 in the order the stages come."""
    spans = SEGMENT_STAGE_SPANS
    assert list(spans) == [STAGE_READ, STAGE_LUNGS, STAGE_SEGMENT, STAGE_WRITE]
    starts, ends = [start for start, _ in spans.values()], [end for _, end in spans.values()]
    assert starts == [0.0, *ends[:-1]] and ends[-1] == 1.0
    events = [{"event": "progress", "stage": stage, "done": done, "total": 4} for stage in spans for done in range(5)]
    fractions = [overall_fraction(event) for event in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert overall_fraction({"event": "progress", "stage": STAGE_SEGMENT, "done": 2, "total": 4}) == pytest.approx(0.55)
    assert overall_fraction(None) is None and overall_fraction({"event": "log", "message": "x"}) is None
    assert overall_fraction({"event": "progress", "stage": "other", "done": 1, "total": 4}) == 0.25
