"""trio_agents vs livekit-agents, on the same dev server, in the same run.

    .venv/bin/python benchmarks/run.py [--quick] [--repeats N] [--interop-only]

Creates benchmarks/.venv-peer with livekit-agents 1.8.x from PyPI if it is missing, starts
trio_agents' dev server on loopback, then for each repeat runs the peer's agent and ours
(alternating) through the same scenarios, each in production mode (`start`) with framework
defaults and the same num_idle_processes. Prints one table with the ratio ours/peer, writes
benchmarks/results/latest.json, and draws benchmarks/latest.png with the peer venv's
matplotlib.

Timestamps are time.monotonic(), system-wide on Linux: the dev server stamps the dispatch
timeline (offered, answered, assigned, ended), the agents append "started"/"finished" lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_VENV = HERE / ".venv-peer"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_REQUIREMENT = "livekit-agents~=1.8.9"
RESULTS = HERE / "results"
IDLE = 2
sys.path.insert(0, str(ROOT))

from trio_agents.devserver import DevServer, open_dev_server  # noqa: E402

POLL = 0.005  # how often the harness looks at the agents' event file (timestamps are theirs)


# -- environment --------------------------------------------------------------------------


def ensure_peer_venv() -> None:
    if PEER_PYTHON.exists() and subprocess.run(
            [str(PEER_PYTHON), "-c", "import livekit.agents, matplotlib"],
            capture_output=True).returncode == 0:
        return
    print(f"creating {PEER_VENV} with {PEER_REQUIREMENT} (once)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", PEER_REQUIREMENT,
                    "matplotlib"], check=True)


def peer_version() -> str:
    out = subprocess.run([str(PEER_PYTHON), "-c",
                          "import importlib.metadata as m; print(m.version('livekit-agents'))"],
                         capture_output=True, text=True)
    return out.stdout.strip()


# -- processes --------------------------------------------------------------------------------


class Agent:
    def __init__(self, name: str, process: trio.Process, events: Path) -> None:
        self.name = name
        self.process = process
        self.events = events

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


def started(events: list[dict[str, Any]], job_id: str, kind: str = "started") -> float | None:
    return next((e["t"] for e in events if e["job_id"] == job_id and e["event"] == kind), None)


@asynccontextmanager
async def agent_process(name: str, dev: DevServer, *, no_load: bool) -> AsyncIterator[Agent]:
    python, script = ((sys.executable, HERE / "ours_agent.py") if name == "ours"
                      else (str(PEER_PYTHON), HERE / "peer_agent.py"))
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    events = workdir / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    env.update(LIVEKIT_URL=dev.url, LIVEKIT_API_KEY=dev.api_key,
               LIVEKIT_API_SECRET=dev.api_secret, BENCH_EVENTS=str(events),
               BENCH_IDLE=str(IDLE), PYTHONPATH=str(ROOT))
    if no_load:
        env["BENCH_NO_LOAD"] = "1"
    log = (workdir / "agent.log").open("w")
    process = await trio.lowlevel.open_process(
        [python, str(script), "start", "--log-level", "warn"], env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    agent = Agent(name, process, events)
    try:
        yield agent
    finally:
        tree = agent.tree()
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        with trio.CancelScope(shield=True):
            await process.wait()
        psutil.wait_procs(tree, timeout=5)
        log.close()


def tree_pss_mb(agent: Agent) -> float:
    total = 0
    for proc in agent.tree():
        try:
            for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total / 1024


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


# -- scenarios ----------------------------------------------------------------------------


async def run_once(name: str, dev: DevServer, *, quick: bool, repeat: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    sequential = 10 if quick else 50
    known = set(dev.workers)
    t_spawn = time.monotonic()
    async with agent_process(name, dev, no_load=True) as agent:
        with trio.fail_after(120):
            await dev.wait_until(lambda: set(dev.workers) - known)
        worker = dev.workers[next(iter(set(dev.workers) - known))]
        result["cold_start_s"] = worker.registered_at - t_spawn
        await trio.sleep(3)  # let both settle their idle processes
        result["idle_tree_pss_mb"] = tree_pss_mb(agent)
        result["idle_processes"] = len(agent.tree())

        prefix = f"{name}{repeat}"
        offer_answer, assign_started, offer_started, dropped = [], [], [], 0
        for n in range(sequential):
            room = f"{prefix}-seq-{n}"
            await dev.create_dispatch(room, "bench", metadata="ok")
            await dev.wait_until(lambda: any(j.room == room and (j.ended or j.dropped)
                                             for j in dev.jobs.values()))
            job = next(j for j in dev.jobs.values() if j.room == room)
            if job.dropped:
                dropped += 1
                continue
            events = await agent.wait_events(lambda ev: started(ev, job.job.id) is not None)
            t_started = started(events, job.job.id)
            assert t_started is not None
            offer_answer.append(job.answered_at - job.offered_at)
            assign_started.append(t_started - job.assigned_at)
            offer_started.append(t_started - job.offered_at)
            await dev.wait_until(lambda: job.ended)
        result.update(seq_offer_answer=offer_answer, seq_assign_started=assign_started,
                      seq_offer_started=offer_started, seq_dropped=dropped)
        await trio.sleep(2)  # idle pool refilled

        burst = [f"{prefix}-burst-{n}" for n in range(20)]
        t_burst = time.monotonic()
        for room in burst:
            await dev.create_dispatch(room, "bench", metadata="sleep:1")
        await dev.wait_until(lambda: sum(1 for j in dev.jobs.values()
                                         if j.room in burst and (j.ended or j.dropped)) == 20)
        jobs = [j for j in dev.jobs.values() if j.room in burst]
        ok = [j for j in jobs if not j.dropped]
        events = await agent.wait_events(
            lambda ev: all(started(ev, j.job.id, "finished") for j in ok), timeout=60)
        result["burst_dropped"] = len(jobs) - len(ok)
        result["burst_all_started_s"] = max(started(events, j.job.id) or math.nan for j in ok) - t_burst
        result["burst_all_finished_s"] = max(j.ended_at for j in ok) - t_burst
        await trio.sleep(2)

        loaded = [f"{prefix}-mem-{n}" for n in range(10)]
        for room in loaded:
            await dev.create_dispatch(room, "bench", metadata="sleep:600")
        jobs = []
        await dev.wait_until(lambda: sum(1 for j in dev.jobs.values() if j.room in loaded
                                         and j.done) == 10)
        jobs = [j for j in dev.jobs.values() if j.room in loaded and not j.dropped]
        await agent.wait_events(lambda ev: all(started(ev, j.job.id) for j in jobs))
        await trio.sleep(2)
        result["tree_pss_10_jobs_mb"] = tree_pss_mb(agent)
        result["per_job_pss_mb"] = (result["tree_pss_10_jobs_mb"] - result["idle_tree_pss_mb"]) / max(len(jobs), 1)
        for room in loaded:
            await dev.delete_room(room)
        await dev.wait_until(lambda: all(j.ended for j in jobs))
        await trio.sleep(3)

        room = f"{prefix}-term"
        await dev.create_dispatch(room, "bench", metadata="sleep:600")
        await dev.wait_until(lambda: any(j.room == room and j.done for j in dev.jobs.values()))
        job = next(j for j in dev.jobs.values() if j.room == room)
        events = await agent.wait_events(lambda ev: started(ev, job.job.id) is not None)
        pid = next(e["pid"] for e in events if e["job_id"] == job.job.id)
        t_term = time.monotonic()
        await dev.delete_room(room)
        with trio.fail_after(60):
            await wait_pid_gone(pid)
        result["termination_s"] = time.monotonic() - t_term
        await trio.sleep(2)

        draining = [f"{prefix}-drain-{n}" for n in range(5)]
        for room in draining:
            await dev.create_dispatch(room, "bench", metadata="sleep:3")
        await dev.wait_until(lambda: sum(1 for j in dev.jobs.values() if j.room in draining
                                         and j.done) == 5)
        jobs = [j for j in dev.jobs.values() if j.room in draining and not j.dropped]
        await agent.wait_events(lambda ev: all(started(ev, j.job.id) for j in jobs))
        t_sigterm = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        with trio.fail_after(120):
            await agent.process.wait()
        result["drain_exit_s"] = time.monotonic() - t_sigterm
        events = agent.read_events()
        result["drain_finished"] = sum(1 for j in jobs if started(events, j.job.id, "finished"))
    return result


async def interop(dev: DevServer) -> None:
    """The peer's real client against our dev server: register, dispatch, accept, run, report."""
    async with agent_process("peer", dev, no_load=True) as agent:
        with trio.fail_after(120):
            await dev.wait_until(lambda: len(dev.workers) > 0)
        await dev.create_dispatch("interop", "bench", metadata="ok")
        with trio.fail_after(60):
            await dev.wait_until(lambda: any(j.room == "interop" and (j.ended or j.dropped)
                                             for j in dev.jobs.values()))
        job = next(j for j in dev.jobs.values() if j.room == "interop")
        problems = []
        if job.dropped:
            problems.append(f"job dropped: {job.dropped}")
        elif job.status_name != "JS_SUCCESS":
            problems.append(f"job ended {job.status_name}: {job.error!r}")
        if not await_started(agent, job.job.id):
            problems.append("the peer's entrypoint never reported 'started'")
        if problems:
            log = (agent.events.parent / "agent.log").read_text()[-3000:]
            raise SystemExit("INTEROP FAILED: " + "; ".join(problems) + "\n--- peer log ---\n" + log)
        print(f"interop: livekit-agents {peer_version()} registered with the dev server, was "
              f"dispatched job {job.job.id}, accepted it, ran it and reported "
              f"{job.history} -> {job.status_name}", flush=True)


