"""The decision: which folder a classified (or unreadable) photo goes to. Pure."""

from __future__ import annotations

LABEL_REJECTED = "rejected"
LABEL_UNSURE = "unsure"


def decide(p_mountain: float, p_road: float, unsure_below: float) -> str:
    """Label from probabilities; ``unsure`` only when a threshold is set and not met."""
    label = "road" if p_road > p_mountain else "mountain"
    if unsure_below > 0 and max(p_mountain, p_road) < unsure_below:
        return LABEL_UNSURE
    return label
