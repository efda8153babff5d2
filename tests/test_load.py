from __future__ import annotations

import math
from pathlib import Path

import pytest

from trio_agents._load import (
    CpuLoad,
    MovingAverage,
    cgroup_load,
    host_load,
    parse_cgroup_usage,
    parse_cpu_max,
    parse_proc_stat,
    sanitize_load,
)


def test_cpu_max() -> None:
    assert parse_cpu_max("max 100000\n", 8) == 8.0
    assert parse_cpu_max("150000 100000\n", 8) == 1.5


def test_cgroup_usage() -> None:
    text = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
    assert parse_cgroup_usage(text) == 2.5
    with pytest.raises(ValueError):
        parse_cgroup_usage("user_usec 1\n")


def test_proc_stat() -> None:
    busy, total = parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n")
    assert (busy, total) == (150.0, 1000.0)


def test_loads_and_impossible_deltas() -> None:
    assert cgroup_load((0.0, 1.0), (0.5, 1.5), cpus=2) == pytest.approx(0.5)
    assert cgroup_load((0.0, 1.0), (0.5, 0.9), cpus=2) is None  # counter went back
    assert cgroup_load((0.0, 1.0), (0.5, 3.0), cpus=2) is None  # more than 2 CPUs for 0.5 s
    assert cgroup_load((1.0, 1.0), (1.0, 1.0), cpus=2) is None  # no time passed
    assert host_load((100, 1000), (150, 1100)) == pytest.approx(0.5)
    assert host_load((100, 1000), (90, 1100)) is None


def test_moving_average_of_five() -> None:
    avg = MovingAverage()
    for v in (1, 1, 1, 1, 1, 0, 0):
        avg.add(v)
    assert avg.value == pytest.approx(3 / 5)


def test_sampler_on_fake_cgroup(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # one CPU
    stat = tmp_path / "cpu.stat"
    stat.write_text("usage_usec 0\n")
    load = CpuLoad(root=tmp_path)
    assert load.sample(0.0) == 0.0  # first sample is the baseline
    stat.write_text("usage_usec 250000\n")
    assert load.sample(0.5) == pytest.approx(0.5)
    stat.write_text("usage_usec 750000\n")
    assert load.sample(1.0) == pytest.approx(0.75)  # average of 0.5 and 1.0


def test_sampler_on_this_host() -> None:
    load = CpuLoad()
    load.sample(0.0)
    assert 0.0 <= load.sample(0.5) <= 1.0


@pytest.mark.parametrize(("raw", "value", "problem"), [
    (0.3, 0.3, None), (1, 1.0, None), (float("nan"), 0.0, "NaN"), (-2, 0.0, "negative"),
    (7.0, 1.0, "above 1"), (math.inf, 1.0, "infinite"), ("0.5", 0.0, "not a number"),
    (None, 0.0, "not a number"), (True, 0.0, "not a number"),
])
def test_sanitize(raw: object, value: float, problem: str | None) -> None:
    got, text = sanitize_load(raw)
    assert got == value
    assert (text is None) if problem is None else (text is not None and problem in text)
