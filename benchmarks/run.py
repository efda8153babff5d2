"""trio_agents vs livekit-agents, on the same dev server, in the same run.

    .venv/bin/python benchmarks/run.py [--quick] [--repeats N] [--interop-only] [--no-chart]
    .venv/bin/python benchmarks/run.py --only exit [--repeats N]   # the exit rows alone

Creates benchmarks/.venv-peer with livekit-agents 1.8.x from PyPI if it is missing, starts
trio_agents' dev server on loopback inside this process, checks that the peer's own worker
works against it (fails loudly if not), then for each repeat runs the peer's agent and ours
(alternating which goes first) through the same scenarios, each as ``python agent.py start``
with the same num_idle_processes. Prints one table with the ratio ours/peer, writes
benchmarks/results/latest.json, and draws benchmarks/latest.png with the peer venv's
matplotlib.

Two lives per agent and repeat:

* framework defaults (nothing but ``num_idle_processes`` and a free health port): cold start,
  idle memory after prewarm;
* load threshold disabled (``load_fnc`` → 0, ``load_threshold`` = inf, so a busy 2-core
  machine refuses nothing): sequential dispatch, burst, memory per running job, termination,
  drain; then, in a fresh agent, jobs that join their room (``ctx.connect()``: the realtime
  SDK completing WebRTC with the dev server), one after another: connect time and memory.

A protocol-only worker (null_worker.py) runs the sequential scenario too: the floor that the
dev server, websocket and protobuf put under any Python worker on this machine.

Timestamps are ``time.monotonic()``, system-wide on Linux: the dev server stamps the dispatch
timeline (offered, answered, assigned, ended), the agents append "started"/"finished" lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import psutil
import trio
from livekit.protocol import agent as agent_pb

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
PEER_VENV: Final = HERE / ".venv-peer"
PEER_PYTHON: Final = PEER_VENV / "bin" / "python"
PEER_REQUIREMENT: Final = "livekit-agents~=1.8.9"
RESULTS: Final = HERE / "results"
IDLE: Final = 2  # num_idle_processes for both (both frameworks' production default here)
sys.path.insert(0, str(ROOT))

from trio_agents.devserver import DevServer, JobInfo, open_dev_server  # noqa: E402

POLL: Final = 0.005  # how often the harness reads the agents' event files (timestamps are theirs)
SEQUENTIAL, SEQUENTIAL_QUICK = 50, 10
BURST, LOADED, DRAINING = 20, 10, 5
IN_ROOM: Final = 5  # jobs that join their room (WebRTC with the dev server), one at a time


# -- environment --------------------------------------------------------------------------


def ensure_peer_venv() -> None:
    if PEER_PYTHON.exists() and subprocess.run(
            [str(PEER_PYTHON), "-c", "import livekit.agents, matplotlib"],
            capture_output=True).returncode == 0:
        return
    print(f"creating {PEER_VENV} with {PEER_REQUIREMENT} and matplotlib (once)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", PEER_REQUIREMENT,
                    "matplotlib"], check=True)


def peer_version() -> str:
    out = subprocess.run([str(PEER_PYTHON), "-c",
                          "import importlib.metadata as m; print(m.version('livekit-agents'))"],
                         capture_output=True, text=True)
    return out.stdout.strip()


class DevLog(logging.Handler):
    """Keeps the dev server's log records: interop fails on a complaint about the peer."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def complaints(self, since: int = 0) -> list[str]:
        words = ("closing worker", "ignored", "unexpected", "refused", "failed", "invalid")
        return [r.getMessage() for r in self.records[since:]
                if (r.levelno >= logging.WARNING or any(w in r.getMessage() for w in words))
                and not r.getMessage().endswith(": websocket closed")]  # we killed it


# -- processes --------------------------------------------------------------------------------


class Agent:
    def __init__(self, name: str, process: trio.Process, workdir: Path) -> None:
        self.name = name
        self.process = process
        self.workdir = workdir
        self.events = workdir / "events.jsonl"

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]

    async def wait_events(self, predicate: Callable[[list[dict[str, Any]]], bool],
                          timeout: float = 60) -> list[dict[str, Any]]:
        with trio.fail_after(timeout):
            while True:
                events = self.read_events()
                if predicate(events):
                    return events
                await trio.sleep(POLL)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "agent.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def event_time(events: list[dict[str, Any]], job_id: str, kind: str = "started") -> float | None:
    return next((e["t"] for e in events if e["job_id"] == job_id and e["event"] == kind), None)


