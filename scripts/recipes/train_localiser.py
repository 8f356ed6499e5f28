"""Train the learned organ localiser (AgentRegistrationLib.data.localiser) and evaluate it on the validation subjects.

Trains on the training subjects of ``--split`` found in each ``--data`` folder (default: both PROMISE12 folders,
``native`` as users load it and ``grid128``; the same subjects, two fields of view and voxel grids), on the CPU,
for ``--minutes``. A 3-D localiser trains on the volumes; a 2-D one on the axial slices through each training
subject's organ centroid and its neighbours (slices whose organ area is at least half the centroid slice's).

Evaluation, per validation subject of each ``--eval-data`` folder (2-D: the axial slice through the centroid),
against the label's centre and spread (``localisation.localisation_from_label``): the centre error per image
axis in model voxels of the model's own grid (``--grid-of``: the ground-truth folder or model bundle whose geometry
the localiser serves; one model voxel along axis a = box spreads_a * true spread_a / (grid size_a - 1); without it,
the grid of the shipped prostate models, 100x100 or 75x75x20 on 10x10(x7) organ spreads), its norm, and the
predicted/true spread per axis; for the localiser as trained
(weighting and refinement as its config says) and for the other weightings/refinement (to choose them), and for
the naive baseline "image centre with the median training spread" (of the same folder). Writes the weights
(``--out``) and a Markdown report (``--report``) that names the command that made it.

    python scripts/recipes/train_localiser.py --dim 3 --out Resources/Models/localiser-3d.pt --report results/localiser_3d.md

``--init L.pt`` goes on from a saved localiser; ``--iterations 0`` with it only applies ``--weighting`` / ``--refine``
and calibrates its spread again; ``--into MODEL.pt`` puts the result into model bundles (as ``agentreg train
--localiser`` does at training), e.g. the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from AgentRegistrationLib.contract.training_folder import LOCALISER_WEIGHTINGS as WEIGHTINGS
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.data.localiser import (
    LocaliserConfig,
    OrganLocaliser,
    load_localiser,
    localise,
    save_localiser,
)
from AgentRegistrationLib.data.localiser_training import (
    TrainingLog,
    calibrate_spread,
    centroid_slice,
    organ_slices,
    train_localiser,
)
from AgentRegistrationLib.data.organ_box import BOX_SPREADS, Localisation, localisation_from_label
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary
from AgentRegistrationLib.stages.training_finish import add_localisation

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "promise12"
TARGET = 3.0
"""A localiser is good enough when the median norm of its centre error is at most this many model voxels (the crop
then holds the organ with most of its rim)."""


def grid_of(path: Path | None, dim: int) -> tuple[ModelGeometry, str]:
    """The model grid the localiser serves and its description: the geometry of a ground-truth folder or a model
    bundle, else the shipped prostate models' (the paper's grid on the organ)."""
    if path is None:
        return (ModelGeometry.localised_grid(dim, BOX_SPREADS[dim]),
                "the shipped prostate models' grid (give --grid-of GT or MODEL.pt for another model's)")
    geometry = (load_bundle(path).geometry if path.is_file() else GroundTruthSummary.load(path).geometry)
    if geometry.dim != dim or not geometry.localised:
        raise SystemExit(f"--grid-of {path}: its model grid is {geometry.dim}-D"
                         + ("" if geometry.localised else " on the paper's centred crop (no crop on the organ)")
                         + f"; give a {dim}-D model that crops on the organ")
    return geometry, f"the model grid of `{path.name}`"


def load_subject(folder: Path, name: str) -> tuple[sitk.Image, sitk.Image] | None:
    image, label = folder / f"{name}_image.nii.gz", folder / f"{name}_label.nii.gz"
    if not image.exists() or not label.exists():
        return None
    return sitk.ReadImage(str(image), sitk.sitkFloat32), sitk.ReadImage(str(label), sitk.sitkUInt8)


def subjects_of(folder: Path, names: list[str], dim: int, training: bool) -> list[tuple[str, sitk.Image, sitk.Image]]:
    out = []
    for name in names:
        pair = load_subject(folder, name)
        if pair is None:
            continue
        image, label = pair
        if dim == 3:
            out.append((name, image, label))
        elif training:
            out.extend((name, im, lab) for im, lab in organ_slices(image, label))
        else:
            z = centroid_slice(label)
            out.append((name, image[:, :, z], label[:, :, z]))
    return out


def centre_error(pred: Localisation, true: Localisation, image: sitk.Image, geometry: ModelGeometry) -> np.ndarray:
    """Centre error along each image axis, in model voxels of the true localisation's crop box on ``geometry``."""
    dim = geometry.dim
    direction = np.array(image.GetDirection()).reshape(dim, dim)
    along_axes = direction.T @ (np.asarray(pred.centre) - np.asarray(true.centre))
    model_voxel = np.array(geometry.box_spreads) * np.asarray(true.spread) / (np.array(geometry.size) - 1)
    return along_axes / model_voxel


