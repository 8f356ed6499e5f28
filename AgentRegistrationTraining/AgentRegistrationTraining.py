"""AgentRegistrationTraining: train an agent for the AgentRegistration module.

Worker processes run in turn, each resumable from the output folder: ``agentreg groundtruth`` (elastix
ground-truth deformations), ``agentreg sdm`` (statistical deformation model), ``agentreg localiser`` (the organ
localiser; not for the paper's geometry) and ``agentreg train`` (the dual-stream Q-network); the list comes from
``worker_commands.training_commands`` (``definitions.training_stages``). The bundle they produce is copied where the
AgentRegistration module lists it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import qt
import SimpleITK as sitk
import slicer
import vtk
from AgentRegistrationGUILib import job_panel, jobs, nodes, result_nodes
from AgentRegistrationLib.contract import layout, messages, training_config, training_folder, worker_commands
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
# Installed extension: AgentRegistrationLib is beside this file; source tree: in ../AgentRegistration.
_SOURCE_ENGINE_DIR = MODULE_DIR.parent / "AgentRegistration"
if not (MODULE_DIR / "AgentRegistrationLib").is_dir() and str(_SOURCE_ENGINE_DIR) not in sys.path:
    sys.path.append(str(_SOURCE_ENGINE_DIR))

from AgentRegistrationGUILib import definitions, slicer_setup  # noqa: E402

CONFIGURATIONS = list(training_config.TRAINING_CONFIGURATIONS)
DIMENSIONS = {f"{dim}-D": dim for dim in sorted(training_folder.PAPER_MODES, reverse=True)}
"""Model dimension choices, the engine's (3-D volumes, or 2-D: one axial slice of each volume), 3-D first."""
GEOMETRY_DEFAULT = "as the geometry"  # the ground-truth metric of the chosen geometry (training_folder.default_gt_metric)


JobState = jobs.JobState


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
    organ: str = ""  # the organ's name for the model's messages and card; empty: 'organ'
    dimension: Annotated[str, Choice(list(DIMENSIONS))] = "3-D"
    configuration: Annotated[str, Choice(CONFIGURATIONS)] = training_config.DEFAULT_TRAINING_CONFIGURATION
    device: Annotated[str, Choice(list(worker_commands.DEVICE_CHOICES))] = "Auto"
    resume: bool = True
    timeLimitMinutes: float = 0.0  # training stage; 0: none
    geometry: Annotated[str, Choice(list(training_folder.GEOMETRY_CHOICES))] = "auto"  # a user's own organ: from the data
    gridSize: str = ""  # "x,y[,z]" model voxels; empty: the geometry's
    controlSpacing: str = ""  # "x,y[,z]" model voxels; empty: the geometry's
    controlSpacingMm: str = ""  # "s" or "x,y[,z]" in the images' physical units (mm); instead of controlSpacing
    boxSpreads: str = ""  # "x,y[,z]" organ standard deviations; empty: the geometry's
    groundTruthMetric: Annotated[str, Choice([GEOMETRY_DEFAULT, *training_folder.GT_METRICS])] = GEOMETRY_DEFAULT
    augment: float = 0.0  # share of training images given random intensity changes
    virtualSubjects: float = 0.0  # share of intra-subject pairs made from a virtual (mirrored, deformed) subject
    groundTruthTable: vtkMRMLTableNode
    lossChart: vtkMRMLPlotChartNode


class AgentRegistrationTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._panel: job_panel.JobPanel | None = None  # the training stages' job on the Train/Cancel button (setup)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AgentRegistrationTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        # Tooltips from the engine's definitions (definitions.py), so they say what the engine does.
        self.ui.configurationComboBox.toolTip = _("Training configuration: ") + training_config.configurations_text()
        self.ui.deviceComboBox.toolTip = definitions.device_tooltip()
        self.ui.organLineEdit.toolTip = _("The organ: ") + training_folder.ORGAN_HELP
        self.ui.dataDirectoryButton.toolTip = definitions.training_data_tooltip()
        self.logic = AgentRegistrationTrainingLogic()
        self._panel = job_panel.JobPanel(
            self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel, apply_text=_("Train"), cancel_text=_("Cancel"),
            cancelling_text=_("Cancelling..."), inputs=(self.ui.inputsCollapsibleButton, self.ui.geometryCollapsibleButton),
            stage_label=self.ui.stageLabel, progress=job_panel.progress_percent, start_bar=None)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.initializeParameterNode()
        self._panel.show(JobState.IDLE)

    def cleanup(self) -> None:
        if self._panel is not None:
            self._panel.discard()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._showStages)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._showStages)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._showStages)
            self._showStages()

    def _showStages(self, caller=None, event=None) -> None:
        """The Train button's tooltip: the stages the chosen geometry runs (the engine's commands)."""
        if self._parameterNode and not self._panel.busy:
            self.ui.applyButton.toolTip = _("Train: ") + definitions.training_stages_text(self._parameterNode.geometry) \
                + _(". Each shows its progress; Cancel stops it, and Train again with Resume goes on.")

    def onApplyButton(self) -> None:
        if self._panel.state == JobState.RUNNING:
            self._panel.request_cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            if not slicer_setup.dependencies_ready("AgentRegistrationTraining", then=self.onApplyButton):
                return  # installing the Python packages in a separate process; training starts once they are in
            p = self._parameterNode
            volumes = list(self.ui.volumesSelector.checkedNodes())
            pipeline = self.logic.startTraining(volumes, p.dataFolder, p.outputFolder, p.modelName,
                                                p.configuration, p.device, p.resume, organ=p.organ,
                                                dim=DIMENSIONS[p.dimension],
                                                maxMinutes=p.timeLimitMinutes or None, geometry=p.geometry,
                                                geometryOverrides={"grid_size": p.gridSize,
                                                                   "control_spacing": p.controlSpacing,
                                                                   "control_spacing_mm": p.controlSpacingMm,
                                                                   "box_spreads": p.boxSpreads},
                                                metric=None if p.groundTruthMetric == GEOMETRY_DEFAULT
                                                else p.groundTruthMetric,
                                                augment=p.augment, virtualSubjects=p.virtualSubjects)
            self._panel.start(pipeline, _("Starting..."))
            self._timer.start()

    def onTimer(self) -> None:
        """Show the stages' messages on the panel; install the model when the last stage has ended."""
        pipeline = self._panel.job
        if not self._panel.poll():
            return
        self._timer.stop()
        if self._panel.state == JobState.CANCEL_REQUESTED:
            self._panel.finish_cancelled(_("Cancelled. Run again with Resume to continue."))
            return
        if pipeline.error:
            self._panel.fail(pipeline.error)
            slicer.util.errorDisplay(_("Training failed."), detailedText=pipeline.error)
            return
        p = self._parameterNode
        try:
            installed = layout.install_model(training_folder.TrainingFiles(Path(p.outputFolder), p.modelName.strip()).bundle,
                                               self.logic.userModelsFolder())
        except OSError as error:
            self._panel.fail(str(error))
            slicer.util.errorDisplay(_("The trained model could not be installed."), detailedText=str(error))
            return
        p.groundTruthTable = self.logic.groundTruthTable(Path(p.outputFolder))
        p.lossChart = self.logic.lossChart(Path(p.outputFolder), p.modelName.strip())
        self.ui.bundleLabel.text = str(installed)
        self._panel.succeed(_("Done. The model is listed in Agent Registration as '{name}'.").format(name=p.modelName))


