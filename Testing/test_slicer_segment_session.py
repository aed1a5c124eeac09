"""CMEDL Segment's session on real MRML classes of slicer-core: automatic mode without the panel, runs queued,
scene closes that cancel and drop, Cancel that never waits, and a model list that survives a bad catalogue.

The panel's Qt half runs only inside Slicer (its self-test); everything it delegates to runs here: the same
SegmentSession the module's logic builds, with a fake timer (ticks are called by the test) and deferred calls
the test runs when it wants.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cmedl.errors import ConfigError, InputError
from cmedl.phantom import make_phantom

pytestmark = pytest.mark.slicer

LEVEL_HU = -200.5
PREFIX = "CMEDL/Segment/"


class Store:
    def __init__(self, **values: str) -> None:
        self.values = {PREFIX + key: value for key, value in values.items()}

    def value(self, key: str, default=None):
        return self.values.get(key, default)

    def setValue(self, key: str, value) -> None:  # noqa: N802 -- Qt's name
        self.values[key] = str(value)


class Timer:
    """A QTimer stand-in: the test ticks the runner itself."""

    def __init__(self) -> None:
        self.active = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:  # noqa: N802 -- Qt's name
        return self.active


class FakeTask:
    """A segmentation child that ends when the test says so; finishing writes an empty segment."""

    def __init__(self, scene, volume, segmentation) -> None:
        self.scene, self.volume_node, self.segmentation = scene, volume, segmentation
        self.running = True
        self.killed = self.discarded = False
        self.job = SimpleNamespace(stderr_tail=lambda: "")

    def poll(self) -> list[dict]:
        return []

    def fraction(self) -> float | None:
        return 0.5

    def stage_text(self) -> str:
        return "segment 3/6 slices"

    def kill_now(self) -> None:
        self.killed = True
        self.running = False

    def discard(self) -> None:
        self.discarded = True

    def finish(self):
        from CMEDLSegmentLib.segment_logic import SegmentationOutcome

        node = self.segmentation or self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
        segment_id = node.GetSegmentation().AddEmptySegment("", "Lung tumour")
        return SegmentationOutcome(node, segment_id, 1.5, 2.0, "cpu", self.segmentation is None)


class FakeLogic:
    def __init__(self, scene) -> None:
        self.scene = scene
        self.tasks: list[FakeTask] = []

    def start(self, volume, settings, segmentation=None, segment_id=None) -> FakeTask:
        self.tasks.append(FakeTask(self.scene, volume, segmentation))
        self.tasks[-1].settings = settings
        return self.tasks[-1]


def add_image(scene, modality: str, name: str):
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    return add_volume_from_image(scene, make_phantom(modality, seed=5, size=64).image, name)


def automatic_session(mrml, parameters):
    """The session the module's logic builds, with automatic mode on and the demo model's card accepted."""
    from CMEDLCommon.settings import UserSettings
    from CMEDLSegmentLib.session import SegmentSession

    deferred: list = []
    settings = UserSettings(PREFIX, Store(autoSegment="true", model="demo", **{"acceptedModelCards/demo": "yes"}))
    logic = FakeLogic(mrml.scene)
    session = SegmentSession(
        mrml.scene, settings, Timer(), defer=lambda ms, callback: deferred.append(callback),
        parameters=parameters, prompts=None, logic=logic,
    )  # fmt: skip
    events: list = []
    session.runner.listeners.append(events.append)
    session.start()
    return session, logic, deferred, events


def run_deferred(deferred: list) -> list[str]:
    results = [callback() for callback in deferred]
    deferred.clear()
    return results


def test_automatic_mode_works_without_the_panel_queues_and_survives_a_scene_close(mrml, monkeypatch, tmp_path) -> None:
    """Defect 2: the observer lived in the panel, a CT loaded during a run was skipped, and after a scene close
    the parameter node was None (AttributeError)."""
    monkeypatch.setenv("CMEDL_HOME", str(tmp_path))
    node = {"parameters": SimpleNamespace(inputVolume=None, outputSegmentation=None, lungThreshold=-250.0,
                                          roiMargin=20.0, probabilityThreshold=0.4, batchSize=2)}  # fmt: skip
    session, logic, deferred, events = automatic_session(mrml, lambda: node["parameters"])

    first = add_image(mrml.scene, "ct", "Chest CT")
    assert not logic.tasks, "a new volume is looked at once loading is over, not while it is added"
    assert run_deferred(deferred) == ["Chest CT: automatic segmentation started"]
    assert logic.tasks[0].volume_node is first and logic.tasks[0].settings.lung_threshold_hu == -250.0
    assert node["parameters"].inputVolume is first, "the panel shows what automatic mode segments"
    assert session.runner.timer.active

    add_image(mrml.scene, "mr", "T2w")
    second = add_image(mrml.scene, "ct", "Follow-up CT")
    results = run_deferred(deferred)
    assert results[0].startswith("T2w is not segmented automatically")
    assert results[1] == "Follow-up CT: automatic segmentation queued"
    assert [request.volume_id for request in session.runner.queue] == [second.GetID()]

    logic.tasks[0].running = False
    session.runner.tick()
    assert [event.kind for event in events][-2:] == ["finished", "started"]
    assert "Lung tumour: 1.5 mL" in next(event.message for event in events if event.kind == "finished")
    assert logic.tasks[1].volume_node is second and node["parameters"].inputVolume is second

    # The usual next step: close the scene, load the next patient. The run of the closed scene is dropped,
    # a look scheduled before the close is void, and there is no parameter node until something makes one.
    add_image(mrml.scene, "ct", "Loading while closing")
    mrml.scene.Clear(0)
    node["parameters"] = None
    assert logic.tasks[1].killed
    session.runner.tick()
    assert logic.tasks[1].discarded and not session.runner.busy
    assert events[-1].kind == "cancelled" and "scene was closed" in events[-1].message
    assert run_deferred(deferred) == ["the scene was closed since the volume was added"]

    third = add_image(mrml.scene, "ct", "Next patient")
    assert run_deferred(deferred) == ["Next patient: automatic segmentation started"]
    assert logic.tasks[2].volume_node is third and logic.tasks[2].settings.lung_threshold_hu == -300.0


def test_automatic_mode_asks_nothing_and_says_why_it_did_not_run(mrml, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CMEDL_HOME", str(tmp_path))
    session, logic, deferred, events = automatic_session(mrml, lambda: None)
    session.settings.set_text("acceptedModelCards/demo", "")
    add_image(mrml.scene, "ct", "CT")
    (result,) = run_deferred(deferred)
    assert "model card of 'demo' was not accepted yet; press Apply once" in result and not logic.tasks
    session.settings.set_flag("autoSegment", False)
    add_image(mrml.scene, "ct", "CT 2")
    assert deferred == [] and not logic.tasks


def test_a_run_from_the_panel_is_refused_while_another_runs(mrml, monkeypatch, tmp_path: Path) -> None:
    from CMEDLSegmentLib.runner import RunRequest
    from CMEDLSegmentLib.segment_logic import SegmentationSettings

    monkeypatch.setenv("CMEDL_HOME", str(tmp_path))
    session, logic, deferred, events = automatic_session(mrml, lambda: None)
    volume = add_image(mrml.scene, "ct", "CT")
    run_deferred(deferred)
    with pytest.raises(InputError, match="cancel it first"):
        session.runner.submit(RunRequest(volume.GetID(), SegmentationSettings(Path("m.safetensors"))))


# -- real engine children --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory) -> Path:
    from cmedl.reference_models import write_threshold_model

    folder = tmp_path_factory.mktemp("models")
    spacing = make_phantom("ct", seed=5, size=128).image.GetSpacing()[:2]
    return write_threshold_model(folder / "threshold.safetensors", LEVEL_HU, spacing_mm=spacing)


def real_runner(mrml, work: Path):
    from CMEDLSegmentLib.runner import SegmentationRunner
    from CMEDLSegmentLib.segment_logic import TumourSegmentationLogic

    runner = SegmentationRunner(mrml.scene, TumourSegmentationLogic(mrml.scene, work_root=work), Timer())
    events: list = []
    runner.listeners.append(events.append)
    runner.attach()
    return runner, events


def tick_until_idle(runner, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while runner.busy and time.monotonic() < deadline:
        runner.tick()
        time.sleep(0.05)
    assert not runner.busy


def test_closing_the_scene_cancels_a_running_segmentation_and_drops_a_finished_one(
    mrml, threshold_model: Path, tmp_path: Path
) -> None:
    """Defect 3: a run still going at scene close landed in the next scene, on an unrelated node."""
    from CMEDLSegmentLib.runner import SCENE_CLOSED_TEXT, RunRequest
    from CMEDLSegmentLib.segment_logic import SegmentationSettings
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    work = tmp_path / "work"
    work.mkdir()
    runner, events = real_runner(mrml, work)
    image = make_phantom("ct", seed=5, size=128).image
    settings = SegmentationSettings(threshold_model, device="cpu")

    volume = add_volume_from_image(mrml.scene, image, "CT")
    runner.submit(RunRequest(volume.GetID(), settings))
    task = runner.task
    assert task.running
    mrml.scene.Clear(0)
    tick_until_idle(runner)
    assert not task.job.running and events[-1].kind == "cancelled" and events[-1].message == SCENE_CLOSED_TEXT

    # A child that has already ended, but whose result was not imported yet, is dropped the same way.
    volume = add_volume_from_image(mrml.scene, image, "CT again")
    runner.submit(RunRequest(volume.GetID(), settings))
    task = runner.task
    task.wait(timeout=120)
    assert task.job.returncode == 0
    mrml.scene.Clear(0)
    tick_until_idle(runner)
    assert events[-1].kind == "cancelled" and "finished" not in [event.kind for event in events]
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert list(work.iterdir()) == [], "the hand-over folders are removed"


def test_cancel_returns_at_once_even_when_the_child_ignores_sigterm(mrml, tmp_path: Path) -> None:
    """Defect 9: Cancel slept in the GUI thread for the whole grace period (up to 5 s)."""
    from cmedl.jobs import Job
    from CMEDLSegmentLib.runner import RunRequest, SegmentationRunner
    from CMEDLSegmentLib.segment_logic import SegmentationSettings, SegmentationTask
    from CMEDLSegmentLib.segmentation_nodes import SegmentStyle

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
               "time.sleep(120)"  # fmt: skip

    class Logic:
        def start(self, volume, settings, segmentation=None, segment_id=None):
            job = Job.start_command([sys.executable, "-c", stubborn])
            return SegmentationTask(mrml.scene, volume, SegmentStyle(), job, tmp_path, tmp_path / "out.nrrd")

    runner = SegmentationRunner(mrml.scene, Logic(), Timer())
    events: list = []
    runner.listeners.append(events.append)
    volume = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    runner.submit(RunRequest(volume.GetID(), SegmentationSettings(Path("m.safetensors"))))
    deadline = time.monotonic() + 30
    while not any(event.get("message") == "ready" for event in runner.task.job.poll()) and time.monotonic() < deadline:
        time.sleep(0.05)
    task = runner.task
    started = time.monotonic()
    assert runner.cancel()
    assert time.monotonic() - started < 1.5, "cancel does not wait out a grace period in the GUI thread"
    tick_until_idle(runner, seconds=10)
    assert not task.job.running and events[-1].kind == "cancelled"


# -- the model list (defects 4 and 6) --------------------------------------------------------------------


def choices(store: Store | None = None):
    from CMEDLCommon.settings import UserSettings
    from CMEDLSegmentLib.models import ModelChoices

    return ModelChoices(UserSettings(PREFIX, store or Store()))


@pytest.mark.parametrize("where", ["named", "home", "missing"])
def test_a_malformed_catalogue_still_lists_the_built_in_model_and_says_why(monkeypatch, tmp_path: Path, where) -> None:
    """Defect 6: a malformed catalogue file raised in setup() and left the panel half-built."""
    from cmedl.catalogue import list_models

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CMEDL_HOME", str(home))
    bad = home / "catalogue.json" if where == "home" else tmp_path / "site-catalogue.json"
    if where != "missing":
        bad.write_text('{"format": "cmedl-catalogue", "version": 1, "models": [{"name": 3}]', encoding="utf-8")
    if where != "home":
        monkeypatch.setenv("CMEDL_CATALOGUE", str(bad))
    with pytest.raises(ConfigError):
        list_models()
    models = choices()
    assert "demo" in [entry.name for entry in models.refresh()]
    assert len(models.problems) == 1 and bad.name in models.problems[0]
    assert models.problem_text().startswith("Model catalogue problem: ")
    assert bad.name in models.card_html(models.find("demo")) and "Catalogue problems" in models.card_html(None)


def test_a_model_registered_after_the_panel_was_built_is_listed_on_refresh(
    monkeypatch, tmp_path: Path, threshold_model: Path
) -> None:
    """Defect 4: models registered in CMEDL Train appeared only after a restart; enter() refreshes now."""
    from cmedl.catalogue import add_model

    monkeypatch.setenv("CMEDL_HOME", str(tmp_path))
    models = choices()
    assert models.find("site-model") is None and models.refresh() and models.find("site-model") is None
    add_model(threshold_model, name="site-model")
    models.refresh()
    assert models.find("site-model") is not None and models.index_of("site-model") > 0
    assert models.index_of("gone") == 0, "an unknown name selects the built-in model"


class Prompts:
    """Scripted answers; every question is recorded."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.asked: list[str] = []
        self.errors: list[str] = []

    def confirm(self, text: str, details: str = "") -> bool:
        self.asked.append(text)
        return self.answer

    def error(self, text: str, details: str = "") -> None:
        self.errors.append(text)


