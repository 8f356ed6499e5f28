"""What becomes of a cohort's pairs: a report per pair (:class:`PairReport`), the rows of ``summary.csv``
(:func:`write_summary`; :data:`COHORT_SUMMARY_COLUMNS`), the majority vote of several atlases' labels per patient
(:func:`fuse_patients`), and the run in one line (:func:`summary_text`)."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.register_folder import (
    COHORT_DONE,
    COHORT_SUMMARY_COLUMNS,
    METRICS_PER_LABEL_KEY,
    WARPED_LABEL,
    metrics_notes,
    read_cohort_summary,
    worse_than,
)
from AgentRegistrationLib.stages.cohort_pairs import FUSED, CohortPair

(REGISTERED, SKIPPED), FAILED = COHORT_DONE, "failed"
"""A pair's status: registered in this run, skipped (its folder was complete from an earlier run), failed."""
FUSED_LABEL = "fused_label.nii.gz"
"""A patient's fused label, in its folder."""


@dataclass
class PairReport:
    """What became of one pair: a row of summary.csv."""

    pair: CohortPair
    status: str
    metrics: dict = field(default_factory=dict)
    seconds: float | None = None
    warnings: list[str] = field(default_factory=list)
    message: str = ""

    def row(self) -> dict[str, str]:
        m = self.metrics
        number = lambda key, fmt: format(m[key], fmt) if m.get(key) is not None else ""  # noqa: E731
        per_label = {key: number(key, ".4f" if key.startswith("dice") else ".4g") for key in m
                     if (found := METRICS_PER_LABEL_KEY.match(key)) and found.group(2) != "none"}
        return {"pair": self.pair.name, "status": self.status, "fixed": str(self.pair.fixed),
                "moving": str(self.pair.moving), "dice_none": number("dice_none", ".4f"),
                "dice_before": number("dice_before", ".4f"), "dice_after": number("dice_after", ".4f"),
                "worse": "WORSE" if worse_than(m) else "", "hausdorff_before": number("hausdorff_before", ".4g"),
                "hausdorff_after": number("hausdorff_after", ".4g"), **per_label, "steps": number("steps", "d"),
                "start_kept": number("start_kept", "d"), "localisation_confidence": number("localisation_confidence", ".2f"),
                "seconds": "" if self.seconds is None else f"{self.seconds:.2f}",
                "warnings": " | ".join([*self.warnings, *metrics_notes(m)]), "message": self.message}


def summary_columns(reports: list[PairReport]) -> list[str]:
    """The columns of summary.csv for ``reports``: :data:`COHORT_SUMMARY_COLUMNS`, with, after ``hausdorff_after``, the
    Dice and Hausdorff distance before and after of each label value alone (``dice_after_label_<n>``, ...; the keys
    of metrics.json) when some pair's labels hold several values."""
    values = sorted({int(found.group(3)) for r in reports for key in r.metrics
                     if (found := METRICS_PER_LABEL_KEY.match(key)) and found.group(2) != "none"})
    per_label = [f"{metric}_{when}_label_{v}" for v in values for metric in ("dice", "hausdorff")
                 for when in ("before", "after")]
    at = COHORT_SUMMARY_COLUMNS.index("hausdorff_after") + 1
    return [*COHORT_SUMMARY_COLUMNS[:at], *per_label, *COHORT_SUMMARY_COLUMNS[at:]]


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier summary.csv by pair name (none when absent or unreadable)."""
    try:
        return {row["pair"]: row for row in read_cohort_summary(path) if row.get("pair")}
    except ValueError:
        return {}


def write_summary(path: Path, reports: list[PairReport]) -> Path:
    """summary.csv, one row per reported pair."""
    text = io.StringIO()
    writer = csv.DictWriter(text, summary_columns(reports), lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.row() for r in reports)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


def failure_message(err: BaseException) -> str:
    """A failure in a sentence: a user's error as it reads, anything else with its kind."""
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, (ValueError, OSError, RuntimeError)) else f"{type(err).__name__}: {text}"



def majority_vote(labels: list[np.ndarray]) -> np.ndarray:
    """The label each voxel gets from most of ``labels`` (arrays of one shape, integer label values; background 0
    counts as a label). A tie goes to the lowest of the tied labels: to the background when it is among them, so
    with two atlases a voxel is foreground only where both say so."""
    stack = np.stack([np.asarray(a) for a in labels])
    values = np.unique(stack)  # ascending: on a tie argmax keeps the first, i.e. the lowest label
    counts = np.stack([(stack == v).sum(axis=0) for v in values])
    return values[np.argmax(counts, axis=0)].astype(stack.dtype)