def image_centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def with_settings(localiser: OrganLocaliser, calibration, **changes) -> OrganLocaliser:
    """The same network with other settings, its spread calibrated again on ``calibration`` (training) cases."""
    out = OrganLocaliser(replace(localiser.config, **changes))
    out.load_state_dict(localiser.state_dict())
    return calibrate_spread(out, [c[1] for c in calibration], [c[2] for c in calibration])


def evaluate(localiser: OrganLocaliser, cases, median_spread: np.ndarray, geometry: ModelGeometry,
             calibration=None) -> dict:
    """Per method: per subject (name, error per axis, norm, spread ratio per axis)."""
    methods = {"localiser (as shipped)": localiser}
    for weighting in WEIGHTINGS if calibration else ():
        for refine in (False, True):
            methods[f"{weighting}{' + refine' if refine else ''}"] = with_settings(localiser, calibration,
                                                                               weighting=weighting, refine=refine)
    rows: dict[str, list] = {name: [] for name in [*methods, "baseline: image centre, median spread"]}
    for name, image, label in cases:
        true = localisation_from_label(label)
        for method, loc in methods.items():
            t = time.perf_counter()
            try:
                pred = localise(loc, image)
            except ValueError:
                pred = Localisation(image_centre(image), median_spread, "failed")
            seconds = time.perf_counter() - t
            err = centre_error(pred, true, image, geometry)
            rows[method].append((name, err, float(np.linalg.norm(err)), pred.spread / true.spread, seconds))
        base = Localisation(image_centre(image), median_spread, "baseline")
        err = centre_error(base, true, image, geometry)
        rows["baseline: image centre, median spread"].append((name, err, float(np.linalg.norm(err)),
                                                             base.spread / true.spread, 0.0))
    return rows


