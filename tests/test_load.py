"""The default CPU load: pure parsers on sample file contents, then the sampler on fake files."""

from __future__ import annotations

import fractions
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

# as the kernel writes them (cgroup v2 cpu.stat has more lines on newer kernels)
CPU_STAT = """usage_usec 2500000
user_usec 2000000
system_usec 500000
nr_periods 0
nr_throttled 0
throttled_usec 0
"""
PROC_STAT = """cpu  100 0 50 800 50 0 0 0 7 0
cpu0 50 0 25 400 25 0 0 0 7 0
cpu1 50 0 25 400 25 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""


def test_cpu_max() -> None:
    assert parse_cpu_max("max 100000\n", 8) == 8.0
    assert parse_cpu_max("150000 100000\n", 8) == 1.5
    assert parse_cpu_max("50000\n", 8) == 0.5  # the period defaults to 100 ms
    for bad in ("", "0 100000", "-1 100000", "abc 100000"):
        with pytest.raises(ValueError):
            parse_cpu_max(bad, 8)


def test_cgroup_usage() -> None:
    assert parse_cgroup_usage(CPU_STAT) == 2.5
    with pytest.raises(ValueError, match="usage_usec"):
        parse_cgroup_usage("user_usec 1\n")


def test_proc_stat() -> None:
    # busy = user + system (iowait counts as idle); guest (7) is already inside user
    assert parse_proc_stat(PROC_STAT) == (150.0, 1000.0)
    with pytest.raises(ValueError):
        parse_proc_stat("cpu0 1 2 3 4\n")
    with pytest.raises(ValueError):
        parse_proc_stat("cpu 1 2\n")


def test_loads_and_impossible_deltas() -> None:
    assert cgroup_load((0.0, 1.0), (0.5, 1.5), cpus=2) == pytest.approx(0.5)
    assert cgroup_load((0.0, 1.0), (0.5, 2.0), cpus=2) == pytest.approx(1.0)
    assert cgroup_load((0.0, 1.0), (0.5, 2.02), cpus=2) == 1.0  # timing slack, clamped
    assert cgroup_load((0.0, 1.0), (0.5, 0.9), cpus=2) is None  # counter went back
    assert cgroup_load((0.0, 1.0), (0.5, 3.0), cpus=2) is None  # more than 2 CPUs for 0.5 s
    assert cgroup_load((1.0, 1.0), (1.0, 1.0), cpus=2) is None  # no time passed
    assert cgroup_load((2.0, 1.0), (1.0, 1.0), cpus=2) is None  # time went back
    assert host_load((100, 1000), (150, 1100)) == pytest.approx(0.5)
    assert host_load((100, 1000), (90, 1100)) is None
    assert host_load((100, 1000), (300, 1100)) is None  # busier than the total
    assert host_load((100, 1000), (100, 1000)) is None


def test_moving_average_of_five() -> None:
    avg = MovingAverage()
    assert avg.value == 0.0
    for v in (1, 1, 1, 1, 1, 0, 0):
        avg.add(v)
    assert avg.value == pytest.approx(3 / 5)
    assert MovingAverage(n=2).add(4) == 4
    with pytest.raises(ValueError):
        MovingAverage(n=0)


def _cgroup(tmp_path: Path, cpu_max: str, usage_usec: int) -> Path:
    (tmp_path / "cpu.max").write_text(cpu_max)
    (tmp_path / "cpu.stat").write_text(f"usage_usec {usage_usec}\n")
    return tmp_path


def test_sampler_on_fake_cgroup(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, "100000 100000\n", 0)  # one CPU
    load = CpuLoad(root)
    assert load.source == "cgroup"
    assert load.sample(0.0) == 0.0  # the first sample is the baseline
    _cgroup(tmp_path, "100000 100000\n", 250_000)
    assert load.sample(0.5) == pytest.approx(0.5)
    _cgroup(tmp_path, "100000 100000\n", 750_000)
    assert load.sample(1.0) == pytest.approx(0.75)  # mean of 0.5 and 1.0


def test_sampler_keeps_the_last_interval_for_admission(tmp_path: Path) -> None:
    """The moving average lags a new job by several samples; admission learns a job's
    weight from the last interval alone."""
    root = _cgroup(tmp_path, "100000 100000\n", 0)
    load = CpuLoad(root)
    load.sample(0.0)
    assert load.last is None  # a baseline is no interval
    for usec, t in ((0, 0.5), (0, 1.0), (400_000, 1.5)):
        _cgroup(tmp_path, "100000 100000\n", usec)
        average = load.sample(t)
    assert load.last == pytest.approx(0.8) and average == pytest.approx(0.8 / 3)
    (tmp_path / "cpu.stat").write_text("garbage\n")
    load.sample(2.0)
    assert load.last == pytest.approx(0.8)  # an unreadable sample changes nothing


def test_sampler_drops_impossible_samples_and_rebases(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, "max 100000\n", 0)
    load = CpuLoad(root, host_cpus=2)  # no quota: the CPUs we may run on
    load.sample(0.0)
    _cgroup(tmp_path, "max 100000\n", 500_000)
    assert load.sample(0.5) == pytest.approx(0.5)
    _cgroup(tmp_path, "max 100000\n", 100_000)  # counter reset (a new cgroup)
    assert load.sample(1.0) == pytest.approx(0.5)  # dropped; the average is unchanged
    _cgroup(tmp_path, "max 100000\n", 9_000_000)  # 8.9 s of CPU in 0.5 s on 2 CPUs
    assert load.sample(1.5) == pytest.approx(0.5)
    _cgroup(tmp_path, "max 100000\n", 9_000_000)  # from the new baseline: idle
    assert load.sample(2.0) == pytest.approx(0.25)


def test_sampler_survives_unreadable_files(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, "100000 100000\n", 0)
    load = CpuLoad(root)
    load.sample(0.0)
    (tmp_path / "cpu.stat").write_text("garbage\n")
    assert load.sample(0.5) == 0.0
    (tmp_path / "cpu.stat").unlink()
    assert load.sample(1.0) == 0.0


def test_sampler_on_fake_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 0 900 0 0 0 0\n")
    load = CpuLoad(tmp_path / "no-cgroup", stat)
    assert load.source == "proc"
    load.sample(0.0)
    stat.write_text("cpu  130 0 0 970 0 0 0 0\n")
    assert load.sample(0.5) == pytest.approx(0.3)


def test_sampler_on_this_host(tmp_path: Path) -> None:
    for load in (CpuLoad(), CpuLoad(tmp_path / "none", tmp_path / "none")):
        load.sample(0.0)
        assert 0.0 <= load.sample(0.5) <= 1.0
    assert CpuLoad(tmp_path / "none", tmp_path / "none").source == "psutil"


@pytest.mark.parametrize(("raw", "value", "problem"), [
    (0.3, 0.3, None), (0, 0.0, None), (1, 1.0, None), (fractions.Fraction(1, 4), 0.25, None),
    (float("nan"), 0.0, "NaN"), (-2, 0.0, "negative"), (7.0, 1.0, "above 1"),
    (math.inf, 1.0, "infinite"), (-math.inf, 0.0, "negative"), ("0.5", 0.0, "not a number"),
    (None, 0.0, "not a number"), (True, 0.0, "not a number"),
])
def test_sanitize(raw: object, value: float, problem: str | None) -> None:
    got, text = sanitize_load(raw)
    assert got == value and type(got) is float
    assert (text is None) if problem is None else (text is not None and problem in text)
