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
        geometry = auto_geometry(labels, dim, spreads)
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


def auto_geometry(labels: list, dim: int, box_spreads: tuple[float, ...]) -> ModelGeometry:
    """The ``auto`` model geometry (:meth:`ModelGeometry.from_organ_spread`) of the training masks ``labels`` (files
    or SimpleITK label images): the organ's median spread over them (per axis, the files' physical units)."""
    from AgentRegistrationLib.data.image_io import read_label

    spreads = [localisation_from_label(read_label(lab) if not isinstance(lab, sitk.Image) else lab,
                                       f"training mask {lab if not isinstance(lab, sitk.Image) else i}").spread[:dim]
               for i, lab in enumerate(labels)]
    return ModelGeometry.from_organ_spread(tuple(np.median(np.array(spreads), axis=0)), box_spreads)
