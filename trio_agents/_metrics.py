"""Prometheus metrics of one agent server, collected in the server process.

The supervisor sees every job process and the control plane every offer, so the server
process alone knows the whole picture: no multiprocess directory is needed. Each
``AgentServer`` run has a registry of its own (never prometheus-client's global one), so two
servers in one process, and tests, do not mix their figures.

Three kinds of figures:

* events, recorded by one call where they happen (offer answers, final job statuses,
  process start times, reconnects, registrations);
* state, read when ``/metrics`` is scraped (running jobs, load, draining, registration, the
  memory of each job process, the number of child processes);
* with a multiprocess directory (``prometheus_multiproc_dir``), whatever job processes
  record there with prometheus-client, added to the server's own.

livekit-agents' four metrics keep their names, types, label and buckets:
``lk_agents_proc_initialize_duration_seconds``, ``lk_agents_active_job_count``,
``lk_agents_child_process_count`` and ``lk_agents_worker_load``; ours start with
``trio_agents_``.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import attrs
import trio
from livekit.protocol import agent
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ._proc import JobProcessHandle

logger = logging.getLogger("trio_agents")

#: The ``Content-Type`` of the text exposition format prometheus-client writes.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: livekit-agents' buckets for the process initialization time.
INITIALIZE_BUCKETS: Final = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Process spawn: a fork from the zygote takes milliseconds, a cold interpreter start more.
SPAWN_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: From the job offer to the entrypoint running (LiveKit gives an offer about 3 s, then
#: assignment and launch follow).
DISPATCH_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0)

#: How a failed job's error maps to a low-cardinality ``cause`` label: the first fragment
#: found in the error names the cause (texts of ``_proc``, ``_supervisor`` and the job
#: process; ``tests/test_metrics.py`` checks them against their producers).
FAILURE_CAUSES: Final = (
    ("memory limit", "memory_limit"),
    ("no pong", "unresponsive"),
    ("stopped before it finished", "interrupted"),
    ("did not start within", "start_timeout"),
    ("could not start a job process", "no_process"),
    ("no job process could take", "no_process"),
    ("did not stop within", "shutdown_timeout"),
    ("killed by signal", "process_died"),
    ("exit code", "process_died"),
    ("exited (code 0) before", "process_died"),
    ("broke the IPC protocol", "protocol"),
    ("sent an unexpected", "protocol"),
)


def job_cause(status: int, error: str) -> str:
    """The ``cause`` label of a job's final status: ``"success"``, one of
    ``FAILURE_CAUSES``, or ``"error"`` (the entrypoint raised or said it failed)."""
    if status == agent.JS_SUCCESS:
        return "success"
    for fragment, cause in FAILURE_CAUSES:
        if fragment in error:
            return cause
    return "error"


@final
@attrs.frozen(kw_only=True)
class ServerState:
    """What the server looks like at one scrape (read in the event loop)."""

    active_jobs: int
    load: float
    draining: bool
    registered: bool
    job_pids: Sequence[tuple[str, int]] = ()
    """``(job_id, pid)`` of each running job's process (none for thread jobs)."""


def process_memory_bytes(pid: int) -> float | None:
    """PSS (else USS, else RSS) of ``pid`` in bytes, as the memory watchdog measures it."""
    from ._proc import memory_mb

    sample = memory_mb(pid)
    return None if sample is None else sample[0] * 2**20


def child_process_count() -> int:
    """Processes below this one (job processes, the zygote, what jobs started), as
    livekit-agents counts them."""
    import psutil

    try:
        return len(psutil.Process(os.getpid()).children(recursive=True))
    except psutil.Error:
        return 0


