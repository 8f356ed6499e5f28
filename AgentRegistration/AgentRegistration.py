"""AgentRegistration: non-rigid registration by a trained agent (Krebs et al., MICCAI 2017).

The widget wires the .ui file to a typed parameter node; the logic writes the inputs to a
temporary folder, runs ``agentreg register`` in a worker process (torch never runs inside
Slicer) and turns its output folder into nodes through ``AgentRegistrationGUILib``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from AgentRegistrationGUILib import (
    cohort_job,
    definitions,
    job_panel,
    jobs,
    registration_job,
    result_nodes,
    slicer_setup,
)
from AgentRegistrationLib.contract import layout, worker_commands
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent


def resourceFile(*parts: str) -> Path | None:
    """First existing ``Resources/<parts>`` of the extension (installed or source tree), or None."""
    return layout.resource_file(__file__, *parts)


def userModelsFolder() -> Path:
    """Where Agent Registration Training installs the models it trains (writable, kept across updates)."""
    return slicer_setup.user_models_folder(slicer.app.slicerUserSettingsFilePath)


def modelFolders() -> list[Path]:
    """Folders whose ``*.pt`` bundles are listed: the shipped models, then the user's trained ones."""
    return [folder / "Models" for folder in layout.resource_dirs(__file__)] + [userModelsFolder()]


def availableModels() -> dict[str, Path]:
    """Model files by name, read afresh (a model trained or copied in meanwhile is listed)."""
    return layout.available_models(modelFolders())


def modelChoices(chosen: Path | None = None) -> list[definitions.ModelChoice]:
    """The registration models a user can pick (the shipped ones, then the trained ones; ``chosen``, a file picked
    elsewhere, last), each with the defaults it carries."""
    return definitions.model_choices(availableModels(), chosen)


JobState = jobs.JobState


#
# AgentRegistration
#


