"""Two backends for every conformance scenario: the real livekit-server and our dev server.

Each test gets a fresh server (both start in a fraction of a second), so no test sees another's
workers or rooms. What the server saw is read the same way from both: ``backend.workers()``
(registered worker id → agent name) and ``backend.jobs()`` (assigned jobs with the status the
server holds). The real server's come from its log (``tests/livekit_server.py``), the dev
server's from its records.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from room_helpers import Backend as Endpoint
from livekit_server import LiveKitServer, find_binary, open_livekit_server
from trio_agents import AgentServer
from trio_agents._options import EntrypointFnc, RequestFnc
from trio_agents.api import LiveKitAPI
from trio_agents.devserver import DevServer, open_dev_server

REAL, DEV = "livekit-server", "devserver"
FINAL = ("JS_SUCCESS", "JS_FAILED")
#: Bound on each wait for the server to see something (events, never a sleep).
WAIT = 30.0


@attrs.frozen
class SeenJob:
    """A job as the server holds it: assigned to ``worker_id``, its last reported status."""

    id: str
    room: str
    worker_id: str
    status: str
    error: str

    @property
    def ended(self) -> bool:
        return self.status in FINAL


class Backend:
    """What a conformance test needs of a LiveKit server."""

    name: str

    @property
    def endpoint(self) -> Endpoint:
        """The server: its URL and credentials."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def api_key(self) -> str:
        return self.endpoint.api_key

    @property
    def api_secret(self) -> str:
        return self.endpoint.api_secret

    def workers(self) -> dict[str, str]:
        """Workers registered now: id → agent name."""
        raise NotImplementedError

    def jobs(self) -> dict[str, SeenJob]:
        """Every job assigned to a worker, by id, with the status the server holds."""
        raise NotImplementedError

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        raise NotImplementedError

    async def restart(self) -> None:
        """Stop the server and start it again on the same port; its state is lost."""
        raise NotImplementedError

    def api(self) -> LiveKitAPI:
        return LiveKitAPI(self.url, self.api_key, self.api_secret)

    async def wait(self, predicate: Callable[[], object]) -> None:
        with trio.fail_after(WAIT):
            await self.wait_until(predicate)

    def jobs_in(self, room: str) -> list[SeenJob]:
        return [job for job in self.jobs().values() if job.room == room]

    async def job_in(self, room: str, worker_id: str | None = None) -> SeenJob:
        """The (first) job of ``room`` assigned to a worker (to ``worker_id``, if given)."""
        def found() -> list[SeenJob]:
            return [j for j in self.jobs_in(room) if worker_id in (None, j.worker_id)]
        await self.wait(found)
        return found()[0]

    async def ended(self, job_id: str) -> SeenJob:
        """The job once it ended, as the server recorded its end."""
        await self.wait(lambda: job_id in self.jobs() and self.jobs()[job_id].ended)
        return self.jobs()[job_id]


@attrs.define(eq=False)
class RealBackend(Backend):
    """livekit-server, read through its log: "worker registered", "assigned job to worker",
    "job ended", "worker closed WS connection"."""

    server: LiveKitServer
    name: str = REAL

    @property
    def endpoint(self) -> Endpoint:
        return self.server

    def workers(self) -> dict[str, str]:
        workers: dict[str, str] = {}
        for record in self.server.current():
            worker_id = str(record.fields.get("workerID", ""))
            if record.message == "worker registered":
                workers[worker_id] = str(record.fields.get("agentName", ""))
            elif record.message in ("worker closed WS connection", "closing worker"):
                workers.pop(worker_id, None)
        return workers

    def jobs(self) -> dict[str, SeenJob]:
        jobs: dict[str, SeenJob] = {}
        for record in self.server.current():
            f = record.fields
            job_id = str(f.get("jobID", ""))
            if record.message == "assigned job to worker":
                jobs[job_id] = SeenJob(job_id, str(f["room"]), str(f["workerID"]),
                                       "JS_RUNNING", "")
            elif record.message == "job ended" and job_id in jobs:
                jobs[job_id] = attrs.evolve(jobs[job_id], status=str(f["status"]),
                                            error=str(f.get("error", "")))
        return jobs

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        await self.server.wait_until(predicate)

    async def restart(self) -> None:
        await self.server.restart()


