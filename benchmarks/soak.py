"""Soak: an agent server against the dev server for N minutes of seeded faults.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--seed 1] [--json PATH]

Starts trio_agents' dev server in this process and ``benchmarks/soak_agent.py start`` (the
production mode of the CLI) as a child, then runs a seeded random mix for ``--minutes``
(fractions allowed; CI runs 2):

* job kinds (soak_agent.py): normal, long sleepers (> 15 s), a grandchild that calls
  ``setsid()``, ``raise``, ``os._exit``, segfault, memory over ``job_memory_limit_mb``, a hang
  that awaits forever and one that blocks its event loop (both ended by deleting their room:
  LiveKit's ``JobTermination``; one more hang is left to the final drain);
* disruptions: quiet gaps of 16-22 s (nothing dispatched), the worker's websocket dropped by
  the dev server (``DevServer.drop_worker``), the dev server down for 5 s (stopped, then
  started again on the same port: a new server that knows none of the old jobs), SIGSTOP /
  SIGCONT of a running job process for 2-6 s;
* at the end, a SIGTERM drain with jobs running (one of them a hang that outlives
  ``drain_timeout``).

Then it checks, prints a summary and exits 1 if a check failed:

* statuses: each job the server assigned to the agent got exactly one final status
  (``JS_SUCCESS``/``JS_FAILED`` as reported by the agent to whichever dev server was up:
  every ``UpdateJobStatus`` any dev server received is recorded, so a status sent to the
  restarted server about a job of the old one counts), and the right one for its kind under
  ``_proc.outcome``'s rules (table ``EXPECTED``);
* orphans: no process carrying this run's marker (``SOAK_RUN=<token>`` in the environment of
  the agent server, inherited by the zygote, job processes and grandchildren) is alive 3 s
  after the agent server exited, and no grandchild outlived its job by more than 3 s;
* flat resources of the agent server's main process, between two idle points (no job, pool
  full, tree settled) after warm-up and before the drain: RSS drift < 10 MiB, open fds +5 at
  most;
* the zygote: the same zygote process for the whole run (no fault here targets it);
* health: ``GET /`` answered 503 only while LiveKit was away (from a disruption to the
  re-registration, + 1 s), before the first registration, or after SIGTERM; it never went
  unanswered while the server served;
* the agent server exited after SIGTERM with the CLI's exit code for a forced drain (3).

Timestamps are ``time.monotonic()`` (the dev server's stamps use the same clock).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import psutil
import trio
from livekit.protocol import agent as agent_pb

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
sys.path.insert(0, str(ROOT))

from trio_agents.devserver import DevServer, JobInfo, WorkerInfo, open_dev_server  # noqa: E402
from trio_agents.devserver import _dispatcher as devserver_impl  # noqa: E402

FINAL: Final = (agent_pb.JS_SUCCESS, agent_pb.JS_FAILED)
SUCCESS, FAILED = "JS_SUCCESS", "JS_FAILED"

# -- the bounds the checks apply --------------------------------------------------------------
RSS_DRIFT_MIB: Final = 10.0
FD_DRIFT: Final = 5
ORPHAN_GRACE: Final = 3.0  # the reaper's sweep after the server exits; a job's own cleanup
HEALTH_GRACE: Final = 1.0  # after the re-registration the dev server stamped
EXIT_FORCED: Final = 3  # the CLI's exit code when a drain had to stop jobs

# -- the agent's options (soak_agent.py reads them from the environment) ----------------------
IDLE: Final = 2
MEMORY_LIMIT_MB: Final = 200
MEMORY_HOG_MB: Final = 400
DRAIN_TIMEOUT: Final = 12.0

# -- the mix -----------------------------------------------------------------------------------
WEIGHTS: Final = {"normal": 30, "long": 7, "grandchild": 8, "raise": 8, "exit": 8,
                  "segfault": 7, "memory": 5, "hang": 6, "hang_sync": 4}
#: The status and error (a regular expression; {arg}: the job's argument) that our outcome
#: rules (``_proc.outcome``) give each kind when nothing else happens to it. Hangs depend on
#: who ended them: see ``Soak.expected``.
EXPECTED: Final = {
    "normal": (SUCCESS, "^$"), "long": (SUCCESS, "^$"), "grandchild": (SUCCESS, "^$"),
    "raise": (FAILED, "^RuntimeError: soak: this job raises on purpose$"),
    "exit": (FAILED, "^exit code {arg}$"),
    "segfault": (FAILED, "^killed by signal SIGSEGV$"),
    "memory": (FAILED, f"^killed: memory limit {MEMORY_LIMIT_MB} MB exceeded"),
    # LiveKit's JobTermination: the entrypoint is cancelled, the job ends well
    "hang terminated": (SUCCESS, "^$"),
    # ... but this one blocks its event loop: the escalation (SIGTERM) ends it
    "hang_sync terminated": (FAILED, "^did not stop within .* killed by signal SIGTERM$"),
    # the drain's budget ran out: interrupted by the server (SIGTERM too if it blocks)
    "hang drained": (FAILED, "^stopped before it finished: the agent server shut down$"),
    "hang_sync drained": (FAILED, "^stopped before it finished: the agent server shut down; "
                                  "did not stop within"),
}
MAX_RUNNING: Final = 6  # jobs at once (the agent's /worker active_jobs), on a shared 2-core box
MEAN_GAP: Final = 1.2  # seconds between dispatches, exponential
HEALTH_POLL: Final = 0.5
SAMPLE_EVERY: Final = 1.0


def job_argument(kind: str, rng: random.Random) -> str:
    if kind == "normal":
        return f"{rng.uniform(0.2, 4):.2f}"
    if kind == "long":
        return f"{rng.uniform(16, 26):.1f}"
    if kind == "grandchild":
        return f"{rng.uniform(0.5, 3):.2f}"
    if kind == "exit":
        return str(rng.choice([1, 3, 7]))
    if kind == "memory":
        return str(MEMORY_HOG_MB)
    return ""


# -- records ---------------------------------------------------------------------------------


@dataclass
class Job:
    n: int
    kind: str
    arg: str
    room: str
    generation: int
    dispatched_at: float
    info: JobInfo | None = None  # the dev server's record (None: it created no job)
    pid: int = 0
    grandchild: int = 0
    stopped: bool = False  # SIGSTOPped and continued
    terminate_at: float = math.inf  # hangs: when the soak deletes their room
    room_deleted: bool = False

    @property
    def id(self) -> str:
        return self.info.job.id if self.info else ""

    @property
    def assigned(self) -> bool:
        return self.info is not None and bool(self.info.worker_id)


@dataclass
class Seen:
    """One ``UpdateJobStatus`` a dev server received."""

    t: float
    job_id: str
    status: int
    error: str
    generation: int


class Ledger:
    """Every job status any dev server of this run received, recorded by wrapping the dev
    server's handler for ``UpdateJobStatus`` (it ignores statuses of jobs it does not know,
    e.g. those a restarted server never created: they are recorded here all the same)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.by_job: dict[str, list[Seen]] = collections.defaultdict(list)
        self.generation = 0
        self._changed = trio.Event()

    @contextmanager
    def installed(self) -> Iterator[None]:
        original = devserver_impl.Dispatcher._update_job

        def recording(dev: devserver_impl.Dispatcher, worker: WorkerInfo,
                      update: agent_pb.UpdateJobStatus) -> None:
            seen = Seen(time.monotonic(), update.job_id, update.status, update.error,
                        self.generation)
            self.seen.append(seen)
            self.by_job[update.job_id].append(seen)
            self._changed.set()
            self._changed = trio.Event()
            original(dev, worker, update)

        devserver_impl.Dispatcher._update_job = recording  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            devserver_impl.Dispatcher._update_job = original  # type: ignore[method-assign]

    def finals(self, job_id: str) -> list[Seen]:
        return [s for s in self.by_job.get(job_id, ()) if s.status in FINAL]

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not predicate():
                await self._changed.wait()
            return True
        return False


