"""Labels kept apart (issue 15): a PROMISE12 prostate mask split in two at its centroid row (value 1 above, 2 below)
gives a real two-label map. Corresponding points are placed label to label, the ground truth and ``agentreg register``
report Dice (and Hausdorff) per label beside the union's, the Slicer table shows them, and propagation keeps every
label value."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationGUILib import nodes, result_nodes
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.contract import register_folder
from AgentRegistrationLib.contract.paths import repo_file
from AgentRegistrationLib.core.bspline import bspline_field
from AgentRegistrationLib.core.metrics import dice, label_values, per_label, surface_distances
from AgentRegistrationLib.core.warp import warp_label
from AgentRegistrationLib.elastix.constrained import corresponding_points, ray_directions, surface_points
from AgentRegistrationLib.stages.evaluation_pairs import pair_dir
from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary, load_pair

SLICE = 16  # the middle slice of the grid128 volumes (32 slices)


def two_labels(label: sitk.Image) -> sitk.Image:
    """``label`` with its mask split at the mask's centroid row: 1 above, 2 from that row on (same geometry)."""
    arr = sitk.GetArrayFromImage(label).astype(np.uint8)
    cut = int(round(np.nonzero(arr)[-2].mean()))
    lower = arr[..., cut:, :]
    lower[lower > 0] = 2
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    return out


@pytest.fixture(scope="module")
def slices(grid128, tmp_path_factory):
    """Middle slices of four subjects, each with its two-label mask, as a user's 2-D data folder."""
    folder = tmp_path_factory.mktemp("two_labels")
    for case in ("case00", "case04", "case06", "case02"):
        image = sitk.ReadImage(str(grid128 / f"{case}_image.nii.gz"))[:, :, SLICE]
        label = sitk.ReadImage(str(grid128 / f"{case}_label.nii.gz"))[:, :, SLICE]
        sitk.WriteImage(image, str(folder / f"{case}_image.nii.gz"))
        sitk.WriteImage(two_labels(label), str(folder / f"{case}_label.nii.gz"))
    return folder


def _read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_two_labels_split_a_real_mask():
    mask = np.zeros((1, 40, 40), np.uint8)
    mask[0, 10:30, 12:28] = 1
    split = sitk.GetArrayFromImage(two_labels(sitk.GetImageFromArray(mask)))
    assert label_values(split) == [1, 2]
    assert np.array_equal(split > 0, mask > 0)


def test_corresponding_points_of_one_label_are_the_union_as_before(slices):
    fixed, moving = (_read(slices / f"{c}_label.nii.gz") for c in ("case00", "case04"))
    directions = ray_directions(2, 64)
    union = corresponding_points(fixed > 0, moving > 0, directions)
    assert np.array_equal(union[0], surface_points(fixed > 0, directions))
    assert np.array_equal(union[1], surface_points(moving > 0, directions))


def test_corresponding_points_are_matched_label_to_label(slices):
    fixed, moving = (_read(slices / f"{c}_label.nii.gz") for c in ("case00", "case04"))
    fixed_points, moving_points = corresponding_points(fixed, moving, ray_directions(2, 64))
    assert fixed_points.shape == moving_points.shape == (128, 2)  # 64 rays per label
    for label, points in ((fixed, fixed_points), (moving, moving_points)):
        voxels = np.rint(points).astype(int)  # ITK order (x, y): the last sample inside each label
        values = label[voxels[:, 1], voxels[:, 0]]
        assert np.array_equal(values, np.repeat([1, 2], 64))


def test_per_label_metrics_of_one_label_are_none():
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 1
    assert per_label(mask, np.roll(mask, 2, axis=0)) == {}


def test_check_metrics_accepts_per_label_keys_only_by_their_pattern():
    good = {"steps": 3, "jacobian_folding_percent": 0.0, "log_jacobian_std": 0.1, "seconds_total": 1.0,
            "seconds_agent": 0.5, "dice_after": 0.8, "dice_after_label_2": 0.7, "hausdorff_none_label_12": 3.0}
    assert register_folder.check_metrics(good) is good
    for wrong in ("dice_later_label_1", "dice_after_label_0", "hausdorff95_after_label_1", "dice_after_label_x"):
        with pytest.raises(ValueError, match="unknown keys"):
            register_folder.check_metrics({**good, wrong: 0.5})


@pytest.fixture(scope="module")
def two_label_groundtruth(slices, tmp_path_factory):
    out = tmp_path_factory.mktemp("gt") / "gt"
    code = main(["groundtruth", str(slices), "--subjects", "case00,case04,case06", "--dim", "2", "--max-pairs", "3",
                     "--geometry", "paper", "--crop", "organ", "--iterations", "20", "--resolutions", "1",
                     "--workers", "1", "--out", str(out)])
    assert code == 0
    return out


