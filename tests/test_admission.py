"""Exact admission end to end: AgentServer, real job processes, the dev server over TCP.

``load_fnc(server)`` counts ``server.active_jobs``, which holds a job from its acceptance to
its final status, so a burst of offers is admitted up to what the load says, whatever
``num_idle_processes`` is. (The accounting itself is tested synchronously in
test_backoff_capacity.py, and in virtual time in test_control.py.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
from livekit.protocol import agent

from agents import scripted
from trio_agents import AgentServer
from trio_agents.devserver import DevServer, open_dev_server


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0) as server:
        yield server


@pytest.mark.parametrize("idle", [1, 2, 8])
async def test_a_burst_is_admitted_up_to_the_load_fnc(dev: DevServer, idle: int) -> None:
    def two_jobs_fill_it(server: AgentServer) -> float:
        return len(server.active_jobs) / 2

    server = AgentServer(ws_url=dev.url, api_key=dev.api_key, api_secret=dev.api_secret,
                         port=0, load_fnc=two_jobs_fill_it, load_threshold=1.0,
                         num_idle_processes=idle, shutdown_process_timeout=2.0)
    server.setup_fnc = scripted.setup
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with trio.open_nursery() as burst:  # five offers at once
            for n in range(5):
                burst.start_soon(partial(dev.create_dispatch, f"room-{n}", "scripted",
                                         metadata="sleep:60"))
        await dev.wait_until(lambda: len(dev.jobs) == 5 and all(j.done for j in dev.jobs.values()))
        running = [j for j in dev.jobs.values() if not j.dropped]
        assert len(running) == 2, [(j.room, j.dropped) for j in dev.jobs.values()]
        await dev.wait_until(lambda: all(j.status == agent.JS_RUNNING for j in running))
        assert len(server.active_jobs) == 2
        await server.aclose()
