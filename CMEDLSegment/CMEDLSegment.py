"""CMEDL Segment: lung tumour segmentation of a chest CT with a CMEDL-trained student network.

The module is thin: the panel binds to a parameter node and forwards to ``CMEDLSegmentLib`` (scene code)
and the ``cmedl`` engine, which runs as a child process. Importing this file and building the panel
imports neither torch nor anything that is not bundled with Slicer, installs nothing and opens no
network connection: packages are installed only when the user first presses Apply.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import threading
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

PAPER = (
    "J. Jiang, A. Rimner, J. O. Deasy, H. Veeraraghavan. Unpaired cross-modality educed distillation (CMEDL) for "
    "medical image segmentation. IEEE Transactions on Medical Imaging 41(5):1057-1068, 2022. "
    "doi:10.1109/TMI.2021.3132291"
)
SETTINGS_PREFIX = "CMEDL/Segment/"
DEVICE_CHOICES = (("Auto", "auto"), ("GPU (CUDA)", "cuda"), ("CPU", "cpu"))
POLL_INTERVAL_MS = 200


#
# Module
#


class CMEDLSegment(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CMEDL Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CMEDL developers"]
        self.parent.helpText = (
            "Segments lung tumours on chest CT with a student network trained by cross-modality educed "
            "distillation (CMEDL): during training an MRI teacher guided the CT network; only the CT network "
            "runs here, slice by slice.<br><br>"
            "<b>Intended use: research only.</b> This is not a medical device; review and edit every contour. "
            "Each model's card (shown in the panel before first use) states what it was trained on and its "
            "license; the built-in demo model was trained on synthetic phantoms and is for demonstrations only."
            "<br><br>Choose the CT, press Apply, and keep working while the progress bar advances. The result is "
            "an editable segment named after the model's label, ready for Segment Statistics and DICOM SEG export."
            "<br><br>If you use CMEDL in your work, please cite: " + PAPER
        )
        self.parent.acknowledgementText = "The method is described in: " + PAPER


#
# Parameter node
#


@parameterNodeWrapper
class CMEDLSegmentParameterNode:
    """What belongs to the scene: the input, the output and the advanced settings of a run."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    lungThreshold: Annotated[float, WithinRange(-900.0, 0.0)] = -300.0
    roiMargin: Annotated[float, WithinRange(0.0, 100.0)] = 30.0
    probabilityThreshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    batchSize: Annotated[int, WithinRange(1, 64)] = 4


#
# Widget
#


class CMEDLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._timer = None
        self._modelEntries = []
        self._device = "auto"

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMEDLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMEDLSegmentLogic()

        for text, value in DEVICE_CHOICES:
            self.ui.deviceSelector.addItem(text, value)
        self.ui.progressBar.setVisible(False)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelFile)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.openModelFolderButton.connect("clicked(bool)", self.onOpenModelFolder)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.autoSegmentCheckBox.connect("toggled(bool)", self.onAutoSegmentToggled)

        self.refreshModels(selectName=self._setting("model", "demo"))
        self.ui.deviceSelector.setCurrentIndex(max(0, self.ui.deviceSelector.findData(self._setting("device", "auto"))))
        self.ui.autoSegmentCheckBox.setChecked(self._setting("autoSegment", "false") == "true")
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApplyButton)

    def onSceneStartClose(self, caller, event) -> None:
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
        self._refreshTargetSegments()
        if self._task is not None:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the segmentation; nothing is added to the scene"
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = "Apply"
        ready = bool(self._parameterNode and self._parameterNode.inputVolume) and self._currentEntry() is not None
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (
            "Segment the lung tumour" if ready else "Choose an input CT volume and a model first"
        )

    def _refreshTargetSegments(self) -> None:
        """List the output segmentation's segments; the first entry means "the model's label segment"."""
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        segments = []
        if segmentation is not None:
            content = segmentation.GetSegmentation()
            segments = [(segmentId, content.GetSegment(segmentId).GetName()) for segmentId in content.GetSegmentIDs()]
        current = self.ui.targetSegmentSelector.currentData
        wanted = [("", "Segment named after the model's label")] + segments
        shown = [(self.ui.targetSegmentSelector.itemData(i), self.ui.targetSegmentSelector.itemText(i))
                 for i in range(self.ui.targetSegmentSelector.count)]  # fmt: skip
        if shown == wanted:
            return
        self.ui.targetSegmentSelector.blockSignals(True)
        self.ui.targetSegmentSelector.clear()
        for segmentId, name in wanted:
            self.ui.targetSegmentSelector.addItem(name, segmentId)
        self.ui.targetSegmentSelector.setCurrentIndex(max(0, self.ui.targetSegmentSelector.findData(current or "")))
        self.ui.targetSegmentSelector.blockSignals(False)

    # -- user settings (QSettings: they belong to the user, not to the scene) ---------------------------

    def _setting(self, key: str, default: str) -> str:
        return str(qt.QSettings().value(SETTINGS_PREFIX + key, default))

    def _setSetting(self, key: str, value: str) -> None:
        qt.QSettings().setValue(SETTINGS_PREFIX + key, value)

    def onDeviceChanged(self, index: int) -> None:
        self._setSetting("device", self.ui.deviceSelector.currentData)

    def onAutoSegmentToggled(self, checked: bool) -> None:
        self._setSetting("autoSegment", "true" if checked else "false")

    # -- models -----------------------------------------------------------------------------------------

    def refreshModels(self, selectName: str | None = None) -> None:
        from cmedl.catalogue import list_models

        self._modelEntries = list_models()
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for entry in self._modelEntries:
            suffix = "" if entry.available else " (download)"
            self.ui.modelSelector.addItem(f"{entry.title or entry.name}{suffix}", entry.name)
        index = self.ui.modelSelector.findData(selectName) if selectName else -1
        self.ui.modelSelector.setCurrentIndex(max(index, 0))
        self.ui.modelSelector.blockSignals(False)
        self.onModelChanged(self.ui.modelSelector.currentIndex)

    def _currentEntry(self):
        index = self.ui.modelSelector.currentIndex
        if index < 0 or index >= len(self._modelEntries):
            return None
        return self._modelEntries[index]

    def onModelChanged(self, index: int) -> None:
        entry = self._currentEntry()
        self.ui.downloadModelButton.enabled = bool(entry and entry.source == "download" and not entry.available)
        self.ui.modelCardBrowser.setHtml(self.logic.modelCardHtml(entry) if entry else "No model installed.")
        if entry:
            self._setSetting("model", entry.name)
        self._updateApplyButton()

    def onLoadModelFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Load a CMEDL model file", "", "CMEDL model (*.safetensors)"
        )
        if not path:
            return
        from cmedl.catalogue import add_model, user_models_dir
        from cmedl.errors import CMEDLError

        stem = os.path.basename(path).removesuffix(".safetensors")
        replace = False
        if os.path.exists(os.path.join(user_models_dir(), f"{stem}.safetensors")):
            replace = slicer.util.confirmYesNoDisplay(
                f"A model named '{stem}' is already registered. Replace it with this file?", windowTitle="CMEDL Segment"
            )
            if not replace:
                return
        try:
            entry = add_model(path, overwrite=replace)
        except CMEDLError as error:
            slicer.util.errorDisplay(f"This file cannot be used: {error}", windowTitle="CMEDL Segment")
            return
        self.refreshModels(selectName=entry.name)

    def onDownloadModel(self) -> None:
        entry = self._currentEntry()
        if entry is None or entry.source != "download":
            return
        self._downloadIfNeeded(entry)
        self.refreshModels(selectName=entry.name)

    def _downloadIfNeeded(self, entry) -> bool:
        """Download a catalogue entry after the user accepted its license; False if declined or failed."""
        if entry.available:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            f"Download the model '{entry.title or entry.name}'?\n\nLicense: {entry.license}\n\n"
            "By downloading you accept this license. The file is checked against its published sha256.",
            windowTitle="CMEDL Segment: download model",
            detailedText=f"{entry.url}\nsha256 {entry.sha256}",
        ):
            return False
        from cmedl.catalogue import download_model
        from cmedl.errors import CMEDLError
        from cmedl.progress import CallbackProgress

        dialog = slicer.util.createProgressDialog(
            windowTitle="CMEDL Segment", labelText=f"Downloading {entry.name}...", maximum=100
        )
        cancel = threading.Event()

        def onEvent(event: dict) -> None:
            if event.get("event") == "progress" and event.get("total"):
                dialog.setValue(int(100 * event["done"] / event["total"]))
            slicer.app.processEvents()
            if dialog.wasCanceled:
                cancel.set()

        try:
            download_model(entry.name, accept_license=True, progress=CallbackProgress(onEvent, cancel))
        except CMEDLError as error:
            slicer.util.errorDisplay(f"Download failed: {error}", windowTitle="CMEDL Segment")
            return False
        finally:
            dialog.close()
        return True

    def onOpenModelFolder(self) -> None:
        from cmedl.catalogue import cache_dir, user_models_dir

        entry = self._currentEntry()
        folder = cache_dir() if entry is not None and entry.source == "download" else user_models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearCache(self) -> None:
        from cmedl.catalogue import cache_dir, clear_cache

        if slicer.util.confirmOkCancelDisplay(
            f"Delete every downloaded model in {cache_dir()}? Models you registered yourself are kept.",
            windowTitle="CMEDL Segment",
        ):
            removed = clear_cache()
            self.ui.statusLabel.text = f"Removed {removed} downloaded model file(s)."
            self.refreshModels(selectName=self._setting("model", "demo"))

    def _confirmModelCard(self, entry) -> bool:
        """Show the model card once per model file before its first use."""
        key = f"acceptedModelCards/{entry.name}"
        if self._setting(key, "") == "yes":
            return True
        accepted = slicer.util.confirmOkCancelDisplay(
            "Before the first use of this model, please read its model card (intended use, training data, "
            "license). Use it?",
            windowTitle=f"CMEDL Segment: {entry.title or entry.name}",
            detailedText=self.logic.modelCardText(entry),
        )
        if accepted:
            self._setSetting(key, "yes")
        return accepted

    # -- running ----------------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._task is not None:
            self._cancelRun()
            return
        self.startRun()

    def startRun(self, device: str | None = None) -> None:
        entry = self._currentEntry()
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if entry is None or volume is None:
            return
        try:
            if not self.logic.ensureDependencies():
                return
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error), windowTitle="CMEDL Segment")
            return
        if not self._downloadIfNeeded(entry) or not self._confirmModelCard(entry):
            return
        self.refreshModels(selectName=entry.name)
        from cmedl.catalogue import resolve_model
        from cmedl.errors import CMEDLError

        device = device or self.ui.deviceSelector.currentData
        self._device = device
        try:
            self._task = self.logic.start(
                volume, resolve_model(entry.name), self._parameterNode, device,
                segmentId=self.ui.targetSegmentSelector.currentData or None,
            )  # fmt: skip
        except CMEDLError as error:
            self._showFailure(str(error), "")
            return
        self.ui.logTextEdit.clear()
        self.ui.statusLabel.text = f"Segmenting {volume.GetName()}..."
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat("starting")
        self._updateApplyButton()
        self._timer.start()

    def onPoll(self) -> None:
        task = self._task
        if task is None:
            self._timer.stop()
            return
        for event in task.poll():
            if event.get("event") == "log":
                self.ui.logTextEdit.appendPlainText(str(event.get("message", "")))
        fraction = task.fraction()
        if fraction is not None:
            self.ui.progressBar.setValue(int(round(100 * fraction)))
            self.ui.progressBar.setFormat(f"{task.stage_text()}: %p%")
        if task.running:
            return
        self._timer.stop()
        self._task = None
        from cmedl.errors import CMEDLError

        try:
            with slicer.util.RenderBlocker():
                outcome = task.finish()
        except CMEDLError as error:
            self._showFailure(str(error), task.job.stderr_tail())
            return
        finally:
            self.ui.progressBar.setVisible(False)
            self._updateApplyButton()
        self._parameterNode.outputSegmentation = outcome.segmentation_node
        segment = outcome.segmentation_node.GetSegmentation().GetSegment(outcome.segment_id)
        self.ui.statusLabel.text = outcome.status_line(segment.GetName() if segment else "Lung tumour")

    def _cancelRun(self) -> None:
        task, self._task = self._task, None
        self._timer.stop()
        if task is not None:
            task.cancel()
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = "Cancelled; nothing was added to the scene."
        self._updateApplyButton()

    def _showFailure(self, message: str, details: str) -> None:
        self.ui.statusLabel.text = f"Failed: {message}"
        if details:
            self.ui.logTextEdit.appendPlainText(details)
        lowered = message.lower()
        if self._device != "cpu" and ("cuda" in lowered or "gpu" in lowered):
            if slicer.util.confirmYesNoDisplay(
                f"{message}\n\nRun on the CPU instead? (slower, but it needs no GPU)", windowTitle="CMEDL Segment"
            ):
                self.startRun(device="cpu")
            return
        if details:
            slicer.util.errorDisplay(message, windowTitle="CMEDL Segment", detailedText=details)
        else:
            slicer.util.errorDisplay(message, windowTitle="CMEDL Segment")

    # -- automatic mode -----------------------------------------------------------------------------------

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        if not self.ui.autoSegmentCheckBox.checked or not isinstance(node, vtkMRMLScalarVolumeNode):
            return
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            return
        # Readers add the node before its voxels; look once loading has finished.
        nodeId = node.GetID()
        qt.QTimer.singleShot(500, lambda: self._autoSegment(nodeId))

    def _autoSegment(self, nodeId: str) -> None:
        node = slicer.mrmlScene.GetNodeByID(nodeId)
        if node is None or self._task is not None or not self.logic.looksLikeCT(node):
            return
        self._parameterNode.inputVolume = node
        self._parameterNode.outputSegmentation = None
        self.startRun()


