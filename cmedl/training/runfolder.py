"""The run folder: everything a training run leaves on disk, and the only way others look at a run.

Layout of ``RUN/``::

    config.json        the resolved configuration (exact values used)
    run.json           engine/torch versions, seed, host, start time
    data.json          the training and validation cases (file paths)
    status.json        state, what it is doing (stage: data, training or validation, and a message), epoch,
                       best validation Dice, last losses, ETA (rewritten atomically)
    metrics.jsonl      one JSON object per finished epoch: every loss term, validation Dice, seconds (and of
                       them validation_seconds); a value that has none (validation Dice without validation
                       cases) is null
    checkpoint.pt      latest resumable state (networks, optimizers, RNG), written atomically
    model.safetensors  the best student as a model file (appears once the first epoch is validated)
    translator.safetensors  CMEDL: the CT->MR generator and the MRI teacher of that epoch (``cmedl translate``)
    cyclegan.safetensors    CMEDL: every translator network of that epoch (fine-tuning takes them over)
    train.log          what the run printed
    run.lock           while a process trains in the folder: its pid, host and start time
    cache/volumes/     every case as prepared for training, ``<key>.npz`` (:mod:`cmedl.training.volume_cache`),
                       read back by a resume or restart; safe to delete, kept when a run starts again

CMEDL Train and ``cmedl runs`` read ``status.json`` and ``metrics.jsonl`` (:mod:`cmedl.training.runs`); they
never need to talk to the training process.

One process at a time: :meth:`RunFolder.claim` creates ``run.lock`` atomically (``O_CREAT | O_EXCL``) before
anything else is written, and a second claim is refused while the owner lives. A lock whose owner is gone
(same host, no such process, or the pid now belongs to a process started later) is taken over; a lock from
another host cannot be checked from here and is refused with the way to remove it. Files are written under
temporary names (``.checkpoint.pt.XXXX.partial.pt``) and renamed when complete; a process killed while writing
leaves such a file, which the next claimant removes (:meth:`RunFolder.remove_partial_files`).

Every JSON file is strict JSON: a NaN or infinite number is written as ``null`` (Python's ``json`` would write
``NaN``, which JavaScript, ``jq`` and most other readers refuse), and the readers here turn the ``NaN`` of files
written by older versions into None as well.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import socket
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from cmedl.errors import InputError, OutputError, RunInUseError
from cmedl.processes import process_alive
from cmedl.volumes import atomic_output

MODEL_FILE = "model.safetensors"
TRANSLATOR_FILE = "translator.safetensors"
CYCLEGAN_FILE = "cyclegan.safetensors"

RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"

LOCK_FILE = "run.lock"
VOLUME_CACHE_FOLDER = Path("cache") / "volumes"
# What the trainer writes through temporary names; only their leftovers are removed (the Slicer launcher
# writes files of its own into the folder, possibly at the same moment).
RUN_FILES = ("config.json", "data.json", "run.json", "status.json", "metrics.jsonl", "checkpoint.pt")
# A lock file that is still empty this long after it was created lost its writer (killed between the
# creation and the write); younger, another process is claiming the folder right now.
_UNWRITTEN_LOCK_GRACE_SECONDS = 10.0
# Lock tokens held by this process: a lock naming this very pid is ours only if its token is here (a pid of a
# process that died in another container or before a reboot can come back as ours).
_HELD_TOKENS: set[str] = set()


class RunFolder:
    """Reads and writes the files of one run folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._token: str | None = None  # of this object's claim (run.lock), while it holds the folder

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
        return self.path / MODEL_FILE

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def volume_cache_path(self) -> Path:
        return self.path / VOLUME_CACHE_FOLDER

    def holds_run(self) -> bool:
        """Whether a run was configured here (``config.json`` written)."""
        return self.config_path.is_file()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def make(self) -> None:
        """Create the folder (and its parents) for a new run.

        Raises :class:`OutputError` for a file in its place and for a place that cannot be written (a read-only
        file system, no permission).
        """
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--out {self.path} is a file, not a run folder; choose a folder name")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            # A file among the parents gives FileExistsError or NotADirectoryError, a read-only disk EROFS.
            raise OutputError(f"cannot create the run folder {self.path}: {error.strerror or error}") from None

    def check_is_run_folder(self) -> None:
        """Refuse a path that cannot be a run folder to resume (missing, or a file), with :class:`InputError`."""
        if not self.path.exists():
            raise InputError(f"run folder {self.path} not found")
        if not self.path.is_dir():
            raise InputError(f"--resume expects a run folder; {self.path} is a file")
        if not self.config_path.is_file():
            raise InputError(
                f"{self.path} holds no run (no config.json); start one there with cmedl train --out {self.path} ..."
            )

    # -- one process at a time ---------------------------------------------------------------------------

    def claim(self) -> None:
        """Take the folder for this process (``run.lock``); see the module docstring.

        Raises:
            RunInUseError: a live process (or one on another host) holds the folder; the message names it.
            OutputError: the lock cannot be written (read-only file system, no permission).
        """
        token = uuid.uuid4().hex
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()),
            "token": token,
            "command": " ".join(sys.argv),
        }
        for _ in range(5):
            try:
                handle = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.lock_owner()
                refusal = self._lock_refusal(owner)
                if refusal:
                    raise RunInUseError(refusal) from None
                self._break_stale_lock(owner)
                continue
            except OSError as error:
                raise OutputError(f"cannot write to the run folder {self.path}: {error.strerror or error}") from None
            try:
                os.write(handle, (json.dumps(record) + "\n").encode("utf-8"))
                os.fsync(handle)
            except OSError as error:
                os.close(handle)
                self.lock_path.unlink(missing_ok=True)
                raise OutputError(f"cannot write to the run folder {self.path}: {error.strerror or error}") from None
            os.close(handle)
            _HELD_TOKENS.add(token)
            self._token = token
            return
        raise RunInUseError(f"{self.path} is being claimed by other processes at the same moment; try again")

    def release(self) -> None:
        """Give the folder back: remove ``run.lock`` if it is still this claim's (a no-op otherwise)."""
        token = self._token
        if token is None:
            return
        self._token = None
        _HELD_TOKENS.discard(token)
        owner = self.lock_owner()
        if owner is not None and owner.get("token") == token:
            self.lock_path.unlink(missing_ok=True)

    def lock_owner(self) -> dict[str, Any] | None:
        """The record in ``run.lock``; ``{}`` when it exists but cannot be read yet, None when there is none."""
        try:
            text = self.lock_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}

    def _lock_refusal(self, owner: dict[str, Any] | None) -> str:
        """Why the lock of ``owner`` must be respected (one line), or ``""`` when it may be taken over."""
        if owner is None:
            return ""  # removed in the meantime: try again
        if not owner:
            try:
                age = time.time() - self.lock_path.stat().st_mtime
            except OSError:
                return ""
            if age < _UNWRITTEN_LOCK_GRACE_SECONDS:
                return f"{self.path} is being claimed by another process right now (run.lock is being written)"
            return ""
        pid, host = owner.get("pid"), str(owner.get("host", ""))
        since = f", since {owner['started']}" if owner.get("started") else ""
        if host != socket.gethostname():
            return (
                f"{self.path} is in use by pid {pid} on host {host}{since}; if no run goes on there any more, "
                f"remove {self.lock_path} and try again"
            )
        if not isinstance(pid, int) or not _process_alive(pid, owner.get("process_start"), owner.get("token")):
            return ""
        return (
            f"{self.path} is in use by pid {pid} on this host{since}; stop that run first (CMEDL Train's Stop, "
            f"or kill {pid}) or choose another --out"
        )

    def _break_stale_lock(self, owner: dict[str, Any] | None) -> None:
        """Remove the lock judged stale. Two processes may judge the same lock stale at once; each moves it
        aside first and puts back a lock that turns out to be another claimant's fresh one."""
        aside = self.path / f".{LOCK_FILE}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.lock_path, aside)
        except FileNotFoundError:
            return
        except OSError as error:
            raise OutputError(f"cannot write to the run folder {self.path}: {error.strerror or error}") from None
        try:
            text = aside.read_text(encoding="utf-8")
            moved_owner = json.loads(text) if text.strip() else {}
        except (OSError, json.JSONDecodeError):
            moved_owner = {}
        if owner and isinstance(moved_owner, dict) and moved_owner.get("token") != owner.get("token"):
            # Not the lock that was judged: someone claimed the folder in between. Give it back.
            try:
                os.link(aside, self.lock_path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    # -- leftovers of interrupted writes -----------------------------------------------------------------

    def remove_partial_files(self) -> list[Path]:
        """Delete the temporary files of writes that were interrupted (the process was killed), e.g.
        ``.checkpoint.pt.k3j9.partial.pt``; returns what was removed. Call only while holding the folder."""
        removed = []
        # Only the trainer writes into previews/ and the cache: every partial file there is one of its writes.
        folders = [self.path, self.path / "previews", self.volume_cache_path]
        for folder in folders:
            if not folder.is_dir():
                continue
            for entry in folder.glob(".*.partial*"):
                name = entry.name[1:].split(".partial", 1)[0].rsplit(".", 1)[0]
                ours = folder != self.path or name in RUN_FILES or name.endswith(".safetensors")
                if ours and entry.is_file():
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
            for entry in folder.glob(f".{LOCK_FILE}.*.stale"):
                entry.unlink(missing_ok=True)
        return removed

    def clear_unfinished(self) -> None:
        """Forget a run that never finished an epoch (no checkpoint), to start it again in place: its metric
        lines and model files belong to no checkpoint and would mix with the new run's. The cache of prepared
        volumes stays: an entry is keyed by the case's files and the settings, not by the run, and the new run
        reads it."""
        self.metrics_path.unlink(missing_ok=True)
        for model in self.path.glob("*.safetensors"):
            model.unlink(missing_ok=True)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        with atomic_output(self.path / name) as temp:
            temp.write_text(_strict_json(data, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        try:
            return finite_or_null(json.loads(path.read_text()))
        except FileNotFoundError:
            raise InputError(f"{path} not found: is {self.path} a run folder?") from None
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is damaged: {error}") from None

    def write_status(self, status: dict[str, Any]) -> None:
        self.write_json("status.json", status)

    def read_status(self) -> dict[str, Any]:
        return self.read_json("status.json")

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(_strict_json(record, default=_plain) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:  # a full disk, say
            raise OutputError(f"cannot write {self.metrics_path}: {error.strerror or error}") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records; a torn last line (the process was killed while writing) is skipped. A value
        without a number is None, whether written as ``null`` or (by older versions) as ``NaN``."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(finite_or_null(json.loads(line)))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep only records up to ``last_epoch`` (used on resume: later epochs are run again)."""
        kept = [record for record in self.read_metrics() if record.get("epoch", 0) <= last_epoch]
        with atomic_output(self.metrics_path) as temp:
            temp.write_text("".join(_strict_json(record, default=_plain) + "\n" for record in kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        import torch  # here, not at the top: reading a run's status and metrics needs no torch

        with atomic_output(self.checkpoint_path) as temp:
            torch.save(state, temp)

    def load_checkpoint(self) -> dict[str, Any]:
        """The latest checkpoint, loaded with ``weights_only=True`` (no arbitrary objects are unpickled).

        A file that cannot be one (empty, not a zip archive as ``torch.save`` writes, or a zip cut short) is
        refused with a sentence that says so (:meth:`checkpoint_problem`) rather than torch's reader's words.
        """
        if not self.checkpoint_path.exists():
            raise InputError(f"{self.path} has no checkpoint to resume from (no epoch finished yet?)")
        problem = self.checkpoint_problem()
        if problem:
            raise InputError(problem)
        import pickle

        import torch

        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "weights only" not in str(error).lower():
                raise InputError(f"checkpoint {self.checkpoint_path} is damaged: {_first_line(error)}") from None
            # torch's own message advises loading with weights_only=False, which would run whatever code the
            # file carries: never repeat that advice.
            raise InputError(
                f"checkpoint {self.checkpoint_path} holds Python objects besides tensors, so it was not written by "
                f"cmedl or was altered; it is not loaded, since loading such objects can run code"
            ) from None
        except Exception as error:  # torch raises many kinds for a damaged file
            raise InputError(f"checkpoint {self.checkpoint_path} cannot be read: {_first_line(error)}") from None
        if not isinstance(state, dict) or "epoch" not in state or "objective" not in state:
            raise InputError(f"checkpoint {self.checkpoint_path} is not a cmedl training checkpoint")
        return state

    def checkpoint_problem(self) -> str:
        """Why ``checkpoint.pt`` cannot be a checkpoint, found without unpickling anything (one line, ``""`` when
        it may be one): empty, not a zip archive (``torch.save`` writes one), or a zip archive cut short (its
        directory, at the end, is missing: a copy or a write that stopped early).

        Why here: a torn file otherwise surfaced as torch's ``EOFError``, ``[Errno 22]`` or a bare number, and
        only after the data were prepared. The run can no longer be resumed from such a file; the message says
        so, and names the run's best model when there is one (``--init`` starts a new run from it).
        """
        path = self.checkpoint_path
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                head = handle.read(4)
        except OSError as error:
            return f"checkpoint {path} cannot be read: {error.strerror or error}"
        if size == 0:
            what = "is empty (0 bytes)"
        elif head != _ZIP_MAGIC:
            what = "is not a training checkpoint (torch.save writes a zip archive; this file is not one)"
        else:
            try:
                with zipfile.ZipFile(path) as archive:
                    archive.namelist()
            except (zipfile.BadZipFile, OSError, ValueError, EOFError):
                what = f"is truncated or damaged ({size:,} bytes, the end of its zip archive is missing)"
            else:
                return ""
        best = (
            f"; the best model so far is intact: start a new run from it with --init {self.path}"
            if self.model_path.is_file()
            else ""
        )
        return f"checkpoint {path} {what}, so the run cannot be resumed from it{best}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``); None elsewhere or when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace").rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat; the split starts at field 3
    except (OSError, IndexError, ValueError):
        return None


def _process_alive(pid: int, process_start: Any, token: Any) -> bool:
    """Whether the process that wrote a lock on this host still runs (:func:`cmedl.processes.process_alive`, which
    also tells an exited, unreaped process from a live one) and is the same one: a lock written by this process
    is ours only with our token, and a pid now held by a process started later means the owner is gone."""
    if pid == os.getpid():
        return token in _HELD_TOKENS
    if not process_alive(pid):
        return False
    return not (isinstance(process_start, int) and _process_start(pid) not in (None, process_start))


_ZIP_MAGIC = b"PK\x03\x04"  # how a zip archive, and so every torch.save file, begins


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite number (also in nested dicts and lists, and 0-d numpy or torch
    scalars) replaced by None: what strict JSON can hold (``null``)."""
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    if not isinstance(value, (str, bytes, bool, int, float)) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _strict_json(data: Any, **options: Any) -> str:
    """``json.dumps`` of ``data`` that never writes ``NaN`` or ``Infinity`` (see the module docstring)."""
    return json.dumps(finite_or_null(data), allow_nan=False, **options)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return finite_or_null(value.item())
    return str(value)
