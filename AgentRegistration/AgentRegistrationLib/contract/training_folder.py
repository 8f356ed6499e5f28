"""The training folder (where ``groundtruth``/``sdm``/``train`` write, and their CSV columns) and the choices of a
training: crops, geometries, ground-truth metrics (the configurations: :mod:`.training_config`). Standard library
only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from AgentRegistrationLib.contract.register_folder import read_csv_columns

# ====================================================================================== training output folder
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
ORGAN_HELP = ("the organ's name (e.g. prostate, hippocampus), stored in the model and its card and used in its messages "
              "and reports (default: 'organ')")
"""What ``--organ`` and the training module's Organ field are for."""


def organ_name(text: str) -> str:
    """``--organ``: the organ's name as messages write it (letters, digits, spaces, ``-`` and ``_``; 1 to 40
    characters); ``ValueError`` naming the option and the value otherwise."""
    name = " ".join(str(text).split())
    if not name or len(name) > 40 or not all(c.isalnum() or c in " -_" for c in name):
        raise ValueError(f"--organ {text!r}: give the organ's name in words (letters, digits, spaces, '-'), e.g. "
                         "hippocampus")
    return name


LOCALISER_WEIGHTINGS = ("p", "p2", "largest", "ellipsoid")
"""How the learned localiser turns its organ map into a centre and a size (``agentreg localiser --weighting``)."""

PAPER_MODES = {2: 15, 3: 25}
"""The paper's number of SDM modes d per dimension."""
GT_METRICS = ("points", "distance")
"""What drives the ground-truth registration (``agentreg groundtruth --metric``): ``points``, the paper's (mutual
information of the images and corresponding points on the mask surfaces), or ``distance`` (the masks' signed distance
maps): :func:`groundtruth.register_constrained`."""


GT_ITERATIONS = 250
"""elastix iterations per resolution of ``agentreg groundtruth`` unless told (and of ``agentreg evaluate``'s gt
reference for a model whose ground truth did not record its own)."""
GT_RESOLUTIONS = 3
"""elastix resolutions (pyramid levels) of ``agentreg groundtruth`` unless told."""


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
class GroundTruthFolder:
    """The folder ``agentreg groundtruth`` writes, defined once: one file per ordered pair (its B-spline coefficients
    and Dice) under ``pairs/``, each subject on the model grid under ``subjects/``, the pairs' Dice in
    ``gt_dice.csv``, the run's record in ``summary.json`` and the failed pairs in ``failures.json``; ``agentreg train``
    adds its validation subjects on the model grid under ``validation_subjects/``."""

    root: Path

    @property
    def pairs(self) -> Path:
        return Path(self.root) / "pairs"

    def pair_file(self, moving: str, fixed: str) -> Path:
        return self.pairs / f"{moving}__to__{fixed}.npz"

    def pair_files(self) -> list[Path]:
        """Every pair file there, sorted."""
        return sorted(self.pairs.glob("*.npz"))

    @property
    def subjects(self) -> Path:
        return Path(self.root) / "subjects"

    def subject_file(self, name: str) -> Path:
        return self.subjects / f"{name}.npz"

    @property
    def validation_subjects(self) -> Path:
        """The validation subjects on the model grid, as ``agentreg train --data --split`` prepares them (a cache)."""
        return Path(self.root) / "validation_subjects"

    @property
    def dice_csv(self) -> Path:
        return Path(self.root) / "gt_dice.csv"

    @property
    def summary_json(self) -> Path:
        return Path(self.root) / "summary.json"

    @property
    def failures_json(self) -> Path:
        return Path(self.root) / "failures.json"


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
        return GroundTruthFolder(self.groundtruth).dice_csv

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


def read_groundtruth_dice(path: str | Path) -> dict[str, list]:
    """``gt_dice.csv`` of ``agentreg groundtruth``."""
    return read_csv_columns(path, GT_DICE_COLUMNS, "ground-truth Dice file")


def read_training_loss(path: str | Path) -> dict[str, list]:
    """``loss.csv`` of ``agentreg train``."""
    return read_csv_columns(path, LOSS_COLUMNS[:4], "training loss file")
