"""Dice of the agent after each MDP step on real pairs of TRAINING subjects, and the step count that is best
on them: a choice of the number of steps that does not look at the validation subjects.

The pairs are random ordered pairs of the training subjects as ``agentreg groundtruth`` prepared them (each on
its own prostate's box for a model that crops on the organ, else on the template's model grid after its
translation pre-alignment); the agent runs 200 steps with the bundle's settings (without its stop rule, so that
the curve covers every step) and its trajectory records the Dice of the warped moving mask after every step.

    python scripts/experiments/steps_on_training_pairs.py [--pairs-2d 72] [--pairs-3d 24]
                                                          [--out results/steps_on_training_pairs.md] [--apply]

``--apply`` writes the best step count into the shipped bundles as their default number of steps (what
``agentreg register``, ``demo``, ``evaluate`` and the Slicer module use unless told otherwise). The curves are
measured with 200 steps (the paper's number), so a rerun gives the same choice.

``agentreg train --step-pairs N`` (``stages.training_finish.choose_steps``) makes the same choice for a new model: the same
rule (the best mean Dice over 1 to 200 steps, then the stop margin with ``choose_stop_margin``), but on pairs drawn
from the ground truth's pairs rather than from all ordered pairs of the training subjects, and it keeps only the
mean by step. This script stays for what it alone gives: the shipped 2-D model's choice (66 steps, margin 4,
``results/steps_on_training_pairs_organ.md``) reproduced on the same draw, and the median / mean and per-margin
tables of that report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from AgentRegistrationLib.core.agent import STOP_MARGINS, choose_stop_margin, dice_by_margin, stop_steps
from AgentRegistrationLib.model.bundle import load_bundle

REPO = Path(__file__).resolve().parents[2]
SHOWN_STEPS = (1, 10, 25, 50, 75, 100, 150, 200)


def dice_curve(model: Path, gt: Path, train_names: list[str], count: int, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                             list]:
    """``(1 + steps, pairs)`` Dice at the start and after each step, ``(steps, pairs)`` the best allowed Q-value
    before each step (for the stop rule's margin), and the pairs (moving, fixed)."""
    bundle = load_bundle(model)
    names = sorted(n for n in train_names if (gt / "subjects" / f"{n}.npz").is_file())
    subjects = {n: dict(np.load(gt / "subjects" / f"{n}.npz")) for n in names}
    pairs = [(m, f) for m in names for f in names if m != f]
    chosen = [pairs[i] for i in np.random.default_rng(seed).choice(len(pairs), count, replace=False)]
    stack = lambda key, side: torch.as_tensor(np.stack([subjects[p[side]][key] for p in chosen]))[:, None]  # noqa: E731
    settings = bundle.agent_settings(steps=200, seed=0, stop_when_no_action_helps=False)
    agent = bundle.agent("cpu")
    result = agent.run(stack("image", 1), stack("image", 0), settings, stack("label", 0), stack("label", 1))
    start = agent.start_dice(stack("label", 0), stack("label", 1))
    dice = torch.cat([start[None], torch.stack(result.trajectory.dice)]).numpy()  # (1 + steps, pairs), row 0: start
    return dice, result.trajectory.best_allowed_q().numpy(), chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="work", help="folder with gt2d/ and gt3d/ of the ground-truth pipeline")
    p.add_argument("--pairs-2d", type=int, default=72)
    p.add_argument("--pairs-3d", type=int, default=24)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="results/steps_on_training_pairs.md")
    p.add_argument("--apply", action="store_true", help="make the best step count the shipped bundles' default")
    p.add_argument("--dims", default="2,3", help="which shipped models: 2, 3 or 2,3 (default)")
    args = p.parse_args(argv)
    train_names = json.loads((REPO / "Resources" / "promise12_split.json").read_text())["train"]
    lines = ["# Dice after each agent step on pairs of training subjects", "",
             f"Made by `python scripts/experiments/steps_on_training_pairs.py --pairs-2d {args.pairs_2d} "
             f"--pairs-3d {args.pairs_3d} "
             f"--seed {args.seed} --dims {args.dims} --work {args.work}` with the shipped models (seed 0, fuzzy action "
             "control, 200 steps, no stop rule). Random ordered pairs of the training subjects as the ground-truth "
             "pipeline prepared them (each on its own prostate's box for a model that crops on the organ); "
             "Dice of the warped moving mask on the model grid. "
             "`--apply` made the best step count each shipped model's default.", "",
             "| model | pairs | " + " | ".join(f"step {s}" for s in SHOWN_STEPS) + " | best step (mean Dice) |",
             "| --- | ---: | " + " | ".join("---:" for _ in SHOWN_STEPS) + " | ---: |"]
    dims = [int(d) for d in args.dims.split(",")]
    margins: list[str] = []
    for dim, count in [(d, c) for d, c in ((2, args.pairs_2d), (3, args.pairs_3d)) if d in dims]:
        model = REPO / "Resources" / "Models" / f"prostate-{dim}d.pt"
        gt = Path(args.work) / f"gt{dim}d"
        if not (gt / "subjects").is_dir():
            sys.exit(f"steps_on_training_pairs: {gt}/subjects not found: run scripts/recipes/groundtruth_promise12.sh first")
        curve, best_q, _ = dice_curve(model, gt, train_names, count, args.seed)
        dice = curve[1:]
        mean, median = dice.mean(axis=1), np.median(dice, axis=1)
        best = int(mean.argmax())
        cells = " | ".join(f"{median[s - 1]:.3f} / {mean[s - 1]:.3f}" for s in SHOWN_STEPS)
        lines.append(f"| prostate-{dim}d | {count} | {cells} | {best + 1} ({mean[best]:.3f}) |")
        margin = choose_stop_margin(best_q, curve, len(best_q))
        by_margin = dice_by_margin(best_q, curve, len(best_q))
        stops = {m: np.median(stop_steps(best_q, m, len(best_q))) for m in STOP_MARGINS}
        margins.append(f"| prostate-{dim}d | {count} | "
                       + " | ".join(f"{np.median(d):.3f} / {d.mean():.3f} ({stops[m]:.0f})" for m, d in by_margin.items())
                       + f" | {margin:g} |")
        if args.apply:
            bundle = load_bundle(model)
            bundle.agent_defaults["steps"] = best + 1
            bundle.agent_defaults["steps_chosen_by"] = (
                f"the best mean Dice on {count} pairs of training subjects, scripts/experiments/steps_on_training_pairs.py; "
                "the paper used 200")
            if bundle.agent_defaults.get("stop_when_no_action_helps"):
                bundle.agent_defaults["stop_margin"] = margin
                bundle.agent_defaults["stop_margin_chosen_by"] = (
                    f"the best mean Dice at 200 steps on the same {count} pairs of training subjects, "
                    "scripts/experiments/steps_on_training_pairs.py")
            bundle.save(model)
    lines += ["", "Cells: median / mean Dice after that many steps.", "",
              "## The stop rule's margin", "",
              "With the stop rule a pair stops once no allowed action's Q-value is above the margin (0: no action is "
              "predicted to help at all). Each margin is measured on the same runs (a run with the rule is the run "
              "without it up to its stop), with the paper's 200 steps as the cap; the chosen margin has the best mean "
              "Dice (ties: the smaller). Q-values of the `converge` models are in units of each mode's step "
              "squared: a move one step towards an answer `n` steps away gains `2n - 1`.", "",
              "| model | pairs | " + " | ".join(f"margin {m:g}" for m in STOP_MARGINS) + " | chosen |",
              "| --- | ---: | " + " | ".join("---:" for _ in STOP_MARGINS) + " | ---: |", *margins, "",
              "Cells: median / mean Dice where the pairs stop (median stop step).", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
