"""CMEDL Train's "Start from model" (fine-tuning): the models offered, and what choosing one does to the panel.

The list offers training from scratch, the catalogue's segmentation models that are on this computer (read
without torch: :func:`cmedl.catalogue.list_models_tolerantly`), the run folder or model file chosen last, and two
entries that open a dialog: a training run's folder, or a model file. Choosing a model puts the values it implies
(:func:`CMEDLTrainLib.settings.start_from_model`: architecture, patch size, spacing, the fine-tuning learning
rates, the method of a CMEDL run) into the parameter node, and its hidden values (``extra``: segmentor options,
HU window, translator) as JSON beside them (:func:`CMEDLTrainLib.parameters.write_settings`). A model the engine
cannot read is refused with its one-line reason and changes nothing. Choosing "none" trains from scratch again
and offers to reset every value to the engine's defaults (the model's values may not suit a fresh network).

Questions and file dialogs go through small interfaces (:class:`~CMEDLCommon.prompts.Prompts`,
:class:`PathDialogs`), so that every flow runs in tests without Qt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from cmedl.catalogue import SOURCE_BUILTIN, SOURCE_USER, ModelEntry, list_models_tolerantly
from cmedl.errors import CMEDLError
from cmedl.filebase import SEGMENTOR_KIND
from CMEDLCommon.prompts import Prompts
from CMEDLCommon.widgets import fill_combo
from CMEDLTrainLib.parameters import EXTRA_FIELD, parameter_defaults, settings_from_parameters, write_settings
from CMEDLTrainLib.settings import start_from_model

NONE_CHOICE = ("(none: train from scratch)", "")
# Combo entries that ask for a path; their data cannot be a path, a catalogue name ([A-Za-z0-9._-]) or empty.
CHOOSE_FOLDER = ("Run folder...", "<choose run folder>")
CHOOSE_FILE = ("Model file...", "<choose model file>")
# The extra values a model implies (settings_from_model): replaced, not merged, when another model is chosen.
MODEL_EXTRA_KEYS = ("segmentor_options", "hu_window", "spacing_mm", "translator", "translator_options")
CATALOGUE_SECONDS = 5.0  # the list is read again after this, so a model registered meanwhile appears
RESET_QUESTION = (
    "Training from scratch now. Reset the other training values (segmentor, patch size, spacing, learning rates, "
    "epochs, loss weights, ...) to the engine's defaults too?\n\nNo keeps the values shown."
)


class PathDialogs(Protocol):
    """The two file dialogs of "Start from model"; each gives ``""`` when cancelled."""

    def run_folder(self, start: str) -> str: ...

    def model_file(self, start: str) -> str: ...


class SlicerPathDialogs:
    """:class:`PathDialogs` as Qt's dialogs over Slicer's main window (Qt imported when a dialog opens)."""

    def run_folder(self, start: str) -> str:
        import qt
        import slicer

        window, title = slicer.util.mainWindow(), "Start from a training run"
        return str(qt.QFileDialog.getExistingDirectory(window, title, start) or "")

    def model_file(self, start: str) -> str:
        import qt
        import slicer

        window, title = slicer.util.mainWindow(), "Start from a model file"
        return str(qt.QFileDialog.getOpenFileName(window, title, start, "CMEDL model (*.safetensors)") or "")


def entry_label(entry: ModelEntry) -> str:
    """How a catalogue model reads in the list, e.g. ``cmedl-demo-unet (built-in, unet)``."""
    source = {SOURCE_BUILTIN: "built-in", SOURCE_USER: "your model"}.get(entry.source, entry.source)
    architecture = (entry.card or {}).get("architecture", "")
    return f"{entry.title or entry.name} ({source}{', ' + str(architecture) if architecture else ''})"


def path_label(value: str) -> str:
    """How a chosen run folder or model file (or a catalogue name no longer listed) reads in the list."""
    path = Path(value).expanduser()
    if path.suffix == ".safetensors":
        return f"Model file: {path.name}"
    if path.is_dir() or path.parent != Path("."):
        return f"Run folder: {path.name}"
    return f"{value} (not in the catalogue)"


class StartFromModel:
    """The "Start from model" control's choices and flows (see the module docstring).

    Args:
        prompts: the user's dialogs (the question when clearing, the reason a model is refused).
        dialogs: the run folder and model file dialogs (Qt's in Slicer).
        lister: lists the catalogue, appending problems to the list it is given (a damaged catalogue file costs
            only its own entries).
        clock: monotonic seconds, for re-reading the catalogue now and then.
    """

    def __init__(
        self,
        prompts: Prompts,
        dialogs: PathDialogs | None = None,
        lister: Callable[[list[str]], list[ModelEntry]] = list_models_tolerantly,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prompts = prompts
        self.dialogs = dialogs or SlicerPathDialogs()
        self._lister = lister
        self._clock = clock
        self._entries: list[ModelEntry] = []
        self._read_at: float | None = None

    def models(self) -> list[ModelEntry]:
        """The catalogue's segmentation models on this computer (read again every :data:`CATALOGUE_SECONDS`)."""
        now = self._clock()
        if self._read_at is None or now - self._read_at >= CATALOGUE_SECONDS:
            self._entries = [entry for entry in self._lister([]) if _startable(entry)]
            self._read_at = now
        return self._entries

    def choices(self, current: str) -> list[tuple[str, str]]:
        """``(text, value)`` of the list: none, the catalogue's models, ``current`` when not among them, the
        two dialog entries. ``value`` is what the settings' ``init`` takes."""
        items = [NONE_CHOICE] + [(entry_label(entry), entry.name) for entry in self.models()]
        if current and current not in {value for _, value in items}:
            items.append((path_label(current), current))
        return items + [CHOOSE_FOLDER, CHOOSE_FILE]

    def show_in(self, selector: Any, current: str) -> None:
        """Show the choices in a ``QComboBox``-like ``selector`` with ``current`` selected, without its signals."""
        fill_combo(selector, self.choices(current), current)

    def choose(self, parameters: Any, choice: str, runs_root: str = "") -> bool:
        """Apply the list's ``choice`` to the parameter node; True when its values changed.

        The dialog entries ask for a path first (cancelled: nothing changes); ``""`` trains from scratch
        (:meth:`clear`); anything else is a model file, catalogue name or run folder to start from.
        """
        if parameters is None:
            return False
        if choice == CHOOSE_FOLDER[1]:
            choice = self.dialogs.run_folder(runs_root)
        elif choice == CHOOSE_FILE[1]:
            choice = self.dialogs.model_file(runs_root)  # a run folder holds its model.safetensors
        else:
            choice = choice or ""
            if not choice:
                return self.clear(parameters)
        if not choice or choice == parameters.initModel:
            return False
        current = settings_from_parameters(parameters)
        kept = {key: value for key, value in current.extra.items() if key not in MODEL_EXTRA_KEYS}
        try:
            chosen = start_from_model(replace(current, extra=kept), choice)
        except CMEDLError as error:
            self.prompts.error(f"Cannot start from {choice}: {error}")
            return False
        write_settings(parameters, chosen)
        return True

    def clear(self, parameters: Any) -> bool:
        """Train from scratch: no ``init``, no frozen encoder, no model values in ``extra``; then offer the defaults.

        False when no model was chosen (nothing to clear).
        """
        current = settings_from_parameters(parameters)
        if not current.init:
            return False
        kept = {key: value for key, value in current.extra.items() if key not in MODEL_EXTRA_KEYS}
        # A frozen encoder needs a model to keep: the engine refuses it without one.
        write_settings(parameters, replace(start_from_model(current, ""), extra=kept, freeze_encoder_epochs=0))
        if self.prompts.ask(RESET_QUESTION):
            self.reset(parameters)
        return True

    @staticmethod
    def reset(parameters: Any) -> None:
        """Every training value to the engine's default (the paper's): from scratch, no model values kept."""
        for name, value in {**parameter_defaults(), "randomVgg": False, EXTRA_FIELD: ""}.items():
            if getattr(parameters, name) != value:
                setattr(parameters, name, value)


def _startable(entry: ModelEntry) -> bool:
    """A model fine-tuning can start from: on this computer, and a segmentation model (not a translator)."""
    return entry.available and (entry.card or {}).get("kind", SEGMENTOR_KIND) == SEGMENTOR_KIND
