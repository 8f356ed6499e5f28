"""AgentRegistration: non-rigid registration by a trained agent (Krebs et al., MICCAI 2017).

The widget wires the .ui file to a typed parameter node; the logic writes the inputs to a
temporary folder, runs ``agentreg register`` in a worker process (torch never runs inside
Slicer) and turns its output folder into nodes through ``AgentRegistrationLib.mrml``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Union

import qt
import SimpleITK as sitk
import slicer
import vtk
from AgentRegistrationLib import mrml
from slicer import (
    vtkMRMLLabelMapVolumeNode,
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
# Installed extension: files copied next to the module; source tree: the top-level Resources.
RESOURCE_DIRS = (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources")

REQUIREMENT_IMPORTS = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", "SimpleITK": "SimpleITK",
                       "itk-elastix": "itk", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def resourceFile(*parts: str) -> Path | None:
    """First existing file among the resource folders, or None."""
    for folder in RESOURCE_DIRS:
        path = folder.joinpath(*parts)
        if path.exists():
            return path
    return None


def shippedModels() -> dict[str, Path]:
    """Model bundles shipped with the extension, by name."""
    models: dict[str, Path] = {}
    for folder in reversed(RESOURCE_DIRS):
        models.update(mrml.shipped_models(folder / "Models"))
    return models


def workerPython() -> str:
    """The Python that runs the worker: PythonSlicer inside Slicer."""
    return shutil.which("PythonSlicer") or sys.executable


def ensureDependencies(requester: str = "AgentRegistration") -> bool:
    """Install the engine's requirements on first use, asking the user first.

    Torch comes from the PyTorch extension (PyTorchUtils, which picks the CUDA build) when
    available; everything else from ``Resources/requirements.txt``.
    """
    missing = [name for name, module in REQUIREMENT_IMPORTS.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            _("{requester} needs these Python packages, which are not installed yet:\n{packages}\n\n"
              "Install them now? This is needed once and can take several minutes "
              "(PyTorch is a large download).").format(requester=requester, packages=", ".join(missing))):
        return False
    if "torch" in missing:
        try:
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                raise ImportError("PyTorchUtils did not install torch")
            missing.remove("torch")
        except ImportError:
            logging.info("PyTorch extension not available; torch is installed with pip (CPU build on some systems)")
    requirements = resourceFile("requirements.txt")
    with slicer.util.WaitCursor():
        if hasattr(slicer, "packaging") and requirements is not None:
            reqs = [r for r in slicer.packaging.load_requirements(requirements)
                    if r.name in missing]
            slicer.packaging.pip_ensure(reqs, requester=requester)
        else:
            slicer.util.pip_install(missing)
    return all(importlib.util.find_spec(REQUIREMENT_IMPORTS[n]) is not None for n in missing)


JobState = mrml.JobState


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
            "volume, a transform, Dice/Hausdorff and the agent's trajectory.")
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
    modelPath: Path
    device: Annotated[str, Choice(list(mrml.DEVICE_CHOICES))] = "Auto"
    steps: Annotated[int, WithinRange(0, 10000)] = 0  # 0: the model's default
    fuzzyActionControl: bool = True
    fuzzyK: Annotated[float, WithinRange(0.1, 10.0)] = 1.5
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    saveStepsEvery: Annotated[int, WithinRange(0, 10000)] = 10
    keepTemporaryFiles: bool = False
    warpedVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    propagatedSegmentation: vtkMRMLSegmentationNode
    metricsTable: vtkMRMLTableNode


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
        self._job = None
        self._state = JobState.IDLE
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AgentRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AgentRegistrationLogic()

        self.ui.shippedModelComboBox.addItem(_("(choose a file)"))
        for name in shippedModels():
            self.ui.shippedModelComboBox.addItem(name)
        self.ui.shippedModelComboBox.currentTextChanged.connect(self.onShippedModelSelected)
        self.ui.modelPathLineEdit.filters = self.ui.modelPathLineEdit.Files
        self.ui.modelPathLineEdit.nameFilters = ["Model bundle (*.pt)"]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagateButton)
        self.initializeParameterNode()
        self.setState(JobState.IDLE)

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
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

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.modelPath.name:
            models = shippedModels()
            if models:
                self._parameterNode.modelPath = next(iter(models.values()))

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def onShippedModelSelected(self, name: str) -> None:
        model = shippedModels().get(name)
        if model is not None and self._parameterNode:
            self._parameterNode.modelPath = model

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ready = bool(p and p.fixedVolume and p.movingVolume and p.modelPath.is_file())
        if self._state in (JobState.RUNNING, JobState.CANCEL_REQUESTED):
            return
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Register the moving volume to the fixed volume") if ready else \
            _("Select fixed and moving volumes and a model bundle (.pt)")
        self.ui.propagateButton.enabled = bool(p and p.outputTransform and p.movingSegmentation and p.fixedVolume)

    def setState(self, state: JobState, message: str = "") -> None:
        """One place that maps the job state to the buttons and the progress bar."""
        self._state = state
        running = state in (JobState.RUNNING, JobState.CANCEL_REQUESTED)
        self.ui.applyButton.text = {JobState.RUNNING: _("Cancel"),
                                    JobState.CANCEL_REQUESTED: _("Cancelling...")}.get(state, _("Apply"))
        self.ui.applyButton.enabled = state != JobState.CANCEL_REQUESTED
        self.ui.progressBar.visible = running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self.ui.statusLabel.text = message
        if not running:
            self._checkCanApply()

    def onApplyButton(self) -> None:
        if self._state == JobState.RUNNING:
            self.setState(JobState.CANCEL_REQUESTED, _("Cancelling..."))
            self._job.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            if not ensureDependencies():
                return
            p = self._parameterNode
            self._job = self.logic.startRegistration(
                p.fixedVolume, p.movingVolume, p.modelPath, p.fixedSegmentation, p.movingSegmentation,
                device=p.device, steps=p.steps, fuzzyActionControl=p.fuzzyActionControl, fuzzyK=p.fuzzyK,
                seed=p.seed, saveStepsEvery=p.saveStepsEvery, keepTemporaryFiles=p.keepTemporaryFiles)
            self.ui.progressBar.setRange(0, p.steps)  # 0 (the model's default): busy until the first step
            self.ui.progressBar.value = 0
            self.setState(JobState.RUNNING, _("Starting the worker..."))
            self._timer.start()

    def onTimer(self) -> None:
        """Drain the worker's progress messages; finish when it has exited."""
        job = self._job
        for message in job.messages():
            if message.get("stage") == "register":
                self.ui.progressBar.setRange(0, int(message.get("total", 0)))
                self.ui.progressBar.value = int(message.get("step", 0))
                self.ui.statusLabel.text = _("Step {step} of {total}").format(**message)
            elif message.get("stage") == "error":
                job.errorMessage = message.get("message", "")
            elif message.get("stage") == "log":
                logging.info(message["message"])
        if not job.finished():
            return
        self._timer.stop()
        self._job = None
        if self._state == JobState.CANCEL_REQUESTED:
            job.cleanup()
            self.setState(JobState.IDLE, _("Cancelled; the scene was not changed."))
            return
        try:
            result = job.finish()
        except Exception as error:
            self.setState(JobState.FAILED, _("Failed: {error}").format(error=error))
            slicer.util.errorDisplay(_("Registration failed."), detailedText=str(error))
            return
        self._showResult(result)
        self.setState(JobState.SUCCEEDED, self.logic.summary(result))

    def _showResult(self, result: mrml.RegistrationResultNodes) -> None:
        p = self._parameterNode
        p.warpedVolume = result.warped_volume
        p.outputTransform = result.transform
        if result.metrics_table is not None:
            p.metricsTable = result.metrics_table
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=result.warped_volume,
                                         foregroundOpacity=0.5, fit=True)
        slicer.modules.plots.logic().ShowChartInLayout(result.trajectory_chart)
        if result.step_browser is not None:
            slicer.modules.sequences.showSequenceBrowser(result.step_browser)

    def onPropagateButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to propagate the segmentation."), waitCursor=True):
            p = self._parameterNode
            p.propagatedSegmentation = mrml.propagate_segmentation(
                p.movingSegmentation, p.outputTransform, p.fixedVolume,
                slicer.mrmlScene.GenerateUniqueName(f"{p.movingSegmentation.GetName()} on fixed"))


