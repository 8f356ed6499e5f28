"""Every input a user can give ``agentreg register`` gets a clear answer (issue 16): one test per case.

Where the point is the input check, small synthetic images are written as a user would have them, and the
command must stop before any work with exit status 1, ONE line ``agentreg: error: ...`` that says what to do,
and nothing written. What must run (integer and float64 pixels, flipped or anisotropic grids, ``--steps 0``,
labels resampled on purpose) runs on real native PROMISE12 slices with the tiny 2-D bundle of
``tiny_pipeline`` for a few steps (these tests check the command, not accuracy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.cli.parser import build_parser
from AgentRegistrationLib.contract import messages, register_folder, worker_commands
from AgentRegistrationLib.data import inputs

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "Resources" / "Models"


# -- helpers -----------------------------------------------------------------------------------------------------------
def _blob(dim: int, size: int = 24, dtype=np.float32) -> sitk.Image:
    """A small image with a bright ball in the middle (varying, finite values)."""
    shape = (8,) * (dim - 2) + (size, size)
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij"))
    array = (100.0 * np.exp(-(grid ** 2).sum(0) / 20.0)).astype(dtype)
    return sitk.GetImageFromArray(array)


def _label_of(image: sitk.Image) -> sitk.Image:
    label = sitk.Cast(image > 50, sitk.sitkUInt8)
    assert sitk.GetArrayViewFromImage(label).any()
    return label


def _write(folder: Path, name: str, image: sitk.Image) -> Path:
    path = folder / name
    sitk.WriteImage(image, str(path))
    return path


def _pair(folder: Path, dim: int) -> dict[str, Path]:
    image = _blob(dim)
    return {"fixed": _write(folder, "fixed.nii.gz", image), "moving": _write(folder, "moving.nii.gz", image),
            "fixed_label": _write(folder, "fixed_label.nii.gz", _label_of(image)),
            "moving_label": _write(folder, "moving_label.nii.gz", _label_of(image))}


def _argv(paths: dict, model, out, *extra) -> list[str]:
    argv = ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--model", str(model),
            "--output-dir", str(out), "--device", "cpu"]
    for key in ("fixed_label", "moving_label"):
        if paths.get(key):
            argv += [f"--{key.replace('_', '-')}", str(paths[key])]
    return argv + list(extra)


def _user_error(capsys, argv) -> str:
    """Run the command; it must fail with status 1 and exactly one stderr line ``agentreg: error: ...``."""
    assert main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("agentreg: error: "), lines
    return lines[0]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture()
def no_model(tmp_path) -> Path:
    """A model path that does not exist: the input checks must answer before the model is even read."""
    return tmp_path / "no-model.pt"


# -- images that cannot be used ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
def test_an_unreadable_image_is_named(tmp_path, capsys, no_model, dim):
    paths = _pair(tmp_path, dim)
    paths["moving"].write_bytes(b"\x1f\x8b not really an image" * 10)
    before = _files(tmp_path)
    err = _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))
    assert f"cannot read moving image {paths['moving']}" in err
    assert _files(tmp_path) == before


def test_a_missing_image_is_named(tmp_path, capsys, no_model):
    paths = {**_pair(tmp_path, 2), "fixed": tmp_path / "nowhere.nii.gz"}
    assert "fixed image file not found: " + str(tmp_path / "nowhere.nii.gz") in _user_error(
        capsys, _argv(paths, no_model, tmp_path / "out"))


def test_a_4d_image_asks_for_one_volume(tmp_path, capsys, no_model):
    paths = _pair(tmp_path, 3)
    four = sitk.JoinSeries([_blob(3), _blob(3)])
    assert four.GetDimension() == 4
    _write(tmp_path, "fixed.nii.gz", four)
    err = _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))
    assert "fixed image" in err and "is 4-D" in err and "give one volume" in err


@pytest.mark.parametrize("dim", [2, 3])
def test_a_vector_image_asks_for_a_scalar_image(tmp_path, capsys, no_model, dim):
    paths = _pair(tmp_path, dim)
    _write(tmp_path, "moving.nrrd", sitk.Compose([_blob(dim)] * 3))
    paths["moving"] = tmp_path / "moving.nrrd"
    err = _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))
    assert "moving image" in err and "3 values per voxel" in err and "scalar grey-level image" in err


@pytest.mark.parametrize("dim", [2, 3])
def test_a_constant_image_is_refused(tmp_path, capsys, no_model, dim):
    paths = _pair(tmp_path, dim)
    _write(tmp_path, "fixed.nii.gz", _blob(dim) * 0 + 7)
    assert "is constant (every voxel is 7)" in _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))


@pytest.mark.parametrize("dim", [2, 3])
def test_an_all_nan_image_is_refused(tmp_path, capsys, no_model, dim):
    paths = _pair(tmp_path, dim)
    nan = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(_blob(dim)).shape, np.nan, np.float32))
    paths["moving"] = _write(tmp_path, "moving.nrrd", nan)  # NRRD keeps NaN (ITK reads NaN in NIfTI as 0)
    assert "has no finite value" in _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))


def test_some_nan_voxels_are_set_to_the_minimum_and_said():
    array = sitk.GetArrayFromImage(_blob(2))
    array[0, :3] = np.nan
    image, note = inputs.check_image(sitk.GetImageFromArray(array), "fixed image", "f.nii")
    assert np.isfinite(sitk.GetArrayViewFromImage(image)).all()
    assert note == f"fixed image f.nii: 3 NaN or infinite voxels were set to the image's minimum ({np.nanmin(array):g})"


def test_a_single_slice_3d_file_asks_for_a_2d_image(tmp_path, capsys, no_model):
    paths = _pair(tmp_path, 2)
    _write(tmp_path, "fixed.nii.gz", sitk.JoinSeries(_blob(2)))
    assert "single slice (24x24x1): give it as a 2-D image" in _user_error(
        capsys, _argv(paths, no_model, tmp_path / "out"))


def test_images_of_two_dimensions_are_refused(tmp_path, capsys, no_model):
    paths = _pair(tmp_path, 2)
    paths.pop("fixed_label"), paths.pop("moving_label")
    _write(tmp_path, "moving.nii.gz", _blob(3))
    assert "is 2-D but the moving image" in _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))


# -- labels --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
def test_a_label_of_another_size_is_refused_with_the_way_out(tmp_path, capsys, no_model, dim):
    paths = _pair(tmp_path, dim)
    _write(tmp_path, "fixed_label.nii.gz", _label_of(_blob(dim, size=30)))
    err = _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))
    assert f"fixed label {paths['fixed_label']} is not on the fixed image's grid" in err
    assert ("size 30x30" if dim == 2 else "size 30x30x8") in err and "--resample-labels" in err


def test_a_label_with_another_origin_is_refused(tmp_path, capsys, no_model):
    paths = _pair(tmp_path, 3)
    shifted = _label_of(_blob(3))
    shifted.SetOrigin((0.0, 0.0, 5.0))
    _write(tmp_path, "moving_label.nii.gz", shifted)
    assert "moving label" in _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_an_empty_label_is_refused(tmp_path, capsys, no_model, dim, which):
    paths = _pair(tmp_path, dim)
    _write(tmp_path, f"{which}_label.nii.gz", _label_of(_blob(dim)) * 0)
    err = _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))
    assert f"{which} label {paths[which + '_label']} is empty (no non-zero voxel)" in err
    assert "or leave the label out" in err


def test_a_label_resampled_on_purpose_that_misses_its_image_is_refused(tmp_path, capsys, no_model):
    paths = _pair(tmp_path, 2)
    far = _label_of(_blob(2))
    far.SetOrigin((500.0, 500.0))
    _write(tmp_path, "fixed_label.nii.gz", far)
    err = _user_error(capsys, _argv(paths, no_model, tmp_path / "out", "--resample-labels"))
    assert "is empty (no non-zero voxel inside the fixed image after resampling: they do not overlap)" in err


# -- settings and the output folder --------------------------------------------------------------------------------
def test_a_negative_step_count_is_refused(tmp_path, capsys, no_model):
    err = _user_error(capsys, _argv(_pair(tmp_path, 2), no_model, tmp_path / "out", "--steps", "-3"))
    assert "--steps -3: give a positive number of agent steps, or 0 for the model's default" in err


def test_zero_steps_is_the_models_default_and_many_steps_warn():
    assert inputs.agent_steps(None, 54) == (54, None)
    assert inputs.agent_steps(0, 54) == (54, None)
    assert inputs.agent_steps(200, 54) == (200, None)
    steps, warning = inputs.agent_steps(100000, 54)
    assert steps == 100000 and "far more than this model's default of 54 steps" in warning
    assert inputs.agent_steps(inputs.MANY_STEPS, 54)[1] is None


def test_the_slicer_command_and_the_cli_read_zero_steps_alike():
    command = worker_commands.register_command("python", Path("f"), Path("m"), Path("b.pt"), Path("o"), steps=0)
    assert build_parser().parse_args(command[3:]).steps is None  # the CLI's default: the model's, as --steps 0


def test_negative_threads_are_refused(tmp_path, capsys, no_model):
    err = _user_error(capsys, _argv(_pair(tmp_path, 2), no_model, tmp_path / "out", "--threads", "-2"))
    assert "--threads -2: give a positive number" in err


def test_an_output_folder_that_is_a_file_is_named(tmp_path, capsys, no_model):
    paths = _pair(tmp_path, 2)
    (tmp_path / "out").write_text("a file")
    err = _user_error(capsys, _argv(paths, no_model, tmp_path / "out"))
    assert err == f"agentreg: error: output folder {tmp_path / 'out'} is a file: give a folder (it is made if missing)"


def test_an_output_folder_under_a_file_is_named_not_a_temporary_one(tmp_path, capsys, no_model):
    paths = _pair(tmp_path, 2)
    (tmp_path / "file").write_text("a file")
    before = _files(tmp_path)
    err = _user_error(capsys, _argv(paths, no_model, tmp_path / "file" / "deeper" / "out"))
    assert err == (f"agentreg: error: cannot make output folder {tmp_path / 'file' / 'deeper' / 'out'}: "
                   f"{tmp_path / 'file'} is a file, not a folder")
    assert "partial" not in err and _files(tmp_path) == before


def test_writing_fails_with_the_users_folder_in_the_message(tmp_path):
    from AgentRegistrationLib.stages.outputs import write_registration_outputs

    (tmp_path / "file").write_text("a file")
    with pytest.raises(OSError, match=f"cannot write output folder {tmp_path / 'file' / 'out'}: ") as raised:
        write_registration_outputs(None, tmp_path / "file" / "out", None, None, None, None)
    assert "partial" not in str(raised.value)


def test_a_missing_model_is_named_after_the_inputs_are_checked(tmp_path, capsys, no_model):
    assert f"model bundle not found: {no_model}" in _user_error(capsys, _argv(_pair(tmp_path, 2), no_model,
                                                                               tmp_path / "out"))


@pytest.mark.skipif(not (SHIPPED / "prostate-3d.pt").is_file(), reason="the shipped 3-D model is missing")
def test_2d_images_with_a_3d_model_ask_for_a_2d_model(tmp_path, capsys):
    paths = _pair(tmp_path, 2)
    err = _user_error(capsys, _argv(paths, SHIPPED / "prostate-3d.pt", tmp_path / "out"))
    assert "is a 3-D model but" in err and "use a 2-D model" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (SHIPPED / "prostate-2d.pt").is_file(), reason="the shipped 2-D model is missing")
def test_info_into_a_pipe_closed_early_ends_quietly():
    process = subprocess.Popen([sys.executable, "-m", "AgentRegistrationLib.cli", "info", str(SHIPPED / "prostate-2d.pt")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    process.stdout.close()  # like 'head' having read enough: closed before the card is printed
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert "Broken pipe" not in err and "error" not in err, err


# -- help texts ----------------------------------------------------------------------------------------------------
def test_every_register_option_is_explained():
    register = build_parser()._subparsers._group_actions[0].choices["register"]
    for action in register._actions:
        assert action.help and len(action.help) > 15, action.option_strings
    assert "``" not in build_parser().description


@pytest.mark.skipif(not (SHIPPED / "prostate-3d.pt").is_file(), reason="the shipped models are missing")
def test_steps_help_says_where_the_models_default_is_shown():
    """The default is the model's own, whatever its organ: the help names no model (issue 30), but where to see it."""
    register = build_parser()._subparsers._group_actions[0].choices["register"]
    (steps,) = [a for a in register._actions if "--steps" in a.option_strings]
    assert "0: the model's own" in steps.help and "'agentreg info MODEL' shows it" in steps.help
    assert "prostate" not in steps.help


