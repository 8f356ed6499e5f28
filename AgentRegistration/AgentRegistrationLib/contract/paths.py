"""Where the project's own files are (the source tree's Resources/, the shipped models), and how a path is
recorded in a model or shown in a report. Standard library only: the command line's start-up reads it."""

from __future__ import annotations

from pathlib import Path

from AgentRegistrationLib.contract.training_folder import PAPER_MODES

REPO = Path(__file__).resolve().parents[3]  # AgentRegistration/AgentRegistrationLib/contract/paths.py -> the repository


def repo_file(*parts: str) -> Path:
    """A path relative to the repository root (where Resources/ and ../shared are)."""
    return REPO.joinpath(*parts).resolve()


def shipped_model(dim: int) -> Path:
    """The shipped model bundle of ``dim``-D images (Resources/Models/prostate-<dim>d.pt)."""
    return REPO / "Resources" / "Models" / f"prostate-{dim}d.pt"


def recorded_path(path: str | Path) -> str:
    """A path as a model records it: the project's own files relative to the repository, any other absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(repo_file()))
    except ValueError:
        return str(resolved)


def shown(path: str | Path) -> str:
    """A path as a report shows it: relative to the working folder when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


DATA_HINT = "../shared/data/promise12/grid128"


def how_to_get_a_model(dim: int = 3) -> str:
    """The README's training commands, for a message."""
    modes = PAPER_MODES[dim]
    return ("Train one with the README's commands (from the repository root):\n"
            f"  agentreg groundtruth {DATA_HINT} --split Resources/promise12_split.json --dim {dim} --out work/gt{dim}d\n"
            f"  agentreg sdm work/gt{dim}d --modes {modes} --out work/sdm{dim}d.npz\n"
            f"  agentreg train --groundtruth work/gt{dim}d --sdm work/sdm{dim}d.npz --out Resources/Models/prostate-{dim}d.pt "
            f"--data {DATA_HINT} --split Resources/promise12_split.json\n"
            "or pass a model you have with --model MODEL.pt")
