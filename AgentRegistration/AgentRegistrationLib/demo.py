"""``agentreg demo``: register a few real PROMISE12 validation pairs with the shipped model.

For each pair it runs the agent (fuzzy action control) and, on the same translation-aligned
pair, elastix B-spline e16 (elastix's default B-spline map, the GT/SDM control grid), and
prints Dice before (translation only) / after, in the fixed image's own geometry, with seconds.
Per pair it writes the registration outputs (warped image and mask, displacement, trajectory
CSV and plot, metrics) and a figure of the fixed, moving and warped middle axial slices with
the mask contours. A 2-D model registers the volumes' middle axial slices.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA_HINT = "../shared/data/promise12/grid128"


def how_to_get_a_model(dim: int = 3) -> str:
    """The README's training commands, for a message."""
    modes = 15 if dim == 2 else 25
    return ("Train one with the README's commands (from the repository root):\n"
            f"  agentreg groundtruth {DATA_HINT} --split Resources/promise12_split.json --dim {dim} --out work/gt{dim}d\n"
            f"  agentreg sdm work/gt{dim}d --modes {modes} --out work/sdm{dim}d.npz\n"
            f"  agentreg train --groundtruth work/gt{dim}d --sdm work/sdm{dim}d.npz --out Resources/Models/prostate-{dim}d.pt "
            f"--data {DATA_HINT} --split Resources/promise12_split.json\n"
            "or pass a model you have with --model MODEL.pt")


def demo_pairs(names: list[str], count: int) -> list[tuple[str, str]]:
    """(moving, fixed) pairs of neighbouring validation subjects: (v1 -> v0), (v2 -> v1), ..."""
    return [(names[i + 1], names[i]) for i in range(min(count, len(names) - 1))]


