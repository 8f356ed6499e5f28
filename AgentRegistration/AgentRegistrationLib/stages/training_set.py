"""What a training runs on: the training subjects on the model grid and the real ground-truth deformations between
them (:class:`TrainingSet`, read once from a ground-truth folder), and real pairs of validation subjects on the same
grid (:class:`ValidationPair`), on which the agent is validated during and after training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from AgentRegistrationLib.contract.training_folder import GroundTruthFolder
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary
from AgentRegistrationLib.stages.sdm_fit import load_pairs


@dataclass
class TrainingSet:
    """Training subjects on the model grid and the real GT deformations between them."""

    names: list[str]
    images: np.ndarray  # (S, *spatial) float32
    labels: np.ndarray  # (S, *spatial) uint8
    pairs: list[tuple[int, int]]  # (moving, fixed) subject indices
    coefficients: np.ndarray  # (P, n_coefficients)
    source: dict = dataclasses.field(default_factory=dict)  # where the subjects came from (for the model card)
    folder: Path | None = None  # the ground-truth folder it was read from
    summary: GroundTruthSummary | None = None  # that folder's record: the model geometry, the template, ...

    @property
    def geometry(self) -> ModelGeometry:
        """The model geometry of the ground truth (the training images' grid)."""
        if self.summary is None:
            raise ValueError("this training set was not read from a ground-truth folder: give its model geometry")
        return self.summary.geometry

    @classmethod
    def from_groundtruth(cls, gt_dir: Path) -> TrainingSet:
        """The training set of the ground-truth folder ``gt_dir``, each of its files read once: its summary, its
        pairs (3 or more) and its subjects."""
        summary = GroundTruthSummary.load(gt_dir)
        results = load_pairs(gt_dir)
        source = {"groundtruth": str(Path(gt_dir).resolve()), "groundtruth_metric": summary.metric, **summary.source,
                  **({"organ": summary.organ} if summary.organ else {}),
                  **{f"groundtruth_{k}": v for k, v in (("iterations", summary.iterations),
                                                         ("resolutions", summary.resolutions)) if v}}
        names = sorted({r.moving for r in results} | {r.fixed for r in results})
        images, labels = [], []
        for n in names:
            with np.load(GroundTruthFolder(gt_dir).subject_file(n)) as z:
                images.append(z["image"])
                labels.append(z["label"])
        index = {n: i for i, n in enumerate(names)}
        pairs = [(index[r.moving], index[r.fixed]) for r in results]
        return cls(names, np.stack(images), np.stack(labels), pairs, np.stack([r.coefficients for r in results]), source,
                   Path(gt_dir), summary)


@dataclass
class ValidationPair:
    fixed: np.ndarray
    moving: np.ndarray
    fixed_label: np.ndarray
    moving_label: np.ndarray
    name: str


def validation_pairs_from_subjects(subjects, count: int, seed: int = 0) -> list[ValidationPair]:
    """``count`` random ordered pairs of prepared validation subjects (already on the model grid)."""
    rng = np.random.default_rng(seed)
    pairs = [(m, f) for m in range(len(subjects)) for f in range(len(subjects)) if m != f]
    chosen = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    out = []
    for i in sorted(chosen):
        m, f = pairs[i]
        out.append(ValidationPair(subjects[f].image, subjects[m].image, subjects[f].label, subjects[m].label,
                                  f"{subjects[m].name}->{subjects[f].name}"))
    return out


def validation_pairs_from_split(training_set: TrainingSet, data: str | Path, split: str | Path, count: int,
                                seed: int = 0) -> list[ValidationPair]:
    """``count`` random pairs of the ``validation`` subjects of ``split`` found in ``data``, prepared onto the model
    grid as the subjects of ``training_set`` were (:meth:`TrainingSet.from_groundtruth`; cached in its ground-truth
    folder's ``validation_subjects``)."""
    # SimpleITK: training runs without it on prepared subjects (GPU machines); only new validation subjects need it
    from AgentRegistrationLib.data.dataset import find_subjects, load_split, prepare_subject
    from AgentRegistrationLib.data.image_io import read_image

    summary, geometry = training_set.summary, training_set.geometry
    all_subjects = find_subjects(data)
    template = next(s for s in all_subjects if s.name == summary.template)
    names = load_split(split)["validation"]
    chosen = [s for s in all_subjects if s.name in set(names)]
    if len(chosen) < 2:
        raise ValueError(f"validation needs 2 or more of the validation subjects of {split} in {data}; "
                         f"found {len(chosen)} ({', '.join(s.name for s in chosen) or 'none'})")
    template_image = read_image(template.image, "template image")
    cache = GroundTruthFolder(training_set.folder).validation_subjects
    prepared = [prepare_subject(s, template_image, geometry, cache) for s in chosen]
    return validation_pairs_from_subjects(prepared, count, seed)
