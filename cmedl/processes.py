"""Following and stopping process trees by pid: is a process alive, when did it start, stop it and all it started.

:mod:`cmedl.jobs` starts engine children; this module answers about them, and about any process, later and
from anywhere: a training run started detached by one Slicer session is followed and stopped by the next one,
by the pid and start time kept in its run folder.

A process tree is stopped politely first (SIGTERM; TerminateProcess on Windows), then killed after a grace
period. A child's process group is signalled too, so processes it starts while being stopped, or orphans it
left in its session, are reached.

``psutil`` is imported only where a tree is stopped or a start time is read, never at import time: Slicer
imports this module (through :mod:`cmedl.jobs`) before psutil is installed, and :func:`process_alive` answers
without it, so that a fresh Slicer can list training runs before anything was installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

_POLL_SECONDS = 0.05
_WINDOWS = sys.platform == "win32"

# Detached children started by this process, by pid: polling their Popen reaps them once they exit, so they
# do not linger as zombies that look alive, and it keeps their exit status.
_DETACHED: dict[int, subprocess.Popen] = {}
_DETACHED_LOCK = threading.Lock()


def process_create_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when there is no such process.

    Stored beside a pid, it lets :func:`process_alive` tell the process from a later one that got its pid.
    """
    try:
        import psutil
    except ImportError:
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def process_alive(pid: int, create_time: float | None = None) -> bool:
    """Whether process ``pid`` is running; a zombie (exited, not yet reaped) is not.

    With ``create_time`` (from :func:`process_create_time` when it was started) a process whose start time
    differs by more than a second is another one that reused the pid, and the answer is False.
    """
    if pid <= 0:
        return False
    with _DETACHED_LOCK:
        popen = _DETACHED.get(pid)
    if popen is not None and popen.poll() is not None:
        return False
    try:
        import psutil
    except ImportError:
        return _alive_without_psutil(pid)
    try:
        process = psutil.Process(pid)
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.AccessDenied:
            pass  # another user's process: it exists, and its start time below may still be readable
        if create_time is not None:
            try:
                return abs(process.create_time() - create_time) <= 1.0
            except psutil.AccessDenied:
                return True
        return True
    except psutil.NoSuchProcess:
        return False


def _alive_without_psutil(pid: int) -> bool:
    """Whether ``pid`` runs, from the operating system alone (no start-time check: a reused pid reads alive)."""
    if _WINDOWS:
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists, it is somebody else's
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # Linux: an exited process that nobody has reaped yet is state Z, the field after the command name.
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def terminate_tree(pid: int, grace_seconds: float = 3.0, create_time: float | None = None) -> bool:
    """Stop process ``pid`` and all its descendants; return whether any of them was running.

    Every process first gets a polite request (SIGTERM; on Windows there is only TerminateProcess) and
    ``grace_seconds`` to exit; those still running then are killed. A training run saves its state and marks
    itself stopped when asked politely, so give it a longer grace. With ``create_time`` (as for
    :func:`process_alive`) a process that merely reused the pid is left alone. Safe to call for a pid that
    has exited: for a detached child of this process, processes it left behind in its session are stopped.
    """
    if pid == os.getpid():
        raise ValueError("refusing to terminate the calling process itself")
    with _DETACHED_LOCK:
        popen = _DETACHED.get(pid)
    if popen is not None and popen.poll() is not None:
        return _stop_leftover_group(pid, grace_seconds)
    if create_time is not None and not process_alive(pid, create_time):
        return False
    return _stop_tree(pid, popen, grace_seconds)


def remember_detached(process: subprocess.Popen) -> None:
    """Keep a detached child of this process, so that :func:`process_alive` and :func:`terminate_tree` reap it."""
    with _DETACHED_LOCK:
        # Entries of children that have exited are dropped here, so the table does not grow without bound.
        for pid in [pid for pid, popen in _DETACHED.items() if popen.poll() is not None]:
            del _DETACHED[pid]
        _DETACHED[process.pid] = process


def stop_child_tree(process: subprocess.Popen, grace_seconds: float) -> bool:
    """Stop an attached child of this process and everything it started (see :func:`terminate_tree`).

    The child itself is signalled and waited on through ``process``, which keeps its exit status.
    """
    return _stop_tree(process.pid, process, grace_seconds)


def _stop_tree(pid: int, popen: subprocess.Popen | None, grace_seconds: float) -> bool:
    """Stop process ``pid`` and its descendants (see :func:`terminate_tree`).

    A child of this process is signalled and waited on through its ``popen``, which keeps its exit status
    (reaping it behind the Popen's back would make it report 0).
    """
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    # The descendants are collected before anything is stopped: once a parent has exited its children are
    # re-parented and no longer found under it.
    try:
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    # The child's process group also reaches what it starts after the collection above, and orphans that
    # left the tree but stayed in its session. Its leader has not been reaped yet, so the group id cannot
    # name anybody else's group.
    group = pid if _owns_process_group(pid) else None
    if popen is not None:
        return _stop_processes(descendants, grace_seconds, popen=popen, group=group)
    return _stop_processes([root, *descendants], grace_seconds, group=group)


def _stop_leftover_group(group: int, grace_seconds: float) -> bool:
    """Stop what a finished detached child left running in its session (POSIX; nothing to do on Windows)."""
    if _WINDOWS:
        return False
    import psutil

    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and not _gone(process):
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return _stop_processes(members, grace_seconds)


def _stop_processes(
    processes: list[psutil.Process],
    grace_seconds: float,
    popen: subprocess.Popen | None = None,
    group: int | None = None,
) -> bool:
    """Ask ``processes`` (and ``popen``'s child, and process ``group``) to exit, kill what is left after the
    grace period; return whether any of them was running."""

    def finished(remaining: list[psutil.Process]) -> bool:
        return (popen is None or popen.poll() is not None) and all(_gone(process) for process in remaining)

    if finished(processes):
        return False
    _signal_group(group, signal.SIGTERM)
    _signal(popen, processes, polite=True)
    _wait_until(lambda: finished(processes), grace_seconds)

    # Any member still alive keeps the group id reserved, so signalling it again cannot reach a stranger.
    _signal_group(group, signal.SIGKILL if not _WINDOWS else signal.SIGTERM)
    survivors = [process for process in processes if not _gone(process)]
    _signal(popen, survivors, polite=False)
    _wait_until(lambda: finished(survivors), 2.0)
    return True


def _owns_process_group(pid: int) -> bool:
    """Whether ``pid`` leads a process group of its own (as children started here do), not the caller's."""
    if _WINDOWS:
        return False
    try:
        group = os.getpgid(pid)
    except OSError:
        return False
    return group == pid and group != os.getpgrp()


def _signal_group(group: int | None, signum: int) -> None:
    if group is None:
        return
    try:
        os.killpg(group, signum)
    except OSError:
        pass


def _signal(popen: subprocess.Popen | None, processes: list[psutil.Process], polite: bool) -> None:
    import psutil

    if popen is not None and popen.poll() is None:
        try:
            if polite:
                popen.terminate()
            else:
                popen.kill()
        except OSError:
            pass
    for process in processes:
        try:
            # psutil refuses to signal a pid that now belongs to a newer process.
            if polite:
                process.terminate()
            else:
                process.kill()
        except psutil.Error:
            pass


def _wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` for up to ``seconds``; return whether it became true."""
    deadline = time.monotonic() + max(seconds, 0.0)
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


def _gone(process: psutil.Process) -> bool:
    import psutil

    try:
        # is_running() also compares start times, so a reused pid reads as gone.
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
