"""The learned localiser: finds the prostate in an MR image without any label (issue 11, point 1).

A small U-Net (:class:`OrganLocaliser`, 2-D or 3-D, the layer classes chosen from the dimension) predicts the
organ's probability on a fixed low-resolution grid that covers the image's whole field of view. :func:`localise`
turns that map into a :class:`~localisation.Localisation` (probability-weighted centre and spread) in the
image's own physical space, whatever its origin, spacing, size or direction.

Geometry, written down once. The localiser grid of ``config.grid`` voxels (ITK order x, y[, z]) spans a box of
the image's continuous index space, the whole field of view ``[-0.5, n - 0.5]`` per axis by default, with the
image's direction; its voxel ``j`` along axis ``a`` sits at continuous index ``lo_a + (j + 0.5) * (hi_a - lo_a)
/ m_a``. The image is smoothed (anti-aliasing), resampled onto a grid twice as fine, and averaged 2:1 by
``grid_sample`` (``align_corners=False``, whose normalised coordinates -1 and 1 are the box's edges). Training
crops come out of the same fine arrays through the same ``grid_sample`` with a random affine, so the network
sees at inference exactly what an identity augmentation gives in training. Intensities are mapped by the
percentiles 1 and 99 of the network's input to 0 and 1 (clipped).

Training (:func:`train_localiser`) draws random field-of-view crops and zooms, in-plane rotations, left-right
flips, a smooth multiplicative bias field, gamma and noise; the loss is binary cross-entropy plus soft Dice
against the label resampled the same way. After training, the spread is calibrated on the training images
(median true/predicted spread per axis), stored in the config.

Storage: :func:`localiser_to_payload` gives plain data (config dict + state tensors) that
``torch.load(weights_only=True)`` reads back; :func:`localiser_from_payload` rebuilds and checks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.training_folder import LOCALISER_WEIGHTINGS
from AgentRegistrationLib.core.network import Conv3d
from AgentRegistrationLib.data.organ_box import Localisation, localisation_from_weights

PAYLOAD_KIND = "agentregistration.organ_localiser"
PAYLOAD_VERSION = 1


@dataclass(frozen=True)
class LocaliserConfig:
    dim: int = 3
    grid: tuple[int, ...] = (48, 48, 16)  # network input, ITK order (x, y[, z])
    channels: tuple[int, ...] = (4, 8, 16, 32)  # per U-Net level; len - 1 poolings by 2
    weighting: str = "p2"  # probability map -> centre and spread: moments of p, p2 (p squared), largest (the p > 0.5
    # component), or the ellipsoid fitted to p (ellipsoid_fit)
    spread_scale: tuple[float, ...] = (1.0, 1.0, 1.0)  # calibration of the predicted spread per axis
    refine: bool = False  # a second pass on a box around the first answer (finer grid)
    refine_spreads: float = 8.0  # that box's extent in predicted spreads per axis (at least fov_min of the view)
    # augmentation
    fov_min: float = 0.55  # smallest crop, fraction of the field of view per axis
    fov_max: float = 1.1  # largest (> 1 pads beyond the image with zeros)
    rotate_deg: float = 10.0  # in-plane rotation
    flip: bool = True  # left-right
    bias: float = 0.4  # log-amplitude of a linear multiplicative bias field
    gamma: float = 0.25  # log-sd of the intensity gamma
    noise: float = 0.03
    lr: float = 2e-3
    batch_size: int = 4

    def __post_init__(self):
        if self.dim not in (2, 3):
            raise ValueError(f"localiser dim must be 2 or 3, not {self.dim}")
        if len(self.grid) != self.dim or len(self.spread_scale) < self.dim:
            raise ValueError(f"localiser grid {self.grid} / spread_scale {self.spread_scale} do not match dim {self.dim}")
        step = 2 ** (len(self.channels) - 1)
        if any(g % step or g <= 0 for g in self.grid) or not self.channels:
            raise ValueError(f"localiser grid {self.grid} must be positive multiples of {step} "
                             f"({len(self.channels)} levels of channels {self.channels})")
        if self.weighting not in LOCALISER_WEIGHTINGS:
            raise ValueError(f"localiser weighting {self.weighting!r}: choose one of {LOCALISER_WEIGHTINGS}")
        if not 0 < self.fov_min <= 1 <= self.fov_max:
            raise ValueError(f"localiser crop range fov_min={self.fov_min}, fov_max={self.fov_max}: need 0 < min <= 1 <= max")

    @classmethod
    def default(cls, dim: int) -> LocaliserConfig:
        if dim == 2:
            return cls(dim=2, grid=(96, 96), channels=(8, 16, 32, 32), spread_scale=(1.0, 1.0), batch_size=8)
        return cls(dim=3)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(grid=list(self.grid), channels=list(self.channels), spread_scale=list(self.spread_scale))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LocaliserConfig:
        known = {f: v for f, v in d.items() if f in cls.__dataclass_fields__}
        for key in ("grid", "channels"):
            if key in known:
                known[key] = tuple(int(v) for v in known[key])
        if "spread_scale" in known:
            known["spread_scale"] = tuple(float(v) for v in known["spread_scale"])
        return cls(**known)


# -- the network -----------------------------------------------------------------------------------------------------
def _block(dim: int, cin: int, cout: int) -> nn.Sequential:
    conv = nn.Conv2d if dim == 2 else Conv3d
    return nn.Sequential(conv(cin, cout, 3, padding=1), nn.GroupNorm(min(4, cout), cout), nn.ReLU(inplace=True),
                         conv(cout, cout, 3, padding=1), nn.GroupNorm(min(4, cout), cout), nn.ReLU(inplace=True))


class OrganLocaliser(nn.Module):
    """A tiny U-Net: image (N, 1, [Z,] Y, X) on the localiser grid -> organ logits of the same shape."""

    def __init__(self, config: LocaliserConfig):
        super().__init__()
        self.config = config
        dim, ch = config.dim, config.channels
        self.down = nn.ModuleList([_block(dim, 1 if i == 0 else ch[i - 1], c) for i, c in enumerate(ch)])
        self.up = nn.ModuleList([_block(dim, ch[i] + ch[i + 1], ch[i]) for i in range(len(ch) - 1)])
        self.head = (nn.Conv2d if dim == 2 else Conv3d)(ch[0], 1, 1)
        self.pool = nn.MaxPool2d(2) if dim == 2 else nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = F.interpolate(x, size=skips[i].shape[2:], mode="nearest")
            x = self.up[i](torch.cat([skips[i], x], dim=1))
        return self.head(x)


# -- geometry: the localiser grid on an image ----------------------------------------------------------------------
def localiser_grid(image: sitk.Image, size: Sequence[int], lo=None, hi=None) -> sitk.Image:
    """An empty image of ``size`` voxels (ITK order) spanning the continuous-index box [lo, hi] of ``image``
    (default: its whole field of view), with the image's direction."""
    n = np.array(image.GetSize(), dtype=float)
    lo = np.full(n.shape, -0.5) if lo is None else np.asarray(lo, dtype=float)
    hi = n - 0.5 if hi is None else np.asarray(hi, dtype=float)
    m = np.asarray(size, dtype=float)
    step = (hi - lo) / m  # in input voxels
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing((step * np.array(image.GetSpacing())).tolist())
    grid.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((lo + 0.5 * step).tolist()))
    return grid