def _slice(image: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    return arr[arr.shape[0] // 2] if arr.ndim == 3 else arr


def plot_pair(path: Path, fixed, moving, warped, fixed_label, moving_label, warped_label, title: str) -> None:
    """Fixed, moving and warped middle axial slices; contours: fixed (green), moving (orange), warped (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed_c = _slice(fixed_label)
    panels = [("fixed", fixed, [(fixed_c, "lime")]),
              ("moving", moving, [(_slice(moving_label), "orange")]),
              ("warped (ours)", warped, [(fixed_c, "lime"), (_slice(warped_label), "red")])]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    for ax, (name, image, contours) in zip(axes, panels, strict=True):
        ax.imshow(_slice(image), cmap="gray", origin="lower")
        for mask, colour in contours:
            if mask.any():
                ax.contour(mask > 0, levels=[0.5], colors=colour, linewidths=1.2, origin="lower")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title + "   (contours: fixed green, moving orange, warped red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def elastix_e16(result, fixed: sitk.Image, moving_label: sitk.Image, geometry) -> tuple[sitk.Image, float]:
    """e16 on the agent's own preprocessed pair; its warped moving mask in the fixed geometry and seconds."""
    from . import elastix
    from .dataset import model_image
    from .preprocessing import displacement_in_fixed_geometry, warp_to_fixed

    pair = result.pair
    start = time.perf_counter()
    maps = elastix.register(model_image(pair.fixed), model_image(pair.moving),
                            [elastix.bspline_map(geometry.control_spacing)])
    coefficients, grid = elastix.bspline_coefficients(maps[-1])
    field = displacement_in_fixed_geometry(coefficients, grid, pair.frame, fixed, pair.moving_frame)
    warped_label = warp_to_fixed(moving_label, field, label=True)
    return warped_label, time.perf_counter() - start


def run_demo(data: str | Path, model: str | Path, out: str | Path = "demo_output", num_pairs: int = 3,
             device: str = "auto", steps: int | None = None, split: str | Path | None = None, echo=print) -> int:
    """The demo; returns the exit code (1 with a message when data or model is missing)."""
    from .dataset import find_subjects, load_split

    data, model, out = Path(data), Path(model), Path(out)
    if not data.is_dir() or not any(data.glob("*_image.*")):
        echo(f"agentreg demo: no PROMISE12 data in {data}.\nPut the shared PROMISE12 files in {DATA_HINT} beside the "
             "repository (relative to the repository root), as caseNN_image.nii.gz / caseNN_label.nii.gz pairs, "
             "or give the folder with --data.", file=sys.stderr)
        return 1
    if not model.is_file():
        echo(f"agentreg demo: model bundle not found: {model}\n{how_to_get_a_model(3)}", file=sys.stderr)
        return 1

    from .bundle import load_bundle, resolve_device
    from .image_io import read_image, read_label
    from .metrics import dice
    from .outputs import write_registration_outputs
    from .preprocessing import middle_slice
    from .registration import Registrar

    subjects = {s.name: s for s in find_subjects(data)}
    names = sorted(subjects)
    if split and Path(split).is_file():
        validation = [n for n in load_split(split)["validation"] if n in subjects]
        names = validation if len(validation) >= 2 else names
    pairs = demo_pairs(names, num_pairs)
    bundle = load_bundle(model)
    registrar = Registrar(bundle, resolve_device(device))
    settings = bundle.agent_settings(steps=steps)

    def load(name):
        s = subjects[name]
        image, label = read_image(s.image, f"image of {name}"), read_label(s.label, f"label of {name}")
        return (middle_slice(image), middle_slice(label)) if bundle.dim == 2 and image.GetDimension() == 3 else (image, label)

    echo(f"{bundle.dim}-D model {model} on {registrar.device}; {len(pairs)} validation pair(s) from {data}", file=sys.stderr)
    rows = []
    for moving_name, fixed_name in pairs:
        fixed, fixed_label = load(fixed_name)
        moving, moving_label = load(moving_name)
        result = registrar.register(fixed, [moving], settings, fixed_label, [moving_label])[0]
        pair_out = out / f"{moving_name}_to_{fixed_name}"
        write_registration_outputs(result, pair_out, moving, bundle.sdm, bundle.geometry, fixed,
                                   title=f"{moving_name} to {fixed_name}", step_limit=settings.steps)
        e16_label, e16_seconds = elastix_e16(result, fixed, moving_label, bundle.geometry)
        plot_pair(pair_out / "figure.png", fixed, moving, result.warped, fixed_label, moving_label, result.warped_label,
                  f"{moving_name} -> {fixed_name}: Dice {result.metrics['dice_before']:.3f} -> "
                  f"{result.metrics['dice_after']:.3f}")
        m = result.metrics
        rows.append((f"{moving_name} -> {fixed_name}", m["dice_before"], m["dice_after"],
                     m["seconds_agent"] + m["seconds_outputs"], dice(sitk.GetArrayFromImage(e16_label),
                                                                     sitk.GetArrayFromImage(fixed_label)), e16_seconds))
    header = f"{'pair (moving -> fixed)':<24} {'Dice before':>11} {'ours':>7} {'s':>6} {'e16':>7} {'s':>6}"
    lines = [header, "-" * len(header)]
    lines += [f"{p:<24} {b:>11.3f} {a:>7.3f} {s:>6.1f} {e:>7.3f} {es:>6.1f}" for p, b, a, s, e, es in rows]
    if rows:
        mean = np.mean([r[1:] for r in rows], axis=0)
        lines.append(f"{'mean':<24} {mean[0]:>11.3f} {mean[1]:>7.3f} {mean[2]:>6.1f} {mean[3]:>7.3f} {mean[4]:>6.1f}")
    echo("\n".join(lines))
    echo("Dice of the prostate masks in the fixed image's geometry; 'before' = after the translation pre-alignment "
         "shared by both methods (its time is not counted); e16 = elastix B-spline, Mattes MI, grid spacing "
         f"{'x'.join(f'{s:g}' for s in bundle.geometry.control_spacing)} model voxels.\n"
         f"Outputs per pair (warped image and mask, displacement, trajectory.csv/.png, metrics.json, figure.png) in {out}/")
    return 0
