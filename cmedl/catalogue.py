"""The models a user can pick by name: the built-in demo model, registered models and downloadable models.

``cmedl segment --model M`` accepts a catalogue name or a path to a model file. The catalogue has three
sources, listed in this order by :func:`list_models`:

- ``builtin``: the demo model shipped in ``Resources/Models``;
- ``user``: model files registered with :func:`add_model` (``cmedl models add``), kept in
  ``<home>/models/<name>.safetensors``;
- ``download``: entries of catalogue JSON files (the shipped ``cmedl/resources/model_catalogue.json``, the
  files named in ``CMEDL_CATALOGUE`` and ``<home>/catalogue.json``), available once their file is in
  ``<home>/cache/<name>.safetensors``; :mod:`cmedl.downloads` fetches them there.

``<home>`` is ``CMEDL_HOME`` if set, else ``~/.cmedl``. A catalogue file looks like::

    {"format": "cmedl-catalogue", "version": 1,
     "models": [{"name": "...", "title": "...", "description": "...", "license": "...",
                 "url": "https://...", "sha256": "<64 hex digits>", "size_bytes": 12345678}]}

This module only needs the standard library: a Slicer module lists models and shows their model cards
before torch, numpy or safetensors are installed, so model cards are read from the safetensors header
directly (:func:`cmedl.filebase.peek_model_card`) instead of through :mod:`cmedl.modelfile`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmedl.errors import ConfigError, InputError, ModelFileError, OutputError
from cmedl.filebase import SEGMENTOR_KIND, atomic_write, peek_model_card, shown_value

BUILTIN_DEMO = "demo"
_RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
BUILTIN_MODELS = {BUILTIN_DEMO: _RESOURCES / "Models" / "cmedl-demo-unet.safetensors"}
#: sha256 of each built-in model file as shipped (a retrained file needs its new value here; a test says so)
BUILTIN_SHA256 = {BUILTIN_DEMO: "e49385c0b0087f5da157c66fb4def34fddd59dcc5032a67adcb6558144dd3b83"}

SOURCE_BUILTIN = "builtin"
SOURCE_USER = "user"
SOURCE_DOWNLOAD = "download"

HOME_ENV = "CMEDL_HOME"
CATALOGUE_ENV = "CMEDL_CATALOGUE"
SHIPPED_CATALOGUE = Path(__file__).resolve().parent / "resources" / "model_catalogue.json"
CATALOGUE_FORMAT = "cmedl-catalogue"
CATALOGUE_VERSION = 1
MODEL_SUFFIX = ".safetensors"

_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_URL_SCHEMES = ("http", "https", "file")


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


# -- model card boxes ---------------------------------------------------------------------------------


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
        return ", ".join(f"{key}: {shown_value(item)}" for key, item in value.items())
    return "" if value is None else shown_value(value)


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


def download_entry(name: str) -> ModelEntry:
    """The download entry called ``name``; for any other name an :class:`InputError` saying what it is instead."""
    entries = load_catalogue()
    for entry in entries:
        if entry.name == name:
            return entry
    if name in BUILTIN_MODELS:
        raise InputError(f"{name!r} is a built-in model; there is nothing to download")
    if _NAME_PATTERN.fullmatch(name) and (user_models_dir() / f"{name}{MODEL_SUFFIX}").is_file():
        raise InputError(f"{name!r} is a user model; there is nothing to download")
    raise InputError(f"no downloadable model named {name!r} (downloadable: {_names(entries)})")


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
    require_segmentor(source, card)
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


def require_segmentor(path: Path, card: dict[str, Any]) -> None:
    """Refuse a model file whose ``card`` is not of a segmentation model: only those go into the catalogue."""
    kind = card.get("kind", SEGMENTOR_KIND)
    if kind != SEGMENTOR_KIND:
        raise ModelFileError(
            f"{path.name} holds a {kind} model, not a tumour segmentation model; "
            "only segmentation models go into the catalogue"
        )


def _copy_checked(source: Path, target: Path) -> None:
    with atomic_write(target) as temp:
        try:
            shutil.copyfile(source, temp)
        except OSError as error:
            raise OutputError(f"cannot copy {source} to {target}: {error.strerror or error}") from None
        # The source may change while it is copied; the copy is what gets registered, so the copy is checked.
        require_segmentor(source, peek_model_card(temp))


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


# -- resolving --model -----------------------------------------------------------------------------


def builtin_model_path(name: str = BUILTIN_DEMO) -> Path:
    """Path of a built-in model file; raises :class:`ModelFileError` when the file is not installed."""
    path = BUILTIN_MODELS[name]
    if not path.is_file():
        raise ModelFileError(f"the built-in model {name!r} is not installed (expected {path})")
    return path


def check_model_integrity(path: str | Path, sha256: str) -> None:
    """Refuse a built-in or downloaded model file whose bytes are not the ones the catalogue knows.

    A flipped byte in the weights still loads (the shapes are right) and then segments wrongly without a sign;
    a built-in file is known by :data:`BUILTIN_SHA256`, a downloaded one by its catalogue entry's sha256 (checked
    when it was downloaded, and again here, since a file can be damaged on the disk later). Other files (a user's,
    a run's) have no reference to check against. ``sha256`` is the file's, already computed by the caller.
    """
    resolved = Path(path).resolve()
    for name, builtin in BUILTIN_MODELS.items():
        if builtin.resolve() == resolved and sha256 != BUILTIN_SHA256[name]:
            raise ModelFileError(
                f"the built-in model file {resolved.name} is damaged: its sha256 is {sha256[:12]}..., not the "
                f"shipped {BUILTIN_SHA256[name][:12]}...; reinstall the extension (or the package)"
            )
    if resolved.parent != cache_dir().resolve():
        return
    try:
        entries = load_catalogue()
    except ConfigError:
        return  # a damaged site catalogue says so where it is listed; it must not stop a segmentation
    for entry in entries:
        if entry.sha256 and cached_model_path(entry.name).resolve() == resolved and sha256 != entry.sha256:
            raise ModelFileError(
                f"the downloaded model file {resolved.name} is damaged: its sha256 is {sha256[:12]}..., not the "
                f"catalogue's {entry.sha256[:12]}...; remove it (`cmedl models clear-cache`) and download it again"
            )


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
