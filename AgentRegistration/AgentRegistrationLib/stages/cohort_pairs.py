"""The pairs of a cohort (``agentreg register-many``): the rows of a CSV of pairs (:func:`pairs_from_csv`), or one or
several atlases (image and label) against a folder of patients, the patients being the fixed images
(:func:`multi_atlas_pairs`); each pair is named for its output folder."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from AgentRegistrationLib.contract.points import parse_point
from AgentRegistrationLib.data.image_io import SERIES_SEPARATOR, holds_dicom_series, image_exists

CSV_COLUMNS = ("fixed", "moving", "fixed_label", "moving_label", "fixed_point", "name")
"""Columns of a CSV of pairs: ``fixed`` and ``moving`` are required; a relative path is relative to the CSV."""
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File names a patient folder's images and labels may end with."""
LABEL_SUFFIX = "_label"


FUSED = "fused"
"""The name of a patient's fused label among its atlases' pairs (pair ``<patient>/fused``), and its row's status in
summary.csv: no atlas may be named so."""


@dataclass(frozen=True)
class CohortPair:
    """One pair of a cohort; ``name`` is its output folder's name."""

    name: str
    fixed: Path
    moving: Path
    fixed_label: Path | None = None
    moving_label: Path | None = None
    fixed_point: tuple[float, ...] | None = None  # the organ's centre in the fixed image (physical LPS)
    patient: str | None = None  # with several atlases: the patient whose atlas results are fused


def _stem(path: Path) -> str:
    name = Path(path).name.split(SERIES_SEPARATOR)[0]  # FOLDER@SeriesInstanceUID: the folder's name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".")[0]


def _check_names(pairs: list[CohortPair], source: str) -> list[CohortPair]:
    seen: dict[str, CohortPair] = {}
    for pair in pairs:
        parts = pair.name.split("/") if pair.patient is not None else [pair.name]  # <patient>/<atlas>: two folders
        if any(not part or part.startswith(".") or re.search(r"[/\\]", part) for part in parts):
            raise ValueError(f"{source}: pair name {pair.name!r} cannot be a folder name: give a name without '/' "
                             "that does not start with '.'")
        if pair.name in seen:
            raise ValueError(f"{source}: two pairs would write to the same folder {pair.name!r} ({seen[pair.name].moving}"
                             f" to {seen[pair.name].fixed}, and {pair.moving} to {pair.fixed}): give each pair its own "
                             "name (a 'name' column in a CSV of pairs)")
        seen[pair.name] = pair
    if not pairs:
        raise ValueError(f"{source}: no pair to register")
    return pairs