def test_getting_a_model_ready_installs_asks_for_the_card_once_and_reports_failures(monkeypatch, tmp_path) -> None:
    from CMEDLCommon.dependencies import DependencyError
    from CMEDLSegmentLib.models import ModelActions

    monkeypatch.setenv("CMEDL_HOME", str(tmp_path))
    store = Store()
    prompts = Prompts()
    actions = ModelActions(choices(store), prompts, ensure=lambda requester: True)
    actions.models.refresh()
    entry = actions.prepare("demo")
    assert entry is not None and entry.name == "demo" and len(prompts.asked) == 1
    assert "model card" in prompts.asked[0] and store.values[PREFIX + "acceptedModelCards/demo"] == "yes"
    assert actions.prepare("demo") is not None and len(prompts.asked) == 1, "the card is shown once"

    def failing(requester: str) -> bool:
        raise DependencyError("installing scipy failed: pip ended with exit code 1")

    broken = ModelActions(choices(store), prompts, ensure=failing)
    assert broken.prepare("demo") is None
    assert prompts.errors == ["The Python packages CMEDL needs are not installed: installing scipy failed: pip "
                              "ended with exit code 1"]  # fmt: skip


def test_the_panel_request_and_the_apply_button(mrml) -> None:
    from CMEDLSegmentLib.runner import CANCELLING, IDLE, RUNNING, RunRequest, apply_button, offers_cpu_retry

    volume = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    output = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    parameters = SimpleNamespace(inputVolume=volume, outputSegmentation=output, lungThreshold=-310.0,
                                 roiMargin=12.0, probabilityThreshold=0.6, batchSize=8)  # fmt: skip
    request = RunRequest.from_panel(parameters, Path("m.safetensors"), "cuda", "")
    assert (request.volume_id, request.segmentation_id, request.segment_id) == (volume.GetID(), output.GetID(), None)
    assert request.settings.batch_size == 8 and request.settings.device == "cuda" and not request.automatic
    assert apply_button(IDLE, True)[:2] == ("Apply", True) and apply_button(IDLE, False)[1] is False
    assert apply_button(RUNNING, False)[:2] == ("Cancel", True)
    assert apply_button(CANCELLING, True)[:2] == ("Cancelling...", False)
    assert offers_cpu_retry("CUDA out of memory", "auto") and not offers_cpu_retry("CUDA out of memory", "cpu")
    assert not offers_cpu_retry("no lungs found", "cuda")


def test_segment_choices_list_the_output_segments(mrml) -> None:
    from CMEDLSegmentLib.segmentation_nodes import segment_choices

    assert segment_choices(None) == [("", "Segment named after the model's label")]
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    heart = segmentation.GetSegmentation().AddEmptySegment("", "Heart")
    assert segment_choices(segmentation)[1:] == [(heart, "Heart")]
