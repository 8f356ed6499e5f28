"""Shared fixtures: the real PROMISE12 data in ../shared/data (skipped, with a message, if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "promise12"

# One torch (OpenMP) thread per process, the suite's and the workers' it starts, unless set otherwise: on 2 cores shared
# with elastix, worker processes or other jobs, intra-op threads that wait for a busy core made each small agent step
# up to 40x slower (an agent run of 3 pairs: 5 ms/step with one thread, 30-400 ms/step with two). Set before torch is
# imported (no test module is imported before this file).
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
def native_slice(native):
    """``native_slice(case, index, origin, spacing, direction=None)`` -> (image, label): axial slice ``index`` of
    native subject ``case`` (``None``: the slice through its prostate's centre) in a user-like 2-D geometry."""
    from AgentRegistrationLib.localisation import localisation_from_label

    def take(case: str, index: int | None, origin, spacing, direction=None) -> list[sitk.Image]:
        if index is None:
            label = sitk.ReadImage(str(native / f"case{case}_label.nii.gz"))
            centre = localisation_from_label(label).centre.tolist()
            index = int(round(label.TransformPhysicalPointToContinuousIndex(centre)[2]))
        out = []
        for kind in ("image", "label"):
            image = sitk.ReadImage(str(native / f"case{case}_{kind}.nii.gz"))[:, :, index]
            image.SetOrigin(origin)
            image.SetSpacing(spacing)
            if direction is not None:
                image.SetDirection(direction)
            out.append(image)
        return out

    return take


@pytest.fixture(scope="session")
def load_case(grid128):
    """``load_case("00")`` -> (image, label) SimpleITK images of grid128 subject 00."""
    def load(case: str):
        return (sitk.ReadImage(str(grid128 / f"case{case}_image.nii.gz")),
                sitk.ReadImage(str(grid128 / f"case{case}_label.nii.gz")))
    return load


# -- a small but real pipeline, shared by the tests of training, registration and evaluation --------------------
TINY_SUBJECTS = ["case00", "case04", "case06", "case07"]


@pytest.fixture(scope="session")
def tiny_pipeline(grid128, tmp_path_factory):
    """``tiny_pipeline(dim[, crop])`` -> dict(gt=folder, sdm=path, bundle=path, subjects=names): constrained GT on
    4 real training subjects (12 pairs, few elastix iterations), a 4-mode SDM, and a compact network trained
    for a few batches. Real parts end to end; small so that the suite stays fast. Built once per dimension and
    crop: ``crop="paper"`` (translation onto a template, the paper's box) or ``"organ"`` (each subject's box on
    its own prostate; trained with the ``converge`` configuration)."""
    import torch
    from AgentRegistrationLib.dataset import find_subjects, prepare_subject
    from AgentRegistrationLib.groundtruth import GroundTruthSummary, run_groundtruth
    from AgentRegistrationLib.image_io import read_image
    from AgentRegistrationLib.preprocessing import model_geometry, prealign_translation
    from AgentRegistrationLib.sdm_fitting import fit_from_groundtruth
    from AgentRegistrationLib.training import TrainingSet, config_by_name, train

    built: dict[tuple[int, str], dict] = {}
    # each subject's elastix translation onto the template's box, computed once: the 2-D and 3-D paper crops share
    # the template and the crop fraction, so the same 3-D registration (the costliest part of the build)
    translations: dict[tuple[str, tuple[float, ...]], object] = {}

    def build(dim: int, crop: str = "paper") -> dict:
        if (dim, crop) in built:
            return built[(dim, crop)]
        root = tmp_path_factory.mktemp(f"tiny{dim}d{crop}")
        geometry = model_geometry(dim, crop)
        subjects = find_subjects(grid128, TINY_SUBJECTS)
        template = read_image(subjects[0].image)
        for s in subjects:
            translation = None
            if not geometry.localised:
                key = (s.name, tuple(geometry.crop_fraction))
                if key not in translations:
                    translations[key], _ = prealign_translation(template, read_image(s.image), geometry)
                translation = translations[key]
            prepare_subject(s, template, geometry, root / "gt" / "subjects", translation)
        names = [s.name for s in subjects]
        settings = {"iterations": 60 if dim == 2 else 25, "resolutions": 2}
        results, failures = run_groundtruth(root / "gt" / "subjects", names, geometry, root / "gt", workers=2,
                                            settings=settings)
        assert not failures
        pairs = [(m, f) for m in names for f in names if m != f]
        GroundTruthSummary.of_run(geometry, names[0], names, pairs, results, failures, settings=settings, workers=2,
                                  max_pairs=0, seed=0, wall_seconds=0.0, max_failed_fraction=0.1).save(root / "gt")
        sdm, _, _ = fit_from_groundtruth(root / "gt", 4)
        sdm.save(root / "sdm.npz")
        config = config_by_name("compact" if crop == "paper" else "converge").with_overrides(
            ["iterations=30", "batch_size=8", "checkpoint_every=1000", "validate_every=1000"])
        torch.manual_seed(0)
        train(config, TrainingSet.from_groundtruth(root / "gt"), sdm, geometry, root / "bundle.pt", torch.device("cpu"))
        built[(dim, crop)] = {"gt": root / "gt", "sdm": root / "sdm.npz", "bundle": root / "bundle.pt",
                              "subjects": names, "geometry": geometry}
        return built[(dim, crop)]

    return build
