"""The preprocessing every method of ``agentreg evaluate`` shares: each ordered pair of validation subjects on the
fixed image's model grid (:func:`prepare_evaluation_pair`: the paper's translation pre-alignment, or crops on the
organ), cached as ``pairs/<moving>__to__<fixed>/prepared.npz`` in the evaluation folder (:func:`pair_dir`) and read
back by the evaluation, the benchmarks and the experiments (:func:`prepared_pairs`).

The module imports without SimpleITK and itk (the cached pairs are read where neither is installed): the functions
that prepare a pair import them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.core.bspline import ControlGrid
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice

if TYPE_CHECKING:
    from AgentRegistrationLib.data.dataset import Subject


def pair_dir(out: Path, moving: str, fixed: str) -> Path:
    """The folder of the pair ``moving`` -> ``fixed`` in the evaluation folder ``out``: its prepared pair and the
    result of each method."""
    return Path(out) / "pairs" / f"{moving}__to__{fixed}"


def load_elastix() -> None:
    """Load itk-elastix's lazily imported parts, so that the first pair's time does not include it."""
    import itk  # (see the module's docstring)

    _ = itk.ParameterObject, itk.elastix_registration_method, itk.TransformixFilter


def prepare_evaluation_pair(fixed: Subject, moving: Subject, geometry: ModelGeometry,
                            localiser_path: str | None = None) -> dict:
    """Both images on the fixed image's model grid, by the preprocessing of ``geometry``: the paper's translation
    pre-alignment (elastix, on the 3-D volumes), or each crop on its organ, the moving one placed by the moving
    label (the atlas case) and the fixed one by the localiser in ``localiser_path`` (a model bundle or a localiser
    file; without one, by the fixed label: an oracle start, reported as such). Also the moving label with no
    registration at all (``none``)."""
    from AgentRegistrationLib.data.dataset import subject_frame  # SimpleITK (see the module's docstring)
    from AgentRegistrationLib.data.image_io import read_image, read_label
    from AgentRegistrationLib.data.localiser import localise
    from AgentRegistrationLib.data.organ_box import localisation_from_label
    from AgentRegistrationLib.data.preprocessing import normalise_intensity, organ_frames, prealign_translation, resample_to_frame

    fixed_image = read_image(fixed.image, f"image of {fixed.name}")
    moving_image = read_image(moving.image, f"image of {moving.name}")
    fixed_label = read_label(fixed.label, f"label of {fixed.name}")
    moving_label = read_label(moving.label, f"label of {moving.name}")
    start = time.perf_counter()
    if geometry.localised:
        if localiser_path:
            localiser = _localiser(localiser_path, fixed_image.GetDimension())
            fixed_place, placed_by = localise(localiser, fixed_image), "localiser"
        else:
            fixed_place, placed_by = localisation_from_label(fixed_label, "fixed label"), "fixed label (oracle)"
        frame, moving_frame = organ_frames(fixed_image, moving_image, geometry, fixed_place,
                                           localisation_from_label(moving_label, "moving label"))
        status = f"boxes on the organ; fixed placed by the {placed_by}"
    else:
        load_elastix()
        start = time.perf_counter()
        translation, status = prealign_translation(fixed_image, moving_image, geometry)
        frame = subject_frame(fixed_image, geometry)
        moving_frame = frame.translated(translation)
    seconds = time.perf_counter() - start
    shape = geometry.array_shape

    def on_grid(image, box, label=False):
        return resample_to_frame(image, box, label=label).reshape(shape)

    return {
        "fixed": normalise_intensity(on_grid(fixed_image, frame)),
        "moving": normalise_intensity(on_grid(moving_image, moving_frame)),
        "fixed_label": on_grid(fixed_label, frame, label=True),
        "moving_label": on_grid(moving_label, moving_frame, label=True),
        "unregistered_label": on_grid(moving_label, frame, label=True),
        "translation": moving_frame.origin - frame.origin,
        **{f"{name}_{key}": np.asarray(getattr(box, key), dtype=np.float64) for name, box in
           (("frame", frame), ("moving_frame", moving_frame)) for key in ("origin", "spacing", "direction")},
        "prealignment": status,
        "seconds": seconds,
        "geometry": json.dumps(geometry.to_dict()),
        "localiser": localiser_hash(localiser_path, fixed_image.GetDimension()),
    }


FRAME_KEYS = tuple(f"{name}_{key}" for name in ("frame", "moving_frame") for key in ("origin", "spacing", "direction"))
"""The two crop boxes of a prepared pair (:class:`preprocessing.ModelFrame`), absent in pairs cached before the
figures in the fixed image's space."""
WARPED_LABEL = "warped_label_{method}.nii.gz"
"""The moving label warped onto the fixed image's own grid by a method, in the pair's folder (:func:`pair_dir`)."""


