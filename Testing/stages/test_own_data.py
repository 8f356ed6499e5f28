"""Training for one's own data, end to end through ``agentreg`` on a small folder of real subjects: ground truth
that fails for a subject with an empty mask (a summary and exit status 1), the rerun without it, the SDM, and
models trained on subjects given with ``--subjects`` (their model cards, their validation text, their default
number of steps and stop rule)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.cli.parser import build_parser
from AgentRegistrationLib.contract.paths import repo_file
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary

GOOD = ["case00", "case04", "case06"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def own_data(grid128, tmp_path_factory):
    """A user's data folder: three real subjects, one subject whose mask is empty on the middle slice that 2-D
    models use ("blank", case07's image, its prostate drawn on an end slice only), and
    two more real subjects for validation; a split file of the user's naming the validation subjects."""
    root = tmp_path_factory.mktemp("own")
    data = root / "my data"
    data.mkdir()
    for case in GOOD + ["case02", "case09"]:
        for kind in ("image", "label"):
            (data / f"{case}_{kind}.nii.gz").symlink_to(grid128 / f"{case}_{kind}.nii.gz")
    (data / "blank_image.nii.gz").symlink_to(grid128 / "case07_image.nii.gz")
    label = sitk.ReadImage(str(grid128 / "case07_label.nii.gz"))
    mask = sitk.GetArrayFromImage(label)
    off_centre = np.zeros_like(mask)
    off_centre[1] = mask[len(mask) // 2]  # the prostate drawn on an end slice only: no mask on the 2-D model's slice
    blank = sitk.GetImageFromArray(off_centre)
    blank.CopyInformation(label)
    sitk.WriteImage(blank, str(data / "blank_label.nii.gz"))
    split = root / "my_split.json"
    split.write_text(json.dumps({"train": GOOD, "validation": ["case02", "case09"]}))
    return {"root": root, "data": data, "split": split, "gt": root / "gt"}


def _groundtruth(own_data, subjects, *extra):
    return ["groundtruth", own_data["data"], "--subjects", ",".join(subjects), "--dim", "2", "--iterations", "20",
            "--resolutions", "1", "--workers", "1", "--geometry", "paper", "--out", own_data["gt"], *extra]


@pytest.fixture(scope="module")
def failed_run(own_data):
    """The first ground-truth run, with the blank subject (captured by hand: capsys is per test)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in _groundtruth(own_data, GOOD + ["blank"])])
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def test_groundtruth_with_a_subject_whose_pairs_all_fail_exits_1_with_a_summary(own_data, failed_run):
    assert failed_run["code"] == 1, failed_run["err"]
    err = failed_run["err"]
    assert "ground truth: 6 of 12 pairs done, 6 failed" in err
    assert "6 of 12 ground-truth pairs failed (50 %):" in err
    assert "  6 pairs: ValueError: cannot place surface points on an empty mask" in err
    assert "blank (6 of its 6)" in err  # the subject at fault first, with all its pairs
    assert "every pair failed for: blank" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("agentreg: error: too many ground-truth pairs failed (6 of 12; at most 10 % may fail")
    assert "leave them out (--subjects" in last and "finished pairs are kept" in last
    summary = GroundTruthSummary.load(own_data["gt"])
    assert summary.failed["subjects_without_pairs"] == ["blank"] and summary.failed["too_many"]
    assert len(list((own_data["gt"] / "pairs").glob("*.npz"))) == 6  # the pairs that succeeded are kept
    assert len(json.loads((own_data["gt"] / "failures.json").read_text())) == 6


def test_failed_groundtruth_is_one_error_message_for_the_training_module(own_data, failed_run, capsys):
    """Rerun as the training module runs it: the good pairs come from the cache, the failing ones fail again."""
    code, out, _ = _run(capsys, *_groundtruth(own_data, GOOD + ["blank"], "--progress-json"))
    messages = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 1
    assert messages[-1]["stage"] == "error" and "too many ground-truth pairs failed" in messages[-1]["message"]
    assert not any(m["stage"] == "done" for m in messages)


@pytest.fixture(scope="module")
def without_blank(own_data, failed_run):
    """The user leaves the blank subject out: every pair is cached, the run succeeds; then the SDM."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in _groundtruth(own_data, GOOD)])
        sdm = main(["sdm", str(own_data["gt"]), "--modes", "2", "--out", str(own_data["root"] / "sdm.npz")])
    assert sdm == 0
    return {"code": code, "err": err.getvalue()}


def test_groundtruth_without_the_failing_subject_succeeds_as_before(own_data, without_blank):
    assert without_blank["code"] == 0, without_blank["err"]
    assert "ground truth: 6 pairs (0 failed); Dice after GT registration median" in without_blank["err"]
    assert "failed" not in without_blank["err"].replace("(0 failed)", "")
    assert not (own_data["gt"] / "failures.json").exists()  # no stale list of the earlier run's failures
    summary = GroundTruthSummary.load(own_data["gt"])
    assert summary.source["selection"] == "subjects" and summary.failed is None
    assert "failed" not in json.loads(GroundTruthSummary.path(own_data["gt"]).read_text())


def _train(own_data, out, *extra):
    return ["train", "--groundtruth", own_data["gt"], "--sdm", own_data["root"] / "sdm.npz", "--out", out,
            "--device", "cpu", "--threads", "1", "--set", "iterations=10", "--set", "batch_size=4", *extra]


def test_a_model_trained_on_subjects_given_with_subjects(own_data, without_blank, tmp_path, capsys):
    """Default settings: the converge configuration, its stop rule, and a number of steps chosen on real training
    pairs; no validation, said in words; a card that names the user's data, not PROMISE12."""
    model = tmp_path / "mine.pt"
    code, _, err = _run(capsys, *_train(own_data, model))
    assert code == 0, err
    assert "validation {}" not in err
    assert "no validation (give --data and --split for validation on real pairs)" in err
    bundle = load_bundle(model)
    choice = bundle.training["step_choice"]
    curve = np.array(choice["dice_mean_by_step"])
    assert choice["pairs"] == 6 and curve.shape == (200,) and np.all((curve > 0) & (curve <= 1))
    assert bundle.agent_defaults["steps"] == choice["steps"] == int(curve.argmax()) + 1
    settings = bundle.agent_settings()
    assert settings.steps == choice["steps"] and settings.stop_when_no_action_helps
    assert bundle.training["config"]["name"] == "converge"
    assert f"default {choice['steps']} agent steps (best on 6 training pairs), stop rule on" in err

    code, card, _ = _run(capsys, "info", model)
    assert code == 0
    data_line = next(line for line in card.splitlines() if line.startswith("- **Data**"))
    assert "subjects given with --subjects" in data_line
    assert f"`{own_data['data'].resolve()}`" in data_line and f"`{own_data['gt'].resolve()}`" in data_line
    assert "training subjects case00, case04, case06 (3 subjects, 6 real GT pairs)" in data_line
    assert "PROMISE12" not in card and "promise12_split" not in card and "prostate" not in card
    assert f"{choice['steps']} steps (the best mean Dice over 1 to 200 steps on 6 real pairs of training subjects" in card
    assert "stop rule on" in card and "Validation of the saved model" not in card


def test_a_model_validated_on_the_users_split(own_data, without_blank, tmp_path, capsys):
    model = tmp_path / "validated.pt"
    code, _, err = _run(capsys, *_train(own_data, model, "--data", own_data["data"], "--split", own_data["split"],
                                        "--set", "validation_pairs=2", "--set", "validation_steps=3", "--step-pairs", "0"))
    assert code == 0, err
    assert "validation {" not in err and "validation on 2 real pairs of the validation subjects (3 steps): Dice" in err
    assert "default 200 agent steps, stop rule on" in err  # --step-pairs 0: no choice, the paper's 200
    bundle = load_bundle(model)
    assert "step_choice" not in bundle.training and "steps_chosen_by" not in bundle.agent_defaults
    code, card, _ = _run(capsys, "info", model)
    assert f"of the 'validation' subjects of `{own_data['split'].resolve()}` in `{own_data['data'].resolve()}`" in card
    assert "subjects given with --subjects" in card and "PROMISE12" not in card


def test_split_without_data_is_refused(own_data, tmp_path, capsys):
    code, _, err = _run(capsys, *_train(own_data, tmp_path / "x.pt", "--split", own_data["split"]))
    assert code == 1 and "--split needs --data" in err
    assert not (tmp_path / "x.pt").exists()


def test_fine_tuning_a_missing_model_is_refused_before_any_work(own_data, tmp_path, capsys):
    code, _, err = _run(capsys, *_train(own_data, tmp_path / "x.pt", "--init", tmp_path / "none.pt"))
    assert code == 1 and f"--init {tmp_path / 'none.pt'}: no such model file" in err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.checkpoint.pt").exists()


def test_train_help_documents_the_default_steps_and_stop_rule():
    parser = build_parser()
    assert parser.parse_args(["train", "--groundtruth", "g", "--sdm", "s", "--out", "o"]).config == "converge"
    text = " ".join(parser._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "the stop rule of its configuration (on with 'converge', the default" in text
    assert "the step count from 1 to 200 with the best mean Dice on --step-pairs real pairs of the training subjects" in text
    gt = " ".join(parser._subparsers._group_actions[0].choices["groundtruth"].format_help().split())
    assert "1 when more than 10 % of the pairs failed or some subject lost all its pairs" in gt


@pytest.mark.parametrize("dim", [2, 3])
def test_the_shipped_models_cards_name_promise12_and_its_split(dim, capsys):
    """The shipped 2-D bundle predates the data record: its training subjects, exactly the project split's, make its
    card name PROMISE12 and the split, as the committed card does; another set of subjects is not claimed to be.
    The 3-D bundle records its data (folder, split, ground truth), and its card says so."""
    from AgentRegistrationLib.model.card import model_card

    repo = repo_file()
    model = repo / "Resources" / "Models" / f"prostate-{dim}d.pt"
    code, card, _ = _run(capsys, "info", model, "--name", f"prostate-{dim}d")
    assert code == 0
    data_line = next(line for line in card.splitlines() if line.startswith("- **Data**"))
    committed = (repo / "Resources" / "Models" / f"prostate-{dim}d.md").read_text().splitlines()
    assert data_line in committed and "prostate T2w MR" in card
    bundle = load_bundle(model)
    if dim == 3:
        assert data_line.startswith("- **Data**: PROMISE12: training subjects case00, case03")
        assert "(31 subjects, 300 real GT pairs), the 'train' subjects of the split `Resources/promise12_split.json`" \
            in data_line and "metric `distance`" in data_line
        assert bundle.training["data"]["split"] == "Resources/promise12_split.json"
        return
    assert data_line.startswith("- **Data**: PROMISE12 (shared `grid128`), training subjects case00, case03")
    assert data_line.endswith("split `Resources/promise12_split.json`.")
    assert "data" not in bundle.training
    bundle.training["subjects"] = bundle.training["subjects"][:5]
    other = model_card(bundle, "other")
    assert "PROMISE12" not in other and "promise12_split" not in other and "see `results/`" not in other
    assert "where they came from (data folder, split) was not recorded in this model" in other
