"""Shared fixtures: the real PROMISE12 data in ../shared/data (skipped, with a message, if absent)."""

from __future__ import annotations

import contextlib
import os
import shutil
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


# -- pytest-xdist (``-n 2 --dist loadfile``, the project's addopts): which files start first ---------------------
# Each file runs on one worker (its module fixtures are built once). The files in ``FIRST`` start first, longest
# first, so that neither worker waits alone at the end; the first two need no 2-D pipeline, which the worker that is
# free first builds meanwhile. The other files follow in their own order. Without xdist the order is the files' own.
# (Groups finer than a file, xdist_group with --dist loadgroup, are not read by pytest-xdist 3.8 under pytest 9.2.)
FIRST = ["test_mrml.py", "test_protocol.py", "test_cohort.py", "test_own_data.py", "test_training.py",
         "test_evaluation.py", "test_agent.py", "test_inputs.py", "test_crops_on_the_organ.py", "test_register_cli.py"]


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


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
    from AgentRegistrationLib.data.organ_box import localisation_from_label

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


@pytest.fixture(scope="session")
def write_dicom_series():
    """``write_dicom_series(volume, folder, description, uid)`` -> folder: ``volume`` (3-D, integer) written into
    ``folder`` (files named after ``description``, so that several series may share a folder) as a
    DICOM series of one file per slice, with the position, orientation and spacing tags a scanner writes, read back
    by SimpleITK's series reader."""
    import time

    def write(volume: sitk.Image, folder: Path, description: str = "T2 axial", uid: str = "1.2.826.0.1.3680043.2.1125.1"
              ) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        direction = volume.GetDirection()
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        tags = {"0008|0060": "MR", "0008|103e": description, "0020|000e": uid, "0020|000d": uid + ".0",
                "0008|0020": time.strftime("%Y%m%d"), "0010|0020": "anonymous",
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3])),
                "0018|0050": f"{volume.GetSpacing()[2]:.6f}"}
        for z in range(volume.GetDepth()):
            piece = volume[:, :, z]
            for tag, value in tags.items():
                piece.SetMetaData(tag, value)
            position = volume.TransformIndexToPhysicalPoint((0, 0, z))
            piece.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
            piece.SetMetaData("0020|0013", str(z + 1))
            piece.SetMetaData("0008|0018", f"{uid}.{z + 1}")
            writer.SetFileName(str(folder / f"{description.replace(' ', '_')}_{z:03d}.dcm"))
            writer.Execute(piece)
        return folder

    return write


# -- a small but real pipeline, shared by the tests of training, registration and evaluation --------------------
TINY_SUBJECTS = ["case00", "case04", "case06", "case07"]


def _shared_folder(tmp_path_factory) -> Path:
    """A folder every process of this pytest run sees: under pytest-xdist, beside the workers' own base folders
    (each worker has its own ``popen-gwN`` base under the run's), so that an expensive fixture is built once per run
    rather than once per worker; without xdist, the run's base folder."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    folder.mkdir(exist_ok=True)
    return folder


def _built_once(folder: Path, build) -> Path:
    """``folder`` made by ``build(folder)`` once per run, whichever process asks first; the others wait for it (a lock
    file) and find it complete (a marker file written last). A build that failed leaves no marker: the next caller
    builds again, from an emptied folder."""
    from filelock import FileLock

    done = folder / ".complete"
    with FileLock(str(folder) + ".lock"):
        if not done.is_file():
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.write_text("")
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(grid128, tmp_path_factory):
    """``tiny_pipeline(dim[, crop])`` -> dict(gt=folder, sdm=path, bundle=path, subjects=names): constrained GT on
    4 real training subjects (12 pairs, few elastix iterations), a 4-mode SDM, and a compact network trained
    for a few batches. Real parts end to end; small so that the suite stays fast. Built once per dimension and
    crop, and once per run (under pytest-xdist the workers share it): ``crop="paper"`` (translation onto a
    template, the paper's box) or ``"organ"`` (each subject's box on its own prostate; trained with the
    ``converge`` configuration). Tests must not write into its folders (copy them first)."""
    import torch
    from AgentRegistrationLib.contract.training_config import config_by_name
    from AgentRegistrationLib.data.dataset import find_subjects, prepare_subject
    from AgentRegistrationLib.data.geometry_choice import model_geometry
    from AgentRegistrationLib.data.image_io import read_image
    from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary, run_groundtruth
    from AgentRegistrationLib.stages.sdm_fit import fit_from_groundtruth
    from AgentRegistrationLib.stages.training import train
    from AgentRegistrationLib.stages.training_set import TrainingSet

    shared = _shared_folder(tmp_path_factory)
    built: dict[tuple[int, str], dict] = {}

    def make(root: Path, dim: int, crop: str) -> None:
        geometry = model_geometry(dim, crop)
        subjects = find_subjects(grid128, TINY_SUBJECTS)
        template = read_image(subjects[0].image)
        for s in subjects:  # the paper's crop: each subject's elastix translation onto the template's box
            prepare_subject(s, template, geometry, root / "gt" / "subjects")
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
        train(config, TrainingSet.from_groundtruth(root / "gt"), sdm, geometry, torch.device("cpu")).save(root / "bundle.pt")

    def build(dim: int, crop: str = "paper") -> dict:
        if (dim, crop) not in built:
            root = _built_once(shared / f"tiny{dim}d{crop}", lambda folder: make(folder, dim, crop))
            built[(dim, crop)] = {"gt": root / "gt", "sdm": root / "sdm.npz", "bundle": root / "bundle.pt",
                                  "subjects": list(TINY_SUBJECTS), "geometry": model_geometry(dim, crop)}
        return built[(dim, crop)]

    return build


@pytest.fixture(scope="session")
def mrml_scene():
    """``with mrml_scene() as scene``: a real MRML scene (slicer-core) with the module logics Slicer would have
    registered (segmentations: converter rules; sequences: browser node class), also set as ``slicer.mrmlScene``."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is needed for the MRML glue")

    @contextlib.contextmanager
    def make():
        scene = slicer.vtkMRMLScene()
        logics = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerSequencesLogic()]
        for logic in logics:
            logic.SetMRMLScene(scene)
        previous = getattr(slicer, "mrmlScene", None)
        slicer.mrmlScene = scene
        try:
            yield scene
        finally:
            for logic in logics:
                logic.SetMRMLScene(None)
            scene.Clear(True)
            slicer.mrmlScene = previous

    return make
