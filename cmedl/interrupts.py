"""SIGTERM and SIGINT for the command line: a stop request, honoured within seconds in every phase.

CMEDL Train's Stop button and ``kill`` send SIGTERM, Ctrl-C sends SIGINT. Only the command line installs
handlers (:func:`stop_signals`, in the main thread of its process, restoring the previous handlers when the
command ends): inside Slicer, where the engine is a library, the host's own handlers stay untouched and an
in-process run is stopped through its progress's cancel event instead.

Two ways of stopping, chosen by the command:

- immediate (``segment``, ``phantom`` ...): the handler raises :class:`cmedl.errors.Interrupted` in the main
  thread, wherever it is. Outputs are written under temporary names and renamed only when complete, and the
  ``finally`` blocks that remove the temporary files run as the exception passes, so nothing is left behind.
- cooperative (``train``): the handler only records the request; the trainer looks at :func:`stop_requested`
  between steps and between validation slices, and saves what it has before it stops. Where there is nothing
  to save (reading the data), it marks the stretch :func:`interruptible` and the request raises at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from cmedl.errors import Interrupted

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT") if hasattr(signal, name))


class _StopState:
    """The stop request of the running command and where it may raise."""

    def __init__(self, cooperative: bool) -> None:
        self.cooperative = cooperative
        self.requested = threading.Event()
        self.signal_name = ""
        self.interruptible_depth = 0

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.requested.set()
        if not self.cooperative or self.interruptible_depth > 0:
            raise Interrupted(self.signal_name)


_ACTIVE: _StopState | None = None


@contextlib.contextmanager
def stop_signals(cooperative: bool = False) -> Iterator[bool]:
    """Handle SIGTERM and SIGINT for the length of the block; yields whether the handlers were installed.

    Nothing is installed outside the main thread (Python allows signal handlers only there) or when another
    block of this kind is already active; the previous handlers come back when the block ends.
    """
    global _ACTIVE
    if threading.current_thread() is not threading.main_thread() or _ACTIVE is not None:
        yield False
        return
    state = _StopState(cooperative)
    previous: dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, state.handle)
        _ACTIVE = state
        yield True
    finally:
        _ACTIVE = None
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def stop_requested() -> bool:
    """Whether SIGTERM or SIGINT arrived during the current :func:`stop_signals` block."""
    state = _ACTIVE
    return state is not None and state.requested.is_set()


def stop_signal_name() -> str:
    """``SIGTERM`` or ``SIGINT``: the signal that asked to stop (empty when none did)."""
    state = _ACTIVE
    return state.signal_name if state is not None else ""


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block a stop signal raises :class:`Interrupted` at once, also in a cooperative command.

    For stretches that hold nothing worth saving (reading and resampling data). A request that arrived just
    before the block raises on entry.
    """
    state = _ACTIVE
    if state is None:
        yield
        return
    state.interruptible_depth += 1
    try:
        if state.requested.is_set():
            raise Interrupted(state.signal_name)
        yield
    finally:
        state.interruptible_depth -= 1
