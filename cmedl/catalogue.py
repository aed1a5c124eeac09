"""The models a user can pick by name: the built-in demo model, registered models and downloadable models.

``cmedl segment --model M`` accepts a catalogue name or a path to a model file. The catalogue has three
sources, listed in this order by :func:`list_models`:

- ``builtin``: the demo model shipped in ``Resources/Models``;
- ``user``: model files registered with :func:`add_model` (``cmedl models add``), kept in
  ``<home>/models/<name>.safetensors``;
- ``download``: entries of catalogue JSON files (the shipped ``cmedl/resources/model_catalogue.json``, the
  files named in ``CMEDL_CATALOGUE`` and ``<home>/catalogue.json``), fetched by :func:`download_model`
  into ``<home>/cache/<name>.safetensors`` and checked against their sha256.

``<home>`` is ``CMEDL_HOME`` if set, else ``~/.cmedl``. A catalogue file looks like::

    {"format": "cmedl-catalogue", "version": 1,
     "models": [{"name": "...", "title": "...", "description": "...", "license": "...",
                 "url": "https://...", "sha256": "<64 hex digits>", "size_bytes": 12345678}]}

This module only needs the standard library: a Slicer module lists models and shows their model cards
before torch, numpy or safetensors are installed, so model cards are read from the safetensors header
directly (:func:`peek_model_card`) instead of through :mod:`cmedl.modelfile`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import shutil
import struct
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmedl.errors import CMEDLError, ConfigError, InputError, ModelFileError, OutputError
from cmedl.progress import Progress

BUILTIN_DEMO = "demo"
_RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
BUILTIN_MODELS = {BUILTIN_DEMO: _RESOURCES / "Models" / "cmedl-demo-unet.safetensors"}

SOURCE_BUILTIN = "builtin"
SOURCE_USER = "user"
SOURCE_DOWNLOAD = "download"

HOME_ENV = "CMEDL_HOME"
CATALOGUE_ENV = "CMEDL_CATALOGUE"
SHIPPED_CATALOGUE = Path(__file__).resolve().parent / "resources" / "model_catalogue.json"
CATALOGUE_FORMAT = "cmedl-catalogue"
CATALOGUE_VERSION = 1
MODEL_SUFFIX = ".safetensors"

# The model file's header keys; cmedl.modelfile (which imports torch) takes them from here.
CARD_KEY = "cmedl.model_card"
FORMAT_KEY = "cmedl.format"
FORMAT_NAME = "cmedl-model"
SEGMENTOR_KIND = "segmentor"

# A model card is a few kilobytes; a header length beyond this is a damaged or foreign file, and reading it
# would only waste memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Without a size in the catalogue or from the server, a download that grows beyond this is not a model.
MAX_DOWNLOAD_BYTES = 4 * 1024**3
_BLOCK_BYTES = 1 << 20
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_URL_SCHEMES = ("http", "https", "file")
_PARTIAL_SUFFIX = ".partial"


# -- where things live --------------------------------------------------------------------------------


def cmedl_home() -> Path:
    """The CMEDL home folder: ``CMEDL_HOME`` if set, else ``~/.cmedl`` (not created here)."""
    configured = os.environ.get(HOME_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cmedl"


def user_models_dir(create: bool = False) -> Path:
    """Folder of the models registered with :func:`add_model`; created only when ``create`` is true."""
    return _folder(cmedl_home() / "models", create)


def cache_dir(create: bool = False) -> Path:
    """Folder of downloaded model files; created only when ``create`` is true."""
    return _folder(cmedl_home() / "cache", create)


def cached_model_path(name: str) -> Path:
    """Where the downloaded file of catalogue entry ``name`` lives (or is placed by hand for offline use)."""
    return cache_dir() / f"{name}{MODEL_SUFFIX}"


def _folder(path: Path, create: bool) -> Path:
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create folder {path}: {error.strerror or error}") from None
    return path


# -- model cards without torch ------------------------------------------------------------------------


def peek_model_card(path: str | Path) -> dict[str, Any]:
    """The model card of a CMEDL model file as a plain dict, read from the safetensors header alone.

    Checks what can be checked without the weights: the header is well formed, the file is as long as the
    header says (a truncated download is caught), and the metadata carries the CMEDL format marker and a
    model card naming at least the model and its architecture. Every failure is a :class:`ModelFileError`
    with one line naming the file.
    """
    path = Path(path)
    header = _read_header(path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path.name} is not a readable model file (damaged safetensors metadata)")
    marker = metadata.get(FORMAT_KEY)
    if not isinstance(marker, str) or not marker.startswith(FORMAT_NAME) or CARD_KEY not in metadata:
        raise ModelFileError(f"{path.name} is a safetensors file but not a CMEDL model (no model card)")
    try:
        card = json.loads(metadata[CARD_KEY])
    except (TypeError, ValueError, RecursionError):
        raise ModelFileError(f"{path.name} has a damaged model card") from None
    if not isinstance(card, dict):
        raise ModelFileError(f"{path.name} has a damaged model card (not a JSON object)")
    missing = sorted({"name", "architecture"} - set(card))
    if missing:
        raise ModelFileError(f"{path.name}: model card lacks {', '.join(missing)}")
    check_card_values(card, path.name)
    return card


# Sane ranges of the model card values inference relies on; outside them a card is damaged or hand-edited.
CARD_PATCH_SIZE_RANGE = (8, 4096)
CARD_SPACING_RANGE_MM = (0.01, 50.0)
CARD_WIDTH_RANGE = (1, 1024)
CARD_MAX_CLASSES = 256  # labelmaps are written as uint8
CARD_MAX_IN_CHANNELS = 64
# Architecture options that set a network's width: a huge value would allocate gigabytes before failing.
_WIDTH_OPTIONS = ("base_channels", "growth_rate", "stem_channels")


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
            refuse(f"{key} {_short(value)} is not an integer from {low} to {high}")
        return value

    integer("patch_size", *CARD_PATCH_SIZE_RANGE)
    integer("in_channels", 1, CARD_MAX_IN_CHANNELS)
    classes = integer("num_classes", 2, CARD_MAX_CLASSES)
    if "spacing_mm" in card:
        spacing = _numbers(card["spacing_mm"])
        low, high = CARD_SPACING_RANGE_MM
        if spacing is None or len(spacing) != 2 or not all(low <= value <= high for value in spacing):
            refuse(f"spacing_mm {_short(card['spacing_mm'])} is not two values from {low:g} to {high:g} mm")
    if "hu_window" in card:
        window = _numbers(card["hu_window"])
        if window is None or len(window) != 2:
            refuse(f"hu_window {_short(card['hu_window'])} is not two finite HU values")
        elif not window[0] < window[1]:
            refuse(f"hu_window {_short(card['hu_window'])} is empty or reversed (low must be below high)")
    options = card.get("architecture_options", {})
    if not isinstance(options, dict):
        refuse("architecture_options is not a JSON object")
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            refuse(f"architecture option {key} is {value!r}")
        if key in _WIDTH_OPTIONS and (not _is_int(value) or not CARD_WIDTH_RANGE[0] <= value <= CARD_WIDTH_RANGE[1]):
            refuse(f"architecture option {key} {_short(value)} is not an integer from {CARD_WIDTH_RANGE[0]} to "
                   f"{CARD_WIDTH_RANGE[1]}")  # fmt: skip
    labels = card.get("labels", [])
    if not isinstance(labels, list):
        refuse("labels is not a list")
    values: list[int] = []
    top = (classes or 2) - 1
    for label in labels:
        value = label.get("value") if isinstance(label, dict) else None
        if not _is_int(value) or not 1 <= value <= top:
            refuse(f"label value {_short(value)} is not an output class of the network (1 to {top})")
        if value in values:
            refuse(f"label value {value} is listed twice")
        if not isinstance(label.get("name"), str):
            refuse(f"label {value} has no name")
        values.append(value)


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


def _read_header(path: Path) -> dict[str, Any]:
    """The parsed safetensors header of ``path``, after checking that the data section has the promised length."""
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
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


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """What a model card box shows, as display-ready values; tolerates cards with fields missing.

    Keys: ``name``, ``kind``, ``method``, ``architecture`` (with its options), ``intended_use``, ``license``,
    ``description``, ``training_data`` and ``metrics`` (one line each), ``labels`` (a list of dicts with
    ``value``, ``name`` and ``color`` as three floats in 0..1), ``engine_version`` and ``created``.
    """
    architecture = str(card.get("architecture", "unknown"))
    options = card.get("architecture_options")
    if isinstance(options, dict) and options:
        architecture += " (" + ", ".join(f"{key}={value}" for key, value in sorted(options.items())) + ")"
    labels = []
    for label in card.get("labels") or []:
        if not isinstance(label, dict):
            continue
        color = label.get("color")
        if not (isinstance(color, (list, tuple)) and len(color) == 3):
            color = (0.5, 0.5, 0.5)
        labels.append(
            {
                "value": label.get("value"),
                "name": str(label.get("name", "")),
                "color": tuple(float(c) for c in color),
            }
        )
    return {
        "name": str(card.get("name", "")),
        "kind": str(card.get("kind", SEGMENTOR_KIND)),
        "method": str(card.get("method", "")),
        "architecture": architecture,
        "intended_use": str(card.get("intended_use", "")),
        "license": str(card.get("license", "")),
        "description": str(card.get("description", "")),
        "training_data": _one_line(card.get("training_data")),
        "metrics": _one_line(card.get("metrics")),
        "labels": labels,
        "engine_version": str(card.get("engine_version", "")),
        "created": str(card.get("created", "")),
    }


def _one_line(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}: {_short(item)}" for key, item in value.items())
    return "" if value is None else _short(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# -- catalogue entries ---------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    """One model of the catalogue.

    Attributes:
        name: the catalogue name, what ``--model NAME`` takes.
        source: ``builtin``, ``user`` or ``download``.
        path: the local model file, None when it is not present (a download entry not yet fetched).
        title / description / license: from the model card (built-in and user models) or the catalogue file.
        url / sha256: where a download entry is fetched from and the sha256 its file must have.
        size_bytes: the file size (the catalogue's figure for a download entry not yet fetched).
        card: the model card when the local file was read (None otherwise).
    """

    name: str
    source: str
    path: Path | None
    title: str = ""
    description: str = ""
    license: str = ""
    url: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    card: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        """Whether the model file is on this computer."""
        return self.path is not None and self.path.is_file()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (without the card)."""
        return {
            "name": self.name,
            "source": self.source,
            "available": self.available,
            "path": str(self.path) if self.path is not None else None,
            "title": self.title,
            "description": self.description,
            "license": self.license,
            "url": self.url,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
        }


def catalogue_files() -> list[Path]:
    """The catalogue JSON files read, in order: shipped, then ``CMEDL_CATALOGUE``, then ``<home>/catalogue.json``.

    The shipped file and the home file are skipped when absent; a file named in ``CMEDL_CATALOGUE`` must exist.
    """
    files = [SHIPPED_CATALOGUE] if SHIPPED_CATALOGUE.is_file() else []
    for item in os.environ.get(CATALOGUE_ENV, "").split(os.pathsep):
        if item.strip():
            path = Path(item.strip()).expanduser()
            if not path.is_file():
                raise ConfigError(f"catalogue file {path} (named in {CATALOGUE_ENV}) not found")
            files.append(path)
    home_file = cmedl_home() / "catalogue.json"
    if home_file.is_file():
        files.append(home_file)
    return files


def load_catalogue(files: Iterable[str | Path] | None = None) -> list[ModelEntry]:
    """The download entries of the catalogue files (default: :func:`catalogue_files`).

    A later file's entry replaces an earlier one of the same name, so a site can point a shipped entry at
    its own server. ``path`` is set where the file is in the cache. A malformed file is a :class:`ConfigError`.
    """
    entries: dict[str, ModelEntry] = {}
    for file in catalogue_files() if files is None else [Path(f) for f in files]:
        for entry in _read_catalogue_file(file):
            entries[entry.name] = entry
    return list(entries.values())


def _read_catalogue_file(path: Path) -> list[ModelEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"catalogue file {path} cannot be read: {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"catalogue file {path} is not valid JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != CATALOGUE_FORMAT:
        raise ConfigError(f'catalogue file {path} is not a CMEDL catalogue (no "format": "{CATALOGUE_FORMAT}")')
    version = data.get("version")
    if version != CATALOGUE_VERSION:
        raise ConfigError(
            f"catalogue file {path} has version {version!r}; this engine reads version {CATALOGUE_VERSION}"
        )
    models = data.get("models")
    if not isinstance(models, list):
        raise ConfigError(f'catalogue file {path}: "models" must be a list')
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(models):
        entry = _catalogue_entry(path, index, item)
        if entry.name in seen:
            raise ConfigError(f"catalogue file {path}: model name {entry.name!r} appears twice")
        seen.add(entry.name)
        entries.append(entry)
    return entries


def _catalogue_entry(path: Path, index: int, item: Any) -> ModelEntry:
    where = f"catalogue file {path}, model #{index + 1}"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: not a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'")
    where = f"catalogue file {path}, model {name!r}"
    if name in BUILTIN_MODELS:
        raise ConfigError(f"{where}: the name of a built-in model cannot be reused")
    for key in ("title", "description", "license", "url", "sha256"):
        if key in item and not isinstance(item[key], str):
            raise ConfigError(f"{where}: {key} must be a string")
    url = item.get("url", "")
    if urllib.parse.urlsplit(url).scheme.lower() not in _URL_SCHEMES or "://" not in url:
        raise ConfigError(f"{where}: url {url!r} must be an http://, https:// or file:// address")
    sha256 = item.get("sha256", "").lower()
    if not _SHA256_PATTERN.fullmatch(sha256):
        raise ConfigError(f"{where}: sha256 must be 64 hexadecimal digits")
    license_text = item.get("license", "").strip()
    if not license_text:
        raise ConfigError(f"{where}: license is required (a download is only made once its license is accepted)")
    size = item.get("size_bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ConfigError(f"{where}: size_bytes must be a whole number of bytes")
    cached = cached_model_path(name)
    return ModelEntry(
        name=name,
        source=SOURCE_DOWNLOAD,
        path=cached if cached.is_file() else None,
        title=item.get("title", "") or name,
        description=item.get("description", ""),
        license=license_text,
        url=url,
        sha256=sha256,
        size_bytes=size,
    )


def _builtin_entry(name: str) -> ModelEntry:
    path = BUILTIN_MODELS[name]
    entry = ModelEntry(name=name, source=SOURCE_BUILTIN, path=path if path.is_file() else None, title=name)
    if entry.path is not None:
        entry.size_bytes = path.stat().st_size
        # A damaged built-in file is still listed: resolving it reports the damage where it matters.
        try:
            _fill_from_card(entry, peek_model_card(path))
        except ModelFileError:
            pass
    return entry


def _user_entry(path: Path) -> ModelEntry:
    entry = ModelEntry(name=path.name[: -len(MODEL_SUFFIX)], source=SOURCE_USER, path=path)
    entry.size_bytes = path.stat().st_size
    _fill_from_card(entry, peek_model_card(path))
    return entry


def _fill_from_card(entry: ModelEntry, card: dict[str, Any]) -> None:
    entry.card = card
    entry.title = str(card.get("name") or entry.name)
    entry.description = str(card.get("description", ""))
    entry.license = str(card.get("license", ""))


def _user_model_files() -> list[Path]:
    folder = user_models_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{MODEL_SUFFIX}") if p.is_file() and not p.name.startswith("."))


def list_models(problems: list[str] | None = None) -> list[ModelEntry]:
    """Every model of the catalogue: built-in first, then user models (by name), then download entries.

    A user model file that cannot be read, or whose name is not a valid catalogue name or clashes with a
    built-in model, is left out; a one-line reason is appended to ``problems`` when a list is given. A
    download entry whose name a user model already has is left out the same way (the user model wins: it
    is the file the user registered). A malformed catalogue file raises :class:`ConfigError`.
    """
    found = problems if problems is not None else []
    entries = [_builtin_entry(name) for name in BUILTIN_MODELS]
    taken = set(BUILTIN_MODELS)
    for path in _user_model_files():
        name = path.name[: -len(MODEL_SUFFIX)]
        if not _NAME_PATTERN.fullmatch(name):
            found.append(f"{path}: {name!r} is not a valid model name (letters, digits, '.', '_', '-'); skipped")
            continue
        if name in taken:
            found.append(f"{path}: the name {name!r} belongs to a built-in model; skipped")
            continue
        try:
            entries.append(_user_entry(path))
        except ModelFileError as error:
            found.append(f"{path}: {error}; skipped")
            continue
        taken.add(name)
    for entry in load_catalogue():
        if entry.name in taken:
            found.append(f"download entry {entry.name!r} is hidden by the user model of the same name")
            continue
        entries.append(entry)
    return entries


def list_models_tolerantly(problems: list[str]) -> list[ModelEntry]:
    """:func:`list_models` for a panel that must open whatever the catalogue files hold.

    A catalogue file that cannot be used (named in ``CMEDL_CATALOGUE`` but missing, not JSON, not a CMEDL
    catalogue, a bad entry) hides only its own download entries, and its one-line reason is appended to
    ``problems`` after the reasons :func:`list_models` gives; built-in and user models are always listed.
    """
    try:
        return list_models(problems)
    except ConfigError:
        pass  # the user models' reasons are in ``problems`` already: list_models reads the catalogue files last
    home_file = cmedl_home() / "catalogue.json"
    named = [Path(item.strip()).expanduser() for item in os.environ.get(CATALOGUE_ENV, "").split(os.pathsep)]
    downloads: dict[str, ModelEntry] = {}
    for path in [SHIPPED_CATALOGUE, *(path for path in named if str(path) != "."), home_file]:
        if path in (SHIPPED_CATALOGUE, home_file) and not path.is_file():
            continue
        try:
            downloads.update((entry.name, entry) for entry in _read_catalogue_file(path))
        except ConfigError as error:
            problems.append(f"{error}; its download entries are not listed")
    entries = [_builtin_entry(name) for name in BUILTIN_MODELS]
    for path in _user_model_files():
        try:
            entry = _user_entry(path)
        except ModelFileError:
            continue
        if _NAME_PATTERN.fullmatch(entry.name) and entry.name not in BUILTIN_MODELS:
            entries.append(entry)
    taken = {entry.name for entry in entries}
    return entries + [entry for name, entry in downloads.items() if name not in taken]


def find_model(name: str) -> ModelEntry:
    """The catalogue entry called ``name``; an unknown name is an :class:`InputError` listing the known ones."""
    entries = list_models()
    for entry in entries:
        if entry.name == name:
            return entry
    raise InputError(f"no model named {name!r} in the catalogue (known names: {_names(entries)})")


def _names(entries: Iterable[ModelEntry]) -> str:
    return ", ".join(entry.name for entry in entries) or "none"


# -- user models ---------------------------------------------------------------------------------------


def add_model(
    path: str | Path,
    name: str | None = None,
    overwrite: bool = False,
    check: Callable[[Path], object] | None = None,
) -> ModelEntry:
    """Register a segmentation model file under ``name`` (default: the file name without ``.safetensors``).

    The file is checked (a CMEDL model of kind ``segmentor`` with usable model card values) and copied into
    the user models folder under a temporary name that is renamed when the copy is complete and checked
    again. ``check`` is a deeper check of the file that needs torch, run before anything is copied:
    ``cmedl models add`` passes :func:`cmedl.modelfile.check_model_file`, which builds the network and
    loads the weights, so a file that cannot be loaded is refused at registration, not at segment time
    (this module stays free of torch, so the caller supplies it). A name already taken by a user model is
    refused unless ``overwrite``; the names of built-in and download entries are always refused.
    """
    source = Path(path)
    card = peek_model_card(source)
    _require_segmentor(source, card)
    if check is not None:
        check(source)
    if name is None:
        name = source.name[: -len(MODEL_SUFFIX)] if source.name.endswith(MODEL_SUFFIX) else source.stem
    if not _NAME_PATTERN.fullmatch(name):
        raise InputError(f"{name!r} is not a valid model name: use letters, digits, '.', '_' or '-' (see --name)")
    if name in BUILTIN_MODELS:
        raise InputError(f"{name!r} is the name of a built-in model; choose another name with --name")
    if name in {entry.name for entry in load_catalogue()}:
        raise InputError(f"{name!r} is the name of a downloadable catalogue model; choose another name with --name")
    target = user_models_dir(create=True) / f"{name}{MODEL_SUFFIX}"
    if target.exists() and not overwrite:
        raise InputError(f"a user model named {name!r} already exists ({target}); --overwrite replaces it")
    _copy_checked(source, target)
    return _user_entry(target)


def _require_segmentor(path: Path, card: dict[str, Any]) -> None:
    kind = card.get("kind", SEGMENTOR_KIND)
    if kind != SEGMENTOR_KIND:
        raise ModelFileError(
            f"{path.name} holds a {kind} model, not a tumour segmentation model; "
            "only segmentation models go into the catalogue"
        )


def _copy_checked(source: Path, target: Path) -> None:
    temp = _temp_path(target)
    try:
        try:
            shutil.copyfile(source, temp)
        except OSError as error:
            raise OutputError(f"cannot copy {source} to {target}: {error.strerror or error}") from None
        # The source may change while it is copied; the copy is what gets registered, so the copy is checked.
        _require_segmentor(source, peek_model_card(temp))
        _finish(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _temp_path(target: Path) -> Path:
    try:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_PARTIAL_SUFFIX, dir=target.parent)
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
    os.close(handle)
    return Path(name)


def _finish(temp: Path, target: Path) -> None:
    try:
        os.chmod(temp, _default_file_mode())
        os.replace(temp, target)
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from None


def _default_file_mode() -> int:
    # Temporary files are created private (0600); the finished file gets the mode a plain open() would give.
    # os.umask can only be read by setting it, so it is restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def remove_model(name: str) -> Path:
    """Delete the user model ``name``; returns the removed file. Built-in and download entries are refused."""
    if name in BUILTIN_MODELS:
        raise InputError(f"{name!r} is a built-in model and cannot be removed")
    target = user_models_dir() / f"{name}{MODEL_SUFFIX}"
    if _NAME_PATTERN.fullmatch(name) and target.is_file():
        try:
            target.unlink()
        except OSError as error:
            raise OutputError(f"cannot remove {target}: {error.strerror or error}") from None
        return target
    if name in {entry.name for entry in load_catalogue()}:
        raise InputError(
            f"{name!r} is a downloadable catalogue model, not a user model; `cmedl models clear-cache` "
            "removes downloaded files"
        )
    users = ", ".join(p.name[: -len(MODEL_SUFFIX)] for p in _user_model_files()) or "none"
    raise InputError(f"no user model named {name!r} (user models: {users})")


# -- downloads -----------------------------------------------------------------------------------------


def download_model(name: str, accept_license: bool, progress: Progress | None = None, timeout: float = 60.0) -> Path:
    """Fetch the download entry ``name`` into the cache and return the file's path.

    A cached file whose sha256 matches the catalogue is returned without any network access, so a file put
    there by hand (see :func:`cached_model_path`) works offline. Otherwise the file is streamed from the
    entry's url into a temporary file, hashed on the way, and renamed into place only when the sha256
    matches and the model card reads; on any failure or cancel nothing is kept. Progress is reported as
    stage ``download`` in bytes. The license must be accepted (``accept_license``) or a
    :class:`ConfigError` quoting it is raised.
    """
    progress = progress if progress is not None else Progress()
    entry = _download_entry(name)
    assert entry.url is not None and entry.sha256 is not None
    if not accept_license:
        raise ConfigError(
            f"{name} is distributed under this license: {_flat(entry.license)}; accept it to download "
            "(--accept-license)"
        )
    target = cached_model_path(name)
    if target.is_file() and _sha256_of(target) == entry.sha256:
        _require_segmentor(target, peek_model_card(target))
        return target
    cache_dir(create=True)
    temp = _temp_path(target)
    try:
        digest = _fetch(entry, temp, progress, timeout, target)
        if digest != entry.sha256:
            raise ModelFileError(
                f"downloaded file for {name} from {entry.url} does not match its sha256 ({digest} instead of "
                f"{entry.sha256}): corrupted or tampered download; nothing was kept"
            )
        _check_downloaded(temp, f"downloaded file for {name} from {entry.url}")
        _finish(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def _download_entry(name: str) -> ModelEntry:
    entries = load_catalogue()
    for entry in entries:
        if entry.name == name:
            return entry
    if name in BUILTIN_MODELS:
        raise InputError(f"{name!r} is a built-in model; there is nothing to download")
    if _NAME_PATTERN.fullmatch(name) and (user_models_dir() / f"{name}{MODEL_SUFFIX}").is_file():
        raise InputError(f"{name!r} is a user model; there is nothing to download")
    raise InputError(f"no downloadable model named {name!r} (downloadable: {_names(entries)})")


def _check_downloaded(path: Path, shown: str) -> None:
    try:
        card = peek_model_card(path)
    except ModelFileError as error:
        raise ModelFileError(f"{shown} is not a usable model ({error}); nothing was kept") from None
    try:
        _require_segmentor(path, card)
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
                block = response.read(_BLOCK_BYTES)
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


def _write(out: Any, block: bytes, target: Path) -> None:
    # A full disk is the user's to fix (exit code 6), not a network failure; it must not be reported as one.
    try:
        out.write(block)
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from None


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK_BYTES), b""):
                digest.update(block)
    except OSError as error:
        raise ModelFileError(f"{path} cannot be read: {error.strerror or error}") from None
    return digest.hexdigest()


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
        if not finished and not path.name.endswith(_PARTIAL_SUFFIX):
            continue
        try:
            path.unlink()
        except OSError as error:
            raise OutputError(f"cannot remove {path}: {error.strerror or error}") from None
        removed += int(finished)
    return removed


# -- resolving --model -----------------------------------------------------------------------------


def builtin_model_path(name: str = BUILTIN_DEMO) -> Path:
    """Path of a built-in model file; raises :class:`ModelFileError` when the file is not installed."""
    path = BUILTIN_MODELS[name]
    if not path.is_file():
        raise ModelFileError(f"the built-in model {name!r} is not installed (expected {path})")
    return path


def resolve_model(name_or_path: str | None) -> Path:
    """A model file path for a catalogue name, a file path, or None (the built-in demo model).

    Names are looked up in this order: built-in, user model, an existing file of that path, download entry.
    Catalogue files are only read when the first three do not match, so a damaged site catalogue does not
    stop the built-in, user or file models from working. A download entry not in the cache is a
    :class:`ModelFileError` saying how to fetch it.
    """
    if not name_or_path:
        return builtin_model_path()
    if name_or_path in BUILTIN_MODELS:
        return builtin_model_path(name_or_path)
    if _NAME_PATTERN.fullmatch(name_or_path):
        user_file = user_models_dir() / f"{name_or_path}{MODEL_SUFFIX}"
        if user_file.is_file():
            return user_file
    path = Path(name_or_path)
    if path.exists():
        return path
    entries = list_models()
    for entry in entries:
        if entry.name == name_or_path and entry.source == SOURCE_DOWNLOAD:
            if entry.path is None:
                raise ModelFileError(
                    f"model {name_or_path!r} is not downloaded yet: run `cmedl models download {name_or_path} "
                    f"--accept-license` (or place the file at {cached_model_path(name_or_path)})"
                )
            return entry.path
    raise ModelFileError(f"no model named {name_or_path!r} and no such file (known names: {_names(entries)})")
