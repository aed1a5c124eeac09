"""The engine's bottom floor for files, on the standard library alone: model card format, atomic writes, sha256.

- The model file format's keys and the sane ranges of model card values, with :func:`peek_model_card`, which
  reads a model file's card from the safetensors header directly (an 8-byte little-endian length, then that
  many bytes of JSON; the card is a JSON string in its ``__metadata__``).
- :func:`atomic_write`: a file appears under its name complete or not at all.
- :func:`write_failure`: the one-line error of a failed write, saying why in words (a full disk, a read-only
  file system) and naming the target, never the temporary file.
- :func:`file_sha256`: the digest that names a model file and an input in provenance records.

Slicer lists models and shows their cards before torch, numpy or safetensors are installed, and the torch side
(:mod:`cmedl.modelfile`) and the catalogue (:mod:`cmedl.catalogue`) must agree on the format; both therefore
take it from here, and this module imports nothing of the engine but :mod:`cmedl.errors` (which imports
nothing at all).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmedl.errors import ModelFileError, OutputError

# The model file's header keys.
CARD_KEY = "cmedl.model_card"
FORMAT_KEY = "cmedl.format"
FORMAT_NAME = "cmedl-model"
SEGMENTOR_KIND = "segmentor"

# A model card is a few kilobytes; a header length beyond this is a damaged or foreign file, and reading it
# would only waste memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Sane ranges of the model card values inference relies on; outside them a card is damaged or hand-edited.
CARD_PATCH_SIZE_RANGE = (8, 4096)
CARD_SPACING_RANGE_MM = (0.01, 50.0)
CARD_WIDTH_RANGE = (1, 1024)
CARD_MAX_CLASSES = 256  # labelmaps are written as uint8
CARD_MAX_IN_CHANNELS = 64
# Architecture options that set a network's width: a huge value would allocate gigabytes before failing.
_WIDTH_OPTIONS = ("base_channels", "growth_rate", "stem_channels")

#: what the name of a temporary file ends with (before any real suffix), so leftovers can be recognised
PARTIAL_SUFFIX = ".partial"
BLOCK_BYTES = 1 << 20
#: Free space below which a write that failed without an error number is put down to a full disk. A write that
#: runs out of room leaves its partial file filling the disk, so what remains is a few blocks, far below this.
LOW_SPACE_BYTES = 1 << 20


# -- model cards without torch ------------------------------------------------------------------------


def peek_model_card(path: str | Path) -> dict[str, Any]:
    """The model card of a CMEDL model file as a plain dict, read from the safetensors header alone.

    Checks what can be checked without the weights: the header is well formed, the file is as long as the
    header says (a truncated download is caught), and the metadata carries the CMEDL format marker and a
    model card naming at least the model and its architecture. Every failure is a :class:`ModelFileError`
    with one line naming the file.
    """
    path = Path(path)
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path.name} is not a readable model file (damaged safetensors metadata)")
    card = card_from_metadata(metadata, path.name)
    missing = sorted({"name", "architecture"} - set(card))
    if missing:
        raise ModelFileError(f"{path.name}: model card lacks {', '.join(missing)}")
    check_card_values(card, path.name)
    return card


def card_from_metadata(metadata: dict[str, Any], shown: str) -> dict[str, Any]:
    """The model card held in a safetensors file's ``metadata``, as a dict; ``shown`` names the file in errors.

    Refuses metadata without the CMEDL format marker or card, and a card that is not a JSON object, each as a
    one-line :class:`ModelFileError`. The card's contents are not checked here (:func:`check_card_values`).
    """
    marker = metadata.get(FORMAT_KEY)
    if not isinstance(marker, str) or not marker.startswith(FORMAT_NAME) or CARD_KEY not in metadata:
        raise ModelFileError(f"{shown} is a safetensors file but not a CMEDL model (no model card)")
    try:
        card = json.loads(metadata[CARD_KEY])
    except (TypeError, ValueError, RecursionError):
        raise ModelFileError(f"{shown} has a damaged model card") from None
    if not isinstance(card, dict):
        raise ModelFileError(f"{shown} has a damaged model card (not a JSON object)")
    return card


def check_card_values(card: dict[str, Any], shown: str) -> None:
    """Refuse a model card whose values inference cannot use, with one line naming ``shown`` (the file).

    Checked where present (absent values take the engine's defaults): ``patch_size`` within
    :data:`CARD_PATCH_SIZE_RANGE`; ``spacing_mm`` two finite values within :data:`CARD_SPACING_RANGE_MM`;
    ``hu_window`` two finite values, low below high (an empty window divides by zero, a reversed one
    inverts the image); ``in_channels`` and ``num_classes`` (2 to :data:`CARD_MAX_CLASSES`) integers;
    width options (``base_channels`` ...) within :data:`CARD_WIDTH_RANGE` and every numeric option finite;
    ``labels`` distinct integer values from 1 to ``num_classes - 1``, each with a name. Whether the
    architecture exists and the weights fit it needs torch: :func:`cmedl.modelfile.check_model_file`.
    Raises :class:`ModelFileError`.
    """

    def refuse(reason: str) -> None:
        raise ModelFileError(f"{shown}: the model card is not usable: {reason}")

    def integer(key: str, low: int, high: int) -> int | None:
        value = card.get(key)
        if value is None:
            return None
        if not _is_int(value) or not low <= value <= high:
            refuse(f"{key} {shown_value(value)} is not an integer from {low} to {high}")
        return value

    integer("patch_size", *CARD_PATCH_SIZE_RANGE)
    integer("in_channels", 1, CARD_MAX_IN_CHANNELS)
    classes = integer("num_classes", 2, CARD_MAX_CLASSES)
    if "spacing_mm" in card:
        spacing = _numbers(card["spacing_mm"])
        low, high = CARD_SPACING_RANGE_MM
        if spacing is None or len(spacing) != 2 or not all(low <= value <= high for value in spacing):
            refuse(f"spacing_mm {shown_value(card['spacing_mm'])} is not two values from {low:g} to {high:g} mm")
    if "hu_window" in card:
        window = _numbers(card["hu_window"])
        if window is None or len(window) != 2:
            refuse(f"hu_window {shown_value(card['hu_window'])} is not two finite HU values")
        elif not window[0] < window[1]:
            refuse(f"hu_window {shown_value(card['hu_window'])} is empty or reversed (low must be below high)")
    options = card.get("architecture_options", {})
    if not isinstance(options, dict):
        refuse("architecture_options is not a JSON object")
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            refuse(f"architecture option {key} is {value!r}")
        if key in _WIDTH_OPTIONS and (not _is_int(value) or not CARD_WIDTH_RANGE[0] <= value <= CARD_WIDTH_RANGE[1]):
            refuse(f"architecture option {key} {shown_value(value)} is not an integer from {CARD_WIDTH_RANGE[0]} "
                   f"to {CARD_WIDTH_RANGE[1]}")  # fmt: skip
    labels = card.get("labels", [])
    if not isinstance(labels, list):
        refuse("labels is not a list")
    values: list[int] = []
    top = (classes or 2) - 1
    for label in labels:
        value = label.get("value") if isinstance(label, dict) else None
        if not _is_int(value) or not 1 <= value <= top:
            refuse(f"label value {shown_value(value)} is not an output class of the network (1 to {top})")
        if value in values:
            refuse(f"label value {value} is listed twice")
        if not isinstance(label.get("name"), str):
            refuse(f"label {value} has no name")
        values.append(value)


def shown_value(value: Any) -> str:
    """A card value as one short piece of a message (floats to three significant digits)."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any) -> list[float] | None:
    """``value`` as a list of finite floats, or None when it is not a list of finite numbers."""
    if not isinstance(value, (list, tuple)):
        return None
    if not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
        return None
    numbers = [float(item) for item in value]
    return numbers if all(math.isfinite(item) for item in numbers) else None


def missing_model_file(path: Path) -> str:
    """Why ``path`` (not a file) cannot be a model: it does not exist, or it is a folder."""
    if path.is_dir():
        return f"{path} is a folder, not a model file (a .safetensors file)"
    return f"model file not found: {path}"


def read_header(path: Path) -> dict[str, Any]:
    """The parsed safetensors header of ``path``, after checking that the data section has the promised length."""
    if not path.is_file():
        raise ModelFileError(missing_model_file(path))
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelFileError(f"{path.name} is not a readable model file (truncated: {size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ModelFileError(
                    f"{path.name} is not a readable model file (truncated or not safetensors: "
                    f"header of {length} bytes in a file of {size} bytes)"
                )
            raw = handle.read(length)
    except OSError as error:
        raise ModelFileError(f"{path.name} cannot be read: {error.strerror or error}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelFileError(f"{path.name} is not a readable model file (not safetensors: no JSON header)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name} is not a readable model file (not safetensors: no JSON header)")
    data_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets)
        ):
            raise ModelFileError(f"{path.name} is not a readable model file (damaged entry {key!r} in the header)")
        data_end = max(data_end, offsets[1])
    data_size = size - 8 - length
    if data_size < data_end:
        raise ModelFileError(
            f"{path.name} is truncated: its header promises {data_end} bytes of weights, the file has {data_size}"
        )
    if data_size > data_end:
        # safetensors refuses such files too, so accepting them here would only move the error to loading time.
        raise ModelFileError(
            f"{path.name} is not a readable model file ({data_size - data_end} bytes after the weights)"
        )
    return header