@asynccontextmanager
async def agent_process(name: str, dev: DevServer, *, no_load: bool,
                        room: bool = False) -> AsyncIterator[Agent]:
    """One agent server in its own session; its whole process tree is killed on the way out."""
    if name == "ours":
        argv = [sys.executable, str(HERE / "ours_agent.py"), "start", "--log-level",
                os.environ.get("BENCH_LOG", "warn")]
    elif name == "peer":
        argv = [str(PEER_PYTHON), str(HERE / "peer_agent.py"), "start", "--log-level",
                os.environ.get("BENCH_LOG", "warn")]
    else:
        argv = [sys.executable, str(HERE / "null_worker.py")]
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    env.update(LIVEKIT_URL=dev.url, LIVEKIT_API_KEY=dev.api_key,
               LIVEKIT_API_SECRET=dev.api_secret, BENCH_EVENTS=str(workdir / "events.jsonl"),
               BENCH_IDLE=str(IDLE), PYTHONPATH=str(ROOT))
    if no_load:
        env["BENCH_NO_LOAD"] = "1"
    if room:
        env["BENCH_ROOM"] = "1"
    with (workdir / "agent.log").open("w") as log:
        process = await trio.lowlevel.open_process(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        agent = Agent(name, process, workdir)
        try:
            yield agent
        finally:
            tree = agent.tree()
            for proc in tree:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            with trio.CancelScope(shield=True):
                await process.wait()
            psutil.wait_procs(tree, timeout=5)


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_pss_mb(agent: Agent) -> float:
    return sum(pss_kib(p.pid) for p in agent.tree()) / 1024


def pss_breakdown(agent: Agent, job_pids: Iterable[int] = ()) -> dict[str, float]:
    """PSS (MiB) of the main process, the running jobs' processes and everything else."""
    jobs = set(job_pids)
    out = {"main": 0.0, "jobs": 0.0, "other": 0.0}
    for proc in agent.tree():
        kind = ("main" if proc.pid == agent.process.pid else "jobs" if proc.pid in jobs
                else "other")
        out[kind] += pss_kib(proc.pid) / 1024
    return out


async def settle(agent: Agent, *, quiet: float = 1.0, limit: float = 20.0) -> None:
    """Wait until the tree has kept the same processes and used < 1 % CPU for ``quiet`` s."""
    def snapshot() -> tuple[frozenset[int], float]:
        pids, cpu = set(), 0.0
        for proc in agent.tree():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            pids.add(proc.pid)
            cpu += times.user + times.system
        return frozenset(pids), cpu

    with trio.move_on_after(limit):
        last = snapshot()
        while True:
            await trio.sleep(quiet)
            now = snapshot()
            if now[0] == last[0] and now[1] - last[1] < 0.01 * quiet:
                return
            last = now


async def wait_pid_gone(pid: int) -> None:
    """Event-driven: a pidfd becomes readable when the process exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def wait_registered(dev: DevServer, known: set[str], agent: Agent,
                          timeout: float = 60) -> float:
    """The dev server's registration stamp of the agent's worker."""
    with trio.move_on_after(timeout):
        await dev.wait_until(lambda: set(dev.workers) - known or agent.process.returncode
                             is not None)
    new = set(dev.workers) - known
    if not new:
        raise SystemExit(f"{agent.name}: no worker registered with the dev server within "
                         f"{timeout:.0f} s (exit code {agent.process.returncode})\n"
                         f"--- its log ---\n{agent.log_tail()}")
    return dev.workers[next(iter(new))].registered_at


def rooms_jobs(dev: DevServer, rooms: set[str]) -> list[JobInfo]:
    return [j for j in dev.jobs.values() if j.room in rooms]


async def dispatch_all(dev: DevServer, rooms: list[str], metadata: str) -> list[JobInfo]:
    """Dispatch one job per room at once; the jobs that a worker got (dispatch over)."""
    for room in rooms:
        await dev.create_dispatch(room, "bench", metadata=metadata)
    wanted = set(rooms)
    with trio.fail_after(30):
        await dev.wait_until(lambda: sum(1 for j in rooms_jobs(dev, wanted) if j.done)
                             == len(rooms))
    return [j for j in rooms_jobs(dev, wanted) if not j.dropped]


# -- scenarios ----------------------------------------------------------------------------


async def run_defaults(name: str, dev: DevServer) -> dict[str, Any]:
    """Framework defaults: cold start and idle memory after prewarm."""
    known = set(dev.workers)
    t_spawn = time.monotonic()
    async with agent_process(name, dev, no_load=False) as agent:
        registered = await wait_registered(dev, known, agent)
        await settle(agent)
        result = {"cold_start_s": registered - t_spawn, "idle_tree_pss_mb": tree_pss_mb(agent),
                  "idle_processes": len(agent.tree()), "idle_pss": pss_breakdown(agent)}
        result.update(await idle_exit(agent))
        return result


async def sequential(agent: Agent, dev: DevServer, prefix: str, count: int) -> dict[str, Any]:
    """One job at a time; each ends at once. The next is dispatched when the last ended."""
    out: dict[str, Any] = {"seq_offer_answer": [], "seq_answer_assign": [],
                           "seq_assign_started": [], "seq_offer_started": [], "seq_dropped": 0}
    for n in range(count):
        room = f"{prefix}-seq-{n}"
        jobs = await dispatch_all(dev, [room], "ok")
        if not jobs:
            out["seq_dropped"] += 1
            continue
        job = jobs[0]
        events = await agent.wait_events(lambda ev: event_time(ev, job.job.id) is not None)
        t_started = event_time(events, job.job.id)
        assert t_started is not None
        out["seq_offer_answer"].append(job.answered_at - job.offered_at)
        out["seq_answer_assign"].append(job.assigned_at - job.answered_at)
        out["seq_assign_started"].append(t_started - job.assigned_at)
        out["seq_offer_started"].append(t_started - job.offered_at)
        with trio.fail_after(30):
            await dev.wait_until(lambda: job.ended)
    return out


async def run_loaded(name: str, dev: DevServer, *, sequential_jobs: int,
                     repeat: int) -> dict[str, Any]:
    """Load threshold disabled: sequential, burst, per-job memory, termination, drain."""
    result: dict[str, Any] = {}
    known = set(dev.workers)
    t_spawn = time.monotonic()
    prefix = f"{name}{repeat}"
    async with agent_process(name, dev, no_load=True) as agent:
        result["cold_start_noload_s"] = await wait_registered(dev, known, agent) - t_spawn
        await settle(agent)
        result.update(await sequential(agent, dev, prefix, sequential_jobs))
        await settle(agent)

        rooms = [f"{prefix}-burst-{n}" for n in range(BURST)]
        t_burst = time.monotonic()
        jobs = await dispatch_all(dev, rooms, "sleep:1")
        events = await agent.wait_events(
            lambda ev: all(event_time(ev, j.job.id, "finished") for j in jobs), timeout=60)
        with trio.fail_after(30):
            await dev.wait_until(lambda: all(j.ended for j in jobs))
        starts = [event_time(events, j.job.id) or math.nan for j in jobs]
        result["burst_dropped"] = BURST - len(jobs)
        result["burst_started"] = sorted(t - t_burst for t in starts)
        result["burst_last_offered_s"] = max(j.offered_at for j in jobs) - t_burst
        result["burst_all_started_s"] = max(starts) - t_burst
        result["burst_all_finished_s"] = max(j.ended_at for j in jobs) - t_burst
        await settle(agent)

        baseline = tree_pss_mb(agent)
        before = pss_breakdown(agent)
        rooms = [f"{prefix}-mem-{n}" for n in range(LOADED)]
        jobs = await dispatch_all(dev, rooms, "sleep:600")
        events = await agent.wait_events(lambda ev: all(event_time(ev, j.job.id) for j in jobs))
        await settle(agent)
        pids = {e["pid"] for e in events if e["job_id"] in {j.job.id for j in jobs}}
        loaded = tree_pss_mb(agent)
        after = pss_breakdown(agent, pids)
        result.update(
            pss_before_10_jobs_mb=baseline, tree_pss_10_jobs_mb=loaded,
            per_job_pss_mb=(loaded - baseline) / max(len(jobs), 1),
            pss_before_breakdown=before, pss_10_jobs_breakdown=after,
            main_pss_growth_per_job_mb=(after["main"] - before["main"]) / max(len(jobs), 1),
            job_process_pss_mb=after["jobs"] / max(len(pids), 1))
        for room in rooms:
            await dev.delete_room(room)
        with trio.fail_after(60):
            await dev.wait_until(lambda: all(j.ended for j in jobs))
            while any(pid in {p.pid for p in agent.tree()} for pid in pids):
                await trio.sleep(0.05)
        await settle(agent)

        room = f"{prefix}-term"
        (job,) = await dispatch_all(dev, [room], "sleep:600")
        events = await agent.wait_events(lambda ev: event_time(ev, job.job.id) is not None)
        pid = next(e["pid"] for e in events if e["job_id"] == job.job.id)
        t_term = time.monotonic()
        await dev.delete_room(room)  # JobTermination to the worker
        with trio.fail_after(60):
            await wait_pid_gone(pid)
        result["termination_s"] = time.monotonic() - t_term
        await settle(agent)

        result.update(await drain_exit(agent, dev, prefix))
    return result


async def sigterm_and_wait(agent: Agent) -> tuple[float, float, int]:
    """SIGTERM to the agent's main process (not its group, as a container runtime does);
    the moments it was sent and the process exited (pidfd-driven wait), and how many other
    processes of its tree were still alive 1 s after it exited."""
    tree = agent.tree()[1:]
    t_sigterm = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    with trio.fail_after(120):
        await agent.process.wait()
    t_exit = time.monotonic()
    _, alive = await trio.to_thread.run_sync(lambda: psutil.wait_procs(tree, timeout=1))
    return t_sigterm, t_exit, len(alive)


async def idle_exit(agent: Agent) -> dict[str, Any]:
    """A registered, settled agent with no job: SIGTERM → process gone."""
    t_sigterm, t_exit, left = await sigterm_and_wait(agent)
    return {"idle_exit_s": t_exit - t_sigterm, "idle_exit_code": agent.process.returncode,
            "idle_exit_left": left}


async def drain_exit(agent: Agent, dev: DevServer, prefix: str) -> dict[str, Any]:
    """DRAINING jobs sleeping 3 s, SIGTERM once all run: SIGTERM → exit, and the last final
    status (its arrival at the dev server) → exit."""
    rooms = [f"{prefix}-drain-{n}" for n in range(DRAINING)]
    jobs = await dispatch_all(dev, rooms, "sleep:3")
    await agent.wait_events(lambda ev: all(event_time(ev, j.job.id) for j in jobs))
    t_sigterm, t_exit, left = await sigterm_and_wait(agent)
    events = agent.read_events()
    finished = [t for j in jobs if (t := event_time(events, j.job.id, "finished"))]
    statuses = [j.ended_at for j in jobs if j.ended]
    return {"drain_exit_s": t_exit - t_sigterm, "drain_finished": len(finished),
            "drain_after_last_job_s": t_exit - max(finished, default=t_sigterm),
            "drain_after_status_s": t_exit - max(statuses, default=t_sigterm),
            "drain_statuses": [j.status_name for j in jobs],
            "drain_exit_code": agent.process.returncode, "drain_exit_left": left}


async def run_exit(name: str, dev: DevServer, *, repeat: int) -> dict[str, Any]:
    """The exit rows alone: an idle agent (framework defaults), then a draining one."""
    known = set(dev.workers)
    async with agent_process(name, dev, no_load=False) as agent:
        await wait_registered(dev, known, agent)
        await settle(agent)
        result = await idle_exit(agent)
    known = set(dev.workers)
    async with agent_process(name, dev, no_load=True) as agent:
        await wait_registered(dev, known, agent)
        await settle(agent)
        result.update(await drain_exit(agent, dev, f"{name}{repeat}x"))
    return result


async def run_room(name: str, dev: DevServer, *, repeat: int) -> dict[str, Any]:
    """Jobs that join their room: entrypoint → connected, and memory per connected job."""
    known = set(dev.workers)
    async with agent_process(name, dev, no_load=True, room=True) as agent:
        await wait_registered(dev, known, agent)
        await settle(agent)
        baseline = tree_pss_mb(agent)
        latencies, pids = [], set()
        for n in range(IN_ROOM):
            (job,) = await dispatch_all(dev, [f"{name}{repeat}-room-{n}"], "connect:600")
            events = await agent.wait_events(
                lambda ev: event_time(ev, job.job.id, "connected") is not None)
            started = event_time(events, job.job.id)
            connected = event_time(events, job.job.id, "connected")
            assert started is not None and connected is not None
            latencies.append(connected - started)
            pids.update(e["pid"] for e in events if e["job_id"] == job.job.id)
        await settle(agent)
        loaded = tree_pss_mb(agent)
        return {"room_connect": latencies,
                "room_per_job_pss_mb": (loaded - baseline) / IN_ROOM,
                "room_job_process_pss_mb": sum(pss_kib(p) for p in pids) / 1024 / len(pids)}


async def warm_rtc(dev: DevServer) -> None:
    """Start the dev server's WebRTC side (it starts on the first /rtc request, importing
    aiortc), so that whoever joins a room first does not pay for it."""
    import httpx

    from trio_agents._auth import VideoGrants, create_token

    token = create_token(dev.api_key, dev.api_secret, identity="warm-up",
                         video=VideoGrants(room_join=True, room="warm-up"))
    async with httpx.AsyncClient() as client:
        response = await client.get(dev.url.replace("ws://", "http://") + "/rtc/validate",
                                    headers={"authorization": f"Bearer {token}"})
    response.raise_for_status()


async def run_floor(dev: DevServer, *, sequential_jobs: int, repeat: int) -> dict[str, Any]:
    known = set(dev.workers)
    async with agent_process("null", dev, no_load=True) as agent:
        await wait_registered(dev, known, agent)
        await trio.sleep(0.5)
        return await sequential(agent, dev, f"null{repeat}", sequential_jobs)


async def interop(dev: DevServer, devlog: DevLog) -> str:
    """The peer's real client against our dev server: register, dispatch, accept, run, report.

    Raises SystemExit (non-zero exit, the reason, the dev server's complaints, the peer's log)
    if anything the real client sends is refused or the job does not go through."""
    since = len(devlog.records)
    known = set(dev.workers)
    async with agent_process("peer", dev, no_load=False) as agent:
        await wait_registered(dev, known, agent, timeout=120)
        worker = dev.workers[next(iter(set(dev.workers) - known))]
        problems: list[str] = []
        await dev.create_dispatch("interop", "bench", metadata="ok")
        with trio.move_on_after(60):
            await dev.wait_until(lambda: any(j.room == "interop" and (j.ended or j.dropped)
                                             for j in dev.jobs.values()))
        job = next((j for j in dev.jobs.values() if j.room == "interop"), None)
        if job is None:
            problems.append("the dev server created no job for the dispatch")
        elif job.dropped:
            problems.append(f"job dropped: {job.dropped}")
        elif not job.ended:
            problems.append(f"job never ended; statuses seen: {job.history}")
        elif job.status_name != "JS_SUCCESS":
            problems.append(f"job ended {job.status_name}: {job.error!r}")
        if job is not None and event_time(agent.read_events(), job.job.id) is None:
            problems.append("the peer's entrypoint never reported 'started'")
        if worker.id not in dev.workers:
            problems.append("the dev server dropped the peer's connection")
        complaints = devlog.complaints(since)
        if complaints:
            problems.append("the dev server complained: " + " | ".join(complaints))
        if problems:
            raise SystemExit("INTEROP FAILED (livekit-agents' worker vs our dev server): "
                             + "; ".join(problems) + f"\n--- peer log ---\n{agent.log_tail()}")
        assert job is not None
        return (f"interop OK: livekit-agents {peer_version()} registered (worker {worker.id}, "
                f"version {worker.version!r}, agent {worker.agent_name!r}), was offered job {job.job.id}, accepted it "
                f"(identity {job.participant_identity!r}), ran it and reported "
                f"{[agent_pb.JobStatus.Name(s) for s in job.history]}"
                "; the dev server logged no complaint")


# -- report -------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


LATENCIES: Final = ("seq_offer_answer", "seq_answer_assign", "seq_assign_started",
                    "seq_offer_started", "room_connect")
SCALARS: Final = ("cold_start_s", "idle_tree_pss_mb", "idle_processes", "cold_start_noload_s",
                  "per_job_pss_mb", "main_pss_growth_per_job_mb", "job_process_pss_mb",
                  "burst_last_offered_s", "burst_all_started_s", "burst_all_finished_s",
                  "termination_s", "idle_exit_s", "drain_exit_s", "drain_after_last_job_s",
                  "drain_after_status_s",
                  "room_per_job_pss_mb", "room_job_process_pss_mb")


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Scalars: median over repeats. Latencies: percentiles over every job of every repeat."""
    out: dict[str, float] = {}
    for key in SCALARS:
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = statistics.median(values)
    for key in LATENCIES:
        values = [v for r in runs for v in r.get(key, [])]
        if values:
            for q, label in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (1.0, "max")):
                out[f"{key}_{label}_ms"] = pct(values, q) * 1000
    out["dropped_jobs"] = sum(r.get("seq_dropped", 0) + r.get("burst_dropped", 0) for r in runs)
    out["drain_unfinished"] = sum(DRAINING - r["drain_finished"] for r in runs
                                  if "drain_finished" in r)
    return out


