"""The "segment new CT volumes automatically" option: which volumes it reacts to, and its scene observer.

:class:`AutoSegmentWatcher` observes the scene for added volume nodes from the moment the module is loaded,
not from the moment the panel is opened. A reader adds a volume node before its voxels, so each new scalar
volume is looked at once loading is over (after ``delay_ms``); a CT in Hounsfield units is then handed to
the :class:`~CMEDLSegmentLib.runner.SegmentationRunner`, which starts it or queues it behind a running one.
A look that was scheduled before the scene was closed is dropped: node IDs restart in the next scene and
could name an unrelated node. Volumes that come with a scene being loaded are left alone (a saved scene
brings its own segmentations).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vtkmodules.util.misc import calldata_type
from vtkmodules.util.vtkConstants import VTK_OBJECT

from cmedl.catalogue import BUILTIN_DEMO
from cmedl.devices import DEFAULT_DEVICE
from cmedl.errors import CMEDLError
from cmedl.modality import ct_likelihood_report
from CMEDLCommon.dependencies import missing_packages
from CMEDLCommon.settings import UserSettings
from CMEDLSegmentLib import DEVICE_KEY, MODEL_KEY
from CMEDLSegmentLib.models import ModelChoices
from CMEDLSegmentLib.runner import RunRequest, SegmentationRunner
from CMEDLSegmentLib.segment_logic import SegmentationSettings
from CMEDLSegmentLib.volume_nodes import volume_node_to_image

DELAY_MS = 500


def should_segment_automatically(node) -> tuple[bool, str]:
    """Whether ``node`` is a scalar CT volume in Hounsfield units, and why not when it is not.

    Label maps, segmentations, vector volumes, MR images and nodes without voxels are never segmented
    automatically; an unexpected volume the user loads must not start a run.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        return False, "not a scalar volume"
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return False, "a label map"
    try:
        report = ct_likelihood_report(volume_node_to_image(node))
    except CMEDLError as error:
        return False, str(error)
    if not report["looks_like_ct"]:
        return False, str(report["reason"])
    return True, "CT in Hounsfield units"


def automatic_request(
    node: Any,
    models: ModelChoices,
    settings: UserSettings,
    parameters: Any,
    missing: Callable[[], list[str]] = missing_packages,
) -> RunRequest | str:
    """The run for a new CT with the user's model and device and the scene's advanced values, or why none.

    An automatic run asks the user nothing: the Python packages must be installed and the model on disk with
    its card accepted (Apply once, or turning automatic mode on, takes care of that). ``parameters`` is the
    module's parameter node, None for the defaults.
    """
    lacking = missing()
    if lacking:
        return f"Python packages are missing ({'; '.join(lacking)}); press Apply once in CMEDL Segment"
    path, reason = models.ready_for_automatic(settings.text(MODEL_KEY, BUILTIN_DEMO))
    if path is None:
        return reason
    settings_for_run = SegmentationSettings.from_panel(parameters, path, settings.text(DEVICE_KEY, DEFAULT_DEVICE))
    return RunRequest(node.GetID(), settings_for_run, automatic=True, volume_name=node.GetName())


class AutoSegmentWatcher:
    """Segments CT volumes added to ``scene`` while ``enabled()`` says so (see the module docstring).

    Args:
        scene: the MRML scene to observe.
        runner: starts or queues the runs.
        enabled: whether automatic mode is on now (the user's setting, read at each new node).
        request_for: the run request for a CT node, or a one-line reason why it cannot run now.
        defer: ``defer(milliseconds, callback)`` calls back later (``qt.QTimer.singleShot`` in Slicer).
        notify: receives one line for every CT that was looked at (the status bar); the log gets it too.
    """

    def __init__(
        self,
        scene: Any,
        runner: SegmentationRunner,
        enabled: Callable[[], bool],
        request_for: Callable[[Any], RunRequest | str],
        defer: Callable[[int, Callable[[], None]], None],
        notify: Callable[[str], None] | None = None,
        delay_ms: int = DELAY_MS,
    ) -> None:
        self.scene = scene
        self.runner = runner
        self.enabled = enabled
        self.request_for = request_for
        self.defer = defer
        self.notify = notify or (lambda message: None)
        self.delay_ms = delay_ms
        self._generation = 0
        self._observers: list[int] = []

    def attach(self) -> None:
        """Start observing (a no-op when already observing)."""
        if self._observers:
            return
        self._observers = [
            self.scene.AddObserver(self.scene.NodeAddedEvent, self._on_node_added),
            self.scene.AddObserver(self.scene.StartCloseEvent, self._on_scene_closing),
        ]

    def detach(self) -> None:
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []
        self._generation += 1

    @calldata_type(VTK_OBJECT)
    def _on_node_added(self, caller: Any, event: Any, node: Any) -> None:
        if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            return
        if self.scene.IsImporting() or not self.enabled():
            return
        node_id, generation = node.GetID(), self._generation
        self.defer(self.delay_ms, lambda: self.consider(node_id, generation))

    def _on_scene_closing(self, caller: Any = None, event: Any = None) -> None:
        self._generation += 1

    def consider(self, node_id: str, generation: int | None = None) -> str:
        """Look at a new volume node now; returns what happened, in one line."""
        if generation is not None and generation != self._generation:
            return "the scene was closed since the volume was added"
        node = self.scene.GetNodeByID(node_id)
        if node is None or not self.enabled():
            return "the volume was removed, or automatic mode was turned off"
        accepted, reason = should_segment_automatically(node)
        if not accepted:
            return f"{node.GetName()} is not segmented automatically: {reason}"
        request = self.request_for(node)
        if isinstance(request, str):
            message = f"{node.GetName()} was not segmented automatically: {request}"
        else:
            try:
                outcome = self.runner.submit(request)
            except CMEDLError as error:
                outcome = f"not started ({error})"
            message = f"{node.GetName()}: automatic segmentation {outcome}"
        logging.info("CMEDL Segment: %s", message)
        self.notify(message)
        return message
