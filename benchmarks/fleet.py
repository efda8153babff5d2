"""Many agent servers under one LiveKit: the fleet benchmark.

    .venv/bin/python benchmarks/fleet.py [--jobs 200] [--rate 20] [--scenarios ...]

As root (it makes a private network namespace, as the tests do), against the real
livekit-server deployed as LiveKit deploys it past one machine: two nodes sharing one Redis
(``redis-server``; ``apt-get install -y redis-server`` if it is missing). Four agent servers
(``benchmarks/fleet_agent.py start``, real processes), two registered on each node; jobs of
2-10 s dispatched at a steady rate, alternately through each node's API
(``AgentDispatchService.CreateDispatch``). Each scenario starts a fresh fleet:

* ``steady``: nothing happens to the fleet;
* ``rolling``: a third of the way in, one agent server gets SIGTERM (it drains) while a new
  one starts on the same node;
* ``sigkill``: a third of the way in, one agent server is SIGKILLed;
* ``node-restart``: a third of the way in, node B is stopped (SIGTERM); two thirds of the way
  in, it is started again on the same ports; dispatches meant for B go through A meanwhile;
* ``dev``: ``steady`` on one trio_agents dev server, for comparison.

Reported per scenario: jobs lost (dispatched, never started), jobs that ended in
``JS_FAILED`` according to the livekit-server logs, how the jobs spread over the agent servers
(the choice is livekit-server's: weighted by each server's reported load), dispatch latency
(CreateDispatch sent → entrypoint started) p50/p99, and what each disruption did. JSON in
``benchmarks/results/fleet.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
RESULTS: Final = HERE / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import netns  # noqa: E402
from livekit.protocol import agent_dispatch  # noqa: E402
from livekit.protocol import room as room_proto  # noqa: E402
from livekit_server import LiveKitServer, find_binary, free_ports, open_livekit_server  # noqa: E402

from trio_agents.api import LiveKitAPI, TwirpError  # noqa: E402

NODE_ADDRESSES: Final = ("10.203.0.1", "10.203.0.2")  # the two ends of the test veth pair
AGENT_NAME: Final = "fleet"
REGISTER_TIMEOUT: Final = 60.0


# -- child processes -------------------------------------------------------------------------


@attrs.define(eq=False)
class Child:
    """A process of the benchmark: its output lines, kept and awaitable."""

    name: str
    process: trio.Process
    lines: list[str] = attrs.Factory(list)
    eof: bool = False
    _change: trio.Event = attrs.Factory(trio.Event)

    async def read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async with self.process.stdout:
            while chunk := await self.process.stdout.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in lines)
                self._notify()
        self.eof = True
        self._notify()

    def _notify(self) -> None:
        self._change.set()
        self._change = trio.Event()

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_for(self, text: str, count: int = 1) -> None:
        while self.count(text) < count:
            if self.eof:
                tail = "\n".join(self.lines[-20:])
                raise RuntimeError(f"{self.name} exited before {text!r}:\n{tail}")
            await self._change.wait()

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> int:
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.send_signal(sig)
            with trio.move_on_after(timeout):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
            code = await self.process.wait()
        return code


@asynccontextmanager
async def spawned(name: str, argv: list[str], env: dict[str, str] | None = None
                  ) -> AsyncIterator[Child]:
    """Run a process for the block (stdout and stderr read into ``Child.lines``); SIGTERM,
    then SIGKILL, and reaped when the block ends."""
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})})
    child = Child(name, process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(child.read)
        try:
            yield child
        finally:
            await child.stop()


@asynccontextmanager
async def open_redis() -> AsyncIterator[int]:
    (port,) = free_ports(socket.SOCK_STREAM)
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no"]
    async with spawned("redis", argv) as redis:
        with trio.fail_after(30):
            await redis.wait_for("Ready to accept connections")
        yield port


# -- the fleet ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class Agent:
    name: str
    node: str
    health_port: int
    child: Child

    @property
    def registrations(self) -> int:
        return self.child.count("registered worker")

    async def health(self) -> int:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(f"http://127.0.0.1:{self.health_port}/")).status_code
        except httpx.HTTPError:
            return 0


@attrs.define(eq=False)
class Fleet:
    workdir: Path
    events: Path
    nodes: dict[str, str]  # node name → ws URL
    servers: dict[str, LiveKitServer]  # node name → livekit-server (empty for the dev server)
    nursery: trio.Nursery
    capacity: int
    agents: dict[str, Agent] = attrs.Factory(dict)
    killed: set[str] = attrs.Factory(set)
    """Agent servers SIGKILLed: their jobs never finish."""

    async def start_agent(self, name: str, node: str) -> Agent:
        (health,) = free_ports(socket.SOCK_STREAM)
        env = {"LIVEKIT_URL": self.nodes[node], "LIVEKIT_API_KEY": "devkey",
               "LIVEKIT_API_SECRET": "secret", "FLEET_NAME": name,
               "FLEET_EVENTS": str(self.events), "FLEET_HEALTH_PORT": str(health),
               "FLEET_CAPACITY": str(self.capacity)}
        ready = trio.Event()
        box: list[Agent] = []

        async def run() -> None:
            argv = [sys.executable, str(HERE / "fleet_agent.py"), "start"]
            async with spawned(name, argv, env) as child:
                box.append(Agent(name, node, health, child))
                ready.set()
                await trio.sleep_forever()

        self.nursery.start_soon(run)
        await ready.wait()
        agent = box[0]
        self.agents[name] = agent
        with trio.fail_after(REGISTER_TIMEOUT):
            await agent.child.wait_for("registered worker")
        return agent

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]


async def dispatch_all(fleet: Fleet, jobs: int, rate: float, rng: random.Random,
                       on_progress: Callable[[int], Any] | None = None,
                       down: set[str] | None = None, via: str = "dispatch"
                       ) -> dict[str, dict[str, Any]]:
    """Dispatch ``jobs`` rooms at ``rate`` per second, alternately through each node's API
    (through the other node while one is in ``down``); what was sent, by room.

    ``via="dispatch"``: ``CreateDispatch`` (which creates the room, with its default
    dispatch too); ``via="room"``: ``CreateRoom`` with the agent as the room's only dispatch.
    """
    sent: dict[str, dict[str, Any]] = {}
    node_names = list(fleet.nodes)
    apis = {n: LiveKitAPI(url, "devkey", "secret") for n, url in fleet.nodes.items()}
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(jobs):
            await trio.sleep_until(start + i / rate)
            if on_progress is not None:
                await on_progress(i)
            room = f"fleet-{i:04d}"
            node = node_names[i % len(node_names)]
            if down and node in down:
                node = next(n for n in node_names if n not in down)
            duration = round(rng.uniform(2.0, 10.0), 2)
            sent[room] = {"node": node, "duration": duration, "t": time.monotonic(),
                          "error": ""}

            async def send(room: str = room, node: str = node, duration: float = duration
                           ) -> None:
                # a client whose node does not answer tries the other one, once
                for target in [node] + [n for n in node_names if n != node][:1]:
                    try:
                        if via == "room":
                            await apis[target].room.create_room(room_proto.CreateRoomRequest(
                                name=room, agents=[agent_dispatch.RoomAgentDispatch(
                                    agent_name=AGENT_NAME, metadata=str(duration))]))
                        else:
                            await apis[target].agent_dispatch.create_dispatch(
                                agent_dispatch.CreateAgentDispatchRequest(
                                    room=room, agent_name=AGENT_NAME,
                                    metadata=str(duration)))
                    except TwirpError as exc:
                        sent[room]["error"] = str(exc)
                        if exc.code != "unavailable" or target != node:
                            return
                        sent[room]["retried"] = True
                    else:
                        sent[room]["error"], sent[room]["node"] = "", target
                        return

            nursery.start_soon(send)
    return sent


async def wait_jobs_done(fleet: Fleet, sent: dict[str, dict[str, Any]], budget: float) -> bool:
    """Until every job that started (on an agent server not SIGKILLed) has finished, per the
    agents' events, and none started for 3 s; False if that took over ``budget`` s."""
    with trio.move_on_after(budget):
        quiet_since, seen = trio.current_time(), -1
        while True:
            events = fleet.read_events()
            started = {e["room"] for e in events if e["event"] == "started"
                       and e["agent"] not in fleet.killed}
            finished = {e["room"] for e in events if e["event"] == "finished"}
            if len(started) != seen:
                quiet_since, seen = trio.current_time(), len(started)
            if started <= finished and (set(sent) <= started
                                        or trio.current_time() - quiet_since > 3):
                return True
            await trio.sleep(0.5)  # the events file is written by other processes
    return False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def analyse(fleet: Fleet, sent: dict[str, dict[str, Any]]) -> dict[str, Any]:
    events = fleet.read_events()
    started = {e["room"]: e for e in events if e["event"] == "started"}
    finished = {e["room"]: e for e in events if e["event"] == "finished"}
    accepted = {r for r, s in sent.items() if not s["error"]}
    latencies = [(started[r]["t"] - sent[r]["t"]) * 1000 for r in accepted if r in started]
    by_agent = Counter(started[r]["agent"] for r in started)
    # what livekit-server recorded: assignments and final statuses, from every node's log
    statuses: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    assigned: set[str] = set()
    for server in fleet.servers.values():
        for record in server.records:
            if record.message == "assigned job to worker":
                assigned.add(str(record.fields.get("room")))
            elif record.message == "job ended":
                statuses[str(record.fields.get("status"))] += 1
                if record.fields.get("status") == "JS_FAILED":
                    failures[str(record.fields.get("error"))] += 1
    ended_jobs = {str(r.fields.get("jobID")) for server in fleet.servers.values()
                  for r in server.records if r.message == "job ended"}
    lost = accepted - set(started)
    # what the nodes said about dispatches that found no worker, and about the lost rooms
    failed_requests = Counter(
        f"{r.fields.get('agentName')!r}: {r.fields.get('error')}"
        for server in fleet.servers.values() for r in server.records
        if r.message == "failed to send job request")
    about_lost = [f"{name}: {r.message} {json.dumps(r.fields)[:300]}"
                  for name, server in fleet.servers.items() for r in server.records
                  if r.fields.get("room") in lost and r.fields.get("level") != "debug"]
    failed_ids = {str(r.fields.get("jobID")) for server in fleet.servers.values()
                  for r in server.records
                  if r.message == "job ended" and r.fields.get("status") == "JS_FAILED"}
    about_failed = [f"{agent.name}: {line[:400]}" for agent in fleet.agents.values()
                    for line in agent.child.lines if any(j in line for j in failed_ids)]
    return {
        "agent_log_about_failed_jobs": about_failed[-40:],
        "dispatched": len(sent),
        "retried_via_other_node": sum(1 for s in sent.values() if s.get("retried")),
        "started_without_a_server_end": sorted(
            f"{e['room']}@{e['agent']}" for e in started.values()
            if fleet.servers and e["job_id"] not in ended_jobs),
        "dispatch_errors": Counter(s["error"] for s in sent.values() if s["error"]),
        "started": len(started),
        "finished": len(finished),
        "lost": sorted(lost),
        "failed_job_requests": dict(failed_requests),
        "node_log_about_lost_rooms": about_lost[:40],
        "not_finished": sorted(f"{r}@{started[r]['agent']}"
                               for r in set(started) - set(finished)),
        "assigned_per_server_logs": len(assigned),
        "server_statuses": dict(statuses),
        "server_failures": dict(failures),
        "spread": dict(sorted(by_agent.items())),
        "latency_ms": {"p50": round(percentile(latencies, 0.5), 1),
                       "p99": round(percentile(latencies, 0.99), 1),
                       "max": round(max(latencies, default=math.nan), 1)},
    }