def test_groundtruth_keeps_the_labels_of_the_subjects_apart(two_label_groundtruth):
    for case in ("case00", "case04", "case06"):
        with np.load(two_label_groundtruth / "subjects" / f"{case}.npz") as z:
            assert label_values(z["label"]) == [1, 2]


def test_groundtruth_reports_dice_per_label(two_label_groundtruth):
    summary = GroundTruthSummary.load(two_label_groundtruth)
    assert summary.metric == "points"  # the paper's, with the paper's geometry
    assert set(summary.label_dice) == {"1", "2"}
    geometry = summary.geometry
    grid = geometry.control_grid()
    bases = grid.image_bases(geometry.size)
    labels = {}
    for case in summary.subjects:
        with np.load(two_label_groundtruth / "subjects" / f"{case}.npz") as z:
            labels[case] = z["label"]
    after = {1: [], 2: []}
    for path in sorted((two_label_groundtruth / "pairs").glob("*.npz")):
        r = load_pair(path)
        warped = warp_label(labels[r.moving], bspline_field(r.coefficients, grid, bases))
        assert label_values(warped) == [1, 2]  # nearest neighbour on the label values
        for v in (1, 2):
            by_hand = (dice(labels[r.moving] == v, labels[r.fixed] == v), dice(warped == v, labels[r.fixed] == v))
            assert r.label_dice[v] == pytest.approx(by_hand)
            after[v].append(by_hand[1])
        assert r.dice_after == pytest.approx(dice(warped > 0, labels[r.fixed] > 0))
    for v in (1, 2):
        assert summary.label_dice[str(v)]["after"]["median"] == pytest.approx(float(np.median(after[v])))


@pytest.fixture(scope="module")
def registered(slices, tmp_path_factory):
    """``agentreg register`` with the shipped 2-D model, both two-label masks given, a few steps."""
    out = tmp_path_factory.mktemp("register") / "out"
    code = main(["register", "--fixed", str(slices / "case02_image.nii.gz"),
                     "--moving", str(slices / "case04_image.nii.gz"),
                     "--fixed-label", str(slices / "case02_label.nii.gz"),
                     "--moving-label", str(slices / "case04_label.nii.gz"),
                     "--model", str(repo_file("Resources", "Models", "prostate-2d.pt")), "--output-dir", str(out),
                     "--steps", "5", "--device", "cpu"])
    assert code == 0
    return {"out": out, "fixed_label": slices / "case02_label.nii.gz"}


def test_register_metrics_hold_dice_and_hausdorff_per_label_and_of_the_union(registered):
    metrics = register_folder.read_metrics(registered["out"] / register_folder.METRICS_JSON)
    warped = _read(registered["out"] / register_folder.WARPED_LABEL)
    fixed = _read(registered["fixed_label"])
    assert label_values(warped) == [1, 2]  # propagation keeps every label value
    assert metrics["dice_after"] == pytest.approx(dice(warped > 0, fixed > 0))
    for v in (1, 2):
        assert metrics[f"dice_after_label_{v}"] == pytest.approx(dice(warped == v, fixed == v))
        assert metrics[f"hausdorff_after_label_{v}"] == pytest.approx(
            surface_distances(warped == v, fixed == v)["hausdorff"])
        assert f"dice_before_label_{v}" in metrics and f"dice_none_label_{v}" in metrics
    assert json.loads((registered["out"] / register_folder.METRICS_JSON).read_text()) == metrics


def test_the_slicer_table_shows_each_label(registered):
    slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is needed for the table")

    metrics = register_folder.read_metrics(registered["out"] / register_folder.METRICS_JSON)
    scene = slicer.vtkMRMLScene()
    table = result_nodes.metrics_table_node(metrics, scene, "metrics").GetTable()
    rows = {table.GetValue(i, 0).ToString(): i for i in range(table.GetNumberOfRows())}
    assert "Dice (all labels)" in rows
    for v in (1, 2):
        row = rows[f"Dice label {v}"]
        assert table.GetValue(row, 2).ToDouble() == pytest.approx(metrics[f"dice_after_label_{v}"])
        assert table.GetValue(row, 1).ToDouble() == pytest.approx(metrics[f"dice_before_label_{v}"])
        assert f"Hausdorff (mm) label {v}" in rows


def test_a_segmentation_with_two_segments_comes_back_as_two(slices, mrml_scene):

    with mrml_scene() as scene:
        image = sitk.ReadImage(str(slices / "case04_image.nii.gz"))
        label = sitk.ReadImage(str(slices / "case04_label.nii.gz"))
        image3, label3 = (sitk.JoinSeries(x) for x in (image, label))  # one-slice volumes, as Slicer holds them
        volume = nodes.volume_node_from_sitk(image3, scene, "moving")
        segmentation = nodes.segmentation_node_from_labelmap_sitk(label3, scene, "two labels", volume)
        assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
        displacement = sitk.Image(image3.GetSize(), sitk.sitkVectorFloat64, 3)
        displacement.CopyInformation(image3)
        transform = nodes.grid_transform_node_from_displacement(displacement, scene, "identity")
        propagated = nodes.propagate_segmentation(segmentation, transform, volume, "propagated")
        assert propagated.GetSegmentation().GetNumberOfSegments() == 2
        back = sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(propagated, volume))
        assert label_values(back) == [1, 2]
        assert dice(back == 2, sitk.GetArrayFromImage(label3) == 2) > 0.99