def summary_table(rows: dict, dim: int) -> list[str]:
    axes = "xyz"[:dim]
    head = (["method", "median norm", "max norm", f"<= {TARGET:g} voxels"] + [f"median abs {a}" for a in axes]
            + [f"spread ratio {a} median [min, max]" for a in axes] + ["seconds"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, entries in rows.items():
        errs = np.array([e[1] for e in entries])
        norms = np.array([e[2] for e in entries])
        ratios = np.array([e[3] for e in entries])
        cells = [method, f"{np.median(norms):.2f}", f"{norms.max():.2f}", f"{(norms <= TARGET).sum()}/{len(norms)}"]
        cells += [f"{np.median(np.abs(errs[:, a])):.2f}" for a in range(dim)]
        cells += [f"{np.median(ratios[:, a]):.2f} [{ratios[:, a].min():.2f}, {ratios[:, a].max():.2f}]" for a in range(dim)]
        cells.append(f"{np.median([e[4] for e in entries]):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def subject_table(rows: dict, method: str, dim: int) -> list[str]:
    axes = "xyz"[:dim]
    head = ["subject"] + [f"error {a}" for a in axes] + ["norm"] + [f"spread ratio {a}" for a in axes] + ["baseline norm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {e[0]: e for e in rows["baseline: image centre, median spread"]}
    for name, err, norm, ratio, _ in rows[method]:
        cells = [name] + [f"{v:+.2f}" for v in err] + [f"{norm:.2f}"] + [f"{v:.2f}" for v in ratio] + [f"{base[name][2]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, choices=(2, 3), required=True)
    parser.add_argument("--data", type=Path, action="append", help="training folder(s) (default: native and grid128)")
    parser.add_argument("--eval-data", type=Path, action="append", help="evaluation folder(s) (default: as --data)")
    parser.add_argument("--split", type=Path, default=REPO / "Resources" / "promise12_split.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--iterations", type=int, default=100000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="continue training from this saved localiser (its network and config; "
                                                   "--weighting and --refine change those)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid-of", type=Path, metavar="GT_OR_MODEL",
                        help="the ground-truth folder (agentreg groundtruth --out) or model bundle whose model grid the "
                             "errors are measured on (default: the shipped prostate models' grid)")
    parser.add_argument("--into", type=Path, action="append", metavar="MODEL.pt",
                        help="also put the localiser into this model bundle, replacing its localiser of this "
                             "dimension (repeatable)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default=None,
                        help="shipped weighting (default: the --init localiser's, else the default config's)")
    parser.add_argument("--refine", choices=("yes", "no"), default=None,
                        help="shipped refinement (default: the --init localiser's, else the default config's)")
    args = parser.parse_args(argv)
    missing = [str(m) for m in args.into or [] if not m.is_file()]
    if missing:
        parser.error(f"--into: no model bundle at {', '.join(missing)}")
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, not {args.minutes}")
    if args.iterations < 0 or (args.iterations == 0 and not args.init):
        parser.error("--iterations: a positive number, or 0 with --init (no batch more: that localiser with the "
                     "--weighting / --refine given, its spread calibrated again)")
    geometry, grid_text = grid_of(args.grid_of, args.dim)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    data = args.data or [DATA / "native", DATA / "grid128"]
    eval_data = args.eval_data or data
    split = json.loads(args.split.read_text())
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *(argv or sys.argv[1:])])

    train_cases, spreads = [], {}
    for folder in data:
        cases = subjects_of(folder, split["train"], args.dim, training=True)
        if not cases:
            parser.error(f"--data {folder}: no training subject of {args.split} found there")
        train_cases += cases
        print(f"{folder}: {len(cases)} training {'volumes' if args.dim == 3 else 'slices'}", flush=True)
    for folder in eval_data:  # median true spread of the training subjects (centroid slice in 2-D), per folder
        cases = subjects_of(folder, split["train"], args.dim, training=False)
        spreads[folder] = np.median([localisation_from_label(lab).spread for _, _, lab in cases], axis=0)

    refine = None if args.refine is None else args.refine == "yes"
    settings = {key: value for key, value in (("weighting", args.weighting), ("refine", refine)) if value is not None}
    config = replace(LocaliserConfig.default(args.dim), **settings)
    log = TrainingLog()
    initial, before = None, {"iterations": 0, "seconds": 0.0, "runs": []}
    if args.init:  # its network and config, with the settings given here
        loaded = load_localiser(args.init)
        config = replace(loaded.config, **settings)
        initial = OrganLocaliser(config)
        initial.load_state_dict(loaded.state_dict())
        before = torch.load(args.init, map_location="cpu", weights_only=True).get("training", before)

    def progress(it, loss, seconds):
        if it % 100 == 0:
            print(f"iteration {it} loss {loss:.4f} {seconds:.0f} s", flush=True)

    calibration = train_cases
    localiser = train_localiser([c[1] for c in train_cases], [c[2] for c in train_cases], config,
                                iterations=args.iterations, time_limit=args.minutes * 60, seed=args.seed,
                                progress=progress, log=log, initial=initial)
    total_iterations, total_seconds = int(before["iterations"]) + log.iterations, float(before["seconds"]) + log.seconds
    runs = [*before.get("runs", []), command]
    print(f"trained {log.iterations} batches in {log.seconds:.0f} s; spread scale {localiser.config.spread_scale}")
    save_localiser(localiser, args.out, {"training": {"subjects": sorted({c[0] for c in train_cases}),
                                                      "data": [f.name for f in data], "iterations": total_iterations,
                                                      "seconds": round(total_seconds, 1), "seed": args.seed,
                                                      "runs": runs}})
    size_kb = args.out.stat().st_size / 1024
    for model in args.into or []:  # the models that carry this localiser get the new one
        bundle = load_bundle(model)
        add_localisation(bundle, [str(args.out)], None, [])
        bundle.save(model)
        print(f"put {args.out} into {model}")

    lines = [f"# Learned localiser, {args.dim}-D: validation", "",
             "Made by " + ", then ".join(f"`{r}`" for r in runs)
             + f" (CPU, {args.threads} thread(s), torch {torch.__version__}, {platform.machine()}; the machine was "
             "shared with other jobs, so the batches per minute vary).", "",
             f"Trained on {len(train_cases)} training {'volumes' if args.dim == 3 else 'slices'} of "
             f"{len({c[0] for c in train_cases})} training subjects from {', '.join(f.name for f in data)}: "
             f"{total_iterations} batches of {config.batch_size} in {total_seconds / 60:.1f} min (1 CPU thread), "
             + (f"final loss {np.mean(log.losses[-50:]):.3f}" if log.losses else "no batch in the last run (its "
                "settings applied and its spread calibrated again)")
             + f". Weights `{args.out.name}`: {size_kb:.0f} KB.", "",
             f"Config: `{json.dumps(localiser.config.to_dict())}`", "",
             "Centre error in model voxels of the crop box placed on the label's localisation, on " + grid_text
             + f": grid {'x'.join(map(str, geometry.size))} on {'x'.join(f'{b:g}' for b in geometry.box_spreads)} "
             "organ spreads, so one model voxel along axis a = box spreads_a x true spread_a / (grid size_a - 1); "
             "spread ratio = predicted / true. "
             + ("2-D: the axial slice through each subject's organ centroid. " if args.dim == 2 else "")
             + f"Good enough: a median norm of at most {TARGET:g} model voxels. Rows other than the first and the "
             "baseline show the same network with another weighting of its probability map (p, p squared, the "
             "largest p > 0.5 component, the ellipsoid fitted to p) and with/without the second, finer pass around "
             "the first answer (spread calibrated again for each on a third of the training cases); they "
             "were measured to choose the shipped setting, so they are not a held-out figure for that choice.", ""]
    for folder in eval_data:
        cases = subjects_of(folder, split["validation"], args.dim, training=False)
        rows = evaluate(localiser, cases, spreads[folder], geometry, calibration[::3])
        lines += [f"## {folder.name}: {len(cases)} validation subjects", "",
                  f"Baseline spread (median of the training subjects here): {np.round(spreads[folder], 2).tolist()}", "",
                  *summary_table(rows, args.dim), "", "Per subject, the localiser as shipped:", "",
                  *subject_table(rows, "localiser (as shipped)", args.dim), ""]
        train_rows = evaluate(localiser, subjects_of(folder, split["train"], args.dim, training=False)[:12],
                              spreads[folder], geometry)
        norms = [e[2] for e in train_rows["localiser (as shipped)"]]
        lines += [f"Fit check on 12 training subjects of {folder.name} (as shipped): median norm "
                  f"{np.median(norms):.2f}, max {np.max(norms):.2f}.", ""]
        print("\n".join(summary_table(rows, args.dim)), flush=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines))
    print(f"wrote {args.out} ({size_kb:.0f} KB) and {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
