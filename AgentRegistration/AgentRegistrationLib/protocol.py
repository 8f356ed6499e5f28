"""The contract between the engine (``agentreg``) and the Slicer modules, defined once.

Both sides import this file: the engine's command line prints its messages with it and
``agentreg register`` writes its folder with its names; the modules build their worker
command lines, read the messages and render them, and read the folder with it. It imports
only the standard library (no numpy, torch, slicer or qt), so a module can import it before
the engine's dependencies are installed.

Sections:

- messages: one JSON object per stdout line of a worker (``--progress-json``);
- register output folder: file names and the flat ``metrics.json`` schema;
- training output folder: where ``groundtruth``/``sdm``/``train`` write, and their CSV columns;
- command builders: the worker command lines of both modules;
- worker job: start a worker, drain its messages without blocking, cancel it (process tree),
  remove its temporary folder; several commands in a row (the training stages);
- layout: where the engine package is, in the source tree and in an installed extension.
"""

from __future__ import annotations

import csv
import enum
import json
import math
import os
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENGINE_PACKAGE = "AgentRegistrationLib"
"""The engine package; a worker runs ``python -m AgentRegistrationLib.cli``."""

# ====================================================================================== messages
# Every line a worker prints on stdout with --progress-json is one JSON object with a "stage":
#   {"stage": S, "done": N, "total": T, **numbers}   progress of stage S (register, preprocess,
#                                                     groundtruth, train, elastix, agent, ...)
#   {"stage": S, "message": TEXT}                    a note of stage S
#   {"stage": "error", "message": TEXT}              a user error; the worker then exits with 1
#   {"stage": "done", **payload}                     the last line of a successful command
# A line that is not such an object is kept as {"stage": "log", "message": LINE}.

STAGE_ERROR = "error"
STAGE_DONE = "done"
STAGE_LOG = "log"

STAGE_TITLES = {
    "read": "Reading the images and the model",
    "localise": "Finding the prostate and cropping",
    "prealign": "Pre-aligning (translation) and cropping",
    "register": "Registering",
    "resample": "Warping onto the fixed image",
    "write": "Writing the results",
    "preprocess": "Preparing the subjects",
    "groundtruth": "Ground-truth deformations",
    "sdm": "Statistical deformation model",
    "localiser": "Training the organ localiser",
    "train": "Training",
    "elastix": "Elastix",
    "agent": "Agent",
}
"""What the status line calls each stage; a stage not listed shows its own name. ``agentreg register`` reports
read, localise (a model that crops on the organ) or prealign (the paper's), register (agent steps), resample and
write, in this order; a stage with ``total`` 0 is one piece of work of unknown length (a busy indicator)."""
REGISTER_STAGES = ("read", "localise", "prealign", "register", "resample", "write")
"""The stages of ``agentreg register`` (localise and prealign are alternatives)."""

INFO_LABELS = {"loss": "loss", "accuracy": "accuracy", "val_dice": "validation Dice", "dice": "Dice"}
"""Numbers a progress message may carry, in the order they are shown, with their labels."""


def progress_message(stage: str, done: int, total: int, **info: Any) -> dict[str, Any]:
    """A progress message: ``done`` of ``total`` units of ``stage``, plus numbers such as loss or dice."""
    return {"stage": stage, "done": int(done), "total": int(total), **info}


def text_message(stage: str, text: str) -> dict[str, Any]:
    """A note attached to a stage (e.g. a ground-truth pair that failed)."""
    return {"stage": stage, "message": str(text)}


def error_message(text: str) -> dict[str, Any]:
    """The message of a user error, printed just before the worker exits with status 1."""
    return {"stage": STAGE_ERROR, "message": str(text)}


def done_message(**payload: Any) -> dict[str, Any]:
    """The last message of a successful command."""
    return {"stage": STAGE_DONE, **payload}


def encode(message: dict[str, Any]) -> str:
    """One stdout line (without the newline) for a message."""
    return json.dumps(message)


def parse_progress_line(line: str) -> dict[str, Any]:
    """One stdout line of the worker as a message; other lines become ``{"stage": "log", "message": line}``."""
    text = line.strip()
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return {"stage": STAGE_LOG, "message": text}
    if not isinstance(message, dict) or not isinstance(message.get("stage"), str):
        return {"stage": STAGE_LOG, "message": text}
    return message


def progress_fraction(message: dict[str, Any]) -> float | None:
    """Fraction done (0..1) of a progress message; None when it carries no count (busy indicator)."""
    total, done = message.get("total"), message.get("done")
    if not isinstance(total, (int, float)) or not isinstance(done, (int, float)) or total <= 0:
        return None
    return min(max(float(done) / float(total), 0.0), 1.0)


