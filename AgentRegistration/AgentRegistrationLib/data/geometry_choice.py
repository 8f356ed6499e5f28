"""The model geometry chosen for a training: the paper's fixed crop and grid, or one derived from the training
masks (``auto``)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from AgentRegistrationLib.contract.training_folder import DEFAULT_GEOMETRY, GEOMETRY_CHOICES
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.data.organ_box import BOX_SPREADS, localisation_from_label


def model_geometry(dim: int, crop: str | None = None, choice: str | None = "paper", labels: list | None = None,
                   size: tuple[int, ...] | None = None, control_spacing: tuple[float, ...] | None = None,
                   box_spreads: tuple[float, ...] | None = None,
                   control_spacing_mm: tuple[float, ...] | None = None) -> ModelGeometry:
    """The model geometry of a choice (:data:`protocol.GEOMETRY_CHOICES`) and a crop (:data:`protocol.CROPS`), with
    the numbers the user set.

    ``paper``: the paper's grids, with boxes on the organ (``crop='organ'``, sized by ``box_spreads``, default
    :data:`localisation.BOX_SPREADS`) or the paper's centred box (``crop='paper'``, the default). ``auto``: derived
    from the training masks ``labels`` (files or SimpleITK images; :func:`auto_geometry`), always on the organ.
    ``None`` (``agentreg groundtruth`` without ``--geometry``): ``paper`` when a ``crop`` is given (an option of the
    paper's geometry), else :data:`protocol.DEFAULT_GEOMETRY`. ``control_spacing_mm`` (instead of
    ``control_spacing``, in grid voxels) sets the control spacing in the files' physical units, converted with the
    model voxel's median physical size over ``labels`` (:func:`model_voxel_size`).
    """
    if choice is None:
        choice = "paper" if crop else DEFAULT_GEOMETRY
    if choice not in GEOMETRY_CHOICES:
        raise ValueError(f"model geometry {choice!r}: choose one of {', '.join(GEOMETRY_CHOICES)}")
    if control_spacing is not None and control_spacing_mm is not None:
        raise ValueError("give the control spacing once: in grid voxels (--control-spacing) or in the images' "
                         "physical units (--control-spacing-mm), not both")
    spreads = tuple(box_spreads) if box_spreads is not None else BOX_SPREADS[dim]
    if choice == "auto":
        if crop == "paper":
            raise ValueError("--geometry auto sizes the grid to the organ, so it crops on the organ: leave out "
                             "--crop paper, or use --geometry paper")
        if not labels:
            raise ValueError("--geometry auto derives the model grid from the training masks: give the subjects")
        geometry = auto_geometry(labels, dim, spreads, fit=box_spreads is None)  # the user's box is kept
    else:
        geometry = ModelGeometry.localised_grid(dim, spreads) if crop == "organ" else ModelGeometry.paper(dim)
    if box_spreads is not None and choice == "paper" and crop != "organ":
        geometry = ModelGeometry.localised_grid(dim, spreads)  # box spreads place the crops on the organ
    geometry = geometry.with_overrides(size, control_spacing, box_spreads)
    if control_spacing_mm is not None:
        if not labels:
            raise ValueError("a control spacing in physical units is converted with the training masks' voxel size: "
                             "give the subjects")
        geometry = geometry.with_overrides(control_spacing=spacing_in_voxels(control_spacing_mm,
                                                                             model_voxel_size(geometry, labels)))
    return geometry


def model_voxel_size(geometry: ModelGeometry, labels: list) -> tuple[float, ...]:
    """The physical size (the files' units, e.g. mm) of a model voxel per axis: the median over the masks ``labels``
    (files or SimpleITK label images) of their crop box of ``geometry`` divided by the grid's intervals; on the
    organ, the box spans ``box_spreads`` of each mask's own organ spread, so this is the voxel of the median organ."""
    from AgentRegistrationLib.data.image_io import read_label

    dim, size = geometry.dim, np.maximum(np.array(geometry.size) - 1, 1)
    voxels = []
    for i, lab in enumerate(labels):
        label = lab if isinstance(lab, sitk.Image) else read_label(lab)
        if geometry.localised:
            spread = localisation_from_label(label, f"training mask {lab if not isinstance(lab, sitk.Image) else i}")
            extent = np.array(geometry.box_spreads[:dim]) * np.asarray(spread.spread[:dim])
        else:
            extent = ((np.array(label.GetSize()) - 1) * np.array(label.GetSpacing()))[:dim] \
                * np.array(geometry.crop_fraction[:dim])
        voxels.append(extent / size)
    return tuple(float(v) for v in np.median(np.array(voxels), axis=0))


def spacing_in_voxels(spacing_mm: tuple[float, ...], voxel: tuple[float, ...]) -> tuple[float, ...]:
    """A control spacing in physical units (one number: the same on every axis) as model grid voxels of physical
    size ``voxel``, to 0.1 voxel (at least 2 voxels)."""
    given = tuple(spacing_mm) * len(voxel) if len(spacing_mm) == 1 else tuple(spacing_mm)
    if len(given) != len(voxel) or min(given) <= 0:
        raise ValueError(f"control spacing {list(spacing_mm)} (physical units): give one positive number or "
                         f"{len(voxel)}, one per axis")
    return tuple(max(round(s / v, 1), 2.0) for s, v in zip(given, voxel, strict=True))


def auto_geometry(labels: list, dim: int, box_spreads: tuple[float, ...], fit: bool = True) -> ModelGeometry:
    """The ``auto`` model geometry (:meth:`ModelGeometry.from_organ_spread`) of the training masks ``labels`` (files
    or SimpleITK label images): the organ's median spread over them (per axis, the files' physical units). With
    ``fit``, the box spreads are shrunk where the training images' field of view is smaller, when the box would pad
    more than :data:`MAX_PADDING` of the crops (:func:`fitted_box_spreads`), so that the crops stay on the images."""
    masks = _masks(labels)
    spreads = [localisation_from_label(label, name).spread[:dim] for name, label in masks]
    if fit:
        box_spreads = fitted_box_spreads(masks, dim, box_spreads)
    return ModelGeometry.from_organ_spread(tuple(np.median(np.array(spreads), axis=0)), box_spreads)


# ----------------------------------------------------------------------------------------- crops that stay on the images
MAX_PADDING = 0.10
"""The share of a crop's volume that may lie outside its training image (padded with zeros) before ``agentreg
groundtruth`` warns."""
FIT_QUANTILE = 25
"""``auto`` shrinks a box spread to the field of view that this percentile of the training images leaves around their
organ (per axis), so that most crops lie wholly on their image (only where the box would pad more than
:data:`MAX_PADDING`: the PROMISE12 grids keep theirs)."""
MIN_BOX_SPREADS = 5.0
"""``auto`` never shrinks a box below this many organ spreads per axis (the organ spans about 4.5: it and a rim)."""


def _masks(labels: list) -> list[tuple[str, sitk.Image]]:
    """``(name, label image)`` of files or SimpleITK label images."""
    from AgentRegistrationLib.data.image_io import read_label

    return [(f"training mask {i}", lab) if isinstance(lab, sitk.Image) else (str(lab), read_label(lab))
            for i, lab in enumerate(labels)]


def border_distances(label: sitk.Image, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The organ's spread (per image axis, physical units) and its centre's distance to the image's two borders per
    axis ``(2, dim)``, physical units (the image spans half a voxel beyond its first and last voxel centres)."""
    place = localisation_from_label(label)
    index = np.array(label.TransformPhysicalPointToContinuousIndex(np.asarray(place.centre, float).tolist()))[:dim]
    size, spacing = np.array(label.GetSize())[:dim], np.array(label.GetSpacing())[:dim]
    return np.asarray(place.spread[:dim]), np.stack([(index + 0.5) * spacing, (size - 0.5 - index) * spacing])


def _padding(masks: list[tuple[str, sitk.Image]], dim: int, box_spreads) -> tuple[list[float], np.ndarray]:
    """Per mask, the share of a crop of ``box_spreads`` on its organ that lies off the image; and the box spreads
    each image leaves room for per axis ``(masks, dim)`` (twice the organ centre's distance to the nearer border)."""
    box, shares, fits = np.array(box_spreads[:dim], dtype=float), [], []
    for _, label in masks:
        spread, borders = border_distances(label, dim)
        half = box * spread / 2
        inside = (np.minimum(half, borders[0]) + np.minimum(half, borders[1])) / (2 * half)
        shares.append(float(1 - np.prod(np.clip(inside, 0, 1))))
        fits.append(2 * borders.min(axis=0) / spread)
    return shares, np.array(fits)


def fitted_box_spreads(masks: list[tuple[str, sitk.Image]], dim: int, box_spreads: tuple[float, ...]) -> tuple:
    """``box_spreads`` when its crops pad at most :data:`MAX_PADDING` of their volume on the training images (mean),
    else each axis shrunk (never below :data:`MIN_BOX_SPREADS`, to 0.1) to the spreads a crop centred on the organ
    spans before it leaves the image, in the :data:`FIT_QUANTILE` percentile of the training images."""
    shares, fits = _padding(masks, dim, box_spreads)
    if np.mean(shares) <= MAX_PADDING:
        return tuple(box_spreads)
    room = np.percentile(fits, FIT_QUANTILE, axis=0)
    return tuple(float(min(b, max(MIN_BOX_SPREADS, np.floor(r * 10) / 10))) for b, r in zip(box_spreads, room,
                                                                                           strict=True))


def crop_padding(geometry: ModelGeometry, labels: list, names: list[str] | None = None) -> dict | None:
    """How much of ``geometry``'s crop lies outside each training image (padded with zeros), for crops on the organ
    (``None`` for the paper's crop): the share of the crop's volume per subject, its mean and largest, the subject
    of the largest, and the box spreads the images leave room for (:func:`fitted_box_spreads`, before the floor)."""
    if not geometry.localised or not labels:
        return None
    masks = _masks(labels)
    shares, fits = _padding(masks, geometry.dim, geometry.box_spreads)
    names = names or [name for name, _ in masks]
    worst = int(np.argmax(shares))
    return {"mean": float(np.mean(shares)), "max": shares[worst], "worst": names[worst],
            "per_subject": dict(zip(names, shares, strict=True)),
            "room_spreads": [round(float(r), 2) for r in np.percentile(fits, FIT_QUANTILE, axis=0)]}


def crop_padding_lines(geometry: ModelGeometry, padding: dict | None) -> list[str]:
    """What ``agentreg groundtruth`` says of the crop: that ``auto`` shrank the box to the images' field of view,
    and a warning when the crop pads more than :data:`MAX_PADDING` of its volume with zeros on the training images."""
    if not padding:
        return []
    lines = []
    default = BOX_SPREADS[geometry.dim]
    if geometry.choice == "auto" and tuple(geometry.box_spreads) != tuple(default):
        lines.append(f"--geometry auto shrank the crop box from {list(default)} to {list(geometry.box_spreads)} organ "
                     f"spreads per axis: the training images leave room for {padding['room_spreads']} around their "
                     f"organ ({FIT_QUANTILE}th percentile over the subjects); give --box-spreads to choose it yourself")
    share = (f"the crop pads {100 * padding['mean']:.0f} % of its volume with zeros on the training images (mean; "
             f"at most {100 * padding['max']:.0f} %, {padding['worst']})")
    if padding["mean"] > MAX_PADDING:
        lines.append(f"warning: {share}: more than {100 * MAX_PADDING:.0f} %, the images hold little around the organ "
                     f"for the crop; give a smaller --box-spreads (the images leave room for {padding['room_spreads']}"
                     " spreads) or images with a wider field of view")
    else:
        lines.append(share)
    return lines
