"""Several patients from Slicer (atlas propagation): one ``agentreg register-many`` worker, its summary and
per-pair folders read back into a segmentation per patient and a table."""

from __future__ import annotations

import csv
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
from AgentRegistrationLib.contract import register_folder, worker_commands

from AgentRegistrationGUILib import jobs
from AgentRegistrationGUILib.nodes import (
    SlicePlane,
    segmentation_node_from_labelmap_sitk,
    segmentation_to_labelmap_sitk,
    sitk_from_volume_node,
    volume_node_from_sitk,
)
from AgentRegistrationGUILib.registration_job import _model_slice_plane
from AgentRegistrationGUILib.result_nodes import _new_nodes_since, table_node_from_columns

# --------------------------------------------------------------------------- several patients (atlas propagation)
# The moving volume and its segmentation are the atlas; each patient (a fixed volume node, or an image file of a
# folder) gets the atlas's segmentation warped onto it by one ``agentreg register-many`` worker (one model load, the
# agent batched), whose summary and per-pair folders are read back into a segmentation per patient and a table.


@dataclass
class CohortJob:
    """A running ``agentreg register-many`` worker that propagates an atlas onto several patients."""

    job: jobs.WorkerJob
    folder: Path
    atlas_node: slicer.vtkMRMLScalarVolumeNode
    atlas_segmentation: slicer.vtkMRMLNode | None
    patients: dict[str, Any]  # pair name -> its fixed volume node (``None``: an image file of the patients folder)
    planes: dict[str, SlicePlane] = field(default_factory=dict)  # pair name -> slice (a 2-D model on single slices)
    name: str = "atlas"

    @property
    def output_dir(self) -> Path:
        return self.folder / "output"


@dataclass
class CohortResultNodes:
    """The nodes made from one ``agentreg register-many`` run: by pair (patient) name, the propagated segmentation
    and, for an image file of a folder, the patient's volume; the run's summary as a table and as rows."""

    segmentations: dict[str, slicer.vtkMRMLSegmentationNode]
    volumes: dict[str, slicer.vtkMRMLScalarVolumeNode]
    summary_table: slicer.vtkMRMLTableNode
    rows: list[dict[str, str]]

    def all_nodes(self) -> list:
        return [*self.volumes.values(), *self.segmentations.values(), self.summary_table]


def _file_name(name: str, taken: set[str]) -> str:
    """``name`` as a folder name that ``register-many`` accepts, unique among ``taken`` (which it joins)."""
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "patient"
    unique, n = base, 1
    while unique in taken:
        n += 1
        unique = f"{base}_{n}"
    taken.add(unique)
    return unique


def write_cohort_inputs(folder: Path, atlas_node, atlas_segmentation, fixed_nodes: Sequence,
                        fixed_segmentations: Sequence | None = None, model_dim: int | None = None,
                        ) -> tuple[Path, dict[str, Any], dict[str, SlicePlane]]:
    """Write the atlas and each fixed volume node (and its segmentation, where given: Dice and distances) as the
    files of a CSV of pairs for ``register-many``; returns the CSV, the fixed node of each pair name and, with a
    2-D model on single-slice volumes, the slice of each pair (the atlas written in each patient's slice frame)."""
    from AgentRegistrationLib.data.inputs import check_image

    if atlas_node is None:
        raise ValueError("Select the atlas: the moving volume (with its segmentation, to propagate).")
    fixed_nodes = [n for n in fixed_nodes if n is not None]
    if not fixed_nodes:
        raise ValueError("Select the patients: several fixed volumes, or a folder of images.")
    if any(n is atlas_node for n in fixed_nodes):
        raise ValueError(f"Volume {atlas_node.GetName()!r} is the atlas and one of the patients; leave it out of "
                         "the patients.")
    fixed_segmentations = list(fixed_segmentations or [None] * len(fixed_nodes))
    if len(fixed_segmentations) != len(fixed_nodes):
        raise ValueError(f"{len(fixed_segmentations)} segmentations for {len(fixed_nodes)} patients: give one per "
                         "patient (None where there is none)")
    folder.mkdir(parents=True, exist_ok=True)
    atlas = sitk_from_volume_node(atlas_node)
    atlas_label = segmentation_to_labelmap_sitk(atlas_segmentation, atlas_node) if atlas_segmentation else None
    shared: dict[str, Path] = {}
    if model_dim != 2:  # a 2-D model: the atlas is written in each patient's slice frame below
        _model_slice_plane(atlas, model_dim, f"the atlas {atlas_node.GetName()!r}", "")
        check_image(atlas, "atlas volume", repr(atlas_node.GetName()))
        shared["moving"] = folder / "atlas.nii.gz"
        sitk.WriteImage(atlas, str(shared["moving"]))
        if atlas_label is not None:
            shared["moving_label"] = folder / "atlas_label.nii.gz"
            sitk.WriteImage(atlas_label, str(shared["moving_label"]))
    rows, patients, planes, taken = [], {}, {}, set()
    for node, segmentation in zip(fixed_nodes, fixed_segmentations, strict=True):
        name = _file_name(node.GetName(), taken)
        images = {"fixed": sitk_from_volume_node(node)}
        if segmentation is not None:
            images["fixed_label"] = segmentation_to_labelmap_sitk(segmentation, node)
        plane = _model_slice_plane(images["fixed"], model_dim, f"volume {node.GetName()!r}", "single-slice volumes.")
        if plane is not None:
            images["moving"] = atlas
            if atlas_label is not None:
                images["moving_label"] = atlas_label
            images = {key: plane.to_2d(image, f"volume {(atlas_node if 'moving' in key else node).GetName()!r}")
                      for key, image in images.items()}
            planes[name] = plane.with_moving(atlas)
        check_image(images["fixed"], "fixed volume", repr(node.GetName()))
        row = {"name": name, **shared}
        for key, image in images.items():
            row[key] = folder / f"{name}_{key}.nii.gz"
            sitk.WriteImage(image, str(row[key]))
        rows.append(row)
        patients[name] = node
    pairs = folder / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["name", "fixed", "moving", "fixed_label", "moving_label"])
        writer.writeheader()
        writer.writerows(rows)
    return pairs, patients, planes