@final
class _Scraped(Collector):
    """The per-scrape figures that are not a fixed set of series (memory per job process)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "trio_agents_job_process_memory_bytes",
            "Memory of each running job's process (PSS where the OS has it, else USS or RSS)",
            labels=["nodename", "job_id"])
        for job_id, value in self._metrics.memory:
            family.add_metric([self._metrics.nodename, job_id], value)
        yield family

    def describe(self) -> Iterable[Metric]:
        return []  # not known before a scrape: skip the registry's duplicate check


@final
class _JobProcessMetrics(Collector):
    """What job processes record with prometheus-client in the multiprocess directory,
    leaving out the names the server exports itself."""

    def __init__(self, path: str, own: frozenset[str]) -> None:
        from prometheus_client import multiprocess

        self._collector = multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            None, path=path)
        self._own = own

    def collect(self) -> Iterable[Metric]:
        found = self._collector.collect()  # type: ignore[no-untyped-call]
        return [m for m in found if m.name not in self._own]

    def describe(self) -> Iterable[Metric]:
        return []


@final
class ServerMetrics:
    """The metrics of one agent server run. Record with the methods below; ``scrape()`` is
    the ``/metrics`` body."""

    def __init__(self, *, nodename: str | None = None,
                 multiproc_dir: str | None = None) -> None:
        self.nodename = nodename if nodename is not None else platform.node()
        self.registry = CollectorRegistry(auto_describe=True)
        self.state: Callable[[], ServerState] | None = None
        """Set by the server: read at every scrape."""
        self.memory: list[tuple[str, float]] = []
        self._registered_at: float | None = None
        self._running: dict[str, float] = {}
        reg, node = self.registry, ["nodename"]
        # -- livekit-agents' four --------------------------------------------------------------
        self.proc_initialize = Histogram(
            "lk_agents_proc_initialize_duration_seconds",
            "Time taken to initialize a process (InitializeRequest to ready: setup_fnc, and the "
            "imports of a cold start)", node, buckets=INITIALIZE_BUCKETS, registry=reg)
        self.active_jobs = Gauge("lk_agents_active_job_count", "Active jobs", node,
                                 registry=reg)
        self.child_processes = Gauge("lk_agents_child_process_count",
                                     "Total number of child processes", node, registry=reg)
        self.load = Gauge("lk_agents_worker_load", "Worker load percentage", node, registry=reg)
        # -- ours ------------------------------------------------------------------------------
        self.jobs = Counter("trio_agents_jobs", "Jobs ended, by final status and cause",
                            [*node, "status", "cause"], registry=reg)
        self.offers = Counter("trio_agents_offers", "Job offers answered, by answer "
                              "(accepted, rejected, timeout: on_request did not answer in time)",
                              [*node, "answer"], registry=reg)
        self.dispatch_latency = Histogram(
            "trio_agents_dispatch_latency_seconds",
            "From the job offer (AvailabilityRequest) to its entrypoint running", node,
            buckets=DISPATCH_BUCKETS, registry=reg)
        self.spawn = Histogram(
            "trio_agents_process_spawn_duration_seconds",
            "Time to create a job process (fork from the zygote, or exec of a cold one), "
            "before its initialization", node, buckets=SPAWN_BUCKETS, registry=reg)
        self.reconnects = Counter("trio_agents_reconnects",
                                  "Connection attempts to LiveKit after a lost or failed one",
                                  node, registry=reg)
        self.registrations = Counter("trio_agents_registrations",
                                     "Registrations with LiveKit (the first and each re-registration)",
                                     node, registry=reg)
        self.registered = Gauge("trio_agents_registered",
                                "1 while registered with LiveKit, else 0", node, registry=reg)
        self.registered_seconds = Gauge(
            "trio_agents_registered_duration_seconds",
            "How long the current registration has lasted (0 when not registered)", node,
            registry=reg)
        self.draining = Gauge("trio_agents_draining", "1 while draining, else 0", node,
                              registry=reg)
        reg.register(_Scraped(self))
        self.multiproc_dir = multiproc_dir
        if multiproc_dir:
            own = frozenset(name for collector in [self.proc_initialize, self.active_jobs,
                                                   self.child_processes, self.load, self.jobs,
                                                   self.offers, self.dispatch_latency,
                                                   self.spawn, self.reconnects,
                                                   self.registrations, self.registered,
                                                   self.registered_seconds, self.draining]
                            for name in (collector._name,))  # noqa: SLF001
            reg.register(_JobProcessMetrics(multiproc_dir, own))
        # every series exists from the start, at 0
        for metric in (self.proc_initialize, self.active_jobs, self.child_processes, self.load,
                       self.dispatch_latency, self.spawn, self.reconnects, self.registrations,
                       self.registered, self.registered_seconds, self.draining):
            metric.labels(self.nodename)

    # -- events ---------------------------------------------------------------------------------

    def offer_answered(self, answer: str) -> None:
        """``"accepted"``, ``"rejected"`` or ``"timeout"``."""
        self.offers.labels(self.nodename, answer).inc()

    def job_status(self, job_id: str, status: int, error: str,
                   received_at: float | None = None) -> None:
        """A job status report. The first ``JS_RUNNING`` of a job observes its dispatch
        latency (from ``received_at``, a ``time.time()`` stamp); a final status counts it."""
        if status == agent.JS_RUNNING:
            if job_id not in self._running:
                self._running[job_id] = time.time()
                if received_at:
                    self.dispatch_latency.labels(self.nodename).observe(
                        max(0.0, time.time() - received_at))
            return
        if status not in (agent.JS_SUCCESS, agent.JS_FAILED):
            return
        self._running.pop(job_id, None)
        name = "JS_SUCCESS" if status == agent.JS_SUCCESS else "JS_FAILED"
        self.jobs.labels(self.nodename, name, job_cause(status, error)).inc()

    def process_ready(self, handle: JobProcessHandle) -> None:
        """A job process finished initializing (its ``trio.current_time()`` stamps)."""
        sent = handle.initialize_sent_at
        if sent:
            self.spawn.labels(self.nodename).observe(max(0.0, sent - handle.spawned_at))
            self.proc_initialize.labels(self.nodename).observe(
                max(0.0, handle.ready_at - sent))

    def reconnecting(self) -> None:
        self.reconnects.labels(self.nodename).inc()

    def registered_now(self) -> None:
        self.registrations.labels(self.nodename).inc()
        self._registered_at = time.monotonic()

    # -- scraping -------------------------------------------------------------------------------

    async def scrape(self) -> bytes:
        """The ``/metrics`` body: state read here, the slow part (memory of each process,
        the process tree, formatting) in a worker thread."""
        state = self.state() if self.state is not None else None
        return await trio.to_thread.run_sync(self._render, state)

    def _render(self, state: ServerState | None) -> bytes:
        node = self.nodename
        if state is not None:
            self.active_jobs.labels(node).set(state.active_jobs)
            self.load.labels(node).set(state.load)
            self.draining.labels(node).set(int(state.draining))
            self.registered.labels(node).set(int(state.registered))
            since = self._registered_at
            self.registered_seconds.labels(node).set(
                time.monotonic() - since if state.registered and since is not None else 0.0)
            memory = []
            for job_id, pid in state.job_pids:
                value = process_memory_bytes(pid)
                if value is not None:
                    memory.append((job_id, value))
            self.memory = memory
        self.child_processes.labels(node).set(child_process_count())
        return generate_latest(self.registry)


def prepare_multiproc_dir(path: str) -> None:
    """Create the multiprocess directory, or empty it of a previous run's files (as
    livekit-agents does at start)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.is_file() and entry.suffix == ".db":
            try:
                entry.unlink()
            except OSError as exc:
                logger.warning("cannot remove %s from the Prometheus multiprocess directory: "
                               "%s", entry, exc)


def job_pids(handles: Iterable[JobProcessHandle]) -> list[tuple[str, int]]:
    """``(job_id, pid)`` of the handles running a job in a process of their own."""
    own = os.getpid()
    return [(h.info.job.id, h.pid) for h in handles
            if h.info is not None and h.pid and h.pid != own]


__all__ = ["CONTENT_TYPE", "ServerMetrics", "ServerState", "job_cause", "job_pids",
           "prepare_multiproc_dir"]