# -- scenarios ------------------------------------------------------------------------------


@asynccontextmanager
async def real_fleet(binary: Path, workdir: Path, capacity: int) -> AsyncIterator[Fleet]:
    async with open_redis() as redis_port, trio.open_nursery() as nursery:
        redis = ["--redis-host", f"127.0.0.1:{redis_port}"]
        async with open_livekit_server(NODE_ADDRESSES[0], binary=binary, workdir=workdir,
                                       extra_args=redis) as node_a, \
                open_livekit_server(NODE_ADDRESSES[1], binary=binary, workdir=workdir,
                                    extra_args=redis) as node_b:
            fleet = Fleet(workdir, workdir / "events.jsonl", {"A": node_a.url, "B": node_b.url},
                          {"A": node_a, "B": node_b}, nursery, capacity)
            with trio.fail_after(REGISTER_TIMEOUT * 2):
                async with trio.open_nursery() as starting:
                    for i, node in enumerate("AABB"):
                        starting.start_soon(fleet.start_agent, f"a{i + 1}", node)
            yield fleet
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def dev_fleet(workdir: Path, capacity: int) -> AsyncIterator[Fleet]:
    from trio_agents.devserver import open_dev_server

    async with open_dev_server(port=0) as dev, trio.open_nursery() as nursery:
        fleet = Fleet(workdir, workdir / "events.jsonl", {"dev": dev.url}, {}, nursery,
                      capacity)
        with trio.fail_after(REGISTER_TIMEOUT * 2):
            async with trio.open_nursery() as starting:
                for i in range(4):
                    starting.start_soon(fleet.start_agent, f"a{i + 1}", "dev")
        yield fleet
        nursery.cancel_scope.cancel()


