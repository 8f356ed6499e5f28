"""Files of a registration: images, displacement, trajectory (CSV + plot) and metrics.

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
    STEPS_DIR,
    TRAJECTORY_COLUMNS,
    TRAJECTORY_CSV,
    TRAJECTORY_PNG,
    WARPED,
    WARPED_LABEL,
    check_metrics,
    step_file_name,
)
from AgentRegistrationLib.data.preprocessing import displacement_in_fixed_geometry, warp_to_fixed
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
                      step_limit: int | None = None):
    """The figure of trajectory.png: Dice on the model grid (or the best Q-value) and the SDM parameters over the
    agent's integer steps, the step where the agent stopped marked, and the Dice of metrics.json (in the fixed
    image's geometry) before and after in the legend. Returns a matplotlib ``Figure`` (no window)."""
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = metrics or {}
    steps = np.arange(1, len(trajectory["actions"]) + 1)
    last = int(steps[-1]) if len(steps) else 0
    fig = Figure(figsize=(7.5, 6))
    # fixed margins that fit the labels: a layout engine would draw the figure once more (half its time)
    fig.subplots_adjust(left=0.11, right=0.98, top=0.95, bottom=0.08, hspace=0.06)
    top, bottom = fig.subplots(2, 1, sharex=True)
    if "dice" in trajectory:
        top.plot(steps, trajectory["dice"], color="tab:green", label="Dice on the model grid (crop), each step")
        top.set_ylabel("Dice")
        if "dice_after" in metrics:
            top.axhline(metrics["dice_before"], color="tab:gray", linestyle=":",
                        label=f"Dice before, fixed image: {metrics['dice_before']:.3f}")
            top.plot([last], [metrics["dice_after"]], "o", color="tab:red",
                     label=f"Dice after, fixed image: {metrics['dice_after']:.3f}")
    else:
        top.plot(steps, trajectory["q_values"].max(axis=1), color="tab:blue", label="best Q-value")
        top.set_ylabel("best Q-value (expected improvement)")
    stopped = "the step limit" if step_limit is None or last >= step_limit else "the stop rule"
    for axes in (top, bottom):
        axes.axvline(last, color="tab:red", linestyle="--", linewidth=1,
                     label=f"stopped at step {last} ({stopped})" if axes is top else None)
    top.legend(loc="best", fontsize="small")
    top.set_title(title or "agent trajectory", fontsize="medium")
    theta = np.asarray(trajectory["theta"])
    if theta.ndim == 2 and theta.shape[1] and len(steps):  # one line per mode, drawn as one artist (fast)
        colors = [f"C{m % 10}" for m in range(theta.shape[1])]
        bottom.add_collection(LineCollection([np.column_stack([steps, theta[:, m]]) for m in range(theta.shape[1])],
                                             colors=colors, linewidths=0.8))
        bottom.autoscale_view()
    bottom.set_ylabel(f"SDM parameters\n({theta.shape[1] if theta.ndim == 2 else 0} modes, one line each)")
    bottom.set_xlabel("agent step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    if last:
        bottom.set_xlim(0.5, last + 0.5)
    return fig


def plot_trajectory(trajectory: dict[str, np.ndarray], path: Path, title: str = "", metrics: dict | None = None,
                    step_limit: int | None = None) -> None:
    """Write :func:`trajectory_figure` as a PNG."""
    trajectory_figure(trajectory, metrics, title, step_limit).savefig(path, dpi=100)


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
                               step_limit: int | None = None) -> list[Path]:
    """Write warped.nii.gz, [warped_label.nii.gz], displacement.nii.gz, trajectory.csv/.png (``title``: the
    pair's names), metrics.json and, with ``save_steps`` = K, steps/warped_NNNN.nii.gz every K steps.

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
        plot_trajectory(result.trajectory, tmp / TRAJECTORY_PNG, title, result.metrics, step_limit)
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