@attrs.define(eq=False)
class DevBackend(Backend):
    """The dev server, read through its records; restarted on the same port."""

    rtc_address: str
    nursery: trio.Nursery
    name: str = DEV
    dev: DevServer | None = None
    port: int = 0
    _scope: trio.CancelScope | None = None
    _closed: trio.Event = attrs.Factory(trio.Event)

    @property
    def server(self) -> DevServer:
        assert self.dev is not None, "the dev server is not running"
        return self.dev

    @property
    def endpoint(self) -> Endpoint:
        return self.server

    def workers(self) -> dict[str, str]:
        return {w.id: w.agent_name for w in self.server.workers.values()}

    def jobs(self) -> dict[str, SeenJob]:
        return {j.job.id: SeenJob(j.job.id, j.room, j.worker_id, j.status_name, j.error)
                for j in self.server.jobs.values() if j.worker_id}

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        while not predicate():
            dev = self.server  # a restart replaces it and wakes this wait
            await dev.wait_until(lambda: self.dev is not dev or predicate())

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        self._closed = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                async with open_dev_server(port=self.port, rtc_address=self.rtc_address) as dev:
                    old, self.dev, self.port = self.dev, dev, dev.port
                    if old is not None:
                        old._changes.changed()  # whoever waits on the old one looks again
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._closed.set()

    async def restart(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await self._closed.wait()
        await self.nursery.start(self.serve)


@pytest.fixture(params=[pytest.param(REAL, marks=pytest.mark.realserver), DEV])
def backend_kind(request: pytest.FixtureRequest) -> tuple[str, Path | None]:
    """Which server, and the livekit-server binary for the real one. A missing binary fails
    the real-server tests, saying where it was looked for: they never pass unseen."""
    if request.param == DEV:
        return DEV, None
    binary, why = find_binary()
    if binary is None:
        pytest.fail(f"livekit-server not found: {why}", pytrace=False)
    return REAL, binary


@pytest.fixture
async def backend(backend_kind: tuple[str, Path | None], rtc_address: str,
                  tmp_path: Path) -> AsyncIterator[Backend]:
    """Each scenario runs against livekit-server (marked ``realserver``) and the dev server."""
    _, binary = backend_kind
    if binary is not None:
        async with open_livekit_server(rtc_address, binary=binary, workdir=tmp_path) as server:
            yield RealBackend(server)
            # shown by pytest only if the test failed
            print(f"livekit-server log, last lines:\n{server.tail(80)}")
    else:
        async with trio.open_nursery() as nursery:
            backend = DevBackend(rtc_address, nursery)
            await nursery.start(backend.serve)
            yield backend
            nursery.cancel_scope.cancel()


async def no_load() -> float:
    # keep the servers' load rules (0.7 target, WS_FULL) out of the scenarios: a busy 2-core
    # test machine would otherwise make both servers (rightly) skip a worker
    return 0.0


def make_agent_server(backend: Backend, entrypoint: EntrypointFnc, *, agent_name: str = "",
                      on_request: RequestFnc | None = None, **options: Any) -> AgentServer:
    options.setdefault("num_idle_processes", 0)
    server = AgentServer(ws_url=backend.url, api_key=backend.api_key,
                         api_secret=backend.api_secret, port=0, load_fnc=no_load,
                         load_threshold=math.inf, shutdown_process_timeout=2.0, **options)
    server.rtc_session(entrypoint, agent_name=agent_name, on_request=on_request)
    return server


@asynccontextmanager
async def running(server: AgentServer) -> AsyncIterator[str]:
    """Run the agent server for the block; its worker id once registered."""
    async with trio.open_nursery() as nursery:
        worker_id: str = await nursery.start(server.run)
        yield worker_id
        await server.aclose()
