"""Reconnect delays: 0, 2, 4, 6, 8, then 10 s, each but the first with up to 20 % jitter,
and when the count of failures starts again.

Pure, so the schedule is tested exactly; the random source is passed in.

The count of consecutive failures is reset only by a session that stayed *healthy* for
``HEALTHY_SESSION`` seconds: registered, and still hearing from the server (a message or a
pong) that long after registering. Neither a socket merely opening (livekit-agents resets on
open and can retry a failing server with no delay forever) nor a registration alone resets it:
a server that accepts the registration and then breaks or hangs the session at once would
otherwise be retried with no delay, hundreds of times a second, and ``max_retry`` would never
be reached.
"""

from __future__ import annotations

import random
from typing import Final

STEP: Final = 2.0
CAP: Final = 10.0
JITTER: Final = 0.2
#: Seconds a session must have been heard from after registering to reset the failure count.
HEALTHY_SESSION: Final = 30.0


def reconnect_delay(failures: int, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after ``failures`` consecutive failed attempts (>= 1)."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    base = min((failures - 1) * STEP, CAP)
    if base == 0:
        return 0.0
    return base * (1.0 + JITTER * (rng or random).random())


def failures_after(failures: int, *, registered_at: float | None, last_heard: float) -> int:
    """The count of consecutive failures once an attempt has ended (the attempt included).

    ``registered_at`` is when the attempt registered (``None``: it never did), ``last_heard``
    the last time the server was heard from on it.
    """
    if registered_at is not None and last_heard - registered_at >= HEALTHY_SESSION:
        return 1
    return failures + 1