# -- hashing ---------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, as 64 hexadecimal digits; a file that cannot be read raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# -- atomic writes ---------------------------------------------------------------------------------------


def temp_file_beside(target: Path, suffix: str = "") -> Path:
    """Create an empty private temporary file in ``target``'s folder, named ``.NAME.XXXX.partial<suffix>``.

    The same folder, so that the final rename stays on one file system and is atomic; hidden and marked
    partial, so that nobody takes it for a finished file and a leftover can be removed. ``suffix`` keeps a
    real suffix for writers that choose the format from the name. Raises :class:`OutputError`.
    """
    try:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX + suffix, dir=target.parent)
    except OSError as error:
        raise write_failure(target, error) from None
    os.close(handle)
    return Path(name)


def default_file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: temporary files are created private (0600)."""
    # os.umask can only be read by setting it, so it is restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def flush_to_disk(path: Path) -> None:
    """Make the file's bytes durable before it is renamed into place (raises ``OSError``).

    Without it, a crash or power loss soon after the rename can leave the final name on an empty or torn file,
    which would then look finished.
    """
    with open(path, "r+b") as handle:  # writable: Windows refuses to flush a read-only handle
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_write(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block completes, put the file in place under ``target``.

    The finished file is flushed to disk before the rename, so after a crash ``target`` is the old file or the
    new one, never a torn one. When the block raises, the temporary file is removed and ``target`` is left as it
    was. A failure of the writing machinery itself is an :class:`OutputError`; the block's own errors pass
    through unchanged.
    """
    temp = temp_file_beside(target)
    try:
        yield temp
        try:
            flush_to_disk(temp)
            os.chmod(temp, default_file_mode())
            os.replace(temp, target)
        except OSError as error:
            raise write_failure(target, error, temp) from None
    finally:
        temp.unlink(missing_ok=True)