#
# Logic
#


class RegistrationJob:
    """One running ``agentreg register`` worker with its temporary folder."""

    def __init__(self, worker: mrml.WorkerProcess, folder: Path, fixedVolume, movingVolume, name: str,
                 keepTemporaryFiles: bool) -> None:
        self.worker = worker
        self.folder = folder
        self.fixedVolume = fixedVolume
        self.movingVolume = movingVolume
        self.name = name
        self.keepTemporaryFiles = keepTemporaryFiles
        self.errorMessage = ""

    def messages(self) -> list[dict]:
        return self.worker.messages()

    def finished(self) -> bool:
        return self.worker.finished()

    def cancel(self) -> None:
        self.worker.cancel()

    def finish(self) -> mrml.RegistrationResultNodes:
        """Make the result nodes (all or nothing), then remove the temporary folder."""
        try:
            if self.worker.returncode != 0:
                raise RuntimeError(self.errorMessage or self.worker.error_text()
                                   or f"worker exited with status {self.worker.returncode}")
            return mrml.import_register_results(self.folder / "output", slicer.mrmlScene, self.fixedVolume,
                                                self.movingVolume, self.name,
                                                slicer.modules.sequences.logic())
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.keepTemporaryFiles:
            logging.info(f"AgentRegistration temporary files kept in {self.folder}")
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


