"""Ground-truth inter-subject deformations (paper, section 3, and contribution 2).

For every ordered pair (moving m -> fixed n) of training subjects on the common model grid,
elastix registers m to n with Mattes mutual information + bending energy + corresponding
points, weighted 1, 3 and 0.2, with a B-spline grid spacing of 16x16(x8) voxels. The
corresponding points are spread evenly over the two mask surfaces by casting the same set of
evenly spread rays from each mask's centroid (a Fibonacci sphere in 3-D, equal angles in
2-D); the i-th ray's exit point of one mask corresponds to the i-th ray's exit point of the
other. The result of each pair (its B-spline coefficient vector on the common control grid
and its Dice) is cached in its own file, so a rerun resumes.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bspline import ControlGrid, dense_displacement
from .files import atomic_write
from .geometry import ModelGeometry
from .metrics import dice
from .warp import warp

GT_WEIGHTS = {"similarity": 1.0, "bending": 3.0, "points": 0.2}


def ray_directions(dim: int, count: int) -> np.ndarray:
    """``count`` evenly spread unit directions, ITK order (x, y[, z])."""
    if dim == 2:
        a = 2 * np.pi * np.arange(count) / count
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    i = np.arange(count) + 0.5
    z = 1 - 2 * i / count
    r = np.sqrt(1 - z**2)
    phi = np.pi * (1 + 5**0.5) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def surface_points(mask: np.ndarray, directions: np.ndarray, step: float = 0.25) -> np.ndarray:
    """Where each ray from the mask's centroid leaves the mask (voxel coordinates, ITK order)."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("cannot place surface points on an empty mask")
    index = np.argwhere(mask)[:, ::-1].astype(float)  # ITK order
    centre = index.mean(axis=0)
    limits = np.array(mask.shape[::-1]) - 1
    max_len = float(np.linalg.norm(limits)) + 1
    radii = np.arange(0, max_len, step)
    pts = centre[None, None, :] + radii[None, :, None] * directions[:, None, :]  # (rays, samples, dim)
    vox = np.clip(np.rint(pts), 0, limits).astype(int)
    inside = mask[tuple(vox[..., a] for a in range(mask.ndim - 1, -1, -1))]
    outside_bounds = np.any((pts < -0.5) | (pts > limits + 0.5), axis=-1)
    inside &= ~outside_bounds
    # last sample before the first exit (the ray's first boundary crossing)
    first_exit = np.argmax(~inside, axis=1)
    first_exit[inside.all(axis=1)] = inside.shape[1]
    last_inside = np.maximum(first_exit - 1, 0)
    return pts[np.arange(len(directions)), last_inside]


@dataclass
class PairResult:
    moving: str
    fixed: str
    coefficients: np.ndarray
    dice_before: float
    dice_after: float
    seconds: float


def register_constrained(fixed: np.ndarray, moving: np.ndarray, fixed_label: np.ndarray, moving_label: np.ndarray,
                         geometry: ModelGeometry, num_points: int | None = None, iterations: int = 300,
                         resolutions: int = 3) -> np.ndarray:
    """elastix B-spline registration constrained by corresponding surface points; returns the
    coefficient vector on ``geometry``'s control grid (model voxels)."""
    from . import elastix
    from .dataset import model_image

    num_points = num_points or (64 if geometry.dim == 2 else 256)
    directions = ray_directions(geometry.dim, num_points)
    fixed_points = surface_points(fixed_label, directions)
    moving_points = surface_points(moving_label, directions)
    parameter_map = elastix.bspline_map(geometry.control_spacing, iterations, resolutions,
                                        points_weight=GT_WEIGHTS["points"], bending_weight=GT_WEIGHTS["bending"])
    maps = elastix.register(model_image(fixed), model_image(moving), [parameter_map], fixed_points, moving_points)
    coefficients, grid = elastix.bspline_coefficients(maps[-1])
    if grid != geometry.control_grid():
        raise RuntimeError(f"elastix used control grid {grid}, expected {geometry.control_grid()}")
    return coefficients


def warp_label(label: np.ndarray, coefficients: np.ndarray, grid: ControlGrid, bases: list[torch.Tensor]) -> np.ndarray:
    """Warp a model-space label with a coefficient vector (nearest neighbour)."""
    u = dense_displacement(torch.as_tensor(coefficients, dtype=torch.float64)[None], grid, bases)
    return warp(torch.as_tensor(label)[None, None], u.float(), mode="nearest")[0, 0].numpy()


def _pair_job(args) -> PairResult:
    moving_name, fixed_name, subject_dir, geometry_dict, settings = args
    from .elastix import single_threaded_worker

    single_threaded_worker()
    geometry = ModelGeometry.from_dict(geometry_dict)
    with np.load(Path(subject_dir) / f"{moving_name}.npz") as zm, np.load(Path(subject_dir) / f"{fixed_name}.npz") as zf:
        moving, moving_label, fixed, fixed_label = zm["image"], zm["label"], zf["image"], zf["label"]
    start = time.perf_counter()
    coefficients = register_constrained(fixed, moving, fixed_label, moving_label, geometry, **settings)
    grid = geometry.control_grid()
    warped = warp_label(moving_label, coefficients, grid, grid.image_bases(geometry.size))
    return PairResult(moving_name, fixed_name, coefficients, dice(moving_label, fixed_label),
                      dice(warped, fixed_label), time.perf_counter() - start)


def pair_file(out_dir: Path, moving: str, fixed: str) -> Path:
    return out_dir / "pairs" / f"{moving}__to__{fixed}.npz"


def load_pair(path: Path) -> PairResult:
    with np.load(path) as z:
        return PairResult(str(z["moving"]), str(z["fixed"]), z["coefficients"], float(z["dice_before"]),
                          float(z["dice_after"]), float(z["seconds"]))


def run_groundtruth(
    subject_dir: Path,
    names: list[str],
    geometry: ModelGeometry,
    out_dir: Path,
    pairs: list[tuple[str, str]] | None = None,
    workers: int | None = None,
    settings: dict | None = None,
    progress: Callable[[int, int, PairResult | None, str | None], None] | None = None,
) -> tuple[list[PairResult], list[tuple[str, str, str]]]:
    """Constrained GT registration for ``pairs`` (default: every ordered pair of ``names``).

    Cached pairs are loaded, not recomputed. Returns the results and the failures
    ``(moving, fixed, message)``; a failing pair never stops the run.
    """
    out_dir = Path(out_dir)
    (out_dir / "pairs").mkdir(parents=True, exist_ok=True)
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
    with ProcessPoolExecutor(max_workers=workers) as pool:
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
            atomic_write(pair_file(out_dir, m, f), lambda tmp, r=r: np.savez(
                tmp, moving=r.moving, fixed=r.fixed, coefficients=r.coefficients, dice_before=r.dice_before,
                dice_after=r.dice_after, seconds=r.seconds))
            results.append(r)
            if progress:
                progress(done, len(pairs), r, None)
    if failures:
        atomic_write(out_dir / "failures.json", lambda tmp: Path(tmp).write_text(json.dumps(failures, indent=1)))
    else:  # a rerun that redid an earlier run's failed pairs: no stale list of failures
        (out_dir / "failures.json").unlink(missing_ok=True)
    return results, failures


def dice_summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"median": float("nan"), "mean": float("nan"), "std": float("nan"), "n": 0}
    return {"median": float(np.median(v)), "mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


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
