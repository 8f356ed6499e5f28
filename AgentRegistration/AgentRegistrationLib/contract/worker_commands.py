"""The worker command lines both Slicer modules build (``python -m AgentRegistrationLib.cli ...``), and a model
bundle's header read without torch. Standard library only."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from AgentRegistrationLib.contract.points import point_text
from AgentRegistrationLib.contract.training_config import DEFAULT_TRAINING_CONFIGURATION, TRAINING_CONFIGURATIONS
from AgentRegistrationLib.contract.training_folder import (
    DEFAULT_GEOMETRY,
    GEOMETRY_CHOICES,
    GEOMETRY_OVERRIDES,
    GT_METRICS,
    PAPER_MODES,
    TrainingFiles,
    organ_name,
    parse_numbers,
)

ENGINE_PACKAGE = "AgentRegistrationLib"
"""The engine package; a worker runs ``python -m AgentRegistrationLib.cli``."""


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
        "fixed_point": point_text(fixed_point) if fixed_point is not None else None})


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
                      stage_options: dict[str, dict[str, Any]] | None = None, organ: str | None = None
                      ) -> list[list[str]]:
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
    ``organ``: the organ's name for the model (:data:`.training_folder.ORGAN_HELP`; ``None`` or empty: 'organ').
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
    organ = organ_name(organ) if organ and organ.strip() else None
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
                                            "geometry": geometry, "metric": metric, "organ": organ, **overrides,
                                            **extra.get("groundtruth", {})},
                    positional=[data]),
        cli_command(python, "sdm", {"modes": modes, "out": files.sdm, **extra.get("sdm", {})},
                    positional=[files.groundtruth]),
        *(localiser if on_the_organ else []),
        cli_command(python, "train", {"groundtruth": files.groundtruth, "sdm": files.sdm, "out": files.bundle,
                                      "config": configuration, "checkpoint": files.checkpoint,
                                      "device": engine_device, "max_minutes": max_minutes or None,
                                      "localiser": files.localiser if on_the_organ else None, "organ": organ,
                                      **extra.get("train", {})}),
    ]


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
