"""Statistical deformation model (SDM): PCA of B-spline coefficient vectors (paper, 2.2).

A deformation is ``c(theta) = mean + theta @ modes``; ``theta`` (d values) is what the agent
moves. Per mode the model keeps the mean ``mu`` and spread ``sigma`` of the training
projections (fuzzy action control), the mean absolute value (the action step size is
normalised by it) and the range seen in the real pairs (synthetic draws stay inside it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.core.bspline import ControlGrid, dense_displacement


@dataclass
class StatisticalDeformationModel:
    mean: np.ndarray  # (P,)
    modes: np.ndarray  # (d, P), orthonormal rows
    mu: np.ndarray  # (d,) mean projection of the training deformations
    sigma: np.ndarray  # (d,) standard deviation of the projections
    mean_abs: np.ndarray  # (d,) mean |projection|
    theta_min: np.ndarray  # (d,)
    theta_max: np.ndarray  # (d,)
    grid: ControlGrid
    explained_variance_ratio: np.ndarray  # (d,)

    @property
    def num_modes(self) -> int:
        return len(self.sigma)

    @classmethod
    def fit(cls, coefficients: np.ndarray, num_modes: int, grid: ControlGrid) -> StatisticalDeformationModel:
        """PCA of ``coefficients`` ``(N, P)`` (one real deformation per row) keeping ``num_modes``."""
        coefficients = np.asarray(coefficients, dtype=np.float64)
        if coefficients.ndim != 2 or coefficients.shape[1] != grid.num_coefficients:
            raise ValueError(
                f"coefficients have shape {coefficients.shape}; the control grid {grid.size} needs "
                f"(N, {grid.num_coefficients})"
            )
        n = coefficients.shape[0]
        if not 1 <= num_modes <= min(n - 1, grid.num_coefficients):
            raise ValueError(f"cannot keep {num_modes} modes from {n} deformations (at most {n - 1})")
        mean = coefficients.mean(axis=0)
        _, s, vt = np.linalg.svd(coefficients - mean, full_matrices=False)
        modes = vt[:num_modes]
        theta = (coefficients - mean) @ modes.T
        variance = s**2
        return cls(
            mean=mean,
            modes=modes,
            mu=theta.mean(axis=0),
            sigma=theta.std(axis=0, ddof=1),
            mean_abs=np.abs(theta).mean(axis=0),
            theta_min=theta.min(axis=0),
            theta_max=theta.max(axis=0),
            grid=grid,
            explained_variance_ratio=variance[:num_modes] / variance.sum(),
        )

    def check_grid(self, grid: ControlGrid) -> None:
        """Raise a clear error when data on ``grid`` cannot be used with this model."""
        if grid != self.grid:
            raise ValueError(
                f"the deformations are on control grid {grid.size} (spacing {grid.spacing}, origin {grid.origin}) "
                f"but the SDM was built on {self.grid.size} (spacing {self.grid.spacing}, origin {self.grid.origin}); "
                "rebuild the SDM from ground truth on the same model geometry"
            )

    def project(self, coefficients: np.ndarray) -> np.ndarray:
        """Mode amplitudes ``theta`` of coefficient vectors ``(..., P)``."""
        coefficients = np.asarray(coefficients, dtype=np.float64)
        if coefficients.shape[-1] != len(self.mean):
            raise ValueError(f"coefficient vectors of length {coefficients.shape[-1]} do not match the SDM ({len(self.mean)})")
        return (coefficients - self.mean) @ self.modes.T

    def reconstruct(self, theta: np.ndarray) -> np.ndarray:
        """Coefficient vectors from mode amplitudes ``(..., d)``."""
        return self.mean + np.asarray(theta, dtype=np.float64) @ self.modes

    @property
    def theta_identity(self) -> np.ndarray:
        """The parameters of the identity (no deformation): where the agent starts."""
        return self.project(np.zeros_like(self.mean))

    def deformation(self, theta: np.ndarray) -> np.ndarray:
        """Coefficients of the deformation the agent means by ``theta``: the reconstruction
        restricted to the span of the modes, ``modes^T modes mean + theta @ modes``, so that
        :attr:`theta_identity` is exactly the identity (the part of the mean outside the modes,
        which no action can change, is left out)."""
        return self.modes.T @ (self.modes @ self.mean) + np.asarray(theta, dtype=np.float64) @ self.modes

    def fields(self, bases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense displacement of the in-span mean ``(dim, *spatial)`` (see :meth:`deformation`) and
        of each mode ``(d, dim, *spatial)`` on the grid described by ``bases``."""
        device, dtype = bases[0].device, bases[0].dtype
        mean_in_span = self.modes.T @ (self.modes @ self.mean)
        mean = dense_displacement(torch.as_tensor(mean_in_span, device=device)[None], self.grid, bases)[0]
        modes = dense_displacement(torch.as_tensor(self.modes, device=device), self.grid, bases)
        return mean.to(dtype), modes.to(dtype)

    # -- persistence: a plain .npz (no pickle) with the grid in JSON --------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        grid = {"size": list(self.grid.size), "spacing": list(self.grid.spacing), "origin": list(self.grid.origin)}
        return {
            "mean": self.mean, "modes": self.modes, "mu": self.mu, "sigma": self.sigma, "mean_abs": self.mean_abs,
            "theta_min": self.theta_min, "theta_max": self.theta_max,
            "explained_variance_ratio": self.explained_variance_ratio,
            "grid_json": np.array(json.dumps(grid)),
        }

    @classmethod
    def from_arrays(cls, arrays) -> StatisticalDeformationModel:
        try:
            g = json.loads(str(arrays["grid_json"]))
            grid = ControlGrid(tuple(int(s) for s in g["size"]), tuple(g["spacing"]), tuple(g["origin"]))
            fields = {k: np.asarray(arrays[k], dtype=np.float64) for k in
                      ("mean", "modes", "mu", "sigma", "mean_abs", "theta_min", "theta_max", "explained_variance_ratio")}
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"not a statistical deformation model: missing or bad entry ({err})") from None
        sdm = cls(grid=grid, **fields)
        if sdm.modes.shape != (len(sdm.sigma), grid.num_coefficients) or sdm.mean.shape != (grid.num_coefficients,):
            raise ValueError("statistical deformation model is inconsistent: mode shapes do not match its grid")
        return sdm

    def save(self, path: str | Path) -> Path:
        return atomic_write(path, lambda tmp: _savez(tmp, self.to_arrays()))

    @classmethod
    def load(cls, path: str | Path) -> StatisticalDeformationModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SDM file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls.from_arrays({k: z[k] for k in z.files})
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read SDM {path}: {err}") from None


def _savez(tmp: str, arrays: dict) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
