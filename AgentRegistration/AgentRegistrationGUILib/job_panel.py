"""The job state machine of the three widgets (one registration, the registration of several patients, training):
one worker job drives one Apply/Cancel button, one progress bar and one status label.

Apply becomes Cancel while the job runs and "Cancelling..." (disabled) once a cancel is asked for; the progress bar
shows while the job runs; the status label shows the job's messages, then how it ended. The widgets are used only
through the properties Qt exposes to Python (``text``, ``enabled``, ``visible``, ``minimum``, ``maximum``,
``value``), and nothing here imports Qt or Slicer: the panel runs, and is tested, in plain Python.

Texts come in translated by the module (Slicer's ``tr`` takes its translation context from the file that calls it,
so every text is translated in the module file that shows it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from AgentRegistrationLib.contract import messages

from AgentRegistrationGUILib.jobs import JobState, WorkerJob


def progress_percent(message: dict[str, Any]) -> tuple[int, int, int] | None:
    """A bar that keeps its range 0..100 and shows the fraction done of the command running (the training stages);
    ``None`` (leave the bar as it is) for a message without a count."""
    fraction = messages.progress_fraction(message)
    return None if fraction is None else (0, 100, int(100 * fraction))


class JobPanel:
    """The state of one worker job, shown on its button, progress bar and status label.

    - ``apply_text``, ``cancel_text``, ``cancelling_text``: the button's text when idle, while the job runs, and
      after a cancel request (the status label's too, then).
    - ``inputs``: widgets disabled while the job is busy.
    - ``stage_label``: a label that shows which command of a job of several runs (:meth:`WorkerJob.stage_text`).
    - ``progress``: a message -> ``(minimum, maximum, value)`` for the bar, or None to leave the bar as it is. By
      default (:func:`messages.progress_range`) each stage's own count, and ``(0, 0, 0)``, Qt's busy indicator, for
      a stage of unknown length; :func:`progress_percent` keeps the bar at 0..100.
    - ``start_bar``: what the bar shows from the start until the first count (busy; None: left as it is).
    - ``on_change``: called after each change of state (for the widget's other buttons that wait while this job
      runs).

    The widget's timer calls :meth:`poll`; once it returns True the widget ends the job with :meth:`succeed`,
    :meth:`fail` or, when the state is ``CANCEL_REQUESTED``, :meth:`finish_cancelled`.
    """

    def __init__(self, button: Any, progress_bar: Any, status_label: Any, *, apply_text: str, cancel_text: str,
                 cancelling_text: str, inputs: Iterable[Any] = (), stage_label: Any = None,
                 progress: Callable[[dict[str, Any]], tuple[int, int, int] | None] = messages.progress_range,
                 start_bar: tuple[int, int, int] | None = (0, 0, 0), on_change: Callable[[], None] | None = None):
        self.button = button
        self.progress_bar = progress_bar
        self.status_label = status_label
        self.apply_text = apply_text
        self.cancel_text = cancel_text
        self.cancelling_text = cancelling_text
        self.inputs = list(inputs)
        self.stage_label = stage_label
        self.progress = progress
        self.start_bar = start_bar
        self.on_change = on_change
        self.state = JobState.IDLE
        self.job: WorkerJob | None = None

    @property
    def busy(self) -> bool:
        """True while the job runs or is being cancelled: the inputs and other jobs wait."""
        return self.state in (JobState.RUNNING, JobState.CANCEL_REQUESTED)

    def show(self, state: JobState, text: str = "") -> None:
        """Put the panel in ``state`` with ``text`` on the status label (the one place that maps a state to the
        widgets)."""
        self.state = state
        busy = self.busy
        self.button.text = {JobState.RUNNING: self.cancel_text,
                            JobState.CANCEL_REQUESTED: self.cancelling_text}.get(state, self.apply_text)
        self.button.enabled = state != JobState.CANCEL_REQUESTED
        self.progress_bar.visible = busy
        for widget in self.inputs:
            widget.enabled = not busy
        self.status_label.text = text
        if self.on_change is not None:
            self.on_change()

    def start(self, job: WorkerJob, text: str) -> None:
        """The job (already started) runs: the button becomes Cancel, the bar shows ``start_bar``."""
        self.job = job
        if self.start_bar is not None:
            self._show_bar(self.start_bar)
        self.show(JobState.RUNNING, text)

    def request_cancel(self) -> None:
        """Kill the running job; the panel says "Cancelling..." until :meth:`finish_cancelled`."""
        self.show(JobState.CANCEL_REQUESTED, self.cancelling_text)
        self.job.cancel()

    def poll(self) -> bool:
        """Show the messages that arrived (log lines go to the log; the status label follows them while the job
        runs, not once a cancel was asked for); True once the job has ended.

        Whether it has ended is asked before draining: a job that has ended has queued every line, so its last
        messages are shown and its error recorded (:attr:`WorkerJob.error`) before the widget ends it.
        """
        ended = self.job.done()
        for message in self.job.poll():
            if message.get("stage") == messages.STAGE_LOG:
                logging.info(message.get("message", ""))
                continue
            if self.stage_label is not None:
                self.stage_label.text = self.job.stage_text()
            bar = self.progress(message)
            if bar is not None:
                self._show_bar(bar)
            if self.state == JobState.RUNNING:
                self.status_label.text = messages.progress_text(message)
        return ended

    def succeed(self, text: str) -> None:
        """The job has ended and its results are in."""
        self.job = None
        self.show(JobState.SUCCEEDED, text)

    def fail(self, text: str) -> None:
        """The job, or importing its results, failed; ``text`` says why."""
        self.job = None
        self.show(JobState.FAILED, text)

    def finish_cancelled(self, text: str) -> None:
        """The cancelled job has ended: its temporary folder is removed (unless kept), the panel is idle."""
        job, self.job = self.job, None
        if job is not None:
            job.cleanup()
        self.show(JobState.IDLE, text)

    def discard(self) -> None:
        """Kill a job still running and remove its temporary folder (the widget is going away)."""
        if self.job is not None:
            self.job.cancel()
            self.job.cleanup()

    def _show_bar(self, bar: tuple[int, int, int]) -> None:
        minimum, maximum, value = bar
        self.progress_bar.minimum = minimum  # minimum, then maximum: Qt's setRange(minimum, maximum)
        self.progress_bar.maximum = maximum
        self.progress_bar.value = value
