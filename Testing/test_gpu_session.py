"""``scripts/recipes/gpu_session.py``: the committed paper-vs-compact table is what its ``report`` command makes
from the committed files of the GPU session (``results/gpu_session``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/recipes/gpu_session.py"
# the committed table was made before the script moved from scripts/ to scripts/recipes/: its text names the old path
MADE_BEFORE_THE_MOVE = "scripts/gpu_session.py"


def test_committed_paper_vs_compact_table_is_made_by_the_report_command(tmp_path):
    out = tmp_path / "paper_vs_compact.md"
    subprocess.run([sys.executable, SCRIPT, "report", "--returned", "results/gpu_session", "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True)
    made = [line.replace(SCRIPT, MADE_BEFORE_THE_MOVE) for line in out.read_text().splitlines()
            if not line.startswith("Made by")]
    committed = [line for line in (REPO / "results" / "paper_vs_compact.md").read_text().splitlines()
                 if not line.startswith("Made by")]
    assert made == committed
    rows = [line for line in made if line.startswith("| paper-") or line.startswith("| compact-")]
    assert len(rows) == 4 and not any("failed" in row for row in rows)
