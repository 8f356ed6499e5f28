"""The model grid ("model space") of a trained agent: image size, B-spline control spacing and
crop box. Plain numbers only, so the learned part of the engine (SDM, network, agent, training)
needs torch and numpy alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from AgentRegistrationLib.core.bspline import ControlGrid


@dataclass(frozen=True)
class ModelGeometry:
    """Size of the model grid and of its B-spline control grid, and the crop box.

    Two ways to place the crop box (the preprocessing the model was trained with):

    * the paper's (``box_spreads`` is ``None``): a box of ``crop_fraction`` of the fixed image's
      extent per axis (x, y, z; in 2-D the first two entries), centred on the image, with the moving
      image translated onto it;
    * localised (``box_spreads`` set): each image's box centred on its own organ and spanning
      ``box_spreads`` standard deviations of the organ per axis (:mod:`localisation`).

    ``choice`` says how the geometry was chosen (:data:`protocol.GEOMETRY_CHOICES`; ``+overrides`` when the user set some of
    its numbers): a description, not part of the geometry (not compared).
    """

    size: tuple[int, ...]
    control_spacing: tuple[float, ...]
    crop_fraction: tuple[float, ...] = (0.78, 0.78, 1.0)
    box_spreads: tuple[float, ...] | None = None
    choice: str = field(default="paper", compare=False)

    def __post_init__(self):
        if len(self.size) not in (2, 3) or len(self.control_spacing) != len(self.size):
            raise ValueError(f"model size {self.size} and control spacing {self.control_spacing} must both be 2-D or 3-D")
        if self.box_spreads is not None and (len(self.box_spreads) != len(self.size) or min(self.box_spreads) <= 0):
            raise ValueError(f"box spreads {self.box_spreads} must be {len(self.size)} positive numbers")

    @property
    def localised(self) -> bool:
        """Whether crops are centred on the organ and sized to it (else the paper's centred box)."""
        return self.box_spreads is not None

    @property
    def dim(self) -> int:
        return len(self.size)

    @property
    def array_shape(self) -> tuple[int, ...]:
        return tuple(self.size[::-1])

    @classmethod
    def paper(cls, dim: int) -> ModelGeometry:
        """The paper's grids: 100x100 with 16x16 control spacing, 75x75x20 with 16x16x8."""
        if dim == 2:
            return cls((100, 100), (16.0, 16.0))
        return cls((75, 75, 20), (16.0, 16.0, 8.0))

    @classmethod
    def localised_grid(cls, dim: int, box_spreads: tuple[float, ...]) -> ModelGeometry:
        """The paper's grids with crops centred on the organ and sized to it."""
        paper = cls.paper(dim)
        return cls(paper.size, paper.control_spacing, paper.crop_fraction, tuple(float(b) for b in box_spreads))

    @classmethod
    def from_organ_spread(cls, spread: tuple[float, ...], box_spreads: tuple[float, ...],
                          voxels: int | None = None, min_intervals: int = 2) -> ModelGeometry:
        """The ``auto`` geometry of an organ whose median spread (standard deviation per axis, physical units) is
        ``spread``: crops of ``box_spreads`` spreads per axis on the organ, sampled with isotropic voxels (physical
        units) on a grid of about ``voxels`` voxels (default: the paper's budget, 10,000 in 2-D, 112,500 in 3-D),
        and a control spacing (model voxels, the same physical length per axis) giving about the paper's number of
        control intervals across the box, at least ``min_intervals`` per axis."""
        dim = len(box_spreads)
        paper = cls.paper(dim)
        extent = [float(b) * float(s) for b, s in zip(box_spreads, spread[:dim], strict=True)]
        if len(spread) < dim or min(extent) <= 0:
            raise ValueError(f"cannot derive a {dim}-D model grid from the organ spread {list(spread)}")
        volume = math.prod(extent)
        voxel = (volume / (voxels or math.prod(paper.size))) ** (1 / dim)
        size = tuple(max(int(round(e / voxel)) + 1, 2 * min_intervals + 1) for e in extent)
        voxel_per_axis = [e / (n - 1) for e, n in zip(extent, size, strict=True)]
        intervals = math.prod((n - 1) / c for n, c in zip(paper.size, paper.control_spacing, strict=True))
        control = (volume / intervals) ** (1 / dim)  # physical
        spacing = []
        for v, n in zip(voxel_per_axis, size, strict=True):
            spacing.append(round(min(control / v, (n - 1) / min_intervals), 1))
        return cls(size, tuple(spacing), paper.crop_fraction, tuple(float(b) for b in box_spreads), "auto")

    def with_overrides(self, size: tuple[int, ...] | None = None, control_spacing: tuple[float, ...] | None = None,
                       box_spreads: tuple[float, ...] | None = None) -> ModelGeometry:
        """This geometry with the numbers the user set (``None``: kept); checked as any geometry."""
        given = {k: tuple(v) for k, v in (("size", size), ("control_spacing", control_spacing),
                                          ("box_spreads", box_spreads)) if v is not None}
        if not given:
            return self
        changed = replace(self, **given, choice=self.choice if self.choice.endswith("+overrides")
                          else f"{self.choice}+overrides")
        if min(changed.size) < 2 or min(changed.control_spacing) <= 0:
            raise ValueError(f"grid size {list(changed.size)} needs at least 2 voxels per axis and control spacing "
                             f"{list(changed.control_spacing)} positive numbers (model voxels)")
        return changed

    def description(self) -> str:
        """One line for reports and model cards: how it was chosen, grid, control spacing, crop."""
        crop = (f"crops on the organ spanning {list(self.box_spreads)} standard deviations per axis" if self.localised
                else f"the paper's centred crop of {list(self.crop_fraction[:self.dim])} of the image")
        return (f"geometry '{self.choice}': grid {list(self.size)} voxels, B-spline control spacing "
                f"{list(self.control_spacing)} grid voxels, {crop}")

    def slab(self) -> ModelGeometry:
        """A 2-D geometry as a one-slice 3-D one (to sample a 2-D model's slice from a volume)."""
        if self.dim != 2:
            raise ValueError("only a 2-D model geometry has a one-slice slab")
        spreads = None if self.box_spreads is None else (*self.box_spreads, 1.0)
        return ModelGeometry((*self.size, 1), (*self.control_spacing, 1.0), self.crop_fraction, spreads, self.choice)

    def control_grid(self) -> ControlGrid:
        return ControlGrid.for_image(self.size, self.control_spacing)

    def to_dict(self) -> dict:
        """Plain JSON-able values; ``choice`` only when not the paper's (so earlier records read the same)."""
        d = asdict(self)
        if self.choice == "paper":
            d.pop("choice")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelGeometry:
        spreads = d.get("box_spreads")  # absent in bundles made before localisation: the paper's box
        return cls(tuple(d["size"]), tuple(d["control_spacing"]), tuple(d["crop_fraction"]),
                   None if spreads is None else tuple(float(b) for b in spreads), str(d.get("choice", "paper")))
