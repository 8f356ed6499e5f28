"""One registration from Slicer: the volumes written for a worker, its command, and its folder read back."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import slicer
from AgentRegistrationLib.contract import register_folder, worker_commands

from AgentRegistrationGUILib import jobs
from AgentRegistrationGUILib.nodes import (
    SlicePlane,
    markups_point_lps,
    segmentation_node_from_labelmap_sitk,
    segmentation_to_labelmap_sitk,
    sitk_from_volume_node,
    volume_node_from_sitk,
)
from AgentRegistrationGUILib.result_nodes import RegistrationResultNodes, import_register_results

# --------------------------------------------------------------------------- registration job


@dataclass
class RegistrationJob:
    """A running ``agentreg register`` worker started from nodes, with what is needed to import its result."""

    job: jobs.WorkerJob
    folder: Path
    fixed_node: slicer.vtkMRMLScalarVolumeNode
    moving_node: slicer.vtkMRMLScalarVolumeNode
    name: str
    plane: SlicePlane | None = None  # a single-slice fixed volume registered by a 2-D model
    moving_segmentation: Any = None  # carried onto the fixed volume when the results are imported

    @property
    def output_dir(self) -> Path:
        return self.folder / "output"


def _model_slice_plane(image: sitk.Image, model_dim: int | None, what: str, several_slices_advice: str,
                       ) -> SlicePlane | None:
    """The slice plane of ``image`` for a 2-D model (it must be a single slice), ``None`` otherwise (a 3-D model
    refuses a single slice); the message names ``what`` (e.g. "volume 'fixed'")."""
    plane = SlicePlane.of(image)
    if model_dim == 2 and plane is None:
        raise ValueError(f"The model is a 2-D model but {what} has {image.GetSize()[2]} slices: choose a 3-D model, "
                         f"or {several_slices_advice}")
    if model_dim == 3 and plane is not None:
        raise ValueError(f"The model is a 3-D model but {what} is a single slice: choose a 2-D model "
                         "(e.g. prostate-2d).")
    return plane if model_dim == 2 else None


def write_volume_inputs(folder: Path, fixed_node, moving_node, fixed_segmentation=None,
                        moving_segmentation=None, model_dim: int | None = None,
                        ) -> tuple[dict[str, Path], SlicePlane | None]:
    """Write the nodes as the worker's input files (NIfTI, LPS); segmentations as label maps on their volume's grid
    (a value per segment).

    With a 2-D model (``model_dim`` 2) a single-slice fixed volume and a parallel single-slice moving volume are
    written as 2-D images in the fixed slice's frame (returned, to bring the results back); a thicker volume is
    refused with the slice to use. With a 3-D model a single slice is refused.
    """
    from AgentRegistrationLib.data.inputs import check_image

    if fixed_node is None or moving_node is None:
        raise ValueError("Select both a fixed and a moving volume.")
    if fixed_node is moving_node:
        raise ValueError("The fixed and the moving volume are the same node; select two volumes.")
    images = {"fixed": sitk_from_volume_node(fixed_node), "moving": sitk_from_volume_node(moving_node)}
    for key, segmentation, reference in (("fixed_label", fixed_segmentation, fixed_node),
                                         ("moving_label", moving_segmentation, moving_node)):
        if segmentation is not None:
            images[key] = segmentation_to_labelmap_sitk(segmentation, reference)
    middle = images["fixed"].GetSize()[-1] // 2
    plane = _model_slice_plane(images["fixed"], model_dim, f"volume {fixed_node.GetName()!r}",
                               f"register one slice: make a single-slice volume of it (e.g. slice {middle}, its middle "
                               "one, with the Crop Volume module) and of the moving volume.")
    if plane is not None:
        nodes = {"fixed": fixed_node, "moving": moving_node, "fixed_label": fixed_segmentation,
                 "moving_label": moving_segmentation}
        images = {key: plane.to_2d(image, f"volume {nodes[key].GetName()!r}") for key, image in images.items()}
        plane = plane.with_moving(sitk_from_volume_node(moving_node))
    for key in ("fixed", "moving"):
        check_image(images[key], f"{key} volume", repr((fixed_node if key == "fixed" else moving_node).GetName()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / f"{key}.nii.gz" for key in images}
    for key, image in images.items():
        sitk.WriteImage(image, str(paths[key]))
    return paths, plane


def start_registration(python: str, engine_dir: str | Path, fixed_node, moving_node, model: str | Path, *,
                       fixed_segmentation=None, moving_segmentation=None, fixed_point=None,
                       temporary_root: str | Path | None = None, keep_temporary_files: bool = False,
                       name: str | None = None, **options: Any) -> RegistrationJob:
    """Check the inputs, write them to a time-stamped temporary folder and start ``agentreg register``.

    ``fixed_point``: a markups node whose first point (on the fixed volume) places the prostate for a model that
    crops on it (``--fixed-point``, converted to LPS). ``options`` are those of :func:`worker_commands.register_command`
    (device, steps, seed, fuzzy_action_control, fuzzy_k, save_steps). The folder is removed again if the worker
    cannot be started.
    """
    model = Path(model)
    if not model.is_file():
        raise ValueError(f"Model bundle not found: {model}. Pick a listed model or a .pt file.")
    model_dim = worker_commands.model_header(model)["dim"]
    point = markups_point_lps(fixed_point) if fixed_point is not None else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if temporary_root is not None:
        Path(temporary_root).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"AgentRegistration-{stamp}-", dir=temporary_root))
    try:
        inputs, plane = write_volume_inputs(folder, fixed_node, moving_node, fixed_segmentation, moving_segmentation,
                                            model_dim)
        if point is not None and plane is not None:
            point = plane.point_2d(point)
        command = worker_commands.register_command(python, inputs.pop("fixed"), inputs.pop("moving"), model,
                                            folder / "output", **inputs, fixed_point=point, **options)
        job = jobs.WorkerJob([command], env=jobs.worker_environment(engine_dir), folder=folder,
                                 keep_folder=keep_temporary_files).start()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    scene = fixed_node.GetScene()
    if name is None:
        name = scene.GenerateUniqueName(f"{moving_node.GetName()} to {fixed_node.GetName()}")
    return RegistrationJob(job, folder, fixed_node, moving_node, name, plane, moving_segmentation)


def finish_registration(registration: RegistrationJob, sequences_logic: Any = None,
                        **output_nodes: Any) -> RegistrationResultNodes:
    """Once the worker has ended: the result nodes (all or nothing), the moving segmentation given at the start
    carried onto the fixed volume among them; the temporary folder is removed unless kept. ``output_nodes``: the
    nodes to fill in place (:func:`import_register_results`).

    Raises ``RuntimeError`` with the worker's error text when it failed or was cancelled.
    """
    job = registration.job
    try:
        if job.cancelled:
            raise RuntimeError("the registration was cancelled")
        if not job.succeeded:
            raise RuntimeError(job.error or f"the worker exited with status {job.worker.returncode}")
        return import_register_results(registration.output_dir, registration.fixed_node.GetScene(),
                                       registration.fixed_node, registration.moving_node, registration.name,
                                       sequences_logic, plane=registration.plane,
                                       moving_segmentation=registration.moving_segmentation, **output_nodes)
    finally:
        job.cleanup()


def summary_text(metrics: dict) -> str:
    """One line for the status label after a registration."""
    text = f"Done: {metrics['steps']} agent steps in {metrics['seconds_total']:.1f} s"
    if "dice_after" in metrics:
        text += f"; {register_folder.dice_text(metrics)}"
    notes = register_folder.metrics_notes(metrics, slicer=True)
    return text + "." + "".join(f" {note[0].upper()}{note[1:]}." for note in notes)


def load_volume_pair(files: dict[str, Path], scene: slicer.vtkMRMLScene, prefix: str = "") -> dict[str, Any]:
    """Volumes ``fixed``/``moving`` and segmentations ``fixed_label``/``moving_label`` (those given) as nodes,
    named after their files (e.g. the shipped sample pair of :func:`layout.sample_data_files`)."""
    nodes: dict[str, Any] = {}
    for key in ("fixed", "moving"):
        path = Path(files[key])
        nodes[key] = volume_node_from_sitk(sitk.ReadImage(str(path)), scene, prefix + path.name.split(".")[0])
    for key, volume in (("fixed_label", "fixed"), ("moving_label", "moving")):
        if files.get(key) is not None:
            path = Path(files[key])
            nodes[key] = segmentation_node_from_labelmap_sitk(
                sitk.Cast(sitk.ReadImage(str(path)) > 0, sitk.sitkUInt8), scene, prefix + path.name.split(".")[0],
                nodes[volume])
    return nodes
