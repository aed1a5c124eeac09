"""Following the run the panel shows: one look per timer tick, its curves in the scene, and stopping it.

:class:`RunMonitor` is what the panel's 2-second timer drives. Each :meth:`~RunMonitor.look` reads the run
folder (:func:`~cmedl.training.runs.read_run`), updates the run's curves in the scene and says whether the
chart should be put into the view layout (once per run and scene), and keeps the timer running only while
there is something to follow. It follows these rules, so that a run never disturbs the user elsewhere:

- the timer stops when the module is left or unloaded (:meth:`~RunMonitor.suspend`), whatever a late tick
  would say, and starts again only when the module is entered (:meth:`~RunMonitor.resume`);
- after a scene close no chart node is created and the layout is not changed until the user selects or
  starts a run again (``select(..., by_user=True)``): the new scene belongs to other work;
- stopping never waits in the GUI thread: Stop sends the request and returns, Force stop kills the process
  tree without a grace period and the following ticks watch it go (:class:`CMEDLCommon.stopping.StopSequence`).

The timer is anything with ``start()``, ``stop()`` and ``isActive()`` (a ``qt.QTimer`` in Slicer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmedl.training.runfolder import FAILED
from cmedl.training.runs import INTERRUPTED, RunSnapshot, list_runs, read_launch_record, read_run, record_alive
from CMEDLCommon.stopping import DONE, OVERDUE, StopSequence

FORCE_STOP_GRACE_SECONDS = 5.0
_UNSEEN = object()  # the preview of a run just selected: whatever it is, the panel has not shown it
NO_RUN_TEXT = "No run selected. Start one, or choose the runs folder of earlier runs."


@dataclass
class Look:
    """One look at the selected run, for the panel to show."""

    snapshot: RunSnapshot | None
    chart: Any = None
    show_chart: bool = False
    state_changed: bool = False
    problem: str = ""
    stopping: str = ""
    preview_changed: bool = False

    @property
    def status(self) -> str:
        """The run's status line (or why there is none), with the progress of a force stop."""
        if self.snapshot is None:
            return self.problem or self.stopping or NO_RUN_TEXT
        line = f"{self.snapshot.name}: {self.snapshot.summary_line()}"
        return f"{line} ({self.stopping})" if self.stopping else line

    @property
    def losses(self) -> str:
        text = self.snapshot.losses_text() if self.snapshot is not None else ""
        return f"Last losses: {text}" if text else ""

    @property
    def progress(self) -> tuple[bool, int, str]:
        """Whether the progress bar shows, its value in percent and its text."""
        snapshot = self.snapshot
        if snapshot is None or not snapshot.epochs:
            return False, 0, ""
        return True, int(round(100 * snapshot.fraction())), f"epoch {snapshot.epoch}/{snapshot.epochs}"

    @property
    def preview_caption(self) -> str:
        """What the columns of the preview picture show (the engine writes them beside the pictures)."""
        snapshot = self.snapshot
        if snapshot is None or snapshot.preview is None or not snapshot.preview_columns:
            return ""
        return f"{snapshot.preview.name}: columns {', '.join(snapshot.preview_columns)}"

    @property
    def show_log(self) -> bool:
        """A failed or interrupted run shows its log without being asked."""
        return self.snapshot is not None and self.snapshot.state in (FAILED, INTERRUPTED)


def _training_chart(scene: Any, run_path: str) -> Any:
    from CMEDLTrainLib.plots import TrainingChart  # MRML classes: only once curves are drawn

    return TrainingChart(scene, run_path)


def _kill_now(run_path: str) -> object:
    from cmedl.training.launch import kill_run

    return kill_run(run_path, grace_seconds=0.0)


def run_list(root: str, select_path: str, limit: int = 50) -> tuple[list[tuple[str, str]], int]:
    """The runs list of the runs folder ``root``: ``(text, run folder)`` items (newest first, at most ``limit``),
    and the row to select: ``select_path``, else a running run, else the newest; -1 when there are none."""
    snapshots = [read_run(path) for path in list_runs(root)[:limit]] if root.strip() else []
    items = [(f"{snapshot.name}: {snapshot.summary_line()}", str(snapshot.path)) for snapshot in snapshots]
    paths = [path for _, path in items]
    alive = [row for row, snapshot in enumerate(snapshots) if snapshot.alive]
    row = paths.index(select_path) if select_path in paths else (alive[0] if alive else (0 if items else -1))
    return items, row


