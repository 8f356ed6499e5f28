"""The second process that draws a registration's figures (:mod:`AgentRegistrationLib.stages.figures`): started
before the engine imports torch, it draws trajectory.png and qa.png while the first process writes the images.
Its figures are the ones the first process would draw (byte for byte), a figure it cannot draw is an error with its
reason, and an unused one ends at once when closed. Real grid128 subjects (validation subjects 09 and 02)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from AgentRegistrationLib.data.organ_box import localisation_from_label
from AgentRegistrationLib.stages.figures import FigureProcess, draw, draw_side_by_side


def _jobs(folder, load_case):
    """A qa.png of subject 02 shown as the warped moving image of 09, and a trajectory.png of 40 steps."""
    (fixed, fixed_label), (warped, warped_label) = load_case("09"), load_case("02")
    warped.CopyInformation(fixed)
    warped_label.CopyInformation(fixed)
    metrics = {"dice_none": 0.41, "dice_before": 0.62, "dice_after": 0.7,
               "fixed_crop_centre": localisation_from_label(fixed_label).centre.tolist(),
               "fixed_crop_size": [60.0, 60.0, 24.0]}
    rng = np.random.default_rng(0)
    steps, modes = 40, 6
    trajectory = {"actions": rng.integers(0, 2 * modes, steps), "q_values": rng.normal(size=(steps, 2 * modes)),
                  "rejected": np.zeros((steps, 2 * modes), bool), "theta": rng.normal(size=(steps, modes)).cumsum(0),
                  "dice": np.linspace(0.62, 0.7, steps)}
    return [("trajectory", folder / "trajectory.png", dict(trajectory=trajectory, title="case02 to case09",
                                                          metrics=metrics, step_limit=200, start_dice=0.62)),
            ("qa", folder / "qa.png", dict(fixed=fixed, warped=warped, metrics=metrics, fixed_label=fixed_label,
                                           warped_label=warped_label, title="case02 to case09"))]


def test_the_second_process_draws_the_figures_this_process_draws(tmp_path, load_case):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    draw(_jobs(here, load_case))
    with FigureProcess() as figures:
        figures.submit(_jobs(there, load_case))
        figures.wait()
        assert figures.returncode == 0  # it ends without the interpreter's teardown, with its status
    for name in ("trajectory.png", "qa.png"):
        drawn = (there / name).read_bytes()
        assert drawn[:8] == b"\x89PNG\r\n\x1a\n" and len(drawn) > 20_000
        assert drawn == (here / name).read_bytes()


def test_side_by_side_drawing_gives_the_same_figures(tmp_path, load_case):
    """The second process draws its jobs in forked copies of itself (one per job) where the system can fork."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    draw(_jobs(here, load_case))
    draw_side_by_side(_jobs(there, load_case))
    assert all((there / n).read_bytes() == (here / n).read_bytes() for n in ("trajectory.png", "qa.png"))


def test_a_figure_that_cannot_be_drawn_is_an_error_with_its_reason(tmp_path, load_case):
    jobs = _jobs(tmp_path, load_case)
    jobs[1][2]["fixed"] = "not an image"
    with FigureProcess() as figures:
        figures.submit(jobs)
        with pytest.raises(RuntimeError, match="drawing the figures failed: .*qa.png"):
            figures.wait()
    assert not (tmp_path / "qa.png").exists()


def test_a_process_given_no_figures_ends_at_once_when_closed():
    """A registration that fails before its figures does not wait for the second process's warm-up."""
    figures = FigureProcess()
    started = time.perf_counter()
    figures.close()
    assert figures.returncode is not None and time.perf_counter() - started < 0.5
    with pytest.raises(RuntimeError, match="no figures were submitted"):
        figures.wait()
