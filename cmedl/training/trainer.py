"""The training loop shared by every method: data, validation, early stopping, checkpoints, resume.

One :class:`Trainer` runs one run folder. Each epoch it takes ``iterations_per_epoch`` steps of the
method's objective on random patches, validates the student on held-out CT (3D Dice over the tumour's
slices), appends the epoch to ``metrics.jsonl``, rewrites ``status.json``, writes a checkpoint atomically
and, when validation Dice improved, exports the student as ``model.safetensors``.

A stop request (SIGTERM or SIGINT, or :meth:`Trainer.request_stop`) is honoured between iterations: the
run saves its state as of the last finished epoch, marks itself ``stopped`` and can be resumed.

Under ``torchrun`` the same run is data-parallel (:mod:`cmedl.training.distributed`): every process samples
its own patches (numpy seed ``seed + rank``) and trains replicas whose gradients are averaged, so
``batch_size`` is per process and one iteration sees ``batch_size x world size`` patches. Rank 0 alone
creates and writes the run folder, validates and exports; the others wait for its word at the end of each
epoch. Stop requests and non-finite losses are shared every iteration, so all processes stop together.
Every process must see the data folders (and, to resume, the run folder) at the same paths.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmedl import __version__
from cmedl.devices import autocast_dtype, resolve_device
from cmedl.errors import CancelledError, CMEDLError, TrainingError
from cmedl.metrics import dice
from cmedl.modelfile import ModelCard, save_model
from cmedl.patches import crop_centered, predict_slices
from cmedl.progress import Progress
from cmedl.training import distributed
from cmedl.training.augment import AugmentConfig
from cmedl.training.config import TrainConfig
from cmedl.training.data import (
    PatchSampler,
    PreparedVolume,
    attach_paired,
    draw_batch,
    find_cases,
    prepare_volume,
    split_cases,
)
from cmedl.training.objectives import Objective, build_objective
from cmedl.training.runfolder import FAILED, FINISHED, RUNNING, STOPPED, RunFolder
from cmedl.volumes import atomic_output, normalise_hu, normalise_mr


@dataclass
class Datasets:
    """The prepared volumes of a run and the file lists written to ``data.json``."""

    ct_training: list[PreparedVolume]
    ct_validation: list[PreparedVolume]
    mr: list[PreparedVolume]
    lists: dict[str, list[str]]


VALIDATION_MIN_BATCH = 8


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
        self.config = config.validate()
        self.progress = progress or Progress()
        self.resume = resume
        self.run = RunFolder(config.out)
        self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(self.device, config.amp)
        self._stop = threading.Event()
        self.status: dict[str, Any] = {}
        # False in the data-parallel processes other than rank 0: they neither write the run folder nor report.
        self.main = True

    @classmethod
    def resume_run(cls, run_path: str | Path, progress: Progress | None = None, **overrides: Any) -> Trainer:
        """A trainer for the run in ``run_path`` with its saved configuration (``overrides`` such as
        ``epochs`` or ``device`` may change it)."""
        run = RunFolder(run_path)
        data = run.read_json("config.json")
        data.update({key: value for key, value in overrides.items() if value is not None})
        data["out"] = str(run_path)
        return cls(TrainConfig.from_dict(data), progress=progress, resume=True)

    def request_stop(self) -> None:
        self._stop.set()

    def _should_stop(self) -> bool:
        cancel = self.progress.cancel
        return self._stop.is_set() or (cancel is not None and cancel.is_set())

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
        prepared: list[PreparedVolume] = []
        for index, (case, normalise) in enumerate(jobs):
            self.progress.update("data", index, len(jobs), "cases")
            prepared.append(prepare_volume(case, config.spacing_mm, normalise, is_ct=normalise is normalise_ct))
        self.progress.update("data", len(jobs), len(jobs), "cases")
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
            },
        )

    # -- the run --------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Run until the last epoch, early stopping or a stop request; returns the final status.

        Under ``torchrun`` every process calls this; all of them end in the same state with the same message.
        """
        with distributed.process_group(self.device) as device:
            self.device = device
            self.main = distributed.is_main_process()
            if not self.main:
                # One voice: rank 0 reports progress; the others keep only the cancel event.
                self.progress = Progress(self.progress.cancel)
            return self._fit()

    def _create_run_folder(self) -> None:
        """Rank 0 creates the folder (or refuses an existing run); every process raises the same refusal."""
        refusal: Exception | None = None
        if self.main:
            try:
                self.run.create()
            except Exception as error:
                refusal = error
        refusal = distributed.broadcast_object(refusal)
        if refusal is not None:
            raise refusal

    @staticmethod
    def _on_every_process(task: Callable[[], Any]) -> Any:
        """``task()``; when it fails with a user error in any process (a data folder missing on one node, say),
        every process raises that error instead of the others waiting for the failed one."""
        result, problem = None, None
        try:
            result = task()
        except CMEDLError as error:
            problem = error
        problems = [error for error in distributed.all_gather_object(problem) if error is not None]
        if problems:
            raise problems[0]
        return result

    def _fit(self) -> dict[str, Any]:
        if not self.resume:
            self._create_run_folder()
        previous_handlers = self._install_signal_handlers()
        try:
            self.status = {
                "state": RUNNING,
                "pid": os.getpid(),
                "world_size": distributed.world_size(),
                "message": "preparing data",
                "updated": _now(),
            }
            if not self.resume and self.main:
                self.run.write_status(self.status)
            datasets = self._on_every_process(self._prepare_data)
            if not self.resume and self.main:
                self._write_run_files(datasets.lists)
            return self._loop(datasets)
        except CancelledError:
            return self._finish(STOPPED, "stopped by the user")
        except CMEDLError as error:
            self._finish(FAILED, str(error))
            raise
        except Exception as error:
            self._finish(FAILED, f"{type(error).__name__}: {error}")
            raise
        finally:
            self._restore_signal_handlers(previous_handlers)

    def _loop(self, datasets: Datasets) -> dict[str, Any]:
        config = self.config
        training, validation = datasets.ct_training, datasets.ct_validation
        rank = distributed.rank()
        # The same torch seed everywhere starts the replicas identical; each process draws its own patches.
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed + rank)
        objective = build_objective(config, self.device, self.amp_dtype)
        augment = AugmentConfig() if config.augment else None
        samplers = {"ct": PatchSampler(training, config.patch_size, config.tumour_patch_fraction, augment, rng)}
        if "mr" in objective.domains:
            samplers["mr"] = PatchSampler(datasets.mr, config.patch_size, config.tumour_patch_fraction, augment, rng)
        preview_images = self._preview_patches(validation or training) if self.main else torch.zeros(0)
        first_epoch, best_dice, best_epoch, stale_epochs = 1, -math.inf, 0, 0
        if self.resume:
            state = self.run.load_checkpoint()
            objective.load_state_dict(state["objective"])
            first_epoch = int(state["epoch"]) + 1
            # The checkpoint holds rank 0's sampling state (whatever the world size it was written with); the
            # other processes continue on fresh streams of their own.
            rng.bit_generator.state = (
                state["numpy_rng"]
                if rank == 0
                else np.random.default_rng([config.seed, rank, first_epoch]).bit_generator.state
            )
            torch.set_rng_state(state["torch_rng"])
            best_dice, best_epoch = float(state["best_dice"]), int(state["best_epoch"])
            stale_epochs = int(state["stale"])
            if self.main:
                self.run.truncate_metrics(int(state["epoch"]))
            self._log(f"resuming {self.run.path} after epoch {state['epoch']}")
        if distributed.world_size() > 1:
            # Wrapped after the checkpoint is loaded: the wrappers start every process from rank 0's weights.
            objective.distribute(lambda module: distributed.wrap(module, self.device))

        started = time.monotonic()
        epochs_this_session = 0
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_started = time.monotonic()
            losses = self._train_epoch(objective, samplers, epoch)
            if losses is None:
                return self._finish(STOPPED, f"stopped during epoch {epoch}; resume continues after epoch {epoch - 1}")
            objective.end_epoch()
            distributed.average_buffers(objective.networks.values())
            if not self.main:
                # Rank 0 validates, writes and decides on early stopping; the others take its status and word.
                self.status, ending = distributed.broadcast_object(None)
                if ending:
                    return self._finish(FINISHED, ending)
                continue
            validation_dice = self._validate(objective.student, validation) if validation else float("nan")
            self._write_preview(objective, preview_images, epoch)
            # Without validation cases the latest student is the best we know.
            score = validation_dice if validation else float(epoch)
            improved = score > best_dice
            if improved:
                best_dice, best_epoch, stale_epochs = score, epoch, 0
            else:
                stale_epochs += 1
            record = {
                "epoch": epoch,
                **{f"loss_{name}": value for name, value in losses.items()},
                "validation_dice": validation_dice,
                "seconds": round(time.monotonic() - epoch_started, 3),
                "time": _now(),
            }
            self.run.append_metrics(record)
            if improved:
                self._export(objective, epoch, validation_dice, datasets)
            self.run.save_checkpoint(
                {
                    "epoch": epoch,
                    "objective": objective.state_dict(),
                    "numpy_rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "best_dice": best_dice,
                    "best_epoch": best_epoch,
                    "stale": stale_epochs,
                }
            )
            epochs_this_session += 1
            per_epoch = (time.monotonic() - started) / epochs_this_session
            self.status = {
                "state": RUNNING,
                "pid": os.getpid(),
                "world_size": distributed.world_size(),
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
            self.progress.update("epoch", epoch, config.epochs, "epochs")
            terms = ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
            self._log(f"epoch {epoch}: {terms}, validation Dice {validation_dice:.4f}")
            ending = None
            if validation and stale_epochs >= config.early_stopping_patience:
                ending = f"early stopping after epoch {epoch}: best epoch {best_epoch}"
            distributed.broadcast_object((self.status, ending))
            if ending:
                return self._finish(FINISHED, ending)
        # Only rank 0 tracked the best epoch; the others know it from the status it sent.
        best_epoch = self.status.get("best_epoch", best_epoch)
        return self._finish(FINISHED, f"finished {config.epochs} epochs; best epoch {best_epoch}")

    def _train_epoch(self, objective: Objective, samplers: dict[str, PatchSampler], epoch: int) -> dict | None:
        """Average loss terms over one epoch, or None when a stop was requested."""
        config = self.config
        objective.train()
        sums: dict[str, float] = {}
        for iteration in range(1, config.iterations_per_epoch + 1):
            # A signal reaches one process (or some): all of them stop at the same iteration.
            if distributed.any_process(self._should_stop()):
                return None
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
            self.progress.update("iteration", iteration, config.iterations_per_epoch, f"epoch {epoch}")
        means = distributed.mean_over_processes(sums)
        return {name: total / config.iterations_per_epoch for name, total in means.items()}

    def _validate(self, network: torch.nn.Module, volumes: list[PreparedVolume]) -> float:
        """Mean 3D Dice over validation cases, on every slice inference would see (the lung slices, and the
        tumour's), so false positives at the lung bases and apices count against a model."""
        network.eval()
        scores = []
        for volume in volumes:
            seen = np.union1d(volume.context_slices, volume.tumour_slices)
            low, high = int(seen.min()), int(seen.max()) + 1
            slices = ((z, volume.image[z].astype(np.float32)) for z in range(low, high))
            predicted = np.zeros((high - low,) + volume.image.shape[1:], dtype=bool)
            for z, probabilities in predict_slices(
                network,
                slices,
                num_classes=2,
                patch=self.config.patch_size,
                overlap=self.config.validation_overlap,
                # Inference results do not depend on the batch (BatchNorm uses its running statistics), and
                # batches of 8 or more tiles run about twice as fast as training's small batches on a CPU.
                batch_size=max(VALIDATION_MIN_BATCH, self.config.batch_size),
                device=self.device,
            ):
                predicted[z - low] = probabilities[1] >= 0.5
            score = dice(predicted, volume.label[low:high] > 0)
            if not math.isnan(score):
                scores.append(score)
        return float(np.mean(scores)) if scores else float("nan")

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
            },
            metrics={"validation_dice": None if math.isnan(validation_dice) else round(validation_dice, 4)},
            license=config.license,
        )
        save_model(self.run.model_path, objective.student, card)
        objective.export_extras(self.run.path, card)

    def _finish(self, state: str, message: str) -> dict[str, Any]:
        self.status = {**self.status, "state": state, "message": message, "pid": os.getpid(), "updated": _now()}
        if self.main and self.run.path.exists():
            self.run.write_status(self.status)
        # A failure reaches the user once, as the error the caller reports; the log keeps it too.
        self._log(message, tell=state != FAILED)
        return self.status

    def _log(self, message: str, tell: bool = True) -> None:
        """Tell the listener and keep the line in the run's ``train.log``."""
        if not self.main:
            return
        if tell:
            self.progress.log(message)
        if self.run.path.exists():
            with open(self.run.log_path, "a", encoding="utf-8") as handle:
                handle.write(f"{_now()} {message}\n")

    # -- signals --------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, lambda *_: self._stop.set())
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
