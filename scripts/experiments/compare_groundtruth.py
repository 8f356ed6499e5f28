"""Compare two ground-truth folders of ``agentreg groundtruth`` on the pairs they share: Dice before (the crops
alone) and after each ground truth, as a markdown table (how to choose a ground-truth metric or geometry on the same
pairs; docs/groundtruth.md).

    python scripts/experiments/compare_groundtruth.py GT_A GT_B [--names A,B] [--out table.md]

Both folders must use the same model geometry, so that "before" is the same crop pair and Dice is on the same grid.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary


def read_dice(folder: Path) -> dict[tuple[str, str], tuple[float, float]]:
    """``gt_dice.csv`` of a ground-truth folder: (moving, fixed) -> (Dice before, after)."""
    with (folder / "gt_dice.csv").open(newline="") as f:
        return {(r["moving"], r["fixed"]): (float(r["dice_before"]), float(r["dice_after"])) for r in csv.DictReader(f)}


def compare(folders: list[Path], names: list[str]) -> str:
    summaries = [GroundTruthSummary.load(f) for f in folders]
    if summaries[0].geometry != summaries[1].geometry:
        raise SystemExit("the two ground truths are on different model geometries: Dice before and after would not "
                         "be of the same crops")
    dice = [read_dice(f) for f in folders]
    shared = sorted(set(dice[0]) & set(dice[1]))
    if not shared:
        raise SystemExit("the two folders share no pair")
    before = np.array([dice[0][p][0] for p in shared])
    after = [np.array([d[p][1] for p in shared]) for d in dice]
    lines = [f"{len(shared)} ordered pairs in both folders; model {summaries[0].geometry.description()}.", "",
             "| | metric | Dice median | mean | std | gain over the crops alone (median of pair differences) |",
             "| --- | --- | ---: | ---: | ---: | ---: |",
             f"| crops alone | | {np.median(before):.3f} | {before.mean():.3f} | {before.std():.3f} | |"]
    for name, summary, a in zip(names, summaries, after, strict=True):
        lines.append(f"| {name} | {summary.metric}, {summary.iterations} iterations x {summary.resolutions} "
                     f"resolutions | {np.median(a):.3f} | {a.mean():.3f} | {a.std():.3f} | "
                     f"{np.median(a - before):+.3f} |")
    wins = int(np.sum(after[1] > after[0]))
    lines += ["", f"{names[1]} is above {names[0]} on {wins} of the {len(shared)} pairs.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs=2, type=Path, help="two output folders of agentreg groundtruth")
    parser.add_argument("--names", default="A,B", help="names of the two in the table")
    parser.add_argument("--out", type=Path, help="write the table here (else: print it)")
    args = parser.parse_args(argv)
    names = args.names.split(",")
    if len(names) != 2:
        parser.error("--names: give two comma-separated names")
    text = compare(args.folders, names)
    if args.out:
        args.out.write_text(text)
    print(text, file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