def fixed_space(pair: dict, geometry: ModelGeometry) -> bool:
    """Whether the figures in the fixed image's own space can be measured for ``pair`` (a 3-D model, a pair prepared
    with its crop boxes recorded)."""
    return geometry.dim == 3 and all(k in pair for k in FRAME_KEYS)


def fixed_space_figures(fixed_label: str | Path, moving_label: str | Path, pair: dict,
                        coefficients: np.ndarray | None, grid: ControlGrid | None, out: Path | None = None) -> dict:
    """Dice in the fixed image's own space (``dice_fixed``): the moving label (file ``moving_label``) warped onto the
    fixed label's grid by a method's deformation (``coefficients`` on ``grid``, model voxels of ``pair``'s crop boxes;
    ``None``: no registration, the label where it lies) with nearest neighbour, as ``agentreg register`` writes its
    warped label, against the fixed label (file ``fixed_label``); every non-zero voxel is organ. ``out``: also
    write the warped label there (a NIfTI a user can check)."""
    import SimpleITK as sitk  # (see the module's docstring)

    from AgentRegistrationLib.data.image_io import read_label
    from AgentRegistrationLib.data.preprocessing import ModelFrame, displacement_in_fixed_geometry, warp_to_fixed

    fixed, moving = read_label(fixed_label, "fixed label"), read_label(moving_label, "moving label")
    if coefficients is None:
        warped = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    else:
        frame, moving_frame = (ModelFrame(pair[f"{name}_origin"], pair[f"{name}_spacing"], pair[f"{name}_direction"],
                                          ()) for name in ("frame", "moving_frame"))  # the size is not needed
        displacement = displacement_in_fixed_geometry(coefficients, grid, frame, fixed, moving_frame)
        warped = warp_to_fixed(moving, displacement, label=True)
    if out is not None:
        atomic_write(out, lambda tmp: sitk.WriteImage(warped, str(tmp), True))
    return {"dice_fixed": dice(sitk.GetArrayViewFromImage(warped) > 0, sitk.GetArrayViewFromImage(fixed) > 0)}


def _localiser(path: str, dim: int):
    """The organ localiser for ``dim``-D images of a model bundle, or of a localiser file."""
    # SimpleITK (see the module's docstring)
    from AgentRegistrationLib.data.localiser import load_localiser, localiser_from_payload

    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and payload.get("format") is not None:  # a model bundle
        if str(dim) not in payload.get("localisers", {}):
            raise ValueError(f"{path} has no organ localiser for {dim}-D images: train one (agentreg localiser) "
                             "and add it to the model (agentreg train --localiser)")
        return localiser_from_payload(payload["localisers"][str(dim)])
    return load_localiser(path)


def localiser_hash(path: str | None, dim: int) -> str:
    """What identifies the localiser that placed the fixed crops of ``dim``-D images (``""`` for none)."""
    if not path:
        return ""
    localiser = _localiser(path, dim)
    digest = hashlib.sha256()
    for key, value in sorted(localiser.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    digest.update(json.dumps(localiser.config.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def load_prepared(path: Path, geometry: ModelGeometry, localiser: str | None = None) -> dict | None:
    """The cached prepared pair, or ``None`` when absent, made for another geometry or (``localiser``: its hash)
    with crops placed by another localiser."""
    if not path.is_file():
        return None
    with np.load(path) as z:
        pair = {k: z[k] for k in z.files}
    if str(pair["geometry"]) != json.dumps(geometry.to_dict()):
        return None
    if localiser is not None and str(pair.get("localiser", "")) != localiser:
        return None
    pair["prealignment"], pair["seconds"] = str(pair["prealignment"]), float(pair["seconds"])
    return pair


def prepared_pairs(out: str | Path, geometry: ModelGeometry, count: int | None = None) -> list[tuple[tuple[str, str], dict]]:
    """The first ``count`` cached prepared pairs of the evaluation folder ``out`` (sorted by name) that are on
    ``geometry``'s grid: ``((moving, fixed), pair)``."""
    found = []
    for path in sorted(Path(out).glob("pairs/*__to__*/prepared.npz")):
        pair = load_prepared(path, geometry)
        if pair is not None:
            found.append((tuple(path.parent.name.split("__to__")), pair))
    return found[:count]


def save_prepared(path: Path, pair: dict) -> None:
    """Cache a prepared pair (:func:`prepare_evaluation_pair`) at ``path`` (``<pair_dir>/prepared.npz``)."""
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **pair))
