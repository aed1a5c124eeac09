"""What a run folder says about its run, read without torch and without talking to the training process.

Besides the trainer's files (``status.json``, ``metrics.jsonl``, ``previews/``, ``model.safetensors``,
``checkpoint.pt``; see :mod:`cmedl.training.runfolder`) a run started detached (:mod:`cmedl.training.launch`:
the Slicer panel's runs) has three more:

    launch.json    the configuration the run was started with (``cmedl train --config launch.json``)
    launcher.json  the process it started: pid, start time, command, mode (start or resume), log offset
    console.log    everything the process printed (the engine's one-line error included)

:func:`read_run` combines them into a :class:`RunSnapshot`: whether the process still runs (pid and its
start time, so a reused pid is not mistaken for the run), the state, the latest epoch, losses, previews,
and for a failed run the engine's one-line error. :func:`list_runs` finds the runs of a folder; ``cmedl runs``
and CMEDL Train list them with these. Nothing here writes to the folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmedl.errors import CMEDLError
from cmedl.processes import process_alive
from cmedl.training.runfolder import FAILED, FINISHED, RUNNING, STOPPED, RunFolder

LAUNCH_CONFIG = "launch.json"
LAUNCHER_RECORD = "launcher.json"
CONSOLE_LOG = "console.log"

STARTING, STOPPING, INTERRUPTED, UNKNOWN = "starting", "stopping", "interrupted", "unknown"
ENDED_STATES = (FINISHED, STOPPED, FAILED, INTERRUPTED)
_ERROR_LINE = re.compile(r"^cmedl(?: [\w-]+)?: error: (.*)$")
_PREVIEW = re.compile(r"^epoch_(\d+)\.png$")
LOG_TAIL_BYTES = 256 * 1024


@dataclass
class RunSnapshot:
    """One look at a run folder (see the module docstring)."""

    path: Path
    state: str
    alive: bool
    status: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    preview: Path | None = None
    preview_columns: list[str] = field(default_factory=list)
    model: Path | None = None
    checkpoint: bool = False
    error: str = ""
    launch: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        """The run's training method (``ct_only`` or ``cmedl``; ``""`` when its configuration is unreadable)."""
        return str(self.config.get("method", ""))

    @property
    def running(self) -> bool:
        return self.alive

    @property
    def resumable(self) -> bool:
        """A checkpoint exists and no process is working on the run."""
        return self.checkpoint and not self.alive

    @property
    def epoch(self) -> int:
        if self.metrics:
            return int(self.metrics[-1].get("epoch", 0))
        return int(self.status.get("epoch") or 0)

    @property
    def epochs(self) -> int:
        return int(self.status.get("epochs") or self.config.get("epochs") or 0)

    def fraction(self) -> float:
        """Share of the epochs done, in [0, 1]."""
        return min(max(self.epoch / self.epochs, 0.0), 1.0) if self.epochs else 0.0

    @property
    def best_validation_dice(self) -> float | None:
        value = self.status.get("best_validation_dice")
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        scores = [r.get("validation_dice") for r in self.metrics]
        scores = [float(s) for s in scores if isinstance(s, (int, float)) and math.isfinite(s)]
        return max(scores) if scores else None

    @property
    def best_epoch(self) -> int | None:
        value = self.status.get("best_epoch")
        return int(value) if isinstance(value, (int, float)) and value else None

    @property
    def last_losses(self) -> dict[str, float]:
        losses = self.status.get("last_losses")
        if isinstance(losses, dict) and losses:
            return {str(k): float(v) for k, v in losses.items() if isinstance(v, (int, float))}
        if self.metrics:
            last = self.metrics[-1]
            # A term without a number is null in metrics.jsonl (runfolder.finite_or_null): left out, not a crash.
            return {
                k[len("loss_") :]: float(v)
                for k, v in last.items()
                if k.startswith("loss_") and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        return {}

    @property
    def message(self) -> str:
        if self.alive and self.status.get("state") != RUNNING:
            return "resuming: reading the data" if self.launch.get("mode") == "resume" else "starting"
        return str(self.status.get("message", ""))

    def eta_text(self) -> str:
        eta = self.status.get("eta_seconds")
        if not self.alive or not isinstance(eta, (int, float)) or not math.isfinite(eta):
            return ""
        return format_duration(eta)

    def summary_line(self) -> str:
        """One line for the panel: state, epoch, ETA, best validation Dice (or the error)."""
        parts = [self.state]
        if self.epochs:
            parts.append(f"epoch {self.epoch}/{self.epochs}")
        eta = self.eta_text()
        if eta and self.state == RUNNING:
            parts.append(f"about {eta} left")
        best = self.best_validation_dice
        if best is not None:
            at = f" (epoch {self.best_epoch})" if self.best_epoch else ""
            parts.append(f"best validation Dice {best:.3f}{at}")
        line = ", ".join(parts)
        if self.state == FAILED and self.error:
            return f"{line}: {self.error}"
        message = self.message
        if message and self.state not in (FINISHED, FAILED):
            line += f" ({message})"
        return line

    def losses_text(self) -> str:
        return ", ".join(f"{name} {value:.4f}" for name, value in self.last_losses.items())


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def read_json_quietly(path: Path) -> dict[str, Any]:
    """A JSON object file's content, or ``{}`` when it is missing, being replaced or damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_launch_record(run_path: str | Path) -> dict[str, Any]:
    return read_json_quietly(Path(run_path) / LAUNCHER_RECORD)


def record_alive(record: dict[str, Any]) -> bool:
    """Whether the process a launcher record names still runs (and is that process, not a pid reuse)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    create_time = record.get("create_time")
    return process_alive(pid, float(create_time) if isinstance(create_time, (int, float)) else None)


def newest_preview(run_path: str | Path) -> Path | None:
    """The preview picture of the latest epoch (``previews/epoch_NNN.png``), or None."""
    folder = Path(run_path) / "previews"
    if not folder.is_dir():
        return None
    numbered = []
    for entry in folder.iterdir():
        match = _PREVIEW.match(entry.name)
        if match:
            numbered.append((int(match.group(1)), entry))
    return max(numbered)[1] if numbered else None


def engine_error(run_path: str | Path, offset: int = 0) -> str:
    """The last one-line error the engine printed (``cmedl: error: ...``) after byte ``offset`` of the log."""
    text = log_text(run_path, offset)
    for line in reversed(text.splitlines()):
        match = _ERROR_LINE.match(line.strip())
        if match:
            return match.group(1).strip()
    return ""


def log_text(run_path: str | Path, offset: int = 0, limit: int = LOG_TAIL_BYTES) -> str:
    """What the process printed since byte ``offset`` of ``console.log`` (at most the last ``limit`` bytes)."""
    path = Path(run_path) / CONSOLE_LOG
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            end = handle.tell()
            start = max(offset, end - limit, 0)
            handle.seek(start)
            data = handle.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _parse_time(value: Any) -> _dt.datetime | None:
    try:
        moment = _dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


def read_run(run_path: str | Path) -> RunSnapshot:
    """Look at the run in ``run_path`` (see :class:`RunSnapshot`); never raises for a damaged folder."""
    path = Path(run_path)
    folder = RunFolder(path)
    record = read_launch_record(path)
    status = read_json_quietly(folder.status_path)
    try:
        metrics = folder.read_metrics()
    except (OSError, CMEDLError):
        metrics = []
    config = read_json_quietly(folder.config_path) or read_json_quietly(path / LAUNCH_CONFIG)
    alive = record_alive(record)
    engine_state = str(status.get("state", ""))
    offset = int(record.get("log_offset") or 0)
    error = ""
    if alive:
        state = STOPPING if record.get("stop_requested") else RUNNING
    elif engine_state in (FINISHED, STOPPED, FAILED):
        state = engine_state
        # A launch that ended before writing any status (a resume refused at once) leaves the older status.
        launched, updated = _parse_time(record.get("started")), _parse_time(status.get("updated"))
        error_since_launch = engine_error(path, offset)
        if launched and updated and updated < launched and error_since_launch:
            state, error = FAILED, error_since_launch
    elif engine_state == RUNNING:
        state = INTERRUPTED
    elif record:
        state = FAILED
    else:
        state = UNKNOWN
    if state == FAILED and not error:
        error = engine_error(path, offset) or str(status.get("message", "")) or _last_line(log_text(path, offset))
        error = error or "the training process ended without a word; see the log"
    columns = read_json_quietly(path / "previews" / "columns.json").get("columns")
    return RunSnapshot(
        path=path,
        state=state,
        alive=alive,
        status=status,
        metrics=metrics,
        preview=newest_preview(path),
        preview_columns=[str(c) for c in columns] if isinstance(columns, list) else [],
        model=folder.model_path if folder.model_path.is_file() else None,
        checkpoint=folder.checkpoint_path.is_file(),
        error=error,
        launch=record,
        config=config,
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in (LAUNCHER_RECORD, "config.json", "status.json"))


def list_runs(root: str | Path) -> list[Path]:
    """The run folders directly inside ``root``, newest first (by their last change)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [entry for entry in root.iterdir() if not entry.name.startswith(".") and is_run_folder(entry)]

    def changed(run: Path) -> float:
        times = []
        for name in ("status.json", LAUNCHER_RECORD, "config.json", LAUNCH_CONFIG):
            try:
                times.append((run / name).stat().st_mtime)
            except OSError:
                continue
        return max(times, default=0.0)

    return sorted(runs, key=lambda run: (changed(run), run.name), reverse=True)