#: key, label, target (ratio ours/peer; termination: absolute seconds for ours)
ROWS: Final[list[tuple[str, str, float | None]]] = [
    ("cold_start_s", "cold start: process start → registered (s)", 0.25),
    ("idle_tree_pss_mb", "idle tree PSS after prewarm (MiB)", 0.25),
    ("idle_processes", "processes in the idle tree", None),
    ("per_job_pss_mb", "PSS per running job, 10 jobs (MiB)", 0.5),
    ("seq_offer_answer_p50_ms", "AvailabilityRequest → Response p50 (ms)", None),
    ("seq_offer_answer_p99_ms", "AvailabilityRequest → Response p99 (ms)", None),
    ("seq_assign_started_p50_ms", "JobAssignment → entrypoint p50 (ms)", None),
    ("seq_assign_started_p90_ms", "JobAssignment → entrypoint p90 (ms)", None),
    ("seq_assign_started_p99_ms", "JobAssignment → entrypoint p99 (ms)", None),
    ("seq_assign_started_max_ms", "JobAssignment → entrypoint max (ms)", None),
    ("seq_offer_started_p50_ms", "AvailabilityRequest → entrypoint p50 (ms)", 0.25),
    ("seq_offer_started_p90_ms", "AvailabilityRequest → entrypoint p90 (ms)", None),
    ("seq_offer_started_p99_ms", "AvailabilityRequest → entrypoint p99 (ms)", 0.15),
    ("seq_offer_started_max_ms", "AvailabilityRequest → entrypoint max (ms)", None),
    ("burst_all_started_s", "burst of 20: all started (s)", 0.3),
    ("burst_all_finished_s", "burst of 20: all finished (s)", None),
    ("termination_s", "JobTermination of a sleeping job → process gone (s)", 0.5),
    ("idle_exit_s", "idle: SIGTERM → exit (s)", 1.0),
    ("drain_exit_s", "drain, 5 jobs sleeping 3 s: SIGTERM → exit (s)", None),
    ("drain_after_last_job_s", "drain: last job finished → exit (s)", None),
    ("drain_after_status_s", "drain: last job's final status → exit (s)", 1.0),
    ("room_connect_p50_ms", "room: entrypoint → ctx.connect() done, p50 (ms)", None),
    ("room_connect_max_ms", "room: entrypoint → ctx.connect() done, max (ms)", None),
    ("room_per_job_pss_mb", f"room: PSS per connected job, {IN_ROOM} jobs (MiB)", None),
]


