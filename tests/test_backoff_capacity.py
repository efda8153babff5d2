from __future__ import annotations

import math
import random

import pytest
from livekit.protocol import agent

from trio_agents._backoff import HEALTHY_SESSION, failures_after, reconnect_delay
from trio_agents._capacity import MIN_JOB_WEIGHT, Admit, Capacity, Refuse, Wait
from trio_agents._ratelimit import RateLimiter, suppressed_note


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_schedule_without_jitter() -> None:
    rng = FixedRandom(0.0)
    assert [reconnect_delay(n, rng) for n in range(1, 9)] == [0, 2, 4, 6, 8, 10, 10, 10]


def test_jitter_is_at_most_twenty_percent() -> None:
    rng = FixedRandom(0.999999)
    assert reconnect_delay(1, rng) == 0.0
    assert reconnect_delay(2, rng) == pytest.approx(2.4, abs=1e-5)
    assert reconnect_delay(20, rng) == pytest.approx(12.0, abs=1e-4)
    delays = {reconnect_delay(3) for _ in range(50)}
    assert all(4.0 <= d < 4.8 for d in delays) and len(delays) > 1


def test_failures_start_at_one() -> None:
    with pytest.raises(ValueError):
        reconnect_delay(0)


def test_only_a_session_heard_from_for_a_while_resets_the_failures() -> None:
    # never registered, or registered and then broken or silent at once: one more failure
    assert failures_after(3, registered_at=None, last_heard=0.0) == 4
    assert failures_after(3, registered_at=100.0, last_heard=100.0) == 4
    assert failures_after(3, registered_at=100.0, last_heard=100.0 + HEALTHY_SESSION - 1) == 4
    # heard from for HEALTHY_SESSION after registering: this failure is the first in a row
    assert failures_after(3, registered_at=100.0, last_heard=100.0 + HEALTHY_SESSION) == 1


def test_a_session_broken_after_registration_costs_a_bounded_rate() -> None:
    # the hostile server of the issue: every session registers and breaks at once
    failures, clock, attempts = 0, 0.0, 0
    while clock < 60.0:
        attempts += 1
        failures = failures_after(failures, registered_at=clock, last_heard=clock)
        clock += reconnect_delay(failures, FixedRandom(0.0))
    assert attempts <= 10  # 0, 0, 2, 6, 12, 20, 30, 40, 50: not hundreds a second


def admit_all(cap: Capacity, n: int) -> list[str]:
    """The decision for each of ``n`` offers arriving at once, by kind."""
    return [type(cap.admit()).__name__ for _ in range(n)]


@pytest.mark.parametrize("capacity", [1, 2, 8])
def test_exact_admission_with_a_load_fnc_that_counts_jobs(capacity: int) -> None:
    """load_fnc = active jobs / capacity, threshold 1.0: exactly `capacity` jobs, whatever
    the number of idle processes (the old guess threshold / num_idle_processes took 5 of 5
    with capacity 2 and 8 idle processes)."""
    cap = Capacity(threshold=1.0)
    accepted: list[str] = []
    for _round in range(2 * capacity + 2):
        # a burst of offers: the first is admitted, the others wait for a sample
        decisions = admit_all(cap, 5)
        for n, decision in enumerate(decisions):
            if decision == "Admit":
                job = f"job-{len(accepted)}-{n}"
                cap.accepted(job)  # on_request accepts at once
                accepted.append(job)
        # the next load sample sees every accepted job (load_fnc(server) counts active_jobs)
        cap.sampled(len(accepted) / capacity, mark=cap.mark())
    assert len(accepted) == capacity
    assert cap.active_jobs == capacity and cap.reserved == 0
    refusal = cap.admit()
    assert isinstance(refusal, Refuse) and refusal.kind == "threshold"


