"""Progress and event protocol shared by the command line, the Slicer modules and training runs.

Long operations take a :class:`Progress` and call ``progress.update(stage, done, total)``. What happens with
the update depends on who listens:

- :class:`JsonLinesProgress` writes one JSON object per line, the protocol a parent process (a Slicer module,
  :mod:`cmedl.jobs`) reads from a child ``python -m cmedl ... --progress json``::

      {"event": "progress", "stage": "segment", "done": 12, "total": 40, "message": "slices"}
      {"event": "log", "message": "..."}
      {"event": "error", "message": "no lungs found in ct.nii.gz", "exit_code": 2}
      {"event": "done", "result": {...}}

- :class:`TextProgress` draws a readable progress bar for a person at a terminal.
- :class:`Progress` itself records nothing; it is the silent default.

Every update is also the place where an in-process run notices a cancel request: a caller that owns a
:class:`threading.Event` passes it as ``cancel``, sets it from another thread, and the next update raises
:class:`cmedl.errors.CancelledError`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from cmedl.errors import CancelledError

EVENT_PROGRESS = "progress"
EVENT_LOG = "log"
EVENT_ERROR = "error"
EVENT_DONE = "done"

# The stages of one ``cmedl segment`` run in the order they come, and the share of the whole run each covers, so
# that a parent's one progress bar (the Slicer panel's) runs from 0 to 100 % once.
STAGE_READ, STAGE_LUNGS, STAGE_SEGMENT, STAGE_WRITE = "read", "lungs", "segment", "write"
SEGMENT_STAGE_SPANS: dict[str, tuple[float, float]] = {
    STAGE_READ: (0.0, 0.05),
    STAGE_LUNGS: (0.05, 0.15),
    STAGE_SEGMENT: (0.15, 0.95),
    STAGE_WRITE: (0.95, 1.0),
}


class Progress:
    """Silent progress sink; the base class of all others.

    Args:
        cancel: optional event; once set, the next :meth:`update` raises :class:`CancelledError`.
    """

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self.cancel = cancel

    def check_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("cancelled by the user")

    def update(self, stage: str, done: int, total: int, message: str = "") -> None:
        """Report that ``done`` of ``total`` units of ``stage`` are finished."""
        self.check_cancelled()
        self._emit(
            {"event": EVENT_PROGRESS, "stage": stage, "done": int(done), "total": int(total), "message": message}
        )

    def log(self, message: str) -> None:
        self._emit({"event": EVENT_LOG, "message": message})

    def error(self, message: str, exit_code: int) -> None:
        self._emit({"event": EVENT_ERROR, "message": message, "exit_code": int(exit_code)})

    def done(self, result: dict[str, Any] | None = None) -> None:
        self._emit({"event": EVENT_DONE, "result": result or {}})

    def _emit(self, event: dict[str, Any]) -> None:
        pass


class CallbackProgress(Progress):
    """Forwards every event (a dict as in the JSON protocol) to ``callback``."""

    def __init__(self, callback: Callable[[dict[str, Any]], None], cancel: threading.Event | None = None) -> None:
        super().__init__(cancel)
        self.callback = callback

    def _emit(self, event: dict[str, Any]) -> None:
        self.callback(event)


class JsonLinesProgress(Progress):
    """Writes each event as one JSON line to ``stream`` (stdout by default) and flushes it at once."""

    def __init__(self, stream: TextIO | None = None, cancel: threading.Event | None = None) -> None:
        super().__init__(cancel)
        self.stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()

    def _emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class TextProgress(Progress):
    """A one-line progress bar per stage for a terminal (``stream`` defaults to stderr)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30, cancel: threading.Event | None = None) -> None:
        super().__init__(cancel)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._stage = ""
        self._last_draw = 0.0

    def _emit(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == EVENT_PROGRESS:
            self._draw(event)
        elif kind == EVENT_LOG:
            self._end_line()
            self.stream.write(event["message"] + "\n")
            self.stream.flush()

    def _draw(self, event: dict[str, Any]) -> None:
        stage, done, total = event["stage"], event["done"], max(event["total"], 1)
        if stage != self._stage:
            self._end_line()
            self._stage = stage
        finished = done >= total
        now = time.monotonic()
        # Redrawing hundreds of times a second costs more than the work it reports.
        if not finished and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        filled = int(self.width * min(done, total) / total)
        bar = "#" * filled + "-" * (self.width - filled)
        unit = f" {event['message']}" if event.get("message") else ""
        self.stream.write(f"\r{stage:<10} [{bar}] {done}/{total}{unit}")
        if finished:
            self.stream.write("\n")
            self._stage = ""
        self.stream.flush()

    def _end_line(self) -> None:
        if self._stage:
            self.stream.write("\n")
            self._stage = ""


def overall_fraction(
    event: dict[str, Any] | None, spans: dict[str, tuple[float, float]] = SEGMENT_STAGE_SPANS
) -> float | None:
    """Share of a whole run done, in [0, 1], after a progress ``event`` (None before the first one).

    ``spans`` gives each stage's share (default: a ``cmedl segment`` run's); a stage it lacks counts as the whole.
    """
    if not event or event.get("event") != EVENT_PROGRESS:
        return None
    start, end = spans.get(str(event.get("stage")), (0.0, 1.0))
    total = max(int(event.get("total") or 0), 1)
    done = min(max(int(event.get("done") or 0), 0), total)
    return start + (end - start) * done / total


def parse_event(line: str) -> dict[str, Any] | None:
    """The event in one line of a child's output, or None when the line is not a protocol event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("event") not in (EVENT_PROGRESS, EVENT_LOG, EVENT_ERROR, EVENT_DONE):
        return None
    return event