def verdicts(ours: dict[str, float], peer: dict[str, float]) -> dict[str, bool]:
    out = {}
    for key, _, target in ROWS:
        if target is None:
            continue
        if key == "termination_s":
            out[key] = ours[key] <= target
        else:
            out[key] = ours[key] / peer[key] <= target
    return out


def fmt(value: float) -> str:
    if math.isnan(value):
        return "–"
    if value == int(value) and abs(value) >= 1:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def table(ours: dict[str, float], peer: dict[str, float]) -> str:
    met = verdicts(ours, peer)
    rows = ["| metric | trio_agents | livekit-agents | ours/peer | target |",
            "| --- | ---: | ---: | ---: | --- |"]
    for key, label, target in ROWS:
        a, b = ours.get(key, math.nan), peer.get(key, math.nan)
        ratio = a / b if b else math.nan
        verdict = ""
        if target is not None:
            unit = " s absolute" if key == "termination_s" else ""
            verdict = f"≤ {target}{unit}: {'**met**' if met[key] else '**missed**'}"
        rows.append(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio:.2f} | {verdict} |")
    return "\n".join(rows)


def floor_table(floor: dict[str, float], ours: dict[str, float],
                peer: dict[str, float]) -> str:
    """What the dev server and the wire cost any worker, and the ratio without it."""
    rows = ["| AvailabilityRequest → started (ms) | protocol-only worker | trio_agents "
            "| livekit-agents | ours/peer | (ours − floor)/(peer − floor) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for q in ("p50", "p90", "p99"):
        key = f"seq_offer_started_{q}_ms"
        f, a, b = floor[key], ours[key], peer[key]
        rows.append(f"| {q} | {fmt(f)} | {fmt(a)} | {fmt(b)} | {a / b:.2f} | "
                    f"{(a - f) / (b - f):.2f} |")
    key = "seq_answer_assign_p50_ms"
    rows.append(f"| dev server: Response received → JobAssignment sent, p50 | {fmt(floor[key])} "
                f"| {fmt(ours[key])} | {fmt(peer[key])} | | |")
    return "\n".join(rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"1 repeat, {SEQUENTIAL_QUICK} sequential jobs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interop-only", action="store_true",
                        help="only check the peer's worker against our dev server")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--only", choices=["exit"],
                        help="exit: only the exit rows (idle SIGTERM → exit, drain → exit; "
                             "a couple of minutes)")
    args = parser.parse_args()
    ensure_peer_venv()
    if args.only == "exit":
        await main_exit(max(1, args.repeats))
        return
    repeats = 1 if args.quick else max(1, args.repeats)
    sequential_jobs = SEQUENTIAL_QUICK if args.quick else SEQUENTIAL
    devlog = DevLog()
    logging.getLogger("trio_agents.devserver").addHandler(devlog)
    logging.getLogger("trio_agents.devserver").setLevel(logging.INFO)
    t_start = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": [], "floor": []}
    # signaling on loopback; WebRTC on this host's own address (BENCH_RTC_ADDRESS to choose):
    # it never uses loopback, and nothing leaves the machine
    async with open_dev_server(host="127.0.0.1", port=0,
                               rtc_address=os.environ.get("BENCH_RTC_ADDRESS")) as dev:
        interop_text = await interop(dev, devlog)
        print(interop_text, flush=True)
        if args.interop_only:
            return
        for repeat in range(repeats):
            order = ("peer", "ours") if repeat % 2 else ("ours", "peer")
            for name in order:
                print(f"repeat {repeat + 1}/{repeats}: {name}, framework defaults...", flush=True)
                runs[name].append(await run_defaults(name, dev))
            for name in order:
                print(f"repeat {repeat + 1}/{repeats}: {name}, load threshold disabled...",
                      flush=True)
                runs[name][-1].update(await run_loaded(name, dev, sequential_jobs=sequential_jobs,
                                                       repeat=repeat))
            await warm_rtc(dev)
            for name in order:
                print(f"repeat {repeat + 1}/{repeats}: {name}, jobs in their rooms...",
                      flush=True)
                runs[name][-1].update(await run_room(name, dev, repeat=repeat))
            print(f"repeat {repeat + 1}/{repeats}: protocol-only worker...", flush=True)
            runs["floor"].append(await run_floor(dev, sequential_jobs=sequential_jobs,
                                                 repeat=repeat))
    complaints = devlog.complaints()
    ours, peer, floor = (summarise(runs[n]) for n in ("ours", "peer", "floor"))
    header = (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python "
              f"{sys.version.split()[0]}, {repeats} repeat(s), {sequential_jobs} sequential jobs "
              f"per repeat, num_idle_processes={IDLE} for both, livekit-agents {peer_version()}; "
              "cold start and idle memory with framework defaults, every other scenario with the "
              "load threshold disabled (load_fnc → 0, load_threshold = inf) so both take every "
              "job on a busy 2-core machine")
    print()
    print(header)
    print()
    print(table(ours, peer))
    print()
    print(floor_table(floor, ours, peer))
    print()
    met = verdicts(ours, peer)
    print(f"targets met: {sum(met.values())}/{len(met)}; dropped jobs: ours "
          f"{ours['dropped_jobs']:.0f}, peer {peer['dropped_jobs']:.0f}; unfinished jobs at "
          f"drain: ours {ours['drain_unfinished']:.0f}, peer {peer['drain_unfinished']:.0f}; "
          f"dev server complaints during the run: {len(complaints)}; "
          f"{time.monotonic() - t_start:.0f} s")
    for text in complaints[:10]:
        print("  dev server:", text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(
        {"header": header, "interop": interop_text, "ours": ours, "peer": peer, "floor": floor,
         "targets_met": met, "table": table(ours, peer), "floor_table": floor_table(
             floor, ours, peer), "dev_server_complaints": complaints, "runs": runs}, indent=1))
    if not args.no_chart:
        subprocess.run([str(PEER_PYTHON), str(HERE / "chart.py"), str(RESULTS / "latest.json"),
                        str(HERE / "latest.png")], check=False)


