"""One segmentation at a time for a scene: the panel's runs and automatic ones, driven by a timer.

:class:`SegmentationRunner` outlives the panel (the module creates it once Slicer has started), so automatic
segmentation works before the panel was ever opened. It owns the running :class:`SegmentationTask`:

- :meth:`~SegmentationRunner.submit` starts a run, or queues an automatic one while another runs (a CT loaded
  meanwhile is segmented next, not skipped);
- :meth:`~SegmentationRunner.tick`, called by a timer, reads the child's events, and once the child has ended
  imports its result into the scene and starts the next queued run;
- :meth:`~SegmentationRunner.cancel` kills the child without a grace period (it has nothing to save) and
  waits for it on the following ticks, never in the GUI thread;
- when the scene starts closing, the running segmentation is cancelled and its result dropped (node IDs
  restart in the next scene, so a late result would land on an unrelated node), and the queue is emptied.

Whoever shows the state (the panel, the module's parameter node) subscribes to :class:`RunnerEvent`s. The
timer is anything with ``start()`` and ``stop()`` (a ``qt.QTimer`` in Slicer), so all of this runs in tests.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cmedl.errors import CMEDLError, InputError
from CMEDLCommon.stopping import DONE, OVERDUE, StopSequence
from CMEDLSegmentLib.segment_logic import SegmentationOutcome, SegmentationSettings, SegmentationTask

IDLE, RUNNING, CANCELLING = "idle", "running", "cancelling"
STARTED, PROGRESS, LOG, FINISHED, FAILED, CANCELLED, QUEUED = (
    "started", "progress", "log", "finished", "failed", "cancelled", "queued"
)  # fmt: skip
CANCELLED_TEXT = "Cancelled; nothing was added to the scene."
SCENE_CLOSED_TEXT = "The scene was closed: the running segmentation was cancelled and its result dropped."


class Timer(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class RunRequest:
    """What to segment, with what: node IDs, so that a queued request never holds a removed node."""

    volume_id: str
    settings: SegmentationSettings
    segmentation_id: str | None = None
    segment_id: str | None = None
    automatic: bool = False
    volume_name: str = ""

    @classmethod
    def from_panel(cls, parameters: Any, model_path: Path, device: str, segment_id: str | None) -> RunRequest:
        """The run the panel asks for: its parameter node's input, output and advanced values."""
        volume, output = parameters.inputVolume, parameters.outputSegmentation
        settings = SegmentationSettings.from_panel(parameters, model_path, device)
        output_id = output.GetID() if output is not None else None
        return cls(volume.GetID(), settings, output_id, segment_id or None, volume_name=volume.GetName())


@dataclass
class RunnerEvent:
    """What happened: ``kind`` is one of the module's constants (``started``, ``progress``, ...)."""

    kind: str
    request: RunRequest | None = None
    message: str = ""
    fraction: float | None = None
    outcome: SegmentationOutcome | None = None
    details: str = ""


