"""Synthetic training pairs with known parameters (paper, 2.3 and Fig. 1a), made on the
training device in torch, and the Eq. 1 Q-value targets.

A synthetic deformation is a random SDM draw ``theta'`` (zero-mean, per-mode spread
``sigma``, bounded to the range seen in the real pairs); it warps a subject image into a new
image. Pairs (moving, fixed):

* intra-subject: two synthetic deformations b, c of subject m; exact GT
  ``theta_gt = theta_start + theta'_c - theta'_b``;
* inter-subject: synthetic b of subject m, synthetic c of subject n, and the real GT deformation
  m -> n; composed in parameter space, the inverse of b approximated by negation:
  ``theta_gt = theta_mn + theta'_c - theta'_b``.

``theta_start`` is the SDM parameter of the identity (the agent's start). Intra- and inter-subject
pairs are drawn online with equal probability.
"""

from __future__ import annotations

import numpy as np
import torch

from .sdm import StatisticalDeformationModel
from .warp import warp

TARGET_UNITS = ("paper", "steps")


def q_targets(theta_gt: torch.Tensor, theta: torch.Tensor, deltas: torch.Tensor, units: str = "paper") -> torch.Tensor:
    """Eq. 1 for every action: ``|theta_gt - theta|^2 - |theta_gt - (theta + delta_a)|^2``, ``(B, 2d)``.

    Action ``a`` changes mode ``a // 2`` by ``deltas[a]``, so the difference reduces to that mode.
    ``units="steps"`` measures each mode in units of its own action step (the paper's Eq. 1 divided by
    ``delta_a^2``): the target of a move towards the GT is ``2 |r| - 1`` for a mode ``r`` steps away, so
    every mode speaks as loudly as the others, and every target is negative within half a step of the GT.
    """
    if units not in TARGET_UNITS:
        raise ValueError(f"unknown Q-target units {units!r}; choose one of {TARGET_UNITS}")
    mode = torch.arange(deltas.numel(), device=theta.device) // 2
    r = (theta_gt - theta)[:, mode]
    q = r**2 - (r - deltas) ** 2
    return q / deltas**2 if units == "steps" else q


class SyntheticPairGenerator:
    """Draws batches of synthetic (fixed, moving, theta_gt) on one device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, real_pairs: list[tuple[int, int]],
                 real_theta: np.ndarray, sdm: StatisticalDeformationModel, mode_fields: torch.Tensor,
                 theta_start: torch.Tensor, intra_probability: float = 0.5, draw_scale: float = 1.0,
                 generator: torch.Generator | None = None):
        self.device = images.device
        self.images = images  # (S, 1, *spatial)
        self.labels = labels
        self.real_pairs = torch.as_tensor(real_pairs, dtype=torch.long, device=self.device)  # (P, 2): moving, fixed
        self.real_theta = torch.as_tensor(real_theta, dtype=torch.float32, device=self.device)  # (P, d)
        self.mode_fields = mode_fields
        self.theta_start = theta_start
        self.sigma = torch.as_tensor(sdm.sigma, dtype=torch.float32, device=self.device) * draw_scale
        self.low = torch.as_tensor(sdm.theta_min - sdm.mu, dtype=torch.float32, device=self.device)
        self.high = torch.as_tensor(sdm.theta_max - sdm.mu, dtype=torch.float32, device=self.device)
        self.intra_probability = intra_probability
        self.gen = generator or torch.Generator(device=self.device).manual_seed(0)

    def draw(self, batch: int) -> torch.Tensor:
        """Random synthetic deformation parameters ``(batch, d)``, bounded by the real pairs' range."""
        z = torch.randn(batch, self.sigma.numel(), generator=self.gen, device=self.device)
        return torch.maximum(torch.minimum(z * self.sigma, self.high), self.low)

    def field(self, theta_prime: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bm,m...->b...", theta_prime, self.mode_fields)

    def sample(self, batch: int, with_labels: bool = False):
        """``(fixed, moving, theta_gt, is_intra[, fixed_label, moving_label])`` for ``batch`` pairs."""
        s = self.images.shape[0]
        intra = torch.rand(batch, generator=self.gen, device=self.device) < self.intra_probability
        pick = torch.randint(len(self.real_pairs), (batch,), generator=self.gen, device=self.device)
        subject = torch.randint(s, (batch,), generator=self.gen, device=self.device)
        moving_idx = torch.where(intra, subject, self.real_pairs[pick, 0])
        fixed_idx = torch.where(intra, subject, self.real_pairs[pick, 1])
        base = torch.where(intra[:, None], self.theta_start.expand(batch, -1), self.real_theta[pick])
        tb, tc = self.draw(batch), self.draw(batch)
        moving_field, fixed_field = self.field(tb), self.field(tc)
        moving = warp(self.images[moving_idx], moving_field)
        fixed = warp(self.images[fixed_idx], fixed_field)
        theta_gt = base + tc - tb
        if not with_labels:
            return fixed, moving, theta_gt, intra
        fixed_label = warp(self.labels[fixed_idx], fixed_field, mode="nearest")
        moving_label = warp(self.labels[moving_idx], moving_field, mode="nearest")
        return fixed, moving, theta_gt, intra, fixed_label, moving_label