# -- what must run ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_2d_model(tiny_pipeline):
    return tiny_pipeline(2)["bundle"]


@pytest.fixture(scope="module")
def real_slices(native):
    """Axial slices of native subjects 13 (fixed) and 19 (moving), with their labels."""
    out = {}
    for role, case, index in (("fixed", "13", 8), ("moving", "19", 11)):
        for kind in ("image", "label"):
            out[role + ("" if kind == "image" else "_label")] = sitk.ReadImage(
                str(native / f"case{case}_{kind}.nii.gz"))[:, :, index]
    return out


def _write_pair(folder: Path, images: dict[str, sitk.Image]) -> dict[str, Path]:
    return {key: _write(folder, f"{key}.nrrd", image) for key, image in images.items()}


def _run(capsys, argv) -> tuple[dict, str]:
    assert main(argv) == 0, capsys.readouterr().err
    out = Path(argv[argv.index("--output-dir") + 1])
    return json.loads((out / register_folder.METRICS_JSON).read_text()), capsys.readouterr().err


@pytest.mark.parametrize("pixel", [sitk.sitkInt16, sitk.sitkUInt8, sitk.sitkFloat64])
def test_integer_and_float64_images_register(tmp_path, capsys, tiny_2d_model, real_slices, pixel):
    images = {k: (sitk.Cast(sitk.RescaleIntensity(v, 0, 250), pixel) if "label" not in k else v)
              for k, v in real_slices.items()}
    metrics, _ = _run(capsys, _argv(_write_pair(tmp_path, images), tiny_2d_model, tmp_path / "out", "--steps", "3"))
    assert metrics["steps"] == 3 and 0.0 < metrics["dice_after"] <= 1.0
    assert sitk.ReadImage(str(tmp_path / "out" / register_folder.WARPED)).GetPixelID() == pixel


