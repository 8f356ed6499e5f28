"""The engine-module contract (``AgentRegistrationLib.contract``): messages as the engine's real ``Reporter``
and workers print them, the command lines as the real ``agentreg`` parser reads them, and the training
stages run for real (ground truth, SDM, training on grid128 subjects) through the worker job the training
module uses, each of their progress lines rendered by the widget's functions."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from AgentRegistrationGUILib import dependencies, jobs
from AgentRegistrationLib.cli import commands, main, parser
from AgentRegistrationLib.cli.progress import Reporter
from AgentRegistrationLib.contract import (
    layout,
    messages,
    register_folder,
    training_config,
    training_folder,
    worker_commands,
)

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "AgentRegistration" / "AgentRegistration.py"
TRAINING_MODULE_FILE = REPO / "AgentRegistrationTraining" / "AgentRegistrationTraining.py"


# -- received --------------------------------------------------------------------------------------------------
def _printed(capsys) -> list[dict]:
    return [messages.parse_progress_line(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_the_engine_reporter_prints_messages_the_widget_renders(capsys):
    reporter = Reporter("train", 2000, json_lines=True)
    reporter.update(150, loss=0.0123, accuracy=0.41, val_dice=0.8)
    reporter.message("pair case00 -> case04 failed")
    (progress, note) = _printed(capsys)
    assert progress == {"stage": "train", "done": 150, "total": 2000, "loss": 0.0123, "accuracy": 0.41, "val_dice": 0.8}
    assert messages.progress_text(progress) == "Training: 150 / 2000, loss 0.0123, accuracy 0.41, validation Dice 0.8"
    assert messages.progress_fraction(progress) == pytest.approx(0.075)
    assert messages.progress_text(note) == "Training: pair case00 -> case04 failed"
    assert messages.progress_fraction(note) is None


def test_a_user_error_of_the_engine_is_one_error_message(capsys, tmp_path):
    code = main(["register", "--fixed", str(tmp_path / "missing.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
                     "--model", str(tmp_path / "b.pt"), "--output-dir", str(tmp_path / "out"), "--progress-json"])
    assert code == 1
    *progress, message = _printed(capsys)
    assert progress == [{"stage": "read", "done": 0, "total": 3}]  # progress from the first line, then one error
    assert message["stage"] == messages.STAGE_ERROR
    assert messages.progress_text(message).startswith("Error: ") and "missing.nii.gz" in message["message"]


def test_lines_that_are_not_messages_are_logs():
    assert messages.parse_progress_line("loading model ...") == {"stage": "log", "message": "loading model ..."}
    assert messages.parse_progress_line("[1, 2]") == {"stage": "log", "message": "[1, 2]"}
    assert messages.progress_text(messages.parse_progress_line("plain text")) == "plain text"


def test_a_stage_without_a_title_shows_its_name():
    assert messages.progress_text(messages.progress_message("elastix-e8", 3, 9)) == "elastix-e8: 3 / 9"


def test_progress_without_a_total_is_busy():
    assert messages.progress_fraction({"stage": "register", "done": 3, "total": 0}) is None
    assert messages.progress_fraction(messages.done_message(bundle="b.pt")) is None


# -- the metrics schema ------------------------------------------------------------------------------------------
def test_metrics_that_do_not_follow_the_schema_are_refused():
    good = {"steps": 3, "jacobian_folding_percent": 0.0, "log_jacobian_std": 0.1, "seconds_total": 1.0,
            "seconds_agent": 0.5}
    assert register_folder.check_metrics(good) is good
    with pytest.raises(ValueError, match="nested"):
        register_folder.check_metrics({**good, "seconds_total": {"total": 1.0}})
    with pytest.raises(ValueError, match="unknown keys \\['jacobian_log_jacobian_std'\\]"):
        register_folder.check_metrics({**good, "jacobian_log_jacobian_std": 0.1})
    with pytest.raises(ValueError, match="missing \\['steps'\\]"):
        register_folder.check_metrics({k: v for k, v in good.items() if k != "steps"})


# -- command builders, read by the real parser ------------------------------------------------------------------
def test_register_command_leaves_steps_and_fuzzy_k_to_the_model():
    command = worker_commands.register_command("python", Path("f"), Path("m"), Path("b.pt"), Path("o"), steps=0, fuzzy_k=0)
    args = parser.build_parser().parse_args(command[3:])
    assert args.steps is None and args.fuzzy_k is None and not args.no_fuzzy and args.progress_json


def test_register_command_carries_every_option(tmp_path):
    command = worker_commands.register_command("python", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "b.pt",
                                        tmp_path / "out", moving_label=tmp_path / "ml.nii.gz", device="GPU", steps=50,
                                        seed=3, fuzzy_k=2.0, save_steps=5)
    assert command[:4] == ["python", "-m", "AgentRegistrationLib.cli", "register"]
    args = parser.build_parser().parse_args(command[3:])
    assert (args.device, args.steps, args.seed, args.fuzzy_k, args.save_steps) == ("cuda", 50, 3, 2.0, 5)
    assert args.moving_label == str(tmp_path / "ml.nii.gz") and args.fixed_label is None


def test_register_command_without_fuzzy_control():
    command = worker_commands.register_command("python", Path("f"), Path("m"), Path("b.pt"), Path("o"),
                                        fuzzy_action_control=False, fuzzy_k=2.0)
    args = parser.build_parser().parse_args(command[3:])
    assert args.no_fuzzy and args.fuzzy_k is None


def test_a_fixed_point_has_one_grammar_for_the_command_line_and_a_csv_of_pairs():
    from AgentRegistrationLib.contract.points import parse_point, point_text

    point = (-12.5, 30.0, 4.123456789)
    assert parse_point(point_text(point)) == point  # as the worker command writes it, read back exactly
    assert parse_point("1, 2.5;-3 4") == (1.0, 2.5, -3.0, 4.0)
    assert parse_point("") is None and parse_point("  ") is None and parse_point(None) is None
    assert commands._point("-12.5,30,4").tolist() == [-12.5, 30.0, 4.0]  # agentreg register's, as an array
    with pytest.raises(ValueError, match=r"--fixed-point '12,x': give the point as numbers separated by commas"):
        commands._point("12,x")


@pytest.mark.parametrize("bad", [{"device": "TPU"}, {"steps": -1}, {"fuzzy_k": -1.0}])
def test_register_command_refuses_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[-1]):
        worker_commands.register_command("python", Path("f"), Path("m"), Path("b.pt"), Path("o"), **bad)


def test_training_commands_parse_with_the_engine_parser(tmp_path):
    files = training_folder.TrainingFiles(tmp_path, "mine")
    commands = worker_commands.training_commands("python", tmp_path / "data", files, dim=2, configuration="paper",
                                          max_minutes=5, stage_options={"train": {"set": ["iterations=10", "seed=1"]}})
    gt, sdm, _, train = (parser.build_parser().parse_args(c[3:]) for c in commands)
    assert (gt.command, gt.dim, gt.out) == ("groundtruth", 2, str(files.groundtruth))
    assert (sdm.modes, sdm.out) == (training_folder.PAPER_MODES[2], str(files.sdm))
    assert (train.config, train.out, train.checkpoint, train.max_minutes) == ("paper", str(files.bundle),
                                                                              str(files.checkpoint), 5.0)
    assert train.set == ["iterations=10", "seed=1"]
    few = worker_commands.training_commands("python", tmp_path / "data", files, dim=2, augment=0.5, new_subjects=0.25,
                                     stage_options={"train": {"set": ["iterations=10"]}})[-1]
    overrides = parser.build_parser().parse_args(few[3:]).set
    assert overrides == ["iterations=10", "augment=0.5", "new_subjects=0.25"]
    configured = training_config.config_by_name("converge").with_overrides(overrides)
    assert (configured.augment, configured.new_subjects, configured.iterations) == (0.5, 0.25, 10)
    plain = worker_commands.training_commands("python", tmp_path / "data", files, dim=2)[-1]
    assert parser.build_parser().parse_args(plain[3:]).set is None  # none given: the named configuration as it is


def test_the_organ_of_the_training_module_reaches_the_ground_truth_and_the_model(tmp_path):
    files = training_folder.TrainingFiles(tmp_path, "mine")
    named = worker_commands.training_commands("python", tmp_path / "data", files, dim=3, organ="  left  hippocampus ")
    gt, *_, train = (parser.build_parser().parse_args(c[3:]) for c in named)
    assert gt.organ == train.organ == "left hippocampus"
    unnamed = worker_commands.training_commands("python", tmp_path / "data", files, dim=3, organ=" ")
    gt, *_, train = (parser.build_parser().parse_args(c[3:]) for c in unnamed)
    assert gt.organ is None and train.organ is None  # the engine's default, 'organ'
    with pytest.raises(ValueError, match="--organ 'lung/heart'"):
        worker_commands.training_commands("python", tmp_path / "data", files, dim=3, organ="lung/heart")


def test_every_training_configuration_is_described_in_the_help_and_the_module_tooltip(capsys):
    text = training_config.configurations_text()
    assert all(f"{name} (" in text for name in training_config.TRAINING_CONFIGURATIONS)
    assert "converge (" in text and text.count("; the default") == 1
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert " ".join(text.split()) in " ".join(capsys.readouterr().out.split())
    module = TRAINING_MODULE_FILE.read_text()  # the combo box's tooltip is the same text, set when the module starts
    assert "configurationComboBox.toolTip = " in module and "training_config.configurations_text()" in module


def test_the_module_and_the_command_line_train_with_the_same_default_configuration(tmp_path):
    command = worker_commands.training_commands("python", tmp_path, training_folder.TrainingFiles(tmp_path, "mine"))[-1]
    from_module = parser.build_parser().parse_args(command[3:]).config
    typed = parser.build_parser().parse_args(["train", "--groundtruth", "g", "--sdm", "s", "--out", "o.pt"]).config
    assert from_module == typed == training_config.DEFAULT_TRAINING_CONFIGURATION == "converge"


@pytest.mark.parametrize("bad", [{"dim": 4}, {"configuration": "huge"}, {"device": "TPU"},
                                 {"stage_options": {"evaluate": {}}}, {"augment": 1.5}, {"new_subjects": -0.1}])
def test_training_commands_refuse_bad_values(tmp_path, bad):
    with pytest.raises(ValueError):
        worker_commands.training_commands("python", tmp_path, training_folder.TrainingFiles(tmp_path, "m"), **bad)


# -- models and layout ---------------------------------------------------------------------------------------------
def test_the_default_model_is_the_shipped_3d_model():
    models = layout.available_models([folder / "Models" for folder in layout.resource_dirs(MODULE_FILE)])
    assert {"prostate-2d", "prostate-3d"} <= set(models)
    assert layout.default_model(models) == REPO / "Resources" / "Models" / "prostate-3d.pt"


def test_a_model_added_later_is_listed_on_the_next_call(tmp_path):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    (shipped / "prostate-3d.pt").write_bytes(b"x")
    (shipped / "prostate-3d.md").write_text("card")
    assert layout.available_models([shipped, user]) == {"prostate-3d": shipped / "prostate-3d.pt"}
    trained = tmp_path / "out" / "mine.pt"
    trained.parent.mkdir()
    trained.write_bytes(b"y")
    assert layout.install_model(trained, user) == user / "mine.pt"
    assert layout.available_models([shipped, user]) == {"prostate-3d": shipped / "prostate-3d.pt",
                                                          "mine": user / "mine.pt"}
    assert [p.name for p in user.iterdir()] == ["mine.pt"]  # no partial file left


def test_engine_dir_in_the_source_tree():
    assert layout.engine_dir(MODULE_FILE) == REPO / "AgentRegistration"
    assert layout.engine_dir(TRAINING_MODULE_FILE) == REPO / "AgentRegistration"


def test_engine_dir_missing_says_to_reinstall(tmp_path):
    (tmp_path / "Module.py").write_text("")
    with pytest.raises(FileNotFoundError, match="reinstall"):
        layout.engine_dir(tmp_path / "Module.py")


def test_sample_data_is_shipped_small_and_documented():
    files = layout.sample_data_files(MODULE_FILE)
    assert sum(p.stat().st_size for p in files.values()) < 2_000_000
    readme = (files["fixed"].parent / "README.md").read_text()
    assert all(p.name in readme for p in files.values()) and "promise12" in readme


def test_missing_sample_data_is_an_error_not_a_skip(tmp_path):
    (tmp_path / "Module.py").write_text("")
    with pytest.raises(FileNotFoundError, match="sample data missing"):
        layout.sample_data_files(tmp_path / "Module.py")


# -- worker process ------------------------------------------------------------------------------------------------
def test_worker_environment_puts_the_engine_first(tmp_path):
    env = jobs.worker_environment(tmp_path, base={"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":")[:2] == [str(tmp_path), "/elsewhere"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks the child through /proc")
def test_worker_cancel_kills_the_process_tree(tmp_path):
    """Process plumbing only: a worker that starts a child and hangs; Cancel must kill both."""
    child_pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
              "time.sleep(60)\n")
    job = jobs.WorkerJob([[sys.executable, "-c", script]]).start()
    deadline = time.monotonic() + 20
    while not child_pid_file.is_file() or not child_pid_file.read_text():
        assert time.monotonic() < deadline, "worker did not start its child"
        time.sleep(0.02)
    child_pid = int(child_pid_file.read_text())
    job.cancel()
    assert job.done() and job.worker.returncode not in (None, 0) and not job.succeeded
    for _ in range(100):  # the orphaned child, if any, is reaped by init shortly after the kill
        try:
            with open(f"/proc/{child_pid}/stat") as handle:
                state = handle.read().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.02)
    else:
        pytest.fail("the worker's child process survived Cancel")


# -- the training stages, for real ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_run(grid128, tmp_path_factory):
    """The three commands the training module starts (2-D, 3 real subjects, few pairs and iterations), run by
    the same worker job, with the engine found from the training module's file."""
    root = tmp_path_factory.mktemp("training")
    data = root / "data"
    data.mkdir()
    for case in ("case00", "case04", "case06"):
        for kind in ("image", "label"):
            (data / f"{case}_{kind}.nii.gz").symlink_to(grid128 / f"{case}_{kind}.nii.gz")
    files = training_folder.TrainingFiles(root / "out", "mine")
    commands = worker_commands.training_commands(
        sys.executable, data, files, dim=2, device="CPU", modes=2, augment=0.5, new_subjects=0.5,
        stage_options={"groundtruth": {"iterations": 20, "resolutions": 1, "max_pairs": 4, "workers": 1},
                       "localiser": {"iterations": 20, "threads": 1},
                       "train": {"set": ["iterations=10", "batch_size=4", "validate_every=1000"], "step_pairs": 2}})
    files.checkpoint.parent.mkdir(parents=True)
    job = jobs.WorkerJob(commands, env=jobs.worker_environment(layout.engine_dir(TRAINING_MODULE_FILE)))
    received = job.start().wait(timeout=900)
    assert job.succeeded, job.error
    return {"files": files, "messages": received, "job": job}


