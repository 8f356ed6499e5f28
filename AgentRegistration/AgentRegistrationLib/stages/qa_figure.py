"""The picture of a registration a user can look at (``qa.png`` of a register folder), and the slice drawing the
demo's figure shares with it.

Three orthogonal slices through the centre of the fixed crop box (the organ the agent worked on; a 2-D image: the
image itself), each zoomed on the box: the fixed image with the warped moving label's outline (red) and the fixed
label's (green) when given, the crop box dashed; below, a checkerboard of the fixed and the warped moving image.

Windowing: the grey range of each image is the 1st..95th percentile of its intensities inside the organ's box, not of
the whole volume. An endorectal coil puts a few very bright voxels near the rectum; the whole volume's min..max maps
the prostate to a few percent of the range (black), and even its 99th percentile sits in the coil's glare.

Array conventions: SimpleITK arrays are (z, y, x) = index axes (k, j, i); the direction matrix's column ``a`` is
index axis ``a`` in physical space (LPS). A panel draws ``imshow(plane, origin=...)``: its columns follow one index
axis, its rows another.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.register_folder import dice_text, metrics_notes, worse_than

WINDOW_PERCENTILES = (1.0, 95.0)
"""Percentiles of the organ region's intensities mapped to black and white."""
VIEW_MARGIN = 0.3
"""Each panel shows the crop box and this fraction of its size on each side."""

# LPS, as ITK stores it: the letter at the + end and at the - end of each physical axis.
_LPS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))
_PLANE_NAMES = ("sagittal", "coronal", "axial")  # by the physical axis (L-R, A-P, S-I) a slice is normal to


def _toward(vector) -> str:
    """The anatomical letter a physical direction points to: its largest LPS component, by sign."""
    v = np.asarray(vector, dtype=float)
    axis = int(np.argmax(np.abs(v)))
    return _LPS_LETTERS[axis][0 if v[axis] > 0 else 1]


def _matrix(direction) -> np.ndarray:
    n = int(round(np.sqrt(len(direction))))
    if n * n != len(direction) or n not in (2, 3):
        raise ValueError(f"direction must be a 2x2 or 3x3 matrix, got {len(direction)} values")
    return np.asarray(direction, dtype=float).reshape(n, n)


def orientation_labels(direction, origin: str = "upper", columns: int = 0, rows: int = 1) -> dict[str, str]:
    """Anatomical letters at the left, right, top and bottom edges of a slice drawn with ``imshow(plane,
    origin=origin)``, whose columns follow index axis ``columns`` and rows index axis ``rows`` of an image with this
    direction matrix (SimpleITK's ``GetDirection()``, row-major, 2-D or 3-D, LPS).

    The default is an axial slice ``array[k]``: identity direction (+x = L, +y = P) with ``origin="upper"`` (row 0
    at the top) reads R left, L right, A top, P bottom, the radiological view. An oblique axis takes the letter of its
    largest component."""
    if origin not in ("upper", "lower"):
        raise ValueError(f"origin must be 'upper' or 'lower', got {origin!r}")
    matrix = _matrix(direction)
    across, down = matrix[:, columns], matrix[:, rows]
    row_up = -down if origin == "upper" else down  # physical direction toward the top of the panel
    return {"left": _toward(-across), "right": _toward(across), "top": _toward(row_up), "bottom": _toward(-row_up)}


# ---------------------------------------------------------------------------------------------------- regions
Box = tuple[slice, ...]
"""A box of voxels in array order (z, y, x), as ``array[box]`` takes it."""


def crop_box(image: sitk.Image, metrics: dict) -> Box | None:
    """The fixed crop box of ``metrics`` (``fixed_crop_centre``, ``_size``, ``_axes``: physical) as voxels of
    ``image``, clipped to it; ``None`` when the metrics hold no box or it lies outside the image."""
    if "fixed_crop_centre" not in metrics or "fixed_crop_size" not in metrics:
        return None
    dim = image.GetDimension()
    centre = np.asarray(metrics["fixed_crop_centre"], dtype=float)
    half = np.asarray(metrics["fixed_crop_size"], dtype=float) / 2
    axes = np.asarray(metrics.get("fixed_crop_axes", image.GetDirection()), dtype=float).reshape(dim, dim)
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * dim, indexing="ij")).reshape(dim, -1).T
    corners = [image.TransformPhysicalPointToContinuousIndex((centre + axes @ (s * half)).tolist()) for s in signs]
    return _clipped(np.min(corners, axis=0), np.max(corners, axis=0), image.GetSize())