async def run_scenario(name: str, binary: Path, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix=f"fleet-{name}-"))
    notes: dict[str, Any] = {}
    third = args.jobs // 3
    opener = dev_fleet(workdir, args.capacity) if name == "dev" else real_fleet(
        binary, workdir, args.capacity)
    async with opener as fleet:
        down: set[str] = set()

        async def disrupt(i: int) -> None:
            if name == "rolling" and i == third:
                old = fleet.agents["a1"]
                notes["sigterm_at_job"] = i
                notes["old_exit"] = "pending"

                async def roll() -> None:
                    new = await fleet.start_agent("a5", old.node)
                    notes["new_registered"] = new.registrations
                fleet.nursery.start_soon(roll)

                async def drain() -> None:
                    notes["old_exit"] = await old.child.stop(signal.SIGTERM, timeout=120)
                fleet.nursery.start_soon(drain)
            elif name == "sigkill" and i == third:
                victim = fleet.agents["a2"]
                notes["sigkill_at_job"] = i
                notes["killed_running"] = running_on(fleet, "a2")
                fleet.killed.add("a2")
                notes["killed_exit"] = await victim.child.stop(signal.SIGKILL)
            elif name == "node-restart" and i == third:
                node_b = fleet.servers["B"]
                down.add("B")
                notes["stopped_at_job"] = i
                notes["running_on_b_agents"] = running_on(fleet, "a3") + running_on(fleet, "a4")
                await node_b.stop()
                fleet.nursery.start_soon(check_health_away, fleet, notes)
            elif name == "node-restart" and i == 2 * third:
                await fleet.servers["B"].start()
                down.discard("B")
                fleet.nursery.start_soon(check_reregistered, fleet, notes)

        sent = await dispatch_all(fleet, args.jobs, args.rate, rng, disrupt, down, args.via)
        settled = await wait_jobs_done(fleet, sent, budget=60)
        result = analyse(fleet, sent)
        result["settled"] = settled
        result["notes"] = notes
        if name == "rolling":
            result["jobs_to_a1_after_sigterm"] = jobs_started_after(fleet, "a1", sent, third)
        if name == "sigkill":
            killed = fleet.read_events()
            result["a2_started_not_finished"] = sorted(
                {e["room"] for e in killed if e["agent"] == "a2" and e["event"] == "started"}
                - {e["room"] for e in killed if e["agent"] == "a2" and e["event"] == "finished"})
        if name == "node-restart":
            result["rooms_via_b"] = summarise_rooms(fleet, sent, "B")
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def running_on(fleet: Fleet, agent: str) -> int:
    events = fleet.read_events()
    started = {e["room"] for e in events if e["agent"] == agent and e["event"] == "started"}
    done = {e["room"] for e in events if e["agent"] == agent and e["event"] == "finished"}
    return len(started - done)