class AgentRegistrationTrainingLogic(ScriptedLoadableModuleLogic):
    def getParameterNode(self) -> AgentRegistrationTrainingParameterNode:
        return AgentRegistrationTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def userModelsFolder() -> Path:
        """Where trained bundles go so that AgentRegistration lists them (it reads the list on entering it)."""
        return slicer_setup.user_models_folder(slicer.app.slicerUserSettingsFilePath)

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
            sitk.WriteImage(nodes.sitk_from_volume_node(volume), str(folder / f"{name}_image.nii.gz"))
            sitk.WriteImage(nodes.segmentation_to_labelmap_sitk(label, volume), str(folder / f"{name}_label.nii.gz"))

    def startTraining(self, volumes: list, dataFolder: Path, outputFolder: Path, modelName: str,
                      configuration: str = training_config.DEFAULT_TRAINING_CONFIGURATION, device: str = "Auto",
                      resume: bool = True,
                      dim: int = 3, maxMinutes: float | None = None, geometry: str = "auto",
                      geometryOverrides: dict | None = None, metric: str | None = None,
                      augment: float = 0.0, virtualSubjects: float = 0.0, organ: str = "") -> jobs.WorkerJob:
        """Check inputs and start ground truth -> SDM -> organ localiser (crops on the organ) -> training.

        ``geometry``, ``geometryOverrides`` and the ground-truth ``metric``: the model geometry and what drives the
        ground truth (:func:`worker_commands.training_commands`). ``augment`` and ``virtualSubjects``: the shares of
        training images with random intensity changes and of intra-subject pairs from virtual subjects (for few
        subjects; the training configuration's ``augment`` and ``new_subjects``). ``organ``: the organ's name the
        model carries into its messages and card (empty: 'organ').

        ``maxMinutes`` ends the training stage after that many minutes (checkpointed: Train again goes on).

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
        files = training_folder.TrainingFiles(outputFolder, modelName.strip())
        commands = worker_commands.training_commands(slicer_setup.worker_python(), dataFolder, files, dim=dim,
                                              configuration=configuration, device=device, max_minutes=maxMinutes,
                                              geometry=geometry, geometry_overrides=geometryOverrides, metric=metric,
                                              augment=augment, new_subjects=virtualSubjects, organ=organ)
        if not resume:
            files.checkpoint.unlink(missing_ok=True)
            files.loss.unlink(missing_ok=True)
        files.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        logging.info("AgentRegistrationTraining workers: " + " | ".join(" ".join(c) for c in commands))
        return jobs.WorkerJob(commands, env=jobs.worker_environment(layout.engine_dir(__file__))).start()

    @staticmethod
    def groundTruthTable(outputFolder: Path, modelName: str = ""):
        """Table of the ground-truth Dice per pair (``groundtruth/gt_dice.csv``), or None."""
        path = training_folder.TrainingFiles(Path(outputFolder), modelName).gt_dice
        if not path.is_file():
            return None
        return result_nodes.table_node_from_columns(training_folder.read_groundtruth_dice(path), slicer.mrmlScene,
                                            slicer.mrmlScene.GenerateUniqueName("ground truth Dice"))

    @staticmethod
    def lossChart(outputFolder: Path, modelName: str):
        """Plot of the training loss (``loss.csv`` beside the checkpoint), or None."""
        path = training_folder.TrainingFiles(Path(outputFolder), modelName).loss
        if not path.is_file():
            return None
        columns = training_folder.read_training_loss(path)
        table = result_nodes.table_node_from_columns(columns, slicer.mrmlScene,
                                             slicer.mrmlScene.GenerateUniqueName("training loss"))
        chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", table.GetName() + " chart")
        series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "loss")
        series.SetAndObserveTableNodeID(table.GetID())
        iteration, loss = training_folder.LOSS_COLUMNS[:2]
        series.SetXColumnName(iteration)
        series.SetYColumnName(loss)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetYAxisTitle(loss)
        chart.SetXAxisTitle(iteration)
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        return chart


class AgentRegistrationTrainingTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the widget loads and names the stages Train runs, and the inputs are checked, with a message that
    says what to do, before anything runs (a whole training takes hours: ``agentreg train`` is tested by pytest)."""

    def runTest(self) -> None:
        slicer.mrmlScene.Clear()
        self.test_the_train_button_names_the_stages()
        self.test_refuses_missing_inputs_with_what_to_do()

    def test_the_train_button_names_the_stages(self) -> None:
        slicer.util.selectModule("AgentRegistrationTraining")
        widget = slicer.util.getModuleWidget("AgentRegistrationTraining")
        self.assertEqual(widget.ui.applyButton.text, widget._panel.apply_text)
        for stage in definitions.training_stages(widget.logic.getParameterNode().geometry):
            self.assertIn(messages.STAGE_TITLES[stage], widget.ui.applyButton.toolTip)
        self.delayDisplay("The Train button names its stages")

    def test_refuses_missing_inputs_with_what_to_do(self) -> None:
        logic = AgentRegistrationTrainingLogic()
        with self.assertRaisesRegex(ValueError, "Choose an output folder"):
            logic.startTraining([], Path("/nonexistent"), Path(""), "m")
        with self.assertRaisesRegex(ValueError, "Check loaded volumes or pick a folder"):
            logic.startTraining([], Path("/nonexistent"), Path(slicer.app.temporaryPath) / "training", "m")
        self.delayDisplay("Training input checks passed")
