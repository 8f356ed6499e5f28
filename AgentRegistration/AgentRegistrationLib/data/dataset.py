"""Training subjects: discovery (a data folder or a CSV) and preprocessing onto one model space.

With the paper's geometry all subjects of a training set are translated (elastix) onto one
template subject and resampled onto the template's model grid, as the paper does with "an
arbitrarily chosen template from the training base". With a localised geometry each subject is
resampled from the crop box on its own organ (placed by its mask), so the subjects share a model
space normalised for the organ's position and size. Inter-subject deformations and the SDM then live
in one common model space. Prepared subjects are cached as ``.npz`` files.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.data.image_io import image_exists, read_image, read_label
from AgentRegistrationLib.data.organ_box import Localisation, localisation_from_label
from AgentRegistrationLib.data.orientation import canonical
from AgentRegistrationLib.data.preprocessing import ModelFrame, normalise_intensity, resample_to_frame


@dataclass(frozen=True)
class Subject:
    name: str
    image: Path
    label: Path


def find_subjects(source: str | Path, names: list[str] | None = None) -> list[Subject]:
    """Subjects from a folder of ``<name>_image.*`` / ``<name>_label.*`` files (an image may be a ``<name>_image``
    folder of a DICOM series), or from a CSV
    with columns ``image,label`` (optional ``name``; relative paths are relative to the CSV)."""
    source = Path(source)
    subjects: list[Subject] = []
    if source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{source}: the CSV needs the columns 'image' and 'label' (optional 'name')")
            for i, row in enumerate(reader):
                image, label = (Path(row[k]) if Path(row[k]).is_absolute() else source.parent / row[k]
                                for k in ("image", "label"))
                subjects.append(Subject(row.get("name") or f"subject{i:03d}", image, label))
    elif source.is_dir():  # <name>_image.<ext> files, or <name>_image folders of a DICOM series
        for image in sorted(p for p in source.glob("*_image*") if p.name.endswith("_image") or "_image." in p.name):
            name = image.name.split("_image")[0]
            labels = sorted(source.glob(f"{name}_label.*"))
            if labels:
                subjects.append(Subject(name, image, labels[0]))
    else:
        raise FileNotFoundError(f"data source not found: {source} (give a folder of <name>_image/<name>_label files or a CSV)")
    if names is not None:
        known = {s.name for s in subjects}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"subjects {missing} are not in {source}")
        subjects = [s for s in subjects if s.name in set(names)]
    if len(subjects) < 2:
        raise ValueError(f"{source}: found {len(subjects)} subject(s) with image and label; at least 2 are needed")
    for s in subjects:
        for p in (s.image, s.label):
            if not (image_exists(p) if p == s.image else p.is_file()):
                raise FileNotFoundError(f"subject {s.name}: file not found: {p}")
    return subjects


def load_split(path: str | Path) -> dict[str, list[str]]:
    """A subject split file: JSON with lists ``train`` and ``validation``."""
    split = json.loads(Path(path).read_text())
    if set(split["train"]) & set(split["validation"]):
        raise ValueError(f"{path}: a subject is in both train and validation")
    return split


def subject_frame(image: sitk.Image, geometry: ModelGeometry, localisation: Localisation | None = None,
                  direction: np.ndarray | None = None) -> ModelFrame:
    """The crop box of ``geometry`` on ``image``: on the organ at ``localisation`` (localised geometry; axes of
    ``direction``, by default the image's) or the paper's centred box. A 2-D model on a 3-D volume takes one
    slice of the box: its middle slice, or the slice nearest the organ's centre."""
    if geometry.dim == 2 and image.GetDimension() == 3:
        geometry = geometry.slab()
    if geometry.localised:
        if localisation is None:
            raise ValueError("a localised model geometry needs the organ's localisation to place the crop box")
        return ModelFrame.on_localisation(image, geometry, localisation, direction)
    return ModelFrame.for_fixed(image, geometry)


@dataclass
class PreparedSubject:
    name: str
    image: np.ndarray  # float32, model grid, normalised
    label: np.ndarray  # uint8


def prepare_subject(subject: Subject, template: sitk.Image, geometry: ModelGeometry, cache_dir: Path | None,
                    translation: np.ndarray | None = None) -> PreparedSubject:
    """Resample ``subject`` onto the model grid (cached): from the crop box on its own organ (localised
    geometry, placed by its label) or translated onto ``template``'s box (the paper's)."""
    cache = cache_dir / f"{subject.name}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            return PreparedSubject(subject.name, z["image"], z["label"])
    image = canonical(read_image(subject.image, f"image of {subject.name}"))  # the voxel order registration uses
    label = canonical(read_label(subject.label, f"label of {subject.name}"))
    if not sitk.GetArrayViewFromImage(label).any():
        raise ValueError(f"subject {subject.name}: the label {subject.label} is empty")
    if geometry.localised:
        frame = subject_frame(image, geometry, localisation_from_label(label, f"label of {subject.name}"))
        translation = np.zeros(image.GetDimension())
    else:
        if translation is None:
            from AgentRegistrationLib.data.preprocessing import (
                prealign_translation,  # elastix: slow to import, needed on a cache miss only
            )

            translation, _ = prealign_translation(template, image, geometry)
        frame = subject_frame(template, geometry)
    arr = resample_to_frame(image, frame, translation).reshape(geometry.array_shape)
    lab = resample_to_frame(label, frame, translation, label=True).reshape(geometry.array_shape)
    prepared = PreparedSubject(subject.name, normalise_intensity(arr), lab)
    if cache is not None:
        atomic_write(cache, lambda tmp: np.savez_compressed(tmp, image=prepared.image, label=prepared.label,
                                                            translation=translation))
    return prepared
