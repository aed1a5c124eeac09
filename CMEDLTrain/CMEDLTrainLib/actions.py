"""What the training panel's buttons do, with the questions they ask, testable without Qt.

Each flow takes the panel's values, asks through :class:`CMEDLCommon.prompts.Prompts` (Slicer's dialogs in
the panel, scripted answers in tests) and calls the engine and the launcher. Nothing here waits for a
training process: starting and stopping return at once and the panel follows the run through its folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmedl.errors import CMEDLError, InputError
from cmedl.training.launch import model_name_for, register_model, request_stop, resume_training
from cmedl.training.runs import STOPPING, RunSnapshot
from CMEDLCommon.dependencies import DependencyError, ensure_dependencies
from CMEDLCommon.engine import engine_python
from CMEDLCommon.prompts import Prompts
from CMEDLTrainLib.launcher import start_training
from CMEDLTrainLib.settings import DataFolders, TrainingSettings, settings_problem


class TrainActions:
    """The panel's flows: check the data, start, stop, resume, register, add the loaded case.

    Args:
        prompts: the user's dialogs.
        python: gives the interpreter of the training process (Slicer's ``PythonSlicer``).
        ensure: installs missing Python packages after one confirmation (False: declined).
    """

    def __init__(
        self,
        prompts: Prompts,
        python: Callable[[], str] = engine_python,
        ensure: Callable[..., bool] = ensure_dependencies,
    ) -> None:
        self.prompts = prompts
        self.python = python
        self.ensure = ensure
        self._inventory: Any = None
        self._inventory_key: tuple | None = None

    def _packages_ready(self) -> bool:
        try:
            return bool(self.ensure(requester="CMEDL"))
        except DependencyError as error:
            self.prompts.error(f"The Python packages CMEDL needs are not installed: {error}")
            return False

    # -- data --

    def forget_data_check(self) -> None:
        self._inventory = self._inventory_key = None

    def check_data(self, folders: DataFolders, settings: TrainingSettings, force: bool = True) -> tuple[Any, str]:
        """Scan the data folders with a progress dialog: the inventory (None: stopped) and the text to show.

        Unless ``force``, the last scan of the same folders and method is used again.
        """
        from cmedl.training.inventory import scan_training_data

        key = (repr(folders), settings.method, settings.validation_fraction, settings.extra.get("label_value", 1))
        if not force and self._inventory is not None and self._inventory_key == key:
            return self._inventory, self._inventory.summary_text()
        if not folders.ct_images:
            return None, "Choose the CT images and labels folders first."
        dialog = self.prompts.progress("Checking the training data...")

        def on_progress(done: int, total: int, name: str) -> bool:
            dialog.setValue(int(100 * done / max(total, 1)))
            dialog.setLabelText(f"Checking {name} ({done}/{total})")
            self.prompts.process_events()
            return bool(dialog.wasCanceled)

        try:
            inventory = scan_training_data(
                folders.ct_images, folders.ct_labels, folders.mr_images or None, folders.mr_labels or None,
                validation=folders.validation or None, method=settings.method,
                validation_fraction=settings.validation_fraction, progress=on_progress,
                label_value=int(settings.extra.get("label_value", 1)),
            )  # fmt: skip
        except (CMEDLError, OSError) as error:
            return None, f"Data check stopped: {error}"
        finally:
            dialog.close()
        self._inventory, self._inventory_key = inventory, key
        return inventory, inventory.summary_text()

    def add_case(
        self, scene: Any, volume: Any, segmentation: Any, segment_id: str, folders: DataFolders, name: str
    ) -> str:
        """Write the CT and its segment into the CT folders (asking before replacing a case); the text to show."""
        from CMEDLTrainLib.dataset_export import add_case

        arguments = (scene, volume, segmentation, segment_id, folders.ct_images, folders.ct_labels, name.strip())
        try:
            try:
                added = add_case(*arguments)
            except InputError as error:
                if "already exists" not in str(error) or not self.prompts.ask(f"{error}\n\nReplace that case?"):
                    raise
                added = add_case(*arguments, overwrite=True)
        except CMEDLError as error:
            self.prompts.error(f"The case was not added: {error}")
            return ""
        self.forget_data_check()
        verb = "Replaced" if added.replaced else "Added"
        return (f"{verb} case {added.name}: {added.image} and {added.label} ({added.label_voxels} tumour voxels).\n"
                "Press Check data to see the whole training set.")  # fmt: skip

    # -- runs --

    def start(self, settings: TrainingSettings, folders: DataFolders, runs_root: str) -> tuple[Path | None, str]:
        """Start a new run after the data check and one confirmation: its folder (None: not started), and the
        data summary to show."""
        if not self._packages_ready():
            return None, ""
        problem = settings_problem(settings, folders)
        if problem:
            self.prompts.error(f"Cannot start: {problem}")
            return None, ""
        inventory, summary = self.check_data(folders, settings, force=False)
        if inventory is None:
            return None, summary
        if not inventory.ok:
            self.prompts.error("The training data has problems; see the summary under Check data.", summary)
            return None, summary
        cases = len(inventory.folders[0].cases)  # the CT training folder comes first
        if not self.prompts.confirm(
            f"Start a {settings.method} run ({settings.segmentor}, {settings.epochs} epochs) on {cases} CT case(s) "
            f"({inventory.validation_cases()} for validation)?",
            summary,
        ):
            return None, summary
        try:
            return start_training(settings, folders, runs_root, python=self.python()), summary
        except CMEDLError as error:
            self.prompts.error(f"The run was not started: {error}")
            return None, summary

    def stop(self, snapshot: RunSnapshot | None, force: Callable[[], None]) -> None:
        """Ask a running run to stop; when it is already stopping, offer to kill it now (``force``)."""
        if snapshot is None or not snapshot.alive:
            return
        if snapshot.state == STOPPING:
            if self.prompts.ask(
                f"{snapshot.name} has not stopped yet. Stop it now? The current epoch is lost; the checkpoint of the "
                "last finished epoch is kept."
            ):
                force()
            return
        if self.prompts.ask(
            f"Stop {snapshot.name}? It stops after the current iteration and keeps the checkpoint of the last "
            "finished epoch; Resume continues from there."
        ):
            request_stop(snapshot.path)

    def resume(self, snapshot: RunSnapshot | None, epochs: int | None, device: str, gpus: int) -> bool:
        """Continue a run from its checkpoint (``epochs`` may raise its epoch count); False if not resumed."""
        if snapshot is None or not self._packages_ready():
            return False
        try:
            resume_training(snapshot.path, self.python(), epochs=epochs or None, device=device, gpus=gpus)
        except CMEDLError as error:
            self.prompts.error(f"The run was not resumed: {error}")
            return False
        return True

    def register(self, snapshot: RunSnapshot | None) -> Any:
        """Add the run's best model to the user's models under a name the user gives; the entry, or None."""
        if snapshot is None or snapshot.model is None:
            return None
        name = self.prompts.ask_text("Register the run's best model as:", model_name_for(snapshot.path))
        if not name:
            return None
        try:
            try:
                entry = register_model(snapshot.path, name)
            except CMEDLError as error:
                if "already exists" not in str(error) or not self.prompts.ask(f"{error}\n\nReplace that model?"):
                    raise
                entry = register_model(snapshot.path, name, overwrite=True)
        except CMEDLError as error:
            self.prompts.error(f"The model was not registered: {error}")
            return None
        self.prompts.info(f"Registered as '{entry.name}'. CMEDL Segment lists it the next time its panel is shown.")
        return entry
