"""Where things are in the source tree and in an installed extension: the engine package, resource folders,
the shipped models and the sample data. Standard library only."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from AgentRegistrationLib.contract.training_folder import MODEL_SUFFIX
from AgentRegistrationLib.contract.worker_commands import ENGINE_PACKAGE


# ====================================================================================== models and layout
def engine_dir(module_file: str | Path) -> Path:
    """The folder holding the engine package, for a module file of either layout.

    Installed extension: every scripted module of the extension sits in one folder
    (``lib/Slicer-X.Y/qt-scripted-modules``) beside ``AgentRegistrationLib``. Source tree: each module
    has its own folder and the engine is in ``AgentRegistration/``.
    """
    module_dir = Path(module_file).resolve().parent
    for candidate in (module_dir, module_dir.parent / "AgentRegistration"):
        if (candidate / ENGINE_PACKAGE / "cli" / "__main__.py").is_file():
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
