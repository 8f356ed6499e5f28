"""Median Dice of the agent after each MDP step (0-200) on the validation pairs, for one or more models: does the
agent stay on the answer, or drift after it?

The pairs are those ``agentreg evaluate`` prepared in its output folder (the same crops every method of the
evaluation starts from, on the fixed image's model grid); the agent runs 200 steps with the bundle's settings
(fuzzy action control, exploration, seed 0), once with its stop rule as the bundle sets it and once without any
stop, and its trajectory records the Dice of the warped moving mask after every step.

    python scripts/experiments/dice_by_step.py --evaluation OUT --model A.pt [--model B.pt] --out results/dice_by_step_2d
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from AgentRegistrationLib.core.agent import dice_by_margin, stop_steps
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.stages.evaluation_pairs import prepared_pairs

STEPS = 200
SHOWN = (0, 10, 25, 50, 100, 150, 200)


def dice_by_step(model: Path, evaluation: Path, stop_rule: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """``(STEPS + 1, pairs)`` Dice after each step (row 0: the start), and the ``(steps, pairs)`` best allowed
    Q-values before each step (what the stop rule compares with its margin)."""
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
    return curve, result.trajectory.best_allowed_q().numpy()


def margin_rows(name: str, curve: np.ndarray, best_q: np.ndarray, cap: int) -> list[str]:
    """Table rows from one run without a stop: each pair at its own best step (what no stop rule can beat), and
    where the stop rule with each margin of ``agent.STOP_MARGINS`` would have stopped it, under the model's cap."""
    cell = lambda values: f"{np.median(values):.3f} / {np.mean(values):.3f}"  # noqa: E731
    rows = [f"| `{name}` | the crops alone (step 0) | {cell(curve[0])} | 0 |",
            f"| `{name}` | each pair at its own best step | {cell(curve.max(axis=0))} | "
            f"{np.median(curve.argmax(axis=0)):.0f} |"]
    for margin, values in dice_by_margin(best_q, curve, cap).items():
        rows.append(f"| `{name}` | stop rule, margin {margin:g}, at most {cap} steps | {cell(values)} | "
                    f"{np.median(stop_steps(best_q, margin, cap)):.0f} |")
    return rows


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
             f"Made by `python scripts/experiments/dice_by_step.py {shlex.join(argv if argv is not None else sys.argv[1:])}`. "
             "Pairs prepared by `agentreg evaluate` (the crops every method starts from); seed 0, the bundle's fuzzy "
             "action control and exploration; 'stop rule' = the bundle's own setting (a pair stops once no action is "
             "predicted to help by more than the model's stop margin), 'no stop' = all 200 steps; both capped at 200 "
             "steps, whatever the model's default cap.", "",
             "| model | run | pairs | " + " | ".join(f"step {s}" for s in SHOWN) + " | best step (median) | at 200 - best |",
             "|---|---|---|" + "---|" * (len(SHOWN) + 2)]
    margins = ["", "What any stop rule could make of the run without a stop (Dice median / mean over the pairs; a pair "
               "stopped by a margin keeps the Dice of its stopping step). The models' margins are chosen on pairs of "
               "training subjects; these rows are measured on the validation pairs, to understand them, not to "
               "choose.", "", "| model | where each pair ends | Dice median / mean | steps (median) |",
               "|---|---|---:|---:|"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in args.model:
        bundle = load_bundle(model)
        defaults = bundle.agent_settings()
        runs = [("no stop", False)] + ([(f"stop rule, margin {defaults.stop_margin:g}", True)]
                                       if defaults.stop_when_no_action_helps else [])
        for name, rule in runs:
            curve, best_q = dice_by_step(Path(model), Path(args.evaluation), rule)
            n = curve.shape[1]
            if not rule:
                margins += margin_rows(Path(model).name, curve, best_q, min(defaults.steps, STEPS))
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
    lines += ["", f"![median Dice by step]({out.with_suffix('.png').name})", *margins, ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
