"""The choices and tooltips the two modules show, made from the engine's definitions, so that they cannot drift from
what the engine does: the models a user can pick (the registration bundles, each with its own defaults), the image
files a folder may hold, the stages of training, and what Apply still needs. Qt-free: the module files put these texts
on their widgets at setup, and the tests check them against the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from AgentRegistrationLib.contract import messages, training_folder, worker_commands
from AgentRegistrationLib.stages.cohort_pairs import IMAGE_SUFFIXES

PAPER_STEPS = 200
"""The agent steps of the paper's test (Krebs et al. 2017, Sec. 3), for the tooltips that compare with it."""


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelChoice:
    """One registration model a user can pick: its name (the bundle's file name without ``.pt``), file, dimension and
    the agent defaults it carries (read from the bundle's header, without torch)."""

    name: str
    path: Path
    dim: int
    steps: int | None = None
    fuzzy_k: float | None = None

    @classmethod
    def of(cls, name: str, path: Path) -> ModelChoice | None:
        """The choice for a model file, or ``None`` when it is no registration bundle (e.g. an organ localiser)."""
        try:
            header = worker_commands.model_header(path)
        except ValueError:
            return None
        defaults = header["agent_defaults"]
        steps, fuzzy_k = defaults.get("steps"), defaults.get("fuzzy_k")
        return cls(name, Path(path), int(header["dim"]), int(steps) if steps else None,
                   float(fuzzy_k) if fuzzy_k is not None else None)

    @property
    def tooltip(self) -> str:
        """What the model registers and its defaults, then its file."""
        what = "3-D: registers volumes" if self.dim == 3 else "2-D: registers single-slice volumes"
        defaults = [f"{self.steps} agent steps" if self.steps else "",
                    f"fuzzy k {self.fuzzy_k:g}" if self.fuzzy_k is not None else ""]
        shown = ", ".join(d for d in defaults if d)
        return f"{self.name} ({what}{'; by default ' + shown if shown else ''}). {self.path}"


def model_choices(models: Mapping[str, Path], chosen: Path | None = None) -> list[ModelChoice]:
    """The registration bundles among ``models`` (:func:`layout.available_models`; an organ localiser stored beside
    them is left out), 3-D before 2-D, then ``chosen`` (a file the user picked elsewhere) when it is not among them."""
    choices = [c for c in (ModelChoice.of(name, path) for name, path in models.items()) if c is not None]
    choices.sort(key=lambda c: -c.dim)  # stable: the folders' order within a dimension
    if chosen is not None and Path(chosen).is_file() and all(c.path != Path(chosen) for c in choices):
        extra = ModelChoice.of(Path(chosen).stem, Path(chosen))
        if extra is not None:
            choices.append(extra)
    return choices


def choice_index(choices: list[ModelChoice], path: Path | None) -> int | None:
    """The position of the model file ``path`` among ``choices``, or ``None``."""
    return next((i for i, c in enumerate(choices) if path is not None and c.path == Path(path)), None)


def steps_tooltip(choice: ModelChoice | None) -> str:
    """The agent steps spin box's tooltip: what 0 ("model's default") means for the chosen model."""
    default = (f"{choice.steps} for {choice.name}, chosen on its training pairs" if choice and choice.steps
               else "chosen on its training pairs")
    return (f"Agent steps (MDP steps). The model's default: {default}; a model with a stop rule may end sooner. "
            f"The paper used {PAPER_STEPS}.")


def fuzzy_k_tooltip(choice: ModelChoice | None) -> str:
    """The fuzzy k slider's tooltip: what 0 ("model's default") means for the chosen model."""
    default = f"{choice.fuzzy_k:g} for {choice.name}" if choice and choice.fuzzy_k is not None else "the model's own"
    return ("k of fuzzy action control: actions that keep every parameter within k standard deviations of its mean "
            f"are always accepted. 0: the model's default ({default}; the paper's 1.5).")


def device_tooltip() -> str:
    """The device combo box's tooltip, one phrase per choice the engine accepts (:data:`worker_commands.DEVICE_CHOICES`)."""
    what = {"auto": "the GPU when PyTorch sees one, else the CPU", "cpu": "the CPU", "cuda": "the GPU (CUDA)"}
    return "; ".join(f"{label}: {what.get(value, value)}" for label, value in worker_commands.DEVICE_CHOICES.items())


def apply_hint(fixed_volume: object, moving_volume: object, model_path: Path | None) -> str:
    """What Apply still needs, as one sentence (empty when it can run)."""
    missing = [what for what, given in (("a fixed volume", fixed_volume), ("a moving volume", moving_volume)) if not given]
    model = model_path is not None and str(model_path) not in ("", ".") and Path(model_path).is_file()
    if not missing and model:
        return ""
    if missing:
        text = f"Select {' and '.join(missing)} (or press Load sample data)"
    else:
        text = "Choose a model"
    if missing and not model:
        text += ", and a model"
    return text + "."


# --------------------------------------------------------------------------- image files
def image_file_types() -> tuple[str, ...]:
    """The file name endings an image or label in a folder may have (the engine's list,
    :data:`cohort_pairs.IMAGE_SUFFIXES`)."""
    return tuple(IMAGE_SUFFIXES)


def image_types_text() -> str:
    """``".nii.gz, .nii, .nrrd, ..."``: the engine's list, for tooltips."""
    return ", ".join(image_file_types())


DICOM_FOLDER_TEXT = "a folder of one DICOM series"
"""What the engine also reads wherever it takes an image (:func:`image_io.read_image` reads a folder as a DICOM
series; a folder of patients or of training data may hold such folders)."""


def training_data_tooltip() -> str:
    """The training data folder's tooltip."""
    return (f"Folder of <case>_image.<ext> and <case>_label.<ext> files, <ext> one of {image_types_text()} (or "
            f"<case>_image as {DICOM_FOLDER_TEXT}); used when no loaded volume is checked")


def patients_folder_tooltip() -> str:
    """The folder of patient images' tooltip (several patients)."""
    return (f"Folder of patient images, <name>.<ext> or <name>_image.<ext> with <ext> one of {image_types_text()}, "
            f"or {DICOM_FOLDER_TEXT} (named after the folder), each with an optional <name>_label.<ext> (gives Dice); "
            "used when no patient volume is checked. The patients are loaded into the scene with their propagated "
            "segmentations.")


# --------------------------------------------------------------------------- training stages
def training_stages(geometry: str = training_folder.DEFAULT_GEOMETRY) -> list[str]:
    """The engine subcommands training runs in turn for a model ``geometry`` (the commands the module starts)."""
    files = training_folder.TrainingFiles(Path("output"), "model")
    commands = worker_commands.training_commands("python", Path("data"), files, geometry=geometry)
    return [command[command.index("-m") + 2] for command in commands]


def training_stages_text(geometry: str = training_folder.DEFAULT_GEOMETRY) -> str:
    """``"4 stages in turn: Ground-truth deformations, ..."``: the stages' titles as the status line shows them."""
    titles = [messages.STAGE_TITLES.get(stage, stage) for stage in training_stages(geometry)]
    return f"{len(titles)} stages in turn: {', '.join(titles)}"
