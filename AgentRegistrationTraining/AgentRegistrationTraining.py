"""AgentRegistrationTraining: train an agent for the AgentRegistration module.

Three worker processes run in turn, each resumable from the output folder:
``agentreg groundtruth`` (elastix ground-truth deformations), ``agentreg sdm`` (statistical
deformation model) and ``agentreg train`` (the dual-stream Q-network). The bundle they
produce is copied where the AgentRegistration module lists it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import qt
import SimpleITK as sitk
import slicer
from slicer import vtkMRMLPlotChartNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
ENGINE_DIR = MODULE_DIR.parent / "AgentRegistration"  # holds AgentRegistrationLib (source tree)
if str(ENGINE_DIR) not in sys.path and (ENGINE_DIR / "AgentRegistrationLib").is_dir():
    sys.path.append(str(ENGINE_DIR))

from AgentRegistrationLib import mrml  # noqa: E402

STAGES = ("groundtruth", "sdm", "train")
CONFIGURATIONS = list(mrml.TRAINING_CONFIGURATIONS)


JobState = mrml.JobState


class AgentRegistrationTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Agent Registration Training")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = ["AgentRegistration"]
        self.parent.contributors = ["AgentRegistration developers"]
        self.parent.helpText = _(
            "Train a registration agent from volumes with prostate segmentations: ground-truth "
            "deformations (elastix), statistical deformation model, Q-network training. The model "
            "bundle is then selectable in Agent Registration.")
        self.parent.acknowledgementText = _("Method: Krebs J. et al., MICCAI 2017.")


@parameterNodeWrapper
class AgentRegistrationTrainingParameterNode:
    dataFolder: Path
    outputFolder: Path
    modelName: str = "my-prostate"
    configuration: Annotated[str, Choice(CONFIGURATIONS)] = "compact"
    device: Annotated[str, Choice(list(mrml.DEVICE_CHOICES))] = "Auto"
    resume: bool = True
    timeLimitMinutes: float = 0.0  # training stage; 0: none
    groundTruthTable: vtkMRMLTableNode
    lossChart: vtkMRMLPlotChartNode


class AgentRegistrationTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._state = JobState.IDLE
        self._pipeline = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AgentRegistrationTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AgentRegistrationTrainingLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.initializeParameterNode()
        self.setState(JobState.IDLE)

    def cleanup(self) -> None:
        if self._pipeline is not None:
            self._pipeline.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = None

    def initializeParameterNode(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = self.logic.getParameterNode()
        self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def setState(self, state: JobState, message: str = "") -> None:
        self._state = state
        running = state in (JobState.RUNNING, JobState.CANCEL_REQUESTED)
        self.ui.applyButton.text = {JobState.RUNNING: _("Cancel"),
                                    JobState.CANCEL_REQUESTED: _("Cancelling...")}.get(state, _("Train"))
        self.ui.applyButton.enabled = state != JobState.CANCEL_REQUESTED
        self.ui.progressBar.visible = running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.statusLabel.text = message

    def onApplyButton(self) -> None:
        if self._state == JobState.RUNNING:
            self.setState(JobState.CANCEL_REQUESTED, _("Cancelling..."))
            self._pipeline.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            import AgentRegistration

            if not AgentRegistration.ensureDependencies("AgentRegistrationTraining"):
                return
            p = self._parameterNode
            volumes = list(self.ui.volumesSelector.checkedNodes())
            self._pipeline = self.logic.startTraining(volumes, p.dataFolder, p.outputFolder, p.modelName,
                                                      p.configuration, p.device, p.resume,
                                                      maxMinutes=p.timeLimitMinutes or None)
            self.setState(JobState.RUNNING, _("Starting..."))
            self._timer.start()

    def onTimer(self) -> None:
        pipeline = self._pipeline
        for message in pipeline.poll():
            stage = message.get("stage")
            fraction = mrml.progress_fraction(message)
            self.ui.stageLabel.text = f"{pipeline.stageNumber}/{len(STAGES)}: {stage}"
            if fraction is not None:
                self.ui.progressBar.value = int(100 * fraction)
            if stage not in ("log", "done"):
                self.ui.statusLabel.text = mrml.progress_text(message)
            if stage == "log":
                logging.info(message["message"])
        if not pipeline.done():
            return
        self._timer.stop()
        self._pipeline = None
        if self._state == JobState.CANCEL_REQUESTED:
            self.setState(JobState.IDLE, _("Cancelled. Run again with Resume to continue."))
            return
        if pipeline.error:
            self.setState(JobState.FAILED, pipeline.error)
            slicer.util.errorDisplay(_("Training failed."), detailedText=pipeline.error)
            return
        p = self._parameterNode
        p.groundTruthTable = self.logic.groundTruthTable(Path(p.outputFolder))
        p.lossChart = self.logic.lossChart(Path(p.outputFolder), p.modelName.strip())
        self.ui.bundleLabel.text = str(pipeline.bundle)
        self.setState(JobState.SUCCEEDED, _("Done. The model is listed in Agent Registration as '{name}'.")
                      .format(name=p.modelName))


class TrainingPipeline:
    """The three stages as worker processes, started one after another."""

    def __init__(self, commands: list[list[str]], bundle: Path, installTo: Path) -> None:
        self.commands = commands
        self.bundle = bundle
        self.installTo = installTo
        self.stageNumber = 0
        self.worker: mrml.WorkerProcess | None = None
        self.error = ""
        self.cancelled = False
        self._startNext()

    def _startNext(self) -> None:
        command = self.commands[self.stageNumber]
        logging.info("AgentRegistrationTraining worker: " + " ".join(command))
        self.worker = mrml.WorkerProcess(command, env=mrml.worker_environment(ENGINE_DIR))
        self.worker.start()
        self.stageNumber += 1

    def poll(self) -> list[dict]:
        messages = self.worker.messages()
        for message in messages:
            if message.get("stage") == "error":
                self.error = message.get("message", "")
        if self.worker.finished() and not self.cancelled and not self.error:
            if self.worker.returncode != 0:
                self.error = self.worker.error_text() or f"stage exited with status {self.worker.returncode}"
            elif self.stageNumber < len(self.commands):
                self._startNext()
            else:
                self._install()
        return messages

    def _install(self) -> None:
        """Copy the bundle where AgentRegistration lists models (temporary name, then rename)."""
        self.installTo.mkdir(parents=True, exist_ok=True)
        target = self.installTo / self.bundle.name
        partial = target.with_suffix(".partial")
        shutil.copyfile(self.bundle, partial)
        os.replace(partial, target)

    def done(self) -> bool:
        return self.cancelled or bool(self.error) or (
            self.stageNumber == len(self.commands) and self.worker.finished())

    def cancel(self) -> None:
        self.cancelled = True
        self.worker.cancel()


class AgentRegistrationTrainingLogic(ScriptedLoadableModuleLogic):
    def getParameterNode(self) -> AgentRegistrationTrainingParameterNode:
        return AgentRegistrationTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def userModelsFolder() -> Path:
        """Where trained bundles go so that AgentRegistration lists them."""
        import AgentRegistration

        return AgentRegistration.RESOURCE_DIRS[0] / "Models"

    def writeLoadedCases(self, volumes: list, folder: Path) -> None:
        """Write checked volumes with their segmentations as <case>_image/_label.nii.gz."""
        folder.mkdir(parents=True, exist_ok=True)
        segmentations = {n.GetName(): n for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")}
        segmentations.update({n.GetName(): n for n in slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode")})
        for volume in volumes:
            name = volume.GetName()
            label = next((segmentations[k] for k in (f"{name}_label", f"{name} segmentation", f"{name}-label")
                          if k in segmentations), None)
            if label is None:
                raise ValueError(f"No segmentation found for volume {name!r}: name it '{name}_label' or "
                                 f"'{name} segmentation'.")
            sitk.WriteImage(mrml.sitk_from_volume_node(volume), str(folder / f"{name}_image.nii.gz"))
            sitk.WriteImage(mrml.segmentation_to_labelmap_sitk(label, volume), str(folder / f"{name}_label.nii.gz"))

    def startTraining(self, volumes: list, dataFolder: Path, outputFolder: Path, modelName: str,
                      configuration: str = "compact", device: str = "Auto", resume: bool = True,
                      dim: int = 3, maxMinutes: float | None = None) -> TrainingPipeline:
        """Check inputs and start ground truth -> SDM -> training.

        ``maxMinutes`` ends the training stage after that many minutes (checkpointed: Apply again goes on).

        With ``resume`` a rerun continues: finished GT pairs are reused and training continues from its
        checkpoint. Without it, the training checkpoint (and its loss.csv) is removed first, so training
        starts over; the GT cache is kept (the same pairs give the same GT).
        """
        outputFolder = Path(outputFolder)
        if not str(outputFolder) or str(outputFolder) == ".":
            raise ValueError("Choose an output folder.")
        if not modelName.strip():
            raise ValueError("Enter a model name.")
        if volumes:
            if len(volumes) < 2:
                raise ValueError("Check at least two volumes to train on.")
            dataFolder = outputFolder / "data"
            self.writeLoadedCases(volumes, dataFolder)
        elif not Path(dataFolder).is_dir():
            raise ValueError(f"Data folder not found: {dataFolder}. Check loaded volumes or pick a folder.")
        import AgentRegistration

        files = mrml.TrainingFiles(outputFolder, modelName.strip())
        commands = mrml.training_commands(AgentRegistration.workerPython(), dataFolder, files, dim=dim,
                                          configuration=configuration, device=device, max_minutes=maxMinutes)
        if not resume:
            files.checkpoint.unlink(missing_ok=True)
            files.loss.unlink(missing_ok=True)
        files.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        return TrainingPipeline(commands, files.bundle, self.userModelsFolder())

    @staticmethod
    def groundTruthTable(outputFolder: Path, modelName: str = ""):
        """Table of the ground-truth Dice per pair (``groundtruth/gt_dice.csv``), or None."""
        path = mrml.TrainingFiles(Path(outputFolder), modelName).gt_dice
        if not path.is_file():
            return None
        return mrml.table_node_from_columns(mrml.read_groundtruth_dice(path), slicer.mrmlScene,
                                            slicer.mrmlScene.GenerateUniqueName("ground truth Dice"))

    @staticmethod
    def lossChart(outputFolder: Path, modelName: str):
        """Plot of the training loss (``loss.csv`` beside the checkpoint), or None."""
        path = mrml.TrainingFiles(Path(outputFolder), modelName).loss
        if not path.is_file():
            return None
        columns = mrml.read_training_loss(path)
        table = mrml.table_node_from_columns(columns, slicer.mrmlScene,
                                             slicer.mrmlScene.GenerateUniqueName("training loss"))
        chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", table.GetName() + " chart")
        series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "loss")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("iteration")
        series.SetYColumnName("loss")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetYAxisTitle("loss")
        chart.SetXAxisTitle("iteration")
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        return chart


class AgentRegistrationTrainingTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the widget loads and the inputs are checked before anything runs."""

    def runTest(self) -> None:
        slicer.mrmlScene.Clear()
        self.test_refuses_missing_output_folder()

    def test_refuses_missing_output_folder(self) -> None:
        logic = AgentRegistrationTrainingLogic()
        with self.assertRaises(ValueError):
            logic.startTraining([], Path("/nonexistent"), Path(""), "m")
        self.delayDisplay("Training input checks passed")
