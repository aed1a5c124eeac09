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

Either way a signal that arrives while a module is being imported raises only once the import is over (it is
delivered again every :data:`REDELIVERY_SECONDS`): an exception inside a C extension's initialisation (torch's
takes a second or two) can crash the process instead of stopping it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
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
            if _import_in_progress():
                # An exception raised inside a module's initialisation can leave a C extension half set up:
                # torch's, interrupted while it registers its types, aborts or crashes the process. The
                # signal comes back once the import is over and raises then.
                _deliver_again_later(signum)
                return
            raise Interrupted(self.signal_name)


_ACTIVE: _StopState | None = None
#: how long a stop signal that arrived during an import waits before it is delivered again (seconds)
REDELIVERY_SECONDS = 0.05


def _import_in_progress() -> bool:
    """Whether a module is being initialised (its code, or a C extension's set-up, is running) in this process."""
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            return True
    return False


def _deliver_again_later(signum: int) -> None:
    def deliver() -> None:
        # To the main thread itself, so that a blocking call there (a sleep, a read) is interrupted at once.
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(threading.main_thread().ident, signum)
        else:
            signal.raise_signal(signum)

    timer = threading.Timer(REDELIVERY_SECONDS, deliver)
    timer.daemon = True
    timer.start()


@contextlib.contextmanager
def stop_signals(cooperative: bool = False, ignore_after: bool = False) -> Iterator[bool]:
    """Handle SIGTERM and SIGINT for the length of the block; yields whether the handlers were installed.

    Nothing is installed outside the main thread (Python allows signal handlers only there) or when another
    block of this kind is already active; the previous handlers come back when the block ends, unless
    ``ignore_after``: then the signals are ignored from the end of the block on. The command line asks for that
    because its outcome is decided then (outputs in place, exit code chosen), and a signal during the
    interpreter's shutdown (a Cancel racing the end of the run) would turn it into a kill, exit 143.
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
            if ignore_after:
                handler = signal.SIG_IGN
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
