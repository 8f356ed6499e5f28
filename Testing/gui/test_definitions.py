"""The choices and tooltips the modules show come from the engine's definitions (AgentRegistrationGUILib.definitions),
and agree with what the engine does: the models listed are the registration bundles with the defaults they carry,
the file types are the engine's list, the training stages are the commands the module starts; the .ui files hold no
second copy of a text the code sets, and the README counts the stages the module runs."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from AgentRegistrationGUILib import definitions
from AgentRegistrationLib.contract import layout, messages, training_config, training_folder, worker_commands
from AgentRegistrationLib.data import image_io
from AgentRegistrationLib.stages import cohort_pairs

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "Resources" / "Models"
MODULES = ("AgentRegistration", "AgentRegistrationTraining")
NUMBER_WORDS = {2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six"}


def _source(module: str) -> str:
    return (ROOT / module / f"{module}.py").read_text()


def _ui_widgets(module: str) -> dict[str, ET.Element]:
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    return {w.get("name"): w for w in tree.iter("widget")}


# --------------------------------------------------------------------------- models
def test_the_model_list_holds_the_shipped_registration_models_3d_first_and_no_localiser():
    choices = definitions.model_choices(layout.available_models([MODELS]))
    assert [c.name for c in choices] == ["prostate-3d", "prostate-2d"]
    assert sorted(p.stem for p in MODELS.glob("localiser-*.pt"))  # they are beside them, and left out
    assert layout.default_model({c.name: c.path for c in choices}) == MODELS / "prostate-3d.pt"


@pytest.mark.parametrize("name", ["prostate-3d", "prostate-2d"])
def test_each_model_says_the_defaults_its_bundle_carries(name):
    header = worker_commands.model_header(MODELS / f"{name}.pt")
    (choice,) = [c for c in definitions.model_choices(layout.available_models([MODELS])) if c.name == name]
    steps = header["agent_defaults"]["steps"]
    assert (choice.dim, choice.steps) == (header["dim"], steps)
    assert f"{steps} agent steps" in choice.tooltip and f"{choice.dim}-D" in choice.tooltip
    assert f"{steps} for {name}" in definitions.steps_tooltip(choice)
    assert f"{header['agent_defaults']['fuzzy_k']:g} for {name}" in definitions.fuzzy_k_tooltip(choice)


def test_a_model_file_chosen_elsewhere_is_listed_last_and_a_file_that_is_no_model_is_not(tmp_path):
    mine = tmp_path / "my-prostate.pt"
    shutil.copyfile(MODELS / "prostate-2d.pt", mine)
    choices = definitions.model_choices(layout.available_models([MODELS]), mine)
    assert choices[-1].path == mine and choices[-1].name == "my-prostate"
    assert definitions.choice_index(choices, mine) == len(choices) - 1
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_bytes(b"not a model")
    assert definitions.ModelChoice.of("notes", not_a_model) is None
    assert [c.name for c in definitions.model_choices({}, not_a_model)] == []
    assert definitions.choice_index(choices, not_a_model) is None


# --------------------------------------------------------------------------- what Apply needs
@pytest.mark.parametrize(("fixed", "moving", "model", "hint"), [
    (None, None, MODELS / "prostate-3d.pt", "Select a fixed volume and a moving volume (or press Load sample data)."),
    ("f", None, MODELS / "prostate-3d.pt", "Select a moving volume (or press Load sample data)."),
    ("f", "m", Path("."), "Choose a model."),
    ("f", "m", Path("/nowhere/model.pt"), "Choose a model."),
    (None, "m", None, "Select a fixed volume (or press Load sample data), and a model."),
    ("f", "m", MODELS / "prostate-3d.pt", ""),
])
def test_apply_says_what_it_still_needs(fixed, moving, model, hint):
    assert definitions.apply_hint(fixed, moving, model) == hint


# --------------------------------------------------------------------------- device, file types
def test_the_device_tooltip_names_every_device_the_engine_accepts():
    text = definitions.device_tooltip()
    assert all(f"{label}:" in text for label in worker_commands.DEVICE_CHOICES)


def test_the_file_type_tooltips_list_every_extension_the_engine_accepts_and_dicom_series_folders():
    accepted = cohort_pairs.IMAGE_SUFFIXES  # what a folder of patients may hold (register-many reads it)
    assert set(definitions.image_file_types()) == set(accepted)
    assert callable(image_io.dicom_series)  # the engine reads a folder of one DICOM series as an image
    for text in (definitions.training_data_tooltip(), definitions.patients_folder_tooltip()):
        assert all(suffix in text for suffix in accepted), text
        assert definitions.DICOM_FOLDER_TEXT in text


def test_the_training_data_folder_accepts_each_listed_type(tmp_path):
    """The training folder's subjects are found for every file type the tooltip lists (dataset.find_subjects)."""
    from AgentRegistrationLib.data.dataset import find_subjects

    for suffix in definitions.image_file_types():
        (tmp_path / f"case{suffix.replace('.', '_')}_image{suffix}").write_bytes(b"")
        (tmp_path / f"case{suffix.replace('.', '_')}_label{suffix}").write_bytes(b"")
    assert len(find_subjects(tmp_path)) == len(definitions.image_file_types())