def write_atlas(folder: Path, atlas_node, atlas_segmentation, model_dim: int | None = None,
                ) -> tuple[Path, Path | None]:
    """The atlas volume (and its segmentation as a label map) as files for ``register-many --atlas``; a single
    slice for a 2-D model is written as a 2-D image in its own slice frame (the patients' files being 2-D)."""
    from AgentRegistrationLib.data.inputs import check_image

    if atlas_node is None:
        raise ValueError("Select the atlas: the moving volume (with its segmentation, to propagate).")
    images = {"atlas": sitk_from_volume_node(atlas_node)}
    if atlas_segmentation is not None:
        images["atlas_label"] = segmentation_to_labelmap_sitk(atlas_segmentation, atlas_node)
    plane = _model_slice_plane(images["atlas"], model_dim, f"the atlas {atlas_node.GetName()!r}",
                               "a single-slice atlas.")
    if plane is not None:
        images = {key: plane.to_2d(image, f"atlas {atlas_node.GetName()!r}") for key, image in images.items()}
    check_image(images["atlas"], "atlas volume", repr(atlas_node.GetName()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / f"{key}.nii.gz" for key in images}
    for key, image in images.items():
        sitk.WriteImage(image, str(paths[key]))
    return paths["atlas"], paths.get("atlas_label")


def start_cohort_registration(python: str, engine_dir: str | Path, atlas_node, model: str | Path, *,
                              atlas_segmentation=None, fixed_nodes: Sequence = (),
                              fixed_segmentations: Sequence | None = None, patients_folder: str | Path | None = None,
                              temporary_root: str | Path | None = None, keep_temporary_files: bool = False,
                              name: str | None = None, **options: Any) -> CohortJob:
    """Check the inputs, write them to a time-stamped temporary folder and start ``agentreg register-many``: the
    atlas (``atlas_node`` and ``atlas_segmentation``) onto each of ``fixed_nodes`` (a CSV of pairs), or onto every
    image of ``patients_folder`` (``<name>.<ext>`` or ``<name>_image.<ext>``, a ``<name>_label.<ext>`` beside one
    giving Dice). ``options``: those of :func:`worker_commands.register_many_command` (device, steps, seed,
    fuzzy_action_control, fuzzy_k, workers, batch_size). The folder is removed again if the worker cannot start."""
    model = Path(model)
    if not model.is_file():
        raise ValueError(f"Model bundle not found: {model}. Pick a listed model or a .pt file.")
    if patients_folder and fixed_nodes:
        raise ValueError("Give either a folder of patients or patient volumes, not both.")
    if patients_folder is not None and not str(patients_folder).strip():
        patients_folder = None
    if patients_folder is not None and not Path(patients_folder).is_dir():
        raise ValueError(f"Folder of patients not found: {patients_folder}")
    model_dim = worker_commands.model_header(model)["dim"]
    patients: dict[str, Any] = {}
    if patients_folder is not None:
        from AgentRegistrationLib.stages.cohort_pairs import patient_images

        patients = {patient: None for patient, _, _ in patient_images(patients_folder)}
    # one process reads and writes while the agent runs; from 4 patients on, two (each loads torch: memory)
    options.setdefault("workers", 1 if len(patients or fixed_nodes) < 4 else 2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if temporary_root is not None:
        Path(temporary_root).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"AgentRegistration-cohort-{stamp}-", dir=temporary_root))
    try:
        planes: dict[str, SlicePlane] = {}
        if patients_folder is not None:
            atlas, atlas_label = write_atlas(folder / "inputs", atlas_node, atlas_segmentation, model_dim)
            command = worker_commands.register_many_command(python, model, folder / "output", atlas=atlas,
                                                     atlas_label=atlas_label, patients=Path(patients_folder), **options)
        else:
            pairs, patients, planes = write_cohort_inputs(folder / "inputs", atlas_node, atlas_segmentation,
                                                          list(fixed_nodes), fixed_segmentations, model_dim)
            command = worker_commands.register_many_command(python, model, folder / "output", pairs=pairs, **options)
        job = jobs.WorkerJob([command], env=jobs.worker_environment(engine_dir), folder=folder,
                                 keep_folder=keep_temporary_files).start()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return CohortJob(job, folder, atlas_node, atlas_segmentation, patients, planes, name or atlas_node.GetName())


