"""JSON that any reader parses: infinities and NaN become strings or null."""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """JSON has no infinity or NaN: they are written as the strings "inf", "-inf" and "nan"
    (an infinite SQNR means bit-identical outputs), never as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
