"""A physical point as text: the one grammar of ``agentreg register --fixed-point`` and of the ``fixed_point`` column
of a CSV of pairs (``agentreg register-many``), and how a worker command writes one. Standard library only."""

from __future__ import annotations

import re
from collections.abc import Sequence


def parse_point(text: str | None, what: str = "fixed_point") -> tuple[float, ...] | None:
    """A physical point written as numbers separated by commas, semicolons or spaces (``None`` when empty);
    ``ValueError`` naming ``what`` and the text otherwise."""
    if not text or not text.strip():
        return None
    try:
        return tuple(float(v) for v in re.split(r"[,; ]+", text.strip()))
    except ValueError:
        raise ValueError(f"{what} {text!r}: give the point as numbers separated by commas, e.g. 12.5,-30,4") from None


def point_text(point: Sequence[float]) -> str:
    """``point`` as :func:`parse_point` reads it back exactly (``repr`` of each coordinate, commas between)."""
    return ",".join(repr(float(v)) for v in point)
