"""CMEDL Train: train the CT lung tumour network on your own CT (and, for CMEDL, unpaired MRI) in 3D Slicer.

The module is thin: the panel binds to a parameter node and forwards to ``CMEDLTrainLib`` (run folders,
launching, curves, dataset export) and the ``cmedl`` engine. Training runs as a detached process of its
own, so it keeps going while Slicer is closed; the panel follows it through the run folder only. Importing
this file and building the panel imports neither torch nor anything not bundled with Slicer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
SETTINGS_PREFIX = "CMEDL/Train/"
DEVICE_CHOICES = (("Auto", "auto"), ("GPU (CUDA)", "cuda"), ("CPU", "cpu"))
POLL_INTERVAL_MS = 2000
LISTED_RUNS = 50
PREVIEW_WIDTH = 420
WINDOW_TITLE = "CMEDL Train"

# Parameter node field -> TrainingSettings field (CMEDLTrainLib.settings); the defaults below are the engine's.
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
}


#
# Module
#


class CMEDLTrain(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CMEDL Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CMEDL developers"]
        self.parent.helpText = (
            "Trains the CT lung tumour network on your own data: CT only, or by cross-modality educed "
            "distillation (CMEDL), where an MRI teacher trained on unpaired MRI guides the CT student.<br><br>"
            "1. <b>Training data</b>: choose the CT images and labels folders (label files named like their "
            "image), for CMEDL an MRI images folder (labels optional), and either a validation share or a "
            "validation folder. <i>Check data</i> shows what was found before anything starts. The loaded CT and "
            "its tumour segment can be added to the CT folders.<br>"
            "2. <b>Method</b>: segmentor (U-Net, DenseFCN, MRRN), the CycleGAN translator with contextual loss "
            "(DRIT is not available in this engine yet), loss weights (the paper's defaults), epochs, batch "
            "size, learning rates, device. Values the engine would refuse are named under the section.<br>"
            "3. <b>Runs</b>: <i>Start</i> creates a new run folder and trains in a separate process, which keeps "
            "going when Slicer is closed; reopening the module shows it again. Progress, losses, validation Dice, "
            "curves and previews update while it runs. <i>Stop</i> keeps a checkpoint that <i>Resume</i> continues "
            "from. <i>Register model</i> adds the best model to your models, for CMEDL Segment.<br><br>"
            "<b>Research use only.</b> A trained model is not a medical device.<br><br>"
            "If you use CMEDL in your work, please cite: " + PAPER
        )
        self.parent.acknowledgementText = "The method is described in: " + PAPER


#
# Parameter node
#


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
    lrSegmentor: Annotated[float, WithinRange(0.0, 1.0)] = 0.0002
    lrTranslator: Annotated[float, WithinRange(0.0, 1.0)] = 0.0001
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


#
# Widget
#


class CMEDLTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._runPath = ""
        self._shownPreview = None
        self._shownState = None
        self._chartShown = set()
        self._inventory = None
        self._inventoryKey = None
        self._updatingGui = False
        self._lastSnapshot = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMEDLTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMEDLTrainLogic()

        for text, value in self.logic.methodChoices():
            self.ui.methodSelector.addItem(text, value)
        for text, value in self.logic.segmentorChoices():
            self.ui.segmentorSelector.addItem(text, value)
        for text, value in DEVICE_CHOICES:
            self.ui.deviceSelector.addItem(text, value)
        self.ui.progressBar.setVisible(False)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # User preferences (folders, device, VGG weights) live in QSettings, not in the scene.
        self._pathSettings = {
            "ctImages": self.ui.ctImagesPathLineEdit,
            "ctLabels": self.ui.ctLabelsPathLineEdit,
            "mrImages": self.ui.mrImagesPathLineEdit,
            "mrLabels": self.ui.mrLabelsPathLineEdit,
            "validationFolder": self.ui.validationPathLineEdit,
            "vggWeights": self.ui.vggWeightsPathLineEdit,
            "runsRoot": self.ui.runsRootPathLineEdit,
        }
        defaultRoot = os.path.join(os.path.expanduser("~"), "CMEDL", "runs")
        for key, widget in self._pathSettings.items():
            widget.currentPath = self._setting(key, defaultRoot if key == "runsRoot" else "")
            widget.connect("currentPathChanged(QString)", lambda path, key=key: self.onPathChanged(key, path))
        self.ui.deviceSelector.setCurrentIndex(max(0, self.ui.deviceSelector.findData(self._setting("device", "auto"))))

        self.ui.methodSelector.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.segmentorSelector.connect("currentIndexChanged(int)", self.onSegmentorChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.addSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.addVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onExportVolumeChanged)
        self.ui.checkDataButton.connect("clicked(bool)", self.onCheckData)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.paperDefaultsButton.connect("clicked(bool)", self.onPaperDefaults)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.registerButton.connect("clicked(bool)", self.onRegister)
        self.ui.refreshRunsButton.connect("clicked(bool)", self.onRefreshRuns)
        self.ui.openRunFolderButton.connect("clicked(bool)", self.onOpenRunFolder)
        self.ui.runsListWidget.connect("currentRowChanged(int)", self.onRunSelected)

        self.initializeParameterNode()
        self.refreshRuns(selectPath=self._setting("lastRun", ""))

    def cleanup(self) -> None:
        # The run itself goes on: it is a process of its own, found again when the module is opened.
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.onSegmentationChanged()
        self.refreshRuns(selectPath=self._runPath)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self._chartShown.clear()
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
        """Combo boxes that are not bound, the VGG note and the live check of the settings."""
        if self._parameterNode is None:
            return
        self._updatingGui = True
        try:
            for selector, value in (
                (self.ui.methodSelector, self._parameterNode.method),
                (self.ui.segmentorSelector, self._parameterNode.segmentor),
            ):
                index = selector.findData(value)
                if index >= 0 and index != selector.currentIndex:
                    selector.setCurrentIndex(index)
            cmedl = self._parameterNode.method == "cmedl"
            for widget in (
                self.ui.mrImagesPathLineEdit,
                self.ui.mrLabelsPathLineEdit,
                self.ui.lrTranslatorSpinBox,
                self.ui.lossWeightsCollapsibleButton,
                self.ui.vggWeightsPathLineEdit,
                self.ui.randomVggCheckBox,
            ):
                widget.enabled = cmedl
            if self._parameterNode.randomVgg:
                self.ui.vggWeightsPathLineEdit.enabled = False
        finally:
            self._updatingGui = False
        self.ui.vggNoteLabel.text = self.logic.vggWeightsNote(self._vggWeights()) if cmedl else ""
        self._updateButtons()

    # -- user settings (QSettings: they belong to the user, not to the scene) ---------------------------

    def _setting(self, key: str, default: str) -> str:
        return str(qt.QSettings().value(SETTINGS_PREFIX + key, default))

    def _setSetting(self, key: str, value: str) -> None:
        qt.QSettings().setValue(SETTINGS_PREFIX + key, value)

    def onPathChanged(self, key: str, path: str) -> None:
        self._setSetting(key, path)
        if key == "runsRoot":
            self.refreshRuns()
        elif key == "vggWeights":
            self._onParameterNodeModified()
        else:
            self._updateButtons()

    def onDeviceChanged(self, index: int) -> None:
        self._setSetting("device", self.ui.deviceSelector.currentData)
        self._updateButtons()

    def onMethodChanged(self, index: int) -> None:
        if not self._updatingGui and self._parameterNode:
            self._parameterNode.method = self.ui.methodSelector.currentData

    def onSegmentorChanged(self, index: int) -> None:
        if not self._updatingGui and self._parameterNode:
            self._parameterNode.segmentor = self.ui.segmentorSelector.currentData

    # -- panel values -----------------------------------------------------------------------------------

    def _vggWeights(self) -> str:
        if self._parameterNode and self._parameterNode.randomVgg:
            return "random"
        return self.ui.vggWeightsPathLineEdit.currentPath.strip()

    def _folders(self):
        return self.logic.dataFolders(
            ctImages=self.ui.ctImagesPathLineEdit.currentPath.strip(),
            ctLabels=self.ui.ctLabelsPathLineEdit.currentPath.strip(),
            mrImages=self.ui.mrImagesPathLineEdit.currentPath.strip(),
            mrLabels=self.ui.mrLabelsPathLineEdit.currentPath.strip(),
            validation=self.ui.validationPathLineEdit.currentPath.strip(),
        )

    def _settings(self):
        return self.logic.settingsFromParameterNode(
            self._parameterNode, device=self.ui.deviceSelector.currentData, vggWeights=self._vggWeights()
        )

    def _runsRoot(self) -> str:
        return self.ui.runsRootPathLineEdit.currentPath.strip()

    def onPaperDefaults(self) -> None:
        for name, value in self.logic.paperDefaults().items():
            setattr(self._parameterNode, name, value)
        self._parameterNode.randomVgg = False

    def _updateButtons(self) -> None:
        if self._parameterNode is None:
            return
        problem = self.logic.settingsProblem(self._settings(), self._folders())
        self.ui.settingsProblemLabel.text = f"Cannot start: {problem}" if problem else ""
        snapshot = self._lastSnapshot
        self.ui.startButton.enabled = not problem and bool(self._runsRoot())
        self.ui.startButton.toolTip = problem or "Check the data, then start a new run in a new folder"
        alive = bool(snapshot and snapshot.alive)
        self.ui.stopButton.enabled = alive
        self.ui.stopButton.text = "Force stop" if snapshot and snapshot.state == "stopping" else "Stop"
        self.ui.resumeButton.enabled = bool(snapshot and snapshot.resumable)
        self.ui.registerButton.enabled = bool(snapshot and snapshot.model)
        self.ui.openRunFolderButton.enabled = bool(self._runPath)
        segmentation = self._parameterNode.exportSegmentation
        self.ui.addCaseButton.enabled = bool(
            self._parameterNode.exportVolume
            and segmentation
            and self.ui.addSegmentSelector.currentData
            and self._parameterNode.caseName.strip()
        )

    # -- data -------------------------------------------------------------------------------------------

    def onCheckData(self) -> None:
        self._scanData(force=True)

    def _scanData(self, force: bool):
        """Scan the data folders (with a progress dialog) and show the summary; None when cancelled."""
        folders, settings = self._folders(), self._settings()
        key = (repr(folders), settings.method, settings.validation_fraction)
        if not force and self._inventory is not None and self._inventoryKey == key:
            return self._inventory
        if not folders.ct_images:
            self.ui.dataSummaryTextEdit.setPlainText("Choose the CT images and labels folders first.")
            return None
        dialog = slicer.util.createProgressDialog(
            windowTitle=WINDOW_TITLE, labelText="Checking the training data...", maximum=100
        )

        def onProgress(done: int, total: int, name: str) -> bool:
            dialog.setValue(int(100 * done / max(total, 1)))
            dialog.setLabelText(f"Checking {name} ({done}/{total})")
            slicer.app.processEvents()
            return bool(dialog.wasCanceled)

        from cmedl.errors import CMEDLError

        try:
            inventory = self.logic.scanData(folders, settings, progress=onProgress)
        except (CMEDLError, OSError) as error:
            self.ui.dataSummaryTextEdit.setPlainText(f"Data check stopped: {error}")
            return None
        finally:
            dialog.close()
        self._inventory, self._inventoryKey = inventory, key
        self.ui.dataSummaryTextEdit.setPlainText(inventory.summary_text())
        return inventory

    def onSegmentationChanged(self, node=None) -> None:
        selected = self.ui.addSegmentSelector.currentData
        self.ui.addSegmentSelector.clear()
        for segmentId, name in self.logic.segments(self.ui.addSegmentationSelector.currentNode()):
            self.ui.addSegmentSelector.addItem(name, segmentId)
        self.ui.addSegmentSelector.setCurrentIndex(max(0, self.ui.addSegmentSelector.findData(selected)))
        self._updateButtons()

    def onExportVolumeChanged(self, node=None) -> None:
        volume = self.ui.addVolumeSelector.currentNode()
        if volume is not None and self._parameterNode and not self._parameterNode.caseName:
            self._parameterNode.caseName = self.logic.suggestedCaseName(
                volume, self.ui.ctImagesPathLineEdit.currentPath.strip()
            )
        self._updateButtons()

    def onAddCase(self) -> None:
        from cmedl.errors import CMEDLError, InputError

        parameters = self._parameterNode
        folders = self._folders()
        segmentId = self.ui.addSegmentSelector.currentData
        arguments = (parameters.exportVolume, parameters.exportSegmentation, segmentId, folders.ct_images,
                     folders.ct_labels, parameters.caseName.strip())  # fmt: skip
        try:
            try:
                added = self.logic.addCase(*arguments)
            except InputError as error:
                if "already exists" not in str(error) or not slicer.util.confirmYesNoDisplay(
                    f"{error}\n\nReplace that case?", windowTitle=WINDOW_TITLE
                ):
                    raise
                added = self.logic.addCase(*arguments, overwrite=True)
        except CMEDLError as error:
            slicer.util.errorDisplay(f"The case was not added: {error}", windowTitle=WINDOW_TITLE)
            return
        self._inventory = None
        verb = "Replaced" if added.replaced else "Added"
        self.ui.dataSummaryTextEdit.setPlainText(
            f"{verb} case {added.name}: {added.image} and {added.label} ({added.label_voxels} tumour voxels).\n"
            "Press Check data to see the whole training set."
        )
        parameters.caseName = ""

    # -- runs -------------------------------------------------------------------------------------------

    def _snapshot(self):
        if not self._runPath:
            return None
        try:
            return self.logic.readRun(self._runPath)
        except ImportError as error:
            self._showMissingPackages(error)
            return None

    def _showMissingPackages(self, error: ImportError) -> None:
        self.ui.runStatusLabel.text = (
            f"Runs cannot be shown yet ({error}): press Start once to install the Python packages CMEDL needs."
        )

    def onRefreshRuns(self) -> None:
        self.refreshRuns(selectPath=self._runPath)

    def refreshRuns(self, selectPath: str | None = None) -> None:
        """List the runs of the runs folder and select ``selectPath``, else a running one, else the newest."""
        root = self._runsRoot()
        try:
            runs = self.logic.listRuns(root)[:LISTED_RUNS] if root else []
        except ImportError as error:
            self._showMissingPackages(error)
            return
        selectPath = selectPath or self._runPath
        self.ui.runsListWidget.blockSignals(True)
        self.ui.runsListWidget.clear()
        selectRow = -1
        for row, snapshot in enumerate(runs):
            item = qt.QListWidgetItem(f"{snapshot.name}: {snapshot.summary_line()}")
            item.setData(qt.Qt.UserRole, str(snapshot.path))
            item.setToolTip(str(snapshot.path))
            self.ui.runsListWidget.addItem(item)
            if str(snapshot.path) == selectPath:
                selectRow = row
        if selectRow < 0:
            selectRow = next((row for row, snapshot in enumerate(runs) if snapshot.alive), 0 if runs else -1)
        self.ui.runsListWidget.setCurrentRow(selectRow)
        self.ui.runsListWidget.blockSignals(False)
        self.onRunSelected(selectRow)

    def onRunSelected(self, row: int) -> None:
        item = self.ui.runsListWidget.item(row) if row >= 0 else None
        path = str(item.data(qt.Qt.UserRole)) if item is not None else ""
        if path != self._runPath:
            self._shownPreview = None
            self._shownState = None
        self._runPath = path
        if path:
            self._setSetting("lastRun", path)
        self.onPoll()

    def onPoll(self) -> None:
        snapshot = self._lastSnapshot = self._snapshot()
        if snapshot is None:
            self._timer.stop()
            self.ui.progressBar.setVisible(False)
            if not self._runPath:
                self.ui.runStatusLabel.text = "No run selected. Start one, or choose the runs folder of earlier runs."
            self.ui.lossesLabel.text = ""
            self.ui.previewLabel.clear()
            self.ui.previewCaptionLabel.text = ""
            self._updateButtons()
            return
        self._showSnapshot(snapshot)
        if snapshot.alive and not self._timer.isActive():
            self._timer.start()
        elif not snapshot.alive and self._timer.isActive():
            self._timer.stop()
        if self._shownState is not None and snapshot.state != self._shownState:
            self._shownState = snapshot.state
            self.refreshRuns(selectPath=self._runPath)
            return
        self._shownState = snapshot.state
        self._updateButtons()

    def _showSnapshot(self, snapshot) -> None:
        self.ui.progressBar.setVisible(bool(snapshot.epochs))
        self.ui.progressBar.setValue(int(round(100 * snapshot.fraction())))
        self.ui.progressBar.setFormat(f"epoch {snapshot.epoch}/{snapshot.epochs}")
        self.ui.runStatusLabel.text = f"{snapshot.name}: {snapshot.summary_line()}"
        losses = snapshot.losses_text()
        self.ui.lossesLabel.text = f"Last losses: {losses}" if losses else ""
        if snapshot.preview is not None and snapshot.preview != self._shownPreview:
            pixmap = qt.QPixmap(str(snapshot.preview))
            if not pixmap.isNull():
                self.ui.previewLabel.setPixmap(pixmap.scaledToWidth(PREVIEW_WIDTH, qt.Qt.SmoothTransformation))
                columns = ", ".join(snapshot.preview_columns)
                self.ui.previewCaptionLabel.text = f"{snapshot.preview.name}: columns {columns}" if columns else ""
                self._shownPreview = snapshot.preview
        elif snapshot.preview is None:
            self.ui.previewLabel.clear()
            self.ui.previewCaptionLabel.text = ""
        if snapshot.metrics:
            chart = self.logic.updateChart(snapshot.path, snapshot.metrics)
            if str(snapshot.path) not in self._chartShown:
                slicer.modules.plots.logic().ShowChartInLayout(chart.chart_node)
                self._chartShown.add(str(snapshot.path))
        if snapshot.state in ("failed", "interrupted") or not self.ui.detailsCollapsibleButton.collapsed:
            self.ui.logTextEdit.setPlainText(self.logic.logText(snapshot.path))
            self.ui.logTextEdit.moveCursor(qt.QTextCursor.End)
            if snapshot.state == "failed":
                self.ui.detailsCollapsibleButton.collapsed = False

    def onStart(self) -> None:
        from cmedl.errors import CMEDLError

        try:
            if not self.logic.ensureDependencies():
                return
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error), windowTitle=WINDOW_TITLE)
            return
        settings, folders = self._settings(), self._folders()
        problem = self.logic.settingsProblem(settings, folders)
        if problem:
            slicer.util.errorDisplay(f"Cannot start: {problem}", windowTitle=WINDOW_TITLE)
            return
        inventory = self._scanData(force=False)
        if inventory is None:
            return
        if not inventory.ok:
            slicer.util.errorDisplay(
                "The training data has problems; see the summary under Check data.",
                windowTitle=WINDOW_TITLE,
                detailedText=inventory.summary_text(),
            )
            return
        ctCases = len(inventory.folders[0].cases)  # the CT training folder comes first
        if not slicer.util.confirmOkCancelDisplay(
            f"Start a {settings.method} run ({settings.segmentor}, {settings.epochs} epochs) on {ctCases} CT "
            f"case(s) ({inventory.validation_cases()} for validation)?",
            windowTitle=WINDOW_TITLE,
            detailedText=inventory.summary_text(),
        ):
            return
        try:
            runPath = self.logic.start(settings, folders, self._runsRoot())
        except CMEDLError as error:
            slicer.util.errorDisplay(f"The run was not started: {error}", windowTitle=WINDOW_TITLE)
            return
        self._parameterNode.runName = ""
        self.ui.logTextEdit.clear()
        self.refreshRuns(selectPath=str(runPath))

    def onStop(self) -> None:
        snapshot = self._snapshot()
        if snapshot is None or not snapshot.alive:
            return
        if snapshot.state == "stopping":
            if slicer.util.confirmYesNoDisplay(
                f"{snapshot.name} has not stopped yet. Stop it now? The current epoch is lost; the checkpoint of "
                "the last finished epoch is kept.",
                windowTitle=WINDOW_TITLE,
            ):
                self.logic.kill(snapshot.path)
            self.onPoll()
            return
        if not slicer.util.confirmYesNoDisplay(
            f"Stop {snapshot.name}? It stops after the current iteration and keeps the checkpoint of the last "
            "finished epoch; Resume continues from there.",
            windowTitle=WINDOW_TITLE,
        ):
            return
        self.logic.stop(snapshot.path)
        self.onPoll()

    def onResume(self) -> None:
        from cmedl.errors import CMEDLError

        snapshot = self._snapshot()
        if snapshot is None:
            return
        try:
            if not self.logic.ensureDependencies():
                return
            epochs = self.ui.resumeEpochsSpinBox.value or None
            self.logic.resume(snapshot.path, epochs=epochs, device=self.ui.deviceSelector.currentData,
                              gpus=self._parameterNode.gpus)  # fmt: skip
        except (CMEDLError, RuntimeError) as error:
            slicer.util.errorDisplay(f"The run was not resumed: {error}", windowTitle=WINDOW_TITLE)
            return
        self.refreshRuns(selectPath=str(snapshot.path))

    def onRegister(self) -> None:
        from cmedl.errors import CMEDLError

        snapshot = self._snapshot()
        if snapshot is None or snapshot.model is None:
            return
        name = qt.QInputDialog.getText(
            slicer.util.mainWindow(), WINDOW_TITLE, "Register the run's best model as:", qt.QLineEdit.Normal,
            self.logic.modelName(snapshot.path),
        )  # fmt: skip
        if not name:
            return
        try:
            try:
                entry = self.logic.register(snapshot.path, name)
            except CMEDLError as error:
                if "already exists" not in str(error) or not slicer.util.confirmYesNoDisplay(
                    f"{error}\n\nReplace that model?", windowTitle=WINDOW_TITLE
                ):
                    raise
                entry = self.logic.register(snapshot.path, name, overwrite=True)
        except CMEDLError as error:
            slicer.util.errorDisplay(f"The model was not registered: {error}", windowTitle=WINDOW_TITLE)
            return
        slicer.util.infoDisplay(
            f"Registered as '{entry.name}'. CMEDL Segment lists it among its models (reopen its panel to refresh).",
            windowTitle=WINDOW_TITLE,
        )

    def onOpenRunFolder(self) -> None:
        if self._runPath:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self._runPath))


#
# Logic
#


class CMEDLTrainLogic(ScriptedLoadableModuleLogic):
    """Slicer-facing logic; the work is in CMEDLTrainLib and the engine."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._charts = {}

    def getParameterNode(self):
        return CMEDLTrainParameterNode(super().getParameterNode())

    @staticmethod
    def enginePython() -> str:
        """The interpreter for the training process: Slicer's PythonSlicer launcher."""
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        return shutil.which(name) or os.path.join(slicer.app.slicerHome, "bin", name)

    @staticmethod
    def ensureDependencies() -> bool:
        """Install the engine's packages after one confirmation; False when the user declined.

        Dependencies are a concern of the whole extension, kept by CMEDL Segment (its requirements file and
        installer): this is the one place where this module uses the other one.
        """
        from CMEDLSegmentLib.dependencies import ensure_dependencies

        return ensure_dependencies(requester="CMEDL")

    @staticmethod
    def methodChoices():
        from CMEDLTrainLib.settings import METHOD_CHOICES

        return METHOD_CHOICES

    @staticmethod
    def segmentorChoices():
        from CMEDLTrainLib.settings import SEGMENTORS

        return SEGMENTORS

    @staticmethod
    def vggWeightsNote(value: str) -> str:
        from CMEDLTrainLib.settings import vgg_weights_note

        return vgg_weights_note(value)

    @staticmethod
    def paperDefaults() -> dict:
        """Parameter node field -> the engine's default, for every field of SETTINGS_FIELDS but the run name."""
        from CMEDLTrainLib.settings import paper_defaults

        defaults = paper_defaults()
        return {name: defaults[field] for name, field in SETTINGS_FIELDS.items() if name != "runName"}

    @staticmethod
    def dataFolders(ctImages="", ctLabels="", mrImages="", mrLabels="", validation=""):
        from CMEDLTrainLib.settings import DataFolders

        return DataFolders(ctImages, ctLabels, mrImages, mrLabels, validation)

    @staticmethod
    def settingsFromParameterNode(parameters, device: str = "auto", vggWeights: str = ""):
        from CMEDLTrainLib.settings import TrainingSettings

        values = {field: getattr(parameters, name) for name, field in SETTINGS_FIELDS.items()}
        values["name"] = values["name"].strip()
        return TrainingSettings(**values, device=device, vgg_weights=vggWeights)

    @staticmethod
    def settingsProblem(settings, folders) -> str:
        from CMEDLTrainLib.settings import settings_problem

        return settings_problem(settings, folders)

    @staticmethod
    def scanData(folders, settings, progress=None):
        from cmedl.training.inventory import scan_training_data

        return scan_training_data(
            folders.ct_images, folders.ct_labels, folders.mr_images or None, folders.mr_labels or None,
            validation=folders.validation or None, method=settings.method,
            validation_fraction=settings.validation_fraction, progress=progress,
        )  # fmt: skip

    def start(self, settings, folders, runsRoot: str, python: str | None = None):
        """Start a new run, detached; returns its folder."""
        from CMEDLTrainLib.launcher import start_training

        return start_training(settings, folders, runsRoot, python=python or self.enginePython())

    def resume(self, runPath, epochs=None, device=None, gpus: int = 1, python: str | None = None):
        from CMEDLTrainLib.launcher import resume_training

        return resume_training(runPath, python or self.enginePython(), epochs=epochs, device=device, gpus=gpus)

    @staticmethod
    def stop(runPath) -> bool:
        from CMEDLTrainLib.launcher import request_stop

        return request_stop(runPath)

    @staticmethod
    def kill(runPath) -> bool:
        from CMEDLTrainLib.launcher import kill_run

        return kill_run(runPath)

    @staticmethod
    def readRun(runPath):
        from CMEDLTrainLib.runs import read_run

        return read_run(runPath)

    @staticmethod
    def listRuns(root: str):
        from CMEDLTrainLib.runs import list_runs, read_run

        return [read_run(path) for path in list_runs(root)]

    @staticmethod
    def logText(runPath) -> str:
        from CMEDLTrainLib.runs import log_text

        return log_text(runPath)

    @staticmethod
    def waitForRun(runPath, timeout: float = 600.0):
        from CMEDLTrainLib.launcher import wait_for_run

        return wait_for_run(runPath, timeout=timeout)

    def updateChart(self, runPath, metrics):
        """The run's curves in the scene, created once and then updated in place."""
        from CMEDLTrainLib.plots import TrainingChart

        key = str(runPath)
        chart = self._charts.get(key)
        if chart is None or chart.table_node.GetScene() is None:
            chart = self._charts[key] = TrainingChart(slicer.mrmlScene, runPath)
        chart.update(metrics)
        return chart

    @staticmethod
    def modelName(runPath) -> str:
        from CMEDLTrainLib.launcher import model_name_for

        return model_name_for(runPath)

    @staticmethod
    def register(runPath, name=None, overwrite: bool = False):
        from CMEDLTrainLib.launcher import register_model

        return register_model(runPath, name=name, overwrite=overwrite)

    @staticmethod
    def segments(segmentationNode):
        from CMEDLTrainLib.dataset_export import segment_ids_and_names

        return segment_ids_and_names(segmentationNode)

    @staticmethod
    def suggestedCaseName(volumeNode, imagesFolder: str) -> str:
        from CMEDLTrainLib.dataset_export import suggested_case_name

        return suggested_case_name(volumeNode, imagesFolder)

    @staticmethod
    def addCase(volumeNode, segmentationNode, segmentId, imagesFolder, labelsFolder, name, overwrite=False):
        from CMEDLTrainLib.dataset_export import add_case

        return add_case(slicer.mrmlScene, volumeNode, segmentationNode, segmentId, imagesFolder, labelsFolder, name,
                        overwrite=overwrite)  # fmt: skip