def _correlate_nearest(x: torch.Tensor, axis: int, weights: np.ndarray, block: int = 32) -> torch.Tensor:
    """``x`` (float64) correlated along ``axis`` with the odd, centred ``weights``, the edge value repeated beyond each
    end (scipy.ndimage's mode ``"nearest"``). Each block of ``block`` outputs is one small banded matrix product with
    its inputs and the kernel's radius more on each side: about the taps' work, done by torch's BLAS on torch's
    threads (numpy's BLAS would start threads of its own beside the registration's)."""
    radius = len(weights) // 2
    n = x.shape[axis]
    block = min(block, n)
    count = -(-n // block)
    lines = x.reshape(math.prod(x.shape[:axis]), n, math.prod(x.shape[axis + 1:]))  # (before, axis, after)
    padded = torch.cat([lines[:, :1].expand(-1, radius, -1), lines,
                        lines[:, -1:].expand(-1, radius + count * block - n, -1)], dim=1)
    band = torch.from_numpy(sum(w * np.eye(block, block + 2 * radius, k) for k, w in enumerate(weights)))
    out = torch.empty(lines.shape[0], count * block, lines.shape[2], dtype=x.dtype)  # band[i, i + k] = weights[k]
    for start in range(0, count * block, block):
        window = padded[:, start:start + block + 2 * radius]
        if lines.shape[2] == 1:  # the last axis: its lines are rows
            out[:, start:start + block, 0] = window[:, :, 0] @ band.T
        else:
            out[:, start:start + block] = band @ window
    return out[:, :n].reshape(x.shape)


def gaussian_smooth(array: np.ndarray, sigma: Sequence[float], truncate: float = 4.0) -> np.ndarray:
    """``array`` smoothed by a Gaussian of standard deviation ``sigma`` (voxels, array order), in float64: the same
    values as ``scipy.ndimage.gaussian_filter(array, sigma, mode="nearest", truncate=truncate)`` computed in float64
    (the sampled kernel of radius ``int(truncate * sigma + 0.5)`` normalised to sum 1, one axis after the other, axes
    of sigma 0 left alone), without importing scipy on the registration's path."""
    out = torch.from_numpy(np.asarray(array, dtype=np.float64))
    for axis, s in enumerate(sigma):
        if s > 1e-15:  # scipy's test for an axis to smooth
            radius = int(truncate * float(s) + 0.5)
            weights = np.exp(-0.5 / (s * s) * np.arange(-radius, radius + 1) ** 2)
            out = _correlate_nearest(out, axis, weights / weights.sum())
    return out.numpy()


def resample_to_grid(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """``image`` smoothed against aliasing and linearly resampled onto ``grid`` (same direction), as an array."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if array.ndim != image.GetDimension():
        raise ValueError(f"the localiser needs a scalar image, not one with {image.GetNumberOfComponentsPerPixel()} "
                         "components per voxel")
    ratio = np.array(grid.GetSpacing()) / np.array(image.GetSpacing())  # grid voxel in input voxels, ITK order
    sigma = 0.5 * np.sqrt(np.maximum(ratio**2 - 1.0, 0.0))
    if np.any(sigma > 0.2):
        array = gaussian_smooth(array, sigma[::-1]).astype(np.float32)
    smooth = sitk.GetImageFromArray(array)
    smooth.CopyInformation(image)
    return sitk.GetArrayFromImage(sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def fine_size(config: LocaliserConfig) -> list[int]:
    return [2 * g for g in config.grid]


def _identity_theta(n: int, dim: int) -> torch.Tensor:
    return torch.eye(dim, dim + 1).expand(n, dim, dim + 1)


def sample_grid(fine: torch.Tensor, theta: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` of fine arrays (N, C, ...) through affines ``theta`` onto the localiser grid."""
    shape = [fine.shape[0], fine.shape[1], *reversed(grid)]
    coords = F.affine_grid(theta.to(fine.dtype), shape, align_corners=False)
    return F.grid_sample(fine, coords, mode="bilinear", padding_mode="zeros", align_corners=False)


def normalise_input(x: torch.Tensor) -> torch.Tensor:
    """Per sample: percentiles 1 and 99 -> 0 and 1, clipped."""
    flat = x.reshape(x.shape[0], -1)
    q = torch.quantile(flat, torch.tensor([0.01, 0.99], dtype=x.dtype), dim=1).T  # (N, 2)
    lo, hi = q[:, 0], torch.maximum(q[:, 1], q[:, 0] + 1e-6)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return ((x - lo.view(shape)) / (hi - lo).view(shape)).clamp(0.0, 1.0)


# -- inference -----------------------------------------------------------------------------------------------------
def _check_image(localiser: OrganLocaliser, image: sitk.Image) -> None:
    dim = localiser.config.dim
    if not isinstance(image, sitk.Image):
        raise ValueError(f"localise needs a SimpleITK image, not {type(image).__name__}")
    if image.GetDimension() != dim:
        raise ValueError(f"this localiser is {dim}-D but the image is {image.GetDimension()}-D"
                         + (": extract the slice through the prostate first" if dim == 2 else ""))


@torch.no_grad()
def probability_map(localiser: OrganLocaliser, image: sitk.Image, lo=None, hi=None) -> tuple[np.ndarray, sitk.Image]:
    """The organ probability (array order) on the localiser grid over the box [lo, hi] of ``image``'s continuous
    index space (default: the whole field of view), and that grid as an (empty) image."""
    _check_image(localiser, image)
    config = localiser.config
    fine = resample_to_grid(image, localiser_grid(image, fine_size(config), lo, hi))
    x = sample_grid(torch.from_numpy(fine)[None, None], _identity_theta(1, config.dim), config.grid)
    localiser.eval()
    p = torch.sigmoid(localiser(normalise_input(x)))[0, 0].numpy().astype(np.float64)
    return p, localiser_grid(image, config.grid, lo, hi)


def weights_from_probability(p: np.ndarray, weighting: str) -> np.ndarray:
    """The weights of the centre and spread: ``p``, ``p2`` (p squared), or ``largest`` (p inside the largest
    connected component of p > 0.5; p squared if nothing exceeds 0.5). (``ellipsoid`` starts from ``p2``'s
    moments: :func:`ellipsoid_fit`.)"""
    if weighting == "p":
        return p
    if weighting == "p2":
        return p**2
    if weighting == "largest":
        from scipy import ndimage  # here only: the default weightings import no scipy on the registration's path

        components, count = ndimage.label(p > 0.5)
        if count == 0:
            return p**2
        mass = ndimage.sum(p, components, index=np.arange(1, count + 1))
        return np.where(components == 1 + int(np.argmax(mass)), p, 0.0)
    raise ValueError(f"unknown weighting {weighting!r}: choose one of {LOCALISER_WEIGHTINGS}")


def ellipsoid_fit(p: np.ndarray, start: Localisation, grid: sitk.Image, edge: float = 0.15) -> Localisation:
    """The solid ellipsoid (axes along ``grid``'s, soft edge ``edge`` of its radius) with the best soft Dice against
    the probability map ``p`` (array order, on ``grid``), searched from ``start`` (moments of ``p``).

    Its spread per axis is that of a uniform solid ellipsoid, semi-axis / sqrt(dim + 2). Unlike moments, it is
    little swayed by probability away from the organ's body (a map that runs into a neighbour)."""
    from scipy.optimize import minimize

    dim = p.ndim
    spacing = np.array(grid.GetSpacing())
    coords = np.indices(p.shape, dtype=np.float64)[::-1]  # index x, y[, z] of each voxel, arrays in p's order
    centre0 = np.array(grid.TransformPhysicalPointToContinuousIndex(np.asarray(start.centre).tolist()))
    axes0 = np.maximum(start.spread / spacing, 0.5) * math.sqrt(dim + 2)
    mass = p.sum()

    def loss(q: np.ndarray) -> float:
        centre, axes = q[:dim], np.exp(q[dim:])
        radius = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip(coords, centre, axes, strict=True)))
        inside = 0.5 * (1.0 + np.tanh((1.0 - radius) / (2.0 * edge)))  # the logistic sigmoid of (1 - r) / edge
        return -2.0 * float((p * inside).sum()) / (mass + float(inside.sum()))

    q = minimize(loss, np.r_[centre0, np.log(axes0)], method="Nelder-Mead",
                 options={"maxiter": 200 * dim, "xatol": 1e-3, "fatol": 1e-5}).x
    centre = np.array(grid.TransformContinuousIndexToPhysicalPoint(q[:dim].tolist()))
    spread = np.maximum(np.exp(q[dim:]) / math.sqrt(dim + 2), 0.5)  # at least half a voxel, as moments
    return Localisation(centre, spread * spacing, start.source)


