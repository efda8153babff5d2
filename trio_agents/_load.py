"""The default load of an agent server: CPU utilisation, 0..1, over a short moving window.

cgroup-aware: inside a container with a CPU quota (cgroup v2 ``cpu.max``) the load is the
cgroup's usage against its quota, not the whole host's; elsewhere it is the host's busy time
from ``/proc/stat``. Reading those files is cheap, so sampling needs no thread.
The parsers are pure functions of the files' text, tested on samples.
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path
from typing import Final, final

import attrs

CGROUP: Final = Path("/sys/fs/cgroup")
WINDOW: Final = 5


def parse_cpu_max(text: str, host_cpus: int) -> float:
    """CPUs granted by cgroup v2 ``cpu.max`` ("max 100000" = no quota = every host CPU)."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max" or not period:
        return float(host_cpus)
    return max(int(quota) / int(period), 0.01)


def parse_cgroup_usage(text: str) -> float:
    """Seconds of CPU the cgroup used, from ``cpu.stat`` (``usage_usec``)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    raise ValueError("cpu.stat has no usage_usec line")


def parse_proc_stat(text: str) -> tuple[float, float]:
    """(busy, total) jiffies of the host from the ``cpu`` line of ``/proc/stat``."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [float(v) for v in fields[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
            # guest time is already counted in user/nice
            total = sum(values[:8])
            return total - idle, total
    raise ValueError("/proc/stat has no cpu line")


def _host_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@final
@attrs.define
class MovingAverage:
    size: int = WINDOW
    _values: collections.deque[float] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._values = collections.deque(maxlen=self.size)

    def add(self, value: float) -> float:
        self._values.append(value)
        return self.value

    @property
    def value(self) -> float:
        return sum(self._values) / len(self._values) if self._values else 0.0


@final
class CpuLoad:
    """Call ``sample(now)`` every 0.5 s; it returns the moving average of the last 5 samples."""

    def __init__(self, root: Path = CGROUP, proc_stat: Path = Path("/proc/stat")) -> None:
        self._cpu_max = root / "cpu.max"
        self._cpu_stat = root / "cpu.stat"
        self._proc_stat = proc_stat
        self._use_cgroup = self._cpu_max.exists() and self._cpu_stat.exists()
        self._cpus = _host_cpus()
        self._last: tuple[float, float] | None = None  # (now, usage seconds) or (busy, total)
        self._average = MovingAverage()

    def sample(self, now: float) -> float:
        try:
            if self._use_cgroup:
                value = self._sample_cgroup(now)
            else:
                value = self._sample_host()
        except (OSError, ValueError):
            return self._average.value
        return self._average.add(value) if value is not None else self._average.value

    def _sample_cgroup(self, now: float) -> float | None:
        cpus = parse_cpu_max(self._cpu_max.read_text(), self._cpus)
        usage = parse_cgroup_usage(self._cpu_stat.read_text())
        last, self._last = self._last, (now, usage)
        if last is None:
            return None
        return cgroup_load(last, (now, usage), cpus)

    def _sample_host(self) -> float | None:
        busy, total = parse_proc_stat(self._proc_stat.read_text())
        last, self._last = self._last, (busy, total)
        if last is None:
            return None
        return host_load(last, (busy, total))


def cgroup_load(before: tuple[float, float], after: tuple[float, float],
                cpus: float) -> float | None:
    """Load between two (time, usage seconds) samples; ``None`` for an impossible delta."""
    elapsed, used = after[0] - before[0], after[1] - before[1]
    if elapsed <= 0 or used < 0 or used > elapsed * cpus * 1.05:
        return None
    return min(used / (elapsed * cpus), 1.0)


def host_load(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """Load between two (busy, total) jiffy samples; ``None`` for an impossible delta."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0 or busy < 0 or busy > total:
        return None
    return busy / total


def sanitize_load(value: object) -> tuple[float, str | None]:
    """Clamp a ``load_fnc`` result to [0, 1]; the text says what was wrong, for a warning."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0, f"not a number ({type(value).__name__}); load_fnc must return a float 0..1"
    number = float(value)
    if math.isnan(number):
        return 0.0, "NaN"
    if number < 0:
        return 0.0, "negative"
    if number > 1:
        return 1.0, "above 1" if not math.isinf(number) else "infinite"
    return number, None
