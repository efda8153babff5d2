"""AgentServer end to end: the dev server over TCP, real job processes, the statuses LiveKit
receives. (The control plane's timers are covered in virtual time in test_control.py.)"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from livekit.protocol import agent

from agents import scripted
from trio_agents import AgentServer, AuthenticationError, ConfigError, JobRequest
from trio_agents._proc import INTERRUPTED
from trio_agents.devserver import DevServer, open_dev_server


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0) as server:
        yield server


async def no_load() -> float:
    # production mode measures CPU, and on a busy 2-core test machine the dev server would
    # (rightly) drop jobs offered to a worker at >= 0.7: keep load and capacity (unit-tested
    # in test_backoff_capacity.py, test_control.py) out of these end-to-end tests
    return 0.0


def make_server(dev: DevServer, **options: Any) -> AgentServer:
    server = AgentServer(ws_url=dev.url, api_key=dev.api_key, api_secret=dev.api_secret,
                         port=0, load_fnc=options.pop("load_fnc", no_load),
                         load_threshold=options.pop("load_threshold", math.inf), num_idle_processes=options.pop("num_idle_processes", 1),
                         shutdown_process_timeout=options.pop("shutdown_process_timeout", 2.0),
                         **options)
    server.setup_fnc = scripted.setup
    return server


@asynccontextmanager
async def serving(server: AgentServer) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        worker_id: str = await nursery.start(server.run)
        yield worker_id
        await server.aclose()


async def dispatch(dev: DevServer, room: str, metadata: str) -> str:
    """Create a room whose job runs ``scripted.entrypoint`` with ``metadata``; its job id."""
    await dev.create_dispatch(room, "scripted", metadata=metadata)
    await dev.wait_until(lambda: any(j.room == room and j.done for j in dev.jobs.values()))
    record = next(j for j in dev.jobs.values() if j.room == room)
    assert not record.dropped, (f"the dev server dropped the job: {record.dropped}; workers: "
                                f"{[(w.status, w.load) for w in dev.workers.values()]}")
    return record.job.id


async def final_status(dev: DevServer, job_id: str) -> tuple[int, str]:
    await dev.wait_until(lambda: dev.jobs[job_id].ended)
    return dev.jobs[job_id].status, dev.jobs[job_id].error


async def test_start_register_run_a_job(dev: DevServer) -> None:
    server = make_server(dev)
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    async with serving(server) as worker_id:
        assert worker_id == server.worker_id and worker_id in dev.workers
        job_id = await dispatch(dev, "r1", "ok")
        assert await final_status(dev, job_id) == (agent.JS_SUCCESS, "")
        assert dev.jobs[job_id].history[:2] == [agent.JS_RUNNING, agent.JS_RUNNING]
    assert not server.registered


async def test_crash_is_reported_with_its_cause(dev: DevServer) -> None:
    server = make_server(dev)
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    async with serving(server):
        crashed = await dispatch(dev, "r1", "raise")
        exited = await dispatch(dev, "r2", "exit3")
        assert await final_status(dev, crashed) == (agent.JS_FAILED,
                                                    "ValueError: scripted failure")
        assert await final_status(dev, exited) == (agent.JS_FAILED, "exit code 3")


async def test_attributes_reach_the_job_process(dev: DevServer) -> None:
    async def on_request(req: JobRequest) -> None:
        await req.accept(identity="custom", attributes={"tier": "gold"})

    server = make_server(dev)
    server.rtc_session(scripted.entrypoint, agent_name="scripted", on_request=on_request)
    async with serving(server):
        job_id = await dispatch(dev, "r1", "sleep:30")
        await dev.wait_until(lambda: len(server.active_jobs) == 1)
        (info,) = server.active_jobs
        assert info.job.id == job_id and info.accept_arguments.identity == "custom"
        assert dict(info.accept_arguments.attributes) == {"tier": "gold",
                                                          "lk.agent.name": "scripted"}


async def test_termination_stops_a_sleeping_job_fast(dev: DevServer) -> None:
    server = make_server(dev)
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    async with serving(server):
        await dispatch(dev, "doomed", "sleep:3600")
        await dev.wait_until(lambda: len(server.active_jobs) == 1)
        with trio.fail_after(1):  # the peer needs 15 s here
            await dev.delete_room("doomed")
            await server._supervisor.wait_idle()  # type: ignore[union-attr]


async def test_drain_waits_for_every_job(dev: DevServer) -> None:
    server = make_server(dev, num_idle_processes=3)
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        jobs = [await dispatch(dev, f"r{n}", f"sleep:{seconds}")
                for n, seconds in enumerate((0.2, 0.6, 1.0))]
        await dev.wait_until(lambda: all(dev.jobs[j].status == agent.JS_RUNNING for j in jobs))
        assert await server.drain(timeout=30) is True
        # run() has returned: every job finished by itself and was reported
    assert [dev.jobs[j].status for j in jobs] == [agent.JS_SUCCESS] * 3


async def test_drain_budget_ends_and_the_rest_is_reported_failed(dev: DevServer) -> None:
    server = make_server(dev)
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        job_id = await dispatch(dev, "r1", "sleep:3600")
        await dev.wait_until(lambda: dev.jobs[job_id].status == agent.JS_RUNNING
                             and len(server.active_jobs) == 1)
        assert await server.drain(timeout=0.2) is False
    assert (dev.jobs[job_id].status, dev.jobs[job_id].error) == (agent.JS_FAILED, INTERRUPTED)


async def test_dropped_connection_keeps_jobs_running(dev: DevServer) -> None:
    server = make_server(dev)
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    async with serving(server) as first_id:
        job_id = await dispatch(dev, "r1", "sleep:30")
        # active_jobs counts the job from its acceptance: wait for its process
        await dev.wait_until(lambda: len(server._supervisor.job_processes) == 1)  # type: ignore[union-attr]
        pid = server._supervisor.job_processes[0].pid  # type: ignore[union-attr]
        dev.drop_worker(first_id)
        await dev.wait_until(lambda: server.worker_id != first_id and server.registered
                             and server.worker_id in dev.workers)
        await dev.wait_until(lambda: dev.workers[server.worker_id].migrated_job_ids == [job_id])
        assert [i.job.id for i in server.active_jobs] == [job_id]
        assert server._supervisor.job_processes[0].pid == pid  # type: ignore[union-attr]


async def test_bad_secret_raises_one_clear_error(dev: DevServer) -> None:
    server = AgentServer(ws_url=dev.url, api_key=dev.api_key, api_secret="wrong", port=0,
                         num_idle_processes=0)
    server.rtc_session(scripted.entrypoint)
    with trio.fail_after(5), pytest.raises(AuthenticationError, match="rejected our credentials"):
        await server.run()


async def test_missing_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIVEKIT_URL", raising=False)
    server = AgentServer(api_key="k", api_secret="s")
    server.rtc_session(scripted.entrypoint)
    with pytest.raises(ConfigError, match="LIVEKIT_URL is not set"):
        await server.run()


async def test_health_follows_registration() -> None:
    import httpx

    async with trio.open_nursery() as nursery:
        async with open_dev_server(port=0) as dev:
            server = make_server(dev, max_retry=100)
            server.rtc_session(scripted.entrypoint, agent_name="scripted")
            worker_id = await nursery.start(server.run)
            base = f"http://127.0.0.1:{server.health_port}"
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/")).status_code == 200
                info = (await http.get("/worker")).json()
                assert (info["worker_id"], info["agent_name"], info["active_jobs"]) == (
                    worker_id, "scripted", 0)
        # the LiveKit server is gone: the agent server is alive but not ready
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        async with httpx.AsyncClient(base_url=base) as http:
            ready = await http.get("/")
            assert (ready.status_code, ready.text) == (503, "reconnecting to LiveKit")
            assert (await http.get("/health/live")).status_code == 200
        await server.aclose()