#
# Test
#


class CMEDLTrainTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: two small phantoms, a one-epoch CT-only run started through the logic, its model."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_tiny_training_run()

    def test_tiny_training_run(self) -> None:
        import importlib.util
        import time

        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("psutil") is None:
            self.delayDisplay("Python packages are missing: press Start once in CMEDL Train to install them")
            return
        from cmedl.phantom import write_phantom_dataset
        from CMEDLTrainLib.settings import TrainingSettings

        folder = tempfile.mkdtemp(prefix="cmedl-train-selftest-")
        self.delayDisplay("Writing two small CT phantoms")
        write_phantom_dataset(os.path.join(folder, "data"), n_ct=2, n_mr=0, seed=7, size=128)
        logic = CMEDLTrainLogic()
        folders = logic.dataFolders(
            ctImages=os.path.join(folder, "data", "ct", "images"), ctLabels=os.path.join(folder, "data", "ct", "labels")
        )
        settings = TrainingSettings(
            method="ct_only", segmentor="unet", epochs=1, iterations_per_epoch=2, batch_size=1, patch_size=32,
            spacing_mm=6.0, validation_fraction=0.5, device="cpu", name="selftest",
            extra={"segmentor_options": {"base_channels": 2}},
        )  # fmt: skip
        inventory = logic.scanData(folders, settings)
        self.assertTrue(inventory.ok, inventory.summary_text())
        self.assertEqual(inventory.validation_cases(), 1)

        self.delayDisplay("Training one epoch in a separate process")
        started = time.monotonic()
        runPath = logic.start(settings, folders, os.path.join(folder, "runs"))
        snapshot = logic.waitForRun(runPath, timeout=600)
        self.assertEqual(snapshot.state, "finished", snapshot.error)
        self.assertIsNotNone(snapshot.model)
        self.assertEqual([record["epoch"] for record in snapshot.metrics], [1])
        chart = logic.updateChart(runPath, snapshot.metrics)
        self.assertEqual(chart.rows(), 1)
        self.delayDisplay(f"Run finished in {time.monotonic() - started:.0f} s: {snapshot.summary_line()}")
        shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")
