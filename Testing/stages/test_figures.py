"""Figures a clinician can read: the demo's pair figure (slice index, orientation letters from the direction
matrix, Dice before -> after, a red mark on a pair the agent made worse), the demo's printed summary, and
the trajectory plot of ``agentreg register``. Small synthetic images: these check what is drawn, not how well
anything registers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.stages.demo import made_worse, orientation_labels, pair_figure, slice_caption, summary_lines
from AgentRegistrationLib.stages.trajectory_figure import trajectory_figure

IDENTITY3 = (1, 0, 0, 0, 1, 0, 0, 0, 1)
FLIPPED3 = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # index x toward R, index y toward A


def _image(array: np.ndarray, direction=None, pixel=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _figure(fixed, moving=None, fixed_label=None, before=0.5, after=0.6, **kwargs):
    moving = fixed if moving is None else moving
    label = fixed_label if fixed_label is not None else _image(np.zeros(sitk.GetArrayFromImage(fixed).shape,
                                                                        np.uint8), fixed.GetDirection(), sitk.sitkUInt8)
    return pair_figure(fixed, moving, fixed, label, label, label, "case01", "case00", before, after, **kwargs)


def test_identity_direction_reads_as_the_radiological_axial_view():
    assert orientation_labels(IDENTITY3) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert orientation_labels((1, 0, 0, 1)) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    # row 0 at the bottom: the same image is drawn upside down, and the letters say so
    assert orientation_labels(IDENTITY3, origin="lower") == {"left": "R", "right": "L", "top": "P", "bottom": "A"}


def test_a_flipped_or_swapped_direction_gives_its_own_letters():
    assert orientation_labels(FLIPPED3) == {"left": "L", "right": "R", "top": "P", "bottom": "A"}
    assert orientation_labels((-1, 0, 0, -1)) == {"left": "L", "right": "R", "top": "P", "bottom": "A"}
    # index x along +y (P), index y along +x (L)
    assert orientation_labels((0, 1, 0, 1, 0, 0, 0, 0, 1)) == {"left": "A", "right": "P", "top": "R", "bottom": "L"}
    # oblique by 20 degrees: the largest component names the edge
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    assert orientation_labels((c, -s, 0, s, c, 0, 0, 0, 1)) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    with pytest.raises(ValueError):
        orientation_labels((1, 0, 0))


def _rendered_panel(fig, ax) -> np.ndarray:
    """The grey values drawn inside ``ax`` (rows from the top of the panel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    box = ax.get_window_extent()
    height = rgba.shape[0]
    rows = slice(int(round(height - box.y1)) + 2, int(round(height - box.y0)) - 2)
    cols = slice(int(round(box.x0)) + 2, int(round(box.x1)) - 2)
    return rgba[rows, cols, :3].mean(axis=2)


def _edge(panel: np.ndarray, edge: str) -> float:
    q = panel.shape[0] // 4, panel.shape[1] // 4
    return {"top": panel[:q[0]], "bottom": panel[-q[0]:], "left": panel[:, :q[1]], "right": panel[:, -q[1]:]}[edge].mean()


def _letter(ax, edge: str) -> str:
    (text,) = [t for t in ax.texts if t.get_gid() == f"orientation-{edge}"]
    return text.get_text()


@pytest.mark.parametrize("direction", [IDENTITY3, FLIPPED3])
def test_orientation_letters_sit_at_the_edges_of_what_is_drawn(direction):
    """Fixed panel: brightness = how anterior a voxel is; moving panel: how far to the patient's right. The
    bright edge of each drawn panel must carry the letter A (resp. R), whatever the direction matrix."""
    n = 24
    j, i = np.mgrid[0:n, 0:n].astype(float)
    matrix = np.asarray(direction, float).reshape(3, 3)
    x, y = matrix[0, 0] * i + matrix[0, 1] * j, matrix[1, 0] * i + matrix[1, 1] * j  # LPS of voxel (i, j)
    anterior = np.repeat((-y)[None], 5, axis=0)
    right = np.repeat((-x)[None], 5, axis=0)
    fig = _figure(_image(anterior, direction), _image(right, direction))
    fixed_ax, moving_ax, _ = fig.axes[:3]
    for ax, letter, opposite in ((fixed_ax, "A", "P"), (moving_ax, "R", "L")):
        panel = _rendered_panel(fig, ax)
        bright = max(("top", "bottom", "left", "right"), key=lambda e: _edge(panel, e))
        dark = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}[bright]
        assert _letter(ax, bright) == letter and _letter(ax, dark) == opposite, (direction, bright)