def label_box(label: sitk.Image | np.ndarray | None, margin: float = 0.5) -> Box | None:
    """The label's bounding box grown by ``margin`` of its size on each side (its neighbourhood), clipped; ``None``
    without a label or for an empty one."""
    if label is None:
        return None
    array = sitk.GetArrayFromImage(label) if isinstance(label, sitk.Image) else np.asarray(label)
    found = np.nonzero(array)
    if not len(found[0]):
        return None
    low = np.array([f.min() for f in found], dtype=float)[::-1]  # index (x, y, z) order
    high = np.array([f.max() for f in found], dtype=float)[::-1]
    grow = (high - low + 1) * margin
    return _clipped(low - grow, high + grow, array.shape[::-1])


def _clipped(low, high, size) -> Box | None:
    """Index bounds (x, y, z order, continuous) as array-order slices inside ``size``; ``None`` when empty."""
    start = np.clip(np.floor(np.asarray(low) + 0.5), 0, np.asarray(size) - 1).astype(int)
    stop = np.clip(np.floor(np.asarray(high) + 0.5), 0, np.asarray(size) - 1).astype(int) + 1
    if np.any(stop <= start) or np.any(np.asarray(high) < 0) or np.any(np.asarray(low) > np.asarray(size) - 1):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1], strict=True))


def organ_window(array: np.ndarray, box: Box | None = None,
                 percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> tuple[float, float]:
    """Grey range (black, white) for ``array``: the ``percentiles`` of its intensities inside ``box`` (the organ's
    region; the whole array when ``None``). Never empty: a flat region widens to one unit."""
    values = np.asarray(array, dtype=float)[box] if box is not None else np.asarray(array, dtype=float)
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, percentiles))
    return (low, high) if high > low else (low, low + 1.0)


def windowed(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``array`` mapped through ``window`` onto 0..1 (clipped)."""
    low, high = window
    return np.clip((np.asarray(array, dtype=float) - low) / (high - low), 0.0, 1.0)


def checkerboard(a: np.ndarray, b: np.ndarray, tile: float, spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Squares of ``a`` and ``b`` (two planes of one shape), ``tile`` physical units wide; ``spacing``: of the
    plane's rows and columns. The square at row 0, column 0 is ``a``'s."""
    rows, cols = np.indices(np.shape(a), dtype=float)
    odd = (np.floor(rows * spacing[0] / tile) + np.floor(cols * spacing[1] / tile)) % 2 == 1
    return np.where(odd, b, a)


# ---------------------------------------------------------------------------------------------------- drawing
def show_slice(ax, plane: np.ndarray, window: tuple[float, float] | None, contours=(), letters: dict | None = None,
               origin: str = "upper", aspect: float = 1.0) -> None:
    """One panel: ``plane`` in grey through ``window`` (``None``: already 0..1), the outlines of ``contours``
    (``(mask, colour)`` pairs of the plane's shape), the orientation ``letters`` at the edges, no ticks.
    The one way the figures of this package draw a slice."""
    ax.imshow(plane if window is None else windowed(plane, window), cmap="gray", vmin=0.0, vmax=1.0, origin=origin,
              aspect=aspect, interpolation="nearest")
    for mask, colour in contours:
        if mask is not None and np.any(mask):  # contour coordinates: element [r, c] at (c, r), as imshow draws it
            ax.contour(np.asarray(mask) > 0, levels=[0.5], colors=colour, linewidths=1.2)
    ax.set_xticks([])
    ax.set_yticks([])
    for edge, letter in (letters or {}).items():
        x, y, ha, va = {"left": (0.02, 0.5, "left", "center"), "right": (0.98, 0.5, "right", "center"),
                        "top": (0.5, 0.98, "center", "top"), "bottom": (0.5, 0.02, "center", "bottom")}[edge]
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=11, fontweight="bold",
                gid=f"orientation-{edge}")