def localisation_from_probability(p: np.ndarray, grid: sitk.Image, weighting: str = "p2",
                                  spread_scale: Sequence[float] | None = None) -> Localisation:
    """A probability map on ``grid`` (array order) -> the organ's centre and spread in ``grid``'s physical space."""
    p = np.asarray(p, dtype=np.float64)
    weights = weights_from_probability(p, "p2" if weighting == "ellipsoid" else weighting)
    if not weights.sum() > 1e-6:
        raise ValueError("the localiser found no organ in this image (its probability map is empty): is it an "
                         "image of the model's organ? Place the centre by hand (a point or a box) instead")
    loc = localisation_from_weights(weights, grid, "localiser")
    if weighting == "ellipsoid":
        loc = ellipsoid_fit(p, loc, grid)
    scale = np.ones(grid.GetDimension()) if spread_scale is None else np.asarray(spread_scale[: grid.GetDimension()])
    return Localisation(loc.centre, loc.spread * scale, "localiser")


def localise(localiser: OrganLocaliser, image: sitk.Image, refine: bool | None = None) -> Localisation:
    """Where the organ is in ``image`` (2-D or 3-D, as the localiser) and how large, in the image's physical space.

    ``refine`` (default: the config's) runs a second pass on a box around the first answer, at a finer grid."""
    return localise_with_confidence(localiser, image, refine)[0]