def jobs_started_after(fleet: Fleet, agent: str, sent: dict[str, dict[str, Any]],
                       index: int) -> int:
    cutoff = sorted(s["t"] for s in sent.values())[index]
    return sum(1 for e in fleet.read_events()
               if e["agent"] == agent and e["event"] == "started" and sent[e["room"]]["t"] > cutoff)


def summarise_rooms(fleet: Fleet, sent: dict[str, dict[str, Any]], node: str) -> dict[str, int]:
    events = fleet.read_events()
    started = {e["room"] for e in events if e["event"] == "started"}
    finished = {e["room"] for e in events if e["event"] == "finished"}
    rooms = [r for r, s in sent.items() if s["node"] == node]
    return {"dispatched": len(rooms), "started": len(set(rooms) & started),
            "finished": len(set(rooms) & finished)}


async def check_health_away(fleet: Fleet, notes: dict[str, Any]) -> None:
    await trio.sleep(1.0)  # the agents on B noticed by now (their socket closed)
    notes["health_while_b_down"] = {a.name: await a.health() for a in fleet.agents.values()}


async def check_reregistered(fleet: Fleet, notes: dict[str, Any]) -> None:
    started = trio.current_time()
    on_b = [a for a in fleet.agents.values() if a.node == "B"]
    with trio.move_on_after(60):
        while not all(a.registrations >= 2 for a in on_b):
            await trio.sleep(0.2)  # the agents' output is read by other tasks
    notes["reregistered_after_s"] = round(trio.current_time() - started, 2)
    notes["registrations_on_b"] = {a.name: a.registrations for a in on_b}
    notes["health_after_b_back"] = {a.name: await a.health() for a in on_b}