def progress_range(message: dict[str, Any]) -> tuple[int, int, int] | None:
    """What a progress bar shows for a message: ``(minimum, maximum, value)``; ``(0, 0, 0)`` is Qt's busy
    indicator (a stage of unknown length); ``None``: leave the bar as it is (logs, notes, done, errors)."""
    stage = message.get("stage")
    if stage in (STAGE_ERROR, STAGE_DONE, STAGE_LOG) or "message" in message or "total" not in message:
        return None
    fraction = progress_fraction(message)
    if fraction is None:
        return (0, 0, 0)
    total = int(message["total"])
    return (0, total, round(fraction * total))


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_text(message: dict[str, Any]) -> str:
    """The status line a widget shows for one worker message.

    ``{"stage": "register", "done": 5, "total": 41}`` -> ``Registering: 5 / 41``;
    ``{"stage": "train", "done": 150, "total": 2000, "loss": 0.0123, "accuracy": 0.41}`` ->
    ``Training: 150 / 2000, loss 0.0123, accuracy 0.41``; an error -> ``Error: ...``.
    """
    stage = str(message.get("stage", ""))
    if stage == STAGE_ERROR:
        return f"Error: {message.get('message', '')}"
    if stage == STAGE_DONE:
        return "Done"
    if stage == STAGE_LOG:
        return str(message.get("message", ""))
    title = STAGE_TITLES.get(stage, stage)
    if "message" in message:
        return f"{title}: {message['message']}"
    parts = []
    if isinstance(message.get("done"), (int, float)) and isinstance(message.get("total"), (int, float)) \
            and message["total"] > 0:
        parts.append(f"{message['done']} / {message['total']}")
    parts += [f"{label} {_number(message[key])}" for key, label in INFO_LABELS.items()
              if isinstance(message.get(key), (int, float)) and not isinstance(message.get(key), bool)]
    return f"{title}: {', '.join(parts)}" if parts else title


# ====================================================================================== register output folder
WARPED = "warped.nii.gz"
WARPED_LABEL = "warped_label.nii.gz"
DISPLACEMENT = "displacement.nii.gz"
TRAJECTORY_CSV = "trajectory.csv"
TRAJECTORY_PNG = "trajectory.png"
METRICS_JSON = "metrics.json"
STEPS_DIR = "steps"
OUTPUT_NAMES = (WARPED, WARPED_LABEL, DISPLACEMENT, TRAJECTORY_CSV, TRAJECTORY_PNG, METRICS_JSON, STEPS_DIR)
"""Everything ``agentreg register --output-dir`` writes (warped_label only with a moving label, steps only
with ``--save-steps``). Geometry of every image: the fixed image's. ``displacement.nii.gz`` is ITK's
displacement field (a fixed point x maps to the moving point x + u(x), LPS)."""

TRAJECTORY_COLUMNS = ("step", "action", "mode", "direction", "accepted", "rejected_count", "dice")
"""Columns of trajectory.csv, one row per agent step (1, 2, ...), followed by ``q_0..q_{2d-1}`` (Q-values)
and ``theta_0..theta_{d-1}`` (SDM parameters after the step); ``dice`` is empty without labels."""


def step_file_name(step: int) -> str:
    """``steps/warped_NNNN.nii.gz``: the warped moving image after agent step ``step`` (0: before any step)."""
    return f"warped_{int(step):04d}.nii.gz"


def step_number(path: str | Path) -> int:
    """The agent step of a step file name such as ``warped_0010.nii.gz``."""
    stem = Path(path).name.split(".")[0]
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"cannot read the step number from file name {Path(path).name!r}") from None


METRICS_SCHEMA = {
    "steps": "agent steps taken",
    "prealignment": "outcome of the translation pre-alignment ('ok' or why it was rejected)",
    "translation": "pre-alignment translation, physical units (LPS), one number per axis",
    "jacobian_folding_percent": "percentage of fixed-grid voxels where det J <= 0",
    "log_jacobian_std": "standard deviation of log det J over voxels with det J > 0",
    "fixed_crop_centre": "centre of the fixed crop box the agent worked on, fixed image's physical space (LPS)",
    "fixed_crop_size": "its extent along each of its axes, physical units",
    "fixed_crop_axes": "its axes (the fixed image's direction matrix, row by row)",
    "fixed_crop_placed_by": "what placed it: 'localiser', 'point on the fixed image' or \"paper's centred crop\"",
    "seconds_total": "wall time of the registration, seconds (without writing the files)",
    "seconds_preprocessing": "of which pre-alignment, cropping and resampling",
    "seconds_agent": "of which the agent's steps",
    "seconds_outputs": "of which the warped image and label in the fixed geometry",
    "pairs_in_batch": "pairs registered together in one agent batch (the seconds are the batch's)",
    "dice_none": "Dice of the moving label where it lies in physical space (no registration) with the fixed label",
    "hausdorff_none": "Hausdorff distance with no registration, fixed image's physical units",
    "hausdorff95_none": "95th percentile surface distance with no registration",
    "average_surface_distance_none": "average symmetric surface distance with no registration",
    "dice_before": "Dice at the agent's start (the crops alone: translation pre-alignment or boxes on the organ)",
    "dice_after": "Dice of the warped label with the fixed label",
    "hausdorff_before": "Hausdorff distance, fixed image's physical units",
    "hausdorff_after": "Hausdorff distance after registration",
    "hausdorff95_before": "95th percentile surface distance",
    "hausdorff95_after": "95th percentile surface distance after registration",
    "average_surface_distance_before": "average symmetric surface distance",
    "average_surface_distance_after": "average symmetric surface distance after registration",
}
"""Every key of metrics.json (a flat object of numbers, text and lists), with what it means; and, when the labels
hold several values, the keys of :data:`METRICS_PER_LABEL`."""
METRICS_PER_LABEL = {
    "dice_<when>_label_<n>": "Dice of label value n alone (when: none, before, after); dice_<when> is of the union "
                             "of the labels",
    "hausdorff_<when>_label_<n>": "Hausdorff distance of label value n alone, fixed image's physical units",
}
"""Per-label keys of metrics.json (present when the fixed or moving label holds several values), by pattern."""
METRICS_PER_LABEL_KEY = re.compile(r"^(dice|hausdorff)_(none|before|after)_label_([1-9][0-9]*)$")
"""The keys of :data:`METRICS_PER_LABEL`: groups (metric, when, label value)."""
METRICS_REQUIRED = ("steps", "jacobian_folding_percent", "log_jacobian_std", "seconds_total", "seconds_agent")
METRICS_WITH_LABELS = ("dice_before", "dice_after")
"""Present when both labels were given (the distances too, unless a mask is empty)."""


