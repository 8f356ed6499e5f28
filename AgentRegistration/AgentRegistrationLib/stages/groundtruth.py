"""Ground-truth inter-subject deformations (paper, section 3, and contribution 2).

For every ordered pair (moving m -> fixed n) of training subjects on the common model grid,
elastix registers m to n with Mattes mutual information + bending energy + corresponding
points, weighted 1, 3 and 0.2, with a B-spline grid spacing of 16x16(x8) voxels. The
corresponding points are spread evenly over the two mask surfaces by casting the same set of
evenly spread rays from each mask's centroid (a Fibonacci sphere in 3-D, equal angles in
2-D); the i-th ray's exit point of one mask corresponds to the i-th ray's exit point of the
other. The result of each pair (its B-spline coefficient vector on the common control grid
and its Dice) is cached in its own file, so a rerun resumes. The folder's ``summary.json``
(:class:`GroundTruthSummary`) says what the run was: geometry, subjects, pairs, Dice, settings.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.paths import recorded_path
from AgentRegistrationLib.contract.training_folder import GT_DICE_COLUMNS, GroundTruthFolder
from AgentRegistrationLib.core.bspline import bspline_field
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice, per_label
from AgentRegistrationLib.core.warp import warp_label
from AgentRegistrationLib.elastix.baselines import BASELINE_ITERATIONS, ELASTIX_BASELINES, register_baseline
from AgentRegistrationLib.elastix.constrained import register_constrained
from AgentRegistrationLib.stages.cluster import job_executor


@dataclass
class PairResult:
    moving: str
    fixed: str
    coefficients: np.ndarray
    dice_before: float
    dice_after: float
    seconds: float
    label_dice: dict[int, tuple[float, float]] = field(default_factory=dict)  # value: (before, after); several labels


def _pair_job(args) -> PairResult:
    moving_name, fixed_name, subject_dir, geometry_dict, settings = args
    from AgentRegistrationLib.elastix.wrapper import single_threaded_worker  # itk (see register_constrained)

    single_threaded_worker()
    geometry = ModelGeometry.from_dict(geometry_dict)
    with np.load(Path(subject_dir) / f"{moving_name}.npz") as zm, np.load(Path(subject_dir) / f"{fixed_name}.npz") as zf:
        moving, moving_label, fixed, fixed_label = zm["image"], zm["label"], zf["image"], zf["label"]
    start = time.perf_counter()
    coefficients = register_constrained(fixed, moving, fixed_label, moving_label, geometry, **settings)
    grid = geometry.control_grid()
    warped = warp_label(moving_label, bspline_field(coefficients, grid, grid.image_bases(geometry.size)))
    before, after = per_label(moving_label, fixed_label, hausdorff=False), per_label(warped, fixed_label, hausdorff=False)
    return PairResult(moving_name, fixed_name, coefficients, dice(moving_label, fixed_label),
                      dice(warped, fixed_label), time.perf_counter() - start,
                      {v: (before[v]["dice"], after[v]["dice"]) for v in before})


def pair_file(out_dir: Path, moving: str, fixed: str) -> Path:
    return GroundTruthFolder(out_dir).pair_file(moving, fixed)


def save_pair(path: Path, r: PairResult) -> None:
    """Write one pair's result (atomically); ``label_dice`` only when the labels hold several values."""
    per_label_rows = {"label_dice": np.array([(v, b, a) for v, (b, a) in sorted(r.label_dice.items())])} \
        if r.label_dice else {}
    atomic_write(path, lambda tmp: np.savez(
        tmp, moving=r.moving, fixed=r.fixed, coefficients=r.coefficients, dice_before=r.dice_before,
        dice_after=r.dice_after, seconds=r.seconds, **per_label_rows))


def load_pair(path: Path) -> PairResult:
    with np.load(path) as z:
        label_dice = ({int(v): (float(b), float(a)) for v, b, a in z["label_dice"]} if "label_dice" in z.files
                      else {})  # absent: one label (and in folders made before labels were kept apart)
        return PairResult(str(z["moving"]), str(z["fixed"]), z["coefficients"], float(z["dice_before"]),
                          float(z["dice_after"]), float(z["seconds"]), label_dice)