@dataclass(frozen=True)
class LocalisationConfidence:
    """How sure the localiser is that it found the organ, from its own probability map (scale-free, so it holds
    whatever the voxel size): ``compactness`` (the volume where p > 0.5 over that of the solid ellipsoid of the map's
    own spread: an organ-shaped blob is near 1, scattered hits far below), ``peak`` (the map's highest probability),
    ``pass_shift`` (how far the second, finer pass moved the centre, in the organ's spreads) and, given the
    model's typical organ, ``size_ratio`` (the found organ's volume over the typical one's). ``score`` is 0..1, below
    :data:`CONFIDENCE_THRESHOLD` whenever there is a reason to warn."""

    score: float
    compactness: float
    peak: float
    pass_shift: float
    size_ratio: float | None
    reasons: tuple[str, ...]

    @property
    def confident(self) -> bool:
        return self.score >= CONFIDENCE_THRESHOLD and not self.reasons


CONFIDENCE_THRESHOLD = 0.5
"""Below this score the localisation is flagged. On the validation subjects (grid128 and native, 16 images) every
score is 1.0: compactness 0.93-1.01, peak 1.0, pass shift up to 0.99 spreads, size 0.22-1.65 times the typical
organ; on noise the compactness is 0.20 (Testing/stages/test_do_no_harm.py)."""
SIZE_RANGE = (0.15, 2.0)
"""Organ volumes, times the model's typical one, outside which the size is flagged: the validation subjects span
0.22-1.65 (grid128 and native). Images whose stored voxel spacing is wrong are flagged too (the shared native
training subjects stored at a nominal 1 mm for a 256 matrix: 3-10 times), which is what a user should check."""


