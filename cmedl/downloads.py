"""Downloading catalogue models into the cache: fetching, sha256 verification, partial files, clearing the cache.

A download entry of :mod:`cmedl.catalogue` names a url and the sha256 its file must have. :func:`download_model`
streams it into a temporary file beside its place in the cache (``<home>/cache/<name>.safetensors``, see
:func:`cmedl.catalogue.cached_model_path`), hashing on the way, and renames it into place only when the digest
matches and the file holds a segmentation model; nothing partial is ever left under the final name. A file
placed there by hand with the right sha256 is used as it is, without network. :func:`clear_cache` removes the
downloaded files and any leftovers of interrupted downloads.

Like the catalogue, this module needs only the standard library (Slicer downloads before torch is installed).
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.request
from pathlib import Path
from typing import IO

from cmedl.catalogue import (
    MODEL_SUFFIX,
    ModelEntry,
    cache_dir,
    cached_model_path,
    download_entry,
    require_segmentor,
)
from cmedl.errors import CMEDLError, ConfigError, InputError, ModelFileError, OutputError
from cmedl.filebase import BLOCK_BYTES, PARTIAL_SUFFIX, atomic_write, file_sha256, peek_model_card
from cmedl.progress import Progress

# Without a size in the catalogue or from the server, a download that grows beyond this is not a model.
MAX_DOWNLOAD_BYTES = 4 * 1024**3


def download_model(name: str, accept_license: bool, progress: Progress | None = None, timeout: float = 60.0) -> Path:
    """Fetch the download entry ``name`` into the cache and return the file's path.

    A cached file whose sha256 matches the catalogue is returned without any network access, so a file put
    there by hand (see :func:`cmedl.catalogue.cached_model_path`) works offline. Otherwise the file is streamed
    from the entry's url into a temporary file, hashed on the way, and renamed into place only when the sha256
    matches and the model card reads; on any failure or cancel nothing is kept. Progress is reported as
    stage ``download`` in bytes. The license must be accepted (``accept_license``) or a
    :class:`ConfigError` quoting it is raised.
    """
    progress = progress if progress is not None else Progress()
    entry = download_entry(name)
    assert entry.url is not None and entry.sha256 is not None
    if not accept_license:
        raise ConfigError(
            f"{name} is distributed under this license: {_flat(entry.license)}; accept it to download "
            "(--accept-license)"
        )
    target = cached_model_path(name)
    if target.is_file() and _sha256_of(target) == entry.sha256:
        require_segmentor(target, peek_model_card(target))
        return target
    cache_dir(create=True)
    with atomic_write(target) as temp:
        digest = _fetch(entry, temp, progress, timeout, target)
        if digest != entry.sha256:
            raise ModelFileError(
                f"downloaded file for {name} from {entry.url} does not match its sha256 ({digest} instead of "
                f"{entry.sha256}): corrupted or tampered download; nothing was kept"
            )
        _check_downloaded(temp, f"downloaded file for {name} from {entry.url}")
    return target


def _check_downloaded(path: Path, shown: str) -> None:
    try:
        card = peek_model_card(path)
    except ModelFileError as error:
        raise ModelFileError(f"{shown} is not a usable model ({error}); nothing was kept") from None
    try:
        require_segmentor(path, card)
    except ModelFileError:
        raise ModelFileError(
            f"{shown} holds a {card.get('kind')} model, not a tumour segmentation model; nothing was kept"
        ) from None


def _fetch(entry: ModelEntry, temp: Path, progress: Progress, timeout: float, target: Path) -> str:
    """Stream ``entry.url`` into ``temp``; returns the sha256 of what was written."""
    assert entry.url is not None
    by_hand = f"without network, place the file by hand at {target} (sha256 {entry.sha256})"
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(entry.url, timeout=timeout) as response, open(temp, "wb") as out:
            announced = response.headers.get("Content-Length")
            total = int(announced) if announced and announced.isdigit() else (entry.size_bytes or 0)
            limit = max(total, entry.size_bytes or 0) or MAX_DOWNLOAD_BYTES
            progress.update("download", 0, total, "bytes")
            while True:
                block = response.read(BLOCK_BYTES)
                if not block:
                    break
                done += len(block)
                if done > limit:
                    raise ModelFileError(
                        f"download of {entry.name} from {entry.url} is larger than the expected {limit} bytes; "
                        "nothing was kept"
                    )
                digest.update(block)
                _write(out, block, target)
                progress.update("download", done, max(total, done), "bytes")
    except CMEDLError:
        # A cancel, a full disk or an oversized download: already a one-line error of its own kind.
        raise
    except (OSError, http.client.HTTPException, ValueError) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        raise InputError(f"cannot download {entry.name} from {entry.url}: {_flat(str(reason))}; {by_hand}") from None
    return digest.hexdigest()


def _write(out: IO[bytes], block: bytes, target: Path) -> None:
    # A full disk is the user's to fix (exit code 6), not a network failure; it must not be reported as one.
    try:
        out.write(block)
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from None


def _sha256_of(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as error:
        raise ModelFileError(f"{path} cannot be read: {error.strerror or error}") from None


def _flat(text: str) -> str:
    return " ".join(text.split())


def clear_cache() -> int:
    """Delete every downloaded model file (and leftovers of interrupted downloads); returns how many models."""
    folder = cache_dir()
    if not folder.is_dir():
        return 0
    removed = 0
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        finished = path.name.endswith(MODEL_SUFFIX) and not path.name.startswith(".")
        if not finished and not path.name.endswith(PARTIAL_SUFFIX):
            continue
        try:
            path.unlink()
        except OSError as error:
            raise OutputError(f"cannot remove {path}: {error.strerror or error}") from None
        removed += int(finished)
    return removed