def check_metrics(metrics: dict[str, Any], source: str = "metrics") -> dict[str, Any]:
    """``metrics`` if it follows :data:`METRICS_SCHEMA`; otherwise a ``ValueError`` naming what is wrong."""
    if not isinstance(metrics, dict):
        raise ValueError(f"{source} is not a JSON object")
    unknown = sorted(k for k in set(metrics) - set(METRICS_SCHEMA) if not METRICS_PER_LABEL_KEY.match(k))
    missing = [k for k in METRICS_REQUIRED if k not in metrics]
    nested = sorted(k for k, v in metrics.items() if isinstance(v, dict))
    if unknown or missing or nested:
        raise ValueError(f"{source} does not follow the metrics schema (unknown keys {unknown}, missing {missing}, "
                         f"nested {nested}); was it written by this version of agentreg?")
    return metrics


def read_metrics(path: str | Path) -> dict[str, Any]:
    """metrics.json of a register output folder, checked against the schema."""
    return check_metrics(json.loads(Path(path).read_text()), str(path))


# ====================================================================================== training output folder
TRAINING_CONFIGURATIONS = ("compact", "paper", "converge", "recover")
"""Training configurations by name (``agentreg train --config``); a test keeps them equal to ``training.CONFIGS``."""
DEFAULT_TRAINING_CONFIGURATION = "converge"
"""The configuration ``agentreg train`` and the training module use unless told otherwise (the shipped models')."""
CROPS = ("organ", "paper")
"""Crop boxes by name (``--crop``): ``organ`` centres each image's box on its organ and sizes it to it, ``paper`` is
the paper's centred box after translation pre-alignment (:func:`preprocessing.model_geometry`)."""
GEOMETRY_CHOICES = ("paper", "auto")
"""Model geometries by name (``agentreg groundtruth --geometry``): the paper's prostate grids, or grids derived from
the training masks (:meth:`geometry.ModelGeometry.from_organ_spread`)."""
DEFAULT_GEOMETRY = "auto"
"""The geometry ``agentreg groundtruth`` uses unless told otherwise (or given ``--crop``, an option of the paper's
geometry), chosen by measurement: README, "Train a model for your own organ"."""
GEOMETRY_OVERRIDES = ("grid_size", "control_spacing", "control_spacing_mm", "box_spreads")
"""The numbers of a model geometry a user may set (``agentreg groundtruth --grid-size`` ...), 2 or 3 per option
(``control_spacing_mm``, in the images' physical units, also 1: the same on every axis)."""


