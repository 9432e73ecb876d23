"""The words for where a photo can go: one type, spelled once.

The model's two classes come first, in the order of its two outputs; ``unsure`` and
``rejected`` are the service's own folders (a confidence below ``unsure_below``, and a
file that cannot be classified at all).
"""

from __future__ import annotations

import enum


class Label(enum.StrEnum):
    """A destination folder under the output, and the ``label`` column of the CSV."""

    MOUNTAIN = "mountain"
    ROAD = "road"
    UNSURE = "unsure"
    REJECTED = "rejected"


CLASSES: tuple[str, str] = (Label.MOUNTAIN.value, Label.ROAD.value)
"""The model's classes, in the order of its outputs (p_mountain, p_road)."""

SORTED: tuple[str, ...] = (*CLASSES, Label.UNSURE.value)
"""The folders of photos the model classified."""

FOLDERS: tuple[str, ...] = (*SORTED, Label.REJECTED.value)
"""Every folder the service writes under the output."""
