"""Files of a registration: images, displacement, trajectory (CSV + plot), the QA figure and metrics.

Everything is written into a temporary folder beside the output folder and moved into place
only when all files are complete, so a failed or cancelled run leaves no half-written output.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AgentRegistrationLib.contract.register_folder import (
    DISPLACEMENT,
    METRICS_JSON,
    OUTPUT_NAMES,
    QA_PNG,
    STEPS_DIR,
    TRAJECTORY_COLUMNS,
    TRAJECTORY_CSV,
    TRAJECTORY_PNG,
    WARPED,
    WARPED_LABEL,
    check_metrics,
    dice_text,
    step_file_name,
)
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.data.preprocessing import displacement_in_fixed_geometry, warp_to_fixed
from AgentRegistrationLib.stages.qa_figure import write_qa_figure
from AgentRegistrationLib.stages.registration import RegistrationResult


def trajectory_rows(trajectory: dict[str, np.ndarray]) -> tuple[list[str], list[list]]:
    """Header and rows of trajectory.csv (one row per step)."""
    q, theta = trajectory["q_values"], trajectory["theta"]
    header = list(TRAJECTORY_COLUMNS)
    header += [f"q_{a}" for a in range(q.shape[1])] + [f"theta_{m}" for m in range(theta.shape[1])]
    rows = []
    for t in range(len(trajectory["actions"])):
        a = int(trajectory["actions"][t])
        first_choice_rejected = bool(trajectory["rejected"][t, int(np.argmax(q[t]))])
        dice = f"{trajectory['dice'][t]:.5f}" if "dice" in trajectory else ""
        rows.append([t + 1, a, a // 2, "+" if a % 2 == 0 else "-", int(not first_choice_rejected),
                     int(trajectory["rejected"][t].sum()), dice]
                    + [f"{v:.5g}" for v in q[t]] + [f"{v:.5g}" for v in theta[t]])
    return header, rows


def trajectory_figure(trajectory: dict[str, np.ndarray], metrics: dict | None = None, title: str = "",
                      step_limit: int | None = None, start_dice: float | None = None):
    """The figure of trajectory.png: the Dice on the model grid (the fixed crop the agent sees) at its start (step 0,
    ``start_dice``) and after every step, or the best Q-value without labels, and the SDM parameters over the agent's
    integer steps, the step where the agent stopped marked. Each plot is on one grid: the Dice of metrics.json (the
    fixed image's grid: none, start, after) is written in the title, not drawn. Returns a matplotlib ``Figure``."""
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = metrics or {}
    steps = np.arange(1, len(trajectory["actions"]) + 1)
    last = int(steps[-1]) if len(steps) else 0
    fig = Figure(figsize=(7.5, 6.3))
    # fixed margins that fit the labels: a layout engine would draw the figure once more (half its time)
    fig.subplots_adjust(left=0.13, right=0.98, top=0.9, bottom=0.08, hspace=0.06)
    top, bottom = fig.subplots(2, 1, sharex=True)
    if "dice" in trajectory:
        dice = np.asarray(trajectory["dice"], dtype=float)
        x, y = (np.r_[0, steps], np.r_[start_dice, dice]) if start_dice is not None else (steps, dice)
        top.plot(x, y, color="tab:green", label="each step")
        if start_dice is not None:
            top.plot([0], [start_dice], "o", color="tab:gray", label=f"start: {start_dice:.3f}")
        if len(dice):
            end = "the agent's end, not kept" if metrics.get("start_kept") else "after"
            top.plot([last], [dice[-1]], "o", color="tab:green", label=f"{end}: {dice[-1]:.3f}")
        top.set_ylabel("Dice on the model grid\n(the fixed crop)")
    else:
        top.plot(steps, trajectory["q_values"].max(axis=1), color="tab:blue", label="best Q-value")
        top.set_ylabel("best Q-value (expected improvement)")
    stopped = "the step limit" if step_limit is None or last >= step_limit else "the stop rule"
    for axes in (top, bottom):
        axes.axvline(last, color="tab:red", linestyle="--", linewidth=1,
                     label=f"stopped at step {last} ({stopped})" if axes is top else None)
    if metrics.get("start_kept"):
        top.plot([], [], " ", label="result: the start, kept (the end made the crops no more alike)")
    top.legend(loc="best", fontsize="small")
    fixed_dice = dice_text(metrics).replace("Dice ", "Dice on the fixed image (metrics.json): ", 1)
    heading = [title or "agent trajectory"] + ([fixed_dice.replace(" -> ", ", after ")] if fixed_dice else [])
    top.set_title("\n".join(heading), fontsize="medium", color="red" if fixed_dice.startswith("WORSE") else "black")
    theta = np.asarray(trajectory["theta"])
    if theta.ndim == 2 and theta.shape[1] and len(steps):  # one line per mode, drawn as one artist (fast)
        colors = [f"C{m % 10}" for m in range(theta.shape[1])]
        bottom.add_collection(LineCollection([np.column_stack([steps, theta[:, m]]) for m in range(theta.shape[1])],
                                             colors=colors, linewidths=0.8))
        bottom.autoscale_view()
    bottom.set_ylabel(f"SDM parameters\n({theta.shape[1] if theta.ndim == 2 else 0} modes, one line each)")
    bottom.set_xlabel("agent step (0: the start)" if start_dice is not None else "agent step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    if last:
        bottom.set_xlim(-0.5 if start_dice is not None else 0.5, last + 0.5)
    return fig


def crop_start_dice(result: RegistrationResult) -> float | None:
    """The Dice of the two label crops as the agent starts (no step yet), on the model grid; ``None`` without both
    labels or without a Dice in the trajectory."""
    pair = result.pair
    if "dice" not in result.trajectory or pair.fixed_label is None or pair.moving_label is None:
        return None
    return dice(np.asarray(pair.moving_label) > 0, np.asarray(pair.fixed_label) > 0)


def plot_trajectory(trajectory: dict[str, np.ndarray], path: Path, title: str = "", metrics: dict | None = None,
                    step_limit: int | None = None, start_dice: float | None = None) -> None:
    """Write :func:`trajectory_figure` as a PNG."""
    trajectory_figure(trajectory, metrics, title, step_limit, start_dice).savefig(path, dpi=100)


def write_displacement(displacement: sitk.Image, path: Path) -> None:
    """``displacement`` as float32 ITK displacement field at ``path`` (a ``.nii.gz``): the NIfTI file ITK writes,
    in a gzip container whose blocks are stored, not deflated. A displacement field's float32 values hardly
    compress (to about 85 %, with most of a pair's writing time), so the file is about 20 % larger and written
    and read several times faster; any gzip and NIfTI reader (ITK, Slicer, nibabel) reads it as before."""
    path = Path(path)
    raw = path.with_name(f".{path.name.split('.')[0]}-uncompressed.nii")
    try:
        sitk.WriteImage(sitk.Cast(displacement, sitk.sitkVectorFloat32), str(raw), False)
        with raw.open("rb") as src, gzip.open(path, "wb", compresslevel=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    finally:
        raw.unlink(missing_ok=True)


def write_registration_outputs(result: RegistrationResult, out_dir: Path, moving: sitk.Image, sdm, geometry,
                               fixed: sitk.Image, save_steps: int = 0, title: str = "",
                               step_limit: int | None = None, fixed_label: sitk.Image | None = None) -> list[Path]:
    """Write warped.nii.gz, [warped_label.nii.gz], displacement.nii.gz, trajectory.csv/.png (``title``: the
    pair's names), qa.png (:mod:`.qa_figure`; with the outline of ``fixed_label`` when given), metrics.json and,
    with ``save_steps`` = K, steps/warped_NNNN.nii.gz every K steps.

    An ``OSError`` names ``out_dir`` (never the temporary folder beside it)."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-partial-", dir=out_dir.parent))
    except OSError as err:
        raise OSError(f"cannot write output folder {out_dir}: {err.strerror or err}") from None
    try:
        sitk.WriteImage(result.warped, str(tmp / WARPED), True)
        if result.warped_label is not None:
            sitk.WriteImage(result.warped_label, str(tmp / WARPED_LABEL), True)
        write_displacement(result.displacement, tmp / DISPLACEMENT)
        header, rows = trajectory_rows(result.trajectory)
        (tmp / TRAJECTORY_CSV).write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
        plot_trajectory(result.trajectory, tmp / TRAJECTORY_PNG, title, result.metrics, step_limit,
                        crop_start_dice(result))
        write_qa_figure(tmp / QA_PNG, fixed, result.warped, result.metrics, fixed_label, result.warped_label, title)
        (tmp / METRICS_JSON).write_text(json.dumps(check_metrics(result.metrics), indent=1))
        if save_steps > 0:
            (tmp / STEPS_DIR).mkdir()
            grid = geometry.control_grid()
            thetas = [(0, sdm.theta_identity)]
            thetas += [(t + 1, th) for t, th in enumerate(result.trajectory["theta"]) if (t + 1) % save_steps == 0]
            for step, theta in thetas:
                field = displacement_in_fixed_geometry(sdm.deformation(theta), grid, result.pair.frame, fixed,
                                                       result.pair.moving_frame)
                sitk.WriteImage(warp_to_fixed(moving, field), str(tmp / STEPS_DIR / step_file_name(step)), True)
        out_dir.mkdir(exist_ok=True)
        for stale in OUTPUT_NAMES:  # files of an earlier run that this run does not write
            target = out_dir / stale
            if not (tmp / stale).exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        written = []
        for item in sorted(tmp.iterdir()):
            target = out_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
