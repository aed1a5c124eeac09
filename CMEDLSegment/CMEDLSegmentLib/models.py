"""The models the panel offers, listed so that a damaged catalogue file never keeps the panel from opening.

:class:`ModelChoices` lists the catalogue leniently (a malformed ``CMEDL_CATALOGUE`` or ``<home>/catalogue.json``
hides only its own download entries; the built-in model is always there) and keeps the one-line reasons for
the panel to show. It re-reads the catalogue whenever asked, so a model registered in CMEDL Train appears when
the panel is entered again. It also remembers, per user, which model cards were read and accepted, because
an automatic run can only use a model whose card the user has seen.

:class:`ModelActions` gets a model ready for a run (packages, download, card), asking through
:class:`~CMEDLCommon.prompts.Prompts`, and registers a model file the user chose.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from pathlib import Path

from cmedl.catalogue import SOURCE_DOWNLOAD, ModelEntry, list_models_tolerantly
from cmedl.errors import CMEDLError
from CMEDLCommon.dependencies import DependencyError, ensure_dependencies
from CMEDLCommon.prompts import Prompts
from CMEDLCommon.settings import UserSettings
from CMEDLSegmentLib import ACCEPTED_KEY
from CMEDLSegmentLib.model_cards import model_card_text


class ModelChoices:
    """The catalogue as the panel shows it (see the module docstring).

    Args:
        settings: the module's user settings (where accepted model cards are remembered).
        lister: lists the catalogue, appending problems to the list it is given.
    """

    PROBLEM_PREFIX = "Model catalogue problem: "

    def __init__(
        self,
        settings: UserSettings,
        lister: Callable[[list[str]], list[ModelEntry]] = list_models_tolerantly,
    ) -> None:
        self.settings = settings
        self._lister = lister
        self.entries: list[ModelEntry] = []
        self.problems: list[str] = []

    def refresh(self) -> list[ModelEntry]:
        """Read the catalogue again (new user models, downloads, a repaired catalogue file)."""
        problems: list[str] = []
        self.entries = self._lister(problems)
        self.problems = problems
        return self.entries

    def find(self, name: str) -> ModelEntry | None:
        return next((entry for entry in self.entries if entry.name == name), None)

    def index_of(self, name: str | None) -> int:
        """Where ``name`` is in :attr:`entries` (the first entry, the built-in model, when it is not)."""
        return next((index for index, entry in enumerate(self.entries) if entry.name == name), 0)

    @staticmethod
    def label(entry: ModelEntry) -> str:
        """How an entry reads in the model list: a download not yet fetched says so."""
        return f"{entry.title or entry.name}{'' if entry.available else ' (download)'}"

    def problem_text(self) -> str:
        """The catalogue's problems for the status line (``""`` when there are none)."""
        if not self.problems:
            return ""
        more = f" (and {len(self.problems) - 1} more; see the model card box)" if len(self.problems) > 1 else ""
        return f"{self.PROBLEM_PREFIX}{self.problems[0]}{more}"

    def card_html(self, entry: ModelEntry | None) -> str:
        """The model card box: the card, and the catalogue's problems under it."""
        parts = [f"<pre>{html.escape(model_card_text(entry))}</pre>" if entry else "No model installed."]
        if self.problems:
            items = "".join(f"<li>{html.escape(problem)}</li>" for problem in self.problems)
            parts.append(f"<p><b>Catalogue problems</b> (the other models are listed):</p><ul>{items}</ul>")
        return "".join(parts)

    @staticmethod
    def card_text(entry: ModelEntry) -> str:
        """The plain-text card a user confirms before a model's first use."""
        return model_card_text(entry)

    def card_accepted(self, entry: ModelEntry) -> bool:
        return self.settings.text(ACCEPTED_KEY + entry.name) == "yes"

    def accept_card(self, entry: ModelEntry) -> None:
        self.settings.set_text(ACCEPTED_KEY + entry.name, "yes")

    def ready_for_automatic(self, name: str) -> tuple[Path | None, str]:
        """The file of model ``name`` if an automatic run may use it now, else None and why not.

        An automatic run asks nothing: the model must be on disk and its card accepted in an earlier run.
        """
        self.refresh()
        entry = self.find(name)
        if entry is None:
            return None, f"the model {name!r} is not in the catalogue any more; choose one in CMEDL Segment"
        if not entry.available or entry.path is None:
            where = "download it" if entry.source == SOURCE_DOWNLOAD else "choose another model"
            return None, f"the model {entry.name!r} is not on this computer; {where} in CMEDL Segment"
        if not self.card_accepted(entry):
            return None, f"the model card of {entry.name!r} was not accepted yet; press Apply once in CMEDL Segment"
        return Path(entry.path), ""