def run_groundtruth(
    subject_dir: Path,
    names: list[str],
    geometry: ModelGeometry,
    out_dir: Path,
    pairs: list[tuple[str, str]] | None = None,
    workers: int | None = None,
    settings: dict | None = None,
    progress: Callable[[int, int, PairResult | None, str | None], None] | None = None,
    scheduler: str | None = None,
) -> tuple[list[PairResult], list[tuple[str, str, str]]]:
    """Constrained GT registration for ``pairs`` (default: every ordered pair of ``names``), in ``workers`` local
    processes, or on the workers of the Dask scheduler at the address ``scheduler`` (:mod:`.cluster`; they read
    ``subject_dir``, the results come back here).

    Cached pairs are loaded, not recomputed. Returns the results and the failures
    ``(moving, fixed, message)``; a failing pair never stops the run.
    """
    out_dir = Path(out_dir)
    GroundTruthFolder(out_dir).pairs.mkdir(parents=True, exist_ok=True)
    pairs = pairs or [(m, f) for m in names for f in names if m != f]
    results: list[PairResult] = []
    todo = []
    for m, f in pairs:
        path = pair_file(out_dir, m, f)
        if path.is_file():
            results.append(load_pair(path))
        else:
            todo.append((m, f))
    done = len(results)
    if progress:
        progress(done, len(pairs), None, None)
    failures: list[tuple[str, str, str]] = []
    workers = workers or os.cpu_count() or 1
    jobs = [(m, f, str(subject_dir), geometry.to_dict(), settings or {}) for m, f in todo]
    with job_executor(workers, scheduler) as pool:
        futures = {pool.submit(_pair_job, job): job[:2] for job in jobs}
        for future in as_completed(futures):
            m, f = futures[future]
            done += 1
            try:
                r = future.result()
            except Exception as err:  # noqa: BLE001 - reported and skipped, as promised
                failures.append((m, f, f"{type(err).__name__}: {err}"))
                if progress:
                    progress(done, len(pairs), None, f"{m} -> {f} failed: {err}")
                continue
            save_pair(pair_file(out_dir, m, f), r)
            results.append(r)
            if progress:
                progress(done, len(pairs), r, None)
    if failures:
        atomic_write(GroundTruthFolder(out_dir).failures_json, lambda tmp: Path(tmp).write_text(json.dumps(failures, indent=1)))
    else:  # a rerun that redid an earlier run's failed pairs: no stale list of failures
        GroundTruthFolder(out_dir).failures_json.unlink(missing_ok=True)
    return results, failures


def make_groundtruth(subjects: list, template, geometry: ModelGeometry, out: Path, pairs: list[tuple[str, str]], *,
                     workers: int, settings: dict, max_pairs: int, seed: int, source: dict[str, str],
                     max_failed_fraction: float, on_subject: Callable[[int], None] | None = None,
                     on_pair: Callable[[int, int, PairResult | None, str | None], None] | None = None,
                     scheduler: str | None = None, compare_elastix: int = 0, organ: str = "",
                     crop_padding: dict | None = None,
                     ) -> tuple[GroundTruthSummary, list[PairResult], list[tuple[str, str, str]]]:
    """The whole ``agentreg groundtruth`` stage: ``subjects`` (:class:`dataset.Subject`) prepared onto the model
    grid (``out/subjects``; translated onto ``template`` with the paper's geometry), the constrained registration of
    ``pairs`` (:func:`run_groundtruth`), then ``out/gt_dice.csv`` and ``out/summary.json`` written. ``on_subject(done)``
    after each subject; ``on_pair`` as :func:`run_groundtruth`'s ``progress``. ``compare_elastix``: also register that
    many of the pairs (a seeded sample) with plain elastix (:func:`elastix_comparison`), for the summary. ``organ``:
    the organ's name (``--organ``), recorded for the model; ``crop_padding``: how much of the crops lies off the
    training images (:func:`geometry_choice.crop_padding`; measured here when not given)."""
    # SimpleITK (see register_constrained)
    from AgentRegistrationLib.data.dataset import prepare_subject
    from AgentRegistrationLib.data.geometry_choice import crop_padding as padding_of
    from AgentRegistrationLib.data.image_io import read_image

    out = Path(out)
    metric = settings.get("metric", "points")
    if GroundTruthSummary.path(out).is_file():
        earlier = GroundTruthSummary.load(out)
        differ = ([f"metric '{earlier.metric}'", f"metric '{metric}'"] if earlier.metric != metric else
                  [f"model {earlier.geometry.description()}", f"model {geometry.description()}"]
                  if earlier.geometry != geometry else None)
        if differ:
            raise ValueError(f"{out} holds a ground truth of {differ[0]}; this run asks for {differ[1]}: give another "
                             "--out (a folder's finished pairs are reused only by the same settings)")
    subject_dir = GroundTruthFolder(out).subjects
    start = time.perf_counter()
    template_image = read_image(template.image, "template image")
    for i, s in enumerate(subjects):
        prepare_subject(s, template_image, geometry, subject_dir)
        if on_subject:
            on_subject(i + 1)
    names = [s.name for s in subjects]
    results, failures = run_groundtruth(subject_dir, names, geometry, out, pairs, workers, settings, on_pair,
                                        scheduler)
    results.sort(key=lambda r: (r.moving, r.fixed))
    write_dice_csv(GroundTruthFolder(out).dice_csv, results)
    summary = GroundTruthSummary.of_run(
        geometry, template.name, names, pairs, results, failures, settings=settings, workers=workers,
        max_pairs=max_pairs, seed=seed, wall_seconds=time.perf_counter() - start,
        max_failed_fraction=max_failed_fraction, source=source)
    summary.organ = organ
    summary.crop_padding = crop_padding or padding_of(geometry, [s.label for s in subjects], names)
    if compare_elastix:
        summary.elastix = elastix_comparison(subject_dir, results, geometry, compare_elastix, seed, settings)
    summary.save(out)
    return summary, results, failures