def _ramp(value: float, bad: float, good: float) -> float:
    """0 at ``bad``, 1 at ``good``, linear between (either order)."""
    return float(np.clip((value - bad) / (good - bad), 0.0, 1.0))


def map_confidence(p: np.ndarray, grid: sitk.Image, found: Localisation, pass_shift: float,
                   typical_spread: Sequence[float] | None = None) -> LocalisationConfidence:
    """:class:`LocalisationConfidence` of the map ``p`` on ``grid`` that gave ``found``."""
    dim = p.ndim
    voxel = float(np.prod(grid.GetSpacing()))
    ellipsoid = lambda spread: (math.pi * (4 / 3 if dim == 3 else 1)  # noqa: E731
                                * float(np.prod(np.asarray(spread, dtype=float) * math.sqrt(dim + 2))))
    volume = float((p > 0.5).sum()) * voxel
    compactness = volume / ellipsoid(found.spread)
    size_ratio = volume / ellipsoid(typical_spread[:dim]) if typical_spread is not None else None
    reasons = []
    if size_ratio is not None and not SIZE_RANGE[0] <= size_ratio <= SIZE_RANGE[1]:
        reasons.append(f"the organ it found is {size_ratio:.2g} times the model's typical organ: not the organ, or "
                       "a wrong voxel spacing")
    score = min(_ramp(compactness, 0.5, 0.9), _ramp(float(p.max()), 0.5, 0.9), _ramp(pass_shift, 2.0, 1.0))
    if score < CONFIDENCE_THRESHOLD:
        reasons.append(f"its organ map is {'scattered' if compactness < 0.7 else 'weak or unstable'} "
                       f"(compactness {compactness:.2f}, peak {p.max():.2f}, the second pass moved "
                       f"{pass_shift:.1f} organ spreads)")
    if reasons:  # a size out of range lowers the score below the threshold too: the score and the warning agree
        low, high = SIZE_RANGE
        fit = min(size_ratio / low, high / size_ratio, 1.0) if size_ratio is not None else 1.0
        score = min(score, 0.99 * CONFIDENCE_THRESHOLD * fit)
    return LocalisationConfidence(score, compactness, float(p.max()), pass_shift, size_ratio, tuple(reasons))