@dataclass(frozen=True)
class Plane:
    """A slice of an image through index ``position`` (x, y, z order) normal to index axis ``normal``: its columns
    follow index axis ``columns``, its rows index axis ``rows``."""

    normal: int
    columns: int
    rows: int
    position: tuple[int, ...]

    def take(self, array: np.ndarray) -> np.ndarray:
        """The plane of an array of the image (array order: index axis ``a`` is array axis ``dim - 1 - a``)."""
        dim = array.ndim
        if dim == 2:
            return array
        cut = [slice(None)] * dim
        cut[dim - 1 - self.normal] = self.position[self.normal]
        plane = array[tuple(cut)]  # remaining axes in array order: the higher index axis first (rows)
        return plane if self.rows > self.columns else plane.T

    def bounds(self, box: Box | None, dim: int) -> tuple[slice, slice] | None:
        """The (rows, columns) part of an array-order ``box`` in this plane."""
        return None if box is None else (box[dim - 1 - self.rows], box[dim - 1 - self.columns])


def planes(image: sitk.Image, centre) -> list[Plane]:
    """The slices a figure shows through physical point ``centre``: the image itself in 2-D; in 3-D the three
    orthogonal index planes through the voxel nearest ``centre`` (clipped into the image), normal to k, j, i."""
    size = np.array(image.GetSize())
    index = np.rint(image.TransformPhysicalPointToContinuousIndex([float(c) for c in centre]))
    position = tuple(int(v) for v in np.clip(index, 0, size - 1))
    if image.GetDimension() == 2:
        return [Plane(2, 0, 1, position)]
    return [Plane(2, 0, 1, position), Plane(1, 0, 2, position), Plane(0, 1, 2, position)]


def plane_name(image: sitk.Image, plane: Plane) -> str:
    """``axial slice 12 of 24 (index k 11)``: the anatomical name by the physical axis the plane is normal to."""
    if image.GetDimension() == 2:
        return "2-D image"
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, plane.normal]
    name = _PLANE_NAMES[int(np.argmax(np.abs(normal)))]
    k, count = plane.position[plane.normal], image.GetSize()[plane.normal]
    return f"{name} slice {k + 1} of {count} (index {'ijk'[plane.normal]} {k})"


def _origin(image: sitk.Image, plane: Plane) -> str:
    """Row 0 at the top for an in-plane (axial) view, as the demo draws it; through-plane views put the superior
    end at the top."""
    if plane.rows != 2:
        return "upper"
    down = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, plane.rows]
    return "lower" if down[2] > 0 else "upper"


def qa_figure(fixed: sitk.Image, warped: sitk.Image, metrics: dict, fixed_label: sitk.Image | None = None,
              warped_label: sitk.Image | None = None, title: str = "") -> Figure:
    """The QA figure (see the module's note): one row per slice of :func:`planes` through the fixed crop's centre
    (the fixed label's centre, else the image centre, when ``metrics`` hold no crop box), each panel as high as its
    physical extent asks; left the fixed image with the outlines, right the checkerboard; the title names the pair
    and its Dice on the fixed image (none, start, after; WORSE in red), with the notes of :func:`metrics_notes`
    below. Returns a matplotlib ``Figure`` (no window)."""
    dim = fixed.GetDimension()
    fixed_array, warped_array = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(warped)
    fixed_mask = None if fixed_label is None else sitk.GetArrayFromImage(fixed_label) > 0
    warped_mask = None if warped_label is None else sitk.GetArrayFromImage(warped_label) > 0
    box = crop_box(fixed, metrics)
    region = box if box is not None else label_box(fixed_label)
    if "fixed_crop_centre" in metrics:
        centre = metrics["fixed_crop_centre"]
    else:
        middle = [((s.start + s.stop - 1) / 2 if region else n / 2) for s, n in
                  zip(region or [None] * dim, fixed_array.shape, strict=True)]
        centre = fixed.TransformContinuousIndexToPhysicalPoint(middle[::-1])
    fixed_window, warped_window = organ_window(fixed_array, region), organ_window(warped_array, region)
    view = _grown(region, fixed_array.shape)
    shown = planes(fixed, centre)
    spacing = fixed.GetSpacing()
    shapes = [_extent(plane, view, fixed_array.shape, spacing) for plane in shown]  # (height, width), physical
    ratios = [max(h / w, 0.2) for h, w in shapes]
    fig = Figure(figsize=(10, 1.6 + 4.6 * sum(ratios)))
    axes = fig.subplots(len(shown), 2, squeeze=False, gridspec_kw={"height_ratios": ratios})
    tile = max(max(shape) for shape in shapes) / 6
    for row, plane in enumerate(shown):
        origin, aspect = _origin(fixed, plane), spacing[plane.rows] / spacing[plane.columns]
        letters = orientation_labels(fixed.GetDirection(), origin, plane.columns, plane.rows)
        contours = [(None if fixed_mask is None else plane.take(fixed_mask), "lime"),
                    (None if warped_mask is None else plane.take(warped_mask), "red")]
        left, right = axes[row]
        show_slice(left, plane.take(fixed_array), fixed_window, contours, letters, origin, aspect)
        board = checkerboard(windowed(plane.take(fixed_array), fixed_window),
                             windowed(plane.take(warped_array), warped_window), tile,
                             (spacing[plane.rows], spacing[plane.columns]))
        show_slice(right, board, None, (), None, origin, aspect)  # oriented as its left neighbour: no letters
        left.set_title(f"fixed, {plane_name(fixed, plane)}", fontsize=9)
        right.set_title("checkerboard: fixed / warped moving", fontsize=9)
        if box is not None:
            rows, cols = plane.bounds(box, dim)
            left.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start,
                                     rows.stop - rows.start, fill=False, edgecolor="yellow", linestyle="--",
                                     linewidth=0.8, gid="crop-box"))
        if view is not None:
            rows, cols = plane.bounds(view, dim)
            for ax in (left, right):
                ax.set_xlim(cols.start - 0.5, cols.stop - 0.5)
                ylim = (rows.start - 0.5, rows.stop - 0.5)
                ax.set_ylim(ylim[::-1] if origin == "upper" else ylim)
    _titles(fig, metrics, title, box is not None, fixed_label is not None, warped_label is not None)
    return fig