def elastix_comparison(subject_dir: Path, results: list[PairResult], geometry: ModelGeometry, count: int, seed: int,
                       settings: dict) -> dict:
    """Is the ground truth better than plain elastix? A seeded sample of ``count`` of the registered pairs, each
    also registered with plain elastix B-spline (Mattes MI, no points, no bending energy; :data:`ELASTIX_BASELINES`,
    as ``agentreg evaluate``'s e8 / e16, with the GT's iterations): Dice on the model grid of each, and of the
    ground truth on the same pairs."""
    sample = sorted(random.Random(seed).sample(results, min(count, len(results))), key=lambda r: (r.moving, r.fixed))
    iterations = settings.get("iterations") or BASELINE_ITERATIONS
    dices: dict[str, list[float]] = {m: [] for m in ELASTIX_BASELINES}
    start = time.perf_counter()
    for r in sample:
        with np.load(Path(subject_dir) / f"{r.moving}.npz") as zm, np.load(Path(subject_dir) / f"{r.fixed}.npz") as zf:
            pair = {"moving": zm["image"], "moving_label": zm["label"], "fixed": zf["image"], "fixed_label": zf["label"]}
        for method in ELASTIX_BASELINES:
            coefficients, grid = register_baseline(method, pair["fixed"], pair["moving"], geometry, iterations)
            u = bspline_field(coefficients, grid, grid.image_bases(geometry.size, dtype=torch.float64))
            dices[method].append(dice(warp_label(pair["moving_label"], u), pair["fixed_label"]))
    return {"pairs": [[r.moving, r.fixed] for r in sample], "iterations": iterations,
            "groundtruth": dice_summary([r.dice_after for r in sample]),
            **{m: dice_summary(v) for m, v in dices.items()}, "seconds": time.perf_counter() - start}


def elastix_lines(comparison: dict) -> list[str]:
    """What the report says of :func:`elastix_comparison`: both Dice medians, and whether the GT is good enough."""
    gt = comparison["groundtruth"]["median"]
    best = max(ELASTIX_BASELINES, key=lambda m: comparison[m]["median"])
    lines = [f"plain elastix B-spline on {len(comparison['pairs'])} of the same pairs: Dice median "
             + ", ".join(f"{m} {comparison[m]['median']:.3f}" for m in ELASTIX_BASELINES)
             + f"; the ground truth on those pairs {gt:.3f}"]
    if gt <= comparison[best]["median"]:
        lines.append(f"warning: the ground truth does not beat plain elastix ({best}) on these pairs: an agent trained "
                     "on it will not either; try another --geometry, --control-spacing or more --iterations")
    return lines


