"""``agentreg demo``: register a few real PROMISE12 validation pairs with the shipped model.

For each pair it runs the agent (fuzzy action control) and, on the same translation-aligned
pair, elastix B-spline e16 (elastix's default B-spline map, the GT/SDM control grid), and
prints Dice before (translation only) / after, in the fixed image's own geometry, with seconds.
Per pair it writes the registration outputs (warped image and mask, displacement, trajectory
CSV and plot, the QA figure, metrics) and a figure of the fixed, moving and warped middle axial slices
with the mask contours, each panel naming its slice (k of N) and its patient orientation (R/L, A/P from
the direction matrix), drawn as the QA figure draws a slice (:func:`.qa_figure.show_slice`, grey range from
the organ's neighbourhood); a pair the agent made worse has a red WORSE title and a red frame, and the
printed summary names it. A 2-D model registers the volumes' middle axial slices.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.paths import DATA_HINT, how_to_get_a_model
from AgentRegistrationLib.contract.register_folder import made_worse
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.data.dataset import find_subjects, load_split
from AgentRegistrationLib.data.image_io import read_image, read_label
from AgentRegistrationLib.data.preprocessing import displacement_in_fixed_geometry, middle_slice, warp_to_fixed
from AgentRegistrationLib.elastix.baselines import register_baseline
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.model.devices import resolve_device
from AgentRegistrationLib.stages.outputs import write_registration_outputs
from AgentRegistrationLib.stages.qa_figure import label_box, organ_window, orientation_labels, show_slice
from AgentRegistrationLib.stages.registration import Registrar


def demo_pairs(names: list[str], count: int) -> list[tuple[str, str]]:
    """(moving, fixed) pairs of neighbouring validation subjects: (v1 -> v0), (v2 -> v1), ..."""
    return [(names[i + 1], names[i]) for i in range(min(count, len(names) - 1))]


def slice_caption(image: sitk.Image, source_slices: int | None = None) -> str:
    """Which axial slice a panel shows: the middle one of a 3-D ``image``, or, for a 2-D ``image`` cut as the middle
    slice of a volume of ``source_slices`` slices (the 2-D model's input), that one. 1-based, with the 0-based index."""
    if image.GetDimension() == 3:
        source_slices = image.GetSize()[2]
    if not source_slices:
        return "2-D image"
    k = source_slices // 2
    return f"middle axial slice, {k + 1} of {source_slices} (index {k})"


def pair_headline(moving_name: str, fixed_name: str, dice_before: float, dice_after: float) -> str:
    """The figure's title: the pair and its Dice before -> after, led by WORSE when the agent lowered it."""
    dice = f"Dice {dice_before:.3f} -> {dice_after:.3f}"
    if made_worse(dice_before, dice_after):
        return f"WORSE after registration: {dice}   ({moving_name} -> {fixed_name})"
    change = "improved" if round(dice_after, 3) > round(dice_before, 3) else "unchanged"
    return f"{moving_name} -> {fixed_name}: {dice} ({change})"


def _slice(image: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    return arr[arr.shape[0] // 2] if arr.ndim == 3 else arr


ORIGIN = "upper"  # row 0 at the top: with identity direction, anterior at the top as a radiologist reads it


def pair_figure(fixed, moving, warped, fixed_label, moving_label, warped_label, moving_name: str, fixed_name: str,
                dice_before: float, dice_after: float, fixed_slices: int | None = None,
                moving_slices: int | None = None):
    """Fixed, moving and warped middle axial slices with the mask contours (fixed green, moving orange, warped red),
    each panel naming its slice (``*_slices``: the source volume's slice count when the images are the 2-D model's
    middle slices) and its anatomical orientation from its direction matrix; the title gives the Dice before ->
    after, and a pair the agent made worse gets a red title and a red frame. Returns a matplotlib ``Figure``."""
    fixed_c = _slice(fixed_label)
    fixed_caption = slice_caption(fixed, fixed_slices)
    panels = [(f"fixed: {fixed_name}", fixed_caption, fixed, [(fixed_c, "lime")]),
              (f"moving: {moving_name}", slice_caption(moving, moving_slices), moving,
               [(_slice(moving_label), "orange")]),
              ("moving warped to fixed (ours)", fixed_caption + " of the fixed grid", warped,
               [(fixed_c, "lime"), (_slice(warped_label), "red")])]
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 3)
    fixed_box = label_box(fixed_label)  # grey range of each image: its organ's neighbourhood (the fixed one's when warped)
    regions = (fixed_box, label_box(moving_label), fixed_box)
    for ax, (name, caption, image, contours), region in zip(axes, panels, regions, strict=True):
        array = sitk.GetArrayFromImage(image)
        show_slice(ax, _slice(image), organ_window(array, region), contours,
                   orientation_labels(image.GetDirection(), ORIGIN), ORIGIN)
        ax.set_title(f"{name}\n{caption}", fontsize=9)
    worse = made_worse(dice_before, dice_after)
    fig.suptitle(pair_headline(moving_name, fixed_name, dice_before, dice_after), fontsize=12,
                 color="red" if worse else "black", fontweight="bold" if worse else "normal")
    fig.text(0.5, 0.015, "contours: fixed mask green, moving mask orange, warped moving mask red; "
             "letters: patient Right/Left, Anterior/Posterior from the image's direction matrix; grey: percentiles "
             "1-95 around each mask", ha="center", fontsize=8)
    fig.tight_layout(rect=(0.01, 0.04, 0.99, 0.97))
    if worse:
        fig.patches.append(Rectangle((0.003, 0.003), 0.994, 0.994, transform=fig.transFigure, fill=False,
                                     edgecolor="red", linewidth=5, gid="worse-frame"))
    return fig


def plot_pair(path: Path, *args, **kwargs) -> None:
    """Write :func:`pair_figure` (same arguments) as a PNG."""
    figure = pair_figure(*args, **kwargs)
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))


