"""Register user images with a trained agent: preprocessing, the MDP, and results in the
user's original fixed-image geometry. This is what the command line and the Slicer module call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from .agent import AgentSettings
from .bundle import ModelBundle
from .metrics import dice, jacobian_statistics, surface_distances
from .preprocessing import PreparedPair, displacement_in_fixed_geometry, prepare_pair, warp_to_fixed


@dataclass
class RegistrationResult:
    theta: np.ndarray  # (d,) final SDM parameters
    coefficients: np.ndarray  # B-spline coefficients on the model's control grid
    translation: np.ndarray  # pre-alignment, physical units
    displacement: sitk.Image  # ITK displacement field in the fixed geometry (fixed point -> moving point)
    warped: sitk.Image
    warped_label: sitk.Image | None
    trajectory: dict[str, np.ndarray]  # actions (T,), q_values (T, 2d), rejected (T, 2d), theta (T, d)[, dice (T,)]
    metrics: dict
    pair: PreparedPair = field(repr=False)


class Registrar:
    """A bundle loaded onto a device, ready to register many pairs."""

    def __init__(self, bundle: ModelBundle, device: torch.device):
        self.bundle = bundle
        self.device = device
        self.agent = bundle.agent(device)

    def model_displacement(self, theta: np.ndarray) -> torch.Tensor:
        return self.agent.displacement(torch.as_tensor(np.atleast_2d(theta), dtype=torch.float32, device=self.device))

    def register(
        self,
        fixed: sitk.Image,
        movings: list[sitk.Image],
        settings: AgentSettings,
        fixed_label: sitk.Image | None = None,
        moving_labels: list[sitk.Image | None] | None = None,
        translations: list[np.ndarray | None] | None = None,
        callback: Callable[[int, int], bool | None] | None = None,
    ) -> list[RegistrationResult]:
        """Register every image of ``movings`` to ``fixed`` in one batch."""
        t0 = time.perf_counter()
        moving_labels = moving_labels or [None] * len(movings)
        translations = translations or [None] * len(movings)
        geometry = self.bundle.geometry
        pairs = [prepare_pair(fixed, m, geometry, fixed_label, ml, translation=t)
                 for m, ml, t in zip(movings, moving_labels, translations, strict=True)]
        t_prep = time.perf_counter()
        stack = lambda arrays: torch.as_tensor(np.stack(arrays), device=self.device)[:, None]  # noqa: E731
        labels = fixed_label is not None and all(ml is not None for ml in moving_labels)
        result = self.agent.run(
            stack([p.fixed for p in pairs]), stack([p.moving for p in pairs]), settings,
            stack([p.moving_label for p in pairs]) if labels else None,
            stack([p.fixed_label for p in pairs]) if labels else None,
            callback,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t_agent = time.perf_counter()
        trajectory = result.trajectory.stacked()
        outputs = []
        for i, (pair, moving, moving_label) in enumerate(zip(pairs, movings, moving_labels, strict=True)):
            coefficients = self.bundle.sdm.deformation(result.theta[i])
            displacement = displacement_in_fixed_geometry(coefficients, geometry.control_grid(), pair.frame, fixed,
                                                          pair.translation)
            warped = warp_to_fixed(moving, displacement)
            warped_label = warp_to_fixed(moving_label, displacement, label=True) if moving_label is not None else None
            steps = int(result.steps_taken[i])
            traj = {k: v[:steps, i] for k, v in trajectory.items()}
            jacobian = jacobian_statistics(np.moveaxis(sitk.GetArrayFromImage(displacement), -1, 0), fixed.GetSpacing())
            metrics = {  # flat, as protocol.METRICS_SCHEMA documents it
                "steps": steps,
                "prealignment": pair.info.get("prealignment"),
                "translation": pair.translation.tolist(),
                "jacobian_folding_percent": jacobian["folding_percent"],
                "log_jacobian_std": jacobian["log_jacobian_std"],
            }
            if warped_label is not None and fixed_label is not None:
                metrics.update(label_metrics(fixed_label, moving_label, warped_label, pair.translation))
            outputs.append(RegistrationResult(result.theta[i], coefficients, pair.translation, displacement, warped,
                                              warped_label, traj, metrics, pair))
        t_end = time.perf_counter()
        for out in outputs:
            out.metrics.update(seconds_total=t_end - t0, seconds_preprocessing=t_prep - t0,
                               seconds_agent=t_agent - t_prep, seconds_outputs=t_end - t_agent,
                               pairs_in_batch=len(outputs))
        return outputs


def label_metrics(fixed_label: sitk.Image, moving_label: sitk.Image, warped_label: sitk.Image,
                  translation: np.ndarray) -> dict:
    """Dice and surface distances before (translation only) and after, in the fixed geometry;
    distances in the fixed image's physical units."""
    fixed_arr = sitk.GetArrayFromImage(fixed_label) > 0
    shifted = sitk.Resample(moving_label, fixed_label, sitk.TranslationTransform(fixed_label.GetDimension(),
                                                                                 translation.tolist()),
                            sitk.sitkNearestNeighbor, 0)
    out = {}
    for when, arr in (("before", sitk.GetArrayFromImage(shifted) > 0), ("after", sitk.GetArrayFromImage(warped_label) > 0)):
        out[f"dice_{when}"] = dice(arr, fixed_arr)
        if arr.any() and fixed_arr.any():
            d = surface_distances(arr, fixed_arr, fixed_label.GetSpacing())
            out[f"hausdorff_{when}"] = d["hausdorff"]
            out[f"hausdorff95_{when}"] = d["hausdorff95"]
            out[f"average_surface_distance_{when}"] = d["average_surface_distance"]
    return out
