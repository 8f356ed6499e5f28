"""The one spatial transformer of the engine, and composition of displacements.

A displacement ``u`` (``(B, dim, *spatial)``, channel ``c`` along ITK axis ``c``, in voxels)
maps each fixed voxel ``x`` to the moving position ``x + u(x)``; ``warp(M, u)(x) = M(x + u(x))``,
the resampling convention of ITK. Outside the image, values are taken from the border.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_identity_cache: dict[tuple, torch.Tensor] = {}


def identity_grid(spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Voxel coordinates ``(dim, *spatial)``, channel order (x, y[, z]); built once per shape."""
    key = (tuple(spatial), str(device), dtype)
    grid = _identity_cache.get(key)
    if grid is None:
        axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=dtype) for n in spatial], indexing="ij")
        grid = torch.stack(axes[::-1])  # array order (z, y, x) -> ITK channel order (x, y, z)
        _identity_cache[key] = grid
    return grid


def grid_scale(spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(dim,)``: how much grid_sample's normalised coordinate (-1 .. 1 over the image) changes per voxel along each
    axis, channel order (x, y[, z])."""
    sizes = torch.tensor(spatial[::-1], device=device, dtype=dtype)
    return 2.0 / (sizes - 1).clamp(min=1)


def sampling_grid(displacement: torch.Tensor) -> torch.Tensor:
    """The sampling grid of :func:`sample` for ``displacement`` ``(B, dim, *spatial)``: ``(B, *spatial, dim)``, the
    positions ``x + u(x)`` in normalised coordinates, last axis (x, y[, z]) as grid_sample wants. It is linear in
    the displacement, so a displacement's change changes it by :func:`grid_scale` times the change."""
    spatial = displacement.shape[2:]
    dim = len(spatial)
    pos = identity_grid(tuple(spatial), displacement.device, displacement.dtype) + displacement
    sizes = torch.tensor(spatial[::-1], device=displacement.device, dtype=displacement.dtype)
    norm = 2.0 * pos / (sizes - 1).clamp(min=1).view(dim, *([1] * dim)) - 1.0
    return norm.movedim(1, -1)


def sample(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``image`` ``(B, C, *spatial)`` at a :func:`sampling_grid` (values outside: the border's)."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"warp mode must be 'bilinear' or 'nearest', not {mode!r}")
    if image.shape[0] != grid.shape[0] and image.shape[0] != 1:
        raise ValueError(f"batch sizes differ: image {image.shape[0]}, displacement {grid.shape[0]}")
    src = image.to(grid.dtype)
    if src.shape[0] == 1 and grid.shape[0] > 1:
        src = src.expand(grid.shape[0], *src.shape[1:])
    if grid.shape[-1] == 3:
        # the same values as border padding (align_corners: -1 and 1 are the first and last voxel, where the outer
        # neighbour's weight is 0), a fifth faster: torch's 3-D CPU kernel clips every position for "border"
        out = F.grid_sample(src, grid.clamp(-1.0, 1.0), mode=mode, padding_mode="zeros", align_corners=True)
    else:
        out = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=True)
    return out.to(image.dtype) if not image.is_floating_point() else out


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``image`` ``(B, C, *spatial)`` at ``x + displacement(x)``.

    ``mode`` is ``"bilinear"`` (linear, also in 3-D) for intensities, ``"nearest"`` for labels.
    Labels keep their dtype.
    """
    return sample(image, sampling_grid(displacement), mode)


def warp_label(label: np.ndarray, displacement: torch.Tensor) -> np.ndarray:
    """A model-space label array warped by a dense displacement ``(dim, *spatial)`` (nearest neighbour)."""
    return warp(torch.as_tensor(label)[None, None], displacement[None].float(), mode="nearest")[0, 0].numpy()


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of "apply ``first``, then ``second``" in resampling terms:
    ``warp(warp(M, second), first) == warp(M, compose(first, second))``,
    i.e. ``u(x) = first(x) + second(x + first(x))``."""
    return first + warp(second, first)