def test_every_progress_line_of_the_training_stages_renders(training_run):
    received = [m for m in training_run["messages"] if m["stage"] != messages.STAGE_LOG]
    stages = [m["stage"] for m in received]
    assert {"preprocess", "groundtruth", "localiser", "train"} <= set(stages) and stages.count(messages.STAGE_DONE) == 4
    assert training_run["job"].stage_text() == "4/4: train"
    for message in received:
        text = messages.progress_text(message)
        assert text and not text.startswith("Error")
        if message["stage"] in messages.STAGE_TITLES:
            assert text.startswith(messages.STAGE_TITLES[message["stage"]])
    gt = [m for m in received if m["stage"] == "groundtruth"]
    assert messages.progress_fraction(gt[-1]) == 1.0 and "Dice" in messages.progress_text(gt[-1])
    train = [m for m in received if m["stage"] == "train"]
    assert train[-1]["done"] == 10 and "loss" in messages.progress_text(train[-1])
    assert json.dumps(training_run["job"].last_done)  # the last stage's done message names the bundle
    assert training_run["job"].last_done["bundle"] == str(training_run["files"].bundle)


def test_training_outputs_are_read_with_the_protocol_columns(training_run):
    files = training_run["files"]
    gt = training_folder.read_groundtruth_dice(files.gt_dice)
    assert len(gt["moving"]) == 4 and all(0.0 <= d <= 1.0 for d in gt["dice_after"])
    loss = training_folder.read_training_loss(files.loss)
    assert loss["iteration"][-1] == 10.0
    assert files.sdm.is_file() and files.bundle.is_file()
    from AgentRegistrationLib.model.bundle import load_bundle

    assert set(load_bundle(files.bundle).localisers) == {"2"}  # the localiser stage's file, put into the model


