"""The job state machine of the three widgets (``AgentRegistrationGUILib.job_panel.JobPanel``), driven by real worker
jobs: a small Python worker prints progress lines in the engine's format (``contract.messages``) and waits for the
test to let it go on, so every state is checked at a known point.

Qt widgets cannot be made outside Slicer; the panel only reads and writes their properties (``text``, ``enabled``,
``visible``, ``minimum``, ``maximum``, ``value``), so plain attribute holders stand in for them.
"""

from __future__ import annotations

import ast
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from AgentRegistrationGUILib import jobs
from AgentRegistrationGUILib.job_panel import JobPanel, progress_percent
from AgentRegistrationGUILib.jobs import JobState

ENGINE_DIR = Path(__file__).resolve().parents[2] / "AgentRegistration"

# argv: ready file (written once the first lines are out), go file (waited for), then "succeed" or "fail".
WORKER = """
import sys, time
from pathlib import Path
from AgentRegistrationLib.contract import messages
ready, go, ending = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for done in range(3):
    print(messages.encode(messages.progress_message("register", done, 4)), flush=True)
print("a line that is not a message", flush=True)
ready.write_text("1")
while not go.exists():
    time.sleep(0.02)
if ending == "fail":
    print(messages.encode(messages.error_message("the moving volume is empty")), flush=True)
    sys.exit(1)
print(messages.encode(messages.progress_message("register", 4, 4)), flush=True)
print(messages.encode(messages.done_message(steps=4)), flush=True)
"""

TEXTS = {"apply_text": "Apply", "cancel_text": "Cancel", "cancelling_text": "Cancelling..."}


class Worker:
    """One worker job running ``WORKER``; ``go()`` lets it finish."""

    def __init__(self, folder: Path, ending: str = "succeed"):
        folder.mkdir(parents=True, exist_ok=True)
        self.ready, self.go_file = folder / "ready", folder / "go"
        command = [sys.executable, "-c", WORKER, str(self.ready), str(self.go_file), ending]
        self.job = jobs.WorkerJob([command], env=jobs.worker_environment(ENGINE_DIR), folder=folder).start()

    def go(self) -> None:
        self.go_file.write_text("1")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.is_file():
            assert time.monotonic() < deadline, f"the worker did not start: {self.job.worker.error_text()}"
            time.sleep(0.02)


def _widgets() -> SimpleNamespace:
    """Stand-ins for a module's button, progress bar, status label and two inputs, as the .ui file sets them."""
    return SimpleNamespace(button=SimpleNamespace(text="", enabled=False),
                           bar=SimpleNamespace(minimum=0, maximum=100, value=0, visible=True),
                           status=SimpleNamespace(text=""),
                           inputs=[SimpleNamespace(enabled=True), SimpleNamespace(enabled=True)])


def _panel(ui: SimpleNamespace, **options) -> JobPanel:
    panel = JobPanel(ui.button, ui.bar, ui.status, inputs=ui.inputs, **TEXTS, **options)
    panel.show(JobState.IDLE)
    return panel


def _poll_until(panel: JobPanel, condition=None, timeout: float = 60.0) -> None:
    """Poll as the widget's timer does until ``condition()`` holds, or (None) until the job has ended; the timeout
    guards against a hang, it is no timing check."""
    deadline = time.monotonic() + timeout
    while True:
        ended = panel.poll()
        if (condition is None and ended) or (condition is not None and condition()):
            return
        assert not ended, "the job ended before the expected state"
        assert time.monotonic() < deadline, "the expected state did not come"
        time.sleep(0.02)


def _bar(ui: SimpleNamespace) -> tuple[int, int, int]:
    return ui.bar.minimum, ui.bar.maximum, ui.bar.value


def _assert_idle(ui: SimpleNamespace, panel: JobPanel, state: JobState, status: str) -> None:
    assert panel.state == state and not panel.busy and panel.job is None
    assert (ui.button.text, ui.button.enabled) == ("Apply", True)
    assert not ui.bar.visible
    assert ui.status.text == status
    assert all(w.enabled for w in ui.inputs)


def test_an_idle_panel_offers_apply_with_the_inputs_enabled_and_no_progress_bar():
    ui = _widgets()
    _assert_idle(ui, _panel(ui), JobState.IDLE, "")