#: the exit rows: key, label; the target is ours ≤ EXIT_TARGET_S and ours/peer ≤ 1 (issue 11)
EXIT_ROWS: Final = [("idle_exit_s", "idle: SIGTERM → exit (s)"),
                    ("drain_after_status_s", "drain, 5 jobs sleeping 3 s: last job's final "
                                             "status → exit (s)"),
                    ("drain_exit_s", "drain, 5 jobs sleeping 3 s: SIGTERM → exit (s)")]
EXIT_TARGET_S: Final = 0.25


def exit_table(ours: dict[str, float], peer: dict[str, float]) -> str:
    rows = ["| metric | trio_agents | livekit-agents | ours/peer | target |",
            "| --- | ---: | ---: | ---: | --- |"]
    for key, label in EXIT_ROWS:
        a, b = ours.get(key, math.nan), peer.get(key, math.nan)
        ratio = a / b if b else math.nan
        verdict = ""
        if key != "drain_exit_s":
            met = a <= EXIT_TARGET_S and ratio <= 1
            verdict = (f"≤ {EXIT_TARGET_S} s and ratio ≤ 1: "
                       f"{'**met**' if met else '**missed**'}")
        rows.append(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio:.2f} | {verdict} |")
    return "\n".join(rows)


async def main_exit(repeats: int) -> None:
    """``--only exit``: the interop check, then the exit rows, alternating who goes first."""
    devlog = DevLog()
    logging.getLogger("trio_agents.devserver").addHandler(devlog)
    logging.getLogger("trio_agents.devserver").setLevel(logging.INFO)
    t_start = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
    async with open_dev_server(host="127.0.0.1", port=0) as dev:
        print(await interop(dev, devlog), flush=True)
        for repeat in range(repeats):
            for name in ("peer", "ours") if repeat % 2 else ("ours", "peer"):
                print(f"repeat {repeat + 1}/{repeats}: {name}, exit...", flush=True)
                result = await run_exit(name, dev, repeat=repeat)
                runs[name].append(result)
                print(f"  idle → exit {result['idle_exit_s']:.3f} s (code "
                      f"{result['idle_exit_code']}, {result['idle_exit_left']} process(es) "
                      f"left); drain: SIGTERM → exit {result['drain_exit_s']:.3f} s, last "
                      f"status → exit {result['drain_after_status_s']:.3f} s (code "
                      f"{result['drain_exit_code']}, statuses {result['drain_statuses']}, "
                      f"{result['drain_exit_left']} left)", flush=True)
    ours, peer = (summarise(runs[n]) for n in ("ours", "peer"))
    header = (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python "
              f"{sys.version.split()[0]}, {repeats} repeat(s), medians; idle: framework "
              f"defaults, num_idle_processes={IDLE}; drain: load threshold disabled; "
              f"livekit-agents {peer_version()}")
    print()
    print(header)
    print()
    print(exit_table(ours, peer))
    print(f"\n{time.monotonic() - t_start:.0f} s; dev server complaints: "
          f"{len(devlog.complaints())}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "exit-latest.json").write_text(json.dumps(
        {"header": header, "ours": ours, "peer": peer, "table": exit_table(ours, peer),
         "runs": runs}, indent=1))


if __name__ == "__main__":
    trio.run(main)
