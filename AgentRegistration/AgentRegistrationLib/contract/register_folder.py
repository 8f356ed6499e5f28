"""The folder ``agentreg register`` writes (file names, the flat ``metrics.json`` schema with its reader and
checker, the trajectory CSV) and the summary of ``agentreg register-many``. Standard library only."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ====================================================================================== register output folder
WARPED = "warped.nii.gz"
WARPED_LABEL = "warped_label.nii.gz"
DISPLACEMENT = "displacement.nii.gz"
TRAJECTORY_CSV = "trajectory.csv"
TRAJECTORY_PNG = "trajectory.png"
QA_PNG = "qa.png"
"""The picture of the result: three orthogonal slices through the fixed crop (one in 2-D), the fixed image with the
warped moving label's outline (and the fixed label's), and a checkerboard of fixed and warped."""
METRICS_JSON = "metrics.json"
STEPS_DIR = "steps"
OUTPUT_NAMES = (WARPED, WARPED_LABEL, DISPLACEMENT, TRAJECTORY_CSV, TRAJECTORY_PNG, QA_PNG, METRICS_JSON, STEPS_DIR)
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
    "moving_crop_placed_by": "what placed the moving crop: its label, or the fixed crop's rule (the localiser) when "
                             "the two images are already aligned anatomy (crop_correlation at least 0.8)",
    "crop_correlation": "correlation of the two crops placed by one rule (1.0: the same image content)",
    "start_kept": "1 when the agent's end made the crops no more alike than its start, so the start was kept "
                  "(first, do no harm); 0 otherwise",
    "similarity_before": "correlation of the fixed crop and the moving crop at the agent's start (organ region)",
    "similarity_after": "the same after the agent (of the result kept)",
    "localisation_confidence": "how sure the localiser is of the fixed organ (0..1; below the model's threshold "
                               "the registration warns: place a point on the organ)",
    "localisation_warning": "why the fixed organ may be misplaced, and what to do (empty when confident)",
    "label_warning": "why a given label may not be its image's (off its organ, or the two swapped); absent when none",
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


def made_worse(dice_before: float, dice_after: float) -> bool:
    """The registration lowered the Dice, as printed (3 decimals)."""
    return round(float(dice_after), 3) < round(float(dice_before), 3)


def worse_than(metrics: dict[str, Any]) -> list[str]:
    """What the result is worse than, by its Dice: ``"no registration"`` (``dice_none``) and/or ``"its start"``
    (``dice_before``, the crops alone); empty without labels or when it is not worse."""
    if "dice_after" not in metrics:
        return []
    return [name for key, name in (("dice_none", "no registration"), ("dice_before", "its start"))
            if key in metrics and made_worse(metrics[key], metrics["dice_after"])]


def dice_text(metrics: dict[str, Any]) -> str:
    """``Dice none 0.249, start 0.715 -> 0.779`` (empty without labels), led by ``WORSE`` when the result is below no
    registration or below its start."""
    if "dice_after" not in metrics:
        return ""
    none = f"none {metrics['dice_none']:.3f}, " if "dice_none" in metrics else ""
    text = f"Dice {none}start {metrics['dice_before']:.3f} -> {metrics['dice_after']:.3f}"
    return ("WORSE: " if worse_than(metrics) else "") + text


POINT_REMEDY = "--fixed-point X,Y[,Z] on the command line, a markups point in Slicer"
"""How a user places the fixed crop by hand, as ``localisation_warning`` names it."""
SLICER_POINT_REMEDY = "a markups point, then Apply again"
"""The same remedy as the Slicer module words it (:func:`metrics_notes` with ``slicer``)."""


def metrics_notes(metrics: dict[str, Any], slicer: bool = False) -> list[str]:
    """What a user must know about a registration beyond its numbers, one line each: a result worse than no
    registration or its start, a localisation that may have missed the organ (with its remedy), and a start kept by
    the similarity guard. ``slicer``: worded for the Slicer module's status line (its remedy, no command options)."""
    notes = []
    if worse_than(metrics):
        notes.append(f"warning: the result's Dice is below that of {' and of '.join(worse_than(metrics))} "
                     f"({dice_text(metrics).removeprefix('WORSE: ')}): check it before you use it")
    if metrics.get("localisation_warning"):
        warning = metrics["localisation_warning"]
        warning = warning.replace(POINT_REMEDY, SLICER_POINT_REMEDY) if slicer else warning
        notes.append(f"warning: {warning} (localisation confidence {metrics.get('localisation_confidence', 0):.2f})")
    if metrics.get("label_warning"):
        notes.append(f"warning: {metrics['label_warning']}")
    if metrics.get("start_kept"):
        notes.append("note: the agent's steps made the crops no more alike than its start, so the start was kept"
                     + ("" if slicer else " (the crops alone; --no-similarity-guard keeps the agent's end)"))
    return notes


def read_metrics(path: str | Path) -> dict[str, Any]:
    """metrics.json of a register output folder, checked against the schema."""
    return check_metrics(json.loads(Path(path).read_text()), str(path))


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


COHORT_SUMMARY_CSV = "summary.csv"
"""The table of a ``register-many`` run: one row per pair (:data:`COHORT_SUMMARY_COLUMNS`); each pair's files are in
the folder named by its ``pair``."""
COHORT_JSON = "cohort.json"
"""The record of a ``register-many`` run (model and settings), so that a rerun into the same folder resumes it."""
COHORT_SUMMARY_COLUMNS = ("pair", "status", "fixed", "moving", "dice_none", "dice_before", "dice_after", "worse",
                          "hausdorff_before", "hausdorff_after", "steps", "start_kept", "localisation_confidence",
                          "seconds", "warnings", "message")
"""Columns of summary.csv: Dice with no registration, and Dice and Hausdorff distance (fixed image's physical units)
at the agent's start and after it, where both labels exist (as in metrics.json); ``worse`` WORSE when the result is
below no registration or its start; ``start_kept`` and ``localisation_confidence`` as in
metrics.json; ``seconds`` the pair's share of the run; ``warnings`` what was accepted on purpose (e.g. a resampled
label) and what to check (a localiser that may have missed the organ), separated by `` | ``; ``message`` why a pair
failed.
When the labels hold several values, per-label columns follow ``hausdorff_after``."""


def read_cohort_summary(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` (:data:`COHORT_SUMMARY_COLUMNS`), in order. ``ValueError`` when the file is not
    such a table."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as err:
        raise ValueError(f"cannot read the register-many summary {path}: {err}") from err
    if rows and ("pair" not in rows[0] or "status" not in rows[0]):
        raise ValueError(f"{path} is not a register-many summary (no pair and status columns)")
    return rows


COHORT_DONE = ("registered", "skipped")
"""Statuses of a pair of a ``register-many`` run whose folder holds its results (the others: ``failed``)."""
