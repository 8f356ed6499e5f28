"""Pairs of subjects: every ordered pair (moving, fixed), or a seeded subset. Standard library only, so that
training and evaluating prepared pairs import it on a machine without SimpleITK."""

from __future__ import annotations

import random


def ordered_pairs(names: list[str], max_pairs: int = 0, seed: int = 0) -> list[tuple[str, str]]:
    """Every ordered pair ``(moving, fixed)`` of ``names``, or a seeded random subset of at most ``max_pairs``
    (sorted)."""
    pairs = [(m, f) for m in names for f in names if m != f]
    if max_pairs and len(pairs) > max_pairs:
        pairs = sorted(random.Random(seed).sample(pairs, max_pairs))
    return pairs