def await_started(agent: Agent, job_id: str) -> bool:
    return started(agent.read_events(), job_id) is not None


# -- report -------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    merged: dict[str, list[float]] = {}
    for key in ("seq_offer_answer", "seq_assign_started", "seq_offer_started"):
        merged[key] = [v for r in runs for v in r[key]]
    out = {k: median(k) for k in ("cold_start_s", "idle_tree_pss_mb", "per_job_pss_mb",
                                  "burst_all_started_s", "burst_all_finished_s",
                                  "termination_s", "drain_exit_s")}
    for key, values in merged.items():
        for q, label in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
            out[f"{key}_{label}_ms"] = pct(values, q) * 1000
        out[f"{key}_max_ms"] = max(values) * 1000 if values else math.nan
    out["dropped_jobs"] = sum(r["seq_dropped"] + r["burst_dropped"] for r in runs)
    out["drain_unfinished"] = sum(5 - r["drain_finished"] for r in runs)
    return out


TARGETS = {  # ratio ours/peer must be at most this (termination: absolute seconds)
    "cold_start_s": 0.25, "seq_offer_started_p50_ms": 0.25, "seq_offer_started_p99_ms": 0.15,
    "burst_all_started_s": 0.3, "idle_tree_pss_mb": 0.25, "per_job_pss_mb": 0.5,
}


