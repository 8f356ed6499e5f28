"""Several patients in Slicer (atlas propagation), tested on a real MRML scene (slicer-core).

The module's route (``cohort_job.start_cohort_registration`` / ``finish_cohort_registration``) runs the REAL
``agentreg register-many`` worker with the shipped 2-D model (a few agent steps) on real PROMISE12 slices: the atlas
is a single-slice volume with its segmentation, the patients either single-slice volume nodes (a CSV of pairs) or
image files of a folder (``--atlas`` / ``--patients``). The nodes made are checked against the files the worker
really wrote: the propagated segmentations voxel for voxel against its warped labels, the summary table against its
summary.csv. These tests check the glue, not accuracy.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationGUILib import cohort_job, nodes
from AgentRegistrationLib.contract import layout, messages, register_folder, worker_commands

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is needed for the glue tests")


ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "AgentRegistration" / "AgentRegistration.py"
MODEL = ROOT / "Resources" / "Models" / "prostate-2d.pt"
STEPS = 3
ATLAS, PATIENT_LABELLED, PATIENT_UNLABELLED = "13", "19", "22"

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason="the shipped 2-D model is missing")


def _slices(native_slice) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    """The slice through the prostate of the atlas and of the two patients, each in its own 2-D geometry."""
    return {ATLAS: native_slice(ATLAS, None, (12.5, -30.0), (0.6, 0.6)),
            PATIENT_LABELLED: native_slice(PATIENT_LABELLED, None, (16.0, -33.0), (0.58, 0.62)),
            PATIENT_UNLABELLED: native_slice(PATIENT_UNLABELLED, None, (-4.0, 10.0), (0.65, 0.6))}


def _atlas_nodes(scene, slices):
    atlas_image, atlas_label = slices[ATLAS]
    atlas = nodes.volume_node_from_sitk(atlas_image, scene, "atlas")
    segmentation = nodes.segmentation_node_from_labelmap_sitk(sitk.Cast(atlas_label > 0, sitk.sitkUInt8), scene,
                                                             "atlas segmentation", atlas)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("prostate")
    return atlas, segmentation


def _run(cohort: cohort_job.CohortJob) -> dict:
    received = cohort.job.wait(timeout=600)
    assert cohort.job.succeeded, cohort.job.error
    output = cohort.folder / "kept_output"
    shutil.copytree(cohort.output_dir, output)  # finish removes the folder; keep what the worker wrote
    return {"messages": received, "output": output, "result": cohort_job.finish_cohort_registration(cohort)}


@pytest.fixture(scope="module")
def node_run(native_slice, tmp_path_factory, mrml_scene):
    """The atlas onto two patient volume nodes (one with a segmentation), as the module starts it."""
    slices = _slices(native_slice)
    with mrml_scene() as scene:
        atlas, atlas_segmentation = _atlas_nodes(scene, slices)
        patients = {case: nodes.volume_node_from_sitk(slices[case][0], scene, f"patient {case}")
                    for case in (PATIENT_LABELLED, PATIENT_UNLABELLED)}
        patient_segmentation = nodes.segmentation_node_from_labelmap_sitk(
            sitk.Cast(slices[PATIENT_LABELLED][1] > 0, sitk.sitkUInt8), scene, "patient segmentation",
            patients[PATIENT_LABELLED])
        before = scene.GetNumberOfNodes()
        cohort = cohort_job.start_cohort_registration(
            sys.executable, layout.engine_dir(MODULE_FILE), atlas, MODEL, atlas_segmentation=atlas_segmentation,
            fixed_nodes=list(patients.values()), fixed_segmentations=[patient_segmentation, None],
            temporary_root=tmp_path_factory.mktemp("cohort_nodes"), keep_temporary_files=True, device="CPU",
            steps=STEPS)
        run = _run(cohort)
        yield {"scene": scene, "patients": patients, "cohort": cohort, "nodes_before": before, **run}


@pytest.fixture(scope="module")
def folder_run(native_slice, tmp_path_factory, mrml_scene):
    """The atlas onto a folder of two patient files (NIfTI with a label, NRRD without)."""
    slices = _slices(native_slice)
    folder = tmp_path_factory.mktemp("patients")
    files = {PATIENT_LABELLED: folder / f"case{PATIENT_LABELLED}.nii.gz",
             PATIENT_UNLABELLED: folder / f"case{PATIENT_UNLABELLED}_image.nrrd"}
    for case, path in files.items():
        sitk.WriteImage(slices[case][0], str(path))
    sitk.WriteImage(slices[PATIENT_LABELLED][1], str(folder / f"case{PATIENT_LABELLED}_label.nii.gz"))
    with mrml_scene() as scene:
        atlas, atlas_segmentation = _atlas_nodes(scene, slices)
        cohort = cohort_job.start_cohort_registration(
            sys.executable, layout.engine_dir(MODULE_FILE), atlas, MODEL, atlas_segmentation=atlas_segmentation,
            patients_folder=folder, temporary_root=tmp_path_factory.mktemp("cohort_folder"),
            keep_temporary_files=True, device="CPU", steps=STEPS)
        run = _run(cohort)
        yield {"scene": scene, "files": files, "cohort": cohort, **run}


def _summary(output: Path) -> list[dict[str, str]]:
    with (output / register_folder.COHORT_SUMMARY_CSV).open(newline="") as f:
        return list(csv.DictReader(f))


def _labelmap(segmentation_node, volume_node) -> np.ndarray:
    return sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(segmentation_node, volume_node))


def _table(table_node) -> dict[str, list[str]]:
    table = table_node.GetTable()
    return {table.GetColumn(c).GetName(): [table.GetValue(r, c).ToString() for r in range(table.GetNumberOfRows())]
            for c in range(table.GetNumberOfColumns())}


# ----------------------------------------------------------------------------- command line


def test_register_many_command_of_an_atlas_and_a_folder():
    command = worker_commands.register_many_command("py", Path("m.pt"), Path("out"), atlas=Path("a.nii.gz"),
                                             atlas_label=Path("al.nii.gz"), patients=Path("p"), device="CPU", steps=5,
                                             fuzzy_action_control=False, workers=0)
    assert command[:4] == ["py", "-m", "AgentRegistrationLib.cli", "register-many"]
    text = " ".join(command)
    for part in ("--model m.pt", "--output-dir out", "--atlas a.nii.gz", "--atlas-label al.nii.gz", "--patients p",
                 "--device cpu", "--steps 5", "--no-fuzzy", "--workers 0", "--progress-json"):
        assert part in text
    assert "--pairs" not in text and "--batch-size" not in text and "--fuzzy-k" not in text


def test_register_many_command_needs_pairs_or_an_atlas_with_patients():
    with pytest.raises(ValueError, match="either a CSV of pairs or an atlas"):
        worker_commands.register_many_command("py", Path("m.pt"), Path("o"))
    with pytest.raises(ValueError, match="either a CSV of pairs or an atlas"):
        worker_commands.register_many_command("py", Path("m.pt"), Path("o"), pairs=Path("p.csv"), atlas=Path("a"))
    with pytest.raises(ValueError, match="folder of patients"):
        worker_commands.register_many_command("py", Path("m.pt"), Path("o"), atlas=Path("a"))


# ----------------------------------------------------------------------------- patients as volume nodes


def test_every_progress_line_of_the_real_worker_renders_and_counts_the_patients(node_run):
    progress = [m for m in node_run["messages"] if m["stage"] == "register"]
    assert progress and all(messages.progress_text(m) for m in progress)
    assert progress[-1]["done"] == progress[-1]["total"] == 2
    assert node_run["messages"][-1]["stage"] == messages.STAGE_DONE


def test_each_patient_volume_gets_the_warped_atlas_segmentation_the_worker_wrote(node_run):
    result, output = node_run["result"], node_run["output"]
    names = {row["pair"]: row for row in _summary(output)}
    assert set(result.segmentations) == set(names) == set(node_run["cohort"].patients)
    assert result.volumes == {}  # the patients were nodes already
    for pair, segmentation in result.segmentations.items():
        volume = node_run["cohort"].patients[pair]
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(output / pair / register_folder.WARPED_LABEL)))
        ours = _labelmap(segmentation, volume)
        assert ours.shape == (1, *written.shape)  # the 2-D result back on the patient's single slice
        assert np.array_equal(ours[0] > 0, written > 0) and written.any()
        assert segmentation.GetSegmentation().GetNthSegment(0).GetName() == "prostate"  # the atlas's segment
        assert segmentation.GetName() == f"atlas on {volume.GetName()}"


def test_summary_table_holds_the_rows_of_summary_csv(node_run):
    rows = _summary(node_run["output"])
    table = _table(node_run["result"].summary_table)
    assert list(table) == list(rows[0])
    for column, values in table.items():
        assert values == [row[column] for row in rows], column
    by_pair = {row["pair"]: row for row in rows}
    labelled = by_pair["patient_" + PATIENT_LABELLED]
    assert labelled["status"] == "registered" and labelled["dice_after"]
    metrics = register_folder.read_metrics(node_run["output"] / labelled["pair"] / register_folder.METRICS_JSON)
    assert float(labelled["dice_after"]) == pytest.approx(metrics["dice_after"], abs=5e-5)
    assert by_pair["patient_" + PATIENT_UNLABELLED]["dice_after"] == ""  # no segmentation: no Dice
    assert "patients segmented" in cohort_job.cohort_summary_text(node_run["result"])


def test_the_scene_gains_only_the_result_nodes(node_run):
    scene, result = node_run["scene"], node_run["result"]
    added = [scene.GetNthNode(i) for i in range(node_run["nodes_before"], scene.GetNumberOfNodes())]
    kinds = {n.GetClassName() for n in added if not any(n.IsA(f"vtkMRML{kind}Node") for kind in ("Display", "Storage",
                                                                                                  "Color"))}
    assert kinds == {"vtkMRMLSegmentationNode", "vtkMRMLTableNode"}
    assert all(scene.IsNodePresent(n) for n in result.all_nodes())


def test_a_broken_output_folder_leaves_the_scene_as_it_was(node_run, tmp_path):
    broken = tmp_path / "output"
    shutil.copytree(node_run["output"], broken)
    pair = next(iter(node_run["result"].segmentations))
    (broken / pair / register_folder.WARPED_LABEL).write_bytes(b"not an image")
    scene = node_run["scene"]
    before = scene.GetNumberOfNodes()
    cohort = node_run["cohort"]
    with pytest.raises(RuntimeError):
        cohort_job.import_cohort_results(broken, scene, cohort.patients, planes=cohort.planes)
    assert scene.GetNumberOfNodes() == before


def test_a_3d_model_refuses_single_slice_patients_before_a_worker_starts(native_slice, tmp_path, mrml_scene):
    slices = _slices(native_slice)
    with mrml_scene() as scene:
        atlas, segmentation = _atlas_nodes(scene, slices)
        patient = nodes.volume_node_from_sitk(slices[PATIENT_LABELLED][0], scene, "patient")
        with pytest.raises(ValueError, match="single slice"):
            cohort_job.start_cohort_registration(sys.executable, layout.engine_dir(MODULE_FILE), atlas,
                                           ROOT / "Resources" / "Models" / "prostate-3d.pt",
                                           atlas_segmentation=segmentation, fixed_nodes=[patient],
                                           temporary_root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


# ----------------------------------------------------------------------------- patients as a folder of files


def test_folder_patients_are_loaded_with_their_propagated_segmentations(folder_run):
    result, output = folder_run["result"], folder_run["output"]
    expected = {f"case{case}" for case in folder_run["files"]}
    assert set(result.volumes) == set(result.segmentations) == expected
    for case, path in folder_run["files"].items():
        pair = f"case{case}"
        image = sitk.ReadImage(str(path))
        volume = nodes.sitk_from_volume_node(result.volumes[pair])
        assert np.array_equal(sitk.GetArrayFromImage(volume)[0], sitk.GetArrayFromImage(image))
        assert np.allclose(volume.GetOrigin()[:2], image.GetOrigin()) and np.allclose(volume.GetSpacing()[:2],
                                                                                        image.GetSpacing())
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(output / pair / register_folder.WARPED_LABEL)))
        assert np.array_equal(_labelmap(result.segmentations[pair], result.volumes[pair])[0] > 0, written > 0)
        assert written.any()


def test_folder_summary_has_dice_where_the_folder_has_a_label(folder_run):
    rows = {row["pair"]: row for row in _summary(folder_run["output"])}
    assert rows[f"case{PATIENT_LABELLED}"]["dice_after"] and not rows[f"case{PATIENT_UNLABELLED}"]["dice_after"]
    assert _table(folder_run["result"].summary_table)["pair"] == list(rows)