def _stored_flipped(image: sitk.Image, axis: int) -> sitk.Image:
    """The same physical image stored with ``axis`` reversed (its direction column negated)."""
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.flip(array, axis=array.ndim - 1 - axis).copy())
    out.SetSpacing(image.GetSpacing())
    corner = [0] * image.GetDimension()
    corner[axis] = image.GetSize()[axis] - 1
    out.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)
    direction[:, axis] *= -1
    out.SetDirection(direction.ravel().tolist())
    return out


def _anisotropic(image: sitk.Image, factors: tuple[float, float], label: bool) -> sitk.Image:
    """The same physical image sampled with its spacing multiplied by ``factors`` (same origin and direction)."""
    spacing = [s * f for s, f in zip(image.GetSpacing(), factors, strict=True)]
    size = [round(n / f) for n, f in zip(image.GetSize(), factors, strict=True)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                         image.GetOrigin(), spacing, image.GetDirection(), 0, image.GetPixelID())


def test_flipped_anisotropic_images_register_in_the_fixed_geometry(tmp_path, capsys, tiny_2d_model, real_slices):
    images = {}
    for key, image in real_slices.items():
        fixed = key.startswith("fixed")
        image = _anisotropic(image, (0.75, 1.5) if fixed else (1.4, 0.8), "label" in key)
        images[key] = _stored_flipped(image, 0 if fixed else 1)
    paths = _write_pair(tmp_path, images)
    metrics, _ = _run(capsys, _argv(paths, tiny_2d_model, tmp_path / "out", "--steps", "3"))
    warped = sitk.ReadImage(str(tmp_path / "out" / register_folder.WARPED))
    assert np.allclose(warped.GetDirection(), images["fixed"].GetDirection()) and warped.GetDirection()[0] < 0
    assert warped.GetSpacing() == pytest.approx(images["fixed"].GetSpacing())
    assert metrics["prealignment"] == "ok" and metrics["dice_before"] > 0.5 and metrics["dice_after"] > 0.5


