"""Starting a training run from the panel's values: a new run folder, its configuration, the detached process.

Everything else about runs is the engine's and needs neither Qt nor Slicer: reading a run folder
(:mod:`cmedl.training.runs`), and resuming, stopping and registering a run's model (:mod:`cmedl.training.launch`);
``cmedl runs`` lists the same runs in a shell. What is the panel's own is turning its values and data folders
into the run's configuration (:mod:`.settings`), with the data links it makes in the new folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from cmedl.errors import ConfigError
from cmedl.training.launch import default_run_name, new_run_folder, start_run
from CMEDLTrainLib.settings import DataFolders, TrainingSettings, settings_problem, training_config


def start_training(
    settings: TrainingSettings,
    folders: DataFolders,
    runs_root: str | Path,
    python: str,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Create a new run folder, write its configuration and start training in it, detached.

    Returns the run folder. Inconsistent settings are refused (``ConfigError`` with the engine's message)
    before the folder is created; if the process cannot be started, the new folder is removed again.
    """
    problem = settings_problem(settings, folders)
    if problem:
        raise ConfigError(problem)
    run_path = new_run_folder(runs_root, settings.name or default_run_name(settings.method, settings.segmentor))
    try:
        start_run(run_path, training_config(settings, folders, run_path), python, settings.gpus, env)
    except BaseException:
        shutil.rmtree(run_path, ignore_errors=True)
        raise
    return run_path
