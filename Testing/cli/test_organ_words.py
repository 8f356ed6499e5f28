"""The organ's name (issue 30): a model of another organ never speaks of the prostate.

The name comes from the data (``agentreg groundtruth --organ``, or ``agentreg train --organ``), is stored in the model
bundle and its card, and every message of ``agentreg register`` uses it; a bundle that records none (the shipped ones,
made before the name was recorded) is the prostate model. Real parts: the tiny 2-D model that crops on the organ of
``tiny_pipeline``, renamed, on real native PROMISE12 slices.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main, parser
from AgentRegistrationLib.contract import messages
from AgentRegistrationLib.contract.paths import shipped_model
from AgentRegistrationLib.data.organ_box import localisation_from_label
from AgentRegistrationLib.model.bundle import DEFAULT_ORGAN, load_bundle
from AgentRegistrationLib.model.card import model_card
from AgentRegistrationLib.stages.training_finish import add_localisation

ORGAN = "hippocampus"


@pytest.fixture(scope="module")
def organ_model(tiny_pipeline, native_slice, tmp_path_factory):
    """The tiny 2-D organ model named ``hippocampus`` (with the organ's typical size, so that a point places the fixed
    crop), and a real pair of slices with their labels."""
    folder = tmp_path_factory.mktemp("organ_words")
    paths = {}
    for key, (case, origin, spacing) in {"fixed": ("13", (12.5, -30.0), (0.6, 0.6)),
                                         "moving": ("19", (16.0, -33.0), (0.58, 0.62))}.items():
        image, label = native_slice(case, None, origin, spacing)
        for kind, item in (("image", image), ("label", label)):
            paths[f"{key}_{kind}"] = folder / f"{key}_{kind}.nii.gz"
            sitk.WriteImage(item, str(paths[f"{key}_{kind}"]), True)
    bundle = load_bundle(tiny_pipeline(2, "organ")["bundle"])
    add_localisation(bundle, None, str(folder), ["fixed", "moving"])
    bundle.organ = ORGAN
    bundle.save(folder / "model.pt")
    paths["model"] = folder / "model.pt"
    paths["centre"] = localisation_from_label(sitk.ReadImage(str(paths["fixed_label"]))).centre
    return paths


def _run(argv: list[str]) -> tuple[int, str]:
    """``agentreg`` with ``argv``: its exit status and everything it printed (stdout and stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:  # --help
            status = exit_.code
    return status, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("progress_json", [False, True])
def test_register_with_a_model_of_another_organ_never_says_prostate(organ_model, tmp_path, progress_json):
    point = ",".join(f"{v:.3f}" for v in organ_model["centre"])
    status, printed = _run(["register", "--fixed", organ_model["fixed_image"], "--moving", organ_model["moving_image"],
                            "--fixed-label", organ_model["fixed_label"], "--moving-label", organ_model["moving_label"],
                            "--model", organ_model["model"], "--output-dir", tmp_path / "out", "--device", "cpu",
                            "--steps", "3", f"--fixed-point={point}", *(["--progress-json"] if progress_json else [])])
    assert status == 0, printed
    assert "prostate" not in printed.lower()
    if progress_json:  # the Slicer module's status line is made from the message
        first = next(messages.parse_progress_line(line) for line in printed.splitlines() if '"localise"' in line)
        assert messages.progress_text(first) == f"Finding the {ORGAN} and cropping"
    else:
        assert f"Finding the {ORGAN} and cropping" in printed
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir() if p.suffix in (".json", ".csv"))
    assert written and "prostate" not in written.lower()


def test_register_help_never_says_prostate():
    status, printed = _run(["register", "--help"])
    assert status == 0 and "--fixed-label" in printed
    assert "prostate" not in printed.lower()


def test_the_model_card_names_the_organ_and_the_batch_size_trained_with(organ_model):
    bundle = load_bundle(organ_model["model"])
    assert bundle.organ == ORGAN
    bundle.training["config"]["batch_size"] = 0  # the configuration's "the paper's"
    card = model_card(bundle, "model")
    assert f"**Organ**: {ORGAN}" in card and f"centred on its {ORGAN}" in card
    assert "batch_size=0" not in card and "batch_size=65 (the paper's)" in card  # a 2-D model: the paper's 65
    assert "prostate" not in card.lower()


def test_a_bundle_that_records_no_organ_is_the_shipped_prostate_model():
    path = shipped_model(3)
    if not path.is_file():
        pytest.skip(f"the shipped model {path} is not here")
    bundle = load_bundle(path)
    assert bundle.organ == "prostate"
    assert "Finding the prostate and cropping" == messages.stage_title("localise", bundle.organ)
    assert messages.stage_title("localise") == f"Finding the {DEFAULT_ORGAN} and cropping"


def test_a_wrong_organ_name_names_the_option_and_value(capsys):
    with pytest.raises(SystemExit):
        parser.build_parser().parse_args(["groundtruth", "data", "--out", "o", "--organ", "a/b"])
    assert "--organ 'a/b'" in capsys.readouterr().err
    assert parser.build_parser().parse_args(["train", "--groundtruth", "g", "--sdm", "s", "--out", "m",
                                             "--organ", " left  hippocampus "]).organ == "left hippocampus"


def test_the_organ_travels_from_the_ground_truth_to_the_model(organ_model, tiny_pipeline, tmp_path):
    """groundtruth --organ is recorded in the ground truth's summary; agentreg train takes it into the model (its own
    --organ first); without either the model says 'organ'."""
    import shutil

    from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary

    gt = tmp_path / "gt"
    shutil.copytree(tiny_pipeline(2)["gt"], gt)
    summary = GroundTruthSummary.load(gt)
    summary.organ = "kidney"
    summary.save(gt)
    assert json.loads(GroundTruthSummary.path(gt).read_text())["organ"] == "kidney"
    base = ["train", "--groundtruth", gt, "--sdm", tiny_pipeline(2)["sdm"], "--device", "cpu", "--threads", "1",
            "--set", "iterations=2", "--set", "batch_size=2", "--step-pairs", "0"]
    assert _run([*base, "--out", tmp_path / "a.pt"])[0] == 0
    assert _run([*base, "--out", tmp_path / "b.pt", "--organ", "liver"])[0] == 0
    assert load_bundle(tmp_path / "a.pt").organ == "kidney" and load_bundle(tmp_path / "b.pt").organ == "liver"
    summary.organ = ""
    summary.save(gt)
    assert _run([*base, "--out", tmp_path / "c.pt", "--checkpoint", tmp_path / "c.ckpt"])[0] == 0
    assert load_bundle(tmp_path / "c.pt").organ == DEFAULT_ORGAN
