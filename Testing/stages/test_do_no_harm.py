"""First, do no harm: an image registered to itself comes back unchanged, wherever it is stored and with or without
labels; the similarity guard keeps the agent's start when its end is no more alike; and a localiser miss is said, on
the command line, in metrics.json and in the Slicer status line, with its remedy.

The registrations run the shipped 3-D model through ``agentreg register`` on real PROMISE12 validation subjects; the
guard's own test drives the real agent with a Q-network stub whose moves are fixed by construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from AgentRegistrationGUILib import registration_job
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.contract import register_folder
from AgentRegistrationLib.core.agent import Agent, AgentSettings, organ_region_correlation
from AgentRegistrationLib.data.localiser import CONFIDENCE_THRESHOLD, localise_with_confidence, localiser_from_payload
from AgentRegistrationLib.data.preprocessing import SAME_ANATOMY_CORRELATION, crop_correlation, organ_frames
from AgentRegistrationLib.model.bundle import load_bundle

SHIPPED_3D = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "prostate-3d.pt"


def _register(tmp_path: Path, name: str, fixed: Path, moving: Path, labels: tuple[Path, Path] | None = None,
              *extra: str) -> dict:
    out = tmp_path / name
    argv = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(SHIPPED_3D),
            "--output-dir", str(out), *extra]
    if labels:
        argv += ["--fixed-label", str(labels[0]), "--moving-label", str(labels[1])]
    assert main(argv) == 0
    return register_folder.read_metrics(out / register_folder.METRICS_JSON)


def _moved(grid128: Path, case: str, folder: Path, offset=(40.0, 0.0, 0.0)) -> tuple[Path, Path]:
    """The same voxels of ``case``'s image and label, stored ``offset`` (physical units) away."""
    paths = []
    for kind in ("image", "label"):
        image = sitk.ReadImage(str(grid128 / f"case{case}_{kind}.nii.gz"))
        image.SetOrigin([o + d for o, d in zip(image.GetOrigin(), offset, strict=True)])
        paths.append(folder / f"case{case}_moved_{kind}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return paths[0], paths[1]


def _dice_of_warped_label(out: Path, label: Path) -> float:
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / register_folder.WARPED_LABEL))) > 0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0
    return 2 * float((warped & truth).sum()) / float(warped.sum() + truth.sum())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["02", "13"])
def test_an_image_registered_to_itself_comes_back_unchanged(grid128, tmp_path, case):
    image, label = grid128 / f"case{case}_image.nii.gz", grid128 / f"case{case}_label.nii.gz"
    with_labels = _register(tmp_path, "labels", image, image, (label, label))
    assert with_labels["moving_crop_placed_by"] == "localiser"  # one rule for both crops: they start aligned
    assert with_labels["crop_correlation"] == pytest.approx(1.0)
    assert with_labels["dice_before"] == pytest.approx(1.0) and with_labels["dice_after"] >= 0.99
    without = _register(tmp_path, "images", image, image)
    assert "dice_after" not in without and without["similarity_after"] >= without["similarity_before"]
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(float)
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "images" / register_folder.WARPED))).astype(float)
    assert np.abs(warped - fixed).max() <= 1.0  # the image itself, but for resampling's rounding


@pytest.mark.slow
def test_the_same_image_stored_40_mm_away_comes_back_as_the_fixed_one(grid128, tmp_path):
    image, label = grid128 / "case13_image.nii.gz", grid128 / "case13_label.nii.gz"
    moved_image, moved_label = _moved(grid128, "13", tmp_path)
    metrics = _register(tmp_path, "labels", image, moved_image, (label, moved_label))
    assert metrics["dice_none"] < 0.5  # 40 mm apart, the labels hardly overlap where they lie
    assert metrics["dice_before"] == pytest.approx(1.0) and metrics["dice_after"] >= 0.99
    _register(tmp_path, "images", image, moved_image)
    assert _dice_of_warped_label(tmp_path / "labels", label) >= 0.99


@pytest.mark.slow
def test_crops_of_different_subjects_are_still_placed_by_the_moving_label(grid128, tmp_path):
    """Different subjects never look alike enough for the one-rule crops: the atlas keeps what its label gives."""
    metrics = _register(tmp_path, "pair", grid128 / "case13_image.nii.gz", grid128 / "case17_image.nii.gz",
                        (grid128 / "case13_label.nii.gz", grid128 / "case17_label.nii.gz"))
    assert metrics["moving_crop_placed_by"] == "moving image's label"
    assert metrics["crop_correlation"] < SAME_ANATOMY_CORRELATION
    assert not metrics.get("localisation_warning")  # a validation subject: the localiser is sure of it


def test_the_same_anatomy_correlates_fully_and_another_subject_does_not(load_case):
    bundle = load_bundle(SHIPPED_3D)
    localiser = localiser_from_payload(bundle.localisers["3"])
    (a, _), (b, _) = load_case("13"), load_case("17")
    place_a, place_b = (localise_with_confidence(localiser, x)[0] for x in (a, b))
    assert crop_correlation(a, a, *organ_frames(a, a, bundle.geometry, place_a, place_a)) == pytest.approx(1.0)
    assert crop_correlation(a, b, *organ_frames(a, b, bundle.geometry, place_a, place_b)) < SAME_ANATOMY_CORRELATION


class _AlwaysFirstAction(torch.nn.Module):
    """A Q-network stub that always prefers action 0 (mode 0, +): the agent walks away from any start."""

    def __init__(self, num_actions: int):
        super().__init__()
        self.q = torch.tensor([1.0] + [0.0] * (num_actions - 1))

    def fixed_features(self, fixed):  # the agent's interface of a Q-network (DualStreamQNetwork)
        return fixed

    def q_values(self, fixed_features, moving):
        return self.q.expand(fixed_features.shape[0], -1)


