"""Run a producer iterator one step ahead in a background thread.

Inference on a GPU alternates CPU work (normalising, resizing and cutting slices into tiles) with network calls
that the GPU runs while the CPU waits. :func:`prefetched` lets the CPU prepare the next batches in a thread while
the calling thread runs the network on the current one. numpy and torch release the GIL in their array work, so
the two threads overlap for real; pure Python bookkeeping still takes turns.

The guarantees a long inference needs:

* items arrive in the producer's order, at most ``depth`` of them waiting (bounded memory);
* an exception raised by the producer is raised in the consumer, with its traceback, at the point it would have
  been raised without the thread;
* when the consumer stops early (an error of its own, a stop signal, ``close()`` of the generator), the producer
  is told to stop and the thread ends within one producer step; it is a daemon thread, so even a producer stuck
  in a long step never keeps the process alive.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")

#: how long one wait for a queue slot or an item lasts before the stop flag is looked at again (seconds)
_POLL_SECONDS = 0.05
#: how long the consumer waits for the producer thread to end after stopping it early (seconds)
_JOIN_SECONDS = 5.0


class _Finished:
    """The producer's last message: ``error`` is what it raised, None when it simply ran out."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def prefetched(items: Iterable[Item], depth: int = 2, name: str = "cmedl-prefetch") -> Iterator[Item]:
    """Yield the items of ``items``, produced ``depth`` steps ahead in a background thread.

    ``depth`` 0 runs the producer in the calling thread, with no thread at all (the plain iterator).
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be 0 or more, got {depth}")
    if depth == 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(message, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Finished(error))
            return
        put(_Finished())

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            try:
                message = ready.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not worker.is_alive() and ready.empty():
                    raise RuntimeError("the prefetch thread ended without a last message") from None
                continue
            if isinstance(message, _Finished):
                if message.error is not None:
                    raise message.error
                return
            yield message
    finally:
        stop.set()
        worker.join(_JOIN_SECONDS)


__all__ = ["prefetched"]
