"""Register user images with a trained agent: preprocessing, the MDP, and results in the
user's original fixed-image geometry. This is what the command line and the Slicer module call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch

from AgentRegistrationLib.contract.register_folder import POINT_REMEDY
from AgentRegistrationLib.core.agent import AgentSettings
from AgentRegistrationLib.core.metrics import dice, jacobian_statistics, per_label, surface_distances
from AgentRegistrationLib.data.localiser import (
    LABEL_AGREEMENT,
    label_agreement,
    localise_with_confidence,
    localiser_from_payload,
    probability_map,
)
from AgentRegistrationLib.data.organ_box import Localisation, localisation_at_point, localisation_from_label
from AgentRegistrationLib.data.orientation import canonical
from AgentRegistrationLib.data.preprocessing import (
    PreparedPair,
    displacement_in_fixed_geometry,
    one_rule_for_aligned_images,
    prepare_pair,
    warp_to_fixed,
)
from AgentRegistrationLib.model.bundle import ModelBundle
from AgentRegistrationLib.model.devices import synchronize


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


@dataclass
class AgentOutcome:
    """What the agent found for one pair of a batch: its final parameters and trajectory (``steps`` rows)."""

    theta: np.ndarray  # (d,)
    trajectory: dict[str, np.ndarray]
    steps: int
    guard: dict = field(default_factory=dict)  # similarity_before/after and start_kept, when the guard ran


class Registrar:
    """A bundle loaded onto a device, ready to register many pairs."""

    def __init__(self, bundle: ModelBundle, device: torch.device, agent: bool = True):
        """``agent=False``: only :meth:`prepare` and :meth:`finish` (a worker process of a cohort that reads and
        crops the pairs and writes their results while the agent runs elsewhere)."""
        self.bundle = bundle
        self.device = device
        self.agent = bundle.agent(device) if agent else None
        self.localisers = {int(d): localiser_from_payload(p) for d, p in bundle.localisers.items()}
        self._maps: dict[tuple[int, int], tuple[sitk.Image, tuple[np.ndarray, sitk.Image]]] = {}

    def localise(self, image: sitk.Image, label: sitk.Image | None = None, point: np.ndarray | None = None,
                 what: str = "image") -> Localisation | None:
        """Where the organ is in ``image`` for a model that crops on it (``None`` for the paper's crop): from
        its label, else at ``point`` (with the spread the localiser finds, else the training subjects' median),
        else where the bundle's localiser finds it. Measured on the image in the canonical voxel order
        (:mod:`orientation`), so that the answer does not depend on how the image is stored."""
        if not self.bundle.geometry.localised:
            return None
        image, label = canonical(image), canonical(label)
        if label is not None:
            return localisation_from_label(label, f"{what}'s label")
        localiser = self.localisers.get(image.GetDimension())
        found = self._localise(localiser, image, what) if localiser is not None else None
        if point is not None:
            if len(point) != image.GetDimension():
                raise ValueError(f"the point on the {what} has {len(point)} coordinates but the image is "
                                 f"{image.GetDimension()}-D: give {image.GetDimension()}")
            spread = found.spread if found is not None else self.bundle.typical_spread(image.GetDimension())
            return localisation_at_point(point, spread, f"point on the {what}")
        if found is None:
            raise ValueError(f"this model crops on the organ but has no localiser for {image.GetDimension()}-D images: "
                             f"give a point on the organ in the "
                             f"{what} (--fixed-point in agentreg register, a markups point in Slicer)"
                             + ("" if what == "fixed image" else " or a moving label"))
        return found

    def _answer_needed(self, moving: sitk.Image, moving_label: sitk.Image | None, fixed_point) -> bool:
        """Whether :meth:`prepare` asks the localiser about ``moving``: without its label, or with it when the
        localiser also places the fixed crop (the one-rule check for aligned images)."""
        return (self.bundle.geometry.localised and moving.GetDimension() in self.localisers
                and (moving_label is None or fixed_point is None))

    def _whole_map(self, localiser, image: sitk.Image) -> tuple[np.ndarray, sitk.Image]:
        """The localiser's map of the whole ``image``, computed once for the images of the last pair: the first
        pass of the localisation and the label check share it."""
        key = (id(localiser), id(image))
        entry = self._maps.get(key)  # read once: the localising thread (register) may clear the cache meanwhile
        if entry is None:
            if len(self._maps) >= 4:
                self._maps.clear()
            entry = self._maps[key] = image, probability_map(localiser, image)  # the image kept: its id stays its own
        return entry[1]

    def _localise(self, localiser, image: sitk.Image, what: str) -> Localisation:
        """The localiser's answer, with its confidence and, below the threshold, a warning that names the remedy."""
        try:
            typical = self.bundle.typical_spread(image.GetDimension())
        except ValueError:  # a model that does not know its organ's typical size: the map's own measures only
            typical = None
        found, confidence = localise_with_confidence(localiser, image, typical_spread=typical,
                                                     whole=self._whole_map(localiser, image))
        warning = ""
        if not confidence.confident:
            warning = (f"the localiser may have missed the organ in the {what} ({'; '.join(confidence.reasons)}): "
                       f"check the crop box, and if it is off, place a point on the organ's centre ({POINT_REMEDY})"
                       + ("" if what == "fixed image" else " or give the moving label"))
        return replace(found, confidence=confidence.score, warning=warning)

    def register(
        self,
        fixed: sitk.Image,
        movings: list[sitk.Image],
        settings: AgentSettings,
        fixed_label: sitk.Image | None = None,
        moving_labels: list[sitk.Image | None] | None = None,
        translations: list[np.ndarray | None] | None = None,
        callback: Callable[[int, int], bool | None] | None = None,
        fixed_point: np.ndarray | None = None,
    ) -> list[RegistrationResult]:
        """Register every image of ``movings`` to ``fixed`` in one batch.

        A model that crops on the organ places the fixed crop on ``fixed_point`` (a physical point) or where
        its localiser finds the organ, and each moving crop on its moving label, else where the localiser finds
        it; the fixed label only measures the result. ``translations`` (the paper's preprocessing) skip the
        elastix pre-alignment with known ones.
        """
        t0 = time.perf_counter()
        moving_labels = moving_labels or [None] * len(movings)
        translations = translations or [None] * len(movings)
        # the localiser's answers for the moving images are computed beside the fixed image's, in a second thread
        # (torch leaves the interpreter's lock inside its operators: two cores)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="localise") as pool:
            found = [pool.submit(self.localise, m, what="moving image") if self._answer_needed(m, ml, fixed_point)
                     else None for m, ml in zip(movings, moving_labels, strict=True)]
            fixed_place = self.localise(fixed, point=fixed_point, what="fixed image")
            pairs = [self.prepare(fixed, m, fixed_label, ml, translation=t, fixed_localisation=fixed_place,
                                  moving_found=f)
                     for m, ml, t, f in zip(movings, moving_labels, translations, found, strict=True)]
        t_prep = time.perf_counter()
        outcomes = self.run_agent(pairs, settings, callback)
        t_agent = time.perf_counter()
        outputs = [self.finish(pair, outcome, fixed, moving, fixed_label, moving_label)
                   for pair, outcome, moving, moving_label in zip(pairs, outcomes, movings, moving_labels, strict=True)]
        t_end = time.perf_counter()
        for out in outputs:
            out.metrics.update(seconds_total=t_end - t0, seconds_preprocessing=t_prep - t0,
                               seconds_agent=t_agent - t_prep, seconds_outputs=t_end - t_agent,
                               pairs_in_batch=len(outputs))
        return outputs

    def prepare(self, fixed: sitk.Image, moving: sitk.Image, fixed_label: sitk.Image | None = None,
                moving_label: sitk.Image | None = None, translation: np.ndarray | None = None,
                fixed_point: np.ndarray | None = None,
                fixed_localisation: Localisation | None = None,
                moving_found: Future | None = None) -> PreparedPair:
        """One pair on the model grid, as :meth:`register` prepares it: the fixed crop on ``fixed_localisation``
        (else localised here, at ``fixed_point`` or by the localiser), the moving crop on its label or localiser
        (or the paper's translation pre-alignment). The crops are taken from the images in the canonical voxel
        order, so the agent sees the same crops however the images are stored. ``moving_found``: the
        :meth:`localise` of ``moving`` without its label, computed ahead (else here, when it is needed)."""
        found_moving = moving_found.result if moving_found is not None else (
            lambda: self.localise(moving, what="moving image"))
        fixed, moving, fixed_label, moving_label = (canonical(i) for i in (fixed, moving, fixed_label, moving_label))
        if fixed_localisation is None:
            fixed_localisation = self.localise(fixed, point=fixed_point, what="fixed image")
        moving_localisation = (self.localise(moving, label=moving_label, what="moving image")
                               if moving_label is not None or not self.bundle.geometry.localised else found_moving())
        correlation = None
        if (moving_label is not None and fixed_localisation is not None and fixed_localisation.source == "localiser"
                and moving.GetDimension() in self.localisers):
            # one rule for both crops when the images are already aligned anatomy (the same image, anywhere)
            moving_localisation, correlation = one_rule_for_aligned_images(
                fixed, moving, self.bundle.geometry, fixed_localisation, moving_localisation, found_moving())
        pair = prepare_pair(fixed, moving, self.bundle.geometry, fixed_label, moving_label, translation=translation,
                            fixed_localisation=fixed_localisation, moving_localisation=moving_localisation)
        if correlation is not None:
            pair.info["crop_correlation"] = correlation
        warning = self.label_warning(fixed, fixed_label, moving, moving_label)
        if warning:
            pair.info["label_warning"] = warning
        return pair

    def label_warning(self, fixed: sitk.Image, fixed_label: sitk.Image | None, moving: sitk.Image,
                      moving_label: sitk.Image | None) -> str:
        """Why a given label may not be its image's (empty when each lies on the organ the bundle's localiser sees
        in its own image, or when there is no localiser): a label off its image's organ, or the two labels swapped
        (each on the other image's organ)."""
        localiser = self.localisers.get(fixed.GetDimension())
        given = {w: (image, label) for w, image, label in (("fixed", fixed, fixed_label), ("moving", moving, moving_label))
                 if label is not None}
        if localiser is None or not given:
            return ""
        own = {w: label_agreement(localiser, image, label, self._whole_map(localiser, image))
               for w, (image, label) in given.items()}
        off = [w for w, a in own.items() if a < LABEL_AGREEMENT]
        if not off:
            return ""
        if len(off) == 2:
            crossed = [label_agreement(localiser, fixed, moving_label, self._whole_map(localiser, fixed)),
                       label_agreement(localiser, moving, fixed_label, self._whole_map(localiser, moving))]
            if min(crossed) >= LABEL_AGREEMENT:
                return (f"the fixed and moving labels look swapped: each lies on the other image's organ, not on its own "
                        f"(agreement with the localiser {own['fixed']:.2f} and {own['moving']:.2f} on their own images, "
                        f"{crossed[0]:.2f} and {crossed[1]:.2f} crossed; below {LABEL_AGREEMENT} is off): give each image "
                        "its own label")
        return "; ".join(f"the {w} label does not lie on the organ the localiser finds in the {w} image (agreement "
                         f"{own[w]:.2f}, below {LABEL_AGREEMENT}): check that it is the {w} image's label" for w in off)

    def run_agent(self, pairs: list[PreparedPair], settings: AgentSettings,
                  callback: Callable[[int, int], bool | None] | None = None) -> list[AgentOutcome]:
        """The agent on a batch of prepared pairs (each with its own fixed image or the same one). A pair's outcome
        does not depend on the others of its batch (the agent's random stream is shared, its network in eval
        mode); its trajectory has Dice at every step when the pair has both labels."""
        stack = lambda arrays: torch.as_tensor(np.stack(arrays), device=self.device)[:, None]  # noqa: E731
        labelled = [p.fixed_label is not None and p.moving_label is not None for p in pairs]
        labels = any(labelled)
        blank = next((p.fixed_label for p, has in zip(pairs, labelled, strict=True) if has), None)
        blank = None if blank is None else np.zeros_like(blank)  # a pair without labels: Dice computed, not kept
        result = self.agent.run(
            stack([p.fixed for p in pairs]), stack([p.moving for p in pairs]), settings,
            stack([p.moving_label if has else blank for p, has in zip(pairs, labelled, strict=True)]) if labels else None,
            stack([p.fixed_label if has else blank for p, has in zip(pairs, labelled, strict=True)]) if labels else None,
            callback,
        )
        synchronize(self.device)
        trajectory = result.trajectory.stacked()
        outcomes = []
        for i, has in enumerate(labelled):
            steps = int(result.steps_taken[i])
            guard = ({"similarity_before": float(result.similarity_start[i]),
                      "similarity_after": float(result.similarity_end[i]), "start_kept": int(result.start_kept[i])}
                     if result.start_kept is not None else {})
            outcomes.append(AgentOutcome(result.theta[i], {k: v[:steps, i] for k, v in trajectory.items()
                                                           if has or k != "dice"}, steps, guard))
        return outcomes

    def finish(self, pair: PreparedPair, outcome: AgentOutcome, fixed: sitk.Image, moving: sitk.Image,
               fixed_label: sitk.Image | None = None, moving_label: sitk.Image | None = None) -> RegistrationResult:
        """The agent's result in the fixed image's geometry: displacement, warped image and label, and the metrics
        (without the seconds, which the caller adds)."""
        geometry = self.bundle.geometry
        measured = moving_label is not None and fixed_label is not None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="start") as pool:
            # the moving label where the agent's start puts it (for Dice "start"), beside the result's own warping
            start_label = pool.submit(self.start_label, pair, fixed, moving_label) if measured else None
            coefficients = self.bundle.sdm.deformation(outcome.theta)
            displacement = displacement_in_fixed_geometry(coefficients, geometry.control_grid(), pair.frame, fixed,
                                                          pair.moving_frame)
            warped = warp_to_fixed(moving, displacement)
            warped_label = warp_to_fixed(moving_label, displacement, label=True) if moving_label is not None else None
            jacobian = jacobian_statistics(np.moveaxis(sitk.GetArrayFromImage(displacement), -1, 0),
                                           fixed.GetSpacing())
            start_label = start_label.result() if measured else None
        metrics = {  # flat, as protocol.METRICS_SCHEMA documents it
            "steps": outcome.steps,
            "prealignment": pair.info.get("prealignment"),
            "translation": pair.translation.tolist(),
            "jacobian_folding_percent": jacobian["folding_percent"],
            "log_jacobian_std": jacobian["log_jacobian_std"],
            **outcome.guard,
        }
        metrics.update(fixed_crop_metrics(pair))
        if measured:
            metrics.update(label_metrics(fixed_label, moving_label, warped_label, start_label))
        return RegistrationResult(outcome.theta, coefficients, pair.translation, displacement, warped, warped_label,
                                  outcome.trajectory, metrics, pair)


    def start_label(self, pair: PreparedPair, fixed: sitk.Image, moving_label: sitk.Image) -> sitk.Image:
        """``moving_label`` on the fixed image where the agent's start (no step) puts it."""
        start = displacement_in_fixed_geometry(self.bundle.sdm.deformation(self.bundle.sdm.theta_identity),
                                               self.bundle.geometry.control_grid(), pair.frame, fixed,
                                               pair.moving_frame)
        return warp_to_fixed(moving_label, start, label=True)


def fixed_crop_metrics(pair: PreparedPair) -> dict:
    """Where the fixed crop box lay in the fixed image (physical space, LPS) and what placed it, so that a user can
    see it (an ROI in Slicer) and correct a misplaced one with a point."""
    frame = pair.frame
    size = np.array(frame.size, dtype=float)
    placed = pair.info.get("localisation", {})
    out = {"fixed_crop_centre": frame.to_physical((size - 1) / 2).tolist(),
           "fixed_crop_size": (size * frame.spacing).tolist(),
           "fixed_crop_axes": np.asarray(frame.direction).ravel().tolist(),
           "fixed_crop_placed_by": placed.get("fixed", {}).get("source", "paper's centred crop")}
    if "moving" in placed:
        out["moving_crop_placed_by"] = placed["moving"]["source"]
    guessed = [placed[k] for k in ("fixed", "moving") if "confidence" in placed.get(k, {})]
    if guessed:  # the crops the localiser placed: the least sure, and every warning
        out["localisation_confidence"] = min(g["confidence"] for g in guessed)
        out["localisation_warning"] = "; ".join(g["warning"] for g in guessed if g["warning"])
    if "crop_correlation" in pair.info:
        out["crop_correlation"] = pair.info["crop_correlation"]
    if pair.info.get("label_warning"):
        out["label_warning"] = pair.info["label_warning"]
    return out


def label_metrics(fixed_label: sitk.Image, moving_label: sitk.Image, warped_label: sitk.Image,
                  start_label: sitk.Image) -> dict:
    """Dice and surface distances in the fixed geometry: with no registration (``none``: the moving label
    where it lies in physical space), at the agent's start (``before``: the crops alone, i.e. the translation
    pre-alignment or the boxes on the organ) and ``after``; distances in the fixed image's physical units.

    Of the union of the labels (every non-zero voxel) and, when the labels hold several values, of each value apart
    (:func:`metrics.per_label`: ``dice_<when>_label_<value>``, ``hausdorff_<when>_label_<value>``)."""
    fixed_values = sitk.GetArrayFromImage(fixed_label)
    fixed_arr = fixed_values > 0
    unregistered = sitk.Resample(moving_label, fixed_label, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    out = {}
    for when, image in (("none", unregistered), ("before", start_label), ("after", warped_label)):
        values = sitk.GetArrayFromImage(image)
        arr = values > 0
        for value, figures in per_label(values, fixed_values, fixed_label.GetSpacing()).items():
            out.update({f"{name}_{when}_label_{value}": x for name, x in figures.items()})
        out[f"dice_{when}"] = dice(arr, fixed_arr)
        if arr.any() and fixed_arr.any():
            d = surface_distances(arr, fixed_arr, fixed_label.GetSpacing())
            out[f"hausdorff_{when}"] = d["hausdorff"]
            out[f"hausdorff95_{when}"] = d["hausdorff95"]
            out[f"average_surface_distance_{when}"] = d["average_surface_distance"]
    return out