def summary_lines(rows: list[tuple], control_spacing, localised: bool = False) -> list[str]:
    """The demo's printed summary: one row per pair (name, Dice before, ours, seconds, e16, seconds), marked WORSE
    where the agent lowered the Dice, the mean, a line naming the pairs made worse, and what the columns mean
    (``localised``: the model starts from crops on the organ, not from the paper's translation)."""
    header = f"{'pair (moving -> fixed)':<24} {'Dice before':>11} {'ours':>7} {'s':>6} {'e16':>7} {'s':>6}"
    lines = [header, "-" * len(header)]
    lines += [f"{p:<24} {b:>11.3f} {a:>7.3f} {s:>6.1f} {e:>7.3f} {es:>6.1f}" + ("  WORSE" if made_worse(b, a) else "")
              for p, b, a, s, e, es in rows]
    if rows:
        mean = np.mean([r[1:] for r in rows], axis=0)
        lines.append(f"{'mean':<24} {mean[0]:>11.3f} {mean[1]:>7.3f} {mean[2]:>6.1f} {mean[3]:>7.3f} {mean[4]:>6.1f}")
        worse = [f"{p} (Dice {b:.3f} -> {a:.3f})" for p, b, a, *_ in rows if made_worse(b, a)]
        lines.append((f"The agent made {len(worse)} of {len(rows)} pair(s) WORSE: " + "; ".join(worse)
                      + " (red title and frame in their figure.png).") if worse
                     else f"The agent made none of the {len(rows)} pair(s) worse.")
    start = ("the crops on the organ alone" if localised else "after the translation pre-alignment")
    lines.append(f"Dice of the prostate masks in the fixed image's geometry; 'before' = {start}, the start shared by "
                 "both methods (its time is not counted); e16 = elastix B-spline, Mattes MI, "
                 f"grid spacing {'x'.join(f'{s:g}' for s in control_spacing)} model voxels.")
    return lines


def elastix_e16(result, fixed: sitk.Image, moving_label: sitk.Image, geometry) -> tuple[sitk.Image, float]:
    """e16 (:func:`.baselines.register_baseline`) on the agent's own preprocessed pair; its warped moving mask in the
    fixed geometry and seconds."""
    pair = result.pair
    start = time.perf_counter()
    coefficients, grid = register_baseline("e16", pair.fixed, pair.moving, geometry)
    field = displacement_in_fixed_geometry(coefficients, grid, pair.frame, fixed, pair.moving_frame)
    warped_label = warp_to_fixed(moving_label, field, label=True)
    return warped_label, time.perf_counter() - start


def run_demo(data: str | Path, model: str | Path, out: str | Path = "demo_output", num_pairs: int = 3,
             device: str = "auto", steps: int | None = None, split: str | Path | None = None, echo=print) -> int:
    """The demo; returns the exit code (1 with a message when data or model is missing)."""
    data, model, out = Path(data), Path(model), Path(out)
    if not data.is_dir() or not any(data.glob("*_image.*")):
        echo(f"agentreg demo: no PROMISE12 data in {data}.\nPut the shared PROMISE12 files in {DATA_HINT} beside the "
             "repository (relative to the repository root), as caseNN_image.nii.gz / caseNN_label.nii.gz pairs, "
             "or give the folder with --data.", file=sys.stderr)
        return 1
    if not model.is_file():
        echo(f"agentreg demo: model bundle not found: {model}\n{how_to_get_a_model(3)}", file=sys.stderr)
        return 1

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
        """Image, mask and, for a 2-D model, the slice count of the volume whose middle slice it registers."""
        s = subjects[name]
        image, label = read_image(s.image, f"image of {name}"), read_label(s.label, f"label of {name}")
        if bundle.dim == 2 and image.GetDimension() == 3:
            return middle_slice(image), middle_slice(label), image.GetSize()[2]
        return image, label, None

    echo(f"{bundle.dim}-D model {model} on {registrar.device}; {len(pairs)} validation pair(s) from {data}", file=sys.stderr)
    rows = []
    for moving_name, fixed_name in pairs:
        fixed, fixed_label, fixed_slices = load(fixed_name)
        moving, moving_label, moving_slices = load(moving_name)
        result = registrar.register(fixed, [moving], settings, fixed_label, [moving_label])[0]
        pair_out = out / f"{moving_name}_to_{fixed_name}"
        write_registration_outputs(result, pair_out, moving, bundle.sdm, bundle.geometry, fixed,
                                   title=f"{moving_name} to {fixed_name}", step_limit=settings.steps,
                                   fixed_label=fixed_label)
        e16_label, e16_seconds = elastix_e16(result, fixed, moving_label, bundle.geometry)
        m = result.metrics
        plot_pair(pair_out / "figure.png", fixed, moving, result.warped, fixed_label, moving_label, result.warped_label,
                  moving_name, fixed_name, m["dice_before"], m["dice_after"], fixed_slices, moving_slices)
        rows.append((f"{moving_name} -> {fixed_name}", m["dice_before"], m["dice_after"],
                     m["seconds_agent"] + m["seconds_outputs"], dice(sitk.GetArrayFromImage(e16_label),
                                                                     sitk.GetArrayFromImage(fixed_label)), e16_seconds))
    echo("\n".join(summary_lines(rows, bundle.geometry.control_spacing, bundle.geometry.localised)))
    echo("Outputs per pair (warped image and mask, displacement, trajectory.csv/.png, qa.png, metrics.json, figure.png with "
         f"slice index and orientation letters) in {out}/")
    return 0
