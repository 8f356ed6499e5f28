"""Render the README's pictures from the real product: ``agentreg register`` on the sample pair that the Slicer
module's "Load sample data" loads (``contract/layout.SAMPLE_DATA``: case17 moving onto case13 fixed, with both
segmentations), with the shipped 3-D model, the model's own settings, on the CPU. Copies the register folder's

- ``qa.png`` (the fixed volume with the propagated segmentation's outline in three orthogonal slices, and a
  checkerboard) to ``Resources/Screenshots/first_registration.png``,
- ``trajectory.png`` (the agent's Dice and parameters at every step) to ``Resources/Screenshots/trajectory.png``,

and prints the run's summary line. Rerun it whenever the figures, the model or the sample data change:

    .venv/bin/python scripts/render_pictures.py [--out Resources/Screenshots] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from AgentRegistrationLib.cli import main as agentreg
from AgentRegistrationLib.contract import layout, register_folder

REPO = Path(__file__).resolve().parents[1]

PICTURES = {register_folder.QA_PNG: "first_registration.png", register_folder.TRAJECTORY_PNG: "trajectory.png"}
"""Register folder file -> README picture."""


def render(out: Path, keep: Path | None = None) -> list[Path]:
    """Register the sample pair and copy its pictures into ``out``; the register folder goes to ``keep`` (else a
    temporary folder, removed)."""
    sample = layout.sample_data_files(REPO / "AgentRegistration" / "AgentRegistration.py")
    model = REPO / "Resources" / "Models" / "prostate-3d.pt"
    if not model.is_file():
        raise FileNotFoundError(f"the shipped 3-D model is missing: {model}")
    work = Path(tempfile.mkdtemp(prefix="render-pictures-")) if keep is None else Path(keep)
    try:
        folder = work / "first_registration"
        code = agentreg(["register", "--fixed", str(sample["fixed"]), "--moving", str(sample["moving"]),
                         "--fixed-label", str(sample["fixed_label"]), "--moving-label", str(sample["moving_label"]),
                         "--model", str(model), "--output-dir", str(folder), "--device", "cpu"])
        if code != 0:
            raise RuntimeError(f"agentreg register failed (exit {code})")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, picture in PICTURES.items():
            shutil.copyfile(folder / name, out / picture)
            written.append(out / picture)
        return written
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots",
                        help="folder of the pictures (default: Resources/Screenshots)")
    parser.add_argument("--keep", type=Path, help="keep the register folder here (default: a temporary folder)")
    args = parser.parse_args(argv)
    for path in render(args.out, args.keep):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