class AgentRegistrationLogic(ScriptedLoadableModuleLogic):
    """Starts registration workers; usable without the GUI (see ``process``)."""

    def getParameterNode(self) -> AgentRegistrationParameterNode:
        return AgentRegistrationParameterNode(super().getParameterNode())

    def startRegistration(self, fixedVolume, movingVolume, model, fixedSegmentation=None,
                          movingSegmentation=None, device: str = "Auto", steps: int | None = None,
                          fuzzyActionControl: bool = True, fuzzyK: float = 1.5, seed: int = 0,
                          saveStepsEvery: int = 10, keepTemporaryFiles: bool = False) -> RegistrationJob:
        """Check the inputs, write them to a temporary folder and start the worker."""
        if fixedVolume is None or movingVolume is None:
            raise ValueError("Select both a fixed and a moving volume.")
        if fixedVolume is movingVolume:
            raise ValueError("The fixed and the moving volume are the same node; select two volumes.")
        model = Path(shippedModels().get(str(model), model))
        if not model.is_file():
            raise ValueError(f"Model bundle not found: {model}. Pick a shipped model or a .pt file.")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(tempfile.mkdtemp(prefix=f"AgentRegistration-{stamp}-", dir=slicer.app.temporaryPath))
        try:
            inputs = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving.nii.gz"}
            sitk.WriteImage(mrml.sitk_from_volume_node(fixedVolume), str(inputs["fixed"]))
            sitk.WriteImage(mrml.sitk_from_volume_node(movingVolume), str(inputs["moving"]))
            labels = {}
            for key, segmentation, reference in (("fixed_label", fixedSegmentation, fixedVolume),
                                                 ("moving_label", movingSegmentation, movingVolume)):
                if segmentation is not None:
                    labels[key] = folder / f"{key}.nii.gz"
                    sitk.WriteImage(mrml.segmentation_to_labelmap_sitk(segmentation, reference), str(labels[key]))
            command = mrml.register_command(
                workerPython(), inputs["fixed"], inputs["moving"], model, folder / "output", device=device,
                steps=steps, seed=seed, fuzzy_action_control=fuzzyActionControl, fuzzy_k=fuzzyK,
                save_steps=saveStepsEvery, **labels)
            worker = mrml.WorkerProcess(command, env=mrml.worker_environment(MODULE_DIR))
            logging.info("AgentRegistration worker: " + " ".join(command))
            worker.start()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        name = slicer.mrmlScene.GenerateUniqueName(f"{movingVolume.GetName()} to {fixedVolume.GetName()}")
        return RegistrationJob(worker, folder, fixedVolume, movingVolume, name, keepTemporaryFiles)

    def process(self, fixedVolume, movingVolume, model, **kwargs) -> mrml.RegistrationResultNodes:
        """Register and wait (for scripts and the self-test); the GUI uses ``startRegistration``."""
        job = self.startRegistration(fixedVolume, movingVolume, model, **kwargs)
        while not job.finished():
            for message in job.messages():
                if message.get("stage") == "error":
                    job.errorMessage = message.get("message", "")
            slicer.app.processEvents()
            time.sleep(0.05)
        for message in job.messages():
            if message.get("stage") == "error":
                job.errorMessage = message.get("message", "")
        return job.finish()

    @staticmethod
    def summary(result: mrml.RegistrationResultNodes) -> str:
        m = result.metrics
        if "dice_after" in m:
            return _("Done. Dice {before:.3f} -> {after:.3f}").format(before=m["dice_before"], after=m["dice_after"])
        return _("Done.")


#
# Test (runs inside Slicer only)
#


class AgentRegistrationTest(ScriptedLoadableModuleTest):
    """Registers a real PROMISE12 pair with a shipped model inside Slicer."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_register_real_pair()

    def test_register_real_pair(self) -> None:
        data = Path(os.environ.get("AGENTREG_TEST_DATA", MODULE_DIR.parent.parent / "shared/data/promise12/native"))
        models = shippedModels()
        if not (data / "case00_image.nii.gz").is_file() or not models:
            self.delayDisplay(f"Skipped: no PROMISE12 data under {data} (set AGENTREG_TEST_DATA) or no shipped model")
            return
        self.assertTrue(ensureDependencies())
        fixed = slicer.util.loadVolume(str(data / "case00_image.nii.gz"))
        moving = slicer.util.loadVolume(str(data / "case04_image.nii.gz"))
        fixedLabel = slicer.util.loadLabelVolume(str(data / "case00_label.nii.gz"))
        movingLabel = slicer.util.loadLabelVolume(str(data / "case04_label.nii.gz"))
        before = slicer.mrmlScene.GetNumberOfNodes()
        model = models.get("prostate-3d", next(iter(models.values())))
        result = AgentRegistrationLogic().process(fixed, moving, model, fixedSegmentation=fixedLabel,
                                                  movingSegmentation=movingLabel, steps=200, saveStepsEvery=20)
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertGreater(result.metrics["dice_after"], result.metrics["dice_before"])
        propagated = mrml.propagate_segmentation(movingLabel, result.transform, fixed, "propagated")
        self.assertEqual(propagated.GetSegmentation().GetNumberOfSegments(), 1)
        self.delayDisplay("Registration test passed")
