"""Capped exponential backoff with jitter for write-back retries.

The delay before retry ``n`` grows as ``initial * 2**(n-1)`` up to ``maximum``, and is then
drawn uniformly from the upper half of that ceiling ("equal jitter"): jobs that failed together
(a PACS restart fails every delivery at once) do not all come back at the same second, yet no
retry comes sooner than half the planned delay.
"""

from __future__ import annotations

import random

_MAX_EXPONENT = 62  # 2**62 seconds is beyond any cap; keeps the arithmetic finite


def backoff_ceiling(attempt: int, initial: float, maximum: float) -> float:
    """The un-jittered delay (seconds) after failed attempt number ``attempt`` (1-based)."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if initial <= 0 or maximum <= 0:
        raise ValueError("initial and maximum delays must be positive")
    exponent = min(attempt - 1, _MAX_EXPONENT)
    return min(maximum, initial * (2**exponent))


def next_delay(
    attempt: int,
    initial: float,
    maximum: float,
    *,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first attempt failed).

    Always within ``[ceiling / 2, ceiling]`` where ``ceiling = min(maximum, initial * 2**(attempt-1))``,
    so never above ``maximum``.

    >>> 1.0 <= next_delay(1, 2.0, 300.0) <= 2.0
    True
    >>> 150.0 <= next_delay(50, 2.0, 300.0) <= 300.0
    True
    """
    ceiling = backoff_ceiling(attempt, initial, maximum)
    draw = (rng or random).random()
    return ceiling / 2 + draw * (ceiling / 2)