class AgentRegistration(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Agent Registration")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = ["Sequences", "Segmentations"]
        self.parent.contributors = ["AgentRegistration developers"]
        self.parent.helpText = _(
            "Non-rigid registration of prostate MR by a trained agent that predicts, step by step, "
            "changes of a statistical deformation model (Krebs et al., MICCAI 2017). Outputs a warped "
            "volume, a transform, the moving segmentation carried onto the fixed volume, Dice/Hausdorff and the "
            "agent's trajectory. First time: press Load sample data, then Apply.")
        self.parent.acknowledgementText = _(
            "Method: Krebs J. et al., Robust non-rigid registration through agent-based action learning, "
            "MICCAI 2017.")


#
# Parameter node
#


@parameterNodeWrapper
class AgentRegistrationParameterNode:
    """Everything the GUI edits; each field is bound to one widget through SlicerParameterName."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]  # noqa: UP007
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]  # noqa: UP007
    fixedPoint: vtkMRMLMarkupsFiducialNode  # its first point: the prostate's centre on the fixed volume
    modelPath: Path  # shown by modelComboBox (FIELDS_SET_IN_CODE): the listed models, then "Other file..."
    device: Annotated[str, Choice(list(worker_commands.DEVICE_CHOICES))] = "Auto"
    steps: Annotated[int, WithinRange(0, 10000)] = 0  # 0: the model's default
    fuzzyActionControl: bool = True
    fuzzyK: Annotated[float, WithinRange(0.0, 10.0)] = 0.0  # 0: the model's default
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    saveStepsEvery: Annotated[int, WithinRange(0, 10000)] = 10
    keepTemporaryFiles: bool = False
    warpedVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    propagatedSegmentation: vtkMRMLSegmentationNode
    metricsTable: vtkMRMLTableNode
    atlasVolume: vtkMRMLScalarVolumeNode  # several patients: the atlas registered to each of them
    atlasSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]  # noqa: UP007  # carried onto them
    cohortPatientsFolder: Path  # several patients: a folder of images (used when no patient volume is checked)


FIELDS_SET_IN_CODE = {"modelPath": "modelComboBox"}
"""Parameter node fields no widget binds through ``SlicerParameterName``, and the widget that shows each: the model
combo box lists models found at run time (no fixed ``Choice``), so the widget keeps it and the field in step."""


#
# Widget
#


class AgentRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui widgets to the parameter node and to a running job."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job: registration_job.RegistrationJob | None = None
        self.lastResult: result_nodes.RegistrationResultNodes | None = None  # the nodes of the last registration
        self._panel: job_panel.JobPanel | None = None  # its Apply/Cancel button, progress bar and status (setup)
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.onTimer)
        self._cohort: cohort_job.CohortJob | None = None  # several patients: one register-many worker
        self._cohortPanel: job_panel.JobPanel | None = None
        self._cohortTimer = qt.QTimer()
        self._cohortTimer.setInterval(200)
        self._cohortTimer.timeout.connect(self.onCohortTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AgentRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AgentRegistrationLogic()
        # The two jobs (one pair, several patients): one worker at a time, so each Apply waits while the other runs.
        busyTexts = {"cancel_text": _("Cancel"), "cancelling_text": _("Cancelling..."), "on_change": self._checkCanApply}
        self._panel = job_panel.JobPanel(
            self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel, apply_text=_("Apply"), **busyTexts,
            inputs=(self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton, self.ui.loadSampleDataButton))
        cohortInputs = (self.ui.cohortAtlasVolumeSelector, self.ui.cohortAtlasSegmentationSelector,
                        self.ui.cohortFixedVolumesSelector, self.ui.cohortPatientsFolderLineEdit)
        self._cohortPanel = job_panel.JobPanel(
            self.ui.cohortApplyButton, self.ui.cohortProgressBar, self.ui.cohortStatusLabel,
            apply_text=_("Register all patients"), **busyTexts,
            inputs=(self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton, *cohortInputs))

        # Choices and tooltips from the engine's definitions (definitions.py), so they say what the engine does.
        self._modelChoices: list[definitions.ModelChoice] = []
        self._listedModelPath: Path | None = None  # the parameter node's model when the list was last made
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.deviceComboBox.toolTip = definitions.device_tooltip()
        self.ui.cohortPatientsFolderLineEdit.toolTip = definitions.patients_folder_tooltip()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleDataButton.connect("clicked(bool)", self.onLoadSampleData)
        self.ui.cohortPatientsFolderLineEdit.filters = self.ui.cohortPatientsFolderLineEdit.Dirs
        self.ui.cohortFixedVolumesSelector.connect("checkedNodesChanged()", self._checkCanApply)
        self.ui.cohortApplyButton.connect("clicked(bool)", self.onCohortApplyButton)
        self.initializeParameterNode()
        self._panel.show(JobState.IDLE)
        self._cohortPanel.show(JobState.IDLE)

    def cleanup(self) -> None:
        for panel in (self._panel, self._cohortPanel):
            if panel is not None:
                panel.discard()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def refreshModelList(self) -> None:
        """List the models afresh (on entering the module, so that one trained meanwhile is listed), each with its
        defaults as its tooltip, then "Other file..."; select the parameter node's model."""
        p = self._parameterNode
        self._listedModelPath = p.modelPath if p else None
        self._modelChoices = modelChoices(self._listedModelPath)
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for index, choice in enumerate(self._modelChoices):
            combo.addItem(choice.name)
            combo.setItemData(index, choice.tooltip, qt.Qt.ToolTipRole)
        combo.addItem(_("Other file..."))
        combo.setItemData(len(self._modelChoices), _("Choose a model bundle (.pt) saved by Agent Registration Training"),
                          qt.Qt.ToolTipRole)
        index = definitions.choice_index(self._modelChoices, p.modelPath if p else None)
        combo.setCurrentIndex(index if index is not None else -1)
        combo.blockSignals(wasBlocked)
        self._showModelDefaults()

    def _currentModelChoice(self) -> definitions.ModelChoice | None:
        p = self._parameterNode
        index = definitions.choice_index(self._modelChoices, p.modelPath if p else None)
        return self._modelChoices[index] if index is not None else None

    def _showModelDefaults(self) -> None:
        """The tooltips that say what "model's default" is for the chosen model."""
        choice = self._currentModelChoice()
        self.ui.stepsSpinBox.toolTip = definitions.steps_tooltip(choice)
        self.ui.fuzzyKSpinBox.toolTip = definitions.fuzzy_k_tooltip(choice)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.modelPath.is_file():
            choices = modelChoices()
            model = layout.default_model({c.name: c.path for c in choices})
            if model is not None:
                self._parameterNode.modelPath = model
        self.refreshModelList()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def onModelSelected(self, index: int) -> None:
        p = self._parameterNode
        if p is None or index < 0:
            return
        if index < len(self._modelChoices):
            p.modelPath = self._modelChoices[index].path
            self._showModelDefaults()
            return
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Choose a model bundle"),
                                              str(userModelsFolder()), _("Model bundle") + " (*.pt)")
        if path and definitions.ModelChoice.of(Path(path).stem, Path(path)) is None:
            slicer.util.errorDisplay(_("{path} is not a registration model: choose a .pt file saved by Agent "
                                       "Registration Training, or a listed model.").format(path=path))
        elif path:
            p.modelPath = Path(path)
        self.refreshModelList()  # the chosen file, listed last; or the model chosen before

    def onLoadSampleData(self) -> None:
        """Load the shipped pair and select it: the first registration is then Apply."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample data."), waitCursor=True):
            sample = self.logic.loadSampleData()
            p = self._parameterNode
            p.fixedVolume, p.movingVolume = sample["fixed"], sample["moving"]
            p.fixedSegmentation, p.movingSegmentation = sample["fixed_label"], sample["moving_label"]
            slicer.util.setSliceViewerLayers(background=sample["fixed"], fit=True)
            self.ui.statusLabel.text = _("Sample data loaded: press Apply.")

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is not None and p.modelPath != self._listedModelPath and self._currentModelChoice() is None:
            self.refreshModelList()  # the model was set elsewhere (a scene loaded, a script): show it
        hint = definitions.apply_hint(p and p.fixedVolume, p and p.movingVolume, p.modelPath if p else None)
        if not self._cohortPanel.busy:
            patients = bool(self.ui.cohortFixedVolumesSelector.checkedNodes()) or self._cohortFolder() is not None
            cohortReady = bool(p and p.atlasVolume and p.modelPath.is_file() and patients)
            self.ui.cohortApplyButton.enabled = cohortReady and not self._panel.busy
            self.ui.cohortApplyButton.toolTip = _("Register the atlas to every patient") if cohortReady else \
                _("Select the atlas volume, a model, and patient volumes or a folder of images")
        if self._panel.busy:
            return
        self.ui.applyButton.enabled = not hint and not self._cohortPanel.busy
        self.ui.applyButton.toolTip = hint or _(
            "Register the moving volume to the fixed volume (and carry the moving segmentation onto it)")

    def onApplyButton(self) -> None:
        if self._panel.state == JobState.RUNNING:
            self._panel.request_cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            if not slicer_setup.dependencies_ready("AgentRegistration", then=self.onApplyButton):
                return  # installing the Python packages in a separate process; Apply goes on once they are in
            p = self._parameterNode
            self._job = self.logic.startRegistration(
                p.fixedVolume, p.movingVolume, p.modelPath, p.fixedSegmentation, p.movingSegmentation,
                fixedPoint=p.fixedPoint, device=p.device, steps=p.steps, fuzzyActionControl=p.fuzzyActionControl, fuzzyK=p.fuzzyK,
                seed=p.seed, saveStepsEvery=p.saveStepsEvery, keepTemporaryFiles=p.keepTemporaryFiles)
            self._panel.start(self._job.job, _("Starting the worker..."))  # busy until the worker's first step
            self._timer.start()

    def onTimer(self) -> None:
        """Show the worker's messages on the panel; import its results when it has ended."""
        if not self._panel.poll():
            return
        self._timer.stop()
        registration, self._job = self._job, None
        if self._panel.state == JobState.CANCEL_REQUESTED:
            self._panel.finish_cancelled(_("Cancelled; the scene was not changed."))
            return
        p = self._parameterNode
        try:
            result = registration_job.finish_registration(registration, slicer.modules.sequences.logic(),
                                                          warped_node=p.warpedVolume, transform_node=p.outputTransform,
                                                          metrics_node=p.metricsTable,
                                                          propagated_node=p.propagatedSegmentation)
        except Exception as error:
            self._panel.fail(_("Failed: {error}").format(error=error))
            slicer.util.errorDisplay(_("Registration failed."), detailedText=str(error))
            return
        self._showResult(result)
        self._panel.succeed(registration_job.summary_text(result.metrics))

    def _showResult(self, result: result_nodes.RegistrationResultNodes) -> None:
        p = self._parameterNode
        p.warpedVolume = result.warped_volume
        p.outputTransform = result.transform
        p.metricsTable = result.metrics_table
        if result.propagated_segmentation is not None:
            p.propagatedSegmentation = result.propagated_segmentation
        self.lastResult = result
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=result.warped_volume,
                                         foregroundOpacity=0.5, fit=True)
        slicer.modules.plots.logic().ShowChartInLayout(result.trajectory_chart)
        if result.step_browser is not None:
            slicer.modules.sequences.showSequenceBrowser(result.step_browser)

    def _cohortFolder(self) -> Path | None:
        p = self._parameterNode
        folder = str(p.cohortPatientsFolder) if p else ""
        return Path(folder) if folder not in ("", ".") and Path(folder).is_dir() else None

    def onCohortApplyButton(self) -> None:
        if self._cohortPanel.state == JobState.RUNNING:
            self._cohortPanel.request_cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration of the patients."), waitCursor=True):
            if not slicer_setup.dependencies_ready("AgentRegistration", then=self.onCohortApplyButton):
                return
            p = self._parameterNode
            checked = list(self.ui.cohortFixedVolumesSelector.checkedNodes())
            self._cohort = self.logic.startCohortRegistration(
                p.atlasVolume, p.modelPath, p.atlasSegmentation, fixedVolumes=checked,
                patientsFolder=None if checked else self._cohortFolder(), device=p.device, steps=p.steps,
                fuzzyActionControl=p.fuzzyActionControl, fuzzyK=p.fuzzyK, seed=p.seed,
                keepTemporaryFiles=p.keepTemporaryFiles)
            self._cohortPanel.start(self._cohort.job, _("Starting the worker..."))
            self._cohortTimer.start()

    def onCohortTimer(self) -> None:
        """Show the register-many worker's messages (one per patient); import its results when it has ended."""
        if not self._cohortPanel.poll():
            return
        self._cohortTimer.stop()
        cohort, self._cohort = self._cohort, None
        if self._cohortPanel.state == JobState.CANCEL_REQUESTED:
            self._cohortPanel.finish_cancelled(_("Cancelled; the scene was not changed."))
            return
        try:
            result = cohort_job.finish_cohort_registration(cohort)
        except Exception as error:
            self._cohortPanel.fail(_("Failed: {error}").format(error=error))
            slicer.util.errorDisplay(_("Registration of the patients failed."), detailedText=str(error))
            return
        first = next(iter(result.segmentations), None)
        if first is not None:
            volume = result.volumes.get(first) or cohort.patients.get(first)
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(result.summary_table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        self._cohortPanel.succeed(cohort_job.cohort_summary_text(result))


#
# Logic
#


class AgentRegistrationLogic(ScriptedLoadableModuleLogic):
    """Starts registration workers; usable without the GUI (see ``process``)."""

    def getParameterNode(self) -> AgentRegistrationParameterNode:
        return AgentRegistrationParameterNode(super().getParameterNode())

    def startRegistration(self, fixedVolume, movingVolume, model, fixedSegmentation=None,
                          movingSegmentation=None, fixedPoint=None, device: str = "Auto", steps: int | None = None,
                          fuzzyActionControl: bool = True, fuzzyK: float | None = None, seed: int = 0,
                          saveStepsEvery: int = 10, keepTemporaryFiles: bool = False) -> registration_job.RegistrationJob:
        """Check the inputs, write them to a temporary folder and start the worker (``agentreg register``).

        ``model``: a listed model's name or a .pt file; ``steps``/``fuzzyK`` 0 or None: the model's defaults.
        ``fixedPoint``: a markups point list whose first point marks the prostate on the fixed volume. A 2-D model
        registers a single-slice volume (its results come back onto the slice).
        """
        model = Path(availableModels().get(str(model), model))
        return registration_job.start_registration(
            slicer_setup.worker_python(), layout.engine_dir(__file__), fixedVolume, movingVolume, model,
            fixed_segmentation=fixedSegmentation, moving_segmentation=movingSegmentation, fixed_point=fixedPoint,
            temporary_root=slicer.app.temporaryPath, keep_temporary_files=keepTemporaryFiles, device=device,
            steps=steps, seed=seed, fuzzy_action_control=fuzzyActionControl, fuzzy_k=fuzzyK,
            save_steps=saveStepsEvery)

    def startCohortRegistration(self, atlasVolume, model, atlasSegmentation=None, fixedVolumes=(),
                                patientsFolder=None, device: str = "Auto", steps: int | None = None,
                                fuzzyActionControl: bool = True, fuzzyK: float | None = None, seed: int = 0,
                                keepTemporaryFiles: bool = False) -> cohort_job.CohortJob:
        """Register the atlas (``atlasVolume``, its ``atlasSegmentation`` propagated) to each of ``fixedVolumes``, or
        to every image of ``patientsFolder``, in one ``agentreg register-many`` worker; finish with
        ``cohort_job.finish_cohort_registration`` (a segmentation per patient and the summary table)."""
        model = Path(availableModels().get(str(model), model))
        return cohort_job.start_cohort_registration(
            slicer_setup.worker_python(), layout.engine_dir(__file__), atlasVolume, model,
            atlas_segmentation=atlasSegmentation, fixed_nodes=list(fixedVolumes), patients_folder=patientsFolder,
            temporary_root=slicer.app.temporaryPath, keep_temporary_files=keepTemporaryFiles, device=device,
            steps=steps, seed=seed, fuzzy_action_control=fuzzyActionControl, fuzzy_k=fuzzyK)

    def process(self, fixedVolume, movingVolume, model, timeout: float | None = None,
                **kwargs) -> result_nodes.RegistrationResultNodes:
        """Register and wait (for scripts and the self-test); the GUI uses ``startRegistration``."""
        registration = self.startRegistration(fixedVolume, movingVolume, model, **kwargs)
        job = registration.job
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.done():
            job.poll()
            slicer.app.processEvents()
            if deadline is not None and time.monotonic() > deadline:
                job.cancel()
            time.sleep(0.05)
        job.poll()
        return registration_job.finish_registration(registration, slicer.modules.sequences.logic())

    @staticmethod
    def loadSampleData() -> dict:
        """Load the shipped real prostate pair (Resources/SampleData) into the scene."""
        return registration_job.load_volume_pair(layout.sample_data_files(__file__), slicer.mrmlScene)


#
# Test (runs inside Slicer only)
#


class AgentRegistrationTest(ScriptedLoadableModuleTest):
    """A user's first registration, through the module's own widget: load sample, Apply, look. Then the same pair as
    an atlas and a patient under "Several patients". The real worker on the shipped pair with the shipped 3-D model
    (never skipped; the Python packages are installed first when missing)."""

    TIMEOUT_S = 600

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_first_registration_load_sample_apply_look()
        self.setUp()
        self.test_atlas_onto_a_patient()

    def _waitWhileBusy(self, panel: job_panel.JobPanel) -> None:
        deadline = time.monotonic() + self.TIMEOUT_S
        while panel.busy:
            self.assertLess(time.monotonic(), deadline, f"still running after {self.TIMEOUT_S} s")
            slicer.app.processEvents()  # the widget's timer reads the worker's progress and imports its results
            time.sleep(0.05)

    def test_first_registration_load_sample_apply_look(self) -> None:
        slicer.util.selectModule("AgentRegistration")
        widget = slicer.util.getModuleWidget("AgentRegistration")
        self.assertTrue(slicer_setup.ensure_dependencies("AgentRegistration"))  # now, so that Apply asks nothing

        self.delayDisplay("Load sample data")
        widget.ui.loadSampleDataButton.click()
        p = widget.logic.getParameterNode()
        for node in (p.fixedVolume, p.movingVolume, p.fixedSegmentation, p.movingSegmentation):
            self.assertIsNotNone(node, "Load sample data selects both volumes and both segmentations")
        self.assertEqual(widget.ui.modelComboBox.currentText, "prostate-3d")  # the model a first user meets
        self.assertTrue(widget.ui.applyButton.enabled, widget.ui.applyButton.toolTip)

        self.delayDisplay("Apply")
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, widget._panel.cancel_text)  # Apply is Cancel while it runs
        self._waitWhileBusy(widget._panel)
        self.assertEqual(widget._panel.state, JobState.SUCCEEDED, widget.ui.statusLabel.text)

        self.delayDisplay("Look")
        result = widget.lastResult
        self.assertIs(p.warpedVolume, result.warped_volume)
        self.assertIs(p.outputTransform, result.transform)
        self.assertIs(p.metricsTable, result.metrics_table)
        self.assertIs(p.propagatedSegmentation, result.propagated_segmentation)  # Apply carried the segmentation
        self.assertEqual(result.propagated_segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertIsNotNone(result.step_sequence)
        self.assertIsNotNone(result.trajectory_chart)
        metrics = result.metrics
        self.assertGreater(metrics["dice_after"], metrics["dice_none"], "registration must improve on none")
        self.assertGreaterEqual(round(metrics["dice_after"], 3), round(metrics["dice_before"], 3),
                                "the agent must not end worse than its start")
        self.delayDisplay(widget.ui.statusLabel.text)

    def test_atlas_onto_a_patient(self) -> None:
        """The moving sample volume as the atlas, the fixed one as the patient: its segmentation comes onto it."""
        sample = AgentRegistrationLogic.loadSampleData()
        self.assertTrue(slicer_setup.ensure_dependencies("AgentRegistration"))
        cohort = AgentRegistrationLogic().startCohortRegistration(sample["moving"], "prostate-3d", sample["moving_label"],
                                                                  fixedVolumes=[sample["fixed"]])
        deadline = time.monotonic() + self.TIMEOUT_S
        while not cohort.job.done():
            cohort.job.poll()
            slicer.app.processEvents()
            if time.monotonic() > deadline:
                cohort.job.cancel()
            time.sleep(0.05)
        cohort.job.poll()
        result = cohort_job.finish_cohort_registration(cohort)
        self.assertEqual(len(result.segmentations), 1)
        self.assertEqual(result.summary_table.GetTable().GetNumberOfRows(), 1)
        self.delayDisplay("Atlas propagation test passed")
