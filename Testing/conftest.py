"""Shared fixtures: the real PROMISE12 data in ../shared/data (skipped, with a message, if absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "promise12"


def _need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real PROMISE12 data not found at {path}: put the shared data folder beside the repo "
                    "(../shared/data/promise12) to run this test")
    return path


@pytest.fixture(scope="session")
def grid128() -> Path:
    return _need(DATA / "grid128")


@pytest.fixture(scope="session")
def native() -> Path:
    return _need(DATA / "native")


@pytest.fixture(scope="session")
def load_case(grid128):
    """``load_case("00")`` -> (image, label) SimpleITK images of grid128 subject 00."""
    def load(case: str):
        return (sitk.ReadImage(str(grid128 / f"case{case}_image.nii.gz")),
                sitk.ReadImage(str(grid128 / f"case{case}_label.nii.gz")))
    return load
