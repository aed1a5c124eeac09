"""CMEDL Segment: lung tumour segmentation of a chest CT with a CMEDL-trained student network.

The panel binds to a parameter node and talks to ``CMEDLSegmentLib`` (runner, automatic mode, model list:
Qt-free, tested without Slicer); the ``cmedl`` engine runs as a child process. Importing this file and
building the panel imports neither torch nor anything Slicer does not bundle, and installs nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CMEDLCommon import ACKNOWLEDGEMENT, CITE_REQUEST
from CMEDLCommon.dependencies import self_test_skip_reason
from CMEDLCommon.settings import UserSettings
from CMEDLCommon.widgets import fill_combo, fill_device_combo, fill_table
from CMEDLSegmentLib import AUTO_KEY, DEVICE_KEY, HELP_TEXT, MODEL_KEY, SETTINGS_PREFIX

WINDOW_TITLE = "CMEDL Segment"
POLL_INTERVAL_MS = 200


class CMEDLSegment(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CMEDL Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["CMEDL developers"]
        self.parent.helpText = HELP_TEXT + CITE_REQUEST
        self.parent.acknowledgementText = ACKNOWLEDGEMENT
        # Automatic mode must work before the panel is opened: its observer starts with Slicer, like DICOM's.
        slicer.app.connect("startupCompleted()", self.onStartupCompleted)

    def onStartupCompleted(self) -> None:
        logic = CMEDLSegmentLogic.shared()
        logic.session.start()
        slicer.app.connect("aboutToQuit()", logic.shutdown)


@parameterNodeWrapper
class CMEDLSegmentParameterNode:
    """What belongs to the scene: the input, the output and the advanced settings of a run."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    lungThreshold: Annotated[float, WithinRange(-900.0, -10.0)] = -300.0
    roiMargin: Annotated[float, WithinRange(0.0, 100.0)] = 30.0
    probabilityThreshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    batchSize: Annotated[int, WithinRange(0, 64)] = 0  # 0: auto, the engine chooses
    tta: bool = False
    minLesionMl: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    minLesionProbability: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    showProbability: bool = False


class CMEDLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = self._lesions = None
        self._device = "auto"

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMEDLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMEDLSegmentLogic.shared()
        # A module loaded after startup has not seen startupCompleted(): the session starts here then.
        self.logic.session.runner.listeners.append(self.onRunnerEvent)
        fill_device_combo(self.ui.deviceSelector, self.logic.settings.text(DEVICE_KEY))
        self.ui.autoSegmentCheckBox.setChecked(self.logic.settings.flag(AUTO_KEY))
        self.ui.progressBar.setVisible(False)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, lambda *args: self.setParameterNode(None))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelFile)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.openModelFolderButton.connect("clicked(bool)", self.onOpenModelFolder)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.deleteLesionButton.connect("clicked()", lambda: self._lesionAction("delete"))
        self.ui.splitLesionsButton.connect("clicked()", lambda: self._lesionAction("split"))
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.autoSegmentCheckBox.connect("toggled(bool)", self.onAutoSegmentToggled)
        # clicked, not toggled: only the user's tick shows or hides the overlay, not the parameter node's update.
        self.ui.showProbabilityCheckBox.connect("clicked(bool)", lambda on: self._lesionAction("probability", on=on))
        self.ui.lesionTable.connect("cellClicked(int,int)", lambda row, column: self._lesionAction("centre", row))
        self.ui.lesionTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self.logic.session.runner.listeners.remove(self.onRunnerEvent)
        self.logic.shutdown()

    def enter(self) -> None:
        # Models registered in CMEDL Train since the panel was last shown appear now.
        self.refreshModels(selectName=self.ui.modelSelector.currentData)
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApplyButton)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApplyButton)
            self._updateApplyButton()

    def _updateApplyButton(self, caller=None, event=None) -> None:
        from CMEDLSegmentLib.lesion_panel import LesionTable
        from CMEDLSegmentLib.runner import apply_button
        from CMEDLSegmentLib.segmentation_nodes import segment_choices

        output = self._parameterNode.outputSegmentation if self._parameterNode else None
        choices = [(name, segmentId) for segmentId, name in segment_choices(output)]
        fill_combo(self.ui.targetSegmentSelector, choices, self.ui.targetSegmentSelector.currentData or "")
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._currentEntry())
        text, enabled, toolTip = apply_button(self.logic.session.runner.state, ready)
        self.ui.applyButton.text, self.ui.applyButton.enabled, self.ui.applyButton.toolTip = text, enabled, toolTip
        self._lesions = LesionTable.of(output)  # the output's last run (the table is kept on the node)
        fill_table(self.ui.lesionTable, self._lesions.cells() if self._lesions else [], qt.QTableWidgetItem)
        self.ui.deleteLesionButton.enabled, self.ui.splitLesionsButton.enabled = LesionTable.buttons(self._lesions)

    def _lesionAction(self, action: str, row: int | None = None, on: bool = False) -> None:
        """A lesion row click, button or the overlay box (see ``table_action``): its line goes to the status line."""
        from CMEDLSegmentLib.lesion_panel import table_action

        row = self.ui.lesionTable.currentRow() if row is None else row
        self.ui.statusLabel.text = table_action(self._lesions, action, row, on) or self.ui.statusLabel.text
        self._updateApplyButton()

    def onDeviceChanged(self, index: int) -> None:
        self.logic.settings.set_text(DEVICE_KEY, self.ui.deviceSelector.currentData)

    def onAutoSegmentToggled(self, checked: bool) -> None:
        """Automatic runs ask nothing, so turning them on installs what is missing and shows the model card now."""
        if checked and self.logic.session.actions.prepare(self.ui.modelSelector.currentData or "") is None:
            self.ui.autoSegmentCheckBox.blockSignals(True)
            self.ui.autoSegmentCheckBox.setChecked(False)
            self.ui.autoSegmentCheckBox.blockSignals(False)
            checked = False
        self.refreshModels(selectName=self.ui.modelSelector.currentData)
        self.logic.settings.set_flag(AUTO_KEY, checked)

    def refreshModels(self, selectName: str | None = None) -> None:
        models = self.logic.session.models
        models.refresh()
        selectName = models.entries[models.index_of(selectName or self.logic.settings.text(MODEL_KEY, "demo"))].name
        fill_combo(self.ui.modelSelector, [(models.label(entry), entry.name) for entry in models.entries], selectName)
        if models.problem_text() or self.ui.statusLabel.text.startswith(models.PROBLEM_PREFIX):
            self.ui.statusLabel.text = models.problem_text()  # a result line stays until the catalogue has news
        self.onModelChanged(self.ui.modelSelector.currentIndex)

    def _currentEntry(self):
        return self.logic.session.models.find(self.ui.modelSelector.currentData or "")

    def onModelChanged(self, index: int) -> None:
        entry = self._currentEntry()
        self.ui.downloadModelButton.enabled = bool(entry and entry.source == "download" and not entry.available)
        self.ui.modelCardBrowser.setHtml(self.logic.session.models.card_html(entry))
        if entry:
            self.logic.settings.set_text(MODEL_KEY, entry.name)
        self._updateApplyButton()

    def onLoadModelFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Load a CMEDL model file", "",
                                              "CMEDL model (*.safetensors)")  # fmt: skip
        entry = self.logic.session.actions.add_file(path) if path else None
        if entry is not None:
            self.refreshModels(selectName=entry.name)

    def onDownloadModel(self) -> None:
        entry = self._currentEntry()
        if entry is not None:
            self.logic.session.actions.download(entry)
            self.refreshModels(selectName=entry.name)

    def onOpenModelFolder(self) -> None:
        folder = self.logic.session.actions.folder_of(self._currentEntry())
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearCache(self) -> None:
        message = self.logic.session.actions.clear_cache()
        if message:
            self.refreshModels()
            self.ui.statusLabel.text = message

    def onApplyButton(self) -> None:
        if self.logic.session.runner.busy:
            self.logic.session.runner.cancel()
        else:
            self.startRun()

    def startRun(self, device: str | None = None) -> None:
        from cmedl.errors import CMEDLError
        from CMEDLSegmentLib.runner import RunRequest

        volume = self._parameterNode.inputVolume if self._parameterNode else None
        entry = self.logic.session.actions.prepare(self.ui.modelSelector.currentData or "") if volume else None
        self.refreshModels(selectName=self.ui.modelSelector.currentData)
        self._device = device or self.ui.deviceSelector.currentData
        segmentId = self.ui.targetSegmentSelector.currentData
        try:
            if entry is not None:
                request = RunRequest.from_panel(self._parameterNode, entry.path, self._device, segmentId)
                self.logic.session.runner.submit(request)
        except CMEDLError as error:
            self._showFailure(str(error), "", automatic=False)

    def onRunnerEvent(self, event) -> None:
        """Show what the runner reports (it also runs while the panel is hidden)."""
        if event.kind == "started":
            self.ui.logTextEdit.clear()
        if event.kind == "log":
            self.ui.logTextEdit.appendPlainText(event.message)
        elif event.kind == "failed":
            self._showFailure(event.message, event.details, automatic=bool(event.request and event.request.automatic))
        elif event.kind != "progress":
            self.ui.statusLabel.text = event.message
        self.ui.progressBar.setVisible(self.logic.session.runner.busy)
        if event.kind in ("started", "progress"):
            self.ui.progressBar.setValue(int(round(100 * (event.fraction or 0.0))))
            self.ui.progressBar.setFormat(f"{event.message}: %p%" if event.kind == "progress" else "starting")
        self._updateApplyButton()

    def _showFailure(self, message: str, details: str, automatic: bool) -> None:
        from CMEDLSegmentLib.runner import offers_cpu_retry

        self.ui.statusLabel.text = f"Failed: {message}"
        if details:
            self.ui.logTextEdit.appendPlainText(details)
        if automatic:
            return  # no dialog for a run the user did not start: the status line and the log say it
        prompts = self.logic.session.actions.prompts
        if offers_cpu_retry(message, self._device):
            if prompts.ask(f"{message}\n\nRun on the CPU instead? (slower, but it needs no GPU)"):
                self.startRun(device="cpu")
        else:
            prompts.error(message, details)


