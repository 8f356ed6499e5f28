"""``agentreg register`` end to end, through ``AgentRegistrationLib.cli.main``, on real native PROMISE12 slices
written as a user would have them: NIfTI and NRRD files with a rotated direction, a non-zero origin and
anisotropic spacing, the fixed and moving images each in their own geometry. Uses the 2-D tiny bundle of
``tiny_pipeline`` (a briefly trained network: these tests check the command and its files, not accuracy).
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.contract import register_folder
from AgentRegistrationLib.core.metrics import dice

STEPS, SAVE_EVERY, MODES = 12, 5, 4
SHIPPED_3D = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "prostate-3d.pt"
ANGLE = math.radians(30)
DIRECTION = (math.cos(ANGLE), -math.sin(ANGLE), math.sin(ANGLE), math.cos(ANGLE))


@pytest.fixture(scope="module")
def inputs(native_slice, tmp_path_factory):
    """Fixed: subject 13 as NIfTI; moving: subject 19 as NRRD, same orientation, shifted and differently sampled."""
    folder = tmp_path_factory.mktemp("register_inputs")
    fixed, fixed_label = native_slice("13", 8, (12.5, -30.0), (0.6, 0.6), DIRECTION)
    moving, moving_label = native_slice("19", 11, (16.0, -33.0), (0.58, 0.62), DIRECTION)
    paths = {"fixed": folder / "fixed.nii.gz", "fixed_label": folder / "fixed_label.nii.gz",
             "moving": folder / "moving.nrrd", "moving_label": folder / "moving_label.nrrd"}
    for key, image in zip(paths, (fixed, fixed_label, moving, moving_label), strict=True):
        sitk.WriteImage(image, str(paths[key]), True)
    return paths


@pytest.fixture(scope="module")
def tiny_2d_model(tiny_pipeline):
    return tiny_pipeline(2)["bundle"]


def _register(inputs, model, out, *extra) -> list[str]:
    return ["register", "--fixed", str(inputs["fixed"]), "--moving", str(inputs["moving"]), "--model", str(model),
            "--output-dir", str(out), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run(inputs, tiny_2d_model, tmp_path_factory):
    """One successful run with both labels, a few steps, and every K-th warped image."""
    out = tmp_path_factory.mktemp("register_run") / "result"
    code = main(_register(inputs, tiny_2d_model, out, "--fixed-label", str(inputs["fixed_label"]), "--moving-label",
                          str(inputs["moving_label"]), "--steps", str(STEPS), "--save-steps", str(SAVE_EVERY)))
    assert code == 0
    return out


def _same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetDirection() == reference.GetDirection()


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- a successful run ------------------------------------------------------------------------------------------------
def test_register_writes_every_output_file(run):
    for name in ("warped.nii.gz", "warped_label.nii.gz", "displacement.nii.gz", "trajectory.csv", "trajectory.png",
                 "qa.png", "metrics.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    steps = sorted(p.name for p in (run / "steps").iterdir())
    assert steps == [f"warped_{s:04d}.nii.gz" for s in range(0, STEPS + 1, SAVE_EVERY)]
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_outputs_are_in_the_fixed_image_geometry(run, inputs):
    fixed = sitk.ReadImage(str(inputs["fixed"]))
    assert fixed.GetDirection() != (1.0, 0.0, 0.0, 1.0) and fixed.GetOrigin() != (0.0, 0.0)
    for name in ("warped.nii.gz", "warped_label.nii.gz", "displacement.nii.gz", "steps/warped_0000.nii.gz"):
        _same_geometry(sitk.ReadImage(str(run / name)), fixed)
    displacement = sitk.ReadImage(str(run / "displacement.nii.gz"))
    assert displacement.GetNumberOfComponentsPerPixel() == 2


def test_warped_label_stays_an_integer_label(run):
    label = sitk.ReadImage(str(run / "warped_label.nii.gz"))
    assert label.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16)
    values = np.unique(sitk.GetArrayFromImage(label))
    assert set(values.tolist()) == {0, 1}


def test_metrics_hold_dice_hausdorff_jacobian_and_seconds(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("dice_before", "dice_after"):
        assert 0.0 < metrics[key] <= 1.0, key
    for key in ("hausdorff_before", "hausdorff_after"):
        assert metrics[key] > 0.0, key
    assert 0.0 <= metrics["jacobian_folding_percent"] <= 100.0 and metrics["log_jacobian_std"] >= 0.0
    assert metrics["seconds_total"] > 0 and metrics["seconds_agent"] > 0
    assert metrics["steps"] == STEPS
    assert register_folder.read_metrics(run / "metrics.json") == metrics  # flat, every key documented


def test_trajectory_csv_has_a_row_per_step_with_q_and_theta_columns(run):
    with open(run / "trajectory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == STEPS and [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert [k for k in rows[0] if k.startswith("q_")] == [f"q_{a}" for a in range(2 * MODES)]
    assert [k for k in rows[0] if k.startswith("theta_")] == [f"theta_{m}" for m in range(MODES)]
    assert all(0 <= int(r["action"]) < 2 * MODES and r["dice"] for r in rows)
    assert all(math.isfinite(float(r[f"q_{a}"])) for r in rows for a in range(2 * MODES))


def test_displacement_field_reproduces_the_warped_label(run, inputs):
    """The written displacement, used as an ITK DisplacementFieldTransform, is the registration result."""
    field = sitk.Cast(sitk.ReadImage(str(run / "displacement.nii.gz")), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    moving_label = sitk.ReadImage(str(inputs["moving_label"]))
    fixed = sitk.ReadImage(str(inputs["fixed"]))
    resampled = sitk.Resample(moving_label, fixed, transform, sitk.sitkNearestNeighbor, 0, moving_label.GetPixelID())
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "warped_label.nii.gz")))
    assert written.sum() > 100
    assert dice(sitk.GetArrayFromImage(resampled), written) > 0.99


# -- what the command loads ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not SHIPPED_3D.is_file(), reason="the shipped 3-D model is missing")
def test_a_registration_imports_no_scipy(native, tmp_path):
    """Importing scipy.ndimage alone takes about 0.2 s: the register command's process (localiser, agent, metrics,
    outputs) loads no scipy module, in a real run of the shipped 3-D model on native files with both labels."""
    files = {f"--{key}": native / f"case{case}_{kind}.nii.gz" for key, case, kind in
             (("fixed", 17, "image"), ("moving", 30, "image"), ("fixed-label", 17, "label"), ("moving-label", 30, "label"))}
    argv = ["register", "--model", str(SHIPPED_3D), *(str(x) for item in files.items() for x in item), "--steps", "4",
            "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    script = ("import sys\nfrom AgentRegistrationLib.cli import main\ncode = main(sys.argv[1:])\n"
              "print('scipy modules:', sorted(m for m in sys.modules if m.partition('.')[0] == 'scipy'))\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "scipy modules: []"


# -- errors a user can cause ---------------------------------------------------------------------------------------
def test_a_2d_model_with_3d_images_asks_for_a_3d_model(native, tiny_2d_model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["register", "--fixed", str(native / "case13_image.nii.gz"), "--moving", str(native / "case19_image.nii.gz"),
            "--model", str(tiny_2d_model), "--output-dir", str(out), "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "use a 3-D model" in err and "2-D model" in err
    assert _leftovers(tmp_path) == []


def test_images_that_do_not_overlap_are_a_clear_error(inputs, tiny_2d_model, tmp_path, capsys):
    far = sitk.ReadImage(str(inputs["moving"]))
    far.SetOrigin((5000.0, -4000.0))
    sitk.WriteImage(far, str(tmp_path / "far.nrrd"))
    argv = _register({**inputs, "moving": tmp_path / "far.nrrd"}, tiny_2d_model, tmp_path / "out")
    assert main(argv) == 1
    assert "do not overlap" in capsys.readouterr().err
    assert _leftovers(tmp_path) == ["far.nrrd"]


def test_a_corrupt_bundle_is_a_one_line_error(inputs, tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a model bundle" * 20)
    assert main(_register(inputs, bad, tmp_path / "out")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("agentreg: error:") and str(bad) in err[0]
    assert _leftovers(tmp_path) == ["model.pt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(inputs, tiny_2d_model, tmp_path, capsys):
    argv = _register(inputs, tiny_2d_model, tmp_path / "out")
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "CUDA" in err and "--device cpu" in err
    assert _leftovers(tmp_path) == []