# -- why a write failed ----------------------------------------------------------------------------------

# Rust libraries (safetensors) report an OS error only inside their text, as "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_failure(target: str | Path, problem: BaseException | str, partial: str | Path | None = None) -> OutputError:
    """The one-line :class:`OutputError` "cannot write TARGET: REASON" for a write that failed with ``problem``.

    A user acts on the cause, not on the system call, so a full disk, an exceeded quota, a read-only file system,
    a missing permission and a folder in the way are said in words, a full disk with the free space of the
    target's file system. Writers that report no error number (SimpleITK, a read-back of the written file) can
    hide a full disk: such a failure is put down to one when less than :data:`LOW_SPACE_BYTES` are free.
    ``partial`` is the temporary file (or folder) that holds what was written: its bytes count as free in the
    message, since it is removed, and its name, which means nothing to the user, is replaced by ``target``'s.
    """
    target = Path(target)
    folder = _existing_folder(target.parent)
    number = problem.errno if isinstance(problem, OSError) else None
    if isinstance(problem, OSError):
        text = problem.strerror or str(problem)
    else:
        text = str(problem)
        found = _RUST_OS_ERROR.search(text)
        number = int(found.group(1)) if found else None
    free = _free_bytes(folder)
    unexplained = number is None or number == errno.EIO  # what a full disk looks like to a writer that hides it
    if number == errno.ENOSPC or (unexplained and free is not None and free < LOW_SPACE_BYTES):
        shown_free = "" if free is None else f"{readable_size(free + _size_of(partial))} free in "
        reason = f"no space left on the disk ({shown_free}{folder})"
    elif number == getattr(errno, "EDQUOT", None):
        reason = f"the disk quota is exceeded (in {folder})"
    elif number == errno.EROFS:
        reason = f"the file system is read-only ({folder})"
    elif number in (errno.EACCES, errno.EPERM):
        reason = f"permission denied (no right to write in {folder})"
    elif number == errno.EISDIR:
        reason = "it is a folder, not a file"
    else:
        reason = _without_temporary_names(text, partial, target)
    return OutputError(f"cannot write {target}: {reason}")


def readable_size(size: int) -> str:
    """``size`` bytes as a person reads it (:func:`cmedl.memory.describe_bytes`), with a few bytes spelled
    ``512 bytes``: a nearly full disk is often down to so few."""
    from cmedl.memory import describe_bytes  # only a failed write needs it; this floor imports nothing at start

    return f"{size} bytes" if size < 1024 else describe_bytes(size)


def _existing_folder(folder: Path) -> Path:
    """``folder`` as an absolute path, or its nearest existing ancestor (a write can fail before it is made)."""
    folder = Path(os.path.abspath(folder))
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            return candidate
    return folder


def _free_bytes(folder: Path) -> int | None:
    """The bytes an unprivileged user may still write on ``folder``'s file system; None when it cannot be told."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _size_of(partial: str | Path | None) -> int:
    """The bytes held by a temporary file or folder (0 when there is none): space the failed write gives back."""
    if partial is None:
        return 0
    partial = Path(partial)
    try:
        if partial.is_dir():
            return sum(entry.stat().st_size for entry in partial.rglob("*") if entry.is_file())
        return partial.stat().st_size if partial.is_file() else 0
    except OSError:
        return 0


def _without_temporary_names(text: str, partial: str | Path | None, target: Path) -> str:
    """``text`` with every mention of the temporary file replaced by the target's name.

    Writers name the file they were given, the temporary one; shown to a user it looks like a stray file of
    theirs. Whatever still looks like a temporary name (``.partial``) after the exact replacements goes too.
    """
    if partial is not None:
        partial = Path(partial)
        for form in sorted({str(partial), os.path.abspath(partial)}, key=len, reverse=True):
            text = text.replace(form, str(target))
        text = text.replace(partial.name, target.name)
    return re.sub(r"[^\s\"']*" + re.escape(PARTIAL_SUFFIX) + r"[^\s\"']*", target.name, text)