def parse_numbers(text: str | Sequence[float], kind: type, option: str, counts: tuple[int, ...] = (2, 3)) -> tuple:
    """``"64,64"`` (or a sequence) -> ``counts`` (2 or 3) positive numbers of ``kind``; ``ValueError`` naming
    ``option`` and the value otherwise."""
    how_many = ", ".join(str(n) for n in counts[:-1]) + f" or {counts[-1]}" if len(counts) > 1 else str(counts[0])
    try:
        values = tuple(kind(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        raise ValueError(f"{option} {text!r}: give {how_many} comma-separated numbers") from None
    if len(values) not in counts or min(values) <= 0:
        raise ValueError(f"{option} {text!r}: give {how_many} comma-separated positive numbers")
    return values
PAPER_MODES = {2: 15, 3: 25}
"""The paper's number of SDM modes d per dimension."""
GT_METRICS = ("points", "distance")
"""What drives the ground-truth registration (``agentreg groundtruth --metric``): ``points``, the paper's (mutual
information of the images and corresponding points on the mask surfaces), or ``distance`` (the masks' signed distance
maps): :func:`groundtruth.register_constrained`."""


def default_gt_metric(geometry_choice: str) -> str:
    """The ground-truth metric ``agentreg groundtruth`` uses unless told: the paper's (``points``) with the paper's
    geometry, ``distance`` with a geometry derived from the data (``auto``; more Dice on all 120 ordered 3-D PROMISE12
    pairs compared and on 4 of 4 pairs of the second-organ proxy: ``results/groundtruth_metric.md``)."""
    return "distance" if geometry_choice.startswith("auto") else "points"


GT_DICE_COLUMNS = ("moving", "fixed", "dice_before", "dice_after", "seconds")
"""Columns of ``groundtruth/gt_dice.csv`` (one row per ordered pair)."""
LOSS_COLUMNS = ("iteration", "loss", "held_out_accuracy", "validation_dice", "held_out_near_gt_accuracy")
"""Columns of ``loss.csv``, which ``agentreg train`` writes beside its checkpoint (the last one is absent in files
of versions before the near-ground-truth states)."""
MODEL_SUFFIX = ".pt"


@dataclass(frozen=True)
class TrainingFiles:
    """Where the three training stages write, under one output folder (each stage resumes from it)."""

    output_folder: Path
    model_name: str

    @property
    def groundtruth(self) -> Path:
        return Path(self.output_folder) / "groundtruth"

    @property
    def gt_dice(self) -> Path:
        return self.groundtruth / "gt_dice.csv"

    @property
    def sdm(self) -> Path:
        return Path(self.output_folder) / "sdm.npz"

    @property
    def bundle(self) -> Path:
        return Path(self.output_folder) / f"{self.model_name}{MODEL_SUFFIX}"

    @property
    def localiser(self) -> Path:
        return Path(self.output_folder) / "localiser.pt"

    @property
    def checkpoint(self) -> Path:
        return Path(self.output_folder) / "checkpoints" / f"{self.model_name}.checkpoint.pt"

    @property
    def loss(self) -> Path:
        """``loss.csv``, which ``agentreg train`` writes beside its checkpoint."""
        return self.checkpoint.with_name("loss.csv")


def read_csv_columns(path: str | Path, required: Sequence[str], what: str) -> dict[str, list]:
    """Columns of a CSV the engine wrote; numbers as floats (empty cells and 'nan' as NaN), other text kept.

    Raises ``ValueError`` naming ``what`` and the missing columns when ``required`` ones are absent.
    """
    path = Path(path)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        names = reader.fieldnames or []
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{what} {path} lacks the columns {missing} (has {names}); was it written by this version?")
    columns: dict[str, list] = {name: [row[name] for row in rows] for name in names}
    for name, values in columns.items():
        try:
            columns[name] = [float(v) if v not in ("", None) else math.nan for v in values]
        except ValueError:
            pass
    return columns


def read_trajectory(path: str | Path) -> dict[str, list]:
    """Columns of ``trajectory.csv``."""
    columns = read_csv_columns(path, TRAJECTORY_COLUMNS, "trajectory file")
    if not columns["step"]:
        raise ValueError(f"trajectory file {path} has no steps")
    return columns


def read_groundtruth_dice(path: str | Path) -> dict[str, list]:
    """``gt_dice.csv`` of ``agentreg groundtruth``."""
    return read_csv_columns(path, GT_DICE_COLUMNS, "ground-truth Dice file")


def read_training_loss(path: str | Path) -> dict[str, list]:
    """``loss.csv`` of ``agentreg train``."""
    return read_csv_columns(path, LOSS_COLUMNS[:4], "training loss file")


# ====================================================================================== command builders
DEVICE_CHOICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
"""Labels shown in the GUI mapped to the ``--device`` values of the engine."""


def _device(device: str) -> str:
    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {sorted(DEVICE_CHOICES)}, got {device!r}")
    return DEVICE_CHOICES[device]


def cli_command(python: str, subcommand: str, options: dict[str, Any],
                positional: Sequence[Any] = ()) -> list[str]:
    """``python -m AgentRegistrationLib.cli SUBCOMMAND POSITIONAL... --option value ... --progress-json``.

    Option names are written with dashes; ``True`` adds a bare flag, ``False``/``None`` omit it, a list
    repeats the option once per item (``{"set": ["a=1", "b=2"]}``).
    """
    command = [python, "-m", f"{ENGINE_PACKAGE}.cli", subcommand, *(str(p) for p in positional)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                command += [flag, str(item)]
        elif value is not False and value is not None and str(value).startswith("-"):
            command.append(f"{flag}={value}")  # argparse would read "-1.5,2,3" as an option
        elif value is not False and value is not None:
            command += [flag, str(value)]
    return command + ["--progress-json"]


def register_command(python: str, fixed: Path, moving: Path, model: Path, output_dir: Path, *,
                     fixed_label: Path | None = None, moving_label: Path | None = None,
                     device: str = "Auto", steps: int | None = None, seed: int = 0,
                     fuzzy_action_control: bool = True, fuzzy_k: float | None = None,
                     save_steps: int = 0, fixed_point: Sequence[float] | None = None) -> list[str]:
    """The worker command line of ``agentreg register``.

    ``steps`` and ``fuzzy_k`` ``None`` (or 0): the model bundle's own defaults, which the engine owns.
    ``fixed_point``: the organ's centre in the fixed image, physical LPS coordinates of the image the worker
    reads (``--fixed-point``).
    """
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be at least 1 (or 0 for the model's default), got {steps}")
    if fuzzy_k is not None and fuzzy_k < 0:
        raise ValueError(f"fuzzy k must be positive (or 0 for the model's default), got {fuzzy_k}")
    return cli_command(python, "register", {
        "fixed": fixed, "moving": moving, "model": model, "output_dir": output_dir, "device": _device(device),
        "seed": int(seed), "steps": int(steps) if steps else None, "fixed_label": fixed_label,
        "moving_label": moving_label, "no_fuzzy": not fuzzy_action_control,
        "fuzzy_k": repr(float(fuzzy_k)) if fuzzy_k and fuzzy_action_control else None,
        "save_steps": int(save_steps) if save_steps and save_steps > 0 else None,
        "fixed_point": ",".join(repr(float(v)) for v in fixed_point) if fixed_point is not None else None})


class _HeaderUnpickler(pickle.Unpickler):
    """Reads a bundle's plain values without torch: tensors become ``None``; any other class is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch" or module.startswith("torch."):
            return lambda *args, **kwargs: None
        raise pickle.UnpicklingError(f"a model bundle holds no {module}.{name}")

    def persistent_load(self, pid: Any) -> None:
        return None


def model_header(path: str | Path) -> dict[str, Any]:
    """What a module needs to know of a model bundle before starting a worker, read without torch:
    ``dim`` (2 or 3) and the ``agent_defaults`` (e.g. ``steps``). ``ValueError`` when it is no bundle."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            with archive.open(name) as handle:
                payload = _HeaderUnpickler(handle).load()
        size = payload["geometry"]["size"]
        return {"dim": len(size), "agent_defaults": dict(payload.get("agent_defaults") or {})}
    except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a readable AgentRegistration model bundle ({err}); pick another model") from None


def training_commands(python: str, data: str | Path, files: TrainingFiles, *, dim: int = 3,
                      configuration: str = DEFAULT_TRAINING_CONFIGURATION, device: str = "Auto", modes: int | None = None,
                      split: str | Path | None = None, max_minutes: float | None = None,
                      geometry: str | None = None, geometry_overrides: dict[str, Any] | None = None,
                      metric: str | None = None, augment: float = 0.0, new_subjects: float = 0.0,
                      stage_options: dict[str, dict[str, Any]] | None = None) -> list[list[str]]:
    """Worker command lines of the stages: ``agentreg groundtruth``, ``sdm``, ``localiser`` (a model that crops on
    the organ: the ``auto`` geometry) and ``train`` (given that localiser, so that its users need no point on the
    fixed image).

    ``modes`` defaults to the paper's d (:data:`PAPER_MODES`). ``max_minutes`` stops the training stage
    after that long (it checkpoints; a rerun goes on). A rerun of the same commands resumes: the ground
    truth from its per-pair cache, training from ``files.checkpoint``. ``stage_options``: further options
    per stage, e.g. ``{"groundtruth": {"iterations": 50}, "train": {"set": ["iterations=100"]}}``.
    ``geometry``: the model geometry (:data:`GEOMETRY_CHOICES`; ``None``: the command line's default);
    ``geometry_overrides``: numbers of it to set (:data:`GEOMETRY_OVERRIDES`, text like ``"64,64"`` or sequences;
    empty ones are left out), checked here. ``metric``: the ground-truth metric (:data:`GT_METRICS`; ``None``: the
    geometry's default, :func:`default_gt_metric`). ``augment`` and ``new_subjects``: the shares of training images
    given random intensity changes and of intra-subject pairs made from a virtual subject (the training
    configuration's fields of those names; for few subjects: they teach the network less of each one).
    """
    extra = {stage: dict(options) for stage, options in (stage_options or {}).items()}
    unknown = set(extra) - {"groundtruth", "sdm", "localiser", "train"}
    if unknown:
        raise ValueError(f"stage_options names unknown stages {sorted(unknown)}; use groundtruth, sdm, localiser or "
                         "train")
    if dim not in PAPER_MODES:
        raise ValueError(f"dimension must be 2 or 3, got {dim}")
    if configuration not in TRAINING_CONFIGURATIONS:
        raise ValueError(f"training configuration must be one of {TRAINING_CONFIGURATIONS}, got {configuration!r}")
    engine_device = _device(device)
    shares = {"augment": augment, "new_subjects": new_subjects}
    for name, share in shares.items():
        if not 0.0 <= float(share) <= 1.0:
            raise ValueError(f"{name.replace('_', ' ')} is a share of the training pairs: give 0 to 1, got {share}")
    settings = [f"{name}={float(share):g}" for name, share in shares.items() if share]
    if settings:
        extra.setdefault("train", {})["set"] = [*extra.get("train", {}).get("set", []), *settings]
    modes = modes or PAPER_MODES[dim]
    if geometry is not None and geometry not in GEOMETRY_CHOICES:
        raise ValueError(f"model geometry must be one of {GEOMETRY_CHOICES}, got {geometry!r}")
    if metric is not None and metric not in GT_METRICS:
        raise ValueError(f"ground-truth metric must be one of {GT_METRICS}, got {metric!r}")
    overrides = {k: v for k, v in (geometry_overrides or {}).items() if v is not None and v != ""}
    if set(overrides) - set(GEOMETRY_OVERRIDES):
        raise ValueError(f"geometry_overrides names {sorted(set(overrides) - set(GEOMETRY_OVERRIDES))}; use "
                         f"{', '.join(GEOMETRY_OVERRIDES)}")
    overrides = {k: ",".join(str(n) for n in parse_numbers(v, int if k == "grid_size" else float,
                                                           "--" + k.replace("_", "-"),
                                                           (1, 2, 3) if k == "control_spacing_mm" else (2, 3)))
                 for k, v in overrides.items()}
    on_the_organ = (geometry or DEFAULT_GEOMETRY) == "auto"  # the paper's geometry crops as the paper did
    localiser = [cli_command(python, "localiser", {"out": files.localiser, "dim": dim, "split": split,
                                                   **extra.get("localiser", {})}, positional=[data])]
    return [
        cli_command(python, "groundtruth", {"out": files.groundtruth, "dim": dim, "split": split,
                                            "geometry": geometry, "metric": metric, **overrides,
                                            **extra.get("groundtruth", {})},
                    positional=[data]),
        cli_command(python, "sdm", {"modes": modes, "out": files.sdm, **extra.get("sdm", {})},
                    positional=[files.groundtruth]),
        *(localiser if on_the_organ else []),
        cli_command(python, "train", {"groundtruth": files.groundtruth, "sdm": files.sdm, "out": files.bundle,
                                      "config": configuration, "checkpoint": files.checkpoint,
                                      "device": engine_device, "max_minutes": max_minutes or None,
                                      "localiser": files.localiser if on_the_organ else None,
                                      **extra.get("train", {})}),
    ]


# ====================================================================================== models and layout
def engine_dir(module_file: str | Path) -> Path:
    """The folder holding the engine package, for a module file of either layout.

    Installed extension: every scripted module of the extension sits in one folder
    (``lib/Slicer-X.Y/qt-scripted-modules``) beside ``AgentRegistrationLib``. Source tree: each module
    has its own folder and the engine is in ``AgentRegistration/``.
    """
    module_dir = Path(module_file).resolve().parent
    for candidate in (module_dir, module_dir.parent / "AgentRegistration"):
        if (candidate / ENGINE_PACKAGE / "cli.py").is_file():
            return candidate
    raise FileNotFoundError(f"the engine package {ENGINE_PACKAGE} is neither beside {module_file} nor in "
                            f"{module_dir.parent / 'AgentRegistration'}; reinstall the AgentRegistration extension")


def resource_dirs(module_file: str | Path) -> tuple[Path, ...]:
    """Folders that may hold the extension's resources (requirements.txt, Models/, SampleData/).

    Installed: ``Resources`` beside the module; source tree: the repository's top-level ``Resources``.
    """
    module_dir = Path(module_file).resolve().parent
    return tuple(d for d in (module_dir / "Resources", module_dir.parent / "Resources") if d.is_dir())


def resource_file(module_file: str | Path, *parts: str) -> Path | None:
    """First existing ``Resources/<parts>`` for the module file, or None."""
    for folder in resource_dirs(module_file):
        if folder.joinpath(*parts).exists():
            return folder.joinpath(*parts)
    return None


SAMPLE_DATA_DIR = "SampleData"
SAMPLE_DATA = {"fixed": "case13_image.nii.gz", "fixed_label": "case13_label.nii.gz",
               "moving": "case17_image.nii.gz", "moving_label": "case17_label.nii.gz"}
"""The real prostate pair shipped in ``Resources/SampleData`` (see its README) for "Load sample data"."""


def sample_data_files(module_file: str | Path) -> dict[str, Path]:
    """The shipped sample pair's files; ``FileNotFoundError`` naming what is missing (never silently empty)."""
    folder = resource_file(module_file, SAMPLE_DATA_DIR)
    files = {key: (folder / name if folder else Path(SAMPLE_DATA_DIR) / name) for key, name in SAMPLE_DATA.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample data missing: {', '.join(missing)}; reinstall the AgentRegistration extension")
    return files


def available_models(folders: Sequence[str | Path]) -> dict[str, Path]:
    """Model bundles ``<folder>/<name>.pt`` by name; a later folder's model replaces an earlier one's.

    Read afresh on every call, so a list built from it shows models trained or copied in meanwhile.
    """
    models: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            models.update({p.stem: p for p in sorted(folder.glob(f"*{MODEL_SUFFIX}")) if p.is_file()})
    return models


def default_model(models: dict[str, Path], dim: int = 3) -> Path | None:
    """The model a user meets first: ``prostate-3d`` (Slicer holds every volume as 3-D), else any."""
    preferred = f"prostate-{dim}d"
    if preferred in models:
        return models[preferred]
    return next(iter(models.values()), None)


def install_model(bundle: str | Path, folder: str | Path) -> Path:
    """Copy a trained bundle into ``folder`` (a temporary name, then rename) and return the copy."""
    bundle, folder = Path(bundle), Path(folder)
    if not bundle.is_file():
        raise FileNotFoundError(f"trained model {bundle} not found")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / bundle.name
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(bundle, partial)
    os.replace(partial, target)
    return target


# ====================================================================================== worker job
def register_many_command(python: str, model: Path, output_dir: Path, *, pairs: Path | None = None,
                          atlas: Path | None = None, atlas_label: Path | None = None, patients: Path | None = None,
                          device: str = "Auto", steps: int | None = None, seed: int = 0,
                          fuzzy_action_control: bool = True, fuzzy_k: float | None = None, workers: int = 1,
                          batch_size: int | None = None) -> list[str]:
    """The worker command line of ``agentreg register-many``: a CSV of pairs (``pairs``), or an ``atlas`` (image, and
    ``atlas_label`` to propagate) against the folder ``patients``. One progress line per pair (stage ``register``);
    the run's results are ``output_dir``/summary.csv (:data:`COHORT_SUMMARY_CSV`) and a folder per pair.

    ``steps`` and ``fuzzy_k`` ``None`` (or 0): the model bundle's defaults; ``workers``: processes that read and
    write the pairs (0: one per core); ``batch_size`` ``None``: the engine's default."""
    if (pairs is None) == (atlas is None):
        raise ValueError("give either a CSV of pairs or an atlas image with a folder of patients")
    if atlas is not None and patients is None:
        raise ValueError("an atlas needs the folder of patients it is propagated onto")
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be at least 1 (or 0 for the model's default), got {steps}")
    if fuzzy_k is not None and fuzzy_k < 0:
        raise ValueError(f"fuzzy k must be positive (or 0 for the model's default), got {fuzzy_k}")
    if workers < 0 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"workers must be 0 (one per core) or more and the batch size 1 or more, got {workers} and "
                         f"{batch_size}")
    return cli_command(python, "register-many", {
        "model": model, "output_dir": output_dir, "pairs": pairs, "atlas": atlas, "atlas_label": atlas_label,
        "patients": patients, "device": _device(device), "seed": int(seed), "steps": int(steps) if steps else None,
        "no_fuzzy": not fuzzy_action_control,
        "fuzzy_k": repr(float(fuzzy_k)) if fuzzy_k and fuzzy_action_control else None,
        "workers": int(workers), "batch_size": int(batch_size) if batch_size else None})


COHORT_SUMMARY_CSV = "summary.csv"
"""The table of a ``register-many`` run: one row per pair (``pair``, ``status``, Dice and Hausdorff distance before
and after, ...: ``cohort.SUMMARY_COLUMNS``); each pair's files are in the folder named by its ``pair``."""
COHORT_DONE = ("registered", "skipped")
"""Statuses of a pair of a ``register-many`` run whose folder holds its results (the others: ``failed``)."""


class JobState(enum.Enum):
    """State of a worker job; it drives the Apply/Cancel button and the progress bar of both modules."""

    IDLE = "idle"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel requested"
    FAILED = "failed"
    SUCCEEDED = "succeeded"


def worker_environment(module_dir: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the worker: ``module_dir`` (holding ``AgentRegistrationLib``) first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    paths = [str(module_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """A worker process whose stdout lines are parsed into messages by a reader thread.

    The GUI polls :meth:`messages` from a timer, so Slicer never blocks on the pipe.
    :meth:`cancel` kills the worker and everything it started (its process group).
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None):
        self.command = command
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the process and its reader threads."""
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1, env=self.env,
                                        cwd=self.cwd, **kwargs)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.strip():
                self._queue.put(parse_progress_line(line))
        self.process.stdout.close()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
        self.process.stderr.close()

    def messages(self) -> list[dict[str, Any]]:
        """Messages that arrived since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.poll() is None

    def finished(self) -> bool:
        """True once the process has exited and its output has been read completely."""
        return (self.process is not None and self.process.poll() is not None
                and not any(t.is_alive() for t in self._threads))

    @property
    def returncode(self) -> int | None:
        """Exit status, None while running."""
        return None if self.process is None else self.process.poll()

    def error_text(self, last_lines: int = 20) -> str:
        """The last lines the worker wrote to stderr, for an error message."""
        return "\n".join(self.stderr_lines[-last_lines:])

    def cancel(self, timeout: float = 5.0) -> None:
        """Kill the worker and the processes it started, then wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=timeout)


class WorkerJob:
    """One or more worker commands run one after another, with the temporary folder they use.

    The GUI calls :meth:`poll` from a timer: it returns the messages that arrived, starts the next
    command when one has succeeded, and records the first failure (an error message of the worker,
    else its stderr, else its exit status) in :attr:`error`. :meth:`cancel` kills the running worker;
    :meth:`cleanup` removes ``folder`` unless ``keep_folder``.
    """

    def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str] | None = None,
                 folder: str | Path | None = None, keep_folder: bool = False):
        if not commands:
            raise ValueError("a worker job needs at least one command")
        self.commands = [list(c) for c in commands]
        self.env = env
        self.folder = Path(folder) if folder is not None else None
        self.keep_folder = keep_folder
        self.stage_number = 0  # 1-based number of the command running (0: none started)
        self.worker: WorkerProcess | None = None
        self.error = ""
        self.cancelled = False
        self.last_done: dict[str, Any] | None = None

    def start(self) -> WorkerJob:
        self._start_next()
        return self

    def stage_text(self) -> str:
        """``"2/4: sdm"``: the number of the command running, of how many, and its engine subcommand."""
        command = self.commands[max(self.stage_number, 1) - 1]
        name = command[command.index("-m") + 2] if "-m" in command else Path(command[0]).name
        return f"{self.stage_number}/{len(self.commands)}: {name}"

    def _start_next(self) -> None:
        self.worker = WorkerProcess(self.commands[self.stage_number], env=self.env)
        self.worker.start()
        self.stage_number += 1

    def poll(self) -> list[dict[str, Any]]:
        """Messages since the last call; advances to the next command and records failures."""
        if self.worker is None:
            return []
        finished = self.worker.finished()  # before draining: then every line is already queued
        messages = self.worker.messages()
        for message in messages:
            if message.get("stage") == STAGE_ERROR and not self.error:
                self.error = str(message.get("message", ""))
            elif message.get("stage") == STAGE_DONE:
                self.last_done = message
        if finished and not self.cancelled and not self.error:
            if self.worker.returncode != 0:
                self.error = self.worker.error_text() or f"the worker exited with status {self.worker.returncode}"
            elif self.stage_number < len(self.commands):
                self._start_next()
        return messages

    def done(self) -> bool:
        """True when the job has ended: all commands succeeded, one failed, or it was cancelled."""
        if self.worker is None:
            return False
        if self.cancelled or self.error:
            return self.worker.finished() or not self.worker.is_running()
        return self.stage_number == len(self.commands) and self.worker.finished()

    @property
    def succeeded(self) -> bool:
        return self.done() and not self.cancelled and not self.error and self.worker.returncode == 0

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict[str, Any]]:
        """Poll until done (for scripts and tests); returns every message. ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        messages = []
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"worker job did not end within {timeout} s")
            messages += self.poll()
            time.sleep(interval)
        return messages + self.poll()

    def cancel(self) -> None:
        self.cancelled = True
        if self.worker is not None:
            self.worker.cancel()

    def cleanup(self) -> None:
        """Remove the job's temporary folder unless it is to be kept."""
        if self.folder is not None and not self.keep_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


# ====================================================================================== dependencies
# The modules install the engine's Python packages with pip in a separate process (Slicer's own Python),
# so Slicer stays responsive: the GUI polls a DependencyInstallJob from a timer and shows pip's latest line.

DEPENDENCY_ADVICE = ("Check the internet connection and try again, or run this command in Slicer's Python "
                     "console (View > Python Console):\n{console}\n"
                     "PyTorch can also be installed with the PyTorch extension (Extensions Manager).")
"""What a failed install tells the user; ``{console}`` is the pip call to type into the console."""


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement line (``"SimpleITK>=2.3"`` -> ``"SimpleITK"``); "" for none."""
    text = requirement.split("#", 1)[0].strip()
    name = ""
    for char in text:
        if not (char.isalnum() or char in "._-"):
            break
        name += char
    return name


def read_requirements(path: str | Path, names: Sequence[str] | None = None) -> list[str]:
    """The requirement lines of a requirements file (comments and options dropped), only those of ``names``
    (compared case-insensitively, ``_`` = ``-``) when given."""
    def key(name: str) -> str:
        return name.lower().replace("_", "-")

    wanted = None if names is None else {key(n) for n in names}
    lines = []
    for line in Path(path).read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        name = requirement_name(text)
        if name and (wanted is None or key(name) in wanted):
            lines.append(text)
    return lines


def dependency_install_command(python: str, requirements: Sequence[str], extra_args: Sequence[str] = ()) -> list[str]:
    """``python -m pip install [extra_args] REQUIREMENT...``; ``requirements`` are requirement specifiers
    (e.g. from :func:`read_requirements`) or package names."""
    if not requirements:
        raise ValueError("no packages to install")
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", *extra_args, *requirements]


def pip_console_call(requirements: Sequence[str]) -> str:
    """The same install as one call for Slicer's Python console."""
    return "slicer.util.pip_install({!r})".format(" ".join(requirements))


class DependencyInstallJob:
    """A pip install in a separate process whose plain-text output lines are the progress text.

    The GUI calls :meth:`poll` from a timer (it never blocks) and shows :attr:`latest_line`; :meth:`cancel`
    kills pip. When :meth:`done`, :attr:`succeeded` says whether pip exited with status 0; otherwise
    :attr:`error` says what failed (pip's last lines) and what to do (:data:`DEPENDENCY_ADVICE`).
    """

    def __init__(self, command: Sequence[str], requirements: Sequence[str] = (), env: dict[str, str] | None = None,
                 keep_lines: int = 20):
        self.command = [str(c) for c in command]
        self.requirements = list(requirements)
        environment = dict(os.environ if env is None else env)
        environment["PYTHONUNBUFFERED"] = "1"
        self.worker = WorkerProcess(self.command, env=environment)
        self.keep_lines = keep_lines
        self.last_lines: list[str] = []  # pip's last lines (stdout and stderr), for the error message
        self.latest_line = ""
        self.cancelled = False
        self.error = ""
        self._stderr_seen = 0
        self._ended = False

    def start(self) -> DependencyInstallJob:
        self.worker.start()
        return self

    def _keep(self, lines: list[str]) -> None:
        lines = [line.strip() for line in lines if line.strip()]
        if lines:
            self.last_lines = (self.last_lines + lines)[-self.keep_lines:]
            self.latest_line = lines[-1]

    def poll(self) -> list[str]:
        """pip's lines since the last call; records the outcome once pip has ended."""
        finished = self.worker.finished()  # before draining: then every line is already queued
        lines = [str(m.get("message", m)) if m.get("stage") == STAGE_LOG else json.dumps(m)
                 for m in self.worker.messages()]
        stderr = self.worker.stderr_lines[self._stderr_seen:]
        self._stderr_seen += len(stderr)
        lines += stderr
        self._keep(lines)
        if finished and not self._ended:
            self._ended = True
            if self.cancelled:
                self.error = "The installation was cancelled."
            elif self.worker.returncode != 0:
                self.error = self.failure_text(self.worker.returncode)
        return lines

    def failure_text(self, returncode: int | None) -> str:
        """Why the install failed and what to do, with the pip command and pip's last lines."""
        packages = " ".join(self.requirements) or "the packages"
        text = (f"Installing {packages} failed (pip exited with status {returncode}).\n"
                + DEPENDENCY_ADVICE.format(console=pip_console_call(self.requirements) if self.requirements else "")
                + "\nThe command that failed:\n" + subprocess.list2cmdline(self.command))
        if self.last_lines:
            text += "\n\npip's last lines:\n" + "\n".join(self.last_lines)
        return text

    def done(self) -> bool:
        """True once pip has ended (succeeded, failed or cancelled) and its output has been read."""
        return self._ended

    @property
    def succeeded(self) -> bool:
        return self._ended and not self.cancelled and not self.error

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[str]:
        """Poll until done (for scripts and tests); returns every line. ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lines: list[str] = []
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the installation did not end within {timeout} s")
            lines += self.poll()
            time.sleep(interval)
        return lines

    def cancel(self) -> None:
        """Kill pip (and what it started); the next :meth:`poll` ends the job as cancelled."""
        self.cancelled = True
        self.worker.cancel()
