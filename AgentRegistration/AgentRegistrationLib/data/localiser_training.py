"""Training the learned localiser (:mod:`.localiser`): real cases with random crops, rotations and intensity
changes, a Dice + cross-entropy loss, and the spread calibration that makes its organ boxes match the labels'."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from AgentRegistrationLib.data.localiser import (
    LocaliserConfig,
    OrganLocaliser,
    fine_size,
    localise,
    localiser_grid,
    normalise_input,
    resample_to_grid,
    sample_grid,
)


@dataclass
class _Case:
    image: torch.Tensor  # (1, ...) fine array over the field of view
    label: torch.Tensor


@dataclass
class TrainingLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0


def _prepare_case(image: sitk.Image, label: sitk.Image, config: LocaliserConfig) -> _Case:
    grid = localiser_grid(image, fine_size(config))
    if label.GetSize() != image.GetSize():
        raise ValueError(f"label size {label.GetSize()} differs from its image's {image.GetSize()}")
    mask = sitk.Cast(label > 0, sitk.sitkFloat32)
    mask.CopyInformation(image)
    return _Case(torch.from_numpy(resample_to_grid(image, grid))[None], torch.from_numpy(resample_to_grid(mask, grid))[None])


def _random_theta(rng: np.random.Generator, config: LocaliserConfig) -> torch.Tensor:
    """One random affine (output normalised coords, x y[ z] -> input's): crop/zoom, shift, rotation, flip."""
    dim = config.dim
    scale = np.exp(rng.uniform(np.log(config.fov_min), np.log(config.fov_max))) * np.exp(rng.normal(0, 0.08, dim))
    scale = np.clip(scale, config.fov_min, config.fov_max)
    shift = np.array([rng.uniform(-abs(1 - s), abs(1 - s)) if s < 1 else rng.uniform(-0.05, 0.05) for s in scale])
    a = np.diag(scale)
    angle = math.radians(rng.uniform(-config.rotate_deg, config.rotate_deg))
    rot = np.eye(dim)
    rot[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    a = rot @ a
    if config.flip and rng.random() < 0.5:
        a[:, 0] *= -1
    return torch.from_numpy(np.concatenate([a, shift[:, None]], axis=1).astype(np.float32))


def _augment_intensity(x: torch.Tensor, rng: np.random.Generator, config: LocaliserConfig) -> torch.Tensor:
    n, dim = x.shape[0], config.dim
    coords = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in x.shape[2:]], indexing="ij")
    out = []
    for i in range(n):
        slopes = rng.uniform(-config.bias, config.bias, dim)
        field_ = sum(float(s) * c for s, c in zip(slopes, coords, strict=True))
        xi = normalise_input(x[i : i + 1] * torch.exp(field_))
        xi = xi ** float(np.exp(rng.normal(0, config.gamma)))
        xi = xi + config.noise * float(rng.random()) * torch.from_numpy(rng.standard_normal(xi.shape).astype(np.float32))
        out.append(xi)
    return torch.cat(out)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    axes = tuple(range(1, p.dim()))
    dice = (2 * (p * target).sum(axes) + 1) / (p.sum(axes) + target.sum(axes) + 1)
    return bce + (1 - dice).mean()


def centroid_slice(label: sitk.Image) -> int:
    """The axial slice (index along z) through the centroid of a 3-D label's organ."""
    mask = sitk.GetArrayViewFromImage(label) > 0
    return int(round(float(np.argwhere(mask)[:, 0].mean())))


def organ_slices(image: sitk.Image, label: sitk.Image) -> list[tuple[sitk.Image, sitk.Image]]:
    """The training slices of a 2-D localiser from a volume: the axial slice through the organ's centroid and its
    neighbours (within 2) whose organ area is at least half the centroid slice's."""
    mask = sitk.GetArrayViewFromImage(label) > 0
    z0 = centroid_slice(label)
    area0 = mask[z0].sum()
    return [(image[:, :, z], label[:, :, z]) for z in range(max(0, z0 - 2), min(mask.shape[0], z0 + 3))
            if mask[z].any() and mask[z].sum() >= 0.5 * area0]


