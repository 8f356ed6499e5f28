"""Worker jobs of the Slicer modules: start an ``agentreg`` worker process, drain its messages without blocking,
cancel it (process tree), remove its temporary folder; several commands in a row (the training stages).
Standard library only, so it imports before the engine's dependencies are installed."""

from __future__ import annotations

import enum
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from AgentRegistrationLib.contract.messages import STAGE_DONE, STAGE_ERROR, parse_progress_line


class JobState(enum.Enum):
    """State of a worker job; it drives the Apply/Cancel button and the progress bar of both modules."""

    IDLE = "idle"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel requested"
    FAILED = "failed"
    SUCCEEDED = "succeeded"


def worker_environment(module_dir: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the worker: ``module_dir`` (holding ``AgentRegistrationLib``) first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    paths = [str(module_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """A worker process whose stdout lines are parsed into messages by a reader thread.

    The GUI polls :meth:`messages` from a timer, so Slicer never blocks on the pipe.
    :meth:`cancel` kills the worker and everything it started (its process group).
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None):
        self.command = command
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the process and its reader threads."""
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1, env=self.env,
                                        cwd=self.cwd, **kwargs)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.strip():
                self._queue.put(parse_progress_line(line))
        self.process.stdout.close()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
        self.process.stderr.close()

    def messages(self) -> list[dict[str, Any]]:
        """Messages that arrived since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.poll() is None

    def finished(self) -> bool:
        """True once the process has exited and its output has been read completely."""
        return (self.process is not None and self.process.poll() is not None
                and not any(t.is_alive() for t in self._threads))

    @property
    def returncode(self) -> int | None:
        """Exit status, None while running."""
        return None if self.process is None else self.process.poll()

    def error_text(self, last_lines: int = 20) -> str:
        """The last lines the worker wrote to stderr, for an error message."""
        return "\n".join(self.stderr_lines[-last_lines:])

    def cancel(self, timeout: float = 5.0) -> None:
        """Kill the worker and the processes it started, then wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=timeout)


class WorkerJob:
    """One or more worker commands run one after another, with the temporary folder they use.

    The GUI calls :meth:`poll` from a timer: it returns the messages that arrived, starts the next
    command when one has succeeded, and records the first failure (an error message of the worker,
    else its stderr, else its exit status) in :attr:`error`. :meth:`cancel` kills the running worker;
    :meth:`cleanup` removes ``folder`` unless ``keep_folder``.
    """

    def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str] | None = None,
                 folder: str | Path | None = None, keep_folder: bool = False):
        if not commands:
            raise ValueError("a worker job needs at least one command")
        self.commands = [list(c) for c in commands]
        self.env = env
        self.folder = Path(folder) if folder is not None else None
        self.keep_folder = keep_folder
        self.stage_number = 0  # 1-based number of the command running (0: none started)
        self.worker: WorkerProcess | None = None
        self.error = ""
        self.cancelled = False
        self.last_done: dict[str, Any] | None = None

    def start(self) -> WorkerJob:
        self._start_next()
        return self

    def stage_text(self) -> str:
        """``"2/4: sdm"``: the number of the command running, of how many, and its engine subcommand."""
        command = self.commands[max(self.stage_number, 1) - 1]
        name = command[command.index("-m") + 2] if "-m" in command else Path(command[0]).name
        return f"{self.stage_number}/{len(self.commands)}: {name}"

    def _start_next(self) -> None:
        self.worker = WorkerProcess(self.commands[self.stage_number], env=self.env)
        self.worker.start()
        self.stage_number += 1

    def poll(self) -> list[dict[str, Any]]:
        """Messages since the last call; advances to the next command and records failures."""
        if self.worker is None:
            return []
        finished = self.worker.finished()  # before draining: then every line is already queued
        messages = self.worker.messages()
        for message in messages:
            if message.get("stage") == STAGE_ERROR and not self.error:
                self.error = str(message.get("message", ""))
            elif message.get("stage") == STAGE_DONE:
                self.last_done = message
        if finished and not self.cancelled and not self.error:
            if self.worker.returncode != 0:
                self.error = self.worker.error_text() or f"the worker exited with status {self.worker.returncode}"
            elif self.stage_number < len(self.commands):
                self._start_next()
        return messages

    def done(self) -> bool:
        """True when the job has ended: all commands succeeded, one failed, or it was cancelled."""
        if self.worker is None:
            return False
        if self.cancelled or self.error:
            return self.worker.finished() or not self.worker.is_running()
        return self.stage_number == len(self.commands) and self.worker.finished()

    @property
    def succeeded(self) -> bool:
        return self.done() and not self.cancelled and not self.error and self.worker.returncode == 0

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict[str, Any]]:
        """Poll until done (for scripts and tests); returns every message. ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        messages = []
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"worker job did not end within {timeout} s")
            messages += self.poll()
            time.sleep(interval)
        return messages + self.poll()

    def cancel(self) -> None:
        self.cancelled = True
        if self.worker is not None:
            self.worker.cancel()

    def cleanup(self) -> None:
        """Remove the job's temporary folder unless it is to be kept."""
        if self.folder is not None and not self.keep_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