def fuse_patients(pairs: list[CohortPair], reports: list[PairReport], output_dir: Path) -> list[PairReport]:
    """For each patient of several atlases: the majority vote (:func:`majority_vote`) of the labels its atlases
    were warped into (their ``warped_label.nii.gz``), written to ``<patient>/fused_label.nii.gz``, and a report
    (status ``fused``; Dice and Hausdorff distance against the patient's label where it has one). Atlases whose
    pair failed are left out of the vote, with a warning; a patient with none left is ``failed``."""
    import SimpleITK as sitk

    from AgentRegistrationLib.core.metrics import dice, per_label, surface_distances
    from AgentRegistrationLib.data.image_io import read_label, write_image

    by_patient: dict[str, list[PairReport]] = {}
    for pair, report in zip(pairs, reports, strict=True):
        if pair.patient is not None:
            by_patient.setdefault(pair.patient, []).append(report)
    fused = []
    for patient, group in by_patient.items():
        first = group[0].pair
        pair = CohortPair(f"{patient}/{FUSED}", first.fixed, Path(f"majority vote of {len(group)} atlases"),
                          first.fixed_label, patient=patient)
        start = time.perf_counter()
        done = [r for r in group if r.status != FAILED]
        warnings = [f"{r.pair.name} failed: left out of the vote" for r in group if r.status == FAILED]
        if not done:
            fused.append(PairReport(pair, FAILED, message="every atlas failed on this patient", warnings=warnings))
            continue
        try:
            labels = [read_label(output_dir / r.pair.name / WARPED_LABEL, "warped atlas label") for r in done]
            vote = sitk.GetImageFromArray(majority_vote([sitk.GetArrayFromImage(label) for label in labels]))
            vote.CopyInformation(labels[0])
            write_image(vote, output_dir / patient / FUSED_LABEL)
            metrics = {"atlases": len(done)}
            if first.fixed_label is not None:
                truth = sitk.GetArrayFromImage(read_label(first.fixed_label, "patient label"))
                voted = sitk.GetArrayFromImage(vote)
                metrics["dice_after"] = dice(voted, truth)
                if voted.any() and truth.any():
                    metrics["hausdorff_after"] = surface_distances(voted > 0, truth > 0,
                                                                   vote.GetSpacing())["hausdorff"]
                for value, figures in per_label(voted, truth, vote.GetSpacing()).items():
                    metrics.update({f"{key}_after_label_{value}": v for key, v in figures.items()})
        except Exception as err:  # noqa: BLE001 - one patient's fusion failing stops no other
            fused.append(PairReport(pair, FAILED, seconds=time.perf_counter() - start, message=failure_message(err),
                                    warnings=warnings))
            continue
        fused.append(PairReport(pair, FUSED, metrics, time.perf_counter() - start, warnings))
    return fused


def is_fusion(report: PairReport) -> bool:
    """Whether ``report`` is a patient's fused label (:func:`fuse_patients`), not a pair."""
    return report.pair.patient is not None and report.pair.name == f"{report.pair.patient}/{FUSED}"


def summary_text(reports: list[PairReport]) -> str:
    """One line on a run: how many pairs were registered, skipped and failed, and the Dice after (and of the fused
    labels, with several atlases)."""
    fusions = [r for r in reports if is_fusion(r)]
    reports = [r for r in reports if not is_fusion(r)]
    count = {s: sum(r.status == s for r in reports) for s in (REGISTERED, SKIPPED, FAILED)}
    dice = [r.metrics["dice_after"] for r in reports if r.status != FAILED and "dice_after" in r.metrics]
    text = (f"{len(reports)} pairs: {count[REGISTERED]} registered, {count[SKIPPED]} skipped (done before), "
            f"{count[FAILED]} failed")
    if dice:
        before = [r.metrics["dice_before"] for r in reports if r.status != FAILED and "dice_after" in r.metrics]
        text += (f"; Dice median {np.median(before):.3f} -> {np.median(dice):.3f} "
                 f"(mean {np.mean(before):.3f} -> {np.mean(dice):.3f}) on the {len(dice)} pairs with both labels")
        columns = [c for c in summary_columns(reports) if c.startswith("dice_after_label_")]
        text += "".join(f"; label {c.rsplit('_', 1)[1]} alone: median {np.median(v):.3f}" for c in columns
                        if (v := [r.metrics[c] for r in reports if r.status != FAILED and c in r.metrics]))
    if fusions:
        fused = [r.metrics["dice_after"] for r in fusions if "dice_after" in r.metrics]
        text += (f"; {sum(r.status == FUSED for r in fusions)} of {len(fusions)} patients fused (majority vote)"
                 + (f", Dice median {np.median(fused):.3f} on the {len(fused)} with a label" if fused else ""))
    return text
