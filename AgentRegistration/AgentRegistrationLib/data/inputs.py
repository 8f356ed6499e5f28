"""Checks of what a user gives a registration, before any work is done.

``agentreg register`` and the Slicer module's glue (:mod:`.mrml`) call these functions, so both answer
the same input with the same message. Each check raises ``ValueError`` (``FileNotFoundError`` /
``OSError`` for files) with one sentence that names the input and says what to do; a few accept an input
on purpose and return a note saying so (a warning, not an error).

Only SimpleITK and numpy: no torch, so the checks run before the model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AgentRegistrationLib.data.image_io import read_image_noted, read_label

MANY_STEPS = 2000
"""Agent step counts above this get a warning: the shipped models run at most a few dozen steps by default."""


def _size(image: sitk.Image) -> str:
    return "x".join(str(s) for s in image.GetSize())


def agent_steps(steps: int | None, default: int) -> tuple[int, str | None]:
    """The step count to run and a warning, if any: ``None`` or 0 is the model's ``default``.

    A negative count is a ``ValueError``; more than :data:`MANY_STEPS` runs, with a warning.
    """
    if steps is None or steps == 0:
        return int(default), None
    if steps < 0:
        raise ValueError(f"--steps {steps}: give a positive number of agent steps, or 0 for the model's default"
                         + (f" ({default})" if default else ""))
    if steps > MANY_STEPS:
        return int(steps), (f"--steps {steps} is far more than this model's default of {default} steps: the "
                            f"registration takes about {steps / default:.0f} times as long and the agent rarely "
                            "improves after its default")
    return int(steps), None


OPTIONS = {"fixed image": "--fixed", "moving image": "--moving", "fixed label": "--fixed-label",
           "moving label": "--moving-label"}
"""The command-line option of each input, named in the messages about a likely mix-up."""
LABEL_LIKE_VALUES = 8
"""An image of at most this many distinct whole values, 0 among them, looks like a label map, not a grey-level image."""
MAX_LABEL_VALUE = 255
"""A label map holds values 0..255 (the engine keeps at most 255 labels)."""
MANY_LABELS = 64
"""A label map of more distinct values than this is taken for a grey-level image (an 8-bit image given as a label)."""


def _as(what: str) -> str:
    """``fixed image`` -> ``the fixed image (--fixed)``."""
    return f"the {what} ({OPTIONS[what]})" if what in OPTIONS else f"the {what}"


def _few_values(values: np.ndarray) -> np.ndarray | None:
    """The distinct values of ``values`` (sorted) when there are at most :data:`LABEL_LIKE_VALUES` of them and all are
    whole numbers (a label map's), else ``None``. A sample of every few hundredth voxel settles it for a grey-level
    image without sorting every voxel."""
    sample = values[:: max(1, values.size // 4096)]
    if len(np.unique(sample)) > LABEL_LIKE_VALUES:
        return None
    distinct = np.unique(values)
    if len(distinct) > LABEL_LIKE_VALUES or np.any(np.mod(distinct, 1) != 0):
        return None
    return distinct


def check_image(image: sitk.Image, what: str, source: str | Path = "") -> tuple[sitk.Image, str | None]:
    """A 2-D or 3-D scalar image with varying, finite values; non-finite voxels are replaced (with a note).

    ``what`` names the input ("fixed image"), ``source`` its file or node. Integer and float64 images are
    accepted as they are (the engine resamples them as float32).
    """
    name = f"{what} {source}".strip()
    dim = image.GetDimension()
    if dim not in (2, 3):
        hint = " (a time series or multi-volume file?): give one volume, e.g. one frame of it" if dim == 4 else ""
        raise ValueError(f"{name} is {dim}-D{hint}; registration needs a 2-D or 3-D image")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise ValueError(f"{name} has {components} values per voxel (a colour or vector image): give a scalar "
                         "grey-level image, e.g. one channel of it")
    if min(image.GetSize()) < 2 and dim == 3:
        raise ValueError(f"{name} is a 3-D image with a single slice ({_size(image)}): give it as a 2-D image "
                         "for a 2-D model")
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.any():
        raise ValueError(f"{name} has no finite value (every voxel is NaN or infinite): check how it was made")
    low, high = float(array[finite].min()), float(array[finite].max())
    if low == high:
        raise ValueError(f"{name} is constant (every voxel is {low:g}): it holds no image to register; check that "
                         "the right file was given")
    values = _few_values(array[finite]) if low == 0 else None
    if values is not None:
        label_what = what.replace("image", "label") if "image" in what else f"{what}'s segmentation"
        raise ValueError(f"{name} holds only the values {', '.join(f'{v:g}' for v in values)}: it looks like a label "
                         f"map, not a grey-level image. Give the image as {_as(what)} and its label as "
                         f"{_as(label_what)}")
    note = None
    if not finite.all():
        clean = np.where(finite, array, low).astype(array.dtype)
        fixed_image = sitk.GetImageFromArray(clean)
        fixed_image.CopyInformation(image)
        image = fixed_image
        note = (f"{name}: {int((~finite).sum())} NaN or infinite voxels were set to the image's minimum "
                f"({low:g})")
    return image, note


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images share their voxel grid (size, spacing, origin, direction), up to rounding."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    spacing = np.array(b.GetSpacing())
    return (np.allclose(a.GetSpacing(), spacing, rtol=1e-4, atol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3 * spacing.min())
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def _grid_text(image: sitk.Image) -> str:
    return (f"size {_size(image)}, spacing {'x'.join(f'{s:g}' for s in image.GetSpacing())}, "
            f"origin ({', '.join(f'{o:g}' for o in image.GetOrigin())})")


def check_label(label: sitk.Image, image: sitk.Image, what: str, image_what: str, source: str | Path = "",
                resample: bool = False) -> tuple[sitk.Image, str | None]:
    """A label on its image's grid with at least one non-zero voxel, and a note when it was resampled.

    A label on another grid is an error unless ``resample``, which resamples it onto the image's grid
    (nearest neighbour) on purpose.
    """
    name = f"{what} {source}".strip()
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{name} has {label.GetNumberOfComponentsPerPixel()} values per voxel; a label map has one")
    if label.GetDimension() != image.GetDimension():
        raise ValueError(f"{name} is {label.GetDimension()}-D but the {image_what} is {image.GetDimension()}-D: "
                         f"give the {image_what}'s own label")
    values = np.unique(sitk.GetArrayViewFromImage(label))
    if values.size and (values[-1] > MAX_LABEL_VALUE or values[0] < 0 or values.size > MANY_LABELS):
        raise ValueError(f"{name} holds {values.size} values from {int(values[0])} to {int(values[-1])}: it "
                         f"looks like a grey-level image, not a label map (values 0..{MAX_LABEL_VALUE}, at most "
                         f"{MANY_LABELS} of them). Give the label as "
                         f"{_as(what)} and the image as {_as(image_what)}")
    note = None
    if not same_grid(label, image):
        if not resample:
            raise ValueError(f"{name} is not on the {image_what}'s grid ({_grid_text(label)} vs {_grid_text(image)}): "
                             f"give the {image_what}'s own label, or add --resample-labels to resample it onto the "
                             f"{image_what} (nearest neighbour)")
        label = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
        note = f"{name} was resampled onto the {image_what}'s grid (nearest neighbour), as --resample-labels asks"
    if not np.any(sitk.GetArrayViewFromImage(label)):
        where = " inside the " + image_what + " after resampling: they do not overlap" if note else ""
        raise ValueError(f"{name} is empty (no non-zero voxel{where}): give the organ's label map of the {image_what}, "
                         "or leave the label out")
    return label, note


def check_output_dir(path: str | Path) -> Path:
    """The output folder if it is, or can be made as, a writable folder (nothing is created here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} is a file: give a folder (it is made if missing)")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot make output folder {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot make output folder {path}: no permission to write in {ancestor}")
    return path