class ModelActions:
    """Getting a model ready for a run, asking the user only what must be asked.

    Args:
        models: the panel's model list.
        prompts: the user's dialogs (:class:`CMEDLCommon.prompts.SlicerPrompts` in Slicer).
        ensure: installs the Python packages after a confirmation (False: declined).
    """

    def __init__(self, models: ModelChoices, prompts: Prompts, ensure: Callable[..., bool] = ensure_dependencies):
        self.models = models
        self.prompts = prompts
        self.ensure = ensure

    def prepare(self, name: str) -> ModelEntry | None:
        """Packages installed, model ``name`` on disk and its card accepted: the entry to run, else None."""
        try:
            if not self.ensure(requester="CMEDL"):
                return None
        except DependencyError as error:
            self.prompts.error(f"The Python packages CMEDL needs are not installed: {error}")
            return None
        entry = self.models.find(name)
        if entry is None or not self.download(entry):
            return None
        entry = self.models.find(name) if self.models.refresh() else None
        if entry is None or not entry.available:
            return None
        if self.models.card_accepted(entry):
            return entry
        if not self.prompts.confirm(
            f"Before the first use of {entry.title or entry.name}, please read its model card (intended use, training "
            "data, license). Use it?",
            details=self.models.card_text(entry),
        ):
            return None
        self.models.accept_card(entry)
        return entry

    def download(self, entry: ModelEntry) -> bool:
        """Fetch a download entry after its license was accepted, with a progress dialog; False if not."""
        if entry.available:
            return True
        if not self.prompts.confirm(
            f"Download the model '{entry.title or entry.name}'?\n\nLicense: {entry.license}\n\n"
            "By downloading you accept this license. The file is checked against its published sha256.",
            details=f"{entry.url}\nsha256 {entry.sha256}",
        ):
            return False
        from cmedl.downloads import download_model
        from cmedl.progress import CallbackProgress

        dialog = self.prompts.progress(f"Downloading {entry.name}...")
        cancel = threading.Event()

        def on_event(event: dict) -> None:
            if event.get("event") == "progress" and event.get("total"):
                dialog.setValue(int(100 * event["done"] / event["total"]))
            self.prompts.process_events()
            if dialog.wasCanceled:
                cancel.set()

        try:
            download_model(entry.name, accept_license=True, progress=CallbackProgress(on_event, cancel))
        except CMEDLError as error:
            self.prompts.error(f"Download failed: {error}")
            return False
        finally:
            dialog.close()
        return True

    def add_file(self, path: str | Path) -> ModelEntry | None:
        """Register a model file the user chose (asking before replacing one of the same name)."""
        from cmedl.catalogue import MODEL_SUFFIX, add_model, user_models_dir

        stem = Path(path).name.removesuffix(MODEL_SUFFIX)
        replace = (user_models_dir() / f"{stem}{MODEL_SUFFIX}").exists()
        if replace and not self.prompts.ask(f"A model named '{stem}' is already registered. Replace it with this one?"):
            return None
        try:
            return add_model(path, overwrite=replace)
        except CMEDLError as error:
            self.prompts.error(f"This file cannot be used: {error}")
            return None

    def clear_cache(self) -> str:
        """Delete the downloaded models after a confirmation; the line for the status label (``""``: declined)."""
        from cmedl.catalogue import cache_dir
        from cmedl.downloads import clear_cache

        if not self.prompts.confirm(f"Delete every downloaded model in {cache_dir()}? Models you registered are kept."):
            return ""
        return f"Removed {clear_cache()} downloaded model file(s)."

    def folder_of(self, entry: ModelEntry | None) -> Path:
        """The folder to open for ``entry``: the download cache, or the user's models (created when missing)."""
        from cmedl.catalogue import cache_dir, user_models_dir

        folder = cache_dir() if entry is not None and entry.source == SOURCE_DOWNLOAD else user_models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return folder
