"""A model that crops on the organ, end to end: ground truth on boxes placed by the training masks, SDM, the
``converge`` training configuration, the bundle, then ``agentreg register`` placing the moving crop by the
moving label (the atlas case) and the fixed crop by a point or by the model's localiser. Real PROMISE12 slices
in user-like geometries; the tiny bundle is briefly trained, so these tests check the pipeline, not accuracy.
"""

import json

import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.data.organ_box import localisation_from_label
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.stages.training_finish import add_localisation

STEPS = 10


@pytest.fixture(scope="module")
def organ2d(tiny_pipeline):
    return tiny_pipeline(2, "organ")


@pytest.fixture(scope="module")
def inputs(native_slice, tmp_path_factory):
    """Fixed subject 13; moving subject 19, and the same moving slice stored 40 mm away."""
    folder = tmp_path_factory.mktemp("organ_inputs")
    fixed, fixed_label = native_slice("13", None, (12.5, -30.0), (0.6, 0.6))
    moving, moving_label = native_slice("19", None, (16.0, -33.0), (0.58, 0.62))
    far, far_label = native_slice("19", None, (56.0, -33.0), (0.58, 0.62))
    paths = {}
    for key, image in (("fixed", fixed), ("fixed_label", fixed_label), ("moving", moving), ("moving_label", moving_label),
                       ("far", far), ("far_label", far_label)):
        paths[key] = folder / f"{key}.nii.gz"
        sitk.WriteImage(image, str(paths[key]), True)
    paths["centre"] = localisation_from_label(fixed_label).centre
    return paths


def _register(inputs, model, out, moving="moving", *extra) -> int:
    return main(["register", "--fixed", str(inputs["fixed"]), "--moving", str(inputs[moving]), "--model", str(model),
                 "--output-dir", str(out), "--device", "cpu", "--steps", str(STEPS), "--fixed-label",
                 str(inputs["fixed_label"]), "--moving-label", str(inputs[f"{moving}_label"]), *extra])


def test_the_bundle_remembers_that_it_crops_on_the_organ_and_its_stop_rule(organ2d):
    bundle = load_bundle(organ2d["bundle"])
    assert bundle.geometry.localised and bundle.geometry.box_spreads == (10.0, 10.0)
    assert bundle.agent_settings().stop_when_no_action_helps
    assert bundle.training["config"]["target_units"] == "steps"


def test_without_a_localiser_or_a_point_the_fixed_crop_cannot_be_placed(organ2d, inputs, tmp_path, capsys):
    assert _register(inputs, organ2d["bundle"], tmp_path / "out") == 1
    assert "has no localiser for 2-D images: give a point on the organ in the fixed image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_moving_image_stored_40_mm_away_registers_as_well_as_the_original(organ2d, inputs, tmp_path):
    subjects = tmp_path / "subjects"  # the organ's typical size, measured on images in the units of the inputs
    subjects.mkdir()
    for kind in ("image", "label"):
        sitk.WriteImage(sitk.ReadImage(str(inputs["fixed" if kind == "image" else "fixed_label"])),
                        str(subjects / f"fixed_{kind}.nii.gz"))
        sitk.WriteImage(sitk.ReadImage(str(inputs["moving" if kind == "image" else "moving_label"])),
                        str(subjects / f"moving_{kind}.nii.gz"))
    bundle = load_bundle(organ2d["bundle"])
    add_localisation(bundle, None, str(subjects), ["fixed", "moving"])
    bundle.save(tmp_path / "model.pt")
    assert load_bundle(tmp_path / "model.pt").typical_spread(2).shape == (2,)
    point = "--fixed-point=" + ",".join(f"{v:.3f}" for v in inputs["centre"])
    assert _register(inputs, tmp_path / "model.pt", tmp_path / "near", "moving", point) == 0
    assert _register(inputs, tmp_path / "model.pt", tmp_path / "far", "far", point) == 0
    near, far = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("near", "far"))
    assert far["dice_none"] < 0.05 < near["dice_none"]  # left where it was stored, the far one misses the prostate
    assert far["dice_before"] == pytest.approx(near["dice_before"], abs=0.01) and near["dice_before"] > 0.6
    assert far["dice_after"] == pytest.approx(near["dice_after"], abs=0.01)


def test_the_models_localiser_places_the_fixed_crop(organ2d, inputs, native_slice, tmp_path):
    from AgentRegistrationLib.data.localiser import LocaliserConfig, save_localiser
    from AgentRegistrationLib.data.localiser_training import train_localiser

    images, labels = zip(*[native_slice(case, None, (0.0, 0.0), (0.6, 0.6)) for case in ("00", "04", "06", "07")],
                         strict=True)
    localiser = train_localiser(list(images), list(labels), LocaliserConfig.default(2), iterations=3, seed=0)
    save_localiser(localiser, tmp_path / "localiser-2d.pt")
    bundle = load_bundle(organ2d["bundle"])
    add_localisation(bundle, [str(tmp_path / "localiser-2d.pt")], None, [])
    bundle.save(tmp_path / "model.pt")
    assert sorted(load_bundle(tmp_path / "model.pt").localisers) == ["2"]
    assert _register(inputs, tmp_path / "model.pt", tmp_path / "out") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0.0 <= metrics["dice_after"] <= 1.0 and metrics["steps"] <= STEPS