class CMEDLSegmentLogic(ScriptedLoadableModuleLogic):
    """Hands Slicer's pieces to the session that outlives the panel; the blocking path for scripts."""

    _shared = None

    @classmethod
    def shared(cls) -> CMEDLSegmentLogic:
        """The logic the module and its panel share (one session, one runner per Slicer session)."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.settings = UserSettings(SETTINGS_PREFIX)
        self._session = self._timer = None

    def getParameterNode(self):
        return CMEDLSegmentParameterNode(super().getParameterNode())

    @property
    def session(self):
        """The :class:`~CMEDLSegmentLib.session.SegmentSession` of Slicer's scene, observing it once created."""
        if self._session is None:
            from CMEDLCommon.engine import engine_python
            from CMEDLCommon.prompts import SlicerPrompts
            from CMEDLSegmentLib.session import SegmentSession

            self._timer = qt.QTimer()
            self._timer.setInterval(POLL_INTERVAL_MS)
            self._session = SegmentSession(
                slicer.mrmlScene, self.settings, self._timer, defer=qt.QTimer.singleShot,
                parameters=self.getParameterNode, python_executable=engine_python(),
                prompts=SlicerPrompts(WINDOW_TITLE), finishing=slicer.util.RenderBlocker,
                notify=lambda message: slicer.util.showStatusMessage(message, 8000),
                automatic_allowed=lambda: not slicer.app.testingEnabled(),
            )  # fmt: skip
            self._timer.connect("timeout()", self._session.runner.tick)
            self._session.start()
        return self._session

    def shutdown(self) -> None:
        if self._session is not None:
            self._session.shutdown()

    def process(self, volumeNode, modelPath, outputSegmentation=None, device: str = "auto", timeout: float = 600):
        """Blocking segmentation for scripts and self-tests; returns the engine's outcome."""
        from CMEDLCommon.engine import engine_python
        from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic

        logic = TumourSegmentationLogic(slicer.mrmlScene, python_executable=engine_python())
        return logic.segment(volumeNode, SegmentationSettings(modelPath, device), outputSegmentation, timeout=timeout)


class CMEDLSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer in seconds on a small phantom CT; a step whose packages are missing is skipped."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        for test in (self.test_segment_phantom_ct, self.test_scene_close_cancels_a_run):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")
            finally:
                self.doCleanups()

    def _phantom(self):
        """A phantom CT in the scene and a threshold model with a known answer (skipped without the packages)."""
        if self_test_skip_reason("Apply in CMEDL Segment"):
            self.skipTest(self_test_skip_reason("Apply in CMEDL Segment"))
        import SimpleITK as sitk

        from cmedl.phantom import make_phantom
        from cmedl.reference_models import write_threshold_model

        folder = tempfile.mkdtemp(prefix="cmedl-selftest-")
        self.addCleanup(shutil.rmtree, folder, True)
        image = make_phantom("ct", seed=3, size=128).image
        sitk.WriteImage(image, os.path.join(folder, "ct.nrrd"))
        model = write_threshold_model(os.path.join(folder, "t.safetensors"), -200.5, spacing_mm=image.GetSpacing()[:2])
        return slicer.util.loadVolume(os.path.join(folder, "ct.nrrd")), model

    def test_segment_phantom_ct(self) -> None:
        import numpy as np

        volume, modelPath = self._phantom()
        before = slicer.util.arrayFromVolume(volume).copy()
        self.delayDisplay("Segmenting a phantom CT with a threshold model, blocking")
        outcome = CMEDLSegmentLogic().process(volume, modelPath, device="cpu")
        segmentation = outcome.segmentation_node
        self.assertEqual(segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()), volume)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, outcome.segment_id, volume)
        self.assertGreater(int(mask.sum()), 0)
        self.assertTrue(np.all(before[mask > 0] > -200.5), "every segmented voxel is above the threshold")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)

    def test_scene_close_cancels_a_run(self) -> None:
        import time

        from CMEDLSegmentLib.runner import RunRequest
        from CMEDLSegmentLib.segment_logic import SegmentationSettings

        session = CMEDLSegmentLogic.shared()._session
        self.assertTrue(session and session.watcher._observers, "startupCompleted() started the scene observers")
        volume, modelPath = self._phantom()
        session.runner.submit(RunRequest(volume.GetID(), SegmentationSettings(modelPath, device="cpu")))
        self.delayDisplay("Closing the scene while a segmentation runs: it is cancelled, nothing is added")
        slicer.mrmlScene.Clear()
        deadline = time.monotonic() + 30
        while session.runner.busy and time.monotonic() < deadline:
            slicer.app.processEvents()
        self.assertFalse(session.runner.busy)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)
