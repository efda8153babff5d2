"""Admission: is there room for one more job? Pure accounting, no clock, no I/O.

Theory of operation
-------------------
The load (``load_fnc``, or CPU) is a *sample*: it says what the jobs that existed when it was
taken cost, never what a job accepted a moment ago will cost. Guessing that cost from
``num_idle_processes`` (what we and livekit-agents did) is wrong both ways: 5 offers accepted
where 2 fit, or 18 of 20 refused on an idle machine. So admission counts instead of guessing:

* A job is **active** from the moment it is accepted (``accepted``) until its final status
  (``ended``). An offer that passed admission and is waiting for ``on_request`` is
  **reserved**.
* Each sample records which active jobs it **reflects** (the caller says: jobs accepted
  before ``mark()`` was taken). Active jobs it does not reflect and reserved offers are
  **unmeasured**.
* The **per-job weight** is learnt from samples: ``(job_load - baseline) / reflected jobs``,
  at least ``MIN_JOB_WEIGHT``, where the baseline is the load of the last sample taken with
  no job active (what the machine spends without us: other tenants, the server itself).
  Once learnt it is kept (a later sample with jobs refines it).
* An offer is admitted when ``load + unmeasured × weight`` is below the threshold. Until a
  weight is known, unmeasured work has no price, so offers are admitted **one at a time**: the
  next one waits (``Wait``) until a sample reflects the previous job, or its offer is refused.
  A burst on an idle machine is thus taken as fast as the load sample follows, up to what the
  machine holds.

``admit()`` answers ``Admit``, ``Wait`` or a ``Refuse`` that names the real reason (draining,
the threshold, or slots reserved for jobs not yet measured).
"""

from __future__ import annotations

import math
from typing import Final, final

import attrs
from livekit.protocol import agent

#: The least a job is assumed to cost (1 % of the machine): a sample of sleeping jobs that
#: shows no load at all must not open the door to an unbounded burst.
MIN_JOB_WEIGHT: Final = 0.01


@final
@attrs.frozen
class Admit:
    """The offer may go to ``on_request``; a slot is reserved (``release`` or ``accepted``)."""


@final
@attrs.frozen
class Wait:
    """No decision yet: wait for the next sample (or a reservation to end), then ask again."""

    reason: str


@final
@attrs.frozen
class Refuse:
    """Refuse the offer; ``reason`` is worth logging."""

    reason: str
    kind: str
    """``"draining"``, ``"threshold"`` or ``"reserved"``: for rate-limited logs."""


Admission = Admit | Wait | Refuse


@final
@attrs.define
class Capacity:
    threshold: float
    """At or above this effective load the server is full (``inf`` disables)."""
    load: float = 0.0
    """The last sample, 0..1."""
    weight: float | None = None
    """The learnt per-job weight; ``None`` until a sample reflected a job."""
    reserved: int = 0
    """Offers admitted and not yet accepted or refused."""
    draining: bool = False
    _active: dict[str, int] = attrs.field(factory=dict, repr=False)
    """Active job id -> its acceptance number (``_accepts`` when it was accepted)."""
    _accepts: int = attrs.field(default=0, repr=False)
    _reflected: set[str] = attrs.field(factory=set, repr=False)
    """Active jobs the last sample reflects."""
    _baseline: float = attrs.field(default=0.0, repr=False)
    """The load of the last sample taken with no job active."""

    # -- jobs ---------------------------------------------------------------------------------

    @property
    def active_jobs(self) -> int:
        return len(self._active)

    @property
    def unmeasured(self) -> int:
        """Reserved offers and active jobs that no sample reflects yet."""
        return self.reserved + len(self._active.keys() - self._reflected)

    def admit(self) -> Admission:
        """Decide on one offer; ``Admit`` reserves a slot for it."""
        if self.draining:
            return Refuse("draining", "draining")
        if math.isinf(self.threshold):
            self.reserved += 1
            return Admit()
        if self.load >= self.threshold:
            return Refuse(f"load {self.load:.2f} is at or above the threshold "
                          f"{self.threshold:g}", "threshold")
        unmeasured = self.unmeasured
        if unmeasured and self.weight is None:
            return Wait(f"{unmeasured} job(s) not measured yet and no per-job weight known")
        effective = self.effective_load()
        if effective >= self.threshold:
            return Refuse(f"load {self.load:.2f} + {unmeasured} reserved slot(s) × "
                          f"{self.weight:.3f} per job = {effective:.2f} is at or above the "
                          f"threshold {self.threshold:g}", "reserved")
        self.reserved += 1
        return Admit()

    def release(self) -> None:
        """An admitted offer ended without a job (refused, timed out, failed)."""
        if self.reserved <= 0:
            raise RuntimeError("release() without a matching admit()")
        self.reserved -= 1

    def accepted(self, job_id: str, *, reserved: bool = True) -> None:
        """The job is active from now until ``ended``; its reservation (if any) becomes it."""
        if reserved:
            self.release()
        if job_id not in self._active:
            self._accepts += 1
            self._active[job_id] = self._accepts

    def ended(self, job_id: str) -> bool:
        """The job reached its final status; ``False`` if it was not active."""
        self._reflected.discard(job_id)
        return self._active.pop(job_id, None) is not None

    # -- samples ------------------------------------------------------------------------------

    def mark(self) -> int:
        """Taken when a sample starts: the jobs accepted so far are those it can reflect."""
        return self._accepts

    def sampled(self, load: float, *, mark: int, job_load: float | None = None) -> None:
        """Record a sample of the load that reflects the jobs accepted up to ``mark``.

        ``job_load`` is the part of the load to divide among those jobs to learn the per-job
        weight (default ``load``); the default CPU load passes its latest interval there, not
        its moving average, which lags a new job by several samples.
        """
        self.load = load
        share = load if job_load is None else job_load
        if not self._active:
            self._baseline = share
        self._reflected = {job for job, number in self._active.items() if number <= mark}
        if self._reflected:
            self.weight = max((share - self._baseline) / len(self._reflected), MIN_JOB_WEIGHT)

    # -- reports ------------------------------------------------------------------------------

    def effective_load(self) -> float:
        """The load with the unmeasured work priced at the per-job weight (0 if unknown)."""
        return self.load + self.unmeasured * (self.weight or 0.0)

    def available(self) -> bool:
        return not self.draining and self.effective_load() < self.threshold

    def status(self) -> int:
        return agent.WS_AVAILABLE if self.available() else agent.WS_FULL
