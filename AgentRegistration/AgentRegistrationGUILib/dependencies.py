"""Installing the engine's Python packages with pip in a separate process (Slicer's own Python), so Slicer stays
responsive. Standard library only."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from AgentRegistrationLib.contract.messages import STAGE_LOG

from AgentRegistrationGUILib.jobs import WorkerProcess

# ====================================================================================== dependencies
# The modules install the engine's Python packages with pip in a separate process (Slicer's own Python),
# so Slicer stays responsive: the GUI polls a DependencyInstallJob from a timer and shows pip's latest line.

DEPENDENCY_ADVICE = ("Check the internet connection and try again, or run this command in Slicer's Python "
                     "console (View > Python Console):\n{console}\n"
                     "PyTorch can also be installed with the PyTorch extension (Extensions Manager).")
"""What a failed install tells the user; ``{console}`` is the pip call to type into the console."""


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement line (``"SimpleITK>=2.3"`` -> ``"SimpleITK"``); "" for none."""
    text = requirement.split("#", 1)[0].strip()
    name = ""
    for char in text:
        if not (char.isalnum() or char in "._-"):
            break
        name += char
    return name


def read_requirements(path: str | Path, names: Sequence[str] | None = None) -> list[str]:
    """The requirement lines of a requirements file (comments and options dropped), only those of ``names``
    (compared case-insensitively, ``_`` = ``-``) when given."""
    def key(name: str) -> str:
        return name.lower().replace("_", "-")

    wanted = None if names is None else {key(n) for n in names}
    lines = []
    for line in Path(path).read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        name = requirement_name(text)
        if name and (wanted is None or key(name) in wanted):
            lines.append(text)
    return lines


def dependency_install_command(python: str, requirements: Sequence[str], extra_args: Sequence[str] = ()) -> list[str]:
    """``python -m pip install [extra_args] REQUIREMENT...``; ``requirements`` are requirement specifiers
    (e.g. from :func:`read_requirements`) or package names."""
    if not requirements:
        raise ValueError("no packages to install")
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", *extra_args, *requirements]


def pip_console_call(requirements: Sequence[str]) -> str:
    """The same install as one call for Slicer's Python console."""
    return "slicer.util.pip_install({!r})".format(" ".join(requirements))


class DependencyInstallJob:
    """A pip install in a separate process whose plain-text output lines are the progress text.

    The GUI calls :meth:`poll` from a timer (it never blocks) and shows :attr:`latest_line`; :meth:`cancel`
    kills pip. When :meth:`done`, :attr:`succeeded` says whether pip exited with status 0; otherwise
    :attr:`error` says what failed (pip's last lines) and what to do (:data:`DEPENDENCY_ADVICE`).
    """

    def __init__(self, command: Sequence[str], requirements: Sequence[str] = (), env: dict[str, str] | None = None,
                 keep_lines: int = 20):
        self.command = [str(c) for c in command]
        self.requirements = list(requirements)
        environment = dict(os.environ if env is None else env)
        environment["PYTHONUNBUFFERED"] = "1"
        self.worker = WorkerProcess(self.command, env=environment)
        self.keep_lines = keep_lines
        self.last_lines: list[str] = []  # pip's last lines (stdout and stderr), for the error message
        self.latest_line = ""
        self.cancelled = False
        self.error = ""
        self._stderr_seen = 0
        self._ended = False

    def start(self) -> DependencyInstallJob:
        self.worker.start()
        return self

    def _keep(self, lines: list[str]) -> None:
        lines = [line.strip() for line in lines if line.strip()]
        if lines:
            self.last_lines = (self.last_lines + lines)[-self.keep_lines:]
            self.latest_line = lines[-1]

    def poll(self) -> list[str]:
        """pip's lines since the last call; records the outcome once pip has ended."""
        finished = self.worker.finished()  # before draining: then every line is already queued
        lines = [str(m.get("message", m)) if m.get("stage") == STAGE_LOG else json.dumps(m)
                 for m in self.worker.messages()]
        stderr = self.worker.stderr_lines[self._stderr_seen:]
        self._stderr_seen += len(stderr)
        lines += stderr
        self._keep(lines)
        if finished and not self._ended:
            self._ended = True
            if self.cancelled:
                self.error = "The installation was cancelled."
            elif self.worker.returncode != 0:
                self.error = self.failure_text(self.worker.returncode)
        return lines

    def failure_text(self, returncode: int | None) -> str:
        """Why the install failed and what to do, with the pip command and pip's last lines."""
        packages = " ".join(self.requirements) or "the packages"
        text = (f"Installing {packages} failed (pip exited with status {returncode}).\n"
                + DEPENDENCY_ADVICE.format(console=pip_console_call(self.requirements) if self.requirements else "")
                + "\nThe command that failed:\n" + subprocess.list2cmdline(self.command))
        if self.last_lines:
            text += "\n\npip's last lines:\n" + "\n".join(self.last_lines)
        return text

    def done(self) -> bool:
        """True once pip has ended (succeeded, failed or cancelled) and its output has been read."""
        return self._ended

    @property
    def succeeded(self) -> bool:
        return self._ended and not self.cancelled and not self.error

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[str]:
        """Poll until done (for scripts and tests); returns every line. ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lines: list[str] = []
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the installation did not end within {timeout} s")
            lines += self.poll()
            time.sleep(interval)
        return lines

    def cancel(self) -> None:
        """Kill pip (and what it started); the next :meth:`poll` ends the job as cancelled."""
        self.cancelled = True
        self.worker.cancel()
