"""Fit the SDM to a ground-truth folder and measure its reconstruction error in Dice."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.training_folder import GroundTruthFolder
from AgentRegistrationLib.core.bspline import bspline_field
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
from AgentRegistrationLib.core.warp import warp_label
from AgentRegistrationLib.elastix.baselines import ELASTIX_BASELINES
from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary, PairResult, load_pair


def load_groundtruth(gt_dir: Path) -> tuple[ModelGeometry, list[PairResult]]:
    """The model geometry and the deformations (:func:`load_pairs`) of the ground-truth folder ``gt_dir``."""
    geometry = GroundTruthSummary.load(gt_dir).geometry
    return geometry, load_pairs(gt_dir)


def load_pairs(gt_dir: Path) -> list[PairResult]:
    """The ground-truth deformations of the folder ``gt_dir``, 3 or more."""
    results = [load_pair(p) for p in GroundTruthFolder(gt_dir).pair_files()]
    if len(results) < 3:
        raise ValueError(f"{gt_dir} holds {len(results)} GT deformations; fitting an SDM needs at least 3")
    return results


def fit_from_groundtruth(gt_dir: Path, modes: int):
    geometry, results = load_groundtruth(gt_dir)
    coefficients = np.stack([r.coefficients for r in results])
    sdm = StatisticalDeformationModel.fit(coefficients, modes, geometry.control_grid())
    return sdm, coefficients, results


def reconstruction_report(gt_dir: Path, coefficients: np.ndarray, results: list[PairResult],
                          modes_list: list[int]) -> list[dict]:
    """Per d: the loss of Dice (to the fixed mask) between each pair's full GT deformation and its
    d-mode reconstruction, as a fraction."""
    geometry, _ = load_groundtruth(gt_dir)
    grid = geometry.control_grid()
    bases = grid.image_bases(geometry.size)
    labels: dict[str, np.ndarray] = {}

    def label(name):
        if name not in labels:
            with np.load(GroundTruthFolder(gt_dir).subject_file(name)) as z:
                labels[name] = z["label"]
        return labels[name]

    full = np.array([dice(warp_label(label(r.moving), bspline_field(r.coefficients, grid, bases)), label(r.fixed))
                     for r in results])
    table = []
    for d in modes_list:
        d_eff = min(d, len(results) - 1)
        sdm = StatisticalDeformationModel.fit(coefficients, d_eff, grid)
        recon = sdm.reconstruct(sdm.project(coefficients))
        dices = np.array([dice(warp_label(label(r.moving), bspline_field(c, grid, bases)), label(r.fixed))
                          for r, c in zip(results, recon, strict=True)])
        loss = full - dices
        table.append({"modes": d, "modes_used": d_eff, "loss_mean": float(loss.mean()),
                      "loss_median": float(np.median(loss)), "loss_max": float(loss.max()),
                      "recon_dice_median": float(np.median(dices)),
                      "explained_variance": float(sdm.explained_variance_ratio.sum())})
    return table


def translation_share(sdm: StatisticalDeformationModel, geometry: ModelGeometry) -> np.ndarray:
    """Per mode: the share of its displacement (squared, summed over the model grid) that is a pure translation
    (the displacement's mean vector): near 1 when a mode only shifts the image, as pre-alignment errors do."""
    import torch

    _, fields = sdm.fields(geometry.control_grid().image_bases(geometry.size, dtype=torch.float64))
    u = fields.flatten(2).numpy()  # (d, dim, voxels)
    mean = u.mean(axis=2, keepdims=True)
    return (mean**2).sum(axis=(1, 2)) * u.shape[2] / (u**2).sum(axis=(1, 2))


def elastix_rows(comparison: dict | None) -> list[str]:
    """Rows of the report's Dice table for ``agentreg groundtruth --compare-elastix`` (none without it)."""
    if not comparison:
        return []
    n = len(comparison["pairs"])
    rows = [("the ground truth on the elastix sample", comparison["groundtruth"])]
    rows += [(f"plain elastix {m} on the same {n} pairs", comparison[m]) for m in ELASTIX_BASELINES]
    return [f"| {what} | {d['median']:.3f} | {d['mean']:.3f} | {d['std']:.3f} |" for what, d in rows]


def write_report(path: Path, gt_dir: Path, table: list[dict], command: str,
                 sdm: StatisticalDeformationModel | None = None) -> None:
    summary = GroundTruthSummary.load(gt_dir)
    before, after = summary.dice_before, summary.dice_after
    geometry = summary.geometry
    start = ("with each subject's box on its own organ (no registration)" if geometry.localised
             else "after translation only")
    lines = [
        f"### {summary.dim}-D ground truth and SDM",
        "",
        f"- Subjects: {len(summary.subjects)} training subjects (template {summary.template}); "
        f"ordered pairs: {summary.pairs_done} of {summary.pairs_requested} requested, {summary.failures} failed"
        + (f" (random subset, seed {summary.seed})" if summary.max_pairs else " (all ordered pairs)") + ".",
        f"- Model grid {list(geometry.size)}, B-spline control spacing {list(geometry.control_spacing)} voxels"
        + ("" if geometry.choice == "paper" else f" (geometry '{geometry.choice}')") + "; "
        f"elastix {summary.iterations} iterations per resolution, {summary.workers} parallel workers.",
        f"- Time: {summary.pair_seconds_sum / 60:.1f} CPU-minutes of registration in total "
        f"({summary.pair_seconds_sum / max(summary.pairs_done, 1):.1f} s per pair, one thread each); "
        f"wall time of the last run {summary.wall_seconds_this_run / 60:.1f} min.",
        "",
        "| Dice | median | mean | std |",
        "|---|---|---|---|",
        f"| {start} | {before['median']:.3f} | {before['mean']:.3f} | {before['std']:.3f} |",
        f"| after constrained GT registration | {after['median']:.3f} | {after['mean']:.3f} | {after['std']:.3f} |",
        *elastix_rows(summary.elastix),
        "",
        "Reconstruction error of the SDM: loss of Dice (to the fixed mask) between each pair's full GT "
        "deformation and its d-mode reconstruction.",
        "",
        "| d | explained variance | Dice loss mean | median | max | reconstructed Dice median |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        d = f"{row['modes']}" + (f" (capped at {row['modes_used']})" if row["modes_used"] != row["modes"] else "")
        lines.append(f"| {d} | {100 * row['explained_variance']:.1f} % | {100 * row['loss_mean']:.2f} % | "
                     f"{100 * row['loss_median']:.2f} % | {100 * row['loss_max']:.2f} % | {row['recon_dice_median']:.3f} |")
    if sdm is not None:
        share = translation_share(sdm, geometry)
        lines += ["", "What the first modes hold (share of the deformations' variance; share of the mode's displacement "
                  "that is a pure translation):", ""]
        lines += [f"- mode {m}: {100 * sdm.explained_variance_ratio[m]:.1f} % of the variance, "
                  f"{100 * share[m]:.0f} % translation" for m in range(min(3, sdm.num_modes))]
    lines += ["", f"Made by: `{command}`", ""]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))


