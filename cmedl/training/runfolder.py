"""The run folder: everything a training run leaves on disk, and the only way others look at a run.

Layout of ``RUN/``::

    config.json        the resolved configuration (exact values used)
    run.json           engine/torch versions, seed, host, start time
    data.json          the training and validation cases (file paths)
    status.json        state, epoch, best validation Dice, last losses, ETA (rewritten atomically)
    metrics.jsonl      one JSON object per finished epoch: every loss term and validation Dice
    checkpoint.pt      latest resumable state (networks, optimizers, RNG), written atomically
    model.safetensors  the best student as a model file (appears once the first epoch is validated)
    train.log          what the run printed

The Slicer module and ``cmedl jobs`` poll ``status.json`` and ``metrics.jsonl``; they never need to talk
to the training process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cmedl.errors import InputError
from cmedl.volumes import atomic_output

RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"


class RunFolder:
    """Reads and writes the files of one run folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def model_path(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    def create(self) -> None:
        """Make the folder; refuse one that already holds a run (resume it instead)."""
        if self.config_path.exists():
            raise InputError(f"{self.path} already holds a run; resume it with --resume {self.path} or choose another")
        self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        with atomic_output(self.path / name) as temp:
            temp.write_text(json.dumps(data, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path} not found: is {self.path} a run folder?") from None
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is damaged: {error}") from None

    def write_status(self, status: dict[str, Any]) -> None:
        self.write_json("status.json", status)

    def read_status(self) -> dict[str, Any]:
        return self.read_json("status.json")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=_plain) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records; a torn last line (the process was killed while writing) is skipped."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep only records up to ``last_epoch`` (used on resume: later epochs are run again)."""
        kept = [record for record in self.read_metrics() if record.get("epoch", 0) <= last_epoch]
        with atomic_output(self.metrics_path) as temp:
            temp.write_text("".join(json.dumps(record, default=_plain) + "\n" for record in kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        import torch  # here, not at the top: reading a run's status and metrics needs no torch

        with atomic_output(self.checkpoint_path) as temp:
            torch.save(state, temp)

    def load_checkpoint(self) -> dict[str, Any]:
        """The latest checkpoint, loaded with ``weights_only=True`` (no arbitrary objects are unpickled)."""
        if not self.checkpoint_path.exists():
            raise InputError(f"{self.path} has no checkpoint to resume from (no epoch finished yet?)")
        import torch

        try:
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a damaged file
            raise InputError(f"checkpoint {self.checkpoint_path} cannot be read: {error}") from None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