def write_dice_csv(path: Path, results: list[PairResult]) -> None:
    """``gt_dice.csv``: one row per pair (:data:`protocol.GT_DICE_COLUMNS`)."""
    lines = [",".join(GT_DICE_COLUMNS)] + [
        f"{r.moving},{r.fixed},{r.dice_before:.4f},{r.dice_after:.4f},{r.seconds:.2f}" for r in results]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def data_record(data: str | Path, subjects: str | None = None, split: str | None = None,
                subset: str | None = None) -> dict[str, str]:
    """Where the subjects came from (:attr:`GroundTruthSummary.source`, for the model card of a model trained on
    them): the data folder and the selection (``subjects`` named, a ``split`` file's ``subset``, or ``all``)."""
    record = {"data": recorded_path(data)}
    if subjects:
        record["selection"] = "subjects"
    elif split:
        record.update(selection="split", split=recorded_path(split), subset=subset)
    else:
        record["selection"] = "all"
    return record


def run_report(summary: GroundTruthSummary, out: Path) -> tuple[list[str], str | None]:
    """What ``agentreg groundtruth`` says at the end: counts and Dice, then the failures, if any, and what to do;
    and the error (what to fix) when too many pairs failed to go on (:func:`failure_summary`), else ``None``."""
    done, requested, failed_count = summary.pairs_done, summary.pairs_requested, summary.failures
    d = summary.dice_after
    dice_text = (f"Dice after GT registration median {d['median']:.3f}, mean {d['mean']:.3f}, std {d['std']:.3f} "
                 f"(before: median {summary.dice_before['median']:.3f})" if done else "no pair succeeded")
    counted = (f"{done} of {requested} pairs done, {failed_count} failed" if failed_count
               else f"{done} pairs ({failed_count} failed)")
    from AgentRegistrationLib.data.geometry_choice import crop_padding_lines  # SimpleITK (see register_constrained)

    lines = [f"ground truth: {counted}; {dice_text}; written to {out}", f"model {summary.geometry.description()}; "
             f"ground-truth metric '{summary.metric}'", *crop_padding_lines(summary.geometry, summary.crop_padding)]
    if summary.label_dice:
        lines.append("Dice per label after GT registration (median): " + ", ".join(
            f"label {v} {d['after']['median']:.3f} (before {d['before']['median']:.3f})"
            for v, d in summary.label_dice.items()))
    if summary.elastix:
        lines += elastix_lines(summary.elastix)
    if not failed_count:
        return lines, None
    failed = summary.failed
    failures_file = GroundTruthFolder(out).failures_json
    lines += failure_lines(failed)
    if failed["too_many"] and not done and len(failed["groups"]) == 1 and failed_count > 1:
        return lines, (
            f"every ground-truth pair failed ({failed_count} of {requested}), all with the same error, so the cause is "
            "more likely the settings than the subjects: try another model geometry (--geometry, --grid-size, "
            f"--control-spacing) or fewer --resolutions, and if it persists report the error with {failures_file}")
    if failed["too_many"]:
        return lines, (
            f"too many ground-truth pairs failed ({failed_count} of {requested}; at most "
            f"{100 * failed['max_fraction']:.0f} % may fail, and every subject needs a pair that succeeds): "
            "check the named subjects' images and masks (a mask must not be empty and must lie on its "
            "image), then fix them or leave them out (--subjects or another --split) and rerun the same "
            f"command (finished pairs are kept); the {done} pairs that succeeded are saved in {out}")
    lines.append(f"warning: {failed_count} of {requested} ground-truth pairs failed (within the "
                 f"{100 * failed['max_fraction']:.0f} % allowed); the SDM and training use the {done} others; "
                 f"rerun the same command to retry the failed pairs (listed in {failures_file})")
    return lines, None


