"""Reconnect delays: 0, 2, 4, 6, 8, then 10 s, each but the first with up to 20 % jitter.

Pure, so the schedule is tested exactly; the random source is passed in.
"""

from __future__ import annotations

import random
from typing import Final

STEP: Final = 2.0
CAP: Final = 10.0
JITTER: Final = 0.2


def reconnect_delay(failures: int, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after ``failures`` consecutive failed attempts (>= 1).

    The counter is reset only by a successful registration, never by a socket merely opening
    (livekit-agents resets it on open and can retry a failing server with no delay forever).
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    base = min((failures - 1) * STEP, CAP)
    if base == 0:
        return 0.0
    return base * (1.0 + JITTER * (rng or random).random())
