"""Starting, resuming and stopping a training run as a detached process, and registering its model.

A run is a process of its own (``python -m cmedl train --config RUN/launch.json``, or the same under
``torchrun`` for several GPUs) started detached, so that it keeps training while its starter (CMEDL Train,
Slicer itself) is closed; it is followed only through the run folder (:mod:`cmedl.training.runs`). The launch
records the process's pid and start time in ``RUN/launcher.json``, which is how a restarted Slicer, or
``cmedl runs`` in a shell, finds the run again.

Stopping asks politely (SIGTERM): the engine finishes the current iteration, keeps the checkpoint of the
last finished epoch, writes ``stopped`` into ``status.json`` and exits, and a reader sees that on its next
look. Nothing here waits for the process, except :func:`wait_for_run`, meant for scripts and tests. Importing
this module imports neither torch nor psutil (psutil is imported where a process is stopped).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cmedl.devices import DEFAULT_DEVICE, DEVICES
from cmedl.errors import InputError
from cmedl.jobs import start_detached, start_detached_command
from cmedl.processes import process_create_time, terminate_tree
from cmedl.training.runfolder import RunFolder
from cmedl.training.runs import (
    CONSOLE_LOG,
    LAUNCH_CONFIG,
    LAUNCHER_RECORD,
    RunSnapshot,
    read_json_quietly,
    read_launch_record,
    read_run,
    record_alive,
)

if TYPE_CHECKING:
    from cmedl.catalogue import ModelEntry
    from cmedl.training.config import TrainConfig

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_run_name(method: str, segmentor: str) -> str:
    """``<method>-<segmentor>-<date>-<time>``, unique to the second."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{method.replace('_', '-')}-{segmentor}-{stamp}"


def new_run_folder(runs_root: str | Path, name: str) -> Path:
    """Create ``runs_root/name`` for a new run; an existing, non-empty folder is refused."""
    if not _RUN_NAME.fullmatch(name):
        raise InputError(f"{name!r} is not a usable run name: use letters, digits, '.', '_' or '-'")
    if not str(runs_root).strip():
        raise InputError("choose the folder that holds the runs")
    path = Path(runs_root).expanduser().absolute() / name
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{path} already exists; choose another run name, or resume that run")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the run folder {path}: {error.strerror or error}") from None
    return path


def training_command(arguments: list[str], python: str, gpus: int) -> list[str] | None:
    """The torchrun command for ``gpus`` > 1 processes on this machine, or None for a plain process."""
    if gpus <= 1:
        return None
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), "-m", "cmedl",
            *arguments]  # fmt: skip