def test_the_guard_keeps_the_start_when_the_end_is_no_more_alike(load_case):
    bundle = load_bundle(SHIPPED_3D)
    size = bundle.geometry.size
    image = sitk.GetArrayFromImage(load_case("13")[0]).astype(np.float32)
    crop = torch.as_tensor(image[:size[2], :size[1], :size[0]] / image.max())[None, None]
    agent = Agent(_AlwaysFirstAction(2 * bundle.sdm.num_modes), bundle.sdm, size, bundle.action_steps, "cpu")
    settings = dict(steps=10, seed=0, exploration=0.0, fuzzy_action_control=False)
    walked = agent.run(crop, crop, AgentSettings(**settings, similarity_guard=False))
    assert walked.theta[0, 0] > walked.theta_start[0]  # the agent moved
    guarded = agent.run(crop, crop, AgentSettings(**settings))
    assert guarded.start_kept.tolist() == [True]
    np.testing.assert_allclose(guarded.theta[0], guarded.theta_start)
    assert float(guarded.displacement.abs().max()) < 1e-4  # the identity: the crops were alike already
    assert guarded.similarity_end[0] == pytest.approx(1.0) and len(guarded.trajectory.actions) == 10
    assert float(organ_region_correlation(crop, crop)[0]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def unfindable(tmp_path_factory, grid128) -> Path:
    """A fixed image with no organ to find: noise on a validation subject's grid."""
    reference = sitk.ReadImage(str(grid128 / "case13_image.nii.gz"))
    noise = np.random.default_rng(0).normal(300.0, 100.0, sitk.GetArrayFromImage(reference).shape)
    image = sitk.GetImageFromArray(noise.astype(np.float32))
    image.CopyInformation(reference)
    path = tmp_path_factory.mktemp("unfindable") / "noise.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def prostate_blanked(tmp_path_factory, grid128) -> Path:
    """A validation subject's image whose prostate (and a rim of 6 voxels) is replaced by the image's median."""
    from scipy import ndimage

    image = sitk.ReadImage(str(grid128 / "case13_image.nii.gz"), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    mask = ndimage.binary_dilation(sitk.GetArrayFromImage(sitk.ReadImage(str(grid128 / "case13_label.nii.gz"))) > 0,
                                   iterations=6)
    array[mask] = np.median(array)
    blanked = sitk.GetImageFromArray(array)
    blanked.CopyInformation(image)
    path = tmp_path_factory.mktemp("blanked") / "blanked.nii.gz"
    sitk.WriteImage(blanked, str(path))
    return path


def test_an_image_whose_prostate_is_made_unfindable_is_flagged(prostate_blanked):
    bundle = load_bundle(SHIPPED_3D)
    localiser = localiser_from_payload(bundle.localisers["3"])
    _, confidence = localise_with_confidence(localiser, sitk.ReadImage(str(prostate_blanked)),
                                             typical_spread=bundle.typical_spread(3))
    assert not confidence.confident and "typical organ" in confidence.reasons[0]


def test_the_localiser_is_sure_of_every_validation_subject_and_not_of_noise(load_case, unfindable):
    bundle = load_bundle(SHIPPED_3D)
    localiser = localiser_from_payload(bundle.localisers["3"])
    for case in ("02", "09", "13", "17", "22", "30", "32", "46", "49"):
        _, confidence = localise_with_confidence(localiser, load_case(case)[0], typical_spread=bundle.typical_spread(3))
        assert confidence.confident and confidence.score >= CONFIDENCE_THRESHOLD, (case, confidence)
    _, confidence = localise_with_confidence(localiser, sitk.ReadImage(str(unfindable)),
                                             typical_spread=bundle.typical_spread(3))
    assert not confidence.confident and confidence.reasons


@pytest.mark.slow
def test_a_localiser_miss_is_said_with_its_remedy_everywhere(grid128, tmp_path, unfindable, capsys):
    metrics = _register(tmp_path, "miss", unfindable, grid128 / "case17_image.nii.gz")
    assert metrics["localisation_confidence"] < CONFIDENCE_THRESHOLD
    assert "fixed image" in metrics["localisation_warning"] and "--fixed-point" in metrics["localisation_warning"]
    printed = capsys.readouterr().err
    assert "agentreg: warning: the localiser may have missed the organ in the fixed image" in printed
    written = json.loads((tmp_path / "miss" / register_folder.METRICS_JSON).read_text())
    assert written["localisation_warning"] == metrics["localisation_warning"]
    status = registration_job.summary_text(written)  # the Slicer status line, from the worker's real metrics
    assert "may have missed the organ" in status and "markups point" in status and "--fixed-point" not in status


@pytest.mark.slow
def test_the_evaluations_self_registration_finds_every_case_unchanged(grid128):
    """What ``agentreg evaluate`` reports for each subject (stages/self_registration.py), on one validation subject."""
    from AgentRegistrationLib.data.dataset import find_subjects
    from AgentRegistrationLib.stages.registration import Registrar
    from AgentRegistrationLib.stages.self_registration import CASES, self_registration, self_registration_lines

    bundle = load_bundle(SHIPPED_3D)
    subjects = {s.name: s for s in find_subjects(grid128, ["case13", "case17"]) if s.name == "case13"}
    results = self_registration(subjects, Registrar(bundle, torch.device("cpu")), bundle.agent_settings(), 3)
    assert set(results["case13"]) == set(CASES) and min(results["case13"].values()) >= 0.99
    assert self_registration_lines(results)[-1].startswith("| lowest | ")
