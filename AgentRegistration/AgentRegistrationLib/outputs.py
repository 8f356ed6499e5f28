"""Files of a registration: images, displacement, trajectory (CSV + plot) and metrics.

Everything is written into a temporary folder beside the output folder and moved into place
only when all files are complete, so a failed or cancelled run leaves no half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .preprocessing import displacement_in_fixed_geometry, warp_to_fixed
from .protocol import (
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
from .registration import RegistrationResult


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


def plot_trajectory(trajectory: dict[str, np.ndarray], path: Path, title: str = "") -> None:
    """Dice (or the best Q-value) and the parameters over the agent's steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(trajectory["actions"]) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if "dice" in trajectory:
        top.plot(steps, trajectory["dice"], color="tab:green")
        top.set_ylabel("Dice")
    else:
        top.plot(steps, trajectory["q_values"].max(axis=1), color="tab:blue")
        top.set_ylabel("best Q-value")
    top.set_title(title or "agent trajectory")
    bottom.plot(steps, trajectory["theta"], linewidth=0.8)
    bottom.set_ylabel("SDM parameters")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_registration_outputs(result: RegistrationResult, out_dir: Path, moving: sitk.Image, sdm, geometry,
                               fixed: sitk.Image, save_steps: int = 0) -> list[Path]:
    """Write warped.nii.gz, [warped_label.nii.gz], displacement.nii.gz, trajectory.csv/.png,
    metrics.json and, with ``save_steps`` = K, steps/warped_NNNN.nii.gz every K steps."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-partial-", dir=out_dir.parent))
    try:
        sitk.WriteImage(result.warped, str(tmp / WARPED), True)
        if result.warped_label is not None:
            sitk.WriteImage(result.warped_label, str(tmp / WARPED_LABEL), True)
        sitk.WriteImage(sitk.Cast(result.displacement, sitk.sitkVectorFloat32), str(tmp / DISPLACEMENT), True)
        header, rows = trajectory_rows(result.trajectory)
        (tmp / TRAJECTORY_CSV).write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
        plot_trajectory(result.trajectory, tmp / TRAJECTORY_PNG)
        (tmp / METRICS_JSON).write_text(json.dumps(check_metrics(result.metrics), indent=1))
        if save_steps > 0:
            (tmp / STEPS_DIR).mkdir()
            grid = geometry.control_grid()
            thetas = [(0, sdm.theta_identity)]
            thetas += [(t + 1, th) for t, th in enumerate(result.trajectory["theta"]) if (t + 1) % save_steps == 0]
            for step, theta in thetas:
                field = displacement_in_fixed_geometry(sdm.deformation(theta), grid, result.pair.frame, fixed,
                                                       result.translation)
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