def test_contours_are_drawn_on_the_mask_pixels():
    """imshow puts element [j, i] at (i, j); the contour of a mask block must enclose exactly that block."""
    n = 48
    mask = np.zeros((n, n), np.uint8)
    mask[10:20, 30:40] = 1
    fixed = _image(np.zeros((n, n)))
    fig = _figure(fixed, fixed_label=_image(mask, pixel=sitk.sitkUInt8))
    vertices = np.concatenate([p.vertices for p in fig.axes[0].collections[0].get_paths()])
    assert vertices[:, 0].min() == pytest.approx(29.5) and vertices[:, 0].max() == pytest.approx(39.5)
    assert vertices[:, 1].min() == pytest.approx(9.5) and vertices[:, 1].max() == pytest.approx(19.5)
    assert fig.axes[0].yaxis_inverted()  # row 0 (anterior for identity direction) at the top


def test_each_panel_names_its_slice():
    volume = _image(np.zeros((5, 16, 16)), IDENTITY3)
    assert slice_caption(volume) == "middle axial slice, 3 of 5 (index 2)"
    assert slice_caption(volume[:, :, 2], 32) == "middle axial slice, 17 of 32 (index 16)"
    assert slice_caption(volume[:, :, 2]) == "2-D image"
    titles = [ax.get_title() for ax in _figure(volume[:, :, 2], fixed_slices=32, moving_slices=20).axes[:3]]
    assert "17 of 32 (index 16)" in titles[0] and "case00" in titles[0]
    assert "11 of 20 (index 10)" in titles[1] and "case01" in titles[1]
    assert "17 of 32 (index 16)" in titles[2]


def _frames(fig):
    return [p for p in fig.patches if p.get_gid() == "worse-frame"]


def test_a_pair_made_worse_is_marked_in_red():
    image = _image(np.zeros((16, 16)))
    worse = _figure(image, before=0.594, after=0.391)
    title = worse.get_suptitle()
    assert "WORSE after registration: Dice 0.594 -> 0.391" in title and "case01 -> case00" in title
    assert worse._suptitle.get_color() == "red"
    (frame,) = _frames(worse)
    assert frame.get_edgecolor()[:3] == (1.0, 0.0, 0.0)

    better = _figure(image, before=0.594, after=0.700)
    assert better.get_suptitle() == "case01 -> case00: Dice 0.594 -> 0.700 (improved)"
    assert better._suptitle.get_color() != "red" and not _frames(better)
    # a drop that does not show at the printed precision is not called worse
    assert not made_worse(0.5941, 0.5939) and made_worse(0.594, 0.593)


def test_the_summary_says_which_pairs_got_worse():
    rows = [("case01 -> case00", 0.594, 0.391, 2.0, 0.60, 5.0), ("case02 -> case01", 0.50, 0.70, 2.0, 0.65, 5.0)]
    lines = summary_lines(rows, (16, 16))
    (worse_row,) = [line for line in lines if line.startswith("case01 -> case00")]
    (better_row,) = [line for line in lines if line.startswith("case02 -> case01")]
    assert worse_row.endswith("WORSE") and "WORSE" not in better_row
    assert "The agent made 1 of 2 pair(s) WORSE: case01 -> case00 (Dice 0.594 -> 0.391)" in "\n".join(lines)
    assert "case02 -> case01 (Dice" not in "\n".join(lines)
    lines = summary_lines(rows[1:], (16, 16))
    assert "The agent made none of the 1 pair(s) worse." in lines and not any("WORSE" in line for line in lines)
    assert "'before' = after the translation pre-alignment" in lines[-1]  # the paper's start
    assert "'before' = the crops on the organ alone" in summary_lines(rows, (16, 16), localised=True)[-1]


