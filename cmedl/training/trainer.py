"""The training loop shared by every method: data, validation, early stopping, checkpoints, resume.

One :class:`Trainer` runs one run folder. Each epoch it takes ``iterations_per_epoch`` steps of the
method's objective on random patches, validates the student on held-out CT (3D Dice on a fixed sample of each
case's lung and tumour slices, ``validation_slices_per_case``; see :meth:`Trainer._validate`), appends the epoch to
``metrics.jsonl`` (with the seconds it took and, of them, the validation's), rewrites ``status.json`` (whose
``stage`` says whether it is training or validating), writes a checkpoint atomically and, when validation Dice
improved, exports the student as ``model.safetensors``.

Before the data are read (minutes for many real CTs), a run tries what can fail without them: a resumed run loads
its checkpoint, and a CMEDL run its contextual loss's VGG16 weights. Every training image is checked as it is read
(:func:`cmedl.training.data.check_training_image`: finite voxels, and a CT that looks like one). A new run stores
its data paths absolute (:meth:`TrainConfig.with_absolute_paths`), so it can be resumed from any directory.

One process trains in a run folder at a time: rank 0 claims it (``run.lock``, :meth:`RunFolder.claim`) before
anything is written and gives it back when the run ends, however it ends. A folder whose run never finished an
epoch (no checkpoint) is started again in place: by the same command, or by ``--resume``.

A stop request is honoured within seconds in every phase: SIGTERM or SIGINT when the command line installed its
handlers (:mod:`cmedl.interrupts`), the progress's cancel event inside Slicer, or :meth:`Trainer.request_stop`.
Between training steps the run saves what it has (the checkpoint then holds the epoch's finished iterations, and
a resume continues with the next one); between validation slices it saves the epoch's training, and a resume
validates it; while the data are read there is nothing to save and the reading stops at once. The run then marks
itself ``stopped`` and can be resumed.

Under ``torchrun`` the same run is data-parallel (:mod:`cmedl.training.distributed`): every process samples
its own patches (numpy seed ``seed + rank``) and trains replicas whose gradients are averaged, so
``batch_size`` is per process and one iteration sees ``batch_size x world size`` patches. Rank 0 alone
creates and writes the run folder, validates and exports; the others wait for its word at the end of each
epoch. Stop requests and non-finite losses are shared every iteration, so all processes stop together.
Every process must see the data folders (and, to resume, the run folder) at the same paths.

A fine-tuning run (``config.init``, see :mod:`cmedl.training.finetune`) starts its networks from a model's or a
run's weights, with fresh optimisers; its configuration must fit that model (the trainer refuses one that does
not; :func:`cmedl.training.finetune.apply_init` fills the model's values in). ``run.json`` records the parent
model, so a resumed run still names it in the model cards it exports.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmedl import __version__, interrupts
from cmedl.cpu import ThreadChoice, is_cli_process, training_threads
from cmedl.devices import autocast_dtype, precision_name, resolve_device
from cmedl.errors import CancelledError, CMEDLError, ConfigError, InputError, Interrupted, OutputError, TrainingError
from cmedl.inference import InferenceEngine, fast_path_enabled
from cmedl.memory import available_ram_bytes
from cmedl.modelfile import ModelCard, save_model
from cmedl.patches import crop_centered, predict_slices
from cmedl.progress import Progress
from cmedl.training import distributed
from cmedl.training.augment import AugmentConfig
from cmedl.training.config import TrainConfig
from cmedl.training.data import (
    PatchSampler,
    PreparedVolume,
    ValidationSample,
    attach_paired,
    draw_batch,
    find_cases,
    prepare_volume,
    split_cases,
    validation_sample,
    weighted_dice,
)
from cmedl.training.finetune import InitSource, check_init, init_log_lines, initialise_networks, resolve_init
from cmedl.training.objectives import Objective, build_objective, contextual_loss_needs_vgg, load_contextual_vgg
from cmedl.training.runfolder import FAILED, FINISHED, RUNNING, STOPPED, RunFolder
from cmedl.training.volume_cache import PreparedVolumeCache
from cmedl.volumes import atomic_output, normalise_hu, normalise_mr


@dataclass
class Datasets:
    """The prepared volumes of a run and the file lists written to ``data.json``."""

    ct_training: list[PreparedVolume]
    ct_validation: list[PreparedVolume]
    mr: list[PreparedVolume]
    lists: dict[str, list[str]]


VALIDATION_MIN_BATCH = 8
# Values that may differ when a run that never finished an epoch is started again with the same configuration.
RESTART_MAY_DIFFER = ("out", "device", "cache_volumes")


@dataclass
class EpochSteps:
    """Where an epoch's training steps stand.

    Attributes:
        sums: every loss term summed over the epoch's finished iterations (each a mean over processes).
        iterations: the epoch's finished iterations, counting those of the run before a resume.
        steps_taken: of them, those taken in this session.
        stopped: a stop request ended the steps early.
    """

    sums: dict[str, float]
    iterations: int
    steps_taken: int
    stopped: bool

    def means(self) -> dict[str, float]:
        return {name: total / max(self.iterations, 1) for name, total in self.sums.items()}


class _ValidationStoppedError(Exception):
    """A stop request arrived between validation slices."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Trainer:
    """Runs (or resumes) one training run.

    Args:
        config: the run's configuration; ``config.out`` is the run folder.
        progress: receives epoch/iteration progress; its cancel event stops the run like a signal.
        resume: continue the run in ``config.out`` from its last checkpoint.
    """

    def __init__(self, config: TrainConfig, progress: Progress | None = None, resume: bool = False) -> None:
        # A new run keeps its data paths absolute, so that its config.json names the same files from any working
        # directory (a resume's paths were made absolute by resume_run).
        self.config = (config if resume else config.with_absolute_paths()).validate()
        self.progress = progress or Progress()
        self.resume = resume
        self.run = RunFolder(config.out)
        self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(self.device, config.amp)
        self._check_memory()
        self._stop = threading.Event()
        self.threads: ThreadChoice | None = None  # set by fit() on a CPU in the command-line process
        self.status: dict[str, Any] = {}
        # False in the data-parallel processes other than rank 0: they neither write the run folder nor report.
        self.main = True
        # A fine-tuning run checks its model before anything is written; a resumed one has its weights already.
        self.init_source: InitSource | None = None
        if self.config.init and not resume:
            self.init_source = resolve_init(self.config.init)
            check_init(self.config, self.init_source)
        # The parent model's card record (name, sha256, source), for the model cards this run exports.
        self.parent: dict[str, Any] | None = None

    @classmethod
    def resume_run(cls, run_path: str | Path, progress: Progress | None = None, **overrides: Any) -> Trainer:
        """A trainer for the run in ``run_path`` with its saved configuration (``overrides`` such as
        ``epochs`` or ``device`` may change it)."""
        run = RunFolder(run_path)
        run.check_is_run_folder()
        data = run.read_json("config.json")
        # A run started before validation sampling existed scored every slice: it keeps doing so, so that its
        # epochs stay comparable (an override may still change it).
        data.setdefault("validation_slices_per_case", 0)
        data.update({key: value for key, value in overrides.items() if value is not None})
        data["out"] = str(run_path)
        config = TrainConfig.from_dict(data)
        _check_relative_paths(config, run)
        return cls(config.with_absolute_paths(), progress=progress, resume=True)

    def request_stop(self) -> None:
        self._stop.set()

    def _should_stop(self) -> bool:
        cancel = self.progress.cancel
        return self._stop.is_set() or (cancel is not None and cancel.is_set()) or interrupts.stop_requested()

    def _stop_reason(self, shared: bool = False) -> str:
        """``stopped by SIGTERM`` (or ``stopped by the user``); ``shared``: the same words in every process (a
        collective call: only where all processes stop together)."""
        names = [interrupts.stop_signal_name()]
        if shared:
            names = distributed.all_gather_object(names[0])
        named = [name for name in names if name]
        return f"stopped by {named[0]}" if named else "stopped by the user"

    def _how_to_continue(self) -> str:
        if self.run.holds_run():
            return f"resume with cmedl train --resume {self.run.path}"
        return "start it again with the same command"

    def _report(self, stage: str, done: int, total: int, message: str = "") -> None:
        """Progress where a cancel request must not break off in the middle: it is taken as a stop request,
        which the loop honours at its next consistent point."""
        try:
            self.progress.update(stage, done, total, message)
        except CancelledError:
            self._stop.set()

    def _check_memory(self) -> None:
        """Refuse a batch that cannot fit in the device's free memory, before anything is allocated."""
        if self.device.type == "cuda":
            try:
                free: int | None = int(torch.cuda.mem_get_info(self.device)[0])
            except Exception:  # an old driver or a device that cannot say: no estimate
                free = None
            where = f"GPU memory ({self.device})"
        else:
            free, where = available_ram_bytes(), "RAM"
        problem = self.config.memory_problem(free, where, half_precision=self.amp_dtype is not None)
        if problem:
            raise ConfigError(problem)

    # -- set-up ---------------------------------------------------------------------------------------

    def _prepare_data(self) -> Datasets:
        config = self.config
        cases = find_cases(config.ct, require_labels=True)
        if config.validation:
            training_cases, validation_cases = cases, find_cases(config.validation, require_labels=True)
        else:
            training_cases, validation_cases = split_cases(cases, config.validation_fraction, config.seed)
        validation_cases = validation_cases[: config.validation_max_cases]
        mr_cases = find_cases(config.mr, require_labels=False) if config.method == "cmedl" else []

        def normalise_ct(values: np.ndarray) -> np.ndarray:
            return normalise_hu(values, config.hu_window)

        def normalise_mri(values: np.ndarray) -> np.ndarray:
            return normalise_mr(values, config.mr_percentile)

        jobs = [(case, normalise_ct) for case in training_cases + validation_cases]
        jobs += [(case, normalise_mri) for case in mr_cases]
        # Every process reads the run's cache of prepared volumes; rank 0 alone writes it.
        cache = None
        if config.cache_volumes:
            cache = PreparedVolumeCache(self.run.volume_cache_path, writable=self.main, log=self._log)
        prepared: list[PreparedVolume] = []
        from_cache = 0
        written_at = -math.inf
        for index, (case, normalise) in enumerate(jobs):
            # status.json says how far the preparation is (minutes for many real CTs); at most once a second.
            if time.monotonic() - written_at >= 1.0:
                self._write_stage("data", f"preparing data: case {index + 1} of {len(jobs)}")
                written_at = time.monotonic()
            self.progress.update("data", index, len(jobs), "cases")
            is_ct, label_value = normalise is normalise_ct, config.label_value
            prepare = functools.partial(
                prepare_volume, case, config.spacing_mm, normalise, is_ct=is_ct, label_value=label_value
            )
            if cache is None:
                volume = prepare()
            else:
                # What normalise_ct and normalise_mri depend on: part of the key.
                settings = {"hu_window": list(config.hu_window)} if is_ct else {"mr_percentile": config.mr_percentile}
                volume, cached = cache.prepared(case, config.spacing_mm, settings, is_ct, label_value, prepare)
                from_cache += cached
            prepared.append(volume)
        self.progress.update("data", len(jobs), len(jobs), "cases")
        if cache is not None:
            removed = cache.remove_unused()
            stale = f"; {removed} entr{'y' if removed == 1 else 'ies'} of changed files removed" if removed else ""
            self._log(f"data: {len(jobs)} case(s) prepared, {from_cache} of them from the run's cache{stale}")
        datasets = Datasets(
            ct_training=prepared[: len(training_cases)],
            ct_validation=prepared[len(training_cases) : len(training_cases) + len(validation_cases)],
            mr=prepared[len(training_cases) + len(validation_cases) :],
            lists={
                "ct_training": [str(case.image) for case in training_cases],
                "ct_validation": [str(case.image) for case in validation_cases],
                "mr": [str(case.image) for case in mr_cases],
                "mr_labelled": [str(case.image) for case in mr_cases if case.label is not None],
            },
        )
        if config.method == "cmedl" and config.teacher_input == "paired_mr":
            attach_paired(datasets.ct_training, training_cases, config.paired_mr, config.spacing_mm, normalise_mri)
        if not any(len(v.tumour_slices) for v in datasets.ct_training):
            raise TrainingError(
                f"none of the {len(datasets.ct_training)} training CT labels in {config.ct} contains a tumour"
            )
        return datasets

    def _load_contextual_vgg(self) -> torch.nn.Module | None:
        """The contextual loss's VGG16 (:func:`load_contextual_vgg`), loaded before the data so that missing weights
        fail at once; None where the run needs none or draws it at random. A download can take minutes: status.json
        says so, and a stop signal ends it at once (nothing to save yet)."""
        if not contextual_loss_needs_vgg(self.config) or self.config.vgg_weights == "random":
            return None
        self._write_stage("data", "loading the VGG16 weights of the contextual loss")
        with interrupts.interruptible():
            vgg, note = load_contextual_vgg(self.config)
        if note:
            self._log(note)
        return vgg

    def _prepare_data_interruptibly(self) -> Datasets:
        """Reading data holds nothing worth saving: a stop signal ends it at once. (Only the reading: a signal that
        arrives while the processes compare their outcomes is taken at the next step, with all of them.)"""
        with interrupts.interruptible():
            return self._prepare_data()

    def _write_run_files(self, data_lists: dict[str, list[str]]) -> None:
        self.run.write_json("config.json", self.config.to_dict())
        self.run.write_json("data.json", data_lists)
        self.run.write_json(
            "run.json",
            {
                "engine_version": __version__,
                "torch_version": torch.__version__,
                "python": platform.python_version(),
                "host": platform.node(),
                "seed": self.config.seed,
                "device": str(self.device),
                "world_size": distributed.world_size(),
                "amp": str(self.amp_dtype) if self.amp_dtype else "off",
                "started": _now(),
                **({"parent": self.parent} if self.parent else {}),
            },
        )

    # -- the run --------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Run until the last epoch, early stopping or a stop request; returns the final status.

        Under ``torchrun`` every process calls this; all of them end in the same state with the same message.
        """
        with distributed.process_group(self.device) as device:
            self.device = device
            if device.type == "cpu" and is_cli_process():
                # The command line owns its process; imported as a library the host's threads are left alone.
                self.threads = training_threads()
                torch.set_num_threads(self.threads.count)
            self.main = distributed.is_main_process()
            if not self.main:
                # One voice: rank 0 reports progress; the others keep only the cancel event.
                self.progress = Progress(self.progress.cancel)
            return self._fit()

    def _claim_run_folder(self) -> None:
        """Rank 0 claims the folder (:meth:`_claim`); every process then raises the same refusal, or takes the same
        decision to start a run that never finished an epoch again."""
        refusal: Exception | None = None
        restart, notes = False, []
        if self.main:
            try:
                restart, notes = self._claim()
            except Exception as error:
                refusal = error
        refusal, restart = distributed.broadcast_object((refusal, restart))
        if refusal is not None:
            raise refusal
        if restart:
            self.resume = False
            if self.config.init and self.init_source is None:
                self.init_source = resolve_init(self.config.init)
                check_init(self.config, self.init_source)
        for note in notes:
            self._log(note)

    def _claim(self) -> tuple[bool, list[str]]:
        """Rank 0: take the folder (refused while another process holds it), decide whether it holds a run to
        refuse, resume or start again, and remove what interrupted writes left. Returns (start again, log lines)."""
        run = self.run
        if self.resume:
            run.check_is_run_folder()
        else:
            run.make()
        run.claim()
        try:
            restart, notes = False, []
            if not self.resume and run.holds_run():
                if run.has_checkpoint():
                    raise InputError(
                        f"{run.path} already holds a run; resume it with cmedl train --resume {run.path} (add "
                        f"--epochs N to train longer) or choose another --out"
                    )
                differences = _config_differences(run.read_json("config.json"), self.config)
                if differences:
                    raise InputError(
                        f"{run.path} already holds a run that never finished an epoch, configured differently "
                        f"({differences}); start it again as configured there with cmedl train --resume {run.path}, "
                        f"or remove {run.path} or choose another --out for the new configuration"
                    )
                restart = True
                notes.append(f"{run.path} holds a run that never finished an epoch: starting it again from the start")
            elif self.resume and not run.has_checkpoint():
                restart = True
                notes.append(
                    f"{run.path} has no checkpoint (no epoch finished): starting it again from the beginning with its "
                    f"configuration"
                )
            if restart:
                run.clear_unfinished()
            removed = run.remove_partial_files()
            if removed:
                names = ", ".join(path.name for path in removed[:3]) + (" ..." if len(removed) > 3 else "")
                notes.append(f"removed {len(removed)} unfinished file(s) of an interrupted write: {names}")
            return restart, notes
        except BaseException:
            run.release()
            raise

    @staticmethod
    def _on_every_process(task: Callable[[], Any]) -> Any:
        """``task()``; when it fails with a user error in any process (a data folder missing on one node, say),
        every process raises that error instead of the others waiting for the failed one."""
        result, problem = None, None
        try:
            result = task()
        except (CMEDLError, Interrupted) as error:  # a stop signal in one process stops all of them here
            problem = error
        problems = [error for error in distributed.all_gather_object(problem) if error is not None]
        if problems:
            raise problems[0]
        return result

    def _fit(self) -> dict[str, Any]:
        try:
            self._claim_run_folder()
            return self._fit_claimed()
        finally:
            # However the run ends (a refusal after the claim, an error, a stop), the folder is given back.
            if self.main:
                self.run.release()

    def _fit_claimed(self) -> dict[str, Any]:
        try:
            self.status = {
                "state": RUNNING,
                "pid": os.getpid(),
                "world_size": distributed.world_size(),
                "stage": "data",
                "message": "preparing data",
                "updated": _now(),
            }
            if self.main:
                if self.resume:
                    # The pid is how CMEDL Train finds the process to stop: the previous one is gone.
                    try:
                        self.status = {**self.run.read_status(), **self.status}
                    except InputError:
                        pass  # no status.json, or a torn one: the new status replaces it
                self.run.write_status(self.status)
            if self.main and self.init_source is not None:
                self.parent = self.init_source.parent()
            elif self.main and self.resume and self.config.init:
                self.parent = self.run.read_json("run.json").get("parent")
            # What can fail without the data is tried before them: reading a large dataset takes minutes.
            resumed = self._on_every_process(self.run.load_checkpoint) if self.resume else None
            vgg = self._on_every_process(self._load_contextual_vgg)
            datasets = self._on_every_process(self._prepare_data_interruptibly)
            if not self.resume and self.main:
                self._write_run_files(datasets.lists)
            elif self.main:
                # A resume's overrides (more epochs, another device) are the run's configuration from now on: the
                # next plain --resume, the panels and `cmedl runs` read them from here.
                self.run.write_json("config.json", self.config.to_dict())
            return self._loop(datasets, resumed, vgg)
        except Interrupted as stop:
            return self._finish(STOPPED, f"stopped by {stop.signal_name} while preparing data, before training: "
                                         f"{self._how_to_continue()}")  # fmt: skip
        except CancelledError:
            return self._finish(STOPPED, f"stopped by the user while preparing data: {self._how_to_continue()}")
        except CMEDLError as error:
            self._finish(FAILED, str(error))
            raise
        except Exception as error:
            self._finish(FAILED, f"{type(error).__name__}: {error}")
            raise

    def _loop(
        self, datasets: Datasets, resumed: dict[str, Any] | None = None, vgg: torch.nn.Module | None = None
    ) -> dict[str, Any]:
        """Train from the start, or (``resumed``: the checkpoint, loaded before the data) from where it ends;
        ``vgg``: the contextual loss's network when it was loaded before the data."""
        config = self.config
        training, validation = datasets.ct_training, datasets.ct_validation
        rank = distributed.rank()
        # The same torch seed everywhere starts the replicas identical; each process draws its own patches.
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed + rank)
        objective = build_objective(config, self.device, self.amp_dtype, vgg=vgg)
        precision = precision_name(self.amp_dtype) + (" autocast" if self.amp_dtype is not None else "")
        threads = ""
        if self.device.type == "cpu":
            reason = self.threads.reason if self.threads else "left as the host process set them"
            threads = f", {torch.get_num_threads()} threads ({reason})"
        self._log(f"training on {self.device} in {precision} (amp {config.amp}), NCHW layout{threads}")
        if self.init_source is not None:
            loaded = initialise_networks(objective, self.init_source)
            for line in init_log_lines(config, self.init_source, loaded):
                self._log(line)
        augment = AugmentConfig() if config.augment else None
        samplers = {"ct": PatchSampler(training, config.patch_size, config.tumour_patch_fraction, augment, rng)}
        if "mr" in objective.domains:
            samplers["mr"] = PatchSampler(datasets.mr, config.patch_size, config.tumour_patch_fraction, augment, rng)
        preview_images = self._preview_patches(validation or training) if self.main else torch.zeros(0)
        # Drawn once: every epoch (and every resume) scores the same slices.
        validation_samples = self._validation_samples(validation) if self.main else []
        if not validation:
            self._log(self._no_validation_note(len(training)))
        undefined_dice_told = False
        first_epoch, best_dice, best_epoch, stale_epochs = 1, -math.inf, 0, 0
        # A checkpoint written by a stop in the middle of an epoch continues that epoch.
        first_iteration, carried_sums = 1, {}
        if self.resume:
            state = resumed if resumed is not None else self.run.load_checkpoint()
            objective.load_state_dict(state["objective"])
            finished = int(state["epoch"])
            first_epoch = finished + 1
            partial = state.get("partial") or {}
            if partial:
                first_iteration = int(partial["iteration"]) + 1
                carried_sums = {name: float(value) for name, value in partial["sums"].items()}
            # The checkpoint holds rank 0's sampling state (whatever the world size it was written with); the
            # other processes continue on fresh streams of their own.
            fresh = [config.seed, rank, first_epoch] + ([first_iteration] if partial else [])
            rng.bit_generator.state = (
                state["numpy_rng"] if rank == 0 else np.random.default_rng(fresh).bit_generator.state
            )
            torch.set_rng_state(state["torch_rng"])
            best_dice, best_epoch = float(state["best_dice"]), int(state["best_epoch"])
            stale_epochs = int(state["stale"])
            if self.main:
                self.run.truncate_metrics(finished)
            within = f", iteration {first_iteration - 1} of epoch {first_epoch}" if partial else ""
            self._log(f"resuming {self.run.path} after epoch {finished}{within}")
        if distributed.world_size() > 1:
            # Wrapped after the checkpoint is loaded: the wrappers start every process from rank 0's weights.
            objective.distribute(lambda module: distributed.wrap(module, self.device))

        def save_checkpoint(finished_epoch: int, partial: dict[str, Any] | None = None) -> None:
            if self.main:
                self.run.save_checkpoint(
                    {
                        "epoch": finished_epoch,
                        "partial": partial,
                        "objective": objective.state_dict(),
                        "numpy_rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(),
                        "best_dice": best_dice,
                        "best_epoch": best_epoch,
                        "stale": stale_epochs,
                    }
                )

        started = time.monotonic()
        epochs_this_session = 0
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_started = time.monotonic()
            self._write_stage("training", f"training epoch {epoch}/{config.epochs}")
            steps = self._train_epoch(objective, samplers, epoch, first_iteration, carried_sums)
            first_iteration, carried_sums = 1, {}
            if steps.stopped:
                reason = self._stop_reason(shared=True)
                if steps.steps_taken:
                    # The end of a step is a consistent state: keep it. (Without new steps the last checkpoint
                    # already holds this state.)
                    save_checkpoint(epoch - 1, {"epoch": epoch, "iteration": steps.iterations, "sums": steps.sums})
                if steps.iterations:
                    where = f"during epoch {epoch} after iteration {steps.iterations}/{config.iterations_per_epoch}"
                else:
                    where = f"after epoch {epoch - 1}" if epoch > 1 else "before the first step"
                return self._finish(STOPPED, f"{reason} {where}: {self._how_to_continue()}")
            losses = steps.means()
            distributed.average_buffers(objective.networks.values())
            if not self.main:
                # Rank 0 validates, writes and decides on early stopping; the others take its status and word.
                self.status, ending_state, ending = distributed.broadcast_object(None)
                if ending_state:
                    return self._finish(ending_state, ending)
                objective.end_epoch()
                continue
            validation_started = time.monotonic()
            try:
                validation_dice = (
                    self._validate(objective.student, validation, validation_samples, epoch)
                    if validation
                    else float("nan")
                )
            except _ValidationStoppedError:
                # The epoch's training is complete but not yet validated: a resume validates it first. The
                # learning-rate schedules have not moved on yet (end_epoch comes after validation).
                save_checkpoint(epoch - 1, {"epoch": epoch, "iteration": steps.iterations, "sums": steps.sums})
                message = f"{self._stop_reason()} while validating epoch {epoch}, its training saved: " + (
                    self._how_to_continue()
                )
                distributed.broadcast_object((self.status, STOPPED, message))
                return self._finish(STOPPED, message)
            validation_seconds = round(time.monotonic() - validation_started, 3)
            self._write_preview(objective, preview_images, epoch)
            # Without validation cases the latest student is the best we know.
            score = validation_dice if validation else float(epoch)
            improved = score > best_dice
            # Validation cases without tumour, where the student marks none either, give no Dice: until an epoch
            # scores, the latest student is exported (a run must not end without a model) and no epoch is stale.
            provisional = bool(validation) and math.isnan(validation_dice) and best_epoch == 0
            if improved:
                best_dice, best_epoch, stale_epochs = score, epoch, 0
            elif not provisional:
                stale_epochs += 1
            record = {
                "epoch": epoch,
                **{f"loss_{name}": value for name, value in losses.items()},
                "validation_dice": validation_dice,
                "seconds": round(time.monotonic() - epoch_started, 3),
                # Of those, the validation's (the rest is training, the preview and the epoch's files).
                "validation_seconds": validation_seconds,
                "time": _now(),
            }
            self.run.append_metrics(record)
            if improved or provisional:
                self._export(objective, epoch, validation_dice, datasets)
            # The schedules move on once the epoch is complete, just before its checkpoint.
            objective.end_epoch()
            save_checkpoint(epoch)
            epochs_this_session += 1
            per_epoch = (time.monotonic() - started) / epochs_this_session
            self.status = {
                "state": RUNNING,
                "pid": os.getpid(),
                "world_size": distributed.world_size(),
                "stage": "training",
                "epoch": epoch,
                "epochs": config.epochs,
                "iteration": config.iterations_per_epoch,
                "iterations_per_epoch": config.iterations_per_epoch,
                "last_losses": losses,
                "validation_dice": None if math.isnan(validation_dice) else validation_dice,
                "best_validation_dice": best_dice if validation else None,
                "best_epoch": best_epoch,
                "eta_seconds": round(per_epoch * (config.epochs - epoch), 1),
                "message": f"epoch {epoch}/{config.epochs}",
                "updated": _now(),
            }
            self.run.write_status(self.status)
            self._report("epoch", epoch, config.epochs, "epochs")
            terms = ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
            if math.isnan(validation_dice):
                self._log(f"epoch {epoch}: {terms}, no validation Dice")
                if validation and not undefined_dice_told:
                    undefined_dice_told = True
                    self._log(
                        f"validation Dice of epoch {epoch} is undefined: none of the {len(validation)} validation "
                        f"case(s) holds tumour in its scored slices and the model marks none there (metrics.jsonl "
                        f"records null); until an epoch scores, the latest student is exported"
                    )
            else:
                self._log(f"epoch {epoch}: {terms}, validation Dice {validation_dice:.4f}")
            ending = None
            if validation and stale_epochs >= config.early_stopping_patience:
                ending = f"early stopping after epoch {epoch}: best epoch {best_epoch}"
            distributed.broadcast_object((self.status, FINISHED if ending else None, ending))
            if ending:
                return self._finish(FINISHED, ending)
        # Only rank 0 tracked the best epoch; the others know it from the status it sent.
        best_epoch = self.status.get("best_epoch", best_epoch)
        return self._finish(FINISHED, f"finished {config.epochs} epochs; best epoch {best_epoch}")

    def _train_epoch(
        self,
        objective: Objective,
        samplers: dict[str, PatchSampler],
        epoch: int,
        first_iteration: int = 1,
        carried_sums: dict[str, float] | None = None,
    ) -> EpochSteps:
        """The epoch's steps from ``first_iteration`` on (a resume in the middle of an epoch carries the sums of the
        earlier ones), until the last or a stop request."""
        config = self.config
        objective.train()
        sums: dict[str, float] = {}
        finished, stopped = first_iteration - 1, False
        for iteration in range(first_iteration, config.iterations_per_epoch + 1):
            # A signal reaches one process (or some): all of them stop at the same iteration.
            if distributed.any_process(self._should_stop()):
                stopped = True
                break
            batch = draw_batch(samplers, objective.domains, config.batch_size)
            losses = objective.step(batch)
            bad = [name for name, value in losses.items() if not math.isfinite(value)]
            if distributed.any_process(bool(bad)):
                bad = sorted({name for names in distributed.all_gather_object(bad) for name in names})
                raise TrainingError(
                    f"loss {', '.join(bad)} became non-finite at epoch {epoch}, iteration {iteration}; "
                    f"the last good checkpoint is kept (try a lower learning rate or amp off)"
                )
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value
            finished = iteration
            self._report("iteration", iteration, config.iterations_per_epoch, f"epoch {epoch}")
        totals = dict(carried_sums or {})
        for name, value in distributed.mean_over_processes(sums).items():
            totals[name] = totals.get(name, 0.0) + value
        return EpochSteps(totals, finished, finished - first_iteration + 1, stopped)

    def _no_validation_note(self, training_cases: int) -> str:
        """The log line that says why a run has no validation cases, and what that means for its files (said once,
        where a line per epoch would say "nan")."""
        config = self.config
        if config.validation_fraction <= 0:
            why = "validation_fraction is 0 and no validation folder is given"
        else:
            why = (
                f"the CT folder {config.ct} holds {training_cases} case(s), too few to hold one back (at least 2 are "
                f"needed), and no validation folder is given (--set validation=DIR)"
            )
        return (
            f"validation: none, so no validation Dice ({why}); every epoch's model is exported as the latest, and "
            f"metrics.jsonl records validation_dice null"
        )

    def _validation_samples(self, volumes: list[PreparedVolume]) -> list[ValidationSample]:
        """The slices each validation case is scored on, drawn once per run (:func:`validation_sample`); logged."""
        count = self.config.validation_slices_per_case
        samples = [validation_sample(volume, count, self.config.seed) for volume in volumes]
        if samples:
            scored = sum(len(sample.slices) for sample in samples)
            available = sum(sample.range_slices for sample in samples)
            how = "every slice" if scored == available else f"a fixed sample of at most {count} slices per case"
            self._log(f"validation: {len(samples)} case(s), {scored} of {available} slices ({how})")
        return samples

    def _validate(
        self,
        network: torch.nn.Module,
        volumes: list[PreparedVolume],
        samples: list[ValidationSample],
        epoch: int = 0,
    ) -> float:
        """Mean over validation cases of the 3D Dice on each case's sample of slices (pooled as one volume,
        weighted by what each slice stands for: :func:`weighted_dice`). The sample spreads over every slice
        inference would see (the lung slices, and the tumour's), so false positives at the lung bases and apices
        count against a model.

        Progress: stage ``validation``, one unit per scored slice; ``status.json`` says the run is validating. A
        stop request is looked at before every slice (raising :class:`_ValidationStoppedError`): at a fine spacing
        one case alone can take minutes.
        """
        total = sum(len(sample.slices) for sample in samples)
        self._write_stage("validation", f"validating epoch {epoch}/{self.config.epochs} ({total} slices)")
        predict = validation_predictor(network, self.device, self.config.amp)
        done = 0
        scores = []
        for volume, sample in zip(volumes, samples):

            def slices(volume: PreparedVolume = volume, sample: ValidationSample = sample):
                nonlocal done
                for index, z in enumerate(sample.slices):
                    if self._should_stop():
                        raise _ValidationStoppedError
                    self._report("validation", done, total, f"epoch {epoch}")
                    done += 1
                    yield index, volume.image[z].astype(np.float32)

            predicted = np.zeros((len(sample.slices),) + volume.image.shape[1:], dtype=bool)
            for index, probabilities in predict(
                slices(),
                num_classes=2,
                patch=self.config.patch_size,
                overlap=self.config.validation_overlap,
                # Inference results do not depend on the batch (BatchNorm uses its running statistics), and
                # batches of 8 or more tiles run about twice as fast as training's small batches on a CPU.
                batch_size=max(VALIDATION_MIN_BATCH, self.config.batch_size),
            ):
                predicted[index] = probabilities[1] >= 0.5
            score = weighted_dice(predicted, volume.label[sample.slices] > 0, sample.weights)
            if not math.isnan(score):
                scores.append(score)
        self._report("validation", total, total, f"epoch {epoch}")
        return float(np.mean(scores)) if scores else float("nan")

    def _write_stage(self, stage: str, message: str) -> None:
        """Rank 0: ``status.json`` says what the run is doing now (``stage`` ``training`` or ``validation``)."""
        if self.main:
            self.status = {**self.status, "stage": stage, "message": message, "updated": _now()}
            self.run.write_status(self.status)

    def _preview_patches(self, volumes: list[PreparedVolume], count: int = 3) -> torch.Tensor:
        """Fixed CT patches ``(N, 1, P, P)`` through the middle of the first tumours, shown every epoch."""
        patches = []
        for volume in volumes:
            if len(volume.tumour_slices) == 0:
                continue
            z = int(volume.tumour_slices[len(volume.tumour_slices) // 2])
            rows, cols = np.nonzero(volume.label[z])
            centre = (int(rows.mean()), int(cols.mean()))
            patches.append(crop_centered(volume.image[z].astype(np.float32), centre, self.config.patch_size, -1.0))
            if len(patches) == count:
                break
        return torch.from_numpy(np.stack(patches)[:, None]) if patches else torch.zeros(0)

    def _write_preview(self, objective: Objective, images: torch.Tensor, epoch: int) -> None:
        """``previews/epoch_NNN.png``: one row per patch, one column per picture (CT, pseudo-MRI, predictions)."""
        if len(images) == 0:
            return
        pictures = objective.previews(images)
        rows = []
        for index in range(len(images)):
            tiles = []
            for name, batch in pictures.items():
                values = batch[index].numpy()
                if name in ("CT", "pseudo-MRI"):
                    values = (values + 1.0) / 2.0  # [-1, 1] -> [0, 1]
                tiles.append(np.clip(values, 0.0, 1.0))
            rows.append(np.concatenate(tiles, axis=1))
        picture = (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
        folder = self.run.path / "previews"
        folder.mkdir(exist_ok=True)
        with atomic_output(folder / f"epoch_{epoch:03d}.png") as temp:
            Image.fromarray(picture).save(temp, format="PNG")
        self.run.write_json("previews/columns.json", {"columns": list(pictures)})

    def _export(self, objective: Objective, epoch: int, validation_dice: float, datasets: Datasets) -> None:
        config = self.config
        training_data = {
            "ct_folder": str(config.ct),
            "ct_training_cases": len(datasets.ct_training),
            "ct_validation_cases": len(datasets.ct_validation),
        }
        if datasets.mr:
            training_data.update(
                {
                    "mr_folder": str(config.mr),
                    "mr_cases": len(datasets.mr),
                    "mr_labelled_cases": len(datasets.lists["mr_labelled"]),
                    "paired": False,
                }
            )
        card = ModelCard(
            name=config.name or f"{config.method}-{config.segmentor}-{Path(config.out).name}",
            architecture=config.segmentor,
            architecture_options=dict(config.segmentor_options),
            method=config.method,
            hu_window=tuple(config.hu_window),
            spacing_mm=tuple(config.spacing_mm),
            patch_size=config.patch_size,
            training_data=training_data,
            training={
                "epoch": epoch,
                "epochs": config.epochs,
                "iterations_per_epoch": config.iterations_per_epoch,
                "batch_size": config.batch_size,
                "lr_segmentor": config.lr_segmentor,
                "seed": config.seed,
                "world_size": distributed.world_size(),
                "augment": config.augment,
                **objective.card_details(),
                **self._fine_tuning_details(),
            },
            metrics={"validation_dice": None if math.isnan(validation_dice) else round(validation_dice, 4)},
            license=config.license,
            parent=self.parent if config.init else None,
            fine_tuned_on=training_data if config.init else None,
        )
        save_model(self.run.model_path, objective.student, card)
        objective.export_extras(self.run.path, card)

    def _fine_tuning_details(self) -> dict[str, Any]:
        """The fine-tuning values of the model card's ``training`` (none for a run from scratch, as before)."""
        config = self.config
        details: dict[str, Any] = {}
        if config.init:
            details.update(init=config.init, freeze_encoder_epochs=config.freeze_encoder_epochs)
        if config.warmup_epochs:
            details["warmup_epochs"] = config.warmup_epochs
        return details

    def _finish(self, state: str, message: str) -> dict[str, Any]:
        self.status = {**self.status, "state": state, "message": message, "pid": os.getpid(), "updated": _now()}
        self.status.pop("stage", None)  # the state says it: nothing runs any more
        if self.main and self.run.path.is_dir():
            try:
                self.run.write_status(self.status)
            except OutputError:
                if state != FAILED:
                    raise
                # Already failing (a full disk, say): the error the caller reports says more than the status.
        # A failure reaches the user once, as the error the caller reports; the log keeps it too.
        self._log(message, tell=state != FAILED)
        return self.status

    def _log(self, message: str, tell: bool = True) -> None:
        """Tell the listener and keep the line in the run's ``train.log``."""
        if not self.main:
            return
        if tell:
            self.progress.log(message)
        if self.run.path.is_dir():
            try:
                with open(self.run.log_path, "a", encoding="utf-8") as handle:
                    handle.write(f"{_now()} {message}\n")
            except OSError:
                pass  # the log is a copy of what was reported; a full disk shows in the run's other files


def validation_predictor(
    network: torch.nn.Module, device: torch.device, amp: str = "auto", fast: bool | None = None
) -> Callable[..., Iterator[tuple[Any, np.ndarray]]]:
    """What validation runs the student with: ``predict(slices, num_classes, patch, overlap, batch_size)``, yielding
    ``(key, probabilities)`` as :func:`cmedl.patches.predict_slices` does.

    The fast path (``fast`` None: unless ``CMEDL_FAST_PATH=0``) is :class:`cmedl.inference.InferenceEngine`'s, on
    training-size tiles so that the score is that of ``cmedl segment``: a copy of ``network`` with its BatchNorm
    folded, in channels_last, made here and dropped with the returned function; the same probabilities as
    ``network`` in evaluation mode to float tolerance. Reduced precision only where the hardware runs it natively
    (:func:`cmedl.inference.choose_precision`), and never with ``amp`` ``off``. The reference path is ``network``
    itself in evaluation mode, in fp32. ``network`` keeps its weights either way.
    """
    if not (fast_path_enabled() if fast is None else fast):
        network.eval()
        return functools.partial(predict_slices, network, device=device)
    engine = InferenceEngine(
        network,
        device,
        precision_mode="fp32" if amp == "off" else "auto",
        tiles="training",
        # The count training runs with: the engine must not choose its own in the middle of a run.
        threads=torch.get_num_threads(),
    )
    return engine.predict


def _config_differences(saved: dict[str, Any], config: TrainConfig, shown: int = 3) -> str:
    """The values in which ``config`` differs from a run folder's saved configuration (``key old -> new``, the
    first ``shown``), ignoring :data:`RESTART_MAY_DIFFER`; ``""`` when it is the same run."""
    try:
        # A run saved with relative paths (older versions) is compared as seen from here.
        before = TrainConfig.from_dict({key: value for key, value in saved.items() if key != "out"})
        before = before.with_absolute_paths().to_dict()
    except ConfigError:
        return "its config.json is not a valid configuration"
    now = config.with_absolute_paths().to_dict()
    keys = [key for key in now if key not in RESTART_MAY_DIFFER and before.get(key) != now[key]]
    listed = ", ".join(f"{key} {before.get(key)!r} -> {now[key]!r}" for key in keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _check_relative_paths(config: TrainConfig, run: RunFolder) -> None:
    """Refuse to resume, from a directory where they are not found, a run whose ``config.json`` holds relative data
    paths (older versions stored them as given): they are relative to the directory the run was started in, and
    the plain "not found" would not say so. Found from here, they are used, and stored absolute from then on."""
    relative = config.relative_paths_in_use()
    missing = {key: value for key, value in relative.items() if not Path(value).expanduser().exists()}
    if missing:
        key, value = next(iter(missing.items()))
        raise InputError(
            f"{run.config_path} holds the relative path {key} {value!r}, which is not found from {Path.cwd()}: "
            f"resume from the directory the run was started in (its paths are then stored absolute)"
        )
