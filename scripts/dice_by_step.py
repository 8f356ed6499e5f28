"""Median Dice of the agent after each MDP step (0-200) on the validation pairs, for one or more models: does the
agent stay on the answer, or drift after it?

The pairs are those ``agentreg evaluate`` prepared in its output folder (the same crops every method of the
evaluation starts from, on the fixed image's model grid); the agent runs 200 steps with the bundle's settings
(fuzzy action control, exploration, seed 0), once with its stop rule as the bundle sets it and once without any
stop, and its trajectory records the Dice of the warped moving mask after every step.

    python scripts/dice_by_step.py --evaluation OUT --model A.pt [--model B.pt] --out results/dice_by_step_2d
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from AgentRegistrationLib.bundle import load_bundle
from AgentRegistrationLib.evaluation import prepared_pairs

STEPS = 200
SHOWN = (0, 10, 25, 50, 100, 150, 200)


def dice_by_step(model: Path, evaluation: Path, stop_rule: bool | None) -> tuple[np.ndarray, int]:
    """``(STEPS + 1, pairs)`` Dice after each step (row 0: the start), and the number of pairs."""
    bundle = load_bundle(model)
    pairs = [pair for _, pair in prepared_pairs(evaluation, bundle.geometry)]
    if not pairs:
        raise SystemExit(f"no prepared pairs for {model}'s geometry in {evaluation}: run agentreg evaluate first")
    stack = lambda key: torch.as_tensor(np.stack([p[key] for p in pairs]))[:, None]  # noqa: E731
    settings = bundle.agent_settings(steps=STEPS, seed=0)
    if stop_rule is not None:
        settings.stop_when_no_action_helps = stop_rule
    agent = bundle.agent("cpu")
    result = agent.run(stack("fixed"), stack("moving"), settings, stack("moving_label"), stack("fixed_label"))
    start = agent.start_dice(stack("moving_label"), stack("fixed_label"))
    curve = torch.cat([start[None], torch.stack(result.trajectory.dice)]).numpy()
    if len(curve) < STEPS + 1:  # every pair stopped: the rest of the curve stays where it is
        curve = np.concatenate([curve, np.repeat(curve[-1:], STEPS + 1 - len(curve), axis=0)])
    return curve, len(pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evaluation", required=True, help="output folder of agentreg evaluate (its prepared pairs)")
    p.add_argument("--model", action="append", required=True, help="model bundle (repeatable)")
    p.add_argument("--out", required=True, help="output stem: writes STEM.md and STEM.png")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Median Dice after each agent step on the validation pairs", "",
             f"Made by `python scripts/dice_by_step.py {shlex.join(argv if argv is not None else sys.argv[1:])}`. "
             "Pairs prepared by `agentreg evaluate` (the crops every method starts from); seed 0, the bundle's fuzzy "
             "action control and exploration; 'stop rule' = the bundle's own setting (a pair stops once no action is "
             "predicted to help by more than the model's stop margin), 'no stop' = all 200 steps; both capped at 200 "
             "steps, whatever the model's default cap.", "",
             "| model | run | pairs | " + " | ".join(f"step {s}" for s in SHOWN) + " | best step (median) | at 200 - best |",
             "|---|---|---|" + "---|" * (len(SHOWN) + 2)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in args.model:
        bundle = load_bundle(model)
        defaults = bundle.agent_settings()
        runs = [("no stop", False)] + ([(f"stop rule, margin {defaults.stop_margin:g}", True)]
                                       if defaults.stop_when_no_action_helps else [])
        for name, rule in runs:
            curve, n = dice_by_step(Path(model), Path(args.evaluation), rule)
            median = np.median(curve, axis=1)
            best = int(np.argmax(median))
            lines.append(f"| `{Path(model).name}` | {name} | {n} | " + " | ".join(f"{median[s]:.3f}" for s in SHOWN)
                         + f" | {best} ({median[best]:.3f}) | {median[STEPS] - median[best]:+.3f} |")
            ax.plot(np.arange(STEPS + 1), median, label=f"{Path(model).stem}, {name}")
    ax.set_xlabel("agent step")
    ax.set_ylabel(f"median Dice ({n} validation pairs)")
    ax.set_xlim(0, STEPS)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    lines += ["", f"![median Dice by step]({out.with_suffix('.png').name})", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
