"""Fine-tuning: a training run that starts from an existing model's weights instead of random ones.

``init`` (``cmedl train --init MODEL``, CMEDL Train's "Start from model") names one of:

- a model file (``.safetensors`` with a model card) or a catalogue name: the student starts from its weights;
- a run folder: the student starts from its ``model.safetensors`` (the best epoch) and, when the new run uses
  method ``cmedl`` with a translator and the folder holds a CMEDL run, the MRI teacher and the CT->MR generator
  start from its ``translator.safetensors``, and the MR->CT generator and both discriminators from its
  ``cyclegan.safetensors`` (all exported together with that student, so every network is of one epoch; a run
  written before ``cyclegan.safetensors`` existed gives the teacher and CT->MR generator only).

Weights are read from safetensors files only, never from a run's pickled ``checkpoint.pt``. Hence no optimiser
state is taken over: every optimiser starts fresh.

The architecture comes from the model card: :func:`apply_init` fills in the segmentor and its options (and the
translator's, from a CMEDL run folder) and refuses an explicitly given one that differs. Patch size, spacing and HU
window default to the card's; a run that overrides them says so in its log (:func:`init_log_lines`). Unless a
learning rate is given, the segmentors, and a translator taken over from a run, learn at a tenth of the
from-scratch rate: large steps would first undo what the model learnt.

Only :func:`check_init` and :func:`initialise_networks` import torch, so CMEDL Train's panel code can use the
rest without it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmedl.errors import ConfigError, InputError, ModelFileError
from cmedl.filebase import SEGMENTOR_KIND, file_sha256, peek_model_card
from cmedl.training.config import TrainConfig
from cmedl.training.runfolder import CYCLEGAN_FILE, MODEL_FILE, TRANSLATOR_FILE

if TYPE_CHECKING:
    from cmedl.training.objectives import Objective

#: learning rates of a fine-tuning run without a given one: this share of the from-scratch default
FINE_TUNE_LR_FACTOR = 0.1
#: configuration keys that must agree with the model (the weights only fit that network)
ARCHITECTURE_KEYS = ("segmentor", "segmentor_options")
TRANSLATOR_KEYS = ("translator", "translator_options")
#: configuration keys that default to the model's and may be overridden (with a warning in the run's log)
INPUT_KEYS = ("patch_size", "spacing_mm", "hu_window")
#: translator options that shape only the random initial weights, not the network
_INITIALISATION_OPTIONS = ("init_gain",)


@dataclass
class InitSource:
    """What a fine-tuning run starts from.

    Attributes:
        given: ``init`` as the user gave it (a path or a catalogue name).
        model_path: the segmentation model file whose weights the student starts from.
        card: its model card (a plain dict, read from the file's header).
        run_folder: the run folder ``given`` named, or None for a model file or catalogue name.
        translator_path / translator_card: the run folder's ``translator.safetensors`` and its card, when present.
    """

    given: str
    model_path: Path
    card: dict[str, Any]
    run_folder: Path | None = None
    translator_path: Path | None = None
    translator_card: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.card.get("name") or self.model_path.stem)

    def parent(self) -> dict[str, Any]:
        """The model card's ``parent`` record of a model fine-tuned from this source."""
        record = {"name": self.name, "sha256": file_sha256(self.model_path), "source": str(self.model_path.resolve())}
        if self.run_folder is not None:
            record["run"] = str(self.run_folder.resolve())
        return record

    def takes_translator(self, config: TrainConfig) -> bool:
        """Whether the run described by ``config`` starts its teacher and CT->MR generator from this source."""
        return self.translator_card is not None and config.method == "cmedl" and config.teacher_input == "pseudo_mr"


def resolve_init(init: str) -> InitSource:
    """The model file (and, for a run folder, translator file) that ``init`` names, with their cards.

    Raises:
        InputError: a folder without ``model.safetensors`` (not a run, or no epoch validated yet).
        ModelFileError: no such file or catalogue name, an unreadable file, or a model that is not a segmentor.
    """
    from cmedl.catalogue import resolve_model

    folder = Path(init).expanduser()
    run_folder, translator_path, translator_card = None, None, None
    if folder.is_dir():
        model_path = folder / MODEL_FILE
        if not model_path.is_file():
            raise InputError(f"{folder} holds no {MODEL_FILE}: not a run folder, or no epoch of its run has ended yet")
        run_folder = folder
        if (folder / TRANSLATOR_FILE).is_file():
            translator_path = folder / TRANSLATOR_FILE
            translator_card = peek_model_card(translator_path)
            if translator_card.get("kind") != "translator":
                raise ModelFileError(f"{translator_path} is not a CMEDL translator file")
    else:
        model_path = resolve_model(init)
    card = peek_model_card(model_path)
    kind = card.get("kind", SEGMENTOR_KIND)
    if kind != SEGMENTOR_KIND:
        raise ModelFileError(
            f"{model_path.name} holds a {kind} model; --init needs a tumour segmentation model or a run folder"
        )
    for path, checked in ((model_path, card), (translator_path, translator_card)):
        if checked is not None and not isinstance(checked.get("architecture_options", {}), dict):
            raise ModelFileError(f"{path.name} has a damaged model card (architecture_options is not a JSON object)")
    return InitSource(init, model_path, card, run_folder, translator_path, translator_card)


def implied_values(source: InitSource, config: TrainConfig | None = None) -> dict[str, Any]:
    """The ``TrainConfig`` values the source implies: the architecture, patch size, spacing and HU window of its
    card, and the translator's architecture when ``config`` (default: a CMEDL run) takes the translator over."""
    card, defaults = source.card, TrainConfig()
    values: dict[str, Any] = {
        "segmentor": str(card["architecture"]),
        "segmentor_options": dict(card.get("architecture_options") or {}),
        "patch_size": int(card.get("patch_size", defaults.patch_size)),
        "spacing_mm": tuple(float(v) for v in card.get("spacing_mm", defaults.spacing_mm)),
        "hu_window": tuple(float(v) for v in card.get("hu_window", defaults.hu_window)),
    }
    if source.takes_translator(config or dataclasses.replace(defaults, method="cmedl")):
        translator = source.translator_card or {}
        values["translator"] = str(translator.get("architecture", defaults.translator))
        values["translator_options"] = dict(translator.get("architecture_options") or {})
    return values


def fine_tuning_lr(rate: float) -> float:
    """The fine-tuning default for a from-scratch learning rate ``rate`` (rounded: 2e-4 gives 2e-05)."""
    return float(f"{rate * FINE_TUNE_LR_FACTOR:.6g}")


def apply_init(config: TrainConfig, explicit: Iterable[str]) -> TrainConfig:
    """``config`` with what its ``init`` implies filled in; ``explicit`` names the keys the user gave.

    Keys not in ``explicit`` take the model's values (architecture, patch size, spacing, HU window) and the
    learning rates their fine-tuning defaults. An explicit architecture value that differs from the model's is a
    :class:`ConfigError` (exit code 7); an explicit patch size, spacing or HU window is kept (the run's log warns).
    A config without ``init`` is returned unchanged.
    """
    if not config.init:
        return config
    explicit = set(explicit)
    source = resolve_init(config.init)
    implied = implied_values(source, config)
    _refuse_conflicts(config, source, implied, explicit)
    changes = {key: value for key, value in implied.items() if key not in explicit}
    if "lr_segmentor" not in explicit:
        changes["lr_segmentor"] = fine_tuning_lr(config.lr_segmentor)
    if source.takes_translator(config) and "lr_translator" not in explicit:
        changes["lr_translator"] = fine_tuning_lr(config.lr_translator)
    return dataclasses.replace(config, **changes)


def check_init(config: TrainConfig, source: InitSource) -> None:
    """Refuse a configuration whose networks the source's weights do not fit (:class:`ConfigError`).

    The trainer calls this for every fine-tuning run, whether or not :func:`apply_init` filled the values in.
    """
    from cmedl.nets import SEGMENTOR_NAMES

    architecture = str(source.card.get("architecture"))
    if architecture not in SEGMENTOR_NAMES:
        raise ConfigError(
            f"--init {source.given} is a {architecture!r} network, which cannot be trained; "
            f"trainable: {', '.join(SEGMENTOR_NAMES)}"
        )
    implied = implied_values(source, config)
    _refuse_conflicts(config, source, implied, set(ARCHITECTURE_KEYS + TRANSLATOR_KEYS))


def _refuse_conflicts(config: TrainConfig, source: InitSource, implied: dict[str, Any], explicit: set[str]) -> None:
    segmentor = implied["segmentor"]
    if "segmentor" in explicit and config.segmentor != segmentor:
        raise ConfigError(
            f"--init {source.given} is a {segmentor} network; segmentor {config.segmentor!r} conflicts with it "
            "(leave the segmentor out when fine-tuning)"
        )
    pairs = [("segmentor_options", "segmentor", segmentor, _segmentor_class(segmentor))]
    if "translator" in implied:
        translator = implied["translator"]
        if "translator" in explicit and config.translator != translator:
            raise ConfigError(
                f"--init {source.given} holds a {translator} translator; translator {config.translator!r} "
                "conflicts with it (leave it out when fine-tuning)"
            )
        pairs.append(("translator_options", "translator", translator, _translator_class()))
    for key, what, name, builder in pairs:
        if key not in explicit:
            continue
        given = _with_defaults(builder, getattr(config, key))
        wanted = _with_defaults(builder, implied[key])
        if given != wanted:
            raise ConfigError(
                f"--init {source.given} is a {name} {implied[key]}; {key} {getattr(config, key)} conflicts with it "
                f"(leave the {what} options out when fine-tuning)"
            )


def _segmentor_class(name: str) -> type | None:
    try:
        from cmedl.nets import MRRN, DenseFCN, UNet
    except ImportError:  # the panel without torch: options are compared as given
        return None
    return {cls.name: cls for cls in (UNet, DenseFCN, MRRN)}.get(name)


def _translator_class() -> type | None:
    try:
        from cmedl.nets.cyclegan import Translator
    except ImportError:
        return None
    return Translator


def _with_defaults(builder: type | None, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the builder's defaults added, so that ``{}`` and ``{"base_channels": 64}`` compare equal
    for a U-Net; options that only shape random initial weights are left out (the weights are loaded)."""
    values = dict(options)
    if builder is not None:
        parameters = inspect.signature(builder.__init__).parameters.values()
        skip = ("self", "in_channels", "num_classes")
        defaults = {p.name: p.default for p in parameters if p.name not in skip and p.default is not p.empty}
        values = {**defaults, **values}
    return {key: value for key, value in values.items() if key not in _INITIALISATION_OPTIONS}


def initialise_networks(objective: Objective, source: InitSource) -> list[str]:
    """Load the source's weights into the objective's networks; returns the names of the networks loaded.

    The optimisers are left as they are (fresh): only weights are taken over.
    """
    from cmedl.modelfile import ModelCard, PseudoMRIModel, load_weights

    load_weights(source.model_path, objective.student, ModelCard.from_dict(source.card))
    loaded = ["student"]
    translator = getattr(objective, "translator", None)
    if source.takes_translator(objective.config) and translator is not None and "teacher" in objective.networks:
        # The translator file holds the pair as PseudoMRIModel saved it; loading through the same wrapper fills the
        # objective's own generator and teacher in place.
        pair = PseudoMRIModel(translator.g_ct_to_mr, objective.networks["teacher"])
        load_weights(source.translator_path, pair, ModelCard.from_dict(source.translator_card or {}))
        loaded += ["teacher", "CT->MR generator"]
        whole = source.translator_path.parent / CYCLEGAN_FILE
        if whole.is_file():
            # Written with the translator file, so its CT->MR generator is the same one loaded just above.
            load_weights(whole, translator, ModelCard.from_dict(peek_model_card(whole)))
            loaded += ["MR->CT generator", "discriminators"]
    return loaded


def init_log_lines(config: TrainConfig, source: InitSource, loaded: list[str]) -> list[str]:
    """What a fine-tuning run writes into its log when it starts: the source, overrides, rates, freezing."""
    shown = source.run_folder if source.run_folder is not None else source.model_path
    lines = [
        f"fine-tuning from {source.name} ({shown}), taking over the weights of: {', '.join(loaded)}; "
        "the optimisers start fresh"
    ]
    if config.method == "cmedl" and "teacher" not in loaded:
        lines.append("the teacher and the translator start from random weights (no CMEDL run folder as init)")
    elif "teacher" in loaded and "discriminators" not in loaded:
        lines.append(
            f"the MR->CT generator and the discriminators start from random weights (the run has no {CYCLEGAN_FILE})"
        )
    implied = implied_values(source, config)
    for key in INPUT_KEYS:
        value, model_value = getattr(config, key), implied[key]
        if value != model_value:
            lines.append(f"warning: {key} {_shown(value)} overrides the model's {_shown(model_value)}")
    defaults = TrainConfig()
    rates = [("lr_segmentor", defaults.lr_segmentor)]
    if "teacher" in loaded:
        rates.append(("lr_translator", defaults.lr_translator))
    for key, scratch in rates:
        rate = getattr(config, key)
        if rate == fine_tuning_lr(scratch):
            lines.append(f"{key} {rate:g}: the fine-tuning default, a tenth of the from-scratch {scratch:g}")
        else:
            lines.append(f"{key} {rate:g} as configured (from-scratch default {scratch:g})")
    if config.freeze_encoder_epochs:
        lines.append(f"the student's encoder is frozen for the first {config.freeze_encoder_epochs} epoch(s)")
    if config.warmup_epochs:
        lines.append(f"learning rates warm up linearly over the first {config.warmup_epochs} epoch(s)")
    return lines


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")"
    return str(value)


def parent_line(card: dict[str, Any], sha256_chars: int | None = None) -> str:
    """One line naming the model a card's model was fine-tuned from, or ``""`` for a model trained from scratch.

    ``sha256_chars`` shortens the digest (for a narrow box); None shows all of it.
    """
    parent = card.get("parent")
    if not isinstance(parent, dict):
        return ""
    digest = str(parent.get("sha256") or "?")
    if sha256_chars is not None and len(digest) > sha256_chars:
        digest = digest[:sha256_chars] + "..."
    return f"{parent.get('name') or '?'} (sha256 {digest}) from {parent.get('source') or '?'}"


def fine_tuned_on_line(card: dict[str, Any]) -> str:
    """One line saying what data a fine-tuned model was fine-tuned on, or ``""``."""
    data = card.get("fine_tuned_on")
    if not isinstance(data, dict):
        return ""
    text = (
        f"{data.get('ct_folder') or '?'} ({data.get('ct_training_cases', '?')} training and "
        f"{data.get('ct_validation_cases', '?')} validation CT cases)"
    )
    if data.get("mr_folder"):
        text += f", MRI {data['mr_folder']} ({data.get('mr_cases', '?')} cases)"
    return text
