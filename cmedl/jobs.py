"""Run the engine as a child process (``python -m cmedl ...``) and follow its progress and outcome.

The Slicer modules never run the engine inside Slicer's own interpreter: a crash, a stuck GPU call or a
torch import that fails would take the whole application down, and a GUI must stay responsive. Instead they
start a child with ``--progress json`` and read the JSON-lines protocol of :mod:`cmedl.progress`:

- :class:`Job` owns one attached child. A GUI timer calls :meth:`Job.poll` for the events that arrived since
  the last tick and reads :attr:`Job.stage` / :meth:`Job.fraction` for a progress bar; a script calls
  :meth:`Job.wait`. :meth:`Job.cancel` stops the whole process tree (the engine may have started workers).
- :func:`start_detached` starts a child that outlives its parent (a training run keeps going while Slicer is
  closed and reopened); its output goes to a log file. :mod:`cmedl.processes` follows and stops it later
  (:func:`cmedl.processes.process_alive`, :func:`cmedl.processes.terminate_tree`), by pid, even from another
  process.

This module imports only the standard library and the engine's protocol, error and process modules: Slicer
imports it before torch, numpy, SimpleITK or psutil are installed (:mod:`cmedl.processes` imports psutil only
where a tree is stopped).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cmedl.devices import DEFAULT_DEVICE, DEVICES
from cmedl.errors import (
    CancelledError,
    CMEDLError,
    ConfigError,
    InputError,
    ModelFileError,
    NoLungsFoundError,
    NotCTError,
    OutputError,
    TrainingError,
)
from cmedl.processes import remember_detached, stop_child_tree
from cmedl.progress import EVENT_DONE, EVENT_ERROR, EVENT_LOG, EVENT_PROGRESS, parse_event

STDERR_TAIL_LINES = 200
STDERR_TAIL_CHARS = 256 * 1024
# A longer stderr line is cut to its start (where "cmedl: error:" would be), so one runaway line cannot push
# every other line out of the tail.
STDERR_LINE_CHARS = 16 * 1024
CANCELLED_EXIT_CODE = CancelledError.exit_code
# Once the child has exited, its pipes normally close at once; a grandchild that inherited them can keep them
# open, and the readers are not waited on for longer than this.
READER_JOIN_SECONDS = 2.0

_POLL_INTERVAL = 0.05
_ERROR_PREFIX = re.compile(r"^cmedl(?: [\w-]+)?: error: ")
_ERRORS_BY_CODE: dict[int, type[CMEDLError]] = {
    error.exit_code: error
    for error in (
        NoLungsFoundError,
        InputError,
        ModelFileError,
        NotCTError,
        OutputError,
        ConfigError,
        TrainingError,
        CancelledError,
    )
}
_WINDOWS = sys.platform == "win32"


# -- command and environment -------------------------------------------------------------------------


def engine_command(arguments: Sequence[str], python: str | None = None) -> list[str]:
    """The command line that runs ``cmedl ARGUMENTS`` with ``python`` (this interpreter by default).

    Slicer passes its ``PythonSlicer`` launcher, which sets up the environment its Python needs.
    """
    if isinstance(arguments, str):
        raise TypeError("arguments must be a sequence of strings, not one string")
    return [python or sys.executable, "-m", "cmedl", *(str(argument) for argument in arguments)]


def engine_root() -> Path:
    """The folder that holds the ``cmedl`` package (a checkout's root, or site-packages when installed)."""
    return Path(__file__).resolve().parents[1]


def child_environment(device: str = DEFAULT_DEVICE, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an engine child: a copy of ``base`` (``os.environ`` by default) with

    - ``CUDA_VISIBLE_DEVICES=-1`` for ``device="cpu"``, so the child cannot even initialise a GPU (a busy or
      broken GPU driver then cannot hang or crash a CPU run); other devices leave the variable as it is;
    - ``PYTHONUNBUFFERED=1``, so progress lines arrive as they are printed, not when a buffer fills;
    - ``PYTHONIOENCODING=utf-8``, the encoding the parent decodes the child's output with (on Windows the
      pipe encoding would otherwise be the ANSI code page);
    - the folder that holds ``cmedl`` first on ``PYTHONPATH``, so a child in any working directory imports
      this engine. When the package is installed in a site-packages folder the child's own interpreter finds
      it, and that folder is not added: it would put this interpreter's packages before the child's own.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    environment = {str(key): str(value) for key, value in (os.environ if base is None else base).items()}
    if device == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = "-1"
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    root = engine_root()
    if root.name not in ("site-packages", "dist-packages"):
        entries = [entry for entry in environment.get("PYTHONPATH", "").split(os.pathsep) if entry]
        entries = [str(root)] + [entry for entry in entries if Path(entry) != root]
        environment["PYTHONPATH"] = os.pathsep.join(entries)
    return environment


# -- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobResult:
    """How a child ended.

    Attributes:
        returncode: the process's own exit status (negative signal number on POSIX when killed by a signal).
        cancelled: the job was cancelled (by :meth:`Job.cancel`, or by :meth:`Job.wait` on a timeout).
        timed_out: :meth:`Job.wait` cancelled the job because its timeout passed.
        result: the ``result`` of the child's ``done`` event, or ``{}``.
        error: one line that says what went wrong; empty when the run succeeded.
        exit_code: the outcome in :mod:`cmedl.errors` terms: 0, the engine's exit code, 130 when cancelled,
            3 for a command-line usage error (argparse exits 2, which would read as "no lungs found"),
            128 + N when signal N killed the child.
        stderr: the last lines the child wrote on stderr (at most 200 lines, 256 K characters; each line cut
            to 16 K characters).
        events: how many events the child sent on stdout (plain lines included, as ``log`` events).
    """

    returncode: int | None
    cancelled: bool
    timed_out: bool
    result: dict[str, Any]
    error: str
    exit_code: int
    stderr: str
    events: int = 0

    @property
    def ok(self) -> bool:
        """The child exited with 0 and was not cancelled."""
        return self.returncode == 0 and not self.cancelled

    def raise_for_error(self) -> None:
        """Raise the :mod:`cmedl.errors` error that matches :attr:`exit_code` (with :attr:`error`) unless ok.

        A cancelled job raises :class:`CancelledError`; an exit code the engine does not define raises the
        base :class:`CMEDLError`.
        """
        if self.ok:
            return
        error_type = CancelledError if self.cancelled else _ERRORS_BY_CODE.get(self.exit_code, CMEDLError)
        raise error_type(self.error)


# -- attached jobs -----------------------------------------------------------------------------------


class Job:
    """One engine child whose output this process reads (see the module docstring).

    Start it with :meth:`start` (engine arguments) or :meth:`start_command` (any command). Two daemon threads
    read the child's pipes as it writes them, so it never blocks on a full pipe even when nobody polls:
    stdout lines become events (a line that is not a protocol event becomes a ``log`` event), stderr is kept
    as a bounded tail for the error message.

    A GUI calls :meth:`poll` from a timer and, once :attr:`running` is False, :meth:`wait` for the result
    (it returns at once then, delivering any last events). Usable as a context manager that cancels the
    child when the block is left while it still runs.
    """

    def __init__(self, process: subprocess.Popen, command: Sequence[str]) -> None:
        """Follow an already started ``process``; its stdout and stderr must be text pipes."""
        self.process = process
        self.command = list(command)
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._stderr_tail: deque[str] = deque()
        self._stderr_chars = 0
        self._latest_progress: dict[str, Any] | None = None
        self._error_event: dict[str, Any] | None = None
        self._done_result: dict[str, Any] | None = None
        self._event_count = 0
        self._cancelled = False
        self._timed_out = False
        self._timeout_seconds = 0.0
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(process.stdout,), daemon=True, name="cmedl-stdout"),
            threading.Thread(target=self._read_stderr, args=(process.stderr,), daemon=True, name="cmedl-stderr"),
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def start(
        cls,
        arguments: Sequence[str],
        python: str | None = None,
        device: str = DEFAULT_DEVICE,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Job:
        """Start ``python -m cmedl ARGUMENTS`` (add ``--progress json`` to the arguments for progress events).

        Args:
            arguments: the engine's command-line arguments, such as ``["segment", "ct.nii.gz", "-o", ...]``.
            python: the interpreter or launcher (Slicer's ``PythonSlicer``); this interpreter by default.
            device: ``"cpu"`` hides the GPUs from the child (see :func:`child_environment`).
            env: the environment to start from instead of ``os.environ``.
            cwd: the child's working directory.

        Raises:
            ConfigError: the interpreter cannot be started.
        """
        return cls.start_command(engine_command(arguments, python), device=device, env=env, cwd=cwd)

    @classmethod
    def start_command(
        cls,
        command: Sequence[str],
        device: str = DEFAULT_DEVICE,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Job:
        """Start any ``command`` as a job, in the environment of :func:`child_environment`."""
        command = [str(part) for part in command]
        options: dict[str, Any] = {}
        if _WINDOWS:
            # Its own group so that it can be stopped on its own; no console window popping up over Slicer.
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            # Its own session: a Ctrl+C at the parent's terminal does not reach it, and its process group
            # gathers everything it starts, for cancel().
            options["start_new_session"] = True
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                env=child_environment(device, env),
                cwd=cwd,
                **options,
            )
        except OSError as error:
            raise ConfigError(f"cannot start {command[0]}: {error.strerror or error}") from error
        return cls(process, command)

    # -- reading the child --

    def _read_stdout(self, stream: IO[str] | None) -> None:
        if stream is None:
            return
        try:
            for line in stream:
                event = parse_event(line)
                if event is None:
                    text = line.rstrip("\r\n")
                    if not text.strip():
                        continue
                    event = {"event": EVENT_LOG, "message": text}
                with self._lock:
                    self._event_count += 1
                    kind = event.get("event")
                    if kind == EVENT_PROGRESS:
                        self._latest_progress = event
                    elif kind == EVENT_ERROR:
                        self._error_event = event
                    elif kind == EVENT_DONE:
                        result = event.get("result")
                        self._done_result = result if isinstance(result, dict) else {}
                self._events.put(event)
        except (OSError, ValueError):
            pass  # the pipe was closed under the reader
        finally:
            _close_quietly(stream)

    def _read_stderr(self, stream: IO[str] | None) -> None:
        if stream is None:
            return
        try:
            for line in stream:
                text = line.rstrip("\r\n")[:STDERR_LINE_CHARS]
                with self._lock:
                    self._stderr_tail.append(text)
                    self._stderr_chars += len(text) + 1
                    while len(self._stderr_tail) > STDERR_TAIL_LINES or (
                        self._stderr_chars > STDERR_TAIL_CHARS and len(self._stderr_tail) > 1
                    ):
                        self._stderr_chars -= len(self._stderr_tail.popleft()) + 1
        except (OSError, ValueError):
            pass
        finally:
            _close_quietly(stream)

    # -- state --

    @property
    def pid(self) -> int:
        """The child's process id (also the id of its process group on POSIX)."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """The child process has not exited yet."""
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The child's exit status, or None while it runs."""
        return self.process.poll()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` stopped the child while it still ran."""
        return self._cancelled

    @property
    def latest_progress(self) -> dict[str, Any] | None:
        """The last ``progress`` event received (whether or not :meth:`poll` has handed it out yet)."""
        with self._lock:
            return self._latest_progress

    @property
    def stage(self) -> str:
        """The stage of the latest progress event (``"segment"``, ``"iteration"``, ...), or ``""``."""
        progress = self.latest_progress
        return str(progress.get("stage", "")) if progress else ""

    def fraction(self) -> float | None:
        """How far the current stage is, in [0, 1], or None before any progress event with a known total."""
        progress = self.latest_progress
        if not progress:
            return None
        try:
            done, total = float(progress.get("done", 0)), float(progress.get("total", 0))
        except (TypeError, ValueError):
            return None
        if not total > 0:
            return None
        return min(max(done / total, 0.0), 1.0)

    def stderr_tail(self) -> str:
        """The last lines the child wrote on stderr (bounded; see :data:`STDERR_TAIL_LINES`)."""
        with self._lock:
            return "\n".join(self._stderr_tail)

    def poll(self) -> list[dict[str, Any]]:
        """The events that arrived since the last call, oldest first; never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    # -- control --

    def cancel(self, grace_seconds: float = 3.0) -> bool:
        """Stop the child and every process it started; return whether it was still running.

        The tree gets SIGTERM (TerminateProcess on Windows), and whatever still runs after ``grace_seconds``
        is killed. Marks the job cancelled when the child was still running; calling it again, or after the
        child has exited on its own, does nothing.
        """
        with self._lock:
            if self.process.poll() is not None:
                return False
            self._cancelled = True
        stop_child_tree(self.process, grace_seconds)
        return True

    def wait(
        self,
        timeout: float | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        grace_seconds: float = 3.0,
    ) -> JobResult:
        """Block until the child has exited and return how it ended.

        Events that arrive meanwhile (and those not yet taken by :meth:`poll`) go to ``on_event`` in order;
        without one they are dropped (the result still holds the ``done`` result and the error).
        When ``timeout`` seconds pass first, the job is cancelled (see :meth:`cancel`) and the result says
        ``cancelled`` and ``timed_out`` rather than raising, so callers handle every outcome in one place.
        If ``on_event`` raises, or the wait is interrupted (Ctrl+C), the child is cancelled before the
        exception goes on: a child in its own session would not see the terminal's Ctrl+C.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.process.poll() is None:
                if deadline is not None and time.monotonic() >= deadline:
                    # A child that exited at this very moment ended on its own and is not reported as timed out.
                    self._timeout_seconds = float(timeout or 0.0)
                    self._timed_out = self.cancel(grace_seconds)
                    break
                self._deliver(on_event, block_seconds=_POLL_INTERVAL)
            # The child has exited; what it wrote last is still being read.
            reader_deadline = time.monotonic() + READER_JOIN_SECONDS
            for reader in self._readers:
                reader.join(max(reader_deadline - time.monotonic(), 0.0))
            self._deliver(on_event, block_seconds=0.0)
        except BaseException:
            self.cancel(grace_seconds)
            raise
        return self._result()

    def _deliver(self, on_event: Callable[[dict[str, Any]], None] | None, block_seconds: float) -> None:
        if block_seconds > 0:
            try:
                first = self._events.get(timeout=block_seconds)
            except queue.Empty:
                return
            events = [first, *self.poll()]
        else:
            events = self.poll()
        if on_event is not None:
            for event in events:
                on_event(event)

    def _result(self) -> JobResult:
        returncode = self.process.poll()
        with self._lock:
            error_event = self._error_event
            result = dict(self._done_result or {})
            stderr = "\n".join(self._stderr_tail)
            lines = list(self._stderr_tail)
            events = self._event_count
            cancelled = self._cancelled
        exit_code, error = _outcome(returncode, cancelled, error_event, lines)
        if cancelled:
            error = f"timed out after {self._timeout_seconds:g} s" if self._timed_out else "cancelled by the user"
        return JobResult(
            returncode=returncode,
            cancelled=cancelled,
            timed_out=self._timed_out,
            result=result,
            error=error,
            exit_code=exit_code,
            stderr=stderr,
            events=events,
        )

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


def _outcome(
    returncode: int | None, cancelled: bool, error_event: dict[str, Any] | None, stderr_lines: list[str]
) -> tuple[int, str]:
    """The exit code in :mod:`cmedl.errors` terms and the one-line error of a finished child."""
    if cancelled:
        return CANCELLED_EXIT_CODE, ""
    if returncode is None or returncode == 0:
        return 0, ""
    lines = [line.strip() for line in stderr_lines if line.strip()]
    reported = [line for line in lines if _ERROR_PREFIX.match(line)]
    if error_event is not None and str(error_event.get("message", "")).strip():
        message = str(error_event["message"]).strip().splitlines()[0]
        try:
            exit_code = int(error_event.get("exit_code", returncode))
        except (TypeError, ValueError):
            exit_code = returncode
        return exit_code, message
    if returncode == 2 and any(line.startswith("usage:") for line in lines) and reported:
        # argparse refused the command line (exit 2 is also "no lungs found", which argparse never means).
        return InputError.exit_code, _ERROR_PREFIX.sub("", reported[-1])
    exit_code = 128 - returncode if returncode < 0 else returncode
    if reported:
        return exit_code, _ERROR_PREFIX.sub("", reported[-1])
    if returncode < 0:
        # Killed from outside (the out-of-memory killer, say): earlier output is no explanation.
        return exit_code, f"the engine was stopped by signal {_signal_name(-returncode)}"
    if lines:
        return exit_code, lines[-1]
    return exit_code, f"the engine stopped with exit code {returncode}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _close_quietly(stream: IO[str]) -> None:
    try:
        stream.close()
    except (OSError, ValueError):
        pass


# -- detached runs -----------------------------------------------------------------------------------


def start_detached(
    arguments: Sequence[str],
    log_path: str | os.PathLike[str],
    python: str | None = None,
    device: str = DEFAULT_DEVICE,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> int:
    """Start ``python -m cmedl ARGUMENTS`` so that it outlives this process; return its pid.

    Its stdout and stderr are appended to ``log_path`` (its folder is created); it reads nothing and runs in
    a session (on Windows, a detached process group) of its own, so closing Slicer or the terminal does not
    stop it. Keep the pid with :func:`cmedl.processes.process_create_time` to follow it with
    :func:`cmedl.processes.process_alive` and stop it with :func:`cmedl.processes.terminate_tree`.

    Raises:
        OutputError: the log file cannot be written.
        ConfigError: the interpreter cannot be started.
    """
    return start_detached_command(engine_command(arguments, python), log_path, device=device, env=env, cwd=cwd)


def start_detached_command(
    command: Sequence[str],
    log_path: str | os.PathLike[str],
    device: str = DEFAULT_DEVICE,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> int:
    """Start any ``command`` detached, like :func:`start_detached`; return its pid."""
    command = [str(part) for part in command]
    log_path = Path(log_path)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Closed again once the child has its own copy of the handle.
        log = open(log_path, "ab")
    except OSError as error:
        raise OutputError(f"cannot write the log {log_path}: {error.strerror or error}") from error
    options: dict[str, Any] = {}
    if _WINDOWS:
        options["creationflags"] = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        options["start_new_session"] = True
    try:
        with log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_environment(device, env),
                cwd=cwd,
                close_fds=True,
                **options,
            )
    except OSError as error:
        raise ConfigError(f"cannot start {command[0]}: {error.strerror or error}") from error
    remember_detached(process)
    return process.pid
