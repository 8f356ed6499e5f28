"""The model grid ("model space") of a trained agent: image size, B-spline control spacing and
crop box. Plain numbers only, so the learned part of the engine (SDM, network, agent, training)
needs torch and numpy alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .bspline import ControlGrid


@dataclass(frozen=True)
class ModelGeometry:
    """Size of the model grid and of its B-spline control grid, and the crop box.

    Two ways to place the crop box (the preprocessing the model was trained with):

    * the paper's (``box_spreads`` is ``None``): a box of ``crop_fraction`` of the fixed image's
      extent per axis (x, y, z; in 2-D the first two entries), centred on the image, with the moving
      image translated onto it;
    * localised (``box_spreads`` set): each image's box centred on its own organ and spanning
      ``box_spreads`` standard deviations of the organ per axis (:mod:`localisation`).
    """

    size: tuple[int, ...]
    control_spacing: tuple[float, ...]
    crop_fraction: tuple[float, ...] = (0.78, 0.78, 1.0)
    box_spreads: tuple[float, ...] | None = None

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

    def slab(self) -> ModelGeometry:
        """A 2-D geometry as a one-slice 3-D one (to sample a 2-D model's slice from a volume)."""
        if self.dim != 2:
            raise ValueError("only a 2-D model geometry has a one-slice slab")
        spreads = None if self.box_spreads is None else (*self.box_spreads, 1.0)
        return ModelGeometry((*self.size, 1), (*self.control_spacing, 1.0), self.crop_fraction, spreads)

    def control_grid(self) -> ControlGrid:
        return ControlGrid.for_image(self.size, self.control_spacing)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelGeometry:
        spreads = d.get("box_spreads")  # absent in bundles made before localisation: the paper's box
        return cls(tuple(d["size"]), tuple(d["control_spacing"]), tuple(d["crop_fraction"]),
                   None if spreads is None else tuple(float(b) for b in spreads))