def table(ours: dict[str, float], peer: dict[str, float]) -> str:
    rows = ["| metric | trio_agents | livekit-agents | ours/peer | target |",
            "| --- | ---: | ---: | ---: | --- |"]
    for key in ours:
        a, b = ours[key], peer[key]
        ratio = a / b if b else math.nan
        target = TARGETS.get(key)
        verdict = ""
        if target is not None:
            verdict = f"≤ {target} {'met' if ratio <= target else 'missed'}"
        if key == "termination_s":
            verdict = f"≤ 0.5 s {'met' if a <= 0.5 else 'missed'}"
        rows.append(f"| {key} | {a:.3f} | {b:.3f} | {ratio:.3f} | {verdict} |")
    return "\n".join(rows)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1 repeat, 10 sequential jobs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interop-only", action="store_true")
    args = parser.parse_args()
    ensure_peer_venv()
    repeats = 1 if args.quick else args.repeats
    async with open_dev_server(host="127.0.0.1", port=0) as dev:
        await interop(dev)
        if args.interop_only:
            return
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
        for repeat in range(repeats):
            for name in (("peer", "ours") if repeat % 2 else ("ours", "peer")):
                print(f"repeat {repeat + 1}/{repeats}: {name}...", flush=True)
                runs[name].append(await run_once(name, dev, quick=args.quick, repeat=repeat))
    ours, peer = summarise(runs["ours"]), summarise(runs["peer"])
    cores = os.cpu_count()
    header = (f"{time.strftime('%Y-%m-%d')}, {cores} cores, {repeats} repeat(s), "
              f"num_idle_processes={IDLE}, livekit-agents {peer_version()}; load threshold "
              "disabled (load_fnc 0, threshold inf) for every scenario so both servers take "
              "every job")
    print(header)
    print(table(ours, peer))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(
        {"header": header, "ours": ours, "peer": peer, "runs": runs}, indent=1))
    subprocess.run([str(PEER_PYTHON), str(HERE / "chart.py"), str(RESULTS / "latest.json"),
                    str(HERE / "latest.png")], check=False)


if __name__ == "__main__":
    trio.run(main)