def test_zero_steps_runs_the_models_default(tmp_path, capsys, tiny_2d_model, real_slices):
    from AgentRegistrationLib.model.bundle import load_bundle

    paths = _write_pair(tmp_path, {k: v for k, v in real_slices.items() if "label" not in k})
    metrics, _ = _run(capsys, _argv(paths, tiny_2d_model, tmp_path / "out", "--steps", "0"))
    assert metrics["steps"] == load_bundle(tiny_2d_model).agent_settings().steps > 0


def test_a_label_resampled_on_purpose_runs_and_says_so(tmp_path, capsys, tiny_2d_model, real_slices):
    images = dict(real_slices)
    images["fixed_label"] = sitk.Resample(real_slices["fixed_label"], [200, 180], sitk.Transform(),
                                          sitk.sitkNearestNeighbor, real_slices["fixed"].GetOrigin(), (0.6, 0.6),
                                          real_slices["fixed"].GetDirection(), 0)
    metrics, err = _run(capsys, _argv(_write_pair(tmp_path, images), tiny_2d_model, tmp_path / "out", "--steps", "2",
                                      "--resample-labels"))
    assert "agentreg: warning: fixed label" in err and "was resampled onto the fixed image's grid" in err
    assert 0.0 < metrics["dice_before"] <= 1.0


