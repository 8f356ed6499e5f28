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

    ``crop_fraction`` is the crop box's extent as a fraction of the fixed image's extent,
    per axis (x, y, z); in 2-D the first two entries are used.
    """

    size: tuple[int, ...]
    control_spacing: tuple[float, ...]
    crop_fraction: tuple[float, ...] = (0.78, 0.78, 1.0)

    def __post_init__(self):
        if len(self.size) not in (2, 3) or len(self.control_spacing) != len(self.size):
            raise ValueError(f"model size {self.size} and control spacing {self.control_spacing} must both be 2-D or 3-D")

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

    def control_grid(self) -> ControlGrid:
        return ControlGrid.for_image(self.size, self.control_spacing)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelGeometry:
        return cls(tuple(d["size"]), tuple(d["control_spacing"]), tuple(d["crop_fraction"]))
