"""The values of the training panel, and the engine configuration they stand for.

:class:`TrainingSettings` holds what the panel shows (defaults: the engine's :class:`TrainConfig` defaults,
which are the paper's), :class:`DataFolders` the folders the user chose. :func:`training_config` turns both
into a validated ``TrainConfig`` for a run folder, so that every inconsistent value is refused with the
engine's own message before anything starts, and :func:`settings_problem` gives that message for the panel
while the user is still editing.

"Start from model" (fine-tuning) is the ``init`` setting: :func:`settings_from_model` gives the values a model
file, catalogue name or run folder implies (its architecture, patch size, spacing, HU window and the fine-tuning
learning rate), and :func:`start_from_model` puts them into the panel's settings. The configuration is then
checked against the model by the engine (:func:`cmedl.training.finetune.apply_init`), like every other value.

The engine reads a dataset as one folder holding ``images/`` and ``labels/``. Users often keep images and
labels elsewhere; then the run folder gets ``datasets/<role>/images`` and ``labels`` links to the chosen
folders, so the data stays where it is and the run records which folders it used.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cmedl.errors import CMEDLError, ConfigError
from cmedl.memory import available_ram_bytes
from cmedl.training.config import TrainConfig
from cmedl.training.finetune import apply_init, fine_tuning_lr, implied_values, resolve_init

RANDOM_VGG = "random"
VGG_RANDOM_NOTE = (
    "random: the contextual loss uses an untrained VGG16 instead of the ImageNet weights of the paper. Meant "
    "for tests and offline experiments; the model card records it as a deviation."
)
VGG_HUB_NOTE = (
    "Empty: the ImageNet VGG16 weights come from torch hub's cache (vgg16-397923af.pth), downloaded once where "
    "a network is available; without them the run stops and says so."
)
VGG_FILE_NOTE = "A saved torchvision VGG16 state dict (.pth or .safetensors) for the contextual loss."

_DEFAULTS = TrainConfig()


@dataclass
class DataFolders:
    """The folders chosen in the panel (empty string: not chosen)."""

    ct_images: str = ""
    ct_labels: str = ""
    mr_images: str = ""
    mr_labels: str = ""
    validation: str = ""  # a dataset folder holding images/ and labels/; empty: hold out a share of the CT cases


@dataclass
class TrainingSettings:
    """The panel's training values; each field is the ``TrainConfig`` field of the same name, except
    ``gpus`` (processes started by torchrun; 1 runs a plain process) and ``extra`` (any other
    ``TrainConfig`` value, for scripts)."""

    method: str = _DEFAULTS.method
    segmentor: str = _DEFAULTS.segmentor
    epochs: int = _DEFAULTS.epochs
    iterations_per_epoch: int = _DEFAULTS.iterations_per_epoch
    batch_size: int = _DEFAULTS.batch_size
    patch_size: int = _DEFAULTS.patch_size
    spacing_mm: float = _DEFAULTS.spacing_mm[0]
    lr_segmentor: float = _DEFAULTS.lr_segmentor
    lr_translator: float = _DEFAULTS.lr_translator
    lambda_adv: float = _DEFAULTS.lambda_adv
    lambda_cyc: float = _DEFAULTS.lambda_cyc
    lambda_cx: float = _DEFAULTS.lambda_cx
    lambda_hint: float = _DEFAULTS.lambda_hint
    lambda_seg: float = _DEFAULTS.lambda_seg
    use_cx: bool = _DEFAULTS.use_cx
    use_cycle: bool = _DEFAULTS.use_cycle
    use_seg_rm: bool = _DEFAULTS.use_seg_rm
    use_seg_pm: bool = _DEFAULTS.use_seg_pm
    validation_fraction: float = _DEFAULTS.validation_fraction
    vgg_weights: str = _DEFAULTS.vgg_weights
    device: str = _DEFAULTS.device
    seed: int = _DEFAULTS.seed
    name: str = _DEFAULTS.name
    init: str = _DEFAULTS.init  # "Start from model": a model file, catalogue name or run folder; empty: from scratch
    freeze_encoder_epochs: int = _DEFAULTS.freeze_encoder_epochs
    warmup_epochs: int = _DEFAULTS.warmup_epochs
    gpus: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def config_values(self) -> dict[str, Any]:
        """The ``TrainConfig`` values these settings set (data folders and run folder excluded)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("gpus", "extra")}
        values["spacing_mm"] = (float(self.spacing_mm), float(self.spacing_mm))
        values.update(self.extra)
        return values


