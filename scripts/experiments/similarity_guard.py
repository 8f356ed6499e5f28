"""Which similarity should decide whether the agent's end is kept (the similarity guard, ``AgentSettings``)?

On the validation pairs that ``agentreg evaluate`` prepared in its output folder (the crops every method starts from),
the agent runs once with the model's settings and no guard; then each rule below decides, per pair, between the start
(the crops alone) and the agent's end, and the table gives the Dice that results. Also how well each similarity's
gain tells the Dice's gain (their correlation over the pairs).

    python scripts/experiments/similarity_guard.py --evaluation /work/cache/eval3d --model Resources/Models/prostate-3d.pt \\
        --out results/similarity_guard_3d.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from AgentRegistrationLib.core.metrics import dice_batch
from AgentRegistrationLib.core.warp import warp
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.stages.evaluation_pairs import prepared_pairs


def weighted_correlation(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(B,)`` Pearson correlation of ``a`` and ``b`` ``(B, 1, *spatial)`` under ``weight`` ``(1, 1, *spatial)``."""
    dims = tuple(range(1, a.dim()))
    total = weight.sum()
    a = (a - (a * weight).sum(dims, keepdim=True) / total) * weight
    b = (b - (b * weight).sum(dims, keepdim=True) / total) * weight
    return (a * b).sum(dims) / ((a * a).sum(dims) * (b * b).sum(dims)).sqrt()


def middle(shape: tuple[int, ...], fraction: float) -> torch.Tensor:
    """1 on the middle ``fraction`` of the crop along each axis (as ``agent.ORGAN_REGION``), 0 elsewhere."""
    weight = torch.zeros(shape)
    weight[tuple(slice(int(n * (1 - fraction) / 2), int(n * (1 + fraction) / 2) + 1) for n in shape)] = 1.0
    return weight[None, None]


def gaussian(shape: tuple[int, ...]) -> torch.Tensor:
    """A Gaussian weight on the crop's centre, standard deviation a sixth of the crop along each axis."""
    weight = torch.ones(shape)
    for axis, n in enumerate(shape):
        x = torch.arange(n, dtype=torch.float32)
        weight = weight * torch.exp(-0.5 * ((x - (n - 1) / 2) / (n / 6)) ** 2).view(
            *[n if i == axis else 1 for i in range(len(shape))])
    return weight[None, None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evaluation", type=Path, required=True, help="an agentreg evaluate output folder")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="markdown report")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    bundle = load_bundle(args.model)
    pairs = [pair for _, pair in prepared_pairs(args.evaluation, bundle.geometry)]
    if not pairs:
        raise SystemExit(f"no prepared pairs for {args.model}'s geometry in {args.evaluation}: run agentreg evaluate")
    stack = lambda key: torch.as_tensor(np.stack([q[key] for q in pairs]))[:, None].float()  # noqa: E731
    fixed, moving, fixed_label, moving_label = (stack(k) for k in ("fixed", "moving", "fixed_label", "moving_label"))
    agent = bundle.agent("cpu")
    result = agent.run(fixed, moving, bundle.agent_settings(similarity_guard=False), moving_label, fixed_label)
    thetas = [agent.theta_start.expand(len(pairs), -1), *result.trajectory.theta]
    with torch.no_grad():
        u_start = agent.displacement(thetas[0])
        u_end = result.displacement
        start, end = warp(moving, u_start), warp(moving, u_end)
        dice_start = dice_batch(warp(moving_label, u_start, mode="nearest"), fixed_label).numpy()
        dice_end = dice_batch(warp(moving_label, u_end, mode="nearest"), fixed_label).numpy()
        shape = tuple(fixed.shape[2:])
        rules = {"whole crop": torch.ones(1, 1, *shape), "middle 60 % of the crop (shipped)": middle(shape, 0.6),
                 "middle 40 %": middle(shape, 0.4), "Gaussian weight, sd a sixth of the crop": gaussian(shape)}
        rows = [("no guard (the agent's end)", dice_end, None)]
        for name, weight in rules.items():
            before, after = weighted_correlation(fixed, start, weight), weighted_correlation(fixed, end, weight)
            kept = np.where((after > before).numpy(), dice_end, dice_start)
            corr = float(np.corrcoef((after - before).numpy(), dice_end - dice_start)[0, 1])
            rows.append((name, kept, corr))
        # instead of a guard: each pair at the step whose crops correlate best over the middle 60 % (steps taken only)
        region = middle(shape, 0.6)
        scores = torch.stack([weighted_correlation(fixed, warp(moving, agent.displacement(t)), region) for t in thetas])
        dice_steps = torch.stack([dice_batch(warp(moving_label, agent.displacement(t), mode="nearest"), fixed_label)
                                  for t in thetas]).numpy()
        best = [int(torch.argmax(scores[:steps + 1, i])) for i, steps in enumerate(result.steps_taken)]
        rows.append(("instead of a guard: the step whose crops correlate best", dice_steps[best, np.arange(len(pairs))],
                     None))
    lines = ["# Which similarity decides whether the agent's end is kept", "",
             f"Made by `python {shlex.join([str(Path(sys.argv[0])), *(argv or sys.argv[1:])])}`.", "",
             f"{len(pairs)} validation pairs prepared by `agentreg evaluate` in `{args.evaluation.name}`; the agent of "
             f"`{args.model.name}` with its own settings, run once without a guard; the crops alone give Dice "
             f"{np.median(dice_start):.3f} / {dice_start.mean():.3f} (median / mean).", "",
             "| rule | Dice median / mean | pairs improved | pairs worse by > 0.02 | correlation of the gains |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, values, corr in rows:
        gain = values - dice_start
        lines.append(f"| {name} | {np.median(values):.3f} / {values.mean():.3f} | {100 * (gain > 0).mean():.0f} % | "
                     f"{100 * (gain < -0.02).mean():.0f} % | {'' if corr is None else f'{corr:.2f}'} |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
