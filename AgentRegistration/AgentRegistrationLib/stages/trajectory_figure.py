"""trajectory.png: what the agent did, step by step (the Dice or the best Q-value, and the SDM parameters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from AgentRegistrationLib.contract.register_folder import dice_text


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



def plot_trajectory(trajectory: dict[str, np.ndarray], path: Path, title: str = "", metrics: dict | None = None,
                    step_limit: int | None = None, start_dice: float | None = None) -> None:
    """Write :func:`trajectory_figure` as a PNG."""
    trajectory_figure(trajectory, metrics, title, step_limit, start_dice).savefig(path, dpi=100)
