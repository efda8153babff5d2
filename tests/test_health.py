"""The health endpoint, asked over real HTTP (httpx) of a real hypercorn bound to port 0."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from functools import partial

import attrs
import httpx
import pytest
import trio

from trio_agents._errors import ConfigError
from trio_agents._health import HealthApp, HealthInfo, serve_health

READY = HealthInfo(ready=True, reason="", worker_id="AW_1", agent_name="bot",
                   worker_type="JT_ROOM", active_jobs=2, load=0.25, draining=False,
                   registered=True)
IDLE = attrs.evolve(READY, ready=False, reason="not registered", registered=False,
                    worker_id="", agent_name="", active_jobs=0, load=0.0)


class Source:
    """A HealthSource the test changes between requests."""

    def __init__(self) -> None:
        self.info = IDLE

    def health(self) -> HealthInfo:
        return self.info


Served = tuple[Source, httpx.AsyncClient]


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[Served]:
    source = Source()
    port = await nursery.start(partial(serve_health, source, host="127.0.0.1", port=0))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield source, client


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _can_bind(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


async def test_readiness_follows_the_source(served: Served) -> None:
    source, client = served
    for path in ("/", "/health/ready"):
        response = await client.get(path)
        assert (response.status_code, response.text) == (503, "not registered")
        assert response.headers["cache-control"] == "no-store"
    for reason in ("reconnecting to LiveKit", "failed to connect to LiveKit after 16 attempts"):
        source.info = attrs.evolve(IDLE, reason=reason)
        assert (await client.get("/")).text == reason
    source.info = READY
    for path in ("/", "/health/ready"):
        response = await client.get(path)
        assert (response.status_code, response.text) == (200, "OK")
    source.info = attrs.evolve(READY, ready=False, reason="draining", draining=True)
    response = await client.get("/health/ready")
    assert (response.status_code, response.text) == (503, "draining")


async def test_liveness_is_200_whatever_readiness_says(served: Served) -> None:
    source, client = served
    for info in (IDLE, READY, attrs.evolve(READY, ready=False, reason="draining")):
        source.info = info
        response = await client.get("/health/live")
        assert (response.status_code, response.text) == (200, "OK")


async def test_worker_json_is_complete_and_typed(served: Served) -> None:
    source, client = served
    source.info = READY
    response = await client.get("/worker")
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {"worker_id": "AW_1", "agent_name": "bot", "worker_type": "JT_ROOM",
                    "active_jobs": 2, "worker_load": 0.25, "draining": False,
                    "registered": True, "sdk_version": body["sdk_version"],
                    "protocol_version": 1}
    assert isinstance(body["sdk_version"], str) and body["sdk_version"]


async def test_worker_json_keeps_zeros_and_their_types(served: Served) -> None:
    source, client = served
    source.info = attrs.evolve(IDLE, worker_type="JT_PUBLISHER")
    body = (await client.get("/worker")).json()
    assert set(body) == {"worker_id", "agent_name", "worker_type", "active_jobs",
                         "worker_load", "draining", "registered", "sdk_version",
                         "protocol_version"}
    assert (body["worker_id"], body["agent_name"], body["worker_type"]) == (
        "", "", "JT_PUBLISHER")
    assert type(body["active_jobs"]) is int and body["active_jobs"] == 0
    assert type(body["worker_load"]) is float and body["worker_load"] == 0.0
    assert body["draining"] is False and body["registered"] is False
    assert type(body["protocol_version"]) is int
    source.info = attrs.evolve(READY, load=float("nan"))  # never invalid JSON
    assert (await client.get("/worker")).json()["worker_load"] == 0.0


async def test_unknown_path_wrong_method_and_head(served: Served) -> None:
    _, client = served
    assert (await client.get("/nope")).status_code == 404
    assert (await client.post("/nope")).status_code == 404
    refused = await client.post("/")
    assert (refused.status_code, refused.headers["allow"]) == (405, "GET, HEAD")
    head = await client.head("/health/live")
    assert (head.status_code, head.content) == (200, b"")


async def test_serving_prints_nothing(capfd: pytest.CaptureFixture[str], served: Served) -> None:
    """No access log and no hypercorn banner on stdout/stderr: they would break JSON logs."""
    _, client = served
    assert (await client.get("/health/live")).status_code == 200
    assert (await client.get("/nope")).status_code == 404
    assert capfd.readouterr() == ("", "")


async def test_reports_the_bound_port_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()
    caplog.set_level(logging.INFO, logger="trio_agents")
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve_health, Source(), host="127.0.0.1",
                                            port=port))
        assert bound == port
        nursery.cancel_scope.cancel()
    assert [r.health_port for r in caplog.records if hasattr(r, "health_port")] == [port]


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError,
                           match=f"127.0.0.1:{port}: .*stop it, or choose another port"):
            await serve_health(Source(), host="127.0.0.1", port=port)


async def test_host_that_is_not_ours_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="192.0.2.1:0.*host= option"):
        await serve_health(Source(), host="192.0.2.1", port=0)  # TEST-NET-1, never local


async def test_cancel_stops_it_promptly_and_frees_the_port() -> None:
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_health, Source(), host="127.0.0.1",
                                               port=0))
            # an idle keep-alive connection must not hold the stop up
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/health/live")).status_code == 200
                nursery.cancel_scope.cancel()
    assert _can_bind(port)


async def test_shutdown_trigger_stops_it_gracefully_and_promptly() -> None:
    stop = trio.Event()
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_health, Source(), host="127.0.0.1",
                                               port=0, shutdown_trigger=stop.wait))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/health/live")).status_code == 200
                stop.set()  # serve_health returns by itself: the nursery does not cancel it
    assert _can_bind(port)


def test_pure_responses() -> None:
    source = Source()
    app = HealthApp(source)
    assert app.respond("GET", "/")[::2] == (503, b"not registered")
    assert app.respond("GET", "/health/live")[::2] == (200, b"OK")
    assert app.respond("DELETE", "/worker")[0] == 405
    source.info = READY
    assert app.respond("HEAD", "/health/ready")[::2] == (200, b"OK")
