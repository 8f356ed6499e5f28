"""The model geometry as a choice (issue 15): ``auto`` derived from real training masks, and the pipeline through
``agentreg`` on a second geometry (PROMISE12 middle slices on a 64x64 grid with control spacing 8.5, not a whole
number of voxels, as auto's are), tiny: the chosen geometry reaches the ground-truth summary, the SDM, the bundle,
the model card and what ``register`` finds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main, parser
from AgentRegistrationLib.contract import register_folder, training_folder, worker_commands
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
from AgentRegistrationLib.data.geometry_choice import model_geometry
from AgentRegistrationLib.data.organ_box import BOX_SPREADS
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary

TRAIN = ["case00", "case04", "case06"]
CHOSEN = ModelGeometry((64, 64), (8.5, 8.5), box_spreads=BOX_SPREADS[2], choice="auto+overrides")


@pytest.mark.parametrize("dim", [2, 3])
def test_auto_geometry_of_real_masks(grid128, dim):
    labels = [grid128 / f"case{i:02d}_label.nii.gz" for i in (0, 2, 4, 6, 9, 13, 26)]
    geometry = model_geometry(dim, None, "auto", labels)
    assert geometry.choice == "auto" and geometry.localised
    # the default box, or where it would pad more than 10 % of these images' crops, a smaller one on their field of view
    assert all(b <= d for b, d in zip(geometry.box_spreads, BOX_SPREADS[dim], strict=True))
    paper = ModelGeometry.paper(dim)
    # about the paper's voxel budget, isotropic voxels (up to rounding the size to whole voxels)
    assert 0.85 < math.prod(geometry.size) / math.prod(paper.size) < 1.15
    spreads = np.median([_spread(path)[:dim] for path in labels], axis=0)
    voxel = np.array(geometry.box_spreads) * spreads / (np.array(geometry.size) - 1)
    assert voxel.max() / voxel.min() < 1.1
    # at least two control intervals per axis, and about the paper's number of them over the box
    intervals = (np.array(geometry.size) - 1) / np.array(geometry.control_spacing)
    assert intervals.min() >= 2 - 1e-6
    paper_intervals = np.prod((np.array(paper.size) - 1) / np.array(paper.control_spacing))
    assert 0.6 < np.prod(intervals) / paper_intervals < 1.6


def _spread(path) -> np.ndarray:
    from AgentRegistrationLib.data.organ_box import localisation_from_label

    return localisation_from_label(sitk.ReadImage(str(path))).spread


def test_paper_geometry_and_its_crops_are_unchanged():
    assert model_geometry(3) == ModelGeometry.paper(3)
    assert model_geometry(3, "organ") == ModelGeometry.localised_grid(3, BOX_SPREADS[3])
    assert model_geometry(2).to_dict() == ModelGeometry.paper(2).to_dict()  # no 'choice' key: records read the same
    assert ModelGeometry.from_dict(CHOSEN.to_dict()).choice == "auto+overrides"


def test_auto_geometry_crops_on_the_organ(grid128):
    with pytest.raises(ValueError, match="--geometry auto sizes the grid to the organ"):
        model_geometry(2, "paper", "auto", [grid128 / "case00_label.nii.gz"])


@pytest.mark.parametrize("option, text", [("--grid-size", "64"), ("--control-spacing", "8,x"),
                                          ("--box-spreads", "10,-1")])
def test_a_wrong_override_names_the_option_and_value(option, text, capsys):
    with pytest.raises(SystemExit):
        parser.build_parser().parse_args(["groundtruth", "data", "--out", "o", option, text])
    assert f"{option} '{text}'" in capsys.readouterr().err


def test_the_training_module_commands_carry_the_geometry(tmp_path):
    files = training_folder.TrainingFiles(tmp_path, "m")
    groundtruth = worker_commands.training_commands("python", tmp_path / "data", files, dim=2, geometry="auto",
                                             geometry_overrides={"grid_size": "64, 64", "control_spacing": "",
                                                                 "box_spreads": (8, 8)})[0]
    assert groundtruth[groundtruth.index("--geometry") + 1] == "auto"
    assert groundtruth[groundtruth.index("--grid-size") + 1] == "64,64"
    assert groundtruth[groundtruth.index("--box-spreads") + 1] == "8.0,8.0"
    assert "--control-spacing" not in groundtruth
    parsed = parser.build_parser().parse_args(groundtruth[3:-1])
    assert parsed.grid_size == (64, 64) and parsed.box_spreads == (8.0, 8.0) and parsed.geometry == "auto"
    with pytest.raises(ValueError, match="--grid-size '64'"):
        worker_commands.training_commands("python", tmp_path, files, geometry_overrides={"grid_size": "64"})
    assert "--metric" not in groundtruth  # the geometry's default (distance with auto)
    chosen = worker_commands.training_commands("python", tmp_path / "data", files, geometry="auto", metric="points")[0]
    assert parser.build_parser().parse_args(chosen[3:-1]).metric == "points"
    with pytest.raises(ValueError, match="ground-truth metric"):
        worker_commands.training_commands("python", tmp_path, files, metric="surface")


@pytest.fixture(scope="module")
def pipeline(grid128, tmp_path_factory):
    """groundtruth (auto, 64x64, control spacing 8.5, 3 pairs, 2 of them compared with plain elastix) -> sdm ->
    train (a few batches) -> info, through ``agentreg``."""
    root = tmp_path_factory.mktemp("second_geometry")
    gt, sdm, model, card = root / "gt", root / "sdm.npz", root / "model.pt", root / "card.md"
    runs = {
        "groundtruth": ["groundtruth", grid128, "--subjects", ",".join(TRAIN), "--dim", "2", "--geometry", "auto",
                        "--grid-size", "64,64", "--control-spacing", "8.5,8.5", "--iterations", "20", "--resolutions",
                        "1", "--workers", "1", "--max-pairs", "3", "--compare-elastix", "2", "--out", gt],
        "sdm": ["sdm", gt, "--modes", "2", "--out", sdm, "--report", root / "report.md"],
        "train": ["train", "--groundtruth", gt, "--sdm", sdm, "--out", model, "--device", "cpu", "--threads", "1",
                  "--set", "iterations=4", "--set", "batch_size=4", "--step-pairs", "0", "--data", grid128],
        "info": ["info", model, "--card", card],
    }
    import contextlib
    import io

    err = {}
    for stage, argv in runs.items():
        stream = io.StringIO()
        with contextlib.redirect_stderr(stream), contextlib.redirect_stdout(io.StringIO()):
            assert main([str(a) for a in argv]) == 0, stream.getvalue()
        err[stage] = stream.getvalue()
    return {"gt": gt, "sdm": sdm, "model": model, "card": card, "report": root / "report.md", "err": err}


def test_the_chosen_geometry_reaches_summary_sdm_bundle_and_card(pipeline):
    summary = GroundTruthSummary.load(pipeline["gt"])
    assert summary.geometry == CHOSEN and summary.geometry.choice == "auto+overrides"
    assert summary.metric == "distance"  # the default with a geometry derived from the data
    assert StatisticalDeformationModel.load(pipeline["sdm"]).grid == CHOSEN.control_grid()
    bundle = load_bundle(pipeline["model"])
    assert bundle.geometry == CHOSEN and bundle.geometry.choice == "auto+overrides"
    assert tuple(bundle.network.config.input_size) == (64, 64)
    description = CHOSEN.description()
    assert description in pipeline["card"].read_text()
    assert description in pipeline["err"]["groundtruth"] and description in pipeline["err"]["sdm"]
    assert "(geometry 'auto+overrides')" in pipeline["report"].read_text()


def test_groundtruth_compares_with_plain_elastix(pipeline):
    comparison = GroundTruthSummary.load(pipeline["gt"]).elastix
    assert len(comparison["pairs"]) == 2 and comparison["e8"]["n"] == comparison["e16"]["n"] == 2
    assert 0 < comparison["e8"]["median"] <= 1 and 0 < comparison["e16"]["median"] <= 1
    line = next(x for x in pipeline["err"]["groundtruth"].splitlines() if x.startswith("plain elastix B-spline"))
    assert f"e16 {comparison['e16']['median']:.3f}" in line
    assert f"the ground truth on those pairs {comparison['groundtruth']['median']:.3f}" in line
    assert "plain elastix e16 on the same 2 pairs" in pipeline["report"].read_text()


def test_register_works_on_the_chosen_grid(pipeline, grid128):
    import torch
    from AgentRegistrationLib.stages.registration import Registrar

    bundle = load_bundle(pipeline["model"])
    fixed, moving, fixed_label, moving_label = (
        sitk.ReadImage(str(grid128 / f"{case}_{kind}.nii.gz"))[:, :, 16]
        for case, kind in (("case02", "image"), ("case09", "image"), ("case02", "label"), ("case09", "label")))
    registrar = Registrar(bundle, torch.device("cpu"))
    settings = bundle.agent_settings(steps=3)
    # a model without a localiser: the fixed crop on a point (the fixed prostate's centre, with the training
    # subjects' median spread), the moving crop on its label
    centre = registrar.localise(fixed, label=fixed_label).centre
    (result,) = registrar.register(fixed, [moving], settings, fixed_label, [moving_label], fixed_point=centre)
    assert result.pair.fixed.shape == result.pair.moving.shape == CHOSEN.array_shape
    assert result.coefficients.shape == (CHOSEN.control_grid().num_coefficients,)
    assert result.displacement.GetSize() == fixed.GetSize()
    register_folder.check_metrics(result.metrics)
    assert 0 <= result.metrics["dice_after"] <= 1


@pytest.mark.parametrize("size, spacing", [
    ((53, 41, 21), (13.1, 10.2, 5.2)),  # n x spacing needs one more cell than (n - 1) x spacing: auto made these
    ((65, 33, 17), (8.0, 8.0, 4.0)),  # exact multiples of the voxel centres' extent
    ((100, 75, 20), (16.0, 16.0, 8.0)),  # the paper's
])
def test_the_control_grid_is_the_one_elastix_lays_out(size, spacing):
    """``ControlGrid.for_image`` (and so every model geometry's basis) must be elastix's grid, else the ground truth
    of that geometry fails every pair ('elastix used control grid ...'): one elastix iteration on a smooth image."""
    from AgentRegistrationLib.core.bspline import ControlGrid
    from AgentRegistrationLib.elastix import wrapper as elastix
    from AgentRegistrationLib.elastix.wrapper import model_image
    from scipy.ndimage import gaussian_filter

    image = gaussian_filter(np.random.default_rng(0).random(size[::-1]).astype(np.float32), 1.5)
    maps = elastix.register(model_image(image), model_image(image), [elastix.bspline_map(spacing, 1, 1)])
    _, grid = elastix.bspline_coefficients(maps[-1])
    ours = ControlGrid.for_image(size, spacing)
    assert grid.size == ours.size
    assert np.allclose(grid.origin, ours.origin, atol=1e-6)


def test_without_a_geometry_groundtruth_takes_the_default_unless_a_crop_is_given(grid128):
    labels = [grid128 / "case00_label.nii.gz", grid128 / "case04_label.nii.gz"]
    assert model_geometry(2, None, None, labels).choice == training_folder.DEFAULT_GEOMETRY
    assert model_geometry(2, "organ", None, labels) == ModelGeometry.localised_grid(2, BOX_SPREADS[2])
    assert model_geometry(2, "paper", None, labels) == ModelGeometry.paper(2)
    assert parser.build_parser().parse_args(["groundtruth", "data", "--out", "o"]).geometry is None


def _box_label(spacing: tuple[float, float, float], half: tuple[int, int, int]) -> sitk.Image:
    """A 41x41x21 label holding a box of ``2 * half + 1`` voxels per axis, voxels of ``spacing`` mm."""
    arr = np.zeros((21, 41, 41), np.uint8)
    arr[10 - half[2]:11 + half[2], 20 - half[1]:21 + half[1], 20 - half[0]:21 + half[0]] = 1
    label = sitk.GetImageFromArray(arr)
    label.SetSpacing(spacing)
    return label


def test_a_control_spacing_in_mm_becomes_grid_voxels_of_the_median_organ():
    """On the organ, a model voxel spans box_spreads x the organ's spread / (size - 1); the median over the masks."""
    from AgentRegistrationLib.data.geometry_choice import model_voxel_size
    from AgentRegistrationLib.data.organ_box import localisation_from_label

    labels = [_box_label((0.5, 0.5, 2.0), (8, 6, 3)), _box_label((0.7, 0.7, 3.0), (8, 6, 3)),
              _box_label((1.0, 1.0, 2.5), (8, 6, 3))]
    paper_grid = model_geometry(3, "organ", "paper", labels)
    spread = localisation_from_label(labels[0]).spread  # the median per axis: 0.7 mm in-plane, 2.5 mm in z
    spread = spread * np.array([0.7 / 0.5, 0.7 / 0.5, 2.5 / 2.0])
    voxel = np.array(BOX_SPREADS[3]) * spread / (np.array(paper_grid.size) - 1)
    assert model_voxel_size(paper_grid, labels) == pytest.approx(tuple(voxel), rel=1e-6)
    chosen = model_geometry(3, "organ", "paper", labels, control_spacing_mm=(10.0,))
    assert chosen.control_spacing == pytest.approx(tuple(np.round(10.0 / voxel, 1)))
    assert chosen.size == paper_grid.size and chosen.choice == "paper+overrides"
    per_axis = model_geometry(3, "organ", "paper", labels, control_spacing_mm=(8.0, 8.0, 20.0))
    assert per_axis.control_spacing[2] == pytest.approx(round(20.0 / voxel[2], 1))
    with pytest.raises(ValueError, match="not both"):
        model_geometry(3, "organ", "paper", labels, control_spacing=(8.0, 8.0, 4.0), control_spacing_mm=(10.0,))


def test_a_control_spacing_in_mm_on_the_paper_crop_uses_the_image_extent():
    from AgentRegistrationLib.data.geometry_choice import model_voxel_size

    labels = [_box_label((0.5, 0.5, 2.0), (8, 6, 3))] * 2
    paper = ModelGeometry.paper(3)
    extent = np.array([40 * 0.5, 40 * 0.5, 20 * 2.0]) * np.array(paper.crop_fraction)
    assert model_voxel_size(paper, labels) == pytest.approx(tuple(extent / (np.array(paper.size) - 1)))
    parsed = parser.build_parser().parse_args(["groundtruth", "data", "--out", "o", "--control-spacing-mm", "12"])
    assert parsed.control_spacing_mm == (12.0,)
    files = training_folder.TrainingFiles(Path("."), "m")
    command = worker_commands.training_commands("python", "data", files, geometry="paper",
                                         geometry_overrides={"control_spacing_mm": "12"})[0]
    assert command[command.index("--control-spacing-mm") + 1] == "12.0"


def test_evaluate_takes_a_model_without_a_localiser_with_the_fixed_labels_placing_the_crops(pipeline, grid128,
                                                                                            tmp_path, capsys):
    """A model on organ crops trained as the guide trains it has no localiser: ``agentreg evaluate`` places the fixed
    crops by the fixed labels then, and says so on stderr and in the report (it refused before)."""
    out = tmp_path / "eval"
    capsys.readouterr()
    code = main(["evaluate", "--model", str(pipeline["model"]), "--data", str(grid128), "--dim", "2",
                     "--pairs", "case02:case09,case09:case02", "--methods", "none,localised,ours", "--steps", "2",
                     "--workers", "1", "--device", "cpu", "--out", str(out)])
    assert code == 0
    assert "has no organ localiser for volumes" in capsys.readouterr().err
    report = (out / "evaluation.md").read_text()
    assert "the fixed one by the fixed label (an oracle start" in report
    assert "translation pre-alignment was rejected" not in report  # no pre-alignment on organ crops
    assert "| pairs | 2 | 2 | 2 |" in report


# ----------------------------------------------------------------------------------------- crops that stay on the images
TIGHT = ["case00", "case04", "case06", "case07", "case08", "case11", "case12", "case14"]


def _tight(grid128, case: str, margin: float, kind: str = "label") -> sitk.Image:
    """A real grid128 subject cut to its organ's bounding box widened by ``margin`` of the box's size on each side
    (a small volume tight around the organ)."""
    label = sitk.ReadImage(str(grid128 / f"{case}_label.nii.gz"))
    where = np.argwhere(sitk.GetArrayViewFromImage(label) > 0)[:, ::-1]  # x, y, z
    low, high = where.min(axis=0), where.max(axis=0)
    pad = np.ceil(margin * (high - low + 1)).astype(int)
    low, high = np.maximum(low - pad, 0), np.minimum(high + pad, np.array(label.GetSize()) - 1)
    image = label if kind == "label" else sitk.ReadImage(str(grid128 / f"{case}_{kind}.nii.gz"))
    return sitk.RegionOfInterest(image, (high - low + 1).tolist(), low.tolist())


def test_auto_keeps_the_crop_on_small_volumes_tight_around_the_organ(grid128):
    """Volumes two organ sizes across: the default 10x10x7 spreads reach past them; auto shrinks the box where the field
    of view is smaller, to at most MAX_PADDING of the crop off the images, and says so."""
    from AgentRegistrationLib.data.geometry_choice import MAX_PADDING, crop_padding, crop_padding_lines

    labels = [_tight(grid128, case, 0.5) for case in TIGHT]
    unfitted = model_geometry(3, None, "auto", labels, box_spreads=BOX_SPREADS[3])
    assert crop_padding(unfitted, labels)["mean"] > MAX_PADDING  # the premise: the default box pads more
    chosen = model_geometry(3, None, "auto", labels)
    padding = crop_padding(chosen, labels)
    assert chosen.choice == "auto" and padding["mean"] <= MAX_PADDING
    assert all(b <= d for b, d in zip(chosen.box_spreads, BOX_SPREADS[3], strict=True)) and chosen.box_spreads != BOX_SPREADS[3]
    lines = crop_padding_lines(chosen, padding)
    assert lines[0].startswith(f"--geometry auto shrank the crop box from {list(BOX_SPREADS[3])} to "
                               f"{list(chosen.box_spreads)}")
    assert not any(line.startswith("warning") for line in lines)


def test_a_crop_mostly_off_its_training_images_is_warned_about_at_groundtruth(grid128, tmp_path, capsys):
    """The user's own box on volumes tight around the organ: agentreg groundtruth warns, names the share and what to
    do, and records the padding in its summary."""
    data = tmp_path / "tight"
    data.mkdir()
    for case in TIGHT[:3]:
        for kind in ("image", "label"):
            sitk.WriteImage(_tight(grid128, case, 0.3, kind), str(data / f"{case}_{kind}.nii.gz"))
    argv = ["groundtruth", data, "--dim", "3", "--box-spreads", "10,10,7", "--max-pairs", "1", "--iterations", "5",
            "--resolutions", "1", "--workers", "1", "--out", tmp_path / "gt"]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("warning: the crop pads"))
    assert "give a smaller --box-spreads" in warning
    padding = GroundTruthSummary.load(tmp_path / "gt").crop_padding
    assert padding["mean"] > 0.10 and sorted(padding["per_subject"]) == TIGHT[:3]
    assert f"{100 * padding['mean']:.0f} %" in warning