def train_localiser(
    images: Sequence[sitk.Image],
    labels: Sequence[sitk.Image],
    config: LocaliserConfig | None = None,
    iterations: int = 2000,
    time_limit: float | None = None,
    seed: int = 0,
    progress: Callable[[int, float, float], None] | None = None,
    calibrate: bool = True,
    log: TrainingLog | None = None,
    initial: OrganLocaliser | None = None,
) -> OrganLocaliser:
    """Train a localiser on ``images`` with their organ ``labels`` (same grids), on the CPU.

    Stops after ``iterations`` batches or ``time_limit`` seconds, whichever first. ``progress(iteration, loss,
    seconds)`` is called every 20 batches. With ``calibrate`` the spread scale per axis is set afterwards to the
    median true/predicted spread on the training images. ``initial`` (a localiser of the same architecture)
    continues training from its weights (its config, spread scale aside, is kept)."""
    if len(images) != len(labels) or not images:
        raise ValueError(f"train_localiser needs as many labels as images, and at least one ({len(images)} / {len(labels)})")
    dim = images[0].GetDimension()
    config = LocaliserConfig.default(dim) if config is None else config
    if initial is not None:
        config = replace(initial.config, spread_scale=(1.0,) * initial.config.dim)
    if any(im.GetDimension() != config.dim for im in images):
        raise ValueError(f"a {config.dim}-D localiser needs {config.dim}-D training images")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cases = [_prepare_case(im, lab, config) for im, lab in zip(images, labels, strict=True)]
    localiser = OrganLocaliser(config)
    if initial is not None:
        localiser.load_state_dict(initial.state_dict())
    optimiser = torch.optim.Adam(localiser.parameters(), lr=config.lr)
    log = TrainingLog() if log is None else log
    start = time.perf_counter()
    localiser.train()
    for it in range(iterations):
        elapsed = time.perf_counter() - start
        if time_limit is not None and elapsed > time_limit:
            break
        frac = max(it / iterations, elapsed / time_limit if time_limit else 0.0)
        for group in optimiser.param_groups:  # cosine decay over the budget
            group["lr"] = config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        batch = [cases[j] for j in rng.integers(0, len(cases), config.batch_size)]
        theta = torch.stack([_random_theta(rng, config) for _ in batch])
        fine = torch.stack([torch.cat([c.image, c.label]) for c in batch])
        sampled = sample_grid(fine, theta, config.grid)
        x = _augment_intensity(sampled[:, :1], rng, config)
        target = sampled[:, 1:].clamp(0, 1)
        loss = _loss(localiser(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        log.losses.append(loss.item())
        log.iterations = it + 1
        if progress is not None and (it + 1) % 20 == 0:
            progress(it + 1, float(np.mean(log.losses[-20:])), time.perf_counter() - start)
    log.seconds = time.perf_counter() - start
    localiser.eval()
    if calibrate:
        localiser = calibrate_spread(localiser, images, labels)
    return localiser


def calibrate_spread(localiser: OrganLocaliser, images: Sequence[sitk.Image], labels: Sequence[sitk.Image]
                     ) -> OrganLocaliser:
    """A copy of ``localiser`` whose spread scale per axis is the median true/predicted spread on these images."""
    from AgentRegistrationLib.data.organ_box import localisation_from_label

    uncalibrated = replace(localiser.config, spread_scale=(1.0,) * localiser.config.dim)
    probe = OrganLocaliser(uncalibrated)
    probe.load_state_dict(localiser.state_dict())
    ratios = []
    for image, label in zip(images, labels, strict=True):
        try:
            ratios.append(localisation_from_label(label).spread / localise(probe, image).spread)
        except ValueError:
            continue
    if not ratios:
        return localiser
    scale = tuple(float(v) for v in np.median(np.array(ratios), axis=0))
    out = OrganLocaliser(replace(localiser.config, spread_scale=scale))
    out.load_state_dict(localiser.state_dict())
    return out.eval()