def localise_with_confidence(localiser: OrganLocaliser, image: sitk.Image, refine: bool | None = None,
                             typical_spread: Sequence[float] | None = None,
                             whole: tuple[np.ndarray, sitk.Image] | None = None
                             ) -> tuple[Localisation, LocalisationConfidence]:
    """:func:`localise`, and how sure it is (:func:`map_confidence` of the last pass's map). ``whole``: the
    :func:`probability_map` of the whole image when the caller has it already (its first pass)."""
    config = localiser.config
    p, grid = whole if whole is not None else probability_map(localiser, image)
    loc = localisation_from_probability(p, grid, config.weighting, config.spread_scale)
    if not (config.refine if refine is None else refine):
        return loc, map_confidence(p, grid, loc, 0.0, typical_spread)
    n = np.array(image.GetSize(), dtype=float)
    centre = np.array(image.TransformPhysicalPointToContinuousIndex(loc.centre.tolist()))
    spread = loc.spread / np.array(image.GetSpacing())  # index units (axes of the image)
    half = np.clip(0.5 * config.refine_spreads * spread, 0.5 * config.fov_min * n, 0.5 * n)
    centre = np.clip(centre, half - 0.5, n - 0.5 - half)  # keep the box inside the field of view
    p2, grid2 = probability_map(localiser, image, centre - half, centre + half)
    try:
        fine = localisation_from_probability(p2, grid2, config.weighting, config.spread_scale)
    except ValueError:
        return loc, map_confidence(p, grid, loc, math.inf, typical_spread)
    shift = float(np.linalg.norm((fine.centre - loc.centre) / fine.spread))
    return fine, map_confidence(p2, grid2, fine, shift, typical_spread)


LABEL_AGREEMENT = 0.5
"""Below this :func:`label_agreement` a label is said not to lie on its image's organ. With the shipped 3-D localiser
on the 40 grid128 subjects, each subject's own label scores 0.66-0.96 (median 0.88), another subject's label on the
same grid 0.06-0.84 (median 0.47; 55 % of them below 0.5)."""


def label_agreement(localiser: OrganLocaliser, image: sitk.Image, label: sitk.Image,
                    whole: tuple[np.ndarray, sitk.Image] | None = None) -> float:
    """How well ``label`` lies on the organ the localiser sees in ``image``: the soft Dice of the organ probability
    (one pass over the whole field of view; ``whole`` when the caller has it) and the label (every non-zero voxel),
    on the localiser's grid."""
    p, grid = whole if whole is not None else probability_map(localiser, image)
    mask = sitk.Cast(sitk.NotEqual(label, 0), sitk.sitkFloat32)
    on_grid = sitk.GetArrayFromImage(sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                   sitk.sitkFloat32)).astype(np.float64)
    total = p.sum() + on_grid.sum()
    return float(2 * (p * on_grid).sum() / total) if total > 0 else 0.0


# -- storage -------------------------------------------------------------------------------------------------------
def localiser_to_payload(localiser: OrganLocaliser) -> dict:
    """Plain data (readable with ``torch.load(weights_only=True)``): kind, version, config dict, state tensors."""
    return {"kind": PAYLOAD_KIND, "version": PAYLOAD_VERSION, "config": localiser.config.to_dict(),
            "state": {k: v.detach().cpu().clone() for k, v in localiser.state_dict().items()}}


def localiser_from_payload(payload: dict) -> OrganLocaliser:
    """Rebuild a localiser from :func:`localiser_to_payload`'s data; ``ValueError`` naming what is wrong."""
    if not isinstance(payload, dict) or payload.get("kind") != PAYLOAD_KIND:
        raise ValueError("not an organ-localiser payload (expected a dict with kind "
                         f"{PAYLOAD_KIND!r}): was the file written by localiser_to_payload / train_localiser.py?")
    if payload.get("version") != PAYLOAD_VERSION:
        raise ValueError(f"organ-localiser payload version {payload.get('version')!r} is not supported "
                         f"(this code reads version {PAYLOAD_VERSION}): retrain or update AgentRegistration")
    try:
        config = LocaliserConfig.from_dict(dict(payload["config"]))
        localiser = OrganLocaliser(config)
        localiser.load_state_dict(dict(payload["state"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"corrupt organ-localiser payload: {err}") from err
    return localiser.eval()


def save_localiser(localiser: OrganLocaliser, path, extra: dict | None = None) -> None:
    """Write the payload (plus plain ``extra`` entries) to ``path``, atomically."""
    atomic_write(path, lambda tmp: torch.save({**localiser_to_payload(localiser), **(extra or {})}, tmp))


def localiser_record(path) -> dict:
    """The training record a localiser file carries (``{}`` when it has none): subjects, iterations, seconds, ..."""
    record = torch.load(path, map_location="cpu", weights_only=True).get("training", {})
    return record if isinstance(record, dict) else {}


def load_localiser(path) -> OrganLocaliser:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"cannot read the organ localiser {path}: {err}") from err
    return localiser_from_payload(payload)