#
# Logic
#


class CMEDLSegmentLogic(ScriptedLoadableModuleLogic):
    """Slicer-facing logic; the work is in CMEDLSegmentLib and the engine."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CMEDLSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def enginePython() -> str:
        """The interpreter for the engine's child process: Slicer's PythonSlicer launcher."""
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        return shutil.which(name) or os.path.join(slicer.app.slicerHome, "bin", name)

    @staticmethod
    def ensureDependencies() -> bool:
        from CMEDLSegmentLib.dependencies import ensure_dependencies

        return ensure_dependencies(requester="CMEDL")

    @staticmethod
    def looksLikeCT(volumeNode) -> bool:
        """True for a scalar volume in Hounsfield units (an MR image or a label map is not)."""
        from CMEDLSegmentLib.auto_segment import should_segment_automatically

        return should_segment_automatically(volumeNode)[0]

    @staticmethod
    def modelCardText(entry) -> str:
        from CMEDLSegmentLib.model_cards import model_card_text

        return model_card_text(entry)

    @staticmethod
    def modelCardHtml(entry) -> str:
        from CMEDLSegmentLib.model_cards import model_card_text

        return "<pre>" + html.escape(model_card_text(entry)) + "</pre>"

    def start(self, volumeNode, modelPath, parameters, device: str, segmentId: str | None = None):
        """Start a non-blocking run with the panel's settings; returns a task to poll.

        ``segmentId`` names an existing segment of the output segmentation whose content the result replaces.
        """
        from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic

        settings = SegmentationSettings(
            model_path=modelPath,
            device=device,
            lung_threshold_hu=parameters.lungThreshold,
            roi_margin_mm=parameters.roiMargin,
            probability_threshold=parameters.probabilityThreshold,
            batch_size=parameters.batchSize,
        )
        logic = TumourSegmentationLogic(slicer.mrmlScene, python_executable=self.enginePython())
        segmentation = parameters.outputSegmentation
        return logic.start(volumeNode, settings, segmentation, segmentId if segmentation is not None else None)

    def process(self, volumeNode, modelPath, outputSegmentation=None, device: str = "auto", timeout: float = 600):
        """Blocking segmentation for scripts and self-tests; returns the engine's outcome."""
        from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic

        logic = TumourSegmentationLogic(slicer.mrmlScene, python_executable=self.enginePython())
        settings = SegmentationSettings(model_path=modelPath, device=device)
        return logic.segment(volumeNode, settings, outputSegmentation, timeout=timeout)