def _name_segments_like(target: slicer.vtkMRMLSegmentationNode, source: slicer.vtkMRMLNode | None) -> None:
    """Segment names and colours of ``target`` (imported from a label image of values 1..n) from ``source``'s visible
    segments, in the order they were exported (value i + 1 for the i-th)."""
    if source is None or not source.IsA("vtkMRMLSegmentationNode"):
        return
    display = source.GetDisplayNode()
    segmentation = source.GetSegmentation()
    visible = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
               if display is None or display.GetSegmentVisibility(segmentation.GetNthSegmentID(i))]
    segments = target.GetSegmentation()
    for i in range(segments.GetNumberOfSegments()):
        segment = segments.GetNthSegment(i)
        value = int(segment.GetLabelValue()) if hasattr(segment, "GetLabelValue") else i + 1
        if 1 <= value <= len(visible):
            original = segmentation.GetSegment(visible[value - 1])
            segment.SetName(original.GetName())
            segment.SetColor(original.GetColor())


def import_cohort_results(output_dir: str | Path, scene: slicer.vtkMRMLScene, patients: dict[str, Any],
                          name: str = "atlas", planes: dict[str, SlicePlane] | None = None,
                          atlas_segmentation: slicer.vtkMRMLNode | None = None) -> CohortResultNodes:
    """Make the nodes of a ``register-many`` run from the folder it wrote: for each pair of ``patients`` (pair name
    -> its fixed volume node, or ``None`` for an image file, then loaded as a volume from the summary's ``fixed``
    column) that has a warped label, a segmentation on the patient's volume (named like the atlas's segments), and
    the summary as a table node (every column of summary.csv, failed pairs included). All or nothing: if anything
    fails, every node created here is removed again."""
    output_dir = Path(output_dir)
    planes = planes or {}
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        summary = output_dir / register_folder.COHORT_SUMMARY_CSV
        if not summary.is_file():
            raise ValueError(f"the run wrote no {register_folder.COHORT_SUMMARY_CSV} in {output_dir}")
        rows = [row for row in register_folder.read_cohort_summary(summary) if row.get("pair") in patients]
        volumes, segmentations = {}, {}
        for row in rows:
            pair = row["pair"]
            label_file = output_dir / pair / register_folder.WARPED_LABEL
            if row.get("status") not in register_folder.COHORT_DONE or not label_file.is_file():
                continue
            reference = patients[pair]
            if reference is None:
                reference = volumes[pair] = volume_node_from_sitk(sitk.ReadImage(row["fixed"]), scene, pair)
            label = sitk.ReadImage(str(label_file))
            if pair in planes:
                label = planes[pair].to_3d(label)
            segmentations[pair] = segmentation_node_from_labelmap_sitk(
                sitk.Cast(label, sitk.sitkUInt8), scene, scene.GenerateUniqueName(f"{name} on {reference.GetName()}"),
                reference)
            _name_segments_like(segmentations[pair], atlas_segmentation)
        columns = {column: [row.get(column, "") for row in rows] for column in (rows[0] if rows else ["pair"])}
        table = table_node_from_columns(columns, scene, scene.GenerateUniqueName(f"{name} on patients: summary"))
        return CohortResultNodes(segmentations, volumes, table, rows)
    except BaseException:
        for node in reversed(_new_nodes_since(scene, before)):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise


def finish_cohort_registration(cohort: CohortJob) -> CohortResultNodes:
    """Once the worker has ended: the result nodes (all or nothing); the temporary folder is removed unless kept.
    Raises ``RuntimeError`` with the worker's error text when it failed or was cancelled."""
    job = cohort.job
    try:
        if job.cancelled:
            raise RuntimeError("the registration of the patients was cancelled")
        if not job.succeeded:
            raise RuntimeError(job.error or f"the worker exited with status {job.worker.returncode}")
        return import_cohort_results(cohort.output_dir, cohort.atlas_node.GetScene(), cohort.patients, cohort.name,
                                     cohort.planes, cohort.atlas_segmentation)
    finally:
        job.cleanup()


def cohort_summary_text(result: CohortResultNodes) -> str:
    """One line for the status label after a run on several patients."""
    failed = [row["pair"] for row in result.rows if row.get("status") not in register_folder.COHORT_DONE]
    dice = [float(row["dice_after"]) for row in result.rows if row.get("dice_after")]
    text = f"Done: {len(result.segmentations)} of {len(result.rows)} patients segmented"
    if dice:
        text += f"; Dice after median {float(np.median(dice)):.3f} on the {len(dice)} with a segmentation"
    if failed:
        text += f"; failed: {', '.join(failed)} (see the summary table)"
    return text + "."
