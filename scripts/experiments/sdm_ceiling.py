"""How far can an agent get on real validation pairs? The ceiling its SDM sets, against what it reaches.

On the validation pairs prepared by ``agentreg evaluate`` (the crops every method starts from), each pair's own
ground truth is made as the training pairs' was (constrained elastix on the pair, the model's ground-truth
metric). Figures per pair, Dice of the warped moving mask on the model grid:

- ``crops``: the crops alone (where the agent starts);
- ``GT``: the pair's ground truth (a B-spline on the model's control grid);
- ``SDM``: that ground truth projected onto the model's SDM (the deformation the agent means by the projected
  parameters, :meth:`StatisticalDeformationModel.deformation`): the best an agent can reach with these modes;
- ``lattice``: the projection rounded to the agent's action lattice (the start plus whole action steps per mode);
- ``ours``: the agent's result cached by ``agentreg evaluate`` for this model (if present).

Also the distance from the start to the projected answer in action steps (the L1 norm: the fewest actions that
reach it), against the model's default number of steps. With ``--modes``, the same projection onto SDMs of other
numbers of modes, fitted (:meth:`StatisticalDeformationModel.fit`) on the model's own training ground truth
(``--groundtruth``, default: the folder its bundle records): how many modes an agent would need.

    python scripts/experiments/sdm_ceiling.py --evaluation EVAL_DIR --model MODEL.pt [--max-pairs 24] [--workers 2]
                                  [--modes 25,50,100,200] [--groundtruth GT] [--out results/sdm_ceiling_3d.md]

The pair's ground-truth coefficients are cached beside the prepared pair (``gt_<metric>_<iterations>x<resolutions>
.npy``), so a rerun (or another model on the same geometry) does not register again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from AgentRegistrationLib.contract.training_config import TrainingConfig
from AgentRegistrationLib.core.bspline import bspline_field
from AgentRegistrationLib.core.warp import warp_label
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.stages.evaluation import figures, file_hash
from AgentRegistrationLib.stages.evaluation_pairs import pair_dir, prepared_pairs
from AgentRegistrationLib.stages.training import action_steps_for


def groundtruth_coefficients(job: tuple) -> np.ndarray:
    """(cache file, pair, geometry, metric, iterations, resolutions) -> the pair's GT coefficients (cached)."""
    cache, pair, geometry, metric, iterations, resolutions = job
    if cache.is_file():
        return np.load(cache)
    from AgentRegistrationLib.elastix.constrained import register_constrained
    from AgentRegistrationLib.elastix.wrapper import single_threaded_worker

    single_threaded_worker()
    coefficients = register_constrained(pair["fixed"], pair["moving"], pair["fixed_label"], pair["moving_label"],
                                        geometry, iterations=iterations, resolutions=resolutions, metric=metric)
    np.save(cache, coefficients)
    return coefficients


def dice_of(coefficients: np.ndarray, pair: dict, geometry) -> float:
    grid = geometry.control_grid()
    u = bspline_field(coefficients, grid, grid.image_bases(geometry.size, dtype=torch.float64))
    return figures(warp_label(pair["moving_label"], u), pair["fixed_label"], None)["dice"]