# --------------------------------------------------------------------------- training stages
@pytest.mark.parametrize("geometry", training_folder.GEOMETRY_CHOICES)
def test_the_training_stages_are_the_commands_the_module_starts(geometry):
    stages = definitions.training_stages(geometry)
    assert stages[0] == "groundtruth" and stages[-1] == "train"
    assert ("localiser" in stages) == (geometry == "auto")  # only a model that crops on the organ needs one
    text = definitions.training_stages_text(geometry)
    assert text.startswith(f"{len(stages)} stages in turn: ")
    assert all(messages.STAGE_TITLES[stage] in text for stage in stages)


def test_the_readme_counts_the_stages_training_runs():
    readme = (ROOT / "README.md").read_text()
    default = len(definitions.training_stages(training_folder.DEFAULT_GEOMETRY))
    paper = len(definitions.training_stages("paper"))
    assert f"{NUMBER_WORDS[default]} stages run in turn" in readme
    assert re.search(rf"paper's geometry.*{NUMBER_WORDS[paper].lower()} stages", readme, re.S)
    assert not re.search(r"\b(?:Two|Three|Five|Six) stages run in turn", readme.replace(NUMBER_WORDS[default], ""))


def test_the_training_module_names_its_stages_from_the_engine_and_says_train_not_apply():
    source = _source("AgentRegistrationTraining")
    assert "definitions.training_stages_text(" in source
    ui = (ROOT / "AgentRegistrationTraining" / "Resources" / "UI" / "AgentRegistrationTraining.ui").read_text()
    assert "Apply" not in ui and "Apply again" not in source  # its button says Train
    assert "Train again" in ui


def test_the_configuration_choices_are_the_engine_configurations():
    source = _source("AgentRegistrationTraining")
    assert "Choice(CONFIGURATIONS)" in source and "CONFIGURATIONS = list(training_config.TRAINING_CONFIGURATIONS)" in source
    assert "training_config.configurations_text()" in source
    assert all(name in training_config.configurations_text() for name in training_config.TRAINING_CONFIGURATIONS)


# --------------------------------------------------------------------------- one source per text
@pytest.mark.parametrize("module", MODULES)
def test_a_tooltip_the_code_sets_has_no_second_copy_in_the_ui(module):
    """Each widget whose tooltip the code makes from the engine's definitions has none in the .ui (two sources would
    drift), and the .ui spells out no file extension list (the code's tooltips carry the engine's)."""
    source = _source(module)
    set_in_code = set(re.findall(r"self\.ui\.(\w+)\.toolTip = (?:definitions|_\()", source))
    assert set_in_code, f"{module}.py sets no tooltip from the engine's definitions"
    widgets = _ui_widgets(module)
    for name in set_in_code:
        assert name in widgets, name
        assert all(p.get("name") != "toolTip" for p in widgets[name].findall("property")), (
            f"{name} has a tooltip in {module}.ui and one set by {module}.py")
    ui = (ROOT / module / "Resources" / "UI" / f"{module}.ui").read_text()
    assert not re.search(r"\.nii\.gz|NIfTI, NRRD", ui)


def test_the_registration_module_sets_its_generated_tooltips():
    source = _source("AgentRegistration")
    for call in ("definitions.device_tooltip()", "definitions.patients_folder_tooltip()",
                 "definitions.steps_tooltip(", "definitions.fuzzy_k_tooltip(", "definitions.apply_hint("):
        assert call in source, call


@pytest.mark.parametrize(("module", "field", "source"), [
    ("AgentRegistration", "device", "Choice(list(worker_commands.DEVICE_CHOICES))"),
    ("AgentRegistrationTraining", "device", "Choice(list(worker_commands.DEVICE_CHOICES))"),
    ("AgentRegistrationTraining", "configuration", "Choice(CONFIGURATIONS)"),
    ("AgentRegistrationTraining", "dimension", "Choice(list(DIMENSIONS))"),
    ("AgentRegistrationTraining", "geometry", "Choice(list(training_folder.GEOMETRY_CHOICES))"),
    ("AgentRegistrationTraining", "groundTruthMetric", "*training_folder.GT_METRICS"),
])
def test_every_choice_list_is_the_engines(module, field, source):
    """Each combo box's choices are a parameter node ``Choice`` made from an engine constant, never a list typed here."""
    line = next(line for line in _source(module).splitlines() if re.match(rf"\s+{field}: Annotated\[", line))
    assert source in line, line


def test_the_dimension_choices_are_the_engines_dimensions():
    source = _source("AgentRegistrationTraining")
    assert 'DIMENSIONS = {f"{dim}-D": dim for dim in sorted(training_folder.PAPER_MODES, reverse=True)}' in source