def pairs_from_csv(path: str | Path) -> list[CohortPair]:
    """The pairs of a CSV with columns ``fixed``, ``moving`` and optionally ``fixed_label``, ``moving_label``,
    ``fixed_point`` and ``name`` (the output folder; default ``<moving>_to_<fixed>`` from the file names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV of pairs not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("fixed", "moving") if c not in columns]
        unknown = [c for c in columns if c not in CSV_COLUMNS]
        if missing or unknown:
            raise ValueError(f"{path}: " + (f"missing column(s) {', '.join(missing)}" if missing else
                                            f"unknown column(s) {', '.join(unknown)}")
                             + f"; the columns are {', '.join(CSV_COLUMNS[:2])} and optionally "
                               f"{', '.join(CSV_COLUMNS[2:])}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]

    def file(row: dict, key: str, line: int) -> Path | None:
        if not row.get(key):
            if key in ("fixed", "moving"):
                raise ValueError(f"{path}, line {line}: the {key} image is empty")
            return None
        value = Path(row[key]).expanduser()
        return value if value.is_absolute() else path.parent / value

    pairs = []
    for line, row in enumerate(rows, 2):
        fixed, moving = file(row, "fixed", line), file(row, "moving", line)
        pairs.append(CohortPair(row.get("name") or f"{_stem(moving)}_to_{_stem(fixed)}", fixed, moving,
                                file(row, "fixed_label", line), file(row, "moving_label", line),
                                parse_point(row.get("fixed_point", ""), f"{path}, line {line}: fixed_point")))
    return _check_names(pairs, str(path))


def patient_images(folder: str | Path) -> list[tuple[str, Path, Path | None]]:
    """``(name, image, label or None)`` of each image in ``folder``: ``<name>.<ext>`` or ``<name>_image.<ext>``,
    its label ``<name>_label.<ext>`` when present (:data:`IMAGE_SUFFIXES`; other files are ignored). A subfolder
    holding a DICOM series is an image too, named after the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"patient folder not found: {folder} (give a folder of images, each with an "
                                f"optional <name>{LABEL_SUFFIX} file beside it)")
    images, labels = {}, {}
    for path in sorted(folder.iterdir()):
        dicom = not path.name.startswith(".") and holds_dicom_series(path)  # a DICOM series folder
        if not dicom and (path.name.startswith(".") or not path.is_file()
                          or not path.name.lower().endswith(IMAGE_SUFFIXES)):
            continue
        stem = _stem(path)
        if stem.endswith(LABEL_SUFFIX):
            labels.setdefault(stem[: -len(LABEL_SUFFIX)], path)
            continue
        name = stem[: -len("_image")] if stem.endswith("_image") else stem
        if name in images:
            raise ValueError(f"{folder}: two images of patient {name!r} ({images[name].name} and {path.name}): keep one")
        images[name] = path
    if not images:
        raise ValueError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)} files other than *{LABEL_SUFFIX}.*)")
    return [(name, image, labels.get(name)) for name, image in images.items()]


def atlas_pairs(atlas: str | Path, atlas_label: str | Path | None, patients: str | Path) -> list[CohortPair]:
    """One pair per patient image of the folder ``patients`` (the fixed image, with its label when present),
    the atlas being the moving image; each pair is named after its patient. The atlas itself is left out if it
    is in the folder."""
    return multi_atlas_pairs([(atlas, atlas_label)], patients)


def multi_atlas_pairs(atlases: list[tuple[str | Path, str | Path | None]], patients: str | Path) -> list[CohortPair]:
    """The pairs of several atlases ``(image, label)`` against the folder ``patients``: every atlas onto every
    patient image (the fixed image). One atlas: pairs named after the patient (``<patient>``). Several: each
    must have a label; pairs ``<patient>/<atlas>`` (the atlas named by its image file), patient by patient, so
    that :func:`.cohort_results.fuse_patients` can vote on the atlases' labels. An atlas image that is in the folder is no
    patient."""
    atlases = [(Path(image), Path(label) if label else None) for image, label in atlases]
    if not atlases:
        raise ValueError("give at least one atlas (--atlas IMAGE --atlas-label LABEL)")
    for image, label in atlases:
        for what, path in (("atlas image", image), ("atlas label", label)):
            if path is not None and not (image_exists(path) if what == "atlas image" else path.is_file()):
                raise FileNotFoundError(f"{what} file not found: {path}")
    names = [_stem(image) for image, _ in atlases]
    if len(atlases) > 1:
        unlabelled = [str(image) for image, label in atlases if label is None]
        if unlabelled:
            raise ValueError(f"atlas {unlabelled[0]} has no label: with several atlases each needs its --atlas-label "
                             "(in the order of the --atlas images), for the majority vote of their labels")
        twice = sorted({n for n in names if names.count(n) > 1 or n == FUSED})
        if twice:
            raise ValueError(f"two atlases have the same file name {twice[0]!r} (or one is named {FUSED!r}, the "
                             "name of the fused label's row): their results would share a folder; rename one")
    own = {image.resolve() for image, _ in atlases}
    pairs = []
    for patient, image, label in patient_images(patients):
        if image.resolve() in own:
            continue
        for name, (atlas, atlas_label) in zip(names, atlases, strict=True):
            pairs.append(CohortPair(patient if len(atlases) == 1 else f"{patient}/{name}", image, atlas, label,
                                    atlas_label, patient=patient if len(atlases) > 1 else None))
    return _check_names(pairs, str(patients))
