"""The run's cache of prepared training volumes (``RUN/cache/volumes``).

Preparing a case (:func:`cmedl.training.data.prepare_volume`: read, reorient, resample in-plane, normalise)
takes seconds for a real CT, and every resume or restart of a run would prepare all its cases again. The
trainer keeps each prepared volume in the run folder under a key that names everything the preparation depends
on (:func:`cache_key`) and reads it back instead.

An entry is ``<key>.npz``: :func:`numpy.savez`, uncompressed (reading it back is what the cache is for, and
the float16 image does not compress much), written through :func:`cmedl.volumes.atomic_output` so that a
killed write leaves a hidden ``.partial`` file, never a finished-looking entry. It holds the key, the case
name, the image, the label packed to bits with its shape, and the two slice lists; not the paired image
(:func:`cmedl.training.data.attach_paired` adds it after the cache).

Reading never fails a run: a missing entry is a miss, and a truncated, damaged or mismatched one is logged and
read as a miss, so that the case is prepared again and its entry rewritten. Writing is best effort: the first
failure (a full disk, a folder that cannot be created), or the first entry that would leave less than
:data:`RESERVE_BYTES` free on the disk, is logged once and ends the run's writes; training goes on without the
cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cmedl import __version__
from cmedl.errors import OutputError
from cmedl.memory import describe_bytes
from cmedl.training.data import CasePaths, PreparedVolume
from cmedl.volumes import atomic_output

# Part of every key. Raise it when prepare_volume gives other arrays for the same files and settings (another
# resampling, normalisation or lung-slice rule) or when the entry layout changes: older entries then miss
# instead of training on stale data. The engine version is part of the key as well, for the same reason.
# 2: prepare_volume refuses images with NaN or infinite voxels and CT images that do not look like a CT; an entry
# written before would let such a file through on a resume without being read.
FORMAT_VERSION = 2
SUFFIX = ".npz"
ZIP_MAGIC = b"PK\x03\x04"  # how an .npz (a zip archive) begins
# Free space an entry must leave on the run folder's disk. The cache is written before the first checkpoint and
# model file, and a large dataset's entries add up to gigabytes: they must not take the room those need.
RESERVE_BYTES = 1 << 30


def _fingerprint(path: Path) -> dict[str, Any]:
    """What identifies the content of a volume file, or of a DICOM series folder, without reading it: the
    resolved path, and the size, modification time, status-change time (ns) and inode of the file or of every
    file in the folder.

    The modification time alone misses a file copied over the original with its time kept (``cp -p``,
    ``rsync -t``) or rewritten and its time set back; the copy is a new inode, and any write sets the status-change
    time, which no user call can set back.

    Raises :class:`OSError` when the path cannot be examined (it is gone, no permission).
    """
    resolved = path.resolve()
    if resolved.is_dir():
        # A series is read from the files of its folder (list_volumes lists such folders as volumes).
        files = [(entry.name, entry.stat()) for entry in sorted(resolved.iterdir()) if entry.is_file()]
        return {"path": str(resolved), "files": [[name, *_stamp(st)] for name, st in files]}
    return {"path": str(resolved), "stamp": _stamp(resolved.stat())}


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def cache_key(
    case: CasePaths,
    spacing_mm: tuple[float, float],
    normalisation: Mapping[str, Any],
    is_ct: bool,
    label_value: int,
) -> str:
    """The cache key of one case prepared with these settings: the sha256 hex digest of a JSON record of
    :data:`FORMAT_VERSION`, the engine version, the case name, the image's and the label's fingerprints (resolved
    path, size, modification and status-change times, inode), the in-plane ``spacing_mm`` (x, y), the
    ``normalisation`` parameters (what the run's normalise function depends on: ``{"hu_window": [low, high]}`` for
    CT, ``{"mr_percentile": p}`` for MRI; JSON values), ``is_ct`` and ``label_value``.

    The case name is part of it because it is part of the prepared volume (two names linked to one file are two
    entries). A file rewritten in place with the same size within the file system's timestamp resolution (both
    times) keeps its key.

    Raises :class:`OSError` when a file cannot be examined.
    """
    record = {
        "format": FORMAT_VERSION,
        "engine": __version__,
        "name": case.name,
        "image": _fingerprint(case.image),
        "label": _fingerprint(case.label) if case.label is not None else None,
        "spacing_mm": [float(value) for value in spacing_mm],
        "normalisation": dict(normalisation),
        "is_ct": bool(is_ct),
        "label_value": int(label_value),
    }
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PreparedVolumeCache:
    """The prepared volumes of one run folder, one ``<key>.npz`` each in ``folder``.

    Args:
        folder: where the entries are (``RUN/cache/volumes``); created by the first write.
        writable: whether this process writes entries (in a data-parallel run only rank 0 does; every process
            reads).
        log: receives the one-line reports of a damaged entry and of a failed write.
    """

    def __init__(self, folder: Path, writable: bool, log: Callable[[str], None]) -> None:
        self.folder = Path(folder)
        self.writable = writable
        self._owner = writable  # writable turns False after a failed write; the owner may still delete
        self._log = log
        self.used: set[str] = set()  # the keys looked up since this object was made (remove_unused keeps them)

    def path_of(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def load(self, key: str, name: str) -> PreparedVolume | None:
        """The volume stored under ``key`` for case ``name`` (``paired`` None), or None when there is no entry or
        it cannot be used (truncated, damaged, another key or case, arrays of the wrong shape or type): the
        caller prepares the case again. Never raises, except for a stop signal."""
        path = self.path_of(key)
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as handle:
                # np.load takes any other file for a pickle, and its refusal advises loading it unsafely.
                if handle.read(4) != ZIP_MAGIC:
                    raise ValueError("not an .npz archive")
            # The zip's CRC-32 of each array is checked as it is read: a flipped byte fails too.
            with np.load(path, allow_pickle=False) as entry:
                return _volume_from(entry, key, name)
        except Exception as error:  # a damaged zip raises BadZipFile, EOFError, ValueError, OSError or KeyError
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self._log(f"cache: entry {path.name} of case {name} cannot be used ({reason}); preparing the case again")
            return None

    def prepared(
        self,
        case: CasePaths,
        spacing_mm: tuple[float, float],
        normalisation: Mapping[str, Any],
        is_ct: bool,
        label_value: int,
        prepare: Callable[[], PreparedVolume],
    ) -> tuple[PreparedVolume, bool]:
        """``case`` prepared with these settings (:func:`cache_key`'s arguments): its entry when there is a usable
        one, else ``prepare()``, whose result is stored. Returns the volume and whether it came from the cache.
        A case whose files cannot be examined is prepared without the cache (``prepare`` says what is wrong)."""
        try:
            key = cache_key(case, spacing_mm, normalisation, is_ct=is_ct, label_value=label_value)
        except OSError:
            return prepare(), False
        self.used.add(key)
        volume = self.load(key, case.name)
        if volume is not None:
            return volume, True
        volume = prepare()
        self.store(key, volume)
        return volume, False

    def store(self, key: str, volume: PreparedVolume) -> None:
        """Write ``volume`` (not its paired image) under ``key``, replacing any entry there; a no-op when the cache
        is not writable. A write that fails, or would leave less than :data:`RESERVE_BYTES` free, logs one line and
        turns the cache read-only for the rest of the run."""
        if not self.writable:
            return
        arrays = {
            "key": np.array(key),
            "name": np.array(volume.name),
            "image": volume.image,
            "tumour_slices": np.asarray(volume.tumour_slices, dtype=np.int64),
            "context_slices": np.asarray(volume.context_slices, dtype=np.int64),
        }
        if volume.label is not None:
            label = np.asarray(volume.label)
            arrays["label_shape"] = np.array(label.shape, dtype=np.int64)
            if label.size and label.max() > 1:
                arrays["label"] = label  # class indices beyond 0/1 do not fit in bits
            else:
                arrays["label_bits"] = np.packbits(label, axis=None)  # a tumour mask: an eighth of the bytes
        free = _free_bytes(self.folder)
        size = sum(array.nbytes for array in arrays.values())
        if free is not None and free - size < RESERVE_BYTES:
            self.writable = False
            self._log(
                f"cache: {describe_bytes(free)} free on the disk of {self.folder}, and the cache leaves "
                f"{describe_bytes(RESERVE_BYTES)} to the run's checkpoints and models; training goes on without "
                f"writing the run's cache of prepared volumes"
            )
            return
        try:
            with atomic_output(self.path_of(key)) as temp, open(temp, "wb") as handle:
                # A file handle, not the name: savez would append ".npz" to a name that did not end with it.
                np.savez(handle, **arrays)
        except (OSError, OutputError) as error:
            self.writable = False
            self._log(f"cache: {error}; training goes on without writing the run's cache of prepared volumes")

    def remove_unused(self, used: set[str] | None = None) -> int:
        """Delete every entry whose key is not in ``used`` (default: the keys :meth:`prepared` looked up, the run's
        cases as they are now); returns how many.

        A key names the files' size and time: once a case's file changes, its old entry is never read again and
        would only take disk. Only the writing process deletes; a failure leaves the entry (best effort).
        """
        if not self._owner or not self.folder.is_dir():
            return 0
        used = self.used if used is None else used
        removed = 0
        for path in self.folder.glob(f"*{SUFFIX}"):
            if path.name.startswith(".") or path.name[: -len(SUFFIX)] in used:
                continue  # a hidden name is a write in progress or its leftover: RunFolder removes those
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
        return removed


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent, before the first
    write creates it); None when that cannot be told."""
    place = folder
    while not place.exists() and place.parent != place:
        place = place.parent
    try:
        return shutil.disk_usage(place).free
    except OSError:
        return None


def _volume_from(entry: Mapping[str, np.ndarray], key: str, name: str) -> PreparedVolume:
    """The volume held by an opened entry, checked against ``key`` and ``name``; :class:`ValueError` naming the
    first thing that does not fit."""
    if str(entry["key"]) != key:
        raise ValueError("it holds another key")
    if str(entry["name"]) != name:
        raise ValueError(f"it holds case {str(entry['name'])!r}")
    image = entry["image"]
    if image.ndim != 3 or image.dtype != np.float16:
        raise ValueError(f"image of shape {image.shape} and type {image.dtype}, not (Z, H, W) float16")
    label = None
    if "label_shape" in entry:
        shape = tuple(int(size) for size in entry["label_shape"])
        if shape != image.shape:
            raise ValueError(f"label of shape {shape} beside an image of shape {image.shape}")
        if "label_bits" in entry:
            bits = entry["label_bits"]
            count = int(np.prod(shape))
            if bits.dtype != np.uint8 or bits.shape != ((count + 7) // 8,):
                raise ValueError(f"packed label of {bits.shape} {bits.dtype} for {count} voxels")
            label = np.unpackbits(bits, count=count).reshape(shape)
        else:
            label = entry["label"]
            if label.dtype != np.uint8 or label.shape != shape:
                raise ValueError(f"label of shape {label.shape} and type {label.dtype}, not {shape} uint8")
    slices = []
    for field in ("tumour_slices", "context_slices"):
        indices = entry[field]
        if indices.ndim != 1 or indices.dtype != np.int64:
            raise ValueError(f"{field} of shape {indices.shape} and type {indices.dtype}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(image)):
            raise ValueError(f"{field} outside the image's {len(image)} slices")
        slices.append(indices)
    return PreparedVolume(name, image, label, slices[0], slices[1])
