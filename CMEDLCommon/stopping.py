"""Stopping a child process from a GUI without waiting for it in the GUI thread.

A blocking stop (signal, then sleep until the process is gone or a grace period ends, then kill) freezes
Slicer for the whole grace period. :class:`StopSequence` splits it into steps a timer drives: :meth:`start`
makes the first request and returns at once; each :meth:`tick` looks whether the process has gone, and once
the grace period has passed it forces the stop (or, without a ``force`` step, reports the stop overdue so the
user can decide). The clock is a parameter, so the steps are tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable

IDLE, ASKED, FORCED, OVERDUE, DONE = "idle", "asked", "forced", "overdue", "done"


class StopSequence:
    """Ask a process to stop, give it ``grace_seconds``, then force it; one step per :meth:`tick`.

    Args:
        ask: the first request; must not wait (a polite signal, or the engine's kill without grace).
        alive: whether the process (or anything it started) still runs.
        grace_seconds: how long ``alive`` may stay true after ``ask`` before ``force`` is called.
        force: the second step, also without waiting; None: never forced, the state becomes ``overdue``.
        give_up_seconds: after ``force``, how long until the state becomes ``overdue``.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        ask: Callable[[], object],
        alive: Callable[[], bool],
        grace_seconds: float,
        force: Callable[[], object] | None = None,
        give_up_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ask = ask
        self._alive = alive
        self._force = force
        self.grace_seconds = grace_seconds
        self.give_up_seconds = give_up_seconds
        self._clock = clock
        self._deadline = 0.0
        self.state = IDLE

    @property
    def done(self) -> bool:
        return self.state == DONE

    def start(self) -> str:
        """Make the first request; returns the state after one look (``done`` when it went at once)."""
        if self.state != IDLE:
            return self.state
        self._ask()
        self.state = ASKED
        self._deadline = self._clock() + self.grace_seconds
        return self.tick()

    def tick(self) -> str:
        """One look: ``done`` once the process has gone; forces the stop when the grace period is over."""
        if self.state in (IDLE, DONE):
            return self.state
        if not self._alive():
            self.state = DONE
            return self.state
        now = self._clock()
        if self.state == ASKED and now >= self._deadline:
            if self._force is None:
                self.state = OVERDUE
            else:
                self._force()
                self.state = FORCED
                self._deadline = now + self.give_up_seconds
                if not self._alive():
                    self.state = DONE
        elif self.state == FORCED and now >= self._deadline:
            self.state = OVERDUE
        return self.state