class DevHost:
    """The dev server, stoppable and restartable on the same port."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.port = 0
        self.dev: DevServer | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(self, nursery: trio.Nursery) -> DevServer:
        self.ledger.generation += 1
        self._stopped = trio.Event()
        self.dev = await nursery.start(self._serve)
        return self.dev

    async def _serve(self, *, task_status: trio.TaskStatus[DevServer]) -> None:
        try:
            with trio.CancelScope() as self._scope:
                async with open_dev_server(host="127.0.0.1", port=self.port) as dev:
                    self.port = dev.port
                    task_status.started(dev)
                    await trio.sleep_forever()
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        assert self._scope is not None
        self.dev = None
        self._scope.cancel()
        await self._stopped.wait()

    async def wait_registered(self, after: float, timeout: float) -> float | None:
        """The registration stamp of a worker registered after ``after`` (None: none came)."""
        dev = self.dev
        assert dev is not None

        def fresh() -> list[WorkerInfo]:
            return [w for w in dev.workers.values() if w.registered_at > after]

        with trio.move_on_after(timeout):
            await dev.wait_until(fresh)
            return max(w.registered_at for w in fresh())
        return None

    def worker(self) -> WorkerInfo | None:
        if self.dev is None:
            return None
        return next(iter(self.dev.workers.values()), None)


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    processes: int
    zygote: int
    pids: frozenset[int] = frozenset()


@dataclass
class Probe:
    t: float
    status: int  # 0: no answer (refused, timeout)
    active_jobs: int = -1


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, ok: bool, text: str) -> None:
        if not ok:
            self.failures.append(text)


# -- process helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def marked(token: str, pids: list[int] | None = None) -> set[int]:
    """The processes (of ``pids``, default all) whose environment carries this run's marker;
    zombies have no environment left and are not counted."""
    needle = f"SOAK_RUN={token}".encode()
    if pids is None:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.add(pid)
        except OSError:
            continue
    return found


def describe(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{pid} ({' '.join(proc.cmdline())[:100]}; ppid {proc.ppid()}, {proc.status()})"
    except psutil.Error:
        return f"{pid} (gone)"


def running(pid: int, token: str) -> bool:
    """``pid`` is a live process of this run (not a zombie, not a recycled pid)."""
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    return pid in marked(token, [pid])


def sample_tree(pid: int) -> Sample | None:
    try:
        main = psutil.Process(pid)
        with main.oneshot():
            rss, fds = main.memory_info().rss, main.num_fds()
        children = main.children(recursive=True)
    except psutil.Error:
        return None
    zygote = 0
    for child in children:
        try:
            if child.ppid() == pid and "trio_agents._zygote" in child.cmdline():
                zygote = child.pid
        except psutil.Error:
            continue
    return Sample(time.monotonic(), rss, fds, 1 + len(children), zygote,
                  frozenset(c.pid for c in children))


# -- the soak -------------------------------------------------------------------------------


class Soak:
    def __init__(self, minutes: float, seed: int) -> None:
        self.minutes = minutes
        self.seed = seed
        self.rng = random.Random(seed)
        self.token = secrets.token_hex(6)
        self.ledger = Ledger()
        self.host = DevHost(self.ledger)
        self.workdir = Path(tempfile.mkdtemp(prefix="soak-"))
        self.events_path = self.workdir / "events.jsonl"
        self.log_path = self.workdir / "agent.log"
        self.health_port = free_port()
        self.jobs: list[Job] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.fault_log: list[str] = []
        self.away: list[tuple[float, float]] = []  # LiveKit away: [start, end]
        self.samples: list[Sample] = []
        self.probes: list[Probe] = []
        self.not_created = 0
        self.not_taken: list[str] = []
        self.never_running: list[str] = []
        self.termination_unseen: list[str] = []
        self.grandchildren_left: dict[int, str] = {}
        self.baseline: Sample | None = None
        self.end_point: Sample | None = None
        self.process: trio.Process | None = None
        self.sigterm_at = math.inf
        self.exit_at = math.inf
        self.t0 = time.monotonic()
        self.orphans: list[str] = []
        self._events_offset = 0
        self._events: dict[str, dict[str, Any]] = {}
        self._log_offset = 0
        self._terminated: set[str] = set()
        self._count = 0

    # -- the agent ---------------------------------------------------------------------------

    def agent_env(self) -> dict[str, str]:
        dev = self.host.dev
        assert dev is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "SOAK_"))}
        env.update(LIVEKIT_URL=dev.url, LIVEKIT_API_KEY=dev.api_key,
                   LIVEKIT_API_SECRET=dev.api_secret, SOAK_EVENTS=str(self.events_path),
                   SOAK_HEALTH_PORT=str(self.health_port), SOAK_IDLE=str(IDLE),
                   SOAK_MEMORY_LIMIT_MB=str(MEMORY_LIMIT_MB),
                   SOAK_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT), SOAK_RUN=self.token,
                   PYTHONPATH=str(ROOT))
        return env

    def read_events(self) -> None:
        if not self.events_path.exists():
            return
        with self.events_path.open("rb") as f:
            f.seek(self._events_offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self._events_offset += len(complete)
        for line in complete.decode().splitlines():
            event = json.loads(line)
            self._events.setdefault(event["job_id"], {})[event["event"]] = event
        for job in self.jobs:
            seen = self._events.get(job.id)
            if seen:
                if "started" in seen:
                    job.pid = seen["started"]["pid"]
                if "grandchild" in seen:
                    job.grandchild = seen["grandchild"]["grandchild"]

    def agent_log(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"message": line, "level": "RAW"}
            if isinstance(entry, dict):
                out.append(entry)
        return out

    def terminated_by_livekit(self) -> set[str]:
        """Jobs the agent logged "LiveKit terminated job …" for (read on from the last call)."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        self._terminated.update(re.findall(r"LiveKit terminated job (AJ_\w+)",
                                           complete.decode(errors="replace")))
        return self._terminated

    # -- background -------------------------------------------------------------------------

    async def sampler(self) -> None:
        assert self.process is not None
        pid = self.process.pid
        while self.process.returncode is None:
            sample = await trio.to_thread.run_sync(sample_tree, pid)
            if sample is not None:
                self.samples.append(sample)
            await self.watch_grandchildren()
            await trio.sleep(SAMPLE_EVERY)

    async def watch_grandchildren(self) -> None:
        """A grandchild still alive ORPHAN_GRACE s after its job's final status is a leak."""
        self.read_events()
        now = time.monotonic()
        due = []
        for job in self.jobs:
            finals = self.ledger.finals(job.id)
            if (job.grandchild and job.grandchild not in self.grandchildren_left and finals
                    and now - finals[0].t > ORPHAN_GRACE):
                due.append(job)
        if not due:
            return
        alive = await trio.to_thread.run_sync(marked, self.token, [j.grandchild for j in due])
        for job in due:
            if job.grandchild in alive:
                self.grandchildren_left[job.grandchild] = (
                    f"grandchild {describe(job.grandchild)} of job {job.id} still alive "
                    f"{now - self.ledger.finals(job.id)[0].t:.1f} s after the job's status")
            else:
                self.grandchildren_left.setdefault(job.grandchild, "")

    async def health_poller(self) -> None:
        assert self.process is not None
        base = f"http://127.0.0.1:{self.health_port}"
        async with httpx.AsyncClient(timeout=2.0) as client:
            while self.process.returncode is None:
                t = time.monotonic()
                probe = Probe(t, 0)
                try:
                    probe.status = (await client.get(base + "/")).status_code
                    worker = await client.get(base + "/worker")
                    if worker.status_code == 200:
                        probe.active_jobs = int(worker.json()["active_jobs"])
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                self.probes.append(probe)
                await trio.sleep(max(0.0, HEALTH_POLL - (time.monotonic() - t)))

    def active_jobs(self) -> int:
        for probe in reversed(self.probes):
            if probe.active_jobs >= 0:
                return probe.active_jobs
        return 0

    # -- actions --------------------------------------------------------------------------------

    async def dispatch(self, kind: str, arg: str | None = None) -> Job:
        """Dispatch one job; return once the agent reported it running (or gave up on it)."""
        dev = self.host.dev
        assert dev is not None
        self._count += 1
        arg = job_argument(kind, self.rng) if arg is None else arg
        job = Job(self._count, kind, arg, f"soak-{self._count}-{kind}", self.ledger.generation,
                  time.monotonic())
        self.jobs.append(job)
        await dev.create_dispatch(job.room, "soak", metadata=f"{kind}:{arg}")
        job.info = next((j for j in dev.jobs.values() if j.room == job.room), None)
        if job.info is None:
            self.not_created += 1  # no worker registered at that moment: no job at all
            return job
        info = job.info
        with trio.move_on_after(10):
            await dev.wait_until(lambda: info.done)
        if not job.assigned:
            self.not_taken.append(f"job {info.job.id} ({kind}): {info.dropped or 'not done'}")
            return job
        if kind in ("hang", "hang_sync"):
            job.terminate_at = time.monotonic() + self.rng.uniform(1, 5)
        if not await self.ledger.wait(lambda: bool(self.ledger.by_job.get(info.job.id)), 20):
            self.never_running.append(f"job {info.job.id} ({kind}) assigned at "
                                      f"{info.assigned_at - self.t0:.1f} s")
        return job

    async def terminate_due(self, *, all_pending: bool = False) -> None:
        """Delete the room of each hang whose time came (or all), as LiveKit's DeleteRoom;
        return once the agent logged the termination (≤ 5 s each)."""
        dev = self.host.dev
        if dev is None:
            return
        now = time.monotonic()
        for job in self.jobs:
            if (job.room_deleted or job.terminate_at == math.inf
                    or (not all_pending and job.terminate_at > now)):
                continue
            job.room_deleted = True
            if job.room not in dev.rooms or job.generation != self.ledger.generation:
                continue  # the server that knew it is gone: the final drain ends it
            await dev.delete_room(job.room)
            job_id = job.id
            with trio.move_on_after(5) as scope:
                while job_id not in self.terminated_by_livekit():
                    await trio.sleep(0.05)
            if scope.cancelled_caught:
                self.termination_unseen.append(job_id)

    async def away_until_registered(self, start: float, what: str) -> None:
        registered = await self.host.wait_registered(start, timeout=90)
        end = registered if registered is not None else time.monotonic()
        self.away.append((start, end))
        text = (f"re-registered after {end - start:.2f} s" if registered is not None
                else "NOT re-registered within 90 s")
        self.fault_log.append(f"{start - self.t0:7.1f} s  {what}: {text}")

    async def fault(self, kind: str, nursery: trio.Nursery) -> None:
        """Inject one disruption (counted in ``faults`` unless it had to be skipped)."""
        await self.terminate_due(all_pending=True)  # no hang's termination straddles a fault
        if kind in ("quiet", "drop", "down"):
            # a job across the gap (> 15 s of quiet), or one that ends while LiveKit is away
            await self.dispatch("long" if kind == "quiet" else "normal",
                                None if kind == "quiet" else "1.5")
        if kind == "quiet":
            gap = self.rng.uniform(16, 22)
            self.fault_log.append(f"{time.monotonic() - self.t0:7.1f} s  quiet for {gap:.1f} s")
            self.faults[kind] += 1
            await trio.sleep(gap)
        elif kind == "drop":
            worker = self.host.worker()
            if worker is None:
                self.fault_log.append("drop: no worker registered; skipped")
                return
            start = time.monotonic()
            assert self.host.dev is not None
            self.host.dev.drop_worker(worker.id)
            self.faults[kind] += 1
            await self.away_until_registered(start, "websocket dropped")
        elif kind == "down":
            start = time.monotonic()
            await self.host.stop()
            self.faults[kind] += 1
            await trio.sleep(5)
            await self.host.start(nursery)
            await self.away_until_registered(start, "dev server down 5 s, restarted")
        elif kind == "sigstop":
            self.read_events()
            candidates = [j for j in self.jobs if j.pid and j.kind in ("normal", "long")
                          and not self.ledger.finals(j.id) and not j.stopped
                          and running(j.pid, self.token)]
            if not candidates:
                job = await self.dispatch("long")
                with trio.move_on_after(10):
                    while not job.pid:
                        await trio.sleep(0.05)
                        self.read_events()
                candidates = [job] if job.pid else []
            if not candidates:
                self.fault_log.append("sigstop: no running job process; skipped")
                return
            job = self.rng.choice(candidates)
            pause = self.rng.uniform(2, 6)
            try:
                os.kill(job.pid, signal.SIGSTOP)
            except ProcessLookupError:
                self.fault_log.append(f"sigstop: job {job.id} already gone; skipped")
                return
            job.stopped = True
            self.faults[kind] += 1
            try:
                await trio.sleep(pause)
            finally:
                try:
                    os.kill(job.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            self.fault_log.append(f"{time.monotonic() - self.t0 - pause:7.1f} s  SIGSTOP job "
                                  f"{job.id} ({job.kind}, pid {job.pid}) for {pause:.1f} s")

    def plan_faults(self, length: float) -> list[tuple[float, str]]:
        """Each disruption at least once, more in long runs (one of each per ~3 minutes),
        at random moments of the main phase."""
        kinds = ["quiet", "drop", "down", "sigstop"]
        extra = max(0, int(length / 180))
        planned = kinds + [self.rng.choice(kinds) for _ in range(extra * len(kinds))]
        self.rng.shuffle(planned)
        slot = length / len(planned)
        return [(i * slot + self.rng.uniform(0.1, 0.6) * slot, kind)
                for i, kind in enumerate(planned)]

    async def idle_point(self) -> Sample | None:
        """No job running and the same processes in the tree for 2 s (the idle pool refilled):
        the main process's RSS and fds, medians of those 2 s."""
        assert self.process is not None
        with trio.move_on_after(90):
            while self.active_jobs() or not self.probes or self.probes[-1].active_jobs != 0:
                await trio.sleep(0.2)
        stable: list[Sample] = []
        with trio.move_on_after(30):
            while True:
                sample = await trio.to_thread.run_sync(sample_tree, self.process.pid)
                if sample is None:
                    return None
                if stable and sample.pids == stable[-1].pids:
                    stable.append(sample)
                else:
                    stable = [sample]
                if len(stable) >= 5:
                    break
                await trio.sleep(0.5)
        if len(stable) < 5:
            return None  # never idle: the check says so
        return Sample(stable[-1].t, int(statistics.median(s.rss for s in stable)),
                      int(statistics.median(s.fds for s in stable)), stable[-1].processes,
                      stable[-1].zygote)

    # -- the run --------------------------------------------------------------------------------

    async def run(self) -> Report:
        total = self.minutes * 60
        warmup = min(60.0, max(15.0, 0.15 * total))
        main_phase = max(30.0, total - warmup - 40.0)
        with self.ledger.installed():
            async with trio.open_nursery() as nursery:
                await self.host.start(nursery)
                try:
                    await self.drive(nursery, warmup, main_phase)
                finally:
                    with trio.CancelScope(shield=True):
                        await self.cleanup()
                    nursery.cancel_scope.cancel()
        return self.check()

    async def drive(self, nursery: trio.Nursery, warmup: float, main_phase: float) -> None:
        with self.log_path.open("w") as log:
            self.t0 = time.monotonic()
            self.process = await trio.lowlevel.open_process(
                [sys.executable, str(HERE / "soak_agent.py"), "start", "--log-level", "info"],
                env=self.agent_env(), cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        registered = await self.host.wait_registered(0, timeout=60)
        if registered is None:
            raise SystemExit(f"the agent never registered; its log:\n{self.log_tail()}")
        self.away.append((self.t0, registered))
        print(f"soak: agent pid {self.process.pid} registered after {registered - self.t0:.2f} "
              f"s; warm-up {warmup:.0f} s, main phase {main_phase:.0f} s (seed {self.seed}, "
              f"dev server port {self.host.port}, health port {self.health_port}, "
              f"files in {self.workdir})", flush=True)
        nursery.start_soon(self.health_poller)
        nursery.start_soon(self.sampler)

        # warm-up: every kind once (the error paths warmed up too), then normal jobs
        end = time.monotonic() + warmup
        coverage = list(WEIGHTS)
        self.rng.shuffle(coverage)
        while time.monotonic() < end or coverage:
            await self.terminate_due()
            if self.active_jobs() < MAX_RUNNING:
                await self.dispatch(coverage.pop() if coverage else "normal")
            await trio.sleep(self.rng.expovariate(1 / MEAN_GAP))
        await self.terminate_due(all_pending=True)
        self.baseline = await self.idle_point()
        if self.baseline is not None:
            print(f"soak: baseline at {time.monotonic() - self.t0:.0f} s: RSS "
                  f"{self.baseline.rss / 2**20:.1f} MiB, {self.baseline.fds} fds, "
                  f"{self.baseline.processes} processes", flush=True)

        start = time.monotonic()
        plan = self.plan_faults(main_phase)
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        while time.monotonic() < start + main_phase:
            await self.terminate_due()
            if plan and time.monotonic() >= start + plan[0][0]:
                await self.fault(plan.pop(0)[1], nursery)
                continue
            if self.host.dev is not None and self.active_jobs() < MAX_RUNNING:
                kind = self.rng.choices(kinds, weights)[0]
                if self.rng.random() < 0.08:  # a burst of 3 at once
                    async with trio.open_nursery() as burst:
                        for _ in range(3):
                            burst.start_soon(self.dispatch, kind)
                else:
                    await self.dispatch(kind)
            await trio.sleep(self.rng.expovariate(1 / MEAN_GAP))
        for _, kind in plan:  # whatever did not fit (a slow re-registration): run it now
            await self.fault(kind, nursery)
        print(f"soak: main phase over at {time.monotonic() - self.t0:.0f} s; waiting for the "
              "running jobs", flush=True)
        await self.terminate_due(all_pending=True)
        self.end_point = await self.idle_point()

        # the final drain: jobs that finish in time, one grandchild, one hang that does not
        drained = [await self.dispatch("normal", f"{self.rng.uniform(1, 3):.2f}")
                   for _ in range(3)]
        drained.append(await self.dispatch("grandchild", "2"))
        drained.append(await self.dispatch("hang"))
        drained[-1].terminate_at = math.inf  # left to the drain
        self.sigterm_at = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.away.append((self.sigterm_at, math.inf))
        with trio.move_on_after(DRAIN_TIMEOUT + 60):
            await self.process.wait()
        self.exit_at = time.monotonic()

    async def cleanup(self) -> None:
        """Record what is left of ours, then kill it (this run leaves nothing behind)."""
        for job in self.jobs:
            if job.stopped and job.pid:
                try:
                    os.kill(job.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        if self.process is not None and self.process.returncode is None:
            self.fault_log.append("the agent server did not exit after SIGTERM: SIGKILL")
            self.process.kill()
            await self.process.wait()
        left: set[int] = set()
        with trio.move_on_after(ORPHAN_GRACE):
            while left := await trio.to_thread.run_sync(marked, self.token):
                await trio.sleep(0.1)
        self.orphans = [describe(pid) for pid in sorted(left)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    # -- checks -----------------------------------------------------------------------------------

    def expected(self, job: Job, terminated: set[str]) -> tuple[str, str]:
        """The status and error pattern this job must end with."""
        if job.kind in ("hang", "hang_sync"):
            how = "terminated" if job.id in terminated else "drained"
            return EXPECTED[f"{job.kind} {how}"]
        status, pattern = EXPECTED[job.kind]
        return status, pattern.format(arg=re.escape(job.arg))

    def check(self) -> Report:
        report = Report()

        def away(t: float, grace: float = HEALTH_GRACE) -> bool:
            """LiveKit was away at ``t``: a disruption until the re-registration (+ grace)."""
            return any(a <= t <= b + grace for a, b in self.away)

        self.read_events()
        terminated = self.terminated_by_livekit()
        assigned = [j for j in self.jobs if j.assigned]
        lost, duplicated, conflicting, wrong = [], [], [], []
        for job in assigned:
            finals = self.ledger.finals(job.id)
            if not finals:
                own = self._events.get(job.id, {})
                end = own.get("finished", {}).get("t")
                ended = ("its entrypoint never returned" if end is None else
                         f"its entrypoint returned at {end - self.t0:.1f} s"
                         + (" while LiveKit was away" if away(end, 0) else ""))
                lost.append(f"job {job.id} ({job.kind}:{job.arg}, dispatched at "
                            f"{job.dispatched_at - self.t0:.1f} s to dev server generation "
                            f"{job.generation}{', SIGSTOPped' if job.stopped else ''}): "
                            f"no final status; {ended}")
                continue
            if len({(s.status, s.error) for s in finals}) > 1:
                conflicting.append(f"job {job.id} ({job.kind}): "
                                   f"{[agent_pb.JobStatus.Name(s.status) for s in finals]}")
            elif len(finals) > 1:
                # a final status written just before a session was lost is sent again (at
                # least once): LiveKit ignores a job's updates once it has ended (PROTOCOL §3.6)
                duplicated.append(f"job {job.id} ({job.kind}): "
                                  f"{[agent_pb.JobStatus.Name(s.status) for s in finals]} at "
                                  f"{[round(s.t - self.t0, 1) for s in finals]} s")
            got, error = agent_pb.JobStatus.Name(finals[0].status), finals[0].error
            want, pattern = self.expected(job, terminated)
            if got != want or not re.search(pattern, error):
                wrong.append(f"job {job.id} ({job.kind}:{job.arg}"
                             f"{', SIGSTOPped' if job.stopped else ''}) got {got} "
                             f"{error!r} at {finals[0].t - self.t0:.1f} s; expected {want} "
                             f"/{pattern}/")
        report.check(not lost, f"{len(lost)} job(s) never got a final status")
        report.check(not conflicting,
                     f"{len(conflicting)} job(s) got two different final statuses")
        report.check(not wrong, f"{len(wrong)} job(s) got the wrong final status")
        report.check(not self.never_running,
                     f"{len(self.never_running)} assigned job(s) never reported running")

        orphans = list(self.orphans)
        leaks = [text for text in self.grandchildren_left.values() if text]
        report.check(not orphans, f"{len(orphans)} process(es) of ours alive "
                                  f"{ORPHAN_GRACE:g} s after the agent server exited")
        report.check(not leaks, f"{len(leaks)} grandchild(ren) outlived their job")

        rss_drift = fd_drift = math.nan
        if self.baseline and self.end_point:
            rss_drift = (self.end_point.rss - self.baseline.rss) / 2**20
            fd_drift = self.end_point.fds - self.baseline.fds
            report.check(rss_drift < RSS_DRIFT_MIB,
                         f"RSS of the main process grew {rss_drift:.1f} MiB (bound "
                         f"{RSS_DRIFT_MIB:g})")
            report.check(fd_drift <= FD_DRIFT,
                         f"the main process holds {fd_drift:+d} fds (bound +{FD_DRIFT})")
        else:
            report.check(False, "no idle point reached (baseline or end): resources unchecked")

        before_sigterm = [s for s in self.samples if s.t < self.sigterm_at]
        zygotes = list(dict.fromkeys(s.zygote for s in before_sigterm if s.zygote))
        absent = sum(SAMPLE_EVERY for s in before_sigterm if not s.zygote)
        restarts = max(0, len(zygotes) - 1)
        report.check(restarts == 0, f"the zygote was replaced {restarts} time(s) "
                                    "with no fault injected into it")
        report.check(absent == 0, f"no zygote for {absent:.0f} s of the run")

        bad = [p for p in self.probes if p.status == 503 and not away(p.t)]
        silent = [p for p in self.probes if p.status == 0 and not away(p.t)]
        ok_away = [p for p in self.probes if p.status == 200 and away(p.t, 0)
                   and p.t < self.sigterm_at]
        report.check(not bad, f"health answered 503 for {len(bad) * HEALTH_POLL:.1f} s while "
                              "LiveKit was up")
        report.check(not silent, f"health did not answer for {len(silent) * HEALTH_POLL:.1f} s "
                                 "while the server served")

        exit_code = self.process.returncode if self.process else None
        report.check(exit_code == EXIT_FORCED,
                     f"the agent server exited with {exit_code} after SIGTERM (expected "
                     f"{EXIT_FORCED}: its drain had to stop a hang)")

        by_kind = collections.Counter(j.kind for j in assigned)
        report.figures.update(
            minutes=self.minutes, seed=self.seed, jobs_dispatched=len(self.jobs),
            jobs_assigned=len(assigned), jobs_by_kind=dict(sorted(by_kind.items())),
            jobs_not_created=self.not_created, offers_not_taken=len(self.not_taken),
            faults=dict(self.faults), statuses_lost=len(lost), statuses_duplicated=len(duplicated),
            statuses_conflicting=len(conflicting),
            wrong_statuses=len(wrong), never_running=len(self.never_running), orphans=len(orphans),
            grandchildren_leaked=len(leaks), grandchildren_watched=len(self.grandchildren_left),
            rss_start_mib=self.baseline.rss / 2**20 if self.baseline else math.nan,
            rss_end_mib=self.end_point.rss / 2**20 if self.end_point else math.nan,
            rss_drift_mib=rss_drift,
            rss_max_mib=max((s.rss for s in self.samples), default=0) / 2**20,
            fd_start=self.baseline.fds if self.baseline else -1,
            fd_end=self.end_point.fds if self.end_point else -1, fd_drift=fd_drift,
            zygote_pids=zygotes, zygote_restarts=restarts, zygote_absent_s=absent,
            health_503_outside_s=len(bad) * HEALTH_POLL,
            health_silent_outside_s=len(silent) * HEALTH_POLL,
            health_200_while_away_s=len(ok_away) * HEALTH_POLL,
            drain_exit_s=self.exit_at - self.sigterm_at, exit_code=exit_code,
            terminations_unseen=len(self.termination_unseen))
        report.figures["details"] = {
            "lost": lost, "duplicated": duplicated, "conflicting": conflicting, "wrong": wrong,
            "orphans": orphans,
            "grandchildren": leaks, "never_running": self.never_running,
            "not_taken": self.not_taken, "faults": self.fault_log,
            "503_outside": [round(p.t - self.t0, 1) for p in bad],
            "silent_outside": [round(p.t - self.t0, 1) for p in silent],
            "agent_log": self.log_summary()}
        return report

    def log_summary(self) -> list[str]:
        """Warnings and errors of the agent's log, ids stripped, counted."""
        counts: collections.Counter[str] = collections.Counter()
        for entry in self.agent_log():
            if entry.get("level") in ("WARNING", "ERROR", "CRITICAL", "RAW"):
                text = re.sub(r"\b(AJ|AW|RM|AD)_\w+", r"\1_…", str(entry.get("message", "")))
                text = re.sub(r"\d+(\.\d+)?", "N", text)
                counts[f"{entry.get('level')}: {text[:140]}"] += 1
        return [f"{n:4d} × {text}" for text, n in counts.most_common(25)]


# -- output -------------------------------------------------------------------------------------


def summary(report: Report) -> str:
    f = report.figures
    faults = ", ".join(f"{k} {v}" for k, v in sorted(f["faults"].items()))
    kinds = ", ".join(f"{k} {v}" for k, v in f["jobs_by_kind"].items())
    rows = [
        ("jobs assigned / dispatched", f"{f['jobs_assigned']} / {f['jobs_dispatched']}"
         f" ({f['jobs_not_created']} with no worker registered, {f['offers_not_taken']} "
         "offers not taken)"),
        ("jobs by kind", kinds),
        ("faults injected", faults),
        ("statuses lost", f"{f['statuses_lost']}"),
        ("statuses resent (same status again; LiveKit ignores it)",
         f"{f['statuses_duplicated']}"),
        ("statuses conflicting", f"{f['statuses_conflicting']}"),
        ("wrong statuses", f"{f['wrong_statuses']}"),
        ("jobs never reported running", f"{f['never_running']}"),
        ("orphans after exit / grandchildren leaked", f"{f['orphans']} / "
         f"{f['grandchildren_leaked']} (of {f['grandchildren_watched']} watched)"),
        ("RSS start / end / drift (MiB)", f"{f['rss_start_mib']:.1f} / {f['rss_end_mib']:.1f} / "
         f"{f['rss_drift_mib']:+.1f} (bound < {RSS_DRIFT_MIB:g}; max {f['rss_max_mib']:.1f})"),
        ("fds start / end", f"{f['fd_start']} / {f['fd_end']} (bound +{FD_DRIFT})"),
        ("zygote restarts / absent (s)", f"{f['zygote_restarts']} / {f['zygote_absent_s']:.0f}"
         f" (pids {f['zygote_pids']})"),
        ("health 503 outside LiveKit-away windows (s)", f"{f['health_503_outside_s']:.1f}"),
        ("health unanswered while serving (s)", f"{f['health_silent_outside_s']:.1f}"),
        ("health 200 while LiveKit away (s, info)", f"{f['health_200_while_away_s']:.1f}"),
        ("SIGTERM drain → exit (s), exit code", f"{f['drain_exit_s']:.2f}, {f['exit_code']}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'check':<{width}} | value", f"{'-' * width}-+-{'-' * 40}"]
    lines += [f"{label:<{width}} | {value}" for label, value in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "soak-latest.json")
    args = parser.parse_args()
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    soak = Soak(args.minutes, args.seed)
    t = time.monotonic()
    report = trio.run(soak.run)
    details = report.figures["details"]
    print()
    print(f"soak: {args.minutes:g} min, seed {args.seed}, {time.monotonic() - t:.0f} s wall, "
          f"agent log {soak.log_path}")
    print("faults:")
    for line in details["faults"]:
        print("  ", line)
    print()
    print(summary(report))
    for key in ("lost", "conflicting", "duplicated", "wrong", "never_running", "orphans", "grandchildren",
                "not_taken", "503_outside", "silent_outside"):
        if details[key]:
            print(f"\n{key.replace('_', ' ')}:")
            values = details[key]
            for item in values[:15] if isinstance(values, list) else [values]:
                print("  ", item)
            if isinstance(values, list) and len(values) > 15:
                print(f"   … {len(values) - 15} more")
    if details["agent_log"]:
        print("\nagent log, warnings and errors (counted):")
        for line in details["agent_log"]:
            print("  ", line)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps(report.figures, indent=1, default=str))
    print()
    if report.failures:
        print(f"SOAK FAILED ({len(report.failures)} check(s)):")
        for text in report.failures:
            print("   -", text)
        sys.exit(1)
    print("SOAK PASSED: every check held")


if __name__ == "__main__":
    main()