def check_model_dimension(model_dim: int, image_dim: int, model: str | Path, image: str | Path) -> None:
    """The model's dimension equals the images'."""
    if model_dim != image_dim:
        hint = " or extract one slice first" if model_dim == 2 else ""
        raise ValueError(f"{model} is a {model_dim}-D model but {image} is {image_dim}-D: use a {image_dim}-D "
                         f"model{hint}")


@dataclass
class RegisterInputs:
    """The checked images of a registration, and the notes of what was accepted on purpose."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_label: sitk.Image | None = None
    moving_label: sitk.Image | None = None
    notes: list[str] = field(default_factory=list)


def read_register_inputs(fixed: str | Path, moving: str | Path, fixed_label: str | Path | None = None,
                         moving_label: str | Path | None = None, resample_labels: bool = False,
                         on_read=None, moving_cache: dict | None = None) -> RegisterInputs:
    """Read and check the files of one registration; ``on_read(done, total)`` after each file.

    ``moving_cache``: a dict that keeps the checked moving image and label between calls, so that one atlas
    registered onto many images is read and checked once (keyed by the files and ``resample_labels``)."""
    paths = [("fixed image", fixed), ("moving image", moving), ("fixed label", fixed_label),
             ("moving label", moving_label)]
    paths = [(what, p) for what, p in paths if p]
    images, notes = {}, []
    for done, (what, path) in enumerate(paths, 1):
        key = (what, str(path), str(moving) if what == "moving label" else "", resample_labels)
        if moving_cache is not None and key in moving_cache:
            images[what], note = moving_cache[key]
        elif what.endswith("image"):
            image, series = read_image_noted(path, what)  # a DICOM series folder: which series was read
            images[what], note = check_image(image, what, path)
            note = "; ".join(n for n in (series, note) if n) or None
        else:
            image_what = what.replace("label", "image")
            images[what], note = check_label(read_label(path, what), images[image_what], what, image_what, path,
                                             resample_labels)
        if moving_cache is not None and what.startswith("moving"):
            moving_cache[key] = images[what], note
        notes += [note] if note else []
        if on_read is not None:
            on_read(done, len(paths))
    if images["fixed image"].GetDimension() != images["moving image"].GetDimension():
        raise ValueError(f"the fixed image {fixed} is {images['fixed image'].GetDimension()}-D but the moving image "
                         f"{moving} is {images['moving image'].GetDimension()}-D: give two images of one dimension")
    return RegisterInputs(images["fixed image"], images["moving image"], images.get("fixed label"),
                          images.get("moving label"), notes)