def test_the_few_subjects_settings_reach_the_trained_model(training_run):
    config = load_bundle_config(training_run["files"].bundle)
    assert (config["augment"], config["new_subjects"]) == (0.5, 0.5)
    assert config["iterations"] == 10  # the stage's own --set survives beside them


def load_bundle_config(path):
    from AgentRegistrationLib.model.bundle import load_bundle

    return load_bundle(path).training["config"]


# -- installing the dependencies (real pip, offline) -----------------------------------------------------------
def test_the_dependency_install_command_is_a_pip_command_line():
    requirements = dependencies.read_requirements(REPO / "Resources" / "requirements.txt", ["torch", "SimpleITK", "tqdm"])
    assert requirements == ["torch>=2.1", "SimpleITK>=2.3", "tqdm"]
    command = dependencies.dependency_install_command(sys.executable, requirements)
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and command[-3:] == requirements
    with pytest.raises(ValueError):
        dependencies.dependency_install_command(sys.executable, [])


def test_an_offline_install_of_an_installed_package_succeeds_with_pips_lines():
    command = dependencies.dependency_install_command(sys.executable, ["numpy"], ["--no-index", "--no-deps"])
    job = dependencies.DependencyInstallJob(command, ["numpy"]).start()
    lines = job.wait(timeout=120)
    assert job.succeeded, job.error
    assert any("numpy" in line for line in lines) and "numpy" in job.latest_line


def test_a_failed_install_says_what_to_do_and_shows_the_pip_command():
    name = "agentreg-no-such-package"
    command = dependencies.dependency_install_command(sys.executable, [name], ["--no-index"])
    job = dependencies.DependencyInstallJob(command, [name]).start()
    job.wait(timeout=120)
    assert job.done() and not job.succeeded
    assert "internet connection" in job.error and "Python console" in job.error
    assert f"slicer.util.pip_install('{name}')" in job.error
    assert f"-m pip install --disable-pip-version-check --no-index {name}" in job.error
    assert any(name in line for line in job.last_lines)  # pip's own error line is kept


def test_cancel_stops_a_running_install():
    job = dependencies.DependencyInstallJob([sys.executable, "-c", "import time; print('Collecting x', flush=True); "
                                         "time.sleep(60)"]).start()
    deadline = time.monotonic() + 30
    while "Collecting" not in job.latest_line and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert not job.done()
    job.cancel()
    job.wait(timeout=10)
    assert job.done() and job.cancelled and not job.succeeded and "cancelled" in job.error
    assert job.worker.returncode != 0
