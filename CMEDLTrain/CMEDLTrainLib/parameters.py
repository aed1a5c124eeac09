"""The panel's parameter node and the engine's training settings it stands for.

The parameter node (``CMEDLTrainParameterNode`` in the module file) names its fields in Slicer's camelCase;
:data:`SETTINGS_FIELDS` maps each to the :class:`~CMEDLTrainLib.settings.TrainingSettings` field of the same
meaning, so that the panel's defaults are checked against the engine's and its values become a run's settings
in one place. A parameter node is read by attribute only, so any object with those attributes will do.

``extra`` (the values a model chosen under "Start from model" implies and the panel does not show: the
segmentor's options, the HU window, the translator's) is kept as JSON in the field :data:`EXTRA_FIELD`: settings
rebuilt from the parameter node would lose it otherwise, and with it the model's architecture.
"""

from __future__ import annotations

import json
from typing import Any

from cmedl.devices import DEFAULT_DEVICE
from CMEDLTrainLib.settings import RANDOM_VGG, TrainingSettings, paper_defaults, vgg_weights_note

# Parameter node field -> TrainingSettings field.
SETTINGS_FIELDS = {
    "method": "method",
    "segmentor": "segmentor",
    "epochs": "epochs",
    "iterationsPerEpoch": "iterations_per_epoch",
    "batchSize": "batch_size",
    "patchSize": "patch_size",
    "spacingMm": "spacing_mm",
    "lrSegmentor": "lr_segmentor",
    "lrTranslator": "lr_translator",
    "lambdaAdv": "lambda_adv",
    "lambdaCyc": "lambda_cyc",
    "lambdaCx": "lambda_cx",
    "lambdaHint": "lambda_hint",
    "lambdaSeg": "lambda_seg",
    "useCx": "use_cx",
    "useCycle": "use_cycle",
    "useSegRm": "use_seg_rm",
    "useSegPm": "use_seg_pm",
    "validationFraction": "validation_fraction",
    "seed": "seed",
    "gpus": "gpus",
    "runName": "name",
    "initModel": "init",
    "freezeEncoderEpochs": "freeze_encoder_epochs",
    "warmupEpochs": "warmup_epochs",
}
EXTRA_FIELD = "initExtra"


def vgg_weights(random_vgg: bool, path: str) -> str:
    """The ``vgg_weights`` setting: ``"random"`` when asked for, else the path chosen (empty: torch hub)."""
    return RANDOM_VGG if random_vgg else (path or "").strip()


def vgg_note(parameters: Any, vgg_path: str) -> str:
    """The line under the VGG16 weights field: what the choice means, for CMEDL (the only method using it)."""
    return vgg_weights_note(vgg_weights(parameters.randomVgg, vgg_path)) if parameters.method == "cmedl" else ""


def settings_from_parameters(parameters: Any, device: str = DEFAULT_DEVICE, vgg_path: str = "") -> TrainingSettings:
    """A run's settings from the parameter node's values, the device and the VGG16 weights file chosen."""
    values = {field: getattr(parameters, name) for name, field in SETTINGS_FIELDS.items()}
    values["name"] = str(values["name"]).strip()
    extra = extra_from_text(getattr(parameters, EXTRA_FIELD, ""))  # a stand-in without the field has none
    return TrainingSettings(
        **values, device=device, vgg_weights=vgg_weights(parameters.randomVgg, vgg_path), extra=extra
    )


def write_settings(parameters: Any, settings: TrainingSettings) -> None:
    """Put ``settings`` into the parameter node: each field that differs, and ``extra`` as JSON.

    Fields that did not change are left alone, so the panel updates once per change rather than once per field.
    """
    for name, field in SETTINGS_FIELDS.items():
        value = getattr(settings, field)
        if getattr(parameters, name) != value:
            setattr(parameters, name, value)
    text = extra_text(settings.extra)
    if getattr(parameters, EXTRA_FIELD, "") != text:
        setattr(parameters, EXTRA_FIELD, text)


def extra_text(extra: dict[str, Any]) -> str:
    """``extra`` as the parameter node keeps it (``""`` for none)."""
    return json.dumps(extra, sort_keys=True) if extra else ""


def extra_from_text(text: str) -> dict[str, Any]:
    """``extra`` back from :func:`extra_text`; text that is not a JSON object (a hand-edited scene) gives none."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def parameter_defaults() -> dict[str, Any]:
    """Parameter node field -> the engine's default (the paper's values), for every field but the run name."""
    defaults = paper_defaults()
    return {name: defaults[field] for name, field in SETTINGS_FIELDS.items() if name != "runName"}