class RunMonitor:
    """Follows one selected run for the panel (see the module docstring).

    Args:
        scene: the MRML scene the curves go into.
        timer: ticks :meth:`look` while a run is followed.
        chart_factory: ``chart_factory(scene, run_path)`` makes or finds the run's curve nodes
            (default: :class:`CMEDLTrainLib.plots.TrainingChart`).
        read: reads a run folder (:func:`cmedl.training.runs.read_run`).
        kill: stops a run's process tree at once (default: :func:`cmedl.training.launch.kill_run`, no grace).
        alive: whether a run's process still runs.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        scene: Any,
        timer: Any,
        chart_factory: Callable[[Any, str], Any] | None = None,
        read: Callable[[str], RunSnapshot] = read_run,
        kill: Callable[[str], object] | None = None,
        alive: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scene = scene
        self.timer = timer
        self._chart_factory = chart_factory or _training_chart
        self._read = read
        self._kill = kill or _kill_now
        self._alive = alive or (lambda path: record_alive(read_launch_record(path)))
        self._clock = clock
        self.run_path = ""
        self.charts_allowed = True
        self.suspended = False
        self._charts: dict[str, Any] = {}
        self._shown_in_layout: set[str] = set()
        self._state: str | None = None
        self._preview: Any = _UNSEEN
        self._stop: StopSequence | None = None
        self._stop_path = ""

    def select(self, run_path: str, by_user: bool) -> None:
        """Follow ``run_path`` (``""``: none). A user's choice (or a run just started) brings the curves back."""
        if run_path != self.run_path:
            self._state, self._preview = None, _UNSEEN
        self.run_path = run_path
        if by_user:
            self.charts_allowed = True

    def scene_closed(self) -> None:
        """The scene was closed: its nodes are gone, and no new ones are made until the user asks again."""
        self.charts_allowed = False
        self._charts.clear()
        self._shown_in_layout.clear()

    def suspend(self) -> None:
        """The module was left (or is being unloaded): no more ticks until :meth:`resume`."""
        self.suspended = True
        self.timer.stop()

    def resume(self) -> None:
        self.suspended = False

    def force_stop(self) -> None:
        """Kill the run's process tree now; the following looks watch it go (nothing waits here)."""
        path = self.run_path
        if not path or self._stop is not None:
            return
        self._stop_path = path
        self._stop = StopSequence(
            ask=lambda: self._kill(path), alive=lambda: self._alive(path), grace_seconds=FORCE_STOP_GRACE_SECONDS,
            force=lambda: self._kill(path), clock=self._clock,
        )  # fmt: skip
        self._stop.start()
        if not self.suspended:
            self.timer.start()

    def look(self) -> Look:
        """Read the selected run once and decide what the panel shows and whether the timer goes on."""
        stopping = self._follow_stop()
        if not self.run_path:
            self.timer.stop()
            changed, self._preview = self._preview is not None, None  # the panel clears a shown preview once
            return Look(None, stopping=stopping, preview_changed=changed)
        try:
            snapshot = self._read(self.run_path)
        except ImportError as error:
            self.timer.stop()
            return Look(None, problem=f"runs cannot be shown yet ({error}): press Start once to install the "
                                      "Python packages CMEDL needs", stopping=stopping)  # fmt: skip
        chart, show = None, False
        if snapshot.metrics and self.charts_allowed:
            chart = self._chart(snapshot.path)
            chart.update(snapshot.metrics)
            key = str(Path(snapshot.path).absolute())
            show = key not in self._shown_in_layout
            self._shown_in_layout.add(key)
        changed = self._state is not None and snapshot.state != self._state
        self._state = snapshot.state
        preview_changed, self._preview = snapshot.preview != self._preview, snapshot.preview
        if not self.suspended and (snapshot.alive or self._stop is not None):
            if not self.timer.isActive():
                self.timer.start()
        else:
            self.timer.stop()
        return Look(snapshot, chart, show, changed, stopping=stopping, preview_changed=preview_changed)

    def _chart(self, run_path: Path) -> Any:
        key = str(Path(run_path).absolute())
        chart = self._charts.get(key)
        if chart is None or chart.table_node.GetScene() is None:
            chart = self._charts[key] = self._chart_factory(self.scene, key)
        return chart

    def _follow_stop(self) -> str:
        if self._stop is None:
            return ""
        state = self._stop.tick()
        if state == DONE:
            self._stop = None
            return f"{Path(self._stop_path).name} was stopped"
        if state == OVERDUE:
            self._stop = None
            return f"{Path(self._stop_path).name} did not end when killed; see the system's process list"
        return f"stopping {Path(self._stop_path).name}..."