def _trajectory(steps: int, modes: int = 3, actions: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"actions": rng.integers(0, actions, steps), "q_values": rng.normal(size=(steps, actions)),
            "rejected": np.zeros((steps, actions), bool), "theta": rng.normal(size=(steps, modes)),
            "dice": np.linspace(0.6, 0.8, steps)}


def test_trajectory_plot_names_the_pair_and_its_stop():
    metrics = {"dice_none": 0.249, "dice_before": 0.594, "dice_after": 0.781}
    fig = trajectory_figure(_trajectory(7), metrics, "case01 to case00", step_limit=44, start_dice=0.55)
    top, bottom = fig.axes
    assert top.get_title().splitlines()[0] == "case01 to case00"
    assert bottom.get_xlabel() == "agent step (0: the start)" and "SDM parameters" in bottom.get_ylabel()
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert "stopped at step 7 (the stop rule)" in legend
    ticks = [t for t in bottom.get_xticks() if bottom.get_xlim()[0] <= t <= bottom.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    stop_lines = [line for line in bottom.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in stop_lines] == [[7, 7]]

    at_limit = trajectory_figure(_trajectory(44), metrics, "x", step_limit=44)
    assert "stopped at step 44 (the step limit)" in [t.get_text() for t in at_limit.axes[0].get_legend().get_texts()]


def test_the_dice_plot_is_on_one_grid_and_names_it():
    """Everything drawn on the Dice axes is on the model grid (the crop): the start at step 0, each step, and the end;
    the fixed image's Dice (none, start, after, from metrics.json) are words in the title, not points on the axes."""
    metrics = {"dice_none": 0.249, "dice_before": 0.594, "dice_after": 0.781}
    trajectory = _trajectory(7)
    top = trajectory_figure(trajectory, metrics, "case01 to case00", step_limit=44, start_dice=0.55).axes[0]
    assert top.get_ylabel() == "Dice on the model grid\n(the fixed crop)"
    assert top.get_title().splitlines()[1] == "Dice on the fixed image (metrics.json): none 0.249, start 0.594, after 0.781"
    drawn = np.concatenate([line.get_ydata() for line in top.get_lines() if line.get_linestyle() != "--"])
    grid_values = np.r_[0.55, trajectory["dice"]]
    assert all(np.isclose(grid_values, y).any() for y in drawn)  # nothing of another grid
    assert not any(np.isclose(drawn, v).any() for v in (0.249, 0.594, 0.781))
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert "start: 0.550" in legend and f"after: {trajectory['dice'][-1]:.3f}" in legend
    steps = np.concatenate([line.get_xdata() for line in top.get_lines() if line.get_linestyle() != "--"])
    assert steps.min() == 0 and steps.max() == 7

    kept = trajectory_figure(trajectory, {**metrics, "start_kept": 1}, "x", start_dice=0.55).axes[0]
    kept_legend = [t.get_text() for t in kept.get_legend().get_texts()]
    assert any(t.startswith("result: the start, kept") for t in kept_legend)
    assert f"the agent's end, not kept: {trajectory['dice'][-1]:.3f}" in kept_legend
    worse = trajectory_figure(trajectory, {**metrics, "dice_after": 0.5}, "x", start_dice=0.55).axes[0]
    assert "WORSE" in worse.get_title() and worse.title.get_color() == "red"
