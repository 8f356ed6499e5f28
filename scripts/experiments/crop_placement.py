"""What the fixed crop's placement costs: Dice of the crops alone ('localised', no deformation) on the validation
pairs, with the fixed crop placed by the fixed label (an oracle), by each model's localiser, and by one half of each
(the oracle's centre with the localiser's spread, what a point given by hand, ``--fixed-point``, places on the
organ's centre; and the other way round), and by the oracle's centre with the model's median organ spread (what
such a point places with a model that has no localiser).

Every pair as ``agentreg evaluate`` makes it: the moving crop placed by the moving label (the atlas case), the
fixed one as the row says, both on the fixed image's model grid; a 2-D model takes its slab of the volume (placed
by the 3-D localiser, as for a user's volume). With ``--slices`` the pairs are single 2-D slices instead, each
subject's axial slice through its prostate's centroid, and the fixed crop is placed by the model's 2-D localiser (what
a user's single-slice volume gets in Slicer). Also per model: the localiser's centre error (mm) and spread ratio
(localiser / label) per fixed subject.

    python scripts/experiments/crop_placement.py --model Resources/Models/prostate-3d.pt --out results/crop_placement_3d.md
    python scripts/experiments/crop_placement.py --slices --model Resources/Models/prostate-2d.pt \\
        --out results/crop_placement_slices.md
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.data.dataset import find_subjects, load_split
from AgentRegistrationLib.data.image_io import read_image, read_label
from AgentRegistrationLib.data.localiser import localise, localiser_from_payload
from AgentRegistrationLib.data.localiser_training import centroid_slice
from AgentRegistrationLib.data.organ_box import Localisation, localisation_from_label
from AgentRegistrationLib.data.preprocessing import crop_correlation, organ_frames, resample_to_frame
from AgentRegistrationLib.model.bundle import load_bundle

REPO = Path(__file__).resolve().parents[2]


def read_subjects(subjects: list, slices: bool = False) -> dict[str, tuple]:
    """Per subject, read once: ``(image, label, the label's localisation)``; with ``slices``, of its axial slice
    through the prostate's centroid (2-D images)."""
    out = {}
    for s in subjects:
        image, label = read_image(s.image), read_label(s.label)
        if slices:
            z = centroid_slice(label)
            image, label = image[:, :, z], label[:, :, z]
        out[s.name] = (image, label, localisation_from_label(label))
    return out


def placements(bundle, images: dict[str, tuple]) -> dict[str, dict[str, Localisation]]:
    """Per fixed subject: the label's localisation, the localiser's, the two halves and a point's."""
    dim = next(iter(images.values()))[0].GetDimension()
    if str(dim) not in bundle.localisers:
        raise SystemExit(f"the model has no {dim}-D localiser")
    localiser = localiser_from_payload(bundle.localisers[str(dim)])
    out = {}
    for name, (image, _, oracle) in images.items():
        found = localise(localiser, image)
        out[name] = {"oracle": oracle, "localiser": found,
                     "label's centre, localiser's spread (as a point given by hand)":
                         Localisation(oracle.centre, found.spread, "half"),
                     "localiser's centre, label's spread": Localisation(found.centre, oracle.spread, "half"),
                     "label's centre, the model's median spread (a point, on a model without localiser)":
                         Localisation(oracle.centre, bundle.typical_spread(dim), "point")}
    return out


def crop_dice(geometry, images: dict[str, tuple], places: dict, moving_by: str = "label",
              same: bool = False) -> dict[str, list[float]]:
    """Per placement: the Dice of the two crops' labels over all ordered pairs, the moving crop placed by its label
    (``moving_by="label"``) or by the localiser, as the fixed one (``"localiser"``); ``same``: each subject against
    itself instead (self-registration's start)."""
    result: dict[str, list[float]] = {key: [] for key in next(iter(places.values()))}
    pairs = [(s, s) for s in sorted(images)] if same else itertools.permutations(sorted(images), 2)
    for moving, fixed in pairs:
        (fixed_image, fixed_label, _), (moving_image, moving_label, moving_place) = images[fixed], images[moving]
        if moving_by == "localiser":
            moving_place = places[moving]["localiser"]
        for key, place in places[fixed].items():
            frame, moving_frame = organ_frames(fixed_image, moving_image, geometry, place, moving_place)
            result[key].append(dice(resample_to_frame(fixed_label, frame, label=True) > 0,
                                    resample_to_frame(moving_label, moving_frame, label=True) > 0))
    return result


def crop_correlations(geometry, images: dict[str, tuple], places: dict, same: bool = False) -> list[float]:
    """Per pair: the correlation of the two crops both placed by the localiser (the fixed crop's rule)."""
    pairs = [(s, s) for s in sorted(images)] if same else itertools.permutations(sorted(images), 2)
    out = []
    for moving, fixed in pairs:
        frames = organ_frames(images[fixed][0], images[moving][0], geometry, places[fixed]["localiser"],
                              places[moving]["localiser"])
        out.append(crop_correlation(images[fixed][0], images[moving][0], *frames))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, type=Path,
                   help="model bundle whose geometry and 3-D localiser are used (repeatable: a row set each)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "promise12" / "grid128")
    p.add_argument("--split", type=Path, default=REPO / "Resources" / "promise12_split.json")
    p.add_argument("--out", type=Path, required=True, help="Markdown report")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. where each model comes from)")
    p.add_argument("--moving", choices=("label", "localiser"), default="label",
                   help="what places the moving crop: its label (the atlas case, as agentreg evaluate) or the "
                        "localiser, the fixed crop's estimator (one rule for both crops)")
    p.add_argument("--same", action="store_true", help="each subject against itself (self-registration's start)")
    p.add_argument("--slices", action="store_true",
                   help="pairs of single slices (through each prostate's centroid), placed by the 2-D localiser")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    subjects = find_subjects(args.data, load_split(args.split)["validation"])
    given = list(argv or sys.argv[1:])
    if "--note" in given:  # the note is shown below the command, not inside it
        given[given.index("--note") + 1] = "(below)"
    command = "python " + shlex.join([str(Path(sys.argv[0])), *given])
    lines = ["# What the fixed crop's placement costs", "", f"Made by `{command}`.", "",
             f"{len(subjects) * (len(subjects) - 1)} ordered pairs of the {len(subjects)} validation subjects of "
             f"`{args.split.name}` in `{args.data.name}`"
             + (", each subject's axial slice through its prostate's centroid (2-D images; the fixed crop placed by the "
                "model's 2-D localiser)" if args.slices else "")
             + ". Dice of the two crops' labels on the fixed image's model grid, "
             "with no deformation (" + ("the start of a single-slice registration" if args.slices else
                                        "the 'localised' start every method of `agentreg evaluate` begins from")
             + "); the "
             "moving crop placed by the moving label, the fixed one as the row says ('oracle': by the fixed label, "
             "which a user does not have).", "", *([args.note, ""] if args.note else []),
             "| model | fixed crop placed by | Dice median | Dice mean | Dice min |", "|---|---|---:|---:|---:|"]
    details = []
    images = read_subjects(subjects, args.slices)
    for model in args.model:
        bundle = load_bundle(model)
        places = placements(bundle, images)
        if args.moving == "localiser":  # how alike the one-rule crops are (preprocessing.SAME_ANATOMY_CORRELATION)
            r = crop_correlations(bundle.geometry, images, places, args.same)
            details += ["", f"`{model.name}`: correlation of the two crops placed by the localiser on both images, over "
                        f"the {len(r)} pairs: median {np.median(r):.3f}, max {np.max(r):.3f}, min {np.min(r):.3f}."]
            print(details[-1], flush=True)
        for key, values in crop_dice(bundle.geometry, images, places, args.moving, args.same).items():
            lines.append(f"| `{model.name}` | {key} | {np.median(values):.3f} | {np.mean(values):.3f} | "
                         f"{np.min(values):.3f} |")
            print(lines[-1], flush=True)
        details += ["", f"`{model.name}`'s localiser per fixed subject: centre error (mm, image axes) and spread ratio "
                    "(localiser / label):", "", "| subject | centre error | norm | spread ratio |", "|---|---|---:|---|"]
        for name, place in places.items():
            error = place["localiser"].centre - place["oracle"].centre
            ratio = place["localiser"].spread / place["oracle"].spread
            details.append(f"| {name} | {np.round(error, 1).tolist()} | {np.linalg.norm(error):.1f} | "
                           f"{np.round(ratio, 2).tolist()} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines + details) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
