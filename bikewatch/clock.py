"""Timestamps as the CSV, the journals and the status files write them: UTC ISO 8601."""

from __future__ import annotations

import datetime as dt
from typing import Any


def utc_now(timespec: str = "milliseconds") -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec=timespec)


def parse_timestamp(text: Any) -> dt.datetime | None:
    """An aware datetime, or None for anything unreadable; a naive one is UTC (what bikewatch writes)."""
    try:
        when = dt.datetime.fromisoformat(str(text).strip())
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