def lattice_steps(theta: np.ndarray, start: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The whole action steps per mode from ``start`` nearest to ``theta``."""
    return np.round((theta - start) / steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evaluation", required=True, help="output folder of agentreg evaluate (its prepared pairs)")
    p.add_argument("--model", required=True, help="model bundle (its geometry, SDM, action steps and GT metric)")
    p.add_argument("--max-pairs", type=int, default=24, help="the first N prepared pairs (sorted by name)")
    p.add_argument("--iterations", type=int, default=200, help="ground truth: elastix iterations per resolution")
    p.add_argument("--resolutions", type=int, default=2, help="ground truth: elastix resolutions")
    p.add_argument("--workers", type=int, default=2, help="pairs registered at a time")
    p.add_argument("--modes", help="comma-separated numbers of modes of refitted SDMs to project onto as well")
    p.add_argument("--groundtruth", help="the ground truth the SDMs of --modes are fitted on (default: the model's)")
    p.add_argument("--out", help="markdown report (default: print it)")
    args = p.parse_args(argv)

    bundle = load_bundle(args.model)
    geometry, sdm, steps = bundle.geometry, bundle.sdm, np.asarray(bundle.action_steps, dtype=np.float64)
    metric = bundle.groundtruth_metric
    found = prepared_pairs(args.evaluation, geometry, args.max_pairs)
    if not found:
        raise SystemExit(f"no prepared pairs for {args.model}'s geometry in {args.evaluation}: run agentreg evaluate first")
    cache = f"gt_{metric}_{args.iterations}x{args.resolutions}.npy"
    jobs = [(pair_dir(Path(args.evaluation), m, f) / cache, pair, geometry, metric, args.iterations, args.resolutions)
            for (m, f), pair in found]
    with ProcessPoolExecutor(args.workers) as pool:
        coefficients = list(pool.map(groundtruth_coefficients, jobs))

    start, model_hash = sdm.theta_identity, file_hash(args.model)
    rows = []
    for ((moving, fixed), pair), c in zip(found, coefficients, strict=True):
        theta = sdm.project(c)
        whole = lattice_steps(theta, start, steps)
        ours_file = pair_dir(Path(args.evaluation), moving, fixed) / "ours.json"
        ours = json.loads(ours_file.read_text()) if ours_file.is_file() else {}
        ours_ok = ours.get("signature", {}).get("model") == model_hash
        rows.append({"pair": f"{moving} -> {fixed}", "crops": dice_of(np.zeros_like(c), pair, geometry),
                     "GT": dice_of(c, pair, geometry), "SDM": dice_of(sdm.deformation(theta), pair, geometry),
                     "lattice": dice_of(sdm.deformation(start + whole * steps), pair, geometry),
                     "ours": ours.get("dice", float("nan")) if ours_ok else float("nan"),
                     "actions": float(np.abs(whole).sum())})

    columns = ["crops", "GT", "SDM", "lattice", "ours"]
    median = {k: float(np.nanmedian([r[k] for r in rows])) for k in columns + ["actions"]}
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in columns}
    command = f"python scripts/experiments/sdm_ceiling.py {shlex.join(argv if argv is not None else sys.argv[1:])}"
    lines = ["# The SDM's ceiling on real validation pairs, against the agent", "",
             f"Made by `{command}`. {len(rows)} prepared validation pairs of `agentreg evaluate` (the crops every method "
             f"starts from); each pair's own ground truth: constrained elastix, metric `{metric}`, {args.iterations} "
             f"iterations x {args.resolutions} resolutions (as the model's training pairs'); model `{Path(args.model).name}` "
             f"({sdm.num_modes} modes, default {bundle.agent_settings().steps} steps). Dice of the warped moving mask on "
             "the model grid.", "",
             "| | crops | GT | SDM projection | on the action lattice | ours |", "|---|---:|---:|---:|---:|---:|",
             "| Dice median | " + " | ".join(f"{median[k]:.3f}" for k in columns) + " |",
             "| Dice mean | " + " | ".join(f"{mean[k]:.3f}" for k in columns) + " |",
             "| gain over the crops (median of pair differences) | | "
             + " | ".join(f"{np.nanmedian([r[k] - r['crops'] for r in rows]):+.3f}" for k in columns[1:]) + " |", "",
             f"Actions from the start to the projected answer (L1 in action steps): median {median['actions']:.0f}, "
             f"range {min(r['actions'] for r in rows):.0f}-{max(r['actions'] for r in rows):.0f}.", "",
             "| pair | crops | GT | SDM | lattice | ours | actions |", "|---|---:|---:|---:|---:|---:|---:|"]
    if args.modes:
        lines[-4:-4] = modes_table(args, bundle, found, coefficients, [r["crops"] for r in rows]) + [""]
    lines += [f"| {r['pair']} | " + " | ".join(f"{r[k]:.3f}" for k in columns) + f" | {r['actions']:.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


def modes_table(args, bundle, found: list, coefficients: list[np.ndarray], crops: list[float]) -> list[str]:
    """The projection onto SDMs of ``--modes`` modes fitted on the training ground truth, as table lines."""
    from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
    from AgentRegistrationLib.stages.sdm_fit import load_groundtruth

    gt = args.groundtruth or bundle.training.get("data", {}).get("groundtruth")
    if not gt:
        raise SystemExit("--modes: the model records no ground-truth folder; give --groundtruth")
    geometry, results = load_groundtruth(Path(gt))
    training = np.stack([r.coefficients for r in results])
    lines = [f"SDMs of other numbers of modes, fitted on the {len(results)} training deformations of `{gt}`: the same "
             "pairs' ground truths projected onto them ('share left out': the median norm of the part of the "
             "ground truth's coefficients outside the modes, relative to the whole).", "",
             "| modes | variance of the training deformations held | Dice median | Dice mean | gain over the crops "
             "(median) | share left out | actions to the answer (median) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for k in (int(v) for v in args.modes.split(",")):
        sdm = StatisticalDeformationModel.fit(training, k, geometry.control_grid())
        steps = action_steps_for(sdm, TrainingConfig(step_fraction=bundle.training["config"]["step_fraction"]))
        thetas = [sdm.project(c) for c in coefficients]
        dice = np.array([dice_of(sdm.deformation(t), pair, geometry) for t, (_, pair) in zip(thetas, found, strict=True)])
        left = [np.linalg.norm(sdm.deformation(t) - c) / np.linalg.norm(c) for t, c in zip(thetas, coefficients, strict=True)]
        actions = [np.abs(lattice_steps(t, sdm.theta_identity, steps)).sum() for t in thetas]
        lines.append(f"| {k} | {sdm.explained_variance_ratio.sum():.3f} | {np.median(dice):.3f} | {dice.mean():.3f} | "
                     f"{np.median(dice - np.array(crops)):+.3f} | {np.median(left):.2f} | {np.median(actions):.0f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
