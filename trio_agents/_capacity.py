"""Admission: is there room for one more job? Pure accounting, no clock, no I/O.

The load is sampled every 0.5 s, so two offers arriving inside one sampling window would both
see the same load and could both take the last slot. An admitted offer therefore *reserves* a
slot until its job runs (it is then counted in ``active_jobs``) or the offer ends; a reserved
slot weighs what one running job is estimated to weigh.
"""

from __future__ import annotations

import math
from typing import final

import attrs
from livekit.protocol import agent


@final
@attrs.define
class Capacity:
    threshold: float
    """At or above this effective load the server is full (``inf`` disables)."""
    idle_target: int = 1
    """``num_idle_processes``: used to guess a job's weight before any job ran."""
    load: float = 0.0
    reserved: int = 0
    draining: bool = False

    def job_weight(self, active_jobs: int) -> float:
        if active_jobs > 0 and self.load > 0:
            return self.load / active_jobs
        if math.isinf(self.threshold):
            return 0.0
        return self.threshold / max(self.idle_target, 1)

    def effective_load(self, active_jobs: int) -> float:
        return self.load + self.reserved * self.job_weight(active_jobs)

    def available(self, active_jobs: int) -> bool:
        return not self.draining and self.effective_load(active_jobs) < self.threshold

    def status(self, active_jobs: int) -> int:
        return agent.WS_AVAILABLE if self.available(active_jobs) else agent.WS_FULL

    def try_reserve(self, active_jobs: int) -> bool:
        """Take a slot for an offer if one is free."""
        if not self.available(active_jobs):
            return False
        self.reserved += 1
        return True

    def release(self) -> None:
        if self.reserved <= 0:
            raise RuntimeError("release() without a matching try_reserve()")
        self.reserved -= 1
