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
    step_file_name,
)
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.data.preprocessing import displacement_in_fixed_geometry, warp_to_fixed
from AgentRegistrationLib.stages.figures import FigureJob, FigureProcess, draw
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


def crop_start_dice(result: RegistrationResult) -> float | None:
    """The Dice of the two label crops as the agent starts (no step yet), on the model grid; ``None`` without both
    labels or without a Dice in the trajectory."""
    pair = result.pair
    if "dice" not in result.trajectory or pair.fixed_label is None or pair.moving_label is None:
        return None
    return dice(np.asarray(pair.moving_label) > 0, np.asarray(pair.fixed_label) > 0)


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
                               step_limit: int | None = None, fixed_label: sitk.Image | None = None,
                               figures: FigureProcess | None = None) -> list[Path]:
    """Write warped.nii.gz, [warped_label.nii.gz], displacement.nii.gz, trajectory.csv/.png (``title``: the
    pair's names), qa.png (:mod:`.qa_figure`; with the outline of ``fixed_label`` when given), metrics.json and,
    with ``save_steps`` = K, steps/warped_NNNN.nii.gz every K steps. With ``figures`` (a :class:`.FigureProcess`
    started early), the two figures are drawn there while this process writes the rest.

    An ``OSError`` names ``out_dir`` (never the temporary folder beside it)."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-partial-", dir=out_dir.parent))
    except OSError as err:
        raise OSError(f"cannot write output folder {out_dir}: {err.strerror or err}") from None
    try:
        jobs: list[FigureJob] = [
            ("trajectory", tmp / TRAJECTORY_PNG, dict(trajectory=result.trajectory, title=title, metrics=result.metrics,
                                                      step_limit=step_limit, start_dice=crop_start_dice(result))),
            ("qa", tmp / QA_PNG, dict(fixed=fixed, warped=result.warped, metrics=result.metrics, fixed_label=fixed_label,
                                      warped_label=result.warped_label, title=title))]
        if figures is not None:
            figures.submit(jobs)
        sitk.WriteImage(result.warped, str(tmp / WARPED), True)
        if result.warped_label is not None:
            sitk.WriteImage(result.warped_label, str(tmp / WARPED_LABEL), True)
        write_displacement(result.displacement, tmp / DISPLACEMENT)
        header, rows = trajectory_rows(result.trajectory)
        (tmp / TRAJECTORY_CSV).write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
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
        if figures is not None:
            figures.wait()
        else:
            draw(jobs)
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