async def main_async(args: argparse.Namespace, binary: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in args.scenarios:
        print(f"scenario {name} ...", flush=True)
        began = time.monotonic()
        results[name] = await run_scenario(name, binary, args)
        results[name]["wall_s"] = round(time.monotonic() - began, 1)
        print(json.dumps(results[name], indent=1, default=str), flush=True)
    return results


def write_chart(results: dict[str, Any], path: Path) -> None:
    """An SVG (no plotting library needed): jobs per agent server in each scenario, and the
    dispatch latency p50/p99 above each group."""
    names = [n for n in results if results[n].get("spread")]
    agents = sorted({a for n in names for a in results[n]["spread"]})
    colours = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"]
    peak = max(max(results[n]["spread"].values()) for n in names) if names else 1
    bar, gap, height, top = 14, 40, 220, 70
    group = bar * len(agents) + gap
    width = 60 + group * len(names)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + top + 60}"'
           ' font-family="sans-serif" font-size="11">',
           f'<text x="10" y="18" font-size="13">fleet: jobs per agent server (of '
           f'{results[names[0]]["dispatched"] if names else 0}); dispatch latency p50/p99'
           ' (ms); lost</text>']
    for g, name in enumerate(names):
        x0 = 50 + g * group
        res = results[name]
        lat = res["latency_ms"]
        out.append(f'<text x="{x0}" y="{top - 20}">{lat["p50"]:.0f}/{lat["p99"]:.0f} ms</text>'
                   f'<text x="{x0}" y="{top - 6}">lost {len(res["lost"])}</text>')
        for i, agent in enumerate(agents):
            jobs = res["spread"].get(agent, 0)
            h = height * jobs / peak
            out.append(f'<rect x="{x0 + i * bar}" y="{top + height - h:.1f}" width="{bar - 2}"'
                       f' height="{h:.1f}" fill="{colours[i % len(colours)]}">'
                       f'<title>{name} {agent}: {jobs}</title></rect>')
        out.append(f'<text x="{x0}" y="{top + height + 16}">{name}</text>')
    for i, agent in enumerate(agents):
        out.append(f'<rect x="{50 + i * 60}" y="{top + height + 32}" width="10" height="10"'
                   f' fill="{colours[i % len(colours)]}"/><text x="{64 + i * 60}"'
                   f' y="{top + height + 41}">{agent}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--capacity", type=int, default=100,
                        help="jobs at which an agent server reports load 1.0")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--via", choices=["dispatch", "room"], default="dispatch",
                        help="CreateDispatch, or CreateRoom with the agent in its dispatches")
    parser.add_argument("--scenarios", nargs="+",
                        default=["steady", "rolling", "sigkill", "node-restart", "dev"])
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed: apt-get install -y redis-server "
                 "(the two livekit-server nodes share it)")
    binary, why = find_binary()
    if binary is None:
        sys.exit(f"livekit-server not found: {why}")
    netns.enter_private_network()
    address, where = netns.rtc_address()
    if address != NODE_ADDRESSES[0]:
        sys.exit(f"the fleet needs the private network namespace (run as root): {where}")
    results = trio.run(main_async, args, binary)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "fleet.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1,
                              default=str))
    write_chart(results, HERE / "fleet.svg")
    print(f"written {out} and {HERE / 'fleet.svg'}")


if __name__ == "__main__":
    main()