def dice_summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"median": float("nan"), "mean": float("nan"), "std": float("nan"), "n": 0}
    return {"median": float(np.median(v)), "mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def label_dice_summary(results: list[PairResult]) -> dict | None:
    """Dice of each label value apart over the pairs, ``{"<value>": {"before": ..., "after": ...}}``
    (:func:`dice_summary`), or ``None`` when no pair's labels hold several values."""
    values = sorted({v for r in results for v in r.label_dice})
    if not values:
        return None
    return {str(v): {when: dice_summary([r.label_dice[v][i] for r in results if v in r.label_dice])
                     for i, when in enumerate(("before", "after"))} for v in values}


def failure_summary(pairs: list[tuple[str, str]], failures: list[tuple[str, str, str]], max_fraction: float) -> dict:
    """What failed and whether it is too much to go on with.

    ``too_many``: more than ``max_fraction`` of the pairs failed, or some subject lost every one of its pairs
    (its images then take no part in the ground truth, the SDM or training). ``groups``: the failures grouped by
    message, each with the subjects of its pairs (most failed pairs first) as ``[name, failed, of its pairs]``."""
    total = Counter(s for pair in pairs for s in pair)
    failed = Counter(s for m, f, _ in failures for s in (m, f))
    lost = sorted((s for s in total if failed[s] == total[s]), key=lambda s: (-total[s], s))
    groups = {}
    for m, f, message in failures:
        groups.setdefault(message, []).append((m, f))
    ordered = []
    for message, group in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        counts = Counter(s for pair in group for s in pair)
        subjects = [[s, n, total[s]] for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        ordered.append({"message": message, "pairs": [list(p) for p in sorted(group)], "subjects": subjects})
    return {"pairs": len(pairs), "failed": len(failures), "max_fraction": max_fraction,
            "subjects_without_pairs": lost, "groups": ordered,
            "too_many": len(failures) > max_fraction * len(pairs) or bool(lost)}


def failure_lines(summary: dict, shown_subjects: int = 8) -> list[str]:
    """The failure summary as text: one block per message, naming the subjects whose pairs failed."""
    lines = [f"{summary['failed']} of {summary['pairs']} ground-truth pairs failed "
             f"({100 * summary['failed'] / max(summary['pairs'], 1):.0f} %):"]
    for group in summary["groups"]:
        subjects = ", ".join(f"{s} ({n} of its {of})" for s, n, of in group["subjects"][:shown_subjects])
        more = len(group["subjects"]) - shown_subjects
        lines.append(f"  {len(group['pairs'])} pairs: {group['message']}")
        lines.append(f"    subjects of these pairs (failed pairs of all of theirs): {subjects}"
                     + (f" and {more} more" if more > 0 else ""))
    if summary["subjects_without_pairs"]:
        lines.append("  every pair failed for: " + ", ".join(summary["subjects_without_pairs"]))
    return lines


# ----------------------------------------------------------------------------------------- the folder's summary
SOURCE_KEYS = ("data", "selection", "split", "subset")  # where the subjects came from (see GroundTruthSummary.source)


@dataclass
class GroundTruthSummary:
    """What a ground-truth folder holds, as ``agentreg groundtruth`` records it in ``summary.json``.

    The model geometry, the subjects and the template, where they came from (``source``: the data folder and
    the selection: ``subjects``, ``split`` with its file and subset, or ``all``; empty in folders made before it was
    recorded), the pairs requested / done / failed, Dice before and after, time, and the run's settings. ``failed``:
    the failure summary (:func:`failure_summary`) when some pairs failed. Stored with the same flat JSON keys as
    ever, so every earlier folder loads."""


    dim: int
    geometry: ModelGeometry
    template: str
    subjects: list[str]
    pairs_requested: int
    pairs_done: int
    failures: int
    dice_before: dict[str, float]
    dice_after: dict[str, float]
    pair_seconds_sum: float
    wall_seconds_this_run: float
    workers: int
    iterations: int
    max_pairs: int
    seed: int
    resolutions: int | None = None  # absent in the earliest folders
    source: dict[str, str] = field(default_factory=dict)
    failed: dict | None = None
    elastix: dict | None = None  # elastix_comparison, when asked for
    label_dice: dict | None = None  # labels with several values: {value: {"before": ..., "after": ...}} (dice_summary)
    metric: str = "points"  # GT_METRICS; absent (the paper's) in folders made before the choice
    organ: str = ""  # the organ's name (--organ); empty: not given (absent in folders made before it was recorded)
    crop_padding: dict | None = None  # geometry_choice.crop_padding of the training images (crops on the organ)

    @classmethod
    def of_run(cls, geometry: ModelGeometry, template: str, subjects: list[str], pairs: list[tuple[str, str]],
               results: list[PairResult], failures: list[tuple[str, str, str]], *, settings: dict, workers: int,
               max_pairs: int, seed: int, wall_seconds: float, max_failed_fraction: float,
               source: dict[str, str] | None = None) -> GroundTruthSummary:
        """The summary of a run of :func:`run_groundtruth` on ``pairs`` (its ``settings``, ``workers``; the pairs
        drawn with ``max_pairs`` and ``seed``), which took ``wall_seconds``."""
        return cls(
            dim=geometry.dim, geometry=geometry, template=template, subjects=list(subjects),
            pairs_requested=len(pairs), pairs_done=len(results), failures=len(failures),
            dice_before=dice_summary([r.dice_before for r in results]),
            dice_after=dice_summary([r.dice_after for r in results]),
            pair_seconds_sum=float(sum(r.seconds for r in results)), wall_seconds_this_run=wall_seconds,
            workers=workers, iterations=settings.get("iterations"), resolutions=settings.get("resolutions"),
            max_pairs=max_pairs, seed=seed, source=dict(source or {}),
            failed=failure_summary(pairs, failures, max_failed_fraction) if failures else None,
            label_dice=label_dice_summary(results), metric=settings.get("metric", "points"))

    def to_dict(self) -> dict:
        """The JSON of ``summary.json`` (keys in their usual order; ``resolutions`` and ``failed`` only when known)."""
        d = {"dim": self.dim, "geometry": self.geometry.to_dict(), "template": self.template,
             "subjects": list(self.subjects), **self.source,
             "pairs_requested": self.pairs_requested, "pairs_done": self.pairs_done, "failures": self.failures,
             "dice_before": self.dice_before, "dice_after": self.dice_after,
             "pair_seconds_sum": self.pair_seconds_sum, "wall_seconds_this_run": self.wall_seconds_this_run,
             "workers": self.workers, "iterations": self.iterations}
        if self.resolutions is not None:
            d["resolutions"] = self.resolutions
        d.update(max_pairs=self.max_pairs, seed=self.seed)
        if self.failed is not None:
            d["failed"] = self.failed
        if self.elastix is not None:
            d["elastix"] = self.elastix
        if self.label_dice is not None:
            d["label_dice"] = self.label_dice
        if self.metric != "points":
            d["metric"] = self.metric
        if self.organ:
            d["organ"] = self.organ
        if self.crop_padding is not None:
            d["crop_padding"] = self.crop_padding
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GroundTruthSummary:
        """Read :meth:`to_dict`'s JSON; ``KeyError`` naming the first missing key."""
        fields = {k: d[k] for k in ("dim", "template", "subjects", "pairs_requested", "pairs_done", "failures",
                                    "dice_before", "dice_after", "pair_seconds_sum", "wall_seconds_this_run",
                                    "workers", "iterations", "max_pairs", "seed")}
        return cls(geometry=ModelGeometry.from_dict(d["geometry"]), resolutions=d.get("resolutions"),
                   source={k: d[k] for k in SOURCE_KEYS if k in d}, failed=d.get("failed"),
                   elastix=d.get("elastix"), label_dice=d.get("label_dice"), metric=d.get("metric", "points"),
                   organ=str(d.get("organ", "")), crop_padding=d.get("crop_padding"), **fields)

    @classmethod
    def path(cls, folder: str | Path) -> Path:
        return GroundTruthFolder(Path(folder)).summary_json

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/summary.json`` (atomically)."""
        text = json.dumps(self.to_dict(), indent=1)
        return atomic_write(self.path(folder), lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, folder: str | Path) -> GroundTruthSummary:
        """Read ``folder/summary.json``: ``FileNotFoundError`` when ``folder`` is no ground-truth folder,
        ``ValueError`` when its summary cannot be read; both say to run ``agentreg groundtruth``."""
        file = cls.path(folder)
        if not file.is_file():
            raise FileNotFoundError(f"{folder} is not a ground-truth folder (no {file.name}): "
                                    "run 'agentreg groundtruth' first")
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            problem = f"no {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{file} is not a ground-truth summary that can be read ({problem}): "
                             "run 'agentreg groundtruth' again on this folder") from None
