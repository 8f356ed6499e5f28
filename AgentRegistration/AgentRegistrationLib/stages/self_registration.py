"""First, do no harm, measured: every evaluated subject registered to itself, as ``agentreg register`` does it (the
same file, and the same voxels stored 40 mm away; with and without labels). Each run's Dice is of the moving label
carried through the registration against the fixed label (without labels the label is carried afterwards through
the displacement, as a user would), so 1.0 means the image came back unchanged."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from AgentRegistrationLib.core.agent import AgentSettings
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.data.image_io import read_image, read_label
from AgentRegistrationLib.data.preprocessing import warp_to_fixed
from AgentRegistrationLib.stages.registration import Registrar

OFFSET_MM = 40.0
"""How far the second copy is stored from the first (along the image's first axis), physical units."""
CASES = ("same file, labels", "same file, no labels", f"stored {OFFSET_MM:g} mm away, labels",
         f"stored {OFFSET_MM:g} mm away, no labels")


def _moved(image: sitk.Image, offset: float) -> sitk.Image:
    moved = sitk.Image(image)
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)
    moved.SetOrigin((np.array(image.GetOrigin()) + offset * direction[:, 0]).tolist())
    return moved


def register_to_itself(registrar: Registrar, image: sitk.Image, label: sitk.Image, settings: AgentSettings
                       ) -> dict[str, float]:
    """Dice of each of :data:`CASES` for one subject."""
    out = {}
    for case in CASES:
        moving = _moved(image, OFFSET_MM) if "away" in case else image
        moving_label = _moved(label, OFFSET_MM) if "away" in case else label
        labels = "no labels" not in case
        result = registrar.register(image, [moving], settings, label if labels else None,
                                    [moving_label if labels else None])[0]
        warped = result.warped_label if labels else warp_to_fixed(moving_label, result.displacement, label=True)
        out[case] = dice(sitk.GetArrayFromImage(warped) > 0, sitk.GetArrayFromImage(label) > 0)
    return out


def self_registration(subjects: dict, registrar: Registrar, settings: AgentSettings, dim: int,
                      progress=None) -> dict[str, dict[str, float]]:
    """Per subject (``name -> Subject``, the volumes; a 2-D model gets each subject's slice through its label's
    centre): the Dice of every case of :data:`CASES`."""
    out = {}
    for done, (name, subject) in enumerate(sorted(subjects.items())):
        image, label = read_image(subject.image, f"image of {name}"), read_label(subject.label, f"label of {name}")
        if dim == 2 and image.GetDimension() == 3:
            z = int(round(float(np.nonzero(sitk.GetArrayViewFromImage(label))[0].mean())))
            image, label = image[:, :, z], label[:, :, z]
        out[name] = register_to_itself(registrar, image, label, settings)
        if progress is not None:
            progress("self-registration", done + 1, len(subjects))
    return out


def self_registration_lines(results: dict[str, dict[str, float]]) -> list[str]:
    """A markdown table: subjects as rows, :data:`CASES` as columns, and the lowest of each column."""
    lines = ["Every validation subject registered to itself (the same file, and the same voxels stored "
             f"{OFFSET_MM:g} mm away; with and without labels): Dice of the carried label with the label, 1.0 = "
             "unchanged.", "", "| subject | " + " | ".join(CASES) + " |", "|---|" + "---:|" * len(CASES)]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in CASES) + " |" for name, row in results.items()]
    if results:
        lines.append("| lowest | " + " | ".join(f"{min(r[c] for r in results.values()):.3f}" for c in CASES) + " |")
    return lines


def self_registration_summary(results: dict[str, dict[str, float]]) -> str:
    """One line: how many subjects, and the lowest Dice of any case."""
    lowest = min(min(row.values()) for row in results.values())
    return (f"self-registration of {len(results)} subjects (same file and {OFFSET_MM:g} mm away, with and without "
            f"labels): lowest Dice {lowest:.3f}")