class SegmentationRunner:
    """Runs segmentations of ``scene`` one at a time (see the module docstring).

    Args:
        scene: the MRML scene; its close is observed once :meth:`attach` was called.
        logic: starts tasks (a :class:`~CMEDLSegmentLib.segment_logic.TumourSegmentationLogic`).
        timer: started while a run or a cancel is in progress, stopped when idle; calls :meth:`tick`.
        finishing: a context manager factory around importing a result (Slicer's ``RenderBlocker``).
        cancel_grace_seconds: how long a killed child may take to go before it is killed again.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        scene: Any,
        logic: Any,
        timer: Timer,
        finishing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        cancel_grace_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scene = scene
        self.logic = logic
        self.timer = timer
        self.listeners: list[Callable[[RunnerEvent], None]] = []
        self.task: SegmentationTask | None = None
        self.request: RunRequest | None = None
        self.queue: deque[RunRequest] = deque()
        self._finishing = finishing
        self._cancel_grace = cancel_grace_seconds
        self._clock = clock
        self._stop: StopSequence | None = None
        self._cancel_text = CANCELLED_TEXT
        self._observers: list[int] = []

    # -- state --

    @property
    def state(self) -> str:
        if self._stop is not None:
            return CANCELLING
        return RUNNING if self.task is not None else IDLE

    @property
    def busy(self) -> bool:
        return self.state != IDLE

    def attach(self) -> None:
        """Observe the scene's close (a no-op when already attached)."""
        if not self._observers:
            self._observers.append(self.scene.AddObserver(self.scene.StartCloseEvent, self.scene_closing))

    def detach(self) -> None:
        """Stop observing the scene, cancel what runs and forget the queue (the module is being unloaded)."""
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers.clear()
        self.queue.clear()
        self.cancel()

    def _emit(self, kind: str, request: RunRequest | None = None, **values: Any) -> None:
        event = RunnerEvent(kind, request, **values)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # one broken listener must not stop the runs, nor the other listeners
                logging.exception("CMEDL Segment: a listener failed on %s", kind)

    # -- starting --

    def submit(self, request: RunRequest) -> str:
        """Start ``request`` now (``started``), or after the running one when it is automatic (``queued``).

        Raises:
            InputError: a run from the panel while another runs (the panel shows Cancel then, not Apply).
            CMEDLError: the run cannot start (the volume is gone, the model file is refused, ...).
        """
        if self.busy:
            if not request.automatic:
                raise InputError("a segmentation is running; cancel it first")
            waiting = [queued.volume_id for queued in self.queue] + [self.request.volume_id if self.request else ""]
            if request.volume_id not in waiting:
                self.queue.append(request)
                self._emit(QUEUED, request, message=f"{request.volume_name} waits for the running segmentation "
                                                    f"({len(self.queue)} waiting)")  # fmt: skip
            return QUEUED
        self._start(request)
        return STARTED

    def _start(self, request: RunRequest) -> None:
        volume = self.scene.GetNodeByID(request.volume_id)
        if volume is None:
            raise InputError(f"the volume {request.volume_name or request.volume_id} is no longer in the scene")
        segmentation = self.scene.GetNodeByID(request.segmentation_id) if request.segmentation_id else None
        segment_id = request.segment_id if segmentation is not None else None
        self.task = self.logic.start(volume, request.settings, segmentation, segment_id)
        self.request = request
        self.timer.start()
        self._emit(STARTED, request, message=f"Segmenting {volume.GetName()}...")

    def _start_next(self) -> None:
        while self.queue and not self.busy:
            request = self.queue.popleft()
            try:
                self._start(request)
            except CMEDLError as error:
                self._emit(FAILED, request, message=str(error))
        if not self.busy:
            self.timer.stop()

    # -- following --

    def tick(self) -> None:
        """One timer tick: progress and log events, the result once the child has ended, the next run."""
        if self._stop is not None:
            self._follow_cancel()
            return
        task, request = self.task, self.request
        if task is None:
            self._start_next()
            return
        for event in task.poll():
            if event.get("event") == "log":
                self._emit(LOG, request, message=str(event.get("message", "")))
        fraction = task.fraction()
        if fraction is not None:
            self._emit(PROGRESS, request, fraction=fraction, message=task.stage_text())
        if task.running:
            return
        self.task = self.request = None
        try:
            with self._finishing():
                outcome = task.finish()
        except CMEDLError as error:
            self._emit(FAILED, request, message=str(error), details=task.job.stderr_tail())
        else:
            segment = outcome.segmentation_node.GetSegmentation().GetSegment(outcome.segment_id)
            line = outcome.status_line(segment.GetName() if segment is not None else "Lung tumour")
            self._emit(FINISHED, request, message=line, outcome=outcome)
        self._start_next()

    # -- stopping --

    def cancel(self, message: str = CANCELLED_TEXT) -> bool:
        """Kill the running child and drop its result; the queued runs go on. False when nothing runs."""
        task = self.task
        if task is None or self._stop is not None:
            return False
        self._cancel_text = message
        self._stop = StopSequence(
            ask=task.kill_now, alive=lambda: task.running, grace_seconds=self._cancel_grace, force=task.kill_now,
            clock=self._clock,
        )  # fmt: skip
        self._stop.start()
        self.timer.start()
        self._follow_cancel()
        return True

    def _follow_cancel(self) -> None:
        state = self._stop.tick() if self._stop is not None else DONE
        if state not in (DONE, OVERDUE):
            return
        task, request = self.task, self.request
        message = self._cancel_text
        if state == OVERDUE:
            message += " (the engine process did not end when killed; its result is not read)"
        self._stop = None
        self.task = self.request = None
        if task is not None:
            task.discard()
        self._emit(CANCELLED, request, message=message)
        self._start_next()

    def scene_closing(self, caller: Any = None, event: Any = None) -> None:
        """The scene starts closing: nothing of it may be segmented any more (the queue goes, the run too)."""
        if "queue" not in vars(self):
            # At interpreter exit Python may clear this object before VTK closes the scene it still observes.
            return
        self.queue.clear()
        self.cancel(SCENE_CLOSED_TEXT)


def follow_in_parameters(scene: Any, parameters: Callable[[], Any]) -> Callable[[RunnerEvent], None]:
    """A listener that shows runs in the module's parameter node, so the panel shows them when opened.

    An automatic run selects its CT as the input (and a new output) when it starts; every finished run
    makes its segmentation the output. ``parameters`` gives the parameter node, creating it when a scene
    close removed it (None: there is none to show anything in).
    """

    def listener(event: RunnerEvent) -> None:
        automatic_start = event.kind == STARTED and event.request is not None and event.request.automatic
        if not automatic_start and event.kind != FINISHED:
            return
        node = parameters()
        if node is None:
            return
        if automatic_start:
            node.inputVolume = scene.GetNodeByID(event.request.volume_id)
            node.outputSegmentation = None
        else:
            node.outputSegmentation = event.outcome.segmentation_node

    return listener


def offers_cpu_retry(message: str, device: str) -> bool:
    """Whether a failed run's message points at the GPU, so that running on the CPU instead is worth offering."""
    lowered = message.lower()
    return device != "cpu" and ("cuda" in lowered or "gpu" in lowered)


def apply_button(state: str, ready: bool) -> tuple[str, bool, str]:
    """Text, enabled state and tooltip of the panel's Apply button, which is Cancel while a run goes on."""
    if state == CANCELLING:
        return "Cancelling...", False, "The segmentation is being stopped; nothing is added to the scene"
    if state == RUNNING:
        return "Cancel", True, "Stop the segmentation; nothing is added to the scene"
    return "Apply", ready, "Segment the lung tumour" if ready else "Choose an input CT and a model first"