def _extent(plane: Plane, view: Box | None, shape, spacing) -> tuple[float, float]:
    """Physical height and width of what a panel of ``plane`` shows (``view``, else the whole plane)."""
    dim = len(shape)
    rows, cols = plane.bounds(view, dim) if view is not None else (slice(0, shape[dim - 1 - plane.rows]),
                                                                    slice(0, shape[dim - 1 - plane.columns]))
    return ((rows.stop - rows.start) * spacing[plane.rows], (cols.stop - cols.start) * spacing[plane.columns])


def _grown(box: Box | None, shape) -> Box | None:
    """``box`` and :data:`VIEW_MARGIN` of its size on each side, clipped to ``shape``."""
    if box is None:
        return None
    grown = []
    for s, n in zip(box, shape, strict=True):
        extra = int(round((s.stop - s.start) * VIEW_MARGIN))
        grown.append(slice(max(0, s.start - extra), min(n, s.stop + extra)))
    return tuple(grown)


def _titles(fig: Figure, metrics: dict, title: str, box: bool, fixed_label: bool, warped_label: bool) -> None:
    worse = bool(worse_than(metrics))
    dice = dice_text(metrics).replace("Dice ", "Dice (fixed image) ", 1).replace(" -> ", ", after ")
    fig.suptitle("\n".join(t for t in (title, dice) if t) or "registration", fontsize=11,
                 color="red" if worse else "black", fontweight="bold" if worse else "normal")
    outlines = [name for name, shown in (("fixed label green", fixed_label), ("warped moving label red", warped_label))
                if shown]
    legend = ([f"outlines: {', '.join(outlines)}"] if outlines else []) + (
        ["dashed yellow: the crop box the agent worked on"] if box else [])
    legend.append(f"grey: percentiles {WINDOW_PERCENTILES[0]:g}-{WINDOW_PERCENTILES[1]:g} of each image in the "
                  f"{'crop box' if box else 'organ region'}; letters: patient R/L, A/P, S/I")
    notes = [line for note in metrics_notes(metrics) for line in textwrap.wrap(note, 150)]
    fig.text(0.5, 0.005, "\n".join(["; ".join(legend[:-1]), legend[-1], *notes]).strip(), ha="center", va="bottom",
             fontsize=7.5)
    height = fig.get_figheight()  # margins in inches: the title's two lines above, the legend's lines below
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.85 / height, bottom=(0.45 + 0.14 * len(notes)) / height,
                        wspace=0.04, hspace=0.3)


def write_qa_figure(path: str | Path, *args, **kwargs) -> None:
    """Write :func:`qa_figure` (same arguments) as a PNG, atomically."""
    figure = qa_figure(*args, **kwargs)
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
