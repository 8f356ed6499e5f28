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
import torch.nn.functional as F

from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
from AgentRegistrationLib.core.warp import warp

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
                 generator: torch.Generator | None = None, new_subjects: float = 0.0, aligned: float = 0.0):
        """``new_subjects``: the fraction of intra-subject pairs made from a new, virtual subject (the subject's
        image mirrored left-right at random and deformed by a random SDM draw) instead of the subject itself:
        more subjects than the training set holds, with the same exact ground truth. ``aligned``: the fraction of
        intra-subject pairs with no synthetic difference (both images the same draw): the ground truth is the
        start, where every move is worse, so the agent learns what "aligned" looks like."""
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
        self.new_subjects = new_subjects
        self.aligned = aligned
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
        if self.aligned > 0:  # no draw otherwise: the other configurations draw as before
            same = intra & (torch.rand(batch, generator=self.gen, device=self.device) < self.aligned)
            tc = torch.where(same[:, None], tb, tc)
        moving_field, fixed_field = self.field(tb), self.field(tc)
        moving_image, fixed_image = self.images[moving_idx], self.images[fixed_idx]
        moving_label, fixed_label = (self.labels[moving_idx], self.labels[fixed_idx]) if with_labels else (None, None)
        if self.new_subjects > 0:  # no draws otherwise: the other configurations draw as before
            virtual = (intra & (torch.rand(batch, generator=self.gen, device=self.device) < self.new_subjects))
            mirror = torch.rand(batch, generator=self.gen, device=self.device) < 0.5
            shape_field = self.field(self.draw(batch))

            def new_subject(fixed_x: torch.Tensor, moving_x: torch.Tensor, mode: str):
                """The virtual subject (from the pair's subject: fixed and moving are the same in intra pairs)
                where ``virtual``, the pair's own images elsewhere."""
                rows = (-1,) + (1,) * (fixed_x.ndim - 1)
                made = warp(torch.where(mirror.view(rows), fixed_x.flip(-1), fixed_x), shape_field, mode=mode)
                made = made.to(fixed_x.dtype)
                return torch.where(virtual.view(rows), made, fixed_x), torch.where(virtual.view(rows), made, moving_x)

            fixed_image, moving_image = new_subject(fixed_image, moving_image, "bilinear")
            if with_labels:
                fixed_label, moving_label = new_subject(fixed_label, moving_label, "nearest")
        moving = warp(moving_image, moving_field)
        fixed = warp(fixed_image, fixed_field)
        theta_gt = base + tc - tb
        if not with_labels:
            return fixed, moving, theta_gt, intra
        fixed_label = warp(fixed_label, fixed_field, mode="nearest")
        moving_label = warp(moving_label, moving_field, mode="nearest")
        return fixed, moving, theta_gt, intra, fixed_label, moving_label


def augment_intensity(images: torch.Tensor, gen: torch.Generator, fraction: float) -> torch.Tensor:
    """Random intensity changes, as between scanners and sites, to a ``fraction`` of ``images`` ``(B, 1, *spatial)``
    (intensities 0..1), each image drawn independently: a gamma (exp of U(-0.4, 0.4)), contrast x U(0.8, 1.2) and
    brightness + U(-0.1, 0.1), a smooth multiplicative bias field (a random 3-per-axis grid within +-15 %,
    interpolated) and Gaussian noise (sd up to 0.03); clipped to 0..1. The geometry is left alone, so Eq. 1's
    targets stay exact."""
    b, dim, device = images.shape[0], images.ndim - 2, images.device
    shape = (b,) + (1,) * (dim + 1)

    def uniform(low: float, high: float, *size: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*(size or (b,)), generator=gen, device=device)

    chosen = (uniform(0, 1) < fraction).view(shape)
    gamma, contrast, brightness = uniform(-0.4, 0.4).exp(), uniform(0.8, 1.2), uniform(-0.1, 0.1)
    coarse = uniform(0.85, 1.15, b, 1, *[3] * dim)
    bias = F.interpolate(coarse, size=images.shape[2:], mode="bilinear" if dim == 2 else "trilinear",
                         align_corners=True)
    noise = torch.randn(images.shape, generator=gen, device=device) * uniform(0, 0.03).view(shape)
    changed = images.clamp(0, 1) ** gamma.view(shape) * contrast.view(shape) * bias + brightness.view(shape) + noise
    return torch.where(chosen, changed.clamp(0, 1), images)
