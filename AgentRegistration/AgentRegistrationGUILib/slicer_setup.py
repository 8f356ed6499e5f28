"""The setup both Slicer modules share: the Python packages the engine needs (checked, and installed in a pip
process with a progress dialog, never freezing Slicer), the Python that runs the workers, and where trained
models go. Neither module imports the other; each calls this.

Slicer-side code, outside the engine package (which imports no Qt): the dialog functions import ``qt`` and
``slicer`` when they are called, so this module also imports in plain Python. Names are snake_case, as in the
engine.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path

from AgentRegistrationLib.contract import layout

from AgentRegistrationGUILib import dependencies

REQUIREMENT_IMPORTS = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", "SimpleITK": "SimpleITK",
                       "itk-elastix": "itk", "matplotlib": "matplotlib", "tqdm": "tqdm"}
"""Requirement names (``Resources/requirements.txt``) and the module each installs."""


def user_models_folder(settings_file: str | Path) -> Path:
    """Where Agent Registration Training installs the models it trains (writable, kept across updates), for
    Slicer's user settings file (``slicer.app.slicerUserSettingsFilePath``)."""
    return Path(settings_file).parent / "AgentRegistration" / "Models"


def worker_python() -> str:
    """The Python that runs the workers and pip: PythonSlicer inside Slicer (there ``sys.executable`` is the
    application itself)."""
    return shutil.which("PythonSlicer") or sys.executable


def _gui():
    """Slicer's ``qt``, ``slicer`` and translation function ``tr``: imported when a dialog is shown (inside Slicer
    only; see the module's docstring)."""
    import qt
    import slicer
    from slicer.i18n import tr

    return qt, slicer, tr


def missing_requirements() -> list[str]:
    """Requirement names whose module cannot be imported yet."""
    importlib.invalidate_caches()  # a package pip installed meanwhile is found
    return [name for name, module in REQUIREMENT_IMPORTS.items() if importlib.util.find_spec(module) is None]


class DependencyInstall:
    """Installs the missing requirements with pip in a separate process (``dependencies.DependencyInstallJob``).

    A QTimer polls the job; a progress dialog shows pip's latest line and has a Cancel button, so Slicer never
    freezes. ``on_finished(succeeded)`` is called once the install has ended (a failure has been shown to the user).
    """

    active: DependencyInstall | None = None  # at most one install at a time

    def __init__(self, requester: str, requirements: list[str], on_finished=None) -> None:
        self.requester = requester
        self.on_finished = on_finished
        qt, slicer, _ = _gui()
        # PythonSlicer, as slicer.util.pip_install uses: inside Slicer sys.executable is the application itself
        command = dependencies.dependency_install_command(worker_python(), requirements)
        logging.info("Installing Python packages: %s", " ".join(command))
        self.job = dependencies.DependencyInstallJob(command, requirements).start()
        self.dialog = qt.QProgressDialog(
            _("Installing {packages}...").format(packages=", ".join(requirements)), _("Cancel"), 0, 0,
            slicer.util.mainWindow())
        self.dialog.windowTitle = _("{requester}: installing Python packages").format(requester=requester)
        self.dialog.minimumDuration = 0
        self.dialog.minimumWidth = 600
        self.dialog.canceled.connect(self.cancel)
        self.dialog.show()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.timeout.connect(self.on_timer)
        self.timer.start()
        DependencyInstall.active = self

    def cancel(self) -> None:
        _ = _gui()[2]
        if not self.job.done():
            self.dialog.setLabelText(_("Cancelling..."))
            self.job.cancel()

    def on_timer(self) -> None:
        _qt, slicer, _ = _gui()
        for line in self.job.poll():
            logging.info("pip: %s", line)
        if self.job.latest_line and not self.job.cancelled:
            self.dialog.setLabelText(self.job.latest_line[:120])
        if not self.job.done():
            return
        self.timer.stop()
        self.dialog.hide()
        self.dialog.deleteLater()
        DependencyInstall.active = None
        succeeded = self.job.succeeded and not missing_requirements()
        if not succeeded and not self.job.cancelled:
            error = self.job.error or _("pip finished but these packages still cannot be imported: {packages}. "
                                        "Restart Slicer and try again.").format(packages=", ".join(missing_requirements()))
            slicer.util.errorDisplay(_("{requester} could not install its Python packages.").format(
                requester=self.requester), detailedText=error)
        if self.on_finished is not None:
            self.on_finished(succeeded)


def start_dependency_install(requester: str, on_finished=None) -> DependencyInstall | None:
    """Ask the user, then install the missing requirements without blocking Slicer.

    Torch comes from the PyTorch extension (PyTorchUtils, which picks the CUDA build and has its own UI) when
    available; everything else from ``Resources/requirements.txt`` through a :class:`DependencyInstall`.
    Returns the running install, or None when nothing is left to install or the user declined (``on_finished``
    is then called at once with whether everything is installed).
    """
    _qt, slicer, _ = _gui()

    def finish(succeeded: bool) -> None:
        if on_finished is not None:
            on_finished(succeeded)

    if DependencyInstall.active is not None:  # already installing: show that one
        DependencyInstall.active.dialog.show()
        DependencyInstall.active.dialog.activateWindow()
        return None
    missing = missing_requirements()
    if not missing:
        finish(True)
        return None
    if not slicer.util.confirmOkCancelDisplay(
            _("{requester} needs these Python packages, which are not installed yet:\n{packages}\n\n"
              "Install them now? This is needed once and can take several minutes "
              "(PyTorch is a large download). Slicer stays usable meanwhile.").format(
                requester=requester, packages=", ".join(missing))):
        finish(False)
        return None
    if "torch" in missing:
        try:
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                raise ImportError("PyTorchUtils did not install torch")
            missing.remove("torch")
        except ImportError:
            logging.info("PyTorch extension not available; torch is installed with pip (CPU build on some systems)")
        except Exception as error:
            logging.warning("PyTorch extension failed to install torch (%s); trying pip", error)
    if not missing:
        finish(not missing_requirements())
        return None
    # Resources/ beside the folder that holds the engine package (installed), or one level up (source tree)
    requirements_file = layout.resource_file(Path(__file__).resolve().parent, "requirements.txt")
    requirements = dependencies.read_requirements(requirements_file, missing) if requirements_file is not None else []
    return DependencyInstall(requester, requirements or missing, finish)


def dependencies_ready(requester: str, then=None) -> bool:
    """True when every requirement is installed; otherwise start installing them (asking first, never blocking)
    and return False: ``then()`` is called once the install has succeeded (e.g. to start what needed them)."""
    if not missing_requirements():
        return True
    start_dependency_install(requester, lambda succeeded: succeeded and then is not None and then())
    return False


def ensure_dependencies(requester: str) -> bool:
    """Install the engine's requirements on first use and wait for it (for scripts and the self-test).

    The install runs in a separate pip process; Slicer keeps processing events while it waits. The GUI uses
    :func:`dependencies_ready`, which does not wait. A failed install says what to do.
    """
    slicer = _gui()[1]
    outcome: list[bool] = []
    install = start_dependency_install(requester, outcome.append)
    while install is not None and not outcome:
        slicer.app.processEvents()
        time.sleep(0.05)
    return bool(outcome and outcome[0]) and not missing_requirements()
