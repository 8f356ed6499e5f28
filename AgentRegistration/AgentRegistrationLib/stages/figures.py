"""A registration's pictures (trajectory.png and qa.png), drawn in this process or in a second one.

matplotlib's import and the drawing take about a second of a registration's few (issue 27). ``agentreg register``
starts a :class:`FigureProcess` before it imports torch: the second process imports matplotlib on the other core
while this one imports torch, then waits; when the registration is done, it draws the figures while this process
writes the images. The figures are the same either way (:func:`draw` makes them in both); the second process only
changes when and where they are drawn.

    python -m AgentRegistrationLib.stages.figures   # the second process: jobs (pickled) on stdin, exit 0 when drawn
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import threading
import traceback
from pathlib import Path

FigureJob = tuple[str, Path, dict]
"""``(kind, path, keyword arguments)``: ``kind`` "trajectory" (:func:`.trajectory_figure.plot_trajectory`) or "qa"
(:func:`.qa_figure.write_qa_figure`)."""


def draw(jobs: list[FigureJob]) -> None:
    """Draw each job's figure into its path."""
    from AgentRegistrationLib.stages.qa_figure import write_qa_figure
    from AgentRegistrationLib.stages.trajectory_figure import plot_trajectory

    drawers = {"trajectory": plot_trajectory, "qa": write_qa_figure}
    for kind, path, kwargs in jobs:
        drawers[kind](path=path, **kwargs)


class FigureProcess:
    """A second Python process that draws one registration's figures (:func:`draw`): start it early, give it the
    jobs with :meth:`submit`, and :meth:`wait` for them. :meth:`close` ends it, used or not."""

    def __init__(self):
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding AgentRegistrationLib
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen([sys.executable, "-m", "AgentRegistrationLib.stages.figures"], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._thread: threading.Thread | None = None
        self._stderr = b""

    def submit(self, jobs: list[FigureJob]) -> None:
        """Send the jobs; the drawing starts at once and runs beside this process."""
        payload = pickle.dumps(jobs, protocol=pickle.HIGHEST_PROTOCOL)

        def talk() -> None:  # writes the jobs and reads the messages while this process goes on
            self._stderr = self._process.communicate(payload)[1]

        self._thread = threading.Thread(target=talk, name="figures", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Wait until the submitted figures are written; a ``RuntimeError`` with the second process's last message
        if it could not draw them."""
        if self._thread is None:
            raise RuntimeError("no figures were submitted")
        self._thread.join()
        if self._process.returncode != 0:
            lines = self._stderr.decode(errors="replace").strip().splitlines() or [f"exit {self._process.returncode}"]
            raise RuntimeError(f"drawing the figures failed: {lines[-1]}")

    def close(self) -> None:
        """End the process: at once if it was never given jobs (it writes nothing before it has them: a failed
        registration does not wait for its warm-up), else when it is done."""
        if self._thread is None:
            self._process.kill()
            self._process.stdin.close()
        else:
            self._thread.join()
        self._process.wait()

    @property
    def returncode(self) -> int | None:
        """The process's exit status once it has ended (0: drew its jobs; negative: ended by :meth:`close` without
        jobs), else ``None``."""
        return self._process.poll()

    def __enter__(self) -> FigureProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def warm_up() -> None:
    """Draw small stand-ins of a registration's two figures (a 32 x 32 x 8 image, five steps) into memory: the fonts
    load and matplotlib's code paths run once, so that the real figures, drawn next in the same process, take a half
    to two thirds of their first drawing's time. Nothing is written to disk."""
    import io

    import numpy as np
    import SimpleITK as sitk

    from AgentRegistrationLib.stages.qa_figure import qa_figure
    from AgentRegistrationLib.stages.trajectory_figure import trajectory_figure

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 32, 32), dtype=np.float32))
    label = sitk.GetImageFromArray(np.pad(np.ones((4, 16, 16), np.uint8), ((2, 2), (8, 8), (8, 8))))
    metrics = {"dice_none": 0.5, "dice_before": 0.6, "dice_after": 0.7, "fixed_crop_centre": [15.5, 15.5, 3.5],
               "fixed_crop_size": [20.0, 20.0, 6.0]}
    steps, modes = 5, 3
    trajectory = {"actions": np.zeros(steps, int), "q_values": np.zeros((steps, 2 * modes)),
                  "rejected": np.zeros((steps, 2 * modes), bool), "theta": np.zeros((steps, modes)),
                  "dice": np.linspace(0.6, 0.7, steps)}
    for figure in (trajectory_figure(trajectory, metrics, "warm-up", 10, 0.6),
                   qa_figure(image, image, metrics, label, label, "warm-up")):
        figure.savefig(io.BytesIO(), dpi=100, format="png")


def draw_side_by_side(jobs: list[FigureJob]) -> None:
    """:func:`draw`, each job after the first in a forked copy of this process (where the system has ``fork``), so
    that the figures are drawn on as many cores as there are jobs."""
    if len(jobs) < 2 or not hasattr(os, "fork"):
        draw(jobs)
        return
    children = []
    for job in jobs[1:]:
        pid = os.fork()
        if pid == 0:  # the copy: draw its job and leave without running the parent's exit handlers
            code = 1
            try:
                draw([job])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append((pid, job))
    draw(jobs[:1])
    for pid, job in children:
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            raise RuntimeError(f"drawing {Path(job[1]).name} failed")


def main() -> int:
    """The second process: import what drawing needs and warm it up, read the jobs, draw them."""
    try:
        warm_up()  # while the first process computes
        payload = sys.stdin.buffer.read()
        if payload:
            draw_side_by_side(pickle.loads(payload))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the first process says what happened
        return 130
    return 0


if __name__ == "__main__":
    code = main()  # then end as agentreg does (cli.run): without the interpreter's teardown of matplotlib and numpy,
    atexit._run_exitfuncs()  # which took 0.2 s that the registration waited for
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
