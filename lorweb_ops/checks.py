"""Checks and renderings for values that come from clients or files: any JSON number, any size, any type.

``math.isfinite`` overflows on integers past 1e308, ``repr`` of a 5000-digit integer raises, and a message that
renders a value of unknown size can cost gigabytes: every input check goes through these two functions.
"""

from __future__ import annotations

import math
from typing import Any

#: the most a strength may scale a LoRA by, either way: far past any useful value, short of overflow in fp16
STRENGTH_LIMIT = 10.0


def show(value: Any, limit: int = 60) -> str:
    """A bounded repr for messages."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**limit else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:limit] + "…") if len(value) > limit else repr(value)
    return f"a {type(value).__name__}"


def is_number_in(value: Any, low: float, high: float, *, whole: bool = False) -> bool:
    """``low <= value <= high`` for a real number (a whole one with ``whole``); False for anything else, NaN too."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and (whole or not math.isfinite(value)):
        return False
    return low <= value <= high  # exact for integers of any size
