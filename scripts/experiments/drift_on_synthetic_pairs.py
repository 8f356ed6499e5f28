"""Does an agent walk towards the answer and stay there? Its distance to the known answer after each step, on
synthetic pairs of training subjects and of validation subjects (the issue-11 diagnosis of drift, for any models).

Synthetic intra-subject pairs, drawn as training draws them (two random SDM deformations of one subject, at the
model's training draw scale), so that the answer ``theta_gt`` is exact. Each model runs 200 steps with its own
fuzzy action control and exploration, without its stop rule (so that every step is seen); the pairs are the same
for every model that shares an SDM. Subjects: a ground-truth folder's ``subjects/`` (the training subjects) and
``validation_subjects/`` (the validation subjects, prepared the same way by ``agentreg train --data --split``).

Figures per model and subject set: the best-action accuracy at the start state (the argmax of the predicted
Q-values is the argmax of Eq. 1's), the share of pairs whose first action brings them closer, the distance to the
answer in action steps (the norm over modes of (theta_gt - theta) / step), relative to the start, after 10, 50,
100 and 200 steps, and the median Dice of the warped moving mask at the start and after 200 steps.

    python scripts/experiments/drift_on_synthetic_pairs.py --groundtruth GT --model A.pt [--model B.pt ...] [--pairs 24]
                                               [--out results/recover_drift.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from AgentRegistrationLib.contract.training_folder import GroundTruthFolder
from AgentRegistrationLib.core.synthetic import SyntheticPairGenerator, q_targets
from AgentRegistrationLib.model.bundle import load_bundle

SHOWN_STEPS = (10, 50, 100, 200)


def load_subjects(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, 1, *spatial)`` images and labels of the prepared subjects in ``folder``."""
    files = sorted(folder.glob("*.npz"))
    if len(files) < 2:
        raise SystemExit(f"{folder}: fewer than 2 prepared subjects")
    images, labels = [], []
    for path in files:
        with np.load(path) as z:
            images.append(z["image"])
            labels.append(z["label"])
    return torch.as_tensor(np.stack(images))[:, None], torch.as_tensor(np.stack(labels))[:, None]


def drift(model: Path, images: torch.Tensor, labels: torch.Tensor, pairs: int, seed: int) -> dict:
    """The figures of one model on ``pairs`` synthetic intra-subject pairs of the given subjects."""
    bundle = load_bundle(model)
    agent = bundle.agent("cpu")
    draw_scale = bundle.training.get("config", {}).get("draw_scale", 0.5)
    generator = SyntheticPairGenerator(images, labels, [(0, 0)], np.zeros((1, bundle.sdm.num_modes)), bundle.sdm,
                                       agent.mode_fields, agent.theta_start, intra_probability=1.0,
                                       draw_scale=draw_scale, generator=torch.Generator().manual_seed(seed))
    fixed, moving, theta_gt, _, fixed_label, moving_label = generator.sample(pairs, with_labels=True)
    start = agent.theta_start.expand(pairs, -1)
    with torch.no_grad():
        predicted = bundle.network(fixed, moving)
    target = q_targets(theta_gt, start, agent.deltas, "steps")
    settings = bundle.agent_settings(steps=max(SHOWN_STEPS), seed=0, stop_when_no_action_helps=False)
    result = agent.run(fixed, moving, settings, moving_label, fixed_label)
    steps = agent.action_steps

    def distance(theta: torch.Tensor) -> torch.Tensor:
        return ((theta_gt - theta) / steps).norm(dim=1)

    d0 = distance(start)
    thetas = result.trajectory.theta
    return {
        "accuracy": float((predicted.argmax(1) == target.argmax(1)).float().mean()),
        "first_helps": float((distance(thetas[0]) < d0).float().mean()),
        "start_distance": float(d0.median()),
        "ratio": {n: float((distance(thetas[n - 1]) / d0).median()) for n in SHOWN_STEPS},
        "dice_start": float(agent.start_dice(moving_label, fixed_label).median()),
        "dice_end": float(result.trajectory.dice[-1].median()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groundtruth", type=Path, required=True, help="ground-truth folder (subjects/, validation_subjects/)")
    p.add_argument("--model", type=Path, action="append", required=True, help="model bundle (repeatable)")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="Markdown file to write (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = GroundTruthFolder(args.groundtruth)
    sets = {"training": folder.subjects, "validation": folder.validation_subjects}
    loaded = {name: load_subjects(folder) for name, folder in sets.items()}
    lines = [
        "# Drift: distance to the answer after each step, on synthetic pairs", "",
        f"Made by `python scripts/experiments/drift_on_synthetic_pairs.py {shlex.join(sys.argv[1:] if argv is None else argv)}`. "
        f"{args.pairs} synthetic intra-subject pairs per subject set (exact answers), 200 steps, each model's fuzzy "
        "action control and exploration, no stop rule. Distance: norm over modes of the error in action steps; "
        "'d/d0 at n': its median ratio to the start's after n steps (below 1: closer than at the start).", "",
        "| model | subjects | best-action accuracy at start | first action helps | d0 (steps) | "
        + " | ".join(f"d/d0 at {n}" for n in SHOWN_STEPS) + " | Dice start -> 200 |",
        "|---|---|---:|---:|---:|" + "---:|" * len(SHOWN_STEPS) + "---|",
    ]
    for model in args.model:
        for name, (images, labels) in loaded.items():
            f = drift(model, images, labels, args.pairs, args.seed)
            lines.append(f"| `{model.name}` | {name} | {f['accuracy']:.2f} | {f['first_helps']:.2f} | "
                         f"{f['start_distance']:.1f} | " + " | ".join(f"{f['ratio'][n]:.2f}" for n in SHOWN_STEPS)
                         + f" | {f['dice_start']:.3f} -> {f['dice_end']:.3f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
