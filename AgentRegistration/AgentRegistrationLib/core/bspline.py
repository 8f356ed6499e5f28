"""Cubic B-spline free-form deformation (FFD) in torch, in elastix's convention.

Axis conventions, used everywhere in the engine:

* sizes, spacings and vector components follow ITK order: (x, y[, z]);
* tensors hold space in array order: (z, y, x) in 3-D, (y, x) in 2-D;
* a displacement field is a tensor ``(B, dim, *spatial)`` whose channel ``c`` is the
  component along ITK axis ``c``, in model voxels.

Coefficients follow elastix's ``BSplineTransform``: one displacement vector per control
point, laid out as all x-components (control points in x-fastest order), then all
y-components, then all z-components. The control grid is the one elastix builds for an
image (``ControlGrid.for_image``), so one coefficient vector means the same deformation
here and in transformix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The centred cubic B-spline kernel B3(t), support (-2, 2)."""
    a = t.abs()
    inner = (4.0 - 6.0 * a**2 + 3.0 * a**3) / 6.0
    outer = (2.0 - a) ** 3 / 6.0
    return torch.where(a < 1.0, inner, torch.where(a < 2.0, outer, torch.zeros_like(a)))


@dataclass(frozen=True)
class ControlGrid:
    """A B-spline control grid: ``size`` points per axis (ITK order), ``spacing`` and ``origin``
    in the physical units of the image it covers (identity direction relative to that image)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]

    @property
    def dim(self) -> int:
        return len(self.size)

    @property
    def num_points(self) -> int:
        return int(np.prod(self.size))

    @property
    def num_coefficients(self) -> int:
        return self.dim * self.num_points

    @classmethod
    def for_image(
        cls,
        image_size: tuple[int, ...],
        grid_spacing: tuple[float, ...],
        image_spacing: tuple[float, ...] | None = None,
        image_origin: tuple[float, ...] | None = None,
    ) -> ControlGrid:
        """The grid elastix builds for an image (``FinalGridSpacingInPhysicalUnits``): enough cells to cover the
        image's ``n`` voxels *with their extent* (``n`` x spacing, one voxel more than from the first voxel centre to
        the last), centred on the voxel centres' extent, plus one point before and two after for the cubic support.
        (Checked against elastix on 120 random axes, exact multiples included: ``Testing/data/test_geometry_choice.py``.)"""
        dim = len(image_size)
        image_spacing = image_spacing or (1.0,) * dim
        image_origin = image_origin or (0.0,) * dim
        size, origin = [], []
        for n, gs, sp, o in zip(image_size, grid_spacing, image_spacing, image_origin, strict=True):
            extent = (n - 1) * sp
            cells = math.ceil(n * sp / gs - 1e-9)
            size.append(cells + 3)
            origin.append(o - (cells * gs - extent) / 2.0 - gs)
        return cls(tuple(size), tuple(float(g) for g in grid_spacing), tuple(origin))

    def elastix_map(self) -> dict[str, list[str]]:
        """Grid entries of an elastix transform parameter map."""
        return {
            "GridSize": [str(s) for s in self.size],
            "GridSpacing": [repr(float(s)) for s in self.spacing],
            "GridOrigin": [repr(float(o)) for o in self.origin],
            "GridIndex": ["0"] * self.dim,
            "GridDirection": [("1" if i == j else "0") for j in range(self.dim) for i in range(self.dim)],
        }

    @classmethod
    def from_elastix_map(cls, parameter_map) -> ControlGrid:
        return cls(
            tuple(int(float(v)) for v in parameter_map["GridSize"]),
            tuple(float(v) for v in parameter_map["GridSpacing"]),
            tuple(float(v) for v in parameter_map["GridOrigin"]),
        )

    def basis(self, axis: int, positions: torch.Tensor) -> torch.Tensor:
        """Weights ``(len(positions), size[axis])`` of every control point of ``axis`` at the
        given physical coordinates along that axis."""
        c = (positions.double() - self.origin[axis]) / self.spacing[axis]
        j = torch.arange(self.size[axis], dtype=torch.float64, device=positions.device)
        return cubic_bspline(c[:, None] - j[None, :])

    def image_bases(
        self,
        image_size: tuple[int, ...],
        image_spacing: tuple[float, ...] | None = None,
        image_origin: tuple[float, ...] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Per-axis basis matrices (ITK order) for the voxel centres of an axis-aligned image."""
        image_spacing = image_spacing or (1.0,) * self.dim
        image_origin = image_origin or (0.0,) * self.dim
        bases = []
        for axis in range(self.dim):
            pos = image_origin[axis] + image_spacing[axis] * torch.arange(image_size[axis], dtype=torch.float64)
            bases.append(self.basis(axis, pos).to(device=device, dtype=dtype))
        return bases


def coefficients_to_grid(coefficients: torch.Tensor, grid: ControlGrid) -> torch.Tensor:
    """elastix-ordered coefficient vectors ``(B, dim*P)`` -> ``(B, dim, *grid array shape)``."""
    return coefficients.reshape(coefficients.shape[0], grid.dim, *grid.size[::-1])


def dense_displacement(coefficients: torch.Tensor, grid: ControlGrid, bases: list[torch.Tensor]) -> torch.Tensor:
    """Dense displacement ``(B, dim, *spatial)`` from coefficient vectors ``(B, dim*P)``.

    ``bases`` come from :meth:`ControlGrid.image_bases`. The tensor product is evaluated
    axis by axis, so the cost is a few small matrix products.
    """
    c = coefficients_to_grid(coefficients.to(bases[0].dtype), grid)
    if grid.dim == 2:
        bx, by = bases
        return torch.einsum("bcji,yj,xi->bcyx", c, by, bx)
    bx, by, bz = bases
    return torch.einsum("bckji,zk,yj,xi->bczyx", c, bz, by, bx)


def bspline_field(coefficients: np.ndarray, grid: ControlGrid, bases: list[torch.Tensor]) -> torch.Tensor:
    """Dense displacement ``(dim, *spatial)`` of one elastix-ordered coefficient vector, in model voxels and in the
    dtype of ``bases`` (:meth:`ControlGrid.image_bases`; float64 for figures, float32 where many are warped)."""
    return dense_displacement(torch.as_tensor(coefficients, dtype=torch.float64)[None], grid, bases)[0]
