"""What CMEDL Segment keeps for the whole Slicer session, whether or not its panel was ever opened.

:class:`SegmentSession` puts together the model list (and getting a model ready), the runner and the
automatic mode for one scene. The
module's logic creates it once Slicer has started and hands it Slicer's pieces (a ``qt.QTimer``,
``qt.QTimer.singleShot``, the parameter node, ``RenderBlocker``); a test hands it fakes and a slicer-core
scene, and so drives exactly what Slicer runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from CMEDLCommon.prompts import Prompts
from CMEDLCommon.settings import UserSettings
from CMEDLSegmentLib import AUTO_KEY
from CMEDLSegmentLib.auto_segment import AutoSegmentWatcher, automatic_request
from CMEDLSegmentLib.lesion_panel import LesionTable
from CMEDLSegmentLib.models import ModelActions, ModelChoices
from CMEDLSegmentLib.runner import FINISHED, RunnerEvent, SegmentationRunner, Timer, follow_in_parameters
from CMEDLSegmentLib.segment_logic import TumourSegmentationLogic


class SegmentSession:
    """The models, the runner and the automatic mode of CMEDL Segment for ``scene``.

    Args:
        scene: the MRML scene.
        settings: the module's user settings (model, device, automatic mode, accepted model cards).
        timer: drives :meth:`SegmentationRunner.tick` (connect its timeout to ``session.runner.tick``).
        defer: ``defer(milliseconds, callback)``, for looking at a new volume once it is loaded.
        parameters: gives the module's parameter node (creating it again after a scene close), or None.
        prompts: the user's dialogs, for getting a model ready (:attr:`actions`).
        python_executable: the interpreter of the engine's children (Slicer's ``PythonSlicer``).
        finishing: context manager factory around writing a result into the scene (``RenderBlocker``).
        notify: one line per CT that automatic mode looked at.
        automatic_allowed: False keeps automatic mode off whatever the setting (Slicer's testing mode).
        logic: what starts the runs (default: a :class:`TumourSegmentationLogic` for ``scene``).
    """

    def __init__(
        self,
        scene: Any,
        settings: UserSettings,
        timer: Timer,
        defer: Callable[[int, Callable[[], None]], None],
        parameters: Callable[[], Any],
        prompts: Prompts,
        python_executable: str | None = None,
        finishing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        notify: Callable[[str], None] | None = None,
        automatic_allowed: Callable[[], bool] = lambda: True,
        logic: Any = None,
    ) -> None:
        self.settings = settings
        self.models = ModelChoices(settings)
        self.actions = ModelActions(self.models, prompts)
        logic = logic or TumourSegmentationLogic(scene, python_executable=python_executable)
        self.runner = SegmentationRunner(scene, logic, timer, finishing=finishing)
        self.runner.listeners.append(follow_in_parameters(scene, parameters))
        self.runner.listeners.append(self._show_overlay)
        self._parameters = parameters
        self.watcher = AutoSegmentWatcher(
            scene,
            self.runner,
            enabled=lambda: settings.flag(AUTO_KEY) and automatic_allowed(),
            request_for=lambda node: automatic_request(node, self.models, settings, parameters()),
            defer=defer,
            notify=notify,
        )

    def start(self) -> None:
        """Observe the scene: its close (cancels a run) and new volumes (automatic mode)."""
        self.runner.attach()
        self.watcher.attach()

    def _show_overlay(self, event: RunnerEvent) -> None:
        """A finished run that made a probability map shows it, while "Show tumour probability" is ticked (the
        run made one because it was; here, not only in the panel, so that automatic runs show theirs too)."""
        outcome = event.outcome
        if event.kind != FINISHED or outcome is None or outcome.probability_node is None:
            return
        parameters = self._parameters()
        table = LesionTable.of(outcome.segmentation_node)
        if table is not None and parameters is not None and getattr(parameters, "showProbability", False):
            table.show_probability(True)

    def shutdown(self) -> None:
        """Stop observing and kill a running child (Slicer quits, or the module is unloaded)."""
        self.watcher.detach()
        self.runner.detach()