#
# Test
#


class CMEDLSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer in seconds: a small phantom CT, a threshold model with a known answer, the demo model."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_segment_phantom_ct()

    def test_segment_phantom_ct(self) -> None:
        import importlib.util

        import numpy as np
        import SimpleITK as sitk

        if importlib.util.find_spec("torch") is None:
            self.delayDisplay("PyTorch is not installed: press Apply once in CMEDL Segment to install it")
            return
        from cmedl.catalogue import resolve_model
        from cmedl.phantom import make_phantom
        from cmedl.reference_models import write_threshold_model

        self.delayDisplay("Writing a small phantom CT and a threshold model")
        folder = tempfile.mkdtemp(prefix="cmedl-selftest-")
        case = make_phantom("ct", seed=3, size=128)
        ctPath = os.path.join(folder, "phantom_ct.nrrd")
        sitk.WriteImage(case.image, ctPath)
        level = -200.5
        modelPath = write_threshold_model(
            os.path.join(folder, "threshold.safetensors"), level, spacing_mm=case.image.GetSpacing()[:2]
        )
        volume = slicer.util.loadVolume(ctPath)
        before = slicer.util.arrayFromVolume(volume).copy()

        self.delayDisplay("Segmenting with the threshold model")
        logic = CMEDLSegmentLogic()
        outcome = logic.process(volume, modelPath, device="cpu")
        segmentation = outcome.segmentation_node
        self.assertEqual(
            segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()), volume
        )
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, outcome.segment_id, volume)
        self.assertGreater(int(mask.sum()), 0)
        self.assertTrue(np.all(before[mask > 0] > level), "every segmented voxel is above the threshold")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)

        self.delayDisplay("Segmenting again with the built-in demo model into the same segmentation")
        nodes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        again = logic.process(volume, resolve_model("demo"), outputSegmentation=segmentation, device="cpu")
        self.assertIs(again.segmentation_node, segmentation)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), nodes)
        self.assertGreaterEqual(again.volume_ml, 0.0)
        shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")