@pytest.fixture(scope="module")
def volumes(grid128, tmp_path_factory):
    """Three subjects' volumes with two-label masks and a split naming them as the validation subjects."""
    folder = tmp_path_factory.mktemp("two_label_volumes")
    cases = ("case02", "case09", "case13")
    for case in cases:
        sitk.WriteImage(sitk.ReadImage(str(grid128 / f"{case}_image.nii.gz")), str(folder / f"{case}_image.nii.gz"))
        label = two_labels(sitk.ReadImage(str(grid128 / f"{case}_label.nii.gz")))
        sitk.WriteImage(label, str(folder / f"{case}_label.nii.gz"))
    split = folder / "split.json"
    split.write_text(json.dumps({"train": [], "validation": list(cases)}))
    return folder, split


def test_evaluate_reports_dice_and_hausdorff_per_label(volumes, tmp_path):
    data, split = volumes
    out = tmp_path / "eval"
    code = main(["evaluate", "--data", str(data), "--split", str(split), "--dim", "2", "--methods",
                     "none,localised,ours", "--steps", "2", "--workers", "1", "--device", "cpu", "--out", str(out)])
    assert code == 0
    with (out / "evaluation.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 3
    for row in rows:
        with np.load(pair_dir(out, row["moving"], row["fixed"]) / "prepared.npz") as z:
            fixed, moving = z["fixed_label"], z["unregistered_label" if row["method"] == "none" else "moving_label"]
        assert label_values(fixed) == [1, 2]
        if row["method"] == "ours":
            continue  # its warped label is not kept; its figures come from the same function
        for v in (1, 2):
            assert float(row[f"dice_label_{v}"]) == pytest.approx(dice(moving == v, fixed == v), abs=1e-6)
            if (moving == v).any():
                assert float(row[f"hausdorff_label_{v}"]) == pytest.approx(
                    surface_distances(moving == v, fixed == v)["hausdorff"], rel=1e-5)
        assert float(row["dice"]) == pytest.approx(dice(moving > 0, fixed > 0), abs=1e-6)
    report = (out / "evaluation.md").read_text()
    localised = [float(r["dice_label_2"]) for r in rows if r["method"] == "localised"]
    line = next(line for line in report.splitlines() if line.startswith("| label 2 alone: DICE Med."))
    assert line.split("|")[3].strip() == f"{np.median(localised):.3f}"  # columns: none, localised, ours


def test_register_many_summary_and_fused_rows_hold_each_label(slices, tmp_path):
    patients = tmp_path / "patients"
    patients.mkdir()
    for case in ("case00", "case02"):
        for kind in ("image", "label"):
            (patients / f"{case}_{kind}.nii.gz").write_bytes((slices / f"{case}_{kind}.nii.gz").read_bytes())
    out = tmp_path / "cohort"
    atlases = [arg for case in ("case04", "case06") for arg in
               ("--atlas", str(slices / f"{case}_image.nii.gz"), "--atlas-label", str(slices / f"{case}_label.nii.gz"))]
    code = main(["register-many", "--model", str(repo_file("Resources", "Models", "prostate-2d.pt")),
                     "--patients", str(patients), *atlases, "--output-dir", str(out), "--steps", "3",
                     "--device", "cpu", "--workers", "1"])
    assert code == 0
    with (out / register_folder.COHORT_SUMMARY_CSV).open(newline="") as f:
        rows = {row["pair"]: row for row in csv.DictReader(f)}
    assert len(rows) == 2 * 2 + 2
    for name, row in rows.items():
        truth = _read(patients / f"{name.split('/')[0]}_label.nii.gz")
        if row["status"] == "fused":
            warped = _read(out / name.split("/")[0] / "fused_label.nii.gz")
        else:
            assert row["status"] == "registered"
            metrics = register_folder.read_metrics(out / name / register_folder.METRICS_JSON)
            warped = _read(out / name / register_folder.WARPED_LABEL)
            for key in ("dice_before_label_1", "hausdorff_before_label_2", "hausdorff_after_label_1"):
                assert float(row[key]) == pytest.approx(metrics[key], rel=1e-3)
        for v in (1, 2):
            assert float(row[f"dice_after_label_{v}"]) == pytest.approx(dice(warped == v, truth == v), abs=1e-4)
        assert float(row["dice_after"]) == pytest.approx(dice(warped > 0, truth > 0), abs=1e-4)
