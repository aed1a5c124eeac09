"""CMEDL Train: train the CT lung tumour network on your own CT (and, for CMEDL, unpaired MRI) in 3D Slicer.

The panel binds to a parameter node and calls ``CMEDLTrainLib`` (Qt-free, tested without Slicer). Training is
a detached process that goes on while Slicer is closed; the panel follows it through its run folder. Loading
this file and building the panel import neither torch nor anything Slicer does not bundle.
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
from CMEDLCommon.prompts import SlicerPrompts
from CMEDLCommon.settings import UserSettings
from CMEDLCommon.widgets import fill_combo, fill_device_combo
from CMEDLTrainLib import HELP_TEXT

WINDOW_TITLE = "CMEDL Train"
POLL_INTERVAL_MS = 2000
PREVIEW_WIDTH = 420
# The folder fields (``<key>PathLineEdit``), and their QSettings keys: the data folders in DataFolders' order first.
PATH_KEYS = ("ctImages", "ctLabels", "mrImages", "mrLabels", "validation", "vggWeights", "runsRoot")


class CMEDLTrain(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CMEDL Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CMEDL developers"]
        self.parent.helpText = HELP_TEXT + "<br><br>" + CITE_REQUEST
        self.parent.acknowledgementText = ACKNOWLEDGEMENT


@parameterNodeWrapper
class CMEDLTrainParameterNode:
    """What belongs to the scene: the case to add, and the method and values of the next run."""

    exportVolume: vtkMRMLScalarVolumeNode
    exportSegmentation: vtkMRMLSegmentationNode
    caseName: str = ""
    method: str = "ct_only"
    segmentor: str = "unet"
    epochs: Annotated[int, WithinRange(1, 100000)] = 50
    iterationsPerEpoch: Annotated[int, WithinRange(1, 1000000)] = 100
    batchSize: Annotated[int, WithinRange(1, 512)] = 2
    patchSize: Annotated[int, WithinRange(32, 2048)] = 256
    spacingMm: Annotated[float, WithinRange(0.1, 20.0)] = 1.0
    lrSegmentor: Annotated[float, WithinRange(0.000001, 1.0)] = 0.0002
    lrTranslator: Annotated[float, WithinRange(0.000001, 1.0)] = 0.0001
    lambdaAdv: Annotated[float, WithinRange(0.0, 1000.0)] = 1.0
    lambdaCyc: Annotated[float, WithinRange(0.0, 1000.0)] = 10.0
    lambdaCx: Annotated[float, WithinRange(0.0, 1000.0)] = 1.0
    lambdaHint: Annotated[float, WithinRange(0.0, 1000.0)] = 1.0
    lambdaSeg: Annotated[float, WithinRange(0.0, 1000.0)] = 5.0
    useCx: bool = True
    useCycle: bool = True
    useSegRm: bool = True
    useSegPm: bool = True
    randomVgg: bool = False
    validationFraction: Annotated[float, WithinRange(0.0, 0.9)] = 0.2
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    gpus: Annotated[int, WithinRange(1, 64)] = 1
    runName: str = ""
    initModel: str = ""
    initExtra: str = ""
    freezeEncoderEpochs: Annotated[int, WithinRange(0, 100000)] = 0
    warmupEpochs: Annotated[int, WithinRange(0, 100000)] = 0


class CMEDLTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = self._snapshot = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMEDLTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMEDLTrainLogic()
        from CMEDLTrainLib.actions import TrainActions
        from CMEDLTrainLib.monitor import RunMonitor
        from CMEDLTrainLib.start_from_model import StartFromModel

        self.settings = UserSettings("CMEDL/Train/")
        self.actions = TrainActions(SlicerPrompts(WINDOW_TITLE))
        self.startFrom = StartFromModel(self.actions.prompts)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self.monitor = RunMonitor(slicer.mrmlScene, self._timer)
        self.monitor.suspend()  # until enter(): a panel built but not shown polls nothing
        fill_device_combo(self.ui.deviceSelector, self.settings.text("device"))
        self.ui.progressBar.setVisible(False)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # User preferences (folders, device, VGG weights) live in QSettings, not in the scene.
        self._pathSettings = {key: getattr(self.ui, f"{key}PathLineEdit") for key in PATH_KEYS}
        defaultRoot = os.path.join(os.path.expanduser("~"), "CMEDL", "runs")
        for key, widget in self._pathSettings.items():
            widget.currentPath = self.settings.text(key, defaultRoot if key == "runsRoot" else "")
            widget.connect("currentPathChanged(QString)", lambda path, key=key: self.onPathChanged(key, path))
        for button, slot in ((self.ui.checkDataButton, self.onCheckData), (self.ui.addCaseButton, self.onAddCase),
                             (self.ui.paperDefaultsButton, lambda: self.startFrom.reset(self._parameterNode)),
                             (self.ui.startButton, self.onStart), (self.ui.stopButton, self.onStop),
                             (self.ui.resumeButton, self.onResume), (self.ui.registerButton, self.onRegister),
                             (self.ui.openRunFolderButton, self.onFolder),
                             (self.ui.refreshRunsButton, lambda: self.refreshRuns(self.monitor.run_path))):  # fmt: skip
            button.connect("clicked(bool)", slot)
        self.ui.methodSelector.connect("currentIndexChanged(int)", self.onComboChanged)
        self.ui.segmentorSelector.connect("currentIndexChanged(int)", self.onComboChanged)
        self.ui.initModelSelector.connect("currentIndexChanged(int)", self.onStartFromChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.addSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.addVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onExportVolumeChanged)
        self.ui.runsListWidget.connect("currentRowChanged(int)", self.onRunSelected)
        self.initializeParameterNode()
        self.refreshRuns(selectPath=self.settings.text("lastRun", ""))

    def cleanup(self) -> None:
        # The run itself goes on: it is a process of its own, found again when the module is opened.
        self.removeObservers()
        self.monitor.suspend()

    def enter(self) -> None:
        self.monitor.resume()
        self.initializeParameterNode()
        self.onSegmentationChanged()
        self.refreshRuns(selectPath=self.monitor.run_path)

    def exit(self) -> None:
        self.monitor.suspend()
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.monitor.scene_closed()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Combo boxes that are not bound (filled without their signals), the VGG note and the settings' check."""
        from cmedl.training.choices import METHOD_CHOICES, SEGMENTOR_CHOICES
        from CMEDLTrainLib.parameters import vgg_note

        node = self._parameterNode
        if node is None:
            return
        fill_combo(self.ui.methodSelector, list(METHOD_CHOICES), node.method)
        fill_combo(self.ui.segmentorSelector, list(SEGMENTOR_CHOICES), node.segmentor)
        self.startFrom.show_in(self.ui.initModelSelector, node.initModel)
        cmedl = node.method == "cmedl"
        for widget in (self.ui.mrImagesPathLineEdit, self.ui.mrLabelsPathLineEdit, self.ui.lrTranslatorSpinBox,
                       self.ui.lossWeightsCollapsibleButton, self.ui.vggWeightsPathLineEdit,
                       self.ui.randomVggCheckBox):  # fmt: skip
            widget.enabled = cmedl
        self.ui.vggWeightsPathLineEdit.enabled = cmedl and not node.randomVgg
        self.ui.vggNoteLabel.text = vgg_note(node, self.ui.vggWeightsPathLineEdit.currentPath)
        self._updateButtons()

    def onPathChanged(self, key: str, path: str) -> None:
        self.settings.set_text(key, path)
        if key == "runsRoot":
            self.refreshRuns()
        else:
            self._onParameterNodeModified()

    def onDeviceChanged(self, index: int) -> None:
        self.settings.set_text("device", self.ui.deviceSelector.currentData)
        self._updateButtons()

    def onComboChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.method = self.ui.methodSelector.currentData
            self._parameterNode.segmentor = self.ui.segmentorSelector.currentData

    def onStartFromChanged(self, index: int) -> None:
        """The "Start from model" list: a listed model or none, or a run folder or model file chosen in a dialog now."""
        runsRoot = self.ui.runsRootPathLineEdit.currentPath
        self.startFrom.choose(self._parameterNode, self.ui.initModelSelector.currentData, runsRoot)
        self._onParameterNodeModified()  # the list shows the node's choice again, also after a cancel or a refusal

    def _folders(self):
        from CMEDLTrainLib.settings import DataFolders

        return DataFolders(*(self._pathSettings[key].currentPath.strip() for key in PATH_KEYS[:5]))

    def _settings(self):
        from CMEDLTrainLib.parameters import settings_from_parameters

        vggPath = self.ui.vggWeightsPathLineEdit.currentPath
        return settings_from_parameters(self._parameterNode, self.ui.deviceSelector.currentData, vggPath)

    def _updateButtons(self) -> None:
        from CMEDLTrainLib.settings import settings_problem

        if self._parameterNode is None:
            return
        problem = settings_problem(self._settings(), self._folders())
        self.ui.settingsProblemLabel.text = f"Cannot start: {problem}" if problem else ""
        self.ui.startButton.enabled = not problem and bool(self.ui.runsRootPathLineEdit.currentPath.strip())
        self.ui.startButton.toolTip = problem or "Check the data, then start a new run in a new folder"
        snapshot = self._snapshot
        self.ui.stopButton.enabled = bool(snapshot and snapshot.alive)
        self.ui.stopButton.text = "Force stop" if snapshot and snapshot.state == "stopping" else "Stop"
        self.ui.resumeButton.enabled = bool(snapshot and snapshot.resumable)
        self.ui.registerButton.enabled = bool(snapshot and snapshot.model)
        self.ui.openRunFolderButton.enabled = bool(self.monitor.run_path)
        parameters = self._parameterNode
        self.ui.addCaseButton.enabled = bool(parameters.exportVolume and parameters.exportSegmentation
                                             and self.ui.addSegmentSelector.currentData
                                             and parameters.caseName.strip())  # fmt: skip

    def onCheckData(self) -> None:
        self.ui.dataSummaryTextEdit.setPlainText(self.actions.check_data(self._folders(), self._settings())[1])

    def onSegmentationChanged(self, node=None) -> None:
        from CMEDLTrainLib.dataset_export import segment_ids_and_names

        segments = segment_ids_and_names(self.ui.addSegmentationSelector.currentNode())
        fill_combo(self.ui.addSegmentSelector, [(name, segmentId) for segmentId, name in segments],
                   self.ui.addSegmentSelector.currentData)  # fmt: skip
        self._updateButtons()

    def onExportVolumeChanged(self, node=None) -> None:
        from CMEDLTrainLib.dataset_export import suggested_case_name

        volume = self.ui.addVolumeSelector.currentNode()
        if volume is not None and self._parameterNode and not self._parameterNode.caseName:
            self._parameterNode.caseName = suggested_case_name(volume, self.ui.ctImagesPathLineEdit.currentPath.strip())
        self._updateButtons()

    def onAddCase(self) -> None:
        parameters = self._parameterNode
        text = self.actions.add_case(slicer.mrmlScene, parameters.exportVolume, parameters.exportSegmentation,
                                     self.ui.addSegmentSelector.currentData, self._folders(),
                                     parameters.caseName)  # fmt: skip
        if text:
            self.ui.dataSummaryTextEdit.setPlainText(text)
            parameters.caseName = ""

    def refreshRuns(self, selectPath: str | None = None) -> None:
        """List the runs of the runs folder and follow ``selectPath``, else a running one, else the newest."""
        from CMEDLTrainLib.monitor import run_list

        items, row = run_list(self.ui.runsRootPathLineEdit.currentPath, selectPath or self.monitor.run_path)
        self.ui.runsListWidget.blockSignals(True)
        self.ui.runsListWidget.clear()
        for text, path in items:
            item = qt.QListWidgetItem(text)
            item.setData(qt.Qt.UserRole, path)
            item.setToolTip(path)
            self.ui.runsListWidget.addItem(item)
        self.ui.runsListWidget.setCurrentRow(row)
        self.ui.runsListWidget.blockSignals(False)
        self._follow(items[row][1] if row >= 0 else "", byUser=False)

    def onRunSelected(self, row: int) -> None:
        item = self.ui.runsListWidget.item(row) if row >= 0 else None
        self._follow(str(item.data(qt.Qt.UserRole)) if item is not None else "", byUser=True)

    def _follow(self, path: str, byUser: bool) -> None:
        self.monitor.select(path, by_user=byUser)
        if path:
            self.settings.set_text("lastRun", path)
        self.onPoll()

    def onPoll(self) -> None:
        look = self.monitor.look()
        snapshot = self._snapshot = look.snapshot
        self.ui.runStatusLabel.text, self.ui.lossesLabel.text = look.status, look.losses
        visible, value, text = look.progress
        self.ui.progressBar.setVisible(visible)
        self.ui.progressBar.setValue(value)
        self.ui.progressBar.setFormat(text)
        if look.preview_changed:
            pixmap = qt.QPixmap(str(snapshot.preview)) if snapshot and snapshot.preview else None
            self.ui.previewLabel.clear()
            if pixmap is not None and not pixmap.isNull():
                self.ui.previewLabel.setPixmap(pixmap.scaledToWidth(PREVIEW_WIDTH, qt.Qt.SmoothTransformation))
            self.ui.previewCaptionLabel.text = look.preview_caption
        if look.show_chart:
            slicer.modules.plots.logic().ShowChartInLayout(look.chart.chart_node)
        if look.show_log or (snapshot is not None and not self.ui.detailsCollapsibleButton.collapsed):
            from cmedl.training.runs import log_text

            self.ui.logTextEdit.setPlainText(log_text(snapshot.path))
            self.ui.logTextEdit.moveCursor(qt.QTextCursor.End)
            if snapshot.state == "failed":
                self.ui.detailsCollapsibleButton.collapsed = False
        if look.state_changed:
            self.refreshRuns(selectPath=self.monitor.run_path)
        self._updateButtons()

    def onStart(self) -> None:
        runsRoot = self.ui.runsRootPathLineEdit.currentPath.strip()
        runPath, summary = self.actions.start(self._settings(), self._folders(), runsRoot)
        if summary:
            self.ui.dataSummaryTextEdit.setPlainText(summary)
        if runPath is not None:
            self._parameterNode.runName = ""
            self.ui.logTextEdit.clear()
            self.monitor.select(str(runPath), by_user=True)  # a run just started brings its curves, even after a close
            self.refreshRuns(selectPath=str(runPath))

    def onStop(self) -> None:
        self.actions.stop(self._snapshot, force=self.monitor.force_stop)
        self.onPoll()

    def onResume(self) -> None:
        epochs = self.ui.resumeEpochsSpinBox.value
        if self.actions.resume(self._snapshot, epochs, self.ui.deviceSelector.currentData, self._parameterNode.gpus):
            self.refreshRuns(selectPath=self.monitor.run_path)

    def onRegister(self) -> None:
        self.actions.register(self._snapshot)

    def onFolder(self) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self.monitor.run_path))  # enabled only with a run