def start_run(
    run_path: str | Path,
    config: TrainConfig,
    python: str,
    gpus: int = 1,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start training ``config`` in the new run folder ``run_path``, detached; returns the process's pid.

    The configuration (named after the folder unless it has a name) is written as ``launch.json`` and the run
    is ``cmedl train --config launch.json``. The caller has validated it and made the folder
    (:func:`new_run_folder`), and removes the folder again when this raises.
    """
    run_path = Path(run_path)
    if not config.name:
        config = dataclasses.replace(config, name=run_path.name)
    RunFolder(run_path).write_json(LAUNCH_CONFIG, config.to_dict())
    arguments = ["train", "--config", str(run_path / LAUNCH_CONFIG)]
    return _launch(run_path, arguments, python, config.device, gpus, env, mode="start")


def resume_training(
    run_path: str | Path,
    python: str,
    epochs: int | None = None,
    device: str | None = None,
    gpus: int = 1,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Continue the run in ``run_path`` from its last checkpoint (``epochs`` may raise its epoch count)."""
    run_path = Path(run_path).absolute()
    snapshot = read_run(run_path)
    if snapshot.alive:
        raise InputError(f"{run_path.name} is still running")
    # Without a checkpoint (stopped during its first epoch) the engine restarts the run from its saved
    # configuration, so resuming is still the right action; without that configuration there is no run.
    if not snapshot.checkpoint and not snapshot.config:
        raise InputError(f"{run_path.name} has no checkpoint and no saved configuration: nothing to resume")
    arguments = ["train", "--resume", str(run_path)]
    if epochs:
        arguments += ["--epochs", str(int(epochs))]
    if device:
        arguments += ["--device", device]
    configured_device = str(snapshot.config.get("device", DEFAULT_DEVICE))
    _launch(run_path, arguments, python, device or configured_device, gpus, env, mode="resume")
    return run_path


def _launch(
    run_path: Path,
    arguments: list[str],
    python: str,
    device: str,
    gpus: int,
    env: Mapping[str, str] | None,
    mode: str,
) -> int:
    log_path = run_path / CONSOLE_LOG
    try:
        offset = log_path.stat().st_size
    except OSError:
        offset = 0
    previous = read_launch_record(run_path)
    command = training_command(arguments, python, gpus)
    # The child's environment knows the device names only (cuda:N picks its GPU inside the run).
    child_device = device if device in DEVICES else DEFAULT_DEVICE
    if command is None:
        pid = start_detached(arguments, log_path, python=python, device=child_device, env=env, cwd=run_path)
        command = [python, "-m", "cmedl", *arguments]
    else:
        pid = start_detached_command(command, log_path, device=child_device, env=env, cwd=run_path)
    record = {
        "pid": pid,
        "create_time": process_create_time(pid),
        "command": command,
        "mode": mode,
        "gpus": gpus,
        "started": _now(),
        "log_offset": offset,
        "history": [*previous.get("history", []), *([_without_history(previous)] if previous else [])],
    }
    try:
        RunFolder(run_path).write_json(LAUNCHER_RECORD, record)
    except BaseException:
        # A run nobody could find again must not go on in the background.
        terminate_tree(pid, grace_seconds=5.0, create_time=record["create_time"])
        raise
    return pid


def _without_history(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "history"}


def request_stop(run_path: str | Path) -> bool:
    """Ask the run's process to stop after its current iteration (SIGTERM); False when it is not running.

    The engine keeps the checkpoint of the last finished epoch and marks the run ``stopped``; follow it with
    :func:`cmedl.training.runs.read_run` (state ``stopping`` until the process has exited). Windows has no
    polite request: the process ends at once and the run reads ``interrupted``, resumable from its last
    finished epoch.
    """
    import psutil  # here, not at import time: the panel lists runs before psutil is installed

    run_path = Path(run_path)
    record = read_launch_record(run_path)
    if not record_alive(record):
        return False
    try:
        psutil.Process(_stop_target(run_path, int(record["pid"]))).terminate()
    except psutil.NoSuchProcess:
        return False
    record["stop_requested"] = _now()
    RunFolder(run_path).write_json(LAUNCHER_RECORD, record)
    return True


def _stop_target(run_path: Path, pid: int) -> int:
    """The process to ask: under torchrun the rank-0 worker (it tells the others, and torchrun then ends
    normally), found as the pid in ``status.json`` when that is a descendant of the launched process."""
    import psutil

    worker = read_json_quietly(RunFolder(run_path).status_path).get("pid")
    if not isinstance(worker, int) or worker == pid:
        return pid
    try:
        descendants = {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return pid
    return worker if worker in descendants else pid


def kill_run(run_path: str | Path, grace_seconds: float = 10.0) -> bool:
    """Stop the run's process and everything it started now (what the current epoch did is lost)."""
    record = read_launch_record(run_path)
    if not record_alive(record):
        return False
    create_time = record.get("create_time")
    return terminate_tree(int(record["pid"]), grace_seconds=grace_seconds, create_time=create_time)


def wait_for_run(run_path: str | Path, timeout: float = 600.0, interval: float = 0.25) -> RunSnapshot:
    """Block until the run's process has ended (or ``timeout`` seconds); returns the last snapshot."""
    deadline = time.monotonic() + timeout
    snapshot = read_run(run_path)
    while snapshot.alive and time.monotonic() < deadline:
        time.sleep(interval)
        snapshot = read_run(run_path)
    return snapshot


def model_name_for(run_path: str | Path) -> str:
    """The name a run's model is registered under: the run's name, made a valid model name."""
    run_path = Path(run_path)
    config = read_json_quietly(run_path / "config.json") or read_json_quietly(run_path / LAUNCH_CONFIG)
    name = str(config.get("name") or run_path.name)
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "cmedl-model"
    return cleaned


def register_model(run_path: str | Path, name: str | None = None, overwrite: bool = False) -> ModelEntry:
    """Add the run's best model (``model.safetensors``) to the user's models; returns the catalogue entry.

    It is then offered by CMEDL Segment and ``cmedl models list`` under ``name`` (default: the run's name).
    """
    from cmedl.catalogue import add_model

    model = RunFolder(run_path).model_path
    if not model.is_file():
        raise InputError(f"{Path(run_path).name} has no model yet: it appears once the first epoch is validated")
    return add_model(model, name=name or model_name_for(run_path), overwrite=overwrite)