def test_progress_is_reported_from_the_first_line_stage_by_stage(tmp_path, capsys, tiny_2d_model, real_slices):
    paths = _write_pair(tmp_path, real_slices)
    assert main(_argv(paths, tiny_2d_model, tmp_path / "out", "--steps", "4", "--progress-json")) == 0
    received = [messages.parse_progress_line(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert received[0] == {"stage": "read", "done": 0, "total": 5}  # before any file is read or torch imported
    stages = [m["stage"] for m in received]
    assert stages == ["read"] * 6 + ["prealign", "register"] + ["register"] * 4 + ["resample", "write", "done"]
    assert [m["done"] for m in received if m["stage"] == "read"] == [0, 1, 2, 3, 4, 5]
    assert [messages.progress_text(m) for m in received[6:8]] == ["Pre-aligning (translation) and cropping",
                                                                  "Registering: 0 / 4"]
    assert messages.progress_range(received[6]) == (0, 0, 0)  # busy while the pre-alignment runs
    assert messages.progress_range(received[3]) == (0, 5, 3)
    assert messages.progress_range(received[-1]) is None


# -- mix-ups: each names the argument and the likely swap ----------------------------------------------------------
def test_a_label_given_as_the_fixed_image_is_named_as_a_likely_mix_up(grid128, tmp_path, capsys):
    code = main(["register", "--fixed", str(grid128 / "case02_label.nii.gz"), "--moving",
                 str(grid128 / "case30_image.nii.gz"), "--model", str(SHIPPED / "prostate-3d.pt"),
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "holds only the values 0, 1: it looks like a label map" in err
    assert "as the fixed image (--fixed) and its label as the fixed label (--fixed-label)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_an_image_given_as_a_label_is_named_as_a_likely_mix_up(grid128, tmp_path, capsys, which):
    case = "02" if which == "fixed" else "30"
    code = main(["register", "--fixed", str(grid128 / "case02_image.nii.gz"), "--moving",
                 str(grid128 / "case30_image.nii.gz"), f"--{which}-label", str(grid128 / f"case{case}_image.nii.gz"),
                 "--model", str(SHIPPED / "prostate-3d.pt"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "it looks like a grey-level image, not a label map" in err
    assert f"as the {which} label (--{which}-label) and the image as the {which} image (--{which})" in err
    assert "do not overlap" not in err and not (tmp_path / "out").exists()


def _labelled_run(grid128, tmp_path, capsys, fixed: str, moving: str, fixed_label: str, moving_label: str):
    out = tmp_path / f"{fixed_label}_{moving_label}"
    code = main(["register", "--fixed", str(grid128 / f"{fixed}_image.nii.gz"), "--moving",
                 str(grid128 / f"{moving}_image.nii.gz"), "--fixed-label", str(grid128 / f"{fixed_label}_label.nii.gz"),
                 "--moving-label", str(grid128 / f"{moving_label}_label.nii.gz"), "--model",
                 str(SHIPPED / "prostate-3d.pt"), "--output-dir", str(out), "--steps", "5"])
    assert code == 0
    return capsys.readouterr().err, register_folder.read_metrics(out / register_folder.METRICS_JSON)


def test_swapped_labels_and_a_label_off_its_organ_are_warned(grid128, tmp_path, capsys):
    """Swapped on the same grid (validation subjects case09 and case32), the labels lie on each other's organ; a
    label of another subject lies off the fixed organ; the right labels get no warning."""
    err, metrics = _labelled_run(grid128, tmp_path, capsys, "case09", "case32", "case32", "case09")
    assert "warning: the fixed and moving labels look swapped" in err and "give each image its own label" in err
    assert "look swapped" in metrics["label_warning"]
    err, metrics = _labelled_run(grid128, tmp_path, capsys, "case09", "case32", "case17", "case32")
    assert "the fixed label does not lie on the organ the localiser finds in the fixed image" in err
    assert "moving label does not" not in err and "look swapped" not in err
    err, metrics = _labelled_run(grid128, tmp_path, capsys, "case09", "case32", "case09", "case32")
    assert "label_warning" not in metrics and "does not lie on the organ" not in err