class CMEDLTrainLogic(ScriptedLoadableModuleLogic):
    """The parameter node; the work is in CMEDLTrainLib and the engine, which the panel calls directly."""

    def getParameterNode(self):
        return CMEDLTrainParameterNode(super().getParameterNode())


class CMEDLTrainTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: one CT-only epoch on two small phantoms in a separate process, and its curves."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        try:
            self.test_tiny_training_run()
        except unittest.SkipTest as reason:
            self.delayDisplay(f"Skipped: {reason}")
        finally:
            self.doCleanups()

    def test_tiny_training_run(self) -> None:
        if self_test_skip_reason("Start in CMEDL Train"):
            self.skipTest(self_test_skip_reason("Start in CMEDL Train"))
        from CMEDLCommon.engine import engine_python
        from CMEDLTrainLib.plots import TrainingChart
        from CMEDLTrainLib.self_test import tiny_ct_run

        folder = tempfile.mkdtemp(prefix="cmedl-train-selftest-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.delayDisplay("Training one epoch on two small phantoms in a separate process")
        snapshot = tiny_ct_run(folder, engine_python())
        self.assertEqual(snapshot.state, "finished", snapshot.error)
        self.assertIsNotNone(snapshot.model)
        self.assertEqual([record["epoch"] for record in snapshot.metrics], [1])
        self.assertTrue(TrainingChart(slicer.mrmlScene, snapshot.path).update(snapshot.metrics))
        self.delayDisplay(f"Run finished: {snapshot.summary_line()}")