def settings_from_model(model: str | Path) -> dict[str, Any]:
    """The panel values that starting from ``model`` (a model file, catalogue name or run folder) implies.

    Returns :class:`TrainingSettings` field values: ``init`` (``model`` as given), ``segmentor``, ``patch_size``,
    ``spacing_mm`` (the x spacing), ``lr_segmentor`` (the fine-tuning default, a tenth of the from-scratch rate)
    and ``extra`` holding ``segmentor_options`` and ``hu_window`` (and ``spacing_mm`` as a pair when x and y
    differ). A CMEDL run folder also gives ``method`` ``cmedl``, ``lr_translator`` and, in ``extra``, the
    ``translator`` and ``translator_options``: its teacher and translator start from the run too.

    Raises:
        CMEDLError: ``model`` names no readable model (the engine's one-line reason).
    """
    implied = implied_values(resolve_init(str(model)))
    spacing_x, spacing_y = implied["spacing_mm"]
    extra: dict[str, Any] = {"segmentor_options": implied["segmentor_options"], "hu_window": implied["hu_window"]}
    if spacing_x != spacing_y:
        extra["spacing_mm"] = (spacing_x, spacing_y)  # the panel shows one spacing; extra keeps both
    values: dict[str, Any] = {
        "init": str(model),
        "segmentor": implied["segmentor"],
        "patch_size": implied["patch_size"],
        "spacing_mm": spacing_x,
        "lr_segmentor": fine_tuning_lr(_DEFAULTS.lr_segmentor),
    }
    if "translator" in implied:
        values.update(method="cmedl", lr_translator=fine_tuning_lr(_DEFAULTS.lr_translator))
        extra.update(translator=implied["translator"], translator_options=implied["translator_options"])
    values["extra"] = extra
    return values


def start_from_model(settings: TrainingSettings, model: str | Path) -> TrainingSettings:
    """``settings`` with the values ``model`` implies filled in (the others, epochs say, kept).

    An empty ``model`` only clears ``init``: the run then trains from scratch with the values shown.
    """
    if not str(model).strip():
        return replace(settings, init="")
    implied = settings_from_model(model)
    extra = {**settings.extra, **implied.pop("extra")}
    return replace(settings, **implied, extra=extra)


def paper_defaults() -> dict[str, Any]:
    """The engine's defaults (the paper's values) for every :class:`TrainingSettings` field."""
    return {f.name: getattr(TrainingSettings(), f.name) for f in fields(TrainingSettings) if f.name != "extra"}


def vgg_weights_note(value: str) -> str:
    """What a VGG16 weights choice means, for the line under the field."""
    value = (value or "").strip()
    if not value:
        return VGG_HUB_NOTE
    if value == RANDOM_VGG:
        return VGG_RANDOM_NOTE
    return VGG_FILE_NOTE


def settings_problem(settings: TrainingSettings, folders: DataFolders) -> str:
    """Why these settings cannot start a run (one line), or ``""``; nothing is written."""
    try:
        _check_folders(settings, folders)
        placeholder = {
            "ct": folders.ct_images,
            "mr": folders.mr_images if settings.method == "cmedl" else "",
            "validation": folders.validation,
            "out": "new run folder",
        }
        _validated({**settings.config_values(), **placeholder}, settings)
    except CMEDLError as error:
        return str(error)
    return ""