def test_a_job_runs_with_cancel_offered_shows_its_progress_and_ends_with_its_summary(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ui = _widgets()
    panel = _panel(ui)
    seen = []  # what the module's hook (its other buttons) sees after each change of state
    panel.on_change = lambda: seen.append((panel.state, ui.button.text, panel.busy))
    worker = Worker(tmp_path / "job")

    panel.start(worker.job, "Starting the worker...")
    assert panel.state == JobState.RUNNING and panel.busy and panel.job is worker.job
    assert (ui.button.text, ui.button.enabled) == ("Cancel", True)
    assert ui.bar.visible and _bar(ui) == (0, 0, 0)  # Qt's busy indicator until the first count
    assert ui.status.text == "Starting the worker..."
    assert not any(w.enabled for w in ui.inputs)
    assert seen[-1] == (JobState.RUNNING, "Cancel", True)  # the hook sees the widgets already set

    _poll_until(panel, lambda: ui.bar.value == 2 and "a line that is not a message" in caplog.text)
    assert _bar(ui) == (0, 4, 2)
    assert ui.status.text == "Registering: 2 / 4"  # a log line goes to the log, not to the status
    assert (ui.button.text, ui.button.enabled) == ("Cancel", True)

    worker.go()
    _poll_until(panel)
    assert worker.job.succeeded
    assert _bar(ui) == (0, 4, 4) and ui.status.text == "Done"
    panel.succeed("Registered in 4 steps")
    _assert_idle(ui, panel, JobState.SUCCEEDED, "Registered in 4 steps")
    assert seen[-1] == (JobState.SUCCEEDED, "Apply", False)


def test_a_cancelled_job_says_cancelling_until_it_has_ended_then_leaves_no_temporary_folder(tmp_path):
    ui = _widgets()
    panel = _panel(ui)
    worker = Worker(tmp_path / "job")
    panel.start(worker.job, "Starting the worker...")
    worker.wait_ready()  # its progress lines are out, not yet shown

    panel.request_cancel()
    assert panel.state == JobState.CANCEL_REQUESTED and panel.busy
    assert (ui.button.text, ui.button.enabled) == ("Cancelling...", False)
    assert ui.status.text == "Cancelling..." and ui.bar.visible
    assert not any(w.enabled for w in ui.inputs)

    deadline = time.monotonic() + 60
    while not worker.job.worker.finished():  # every line the worker printed is read
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert panel.poll()
    assert _bar(ui) == (0, 4, 2)  # the bar follows the messages that were on their way
    assert ui.status.text == "Cancelling..."  # the status does not
    assert (ui.button.text, ui.button.enabled) == ("Cancelling...", False)
    assert not worker.job.succeeded

    panel.finish_cancelled("Cancelled; the scene was not changed.")
    _assert_idle(ui, panel, JobState.IDLE, "Cancelled; the scene was not changed.")
    assert not worker.job.folder.exists()


def test_a_failing_worker_shows_its_error_then_ends_as_failed_with_apply_offered_again(tmp_path):
    ui = _widgets()
    panel = _panel(ui)
    worker = Worker(tmp_path / "job", ending="fail")
    panel.start(worker.job, "Starting the worker...")
    _poll_until(panel, lambda: ui.status.text == "Registering: 2 / 4")
    worker.go()
    _poll_until(panel)
    assert worker.job.error == "the moving volume is empty" and not worker.job.succeeded
    assert ui.status.text == "Error: the moving volume is empty"
    assert (ui.button.text, ui.button.enabled) == ("Cancel", True)  # still running until the widget ends it

    panel.fail(f"Failed: {worker.job.error}")
    _assert_idle(ui, panel, JobState.FAILED, "Failed: the moving volume is empty")


def test_a_job_of_several_commands_names_the_one_running_and_shows_percent_without_a_busy_start(tmp_path):
    """The training stages: one command after another, a bar kept at 0..100, a stage label."""
    ui = _widgets()
    ui.stage = SimpleNamespace(text="")
    panel = _panel(ui, stage_label=ui.stage, progress=progress_percent, start_bar=None)
    ui.bar.value = 100  # left from a run before
    script = ("from AgentRegistrationLib.contract import messages\n"
              "print(messages.encode(messages.progress_message('train', 1, 3, loss=0.5)), flush=True)\n"
              "print(messages.encode(messages.done_message()), flush=True)\n")
    job = jobs.WorkerJob([[sys.executable, "-c", script]] * 2, env=jobs.worker_environment(ENGINE_DIR)).start()

    panel.start(job, "Starting...")
    assert _bar(ui) == (0, 100, 100) and ui.bar.visible and ui.stage.text == ""
    _poll_until(panel)
    assert job.succeeded and job.stage_number == 2
    assert ui.stage.text == f"2/2: {Path(sys.executable).name}"
    assert _bar(ui) == (0, 100, 33)  # 1 of 3; the done message leaves the bar
    assert ui.status.text == "Done"
    panel.succeed("Done.")
    _assert_idle(ui, panel, JobState.SUCCEEDED, "Done.")


def test_the_percent_bar_ignores_messages_without_a_count():
    assert progress_percent({"stage": "train", "done": 150, "total": 2000}) == (0, 100, 7)
    assert progress_percent({"stage": "groundtruth", "done": 0, "total": 0}) is None
    assert progress_percent({"stage": "groundtruth", "message": "pair 3 failed"}) is None


@pytest.mark.parametrize("state", [JobState.RUNNING, JobState.CANCEL_REQUESTED])
def test_discarding_a_busy_panel_kills_its_worker_and_removes_its_folder(tmp_path, state):
    """What the widget's cleanup does when Slicer closes while a job runs."""
    ui = _widgets()
    panel = _panel(ui)
    worker = Worker(tmp_path / "job")
    panel.start(worker.job, "Starting the worker...")
    if state == JobState.CANCEL_REQUESTED:
        panel.request_cancel()
    panel.discard()
    assert worker.job.done() and not worker.job.succeeded
    assert not worker.job.folder.exists()


def test_the_panel_imports_neither_qt_nor_slicer():
    """It drives Qt widgets through their properties only, so it loads (and is tested) outside Slicer."""
    tree = ast.parse((ENGINE_DIR / "AgentRegistrationGUILib" / "job_panel.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"qt", "ctk", "PythonQt", "slicer", "vtk"}, imported