def test_one_at_a_time_until_a_weight_is_known_then_by_weight() -> None:
    cap = Capacity(threshold=0.9)
    cap.sampled(0.08, mark=cap.mark())  # an idle machine at 8 %
    assert isinstance(cap.admit(), Admit)
    assert isinstance(cap.admit(), Wait)  # the first job has no price yet
    cap.accepted("a")
    before = cap.mark()
    cap.sampled(0.10, mark=0)  # a sample that does not reflect "a" yet (taken before it)
    assert cap.weight is None and isinstance(cap.admit(), Wait)
    cap.sampled(0.28, mark=before)  # reflects "a": the weight is learnt, above the idle 8 %
    assert cap.weight == pytest.approx(0.2)
    # 0.28 + n × 0.2 < 0.9 for n = 0..3: four more, the fifth is refused for reserved slots
    assert admit_all(cap, 5) == ["Admit"] * 4 + ["Refuse"]
    refusal = cap.admit()
    assert isinstance(refusal, Refuse) and refusal.kind == "reserved"
    assert "reserved slot" in refusal.reason
    # a refused or failed offer gives its slot back
    cap.release()
    assert isinstance(cap.admit(), Admit)


def test_a_refused_first_offer_lets_the_next_one_in() -> None:
    cap = Capacity(threshold=0.7)
    assert isinstance(cap.admit(), Admit)
    assert isinstance(cap.admit(), Wait)
    cap.release()  # on_request rejected it
    assert isinstance(cap.admit(), Admit)


def test_weight_has_a_floor_and_is_kept_after_jobs_end() -> None:
    cap = Capacity(threshold=0.7)
    assert isinstance(cap.admit(), Admit)
    cap.accepted("sleeper")
    cap.sampled(0.0, mark=cap.mark())  # a job that costs nothing measurable
    assert cap.weight == MIN_JOB_WEIGHT
    assert cap.ended("sleeper") and not cap.ended("sleeper")
    cap.sampled(0.0, mark=cap.mark())
    assert cap.weight == MIN_JOB_WEIGHT  # learnt once, kept
    assert admit_all(cap, 80).count("Admit") == 70  # 70 × 1 % reaches 0.7


def test_what_the_machine_spends_without_jobs_is_not_a_job_weight() -> None:
    """A machine busy at 57 % with other work, and one job adds 1 %: a job weighs 1 %, not
    57 % (which admitted 2 of 20 offers on a shared machine)."""
    cap = Capacity(threshold=0.7)
    cap.sampled(0.57, mark=cap.mark())  # no job: the baseline
    cap.admit()
    cap.accepted("a")
    cap.sampled(0.58, mark=cap.mark())
    assert cap.weight == pytest.approx(0.01)
    assert admit_all(cap, 20).count("Admit") == 12  # 0.58 + 12 × 0.01 reaches 0.7


def test_default_cpu_learns_from_the_last_interval() -> None:
    cap = Capacity(threshold=0.7)
    cap.admit()
    cap.accepted("a")
    cap.sampled(0.06, mark=cap.mark(), job_load=0.3)  # the average lags; the interval does not
    assert cap.weight == pytest.approx(0.3)


def test_threshold_and_draining_refusals_name_their_reason() -> None:
    cap = Capacity(threshold=0.7, load=0.8)
    refusal = cap.admit()
    assert isinstance(refusal, Refuse) and refusal.kind == "threshold"
    assert "0.80" in refusal.reason and "0.7" in refusal.reason
    assert cap.status() == agent.WS_FULL
    cap.load = 0.1
    assert cap.status() == agent.WS_AVAILABLE
    cap.draining = True
    refusal = cap.admit()
    assert isinstance(refusal, Refuse) and refusal.kind == "draining"
    assert cap.status() == agent.WS_FULL


def test_infinite_threshold_never_full_unless_draining() -> None:
    cap = Capacity(threshold=math.inf, load=1.0)
    assert all(isinstance(cap.admit(), Admit) for _ in range(100))
    assert cap.status() == agent.WS_AVAILABLE
    cap.draining = True
    assert isinstance(cap.admit(), Refuse)
    assert cap.status() == agent.WS_FULL


def test_release_without_admit_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        Capacity(threshold=1.0).release()


def test_rate_limiter_counts_what_it_leaves_out() -> None:
    limiter = RateLimiter(window=10.0)
    assert limiter.check("refuse", 0.0) == 0
    assert [limiter.check("refuse", t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert limiter.check("other", 5.0) == 0  # keys are independent
    assert limiter.check("refuse", 10.0) == 3
    assert limiter.check("refuse", 25.0) == 0
    assert suppressed_note(0) == ""
    assert "3 more" in suppressed_note(3)