def training_config(settings: TrainingSettings, folders: DataFolders, run_path: str | Path) -> TrainConfig:
    """The validated configuration of a new run in ``run_path`` (data links are made there when needed)."""
    _check_folders(settings, folders)
    run_path = Path(run_path)
    values = settings.config_values()
    values["ct"] = str(dataset_folder(folders.ct_images, folders.ct_labels, run_path / "datasets" / "ct"))
    if settings.method == "cmedl":
        values["mr"] = str(dataset_folder(folders.mr_images, folders.mr_labels or None, run_path / "datasets" / "mr"))
    else:
        values["mr"] = ""
    values["validation"] = str(Path(folders.validation)) if folders.validation else ""
    values["out"] = str(run_path)
    return _validated(values, settings)


def _validated(values: dict[str, Any], settings: TrainingSettings) -> TrainConfig:
    """The engine's configuration of ``values``, checked by the engine (:meth:`TrainConfig.validate`: names,
    ranges, finiteness) so that the panel says exactly what ``cmedl train`` would; only the number of processes
    is the panel's own."""
    if settings.gpus < 1:
        raise ConfigError(f"the number of processes must be at least 1, got {settings.gpus}")
    config = TrainConfig.from_dict(values)
    if config.init:
        # The panel's values are the user's: the engine refuses an architecture the model's weights do not fit and
        # fills in only what the panel does not show (segmentor options, HU window, translator) from the model.
        config = apply_init(config, values)
    config.validate()
    if config.device == "cpu":
        # A GPU's free memory needs torch, which the panel may not have yet; the run checks it when it starts.
        problem = config.memory_problem(available_ram_bytes(), "RAM")
        if problem:
            raise ConfigError(problem)
    return config


def _check_folders(settings: TrainingSettings, folders: DataFolders) -> None:
    if not folders.ct_images:
        raise ConfigError("choose the folder of CT images")
    if not folders.ct_labels:
        raise ConfigError("choose the folder of CT labels (one label file per CT image, named like it)")
    if settings.method == "cmedl" and not folders.mr_images:
        raise ConfigError("method cmedl needs a folder of MRI images (unpaired: other patients than the CT)")


def dataset_folder(images: str | Path, labels: str | Path | None, staging: Path) -> Path:
    """A folder the engine reads as ``images/`` (and ``labels/``) holding the chosen folders.

    When ``images`` and ``labels`` already are ``X/images`` and ``X/labels``, that is ``X``. Otherwise
    ``staging`` gets links named ``images`` and ``labels`` to them (a directory junction on Windows when
    symbolic links are not allowed). Without ``labels``, no ``labels`` link is made, so a ``labels`` folder
    that happens to lie beside the images is not used.
    """
    images = Path(images).expanduser().absolute()
    labels = Path(labels).expanduser().absolute() if labels else None
    if not images.is_dir():
        raise ConfigError(f"the images folder {images} does not exist")
    if labels is not None and not labels.is_dir():
        raise ConfigError(f"the labels folder {labels} does not exist")
    parent = images.parent
    beside = parent / "labels"
    if images.name == "images" and (labels == beside if labels is not None else not beside.exists()):
        return parent
    staging.mkdir(parents=True, exist_ok=True)
    _link(images, staging / "images")
    if labels is not None:
        _link(labels, staging / "labels")
    return staging


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        raise ConfigError(f"{link} already exists")
    try:
        os.symlink(target, link, target_is_directory=True)
        return
    except OSError as error:
        problem = error
    if sys.platform == "win32":
        try:
            import _winapi

            _winapi.CreateJunction(str(target), str(link))
            return
        except OSError as error:
            problem = error
    raise ConfigError(
        f"cannot link {target} into the run folder ({problem}); put the images and labels into one folder as "
        "images/ and labels/ and choose those"
    )
