from __future__ import annotations

import math
import random

import pytest
from livekit.protocol import agent

from trio_agents._backoff import reconnect_delay
from trio_agents._capacity import Capacity


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


def test_reservation_prevents_overbooking_within_one_sample() -> None:
    cap = Capacity(threshold=0.7, idle_target=2)
    # no job ran yet: a job is guessed to weigh threshold / idle_target = 0.35
    assert cap.try_reserve(active_jobs=0)
    assert cap.effective_load(0) == pytest.approx(0.35)
    assert cap.try_reserve(active_jobs=0)
    assert not cap.try_reserve(active_jobs=0)  # 0.70 >= 0.7
    assert cap.status(0) == agent.WS_FULL
    cap.release()
    assert cap.status(0) == agent.WS_AVAILABLE


def test_weight_follows_measured_load_per_job() -> None:
    cap = Capacity(threshold=0.7, idle_target=4, load=0.4)
    assert cap.job_weight(active_jobs=2) == pytest.approx(0.2)
    assert cap.try_reserve(2)  # 0.4 < 0.7
    assert cap.effective_load(2) == pytest.approx(0.6)
    assert cap.try_reserve(2)  # 0.6 < 0.7
    assert not cap.try_reserve(2)  # 0.8 >= 0.7


def test_infinite_threshold_never_full_unless_draining() -> None:
    cap = Capacity(threshold=math.inf, load=5.0)
    assert all(cap.try_reserve(0) for _ in range(100))
    cap.draining = True
    assert not cap.try_reserve(0)
    assert cap.status(0) == agent.WS_FULL


def test_release_without_reserve_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        Capacity(threshold=1.0).release()
