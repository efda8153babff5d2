from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import attrs
import httpx
import pytest
import trio

from trio_agents._errors import ConfigError
from trio_agents._health import HealthApp, HealthInfo, serve_health

READY = HealthInfo(ready=True, reason="", worker_id="AW_1", agent_name="bot",
                   worker_type="JT_ROOM", active_jobs=2, load=0.25, draining=False,
                   registered=True)


class Source:
    def __init__(self) -> None:
        self.info = attrs.evolve(READY, ready=False, reason="not registered", registered=False,
                                 worker_id="", active_jobs=0, load=0.0)

    def health(self) -> HealthInfo:
        return self.info


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[tuple[Source, httpx.AsyncClient]]:
    source = Source()
    port = await nursery.start(lambda task_status: serve_health(
        source, host="127.0.0.1", port=0, task_status=task_status))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield source, client


async def test_ready_follows_the_source(served: tuple[Source, httpx.AsyncClient]) -> None:
    source, client = served
    response = await client.get("/")
    assert (response.status_code, response.text) == (503, "not registered")
    assert (await client.get("/health/live")).status_code == 200
    source.info = READY
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/health/ready")).text == "OK"
    source.info = attrs.evolve(READY, ready=False, reason="draining", draining=True)
    assert (await client.get("/health/ready")).status_code == 503


async def test_worker_json_is_complete_and_typed(served: tuple[Source, httpx.AsyncClient]) -> None:
    source, client = served
    source.info = READY
    body = (await client.get("/worker")).json()
    assert body == {"worker_id": "AW_1", "agent_name": "bot", "worker_type": "JT_ROOM",
                    "active_jobs": 2, "worker_load": 0.25, "draining": False,
                    "registered": True, "ready": True, "sdk_version": body["sdk_version"],
                    "protocol_version": 1}
    assert isinstance(body["active_jobs"], int)


async def test_unknown_path_and_method(served: tuple[Source, httpx.AsyncClient]) -> None:
    _, client = served
    assert (await client.get("/nope")).status_code == 404
    assert (await client.post("/")).status_code == 405


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*another port"):
            await serve_health(Source(), host="127.0.0.1", port=port)


async def test_cancel_stops_it_promptly() -> None:
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_health(
                Source(), host="127.0.0.1", port=0, task_status=task_status))
            nursery.cancel_scope.cancel()


def test_pure_responses() -> None:
    app = HealthApp(Source())
    assert app.respond("GET", "/")[0] == 503
    assert app.respond("GET", "/health/live")[0] == 200
