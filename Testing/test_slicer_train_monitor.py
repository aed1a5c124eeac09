"""CMEDL Train's run monitor, button flows and curves on real MRML classes of slicer-core: the timer that stops
with the module, a scene close that leaves the next scene alone, a force stop that never waits, runs listed
without psutil, and chart lookups that do not leak the scene's collections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PROJECT_ROOT

from cmedl.processes import process_create_time

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


class Timer:
    def __init__(self) -> None:
        self.active = False
        self.starts = 0

    def start(self) -> None:
        self.active = True
        self.starts += 1

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:  # noqa: N802 -- Qt's name
        return self.active


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def run_with_epochs(folder: Path, epochs: int = 2) -> Path:
    write_json(folder / "status.json", {"state": "finished", "epoch": epochs, "epochs": epochs})
    lines = [json.dumps({"epoch": e, "loss_seg_ct": 1.0 / e, "validation_dice": 0.3 * e}) for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def alive_snapshot(path: str):
    from cmedl.training.runs import RunSnapshot

    return RunSnapshot(path=Path(path), state="running", alive=True)


def test_the_timer_stops_with_the_module_and_a_late_tick_does_not_restart_it() -> None:
    """Defect 7: the 2 s timer kept polling after the module was left."""
    from CMEDLTrainLib.monitor import RunMonitor

    timer = Timer()
    monitor = RunMonitor(scene=None, timer=timer, read=alive_snapshot)
    monitor.select("/runs/a", by_user=True)
    assert monitor.look().snapshot.alive and timer.active
    monitor.suspend()  # exit() and cleanup()
    assert not timer.active
    monitor.look()  # a tick that was already queued
    assert not timer.active and timer.starts == 1
    monitor.resume()  # enter()
    monitor.look()
    assert timer.active
    monitor.select("", by_user=True)
    assert monitor.look().snapshot is None and not timer.active, "nothing selected, nothing to follow"


@pytest.mark.slicer
def test_after_a_scene_close_no_chart_is_made_until_the_user_chooses_a_run(mrml, tmp_path: Path) -> None:
    """Defect 7: after a scene close the timer re-created chart nodes in the new scene and switched the layout."""
    from CMEDLTrainLib.monitor import RunMonitor

    run = str(run_with_epochs(tmp_path / "run-a"))
    monitor = RunMonitor(mrml.scene, Timer())
    monitor.select(run, by_user=True)
    look = monitor.look()
    assert look.show_chart and look.chart.rows() == 2
    assert not monitor.look().show_chart, "the layout is switched once per run and scene"

    mrml.scene.Clear(0)
    monitor.scene_closed()
    for by_user in (False, False):  # ticks, and the list refreshing itself, are not the user
        monitor.select(run, by_user=by_user)
        look = monitor.look()
        assert look.snapshot is not None and look.chart is None and not look.show_chart
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 0
    monitor.select(run, by_user=True)
    look = monitor.look()
    assert look.show_chart and mrml.scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1


def stubborn_run(folder: Path) -> tuple[Path, int]:
    """A run folder whose launcher record names a live process that ignores SIGTERM."""
    from cmedl.jobs import start_detached_command

    pid = start_detached_command([sys.executable, "-c", STUBBORN], folder / "console.log")
    write_json(folder / "launcher.json", {"pid": pid, "create_time": process_create_time(pid), "mode": "start",
                                          "started": "2026-01-01T00:00:00+00:00", "stop_requested": "yes"})  # fmt: skip
    write_json(folder / "status.json", {"state": "running", "epoch": 1, "epochs": 5})
    return folder, pid


def test_force_stop_returns_at_once_and_the_ticks_watch_the_run_go(tmp_path: Path) -> None:
    """Defect 9: Force stop waited in the GUI thread for up to 12 s (10 s grace, then 2 s)."""
    from cmedl.processes import process_alive
    from CMEDLTrainLib.monitor import RunMonitor

    run, pid = stubborn_run(tmp_path / "run")
    timer = Timer()
    monitor = RunMonitor(scene=None, timer=timer)
    monitor.select(str(run), by_user=True)
    assert monitor.look().snapshot.state == "stopping"
    started = time.monotonic()
    monitor.force_stop()
    assert time.monotonic() - started < 1.5, "no grace period is waited out in the GUI thread"
    deadline = time.monotonic() + 10
    look = monitor.look()
    while "was stopped" not in look.stopping and time.monotonic() < deadline:
        time.sleep(0.1)
        look = monitor.look()
    assert "was stopped" in look.stopping and not process_alive(pid)
    assert not look.snapshot.alive and not timer.active


class Prompts:
    def __init__(self, answer: bool = True) -> None:
        self.answer, self.asked, self.errors = answer, [], []

    def ask(self, text: str) -> bool:
        self.asked.append(text)
        return self.answer

    def confirm(self, text: str, details: str = "") -> bool:
        return self.ask(text)

    def error(self, text: str, details: str = "") -> None:
        self.errors.append(text)


def test_stop_asks_then_requests_and_a_second_stop_offers_to_kill(monkeypatch) -> None:
    import CMEDLTrainLib.actions as actions_module
    from cmedl.training.runs import RunSnapshot
    from CMEDLTrainLib.actions import TrainActions

    requested, forced = [], []
    monkeypatch.setattr(actions_module, "request_stop", requested.append)
    actions = TrainActions(Prompts())
    running = RunSnapshot(path=Path("/runs/a"), state="running", alive=True)
    actions.stop(running, force=lambda: forced.append(True))
    assert requested == [Path("/runs/a")] and not forced
    actions.stop(RunSnapshot(path=Path("/runs/a"), state="stopping", alive=True), force=lambda: forced.append(True))
    assert forced == [True] and "has not stopped yet" in actions.prompts.asked[-1]
    actions.stop(RunSnapshot(path=Path("/runs/a"), state="finished", alive=False), force=lambda: forced.append(1))
    assert len(actions.prompts.asked) == 2, "a run that is not running is not asked about"


def test_start_and_resume_show_a_failed_install_in_one_message(tmp_path: Path) -> None:
    """Defect 1 for CMEDL Train: Start and Resume caught only RuntimeError from the installer."""
    from cmedl.training.runs import RunSnapshot
    from CMEDLCommon.dependencies import DependencyError
    from CMEDLTrainLib.actions import TrainActions
    from CMEDLTrainLib.settings import DataFolders, TrainingSettings

    def failing(requester: str) -> bool:
        raise DependencyError("installing PyTorch failed: pip ended with exit code 1; its output is in the console")

    prompts = Prompts()
    actions = TrainActions(prompts, python=lambda: sys.executable, ensure=failing)
    assert actions.start(TrainingSettings(), DataFolders(), str(tmp_path)) == (None, "")
    assert not actions.resume(RunSnapshot(path=tmp_path, state="stopped", alive=False), None, "cpu", 1)
    assert prompts.errors == ["The Python packages CMEDL needs are not installed: installing PyTorch failed: pip "
                              "ended with exit code 1; its output is in the console"] * 2  # fmt: skip


def test_listing_runs_needs_no_psutil(tmp_path: Path) -> None:
    """Defect 5: runs.py imported cmedl.jobs, which imported psutil (not bundled with Slicer)."""
    alive = tmp_path / "alive"
    write_json(alive / "status.json", {"state": "running", "epoch": 1, "epochs": 3})
    ended = tmp_path / "ended"
    write_json(ended / "status.json", {"state": "running", "epoch": 1, "epochs": 3})
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    write_json(ended / "launcher.json", {"pid": process.pid, "create_time": 1.0})
    script = (
        "import os, sys, json\n"
        "sys.modules['psutil'] = None  # as in a fresh Slicer: importing it fails\n"
        "from pathlib import Path\n"
        f"root = Path({str(tmp_path)!r})\n"
        "(root / 'alive' / 'launcher.json').write_text(json.dumps({'pid': os.getpid(), 'create_time': 1.0}))\n"
        "from CMEDLTrainLib.monitor import run_list\n"
        "from cmedl.training.runs import read_run\n"
        "import cmedl.training.launch, CMEDLTrainLib.actions, CMEDLTrainLib.launcher\n"
        "states = {p.name: (read_run(p).state, read_run(p).alive) for p in root.iterdir()}\n"
        "assert states == {'alive': ('running', True), 'ended': ('interrupted', False)}, states\n"
        "items, row = run_list(str(root), '')\n"
        "assert len(items) == 2 and items[row][1].endswith('alive'), (items, row)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "CMEDLTrain")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slicer
def test_looking_for_a_runs_chart_does_not_leak_the_scenes_collections(mrml, tmp_path: Path) -> None:
    """Defect 10: GetNodesByClass hands over a collection the caller must delete (vtkMRMLScene.h)."""
    from CMEDLTrainLib.plots import TrainingChart

    collections = []

    class Scene:
        """The real scene, noting every collection it hands out."""

        def __getattr__(self, name: str):
            return getattr(mrml.scene, name)

        def GetNodesByClass(self, class_name: str):  # noqa: N802 -- the MRML method it stands for
            collections.append(mrml.scene.GetNodesByClass(class_name))
            return collections[-1]

    run = run_with_epochs(tmp_path / "run")
    TrainingChart(Scene(), run).update([{"epoch": 1, "loss_seg_ct": 0.5}])
    TrainingChart(Scene(), run)
    assert len(collections) == 6
    # Only this test's Python references are left: the scene's own reference was released.
    assert [collection.GetReferenceCount() for collection in collections] == [1] * 6


def test_the_panel_values_become_the_engines_settings() -> None:
    from CMEDLTrainLib.parameters import SETTINGS_FIELDS, parameter_defaults, settings_from_parameters, vgg_note

    values = {**parameter_defaults(), "runName": "  my run ", "randomVgg": True}
    parameters = SimpleNamespace(**values)
    settings = settings_from_parameters(parameters, device="cpu", vgg_path="/x/vgg16.pth")
    assert settings.name == "my run" and settings.device == "cpu" and settings.vgg_weights == "random"
    assert set(SETTINGS_FIELDS) - set(values) == set()
    parameters.randomVgg = False
    assert settings_from_parameters(parameters, vgg_path=" /x/vgg16.pth ").vgg_weights == "/x/vgg16.pth"
    assert vgg_note(parameters, "") == "" and parameters.method == "ct_only"
    parameters.method = "cmedl"
    assert "torch hub" in vgg_note(parameters, "")


def test_the_runs_list_selects_the_asked_run_else_a_running_one_else_the_newest(tmp_path: Path) -> None:
    from CMEDLTrainLib.monitor import run_list

    for name, age in (("old", 30), ("new", 10)):
        run_with_epochs(tmp_path / name)
        stamp = time.time() - age
        os.utime(tmp_path / name / "status.json", (stamp, stamp))
    items, row = run_list(str(tmp_path), "")
    assert [Path(path).name for _, path in items] == ["new", "old"] and row == 0
    assert run_list(str(tmp_path), str(tmp_path / "old"))[1] == 1
    assert run_list("", "") == ([], -1) and run_list(str(tmp_path / "missing"), "")[1] == -1


@pytest.mark.slow
def test_the_self_tests_tiny_run_finishes_outside_slicer(tmp_path: Path) -> None:
    from CMEDLTrainLib.self_test import tiny_ct_run

    snapshot = tiny_ct_run(tmp_path, sys.executable, timeout=300)
    assert snapshot.state == "finished", snapshot.error
    assert [record["epoch"] for record in snapshot.metrics] == [1] and snapshot.model is not None
