"""How an AgentServer stops, and what it raises: the public exception contract, a prompt
close of the LiveKit connection, a sync ``load_fnc`` that hangs, a job that fails to launch.

In virtual time over in-memory streams to the dev server, with the thread executor, so no
process is started (the process side of stopping is in test_server.py and test_cli.py).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from livekit.protocol import agent

from agents import scripted
from control_helpers import RecordingSupervisor, make_control, running
from trio_agents import (AgentServer, AuthenticationError, ConfigError, JobExecutorType,
                         ServerConnectionError)
from trio_agents._control import CLOSE_TIMEOUT, OpenStream
from trio_agents._errors import JobProcessError, TrioAgentsError
from trio_agents._jobs import RunningJobInfo
from trio_agents._util import unwrap_errors
from trio_agents.devserver import DevServer, open_dev_server
from trio_agents.testing import memory_opener


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False, api_key="devkey", api_secret="secret") as server:
        yield server


@pytest.fixture
def opener(dev: DevServer, nursery: trio.Nursery) -> OpenStream:
    return memory_opener(dev, nursery)


def threaded_server(**options: Any) -> AgentServer:
    """A server whose jobs would run on threads: stopping it involves no process."""
    server = AgentServer(ws_url="ws://devserver:7880", api_key="devkey",
                         api_secret=options.pop("api_secret", "secret"), port=0,
                         host="127.0.0.1", num_idle_processes=0, load_threshold=math.inf,
                         job_executor_type=JobExecutorType.THREAD, **options)
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    return server


# -- the one helper ------------------------------------------------------------------------


def test_unwrap_errors_raises_the_sole_error_as_itself() -> None:
    error = ConfigError("bad")
    with pytest.raises(ConfigError) as caught, unwrap_errors(TrioAgentsError):
        raise BaseExceptionGroup("outer", [ExceptionGroup("inner", [error])])
    assert caught.value is error


def test_unwrap_errors_ignores_cancellations_beside_the_error() -> None:
    error = ServerConnectionError("gone")
    cancelled = trio.Cancelled._create()  # what a sibling task raises when it is cancelled
    with pytest.raises(ServerConnectionError) as caught, unwrap_errors(TrioAgentsError):
        raise BaseExceptionGroup("", [cancelled, error])
    assert caught.value is error


@pytest.mark.parametrize("leaves", [
    [ConfigError("a"), ConfigError("b")],  # two failures at once: both are news
    [ValueError("a bug")],  # not a type the boundary promises
])
def test_unwrap_errors_keeps_any_other_group(leaves: list[Exception]) -> None:
    with pytest.raises(ExceptionGroup), unwrap_errors(TrioAgentsError):
        raise ExceptionGroup("", leaves)


# -- AgentServer.run raises exactly what its docstring says --------------------------------


async def test_busy_health_port_is_a_config_error_not_a_group() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = threaded_server()
        server.update_options(port=port)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*another port") as caught:
            await server.run()
    assert type(caught.value) is ConfigError


async def test_rejected_credentials_are_an_authentication_error(
        opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    server = threaded_server(api_secret="wrong")
    with pytest.raises(AuthenticationError, match="rejected our credentials") as caught:
        await server.run(open_stream=opener)
    assert type(caught.value) is AuthenticationError


async def refuse(host: str, port: int, tls: bool) -> trio.abc.Stream:
    """An ``open_stream`` to a LiveKit that is not there."""
    raise OSError(111, "Connection refused")


async def test_unreachable_livekit_is_a_server_connection_error(
        autojump_clock: trio.testing.MockClock) -> None:
    server = threaded_server(max_retry=2)
    with pytest.raises(ServerConnectionError, match="after 3 attempts") as caught:
        await server.run(open_stream=refuse)
    assert type(caught.value) is ServerConnectionError


async def test_drain_and_aclose_raise_nothing_when_run_fails(
        autojump_clock: trio.testing.MockClock) -> None:
    server = threaded_server(max_retry=1)
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            await server.run(open_stream=refuse)
        except ServerConnectionError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        await server.drain()  # waits for the same stop, raises nothing: run() reports it
        await server.aclose()
    assert [type(exc) for exc in outcome] == [ServerConnectionError]


# -- stopping --------------------------------------------------------------------------------


async def test_stop_closes_the_websocket_without_waiting_for_the_close_timeout(
        dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    server = threaded_server()
    async with trio.open_nursery() as nursery:
        worker_id = await nursery.start(partial_run(server, opener))
        assert worker_id in dev.workers
        stopped_at = trio.current_time()
        await server.aclose()
    # run() has returned: the close handshake is answered at once by the peer, and a stop
    # that waits CLOSE_TIMEOUT for an answer nobody reads is the bug this catches
    assert trio.current_time() - stopped_at < CLOSE_TIMEOUT
    assert worker_id not in dev.workers and not server.registered
    with pytest.raises(OSError):  # and the health endpoint is closed
        await trio.open_tcp_stream("127.0.0.1", server.health_port)


def partial_run(server: AgentServer, opener: OpenStream) -> Any:
    async def run(*, task_status: trio.TaskStatus[str]) -> None:
        await server.run(open_stream=opener, task_status=task_status)

    return run


async def test_hanging_sync_load_fnc_is_abandoned_at_shutdown(
        dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    called = threading.Event()

    def hanging_load() -> float:
        called.set()
        release.wait()
        return 0.0

    server = threaded_server(load_fnc=hanging_load)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial_run(server, opener))
            await trio.to_thread.run_sync(called.wait)
            with trio.move_on_after(60) as timeout:  # virtual seconds
                await server.aclose()
            release.set()  # on the old code run() waited for the thread: free it to end
        assert not timeout.cancelled_caught, "aclose() waited for the hanging load_fnc"
    finally:
        release.set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("load_fnc" in w and "hanging_load" in w and "abandoning" in w for w in warnings)


class FailingLaunch(RecordingSupervisor):
    async def launch(self, info: RunningJobInfo) -> None:
        self.report(info.job.id, agent.JS_FAILED, "could not start a job process: EMFILE")
        raise JobProcessError("could not start a job process: EMFILE")


async def test_a_failed_launch_is_not_blamed_on_on_request(
        dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    control, _ = make_control(opener, supervisor=FailingLaunch())
    async with running(control):
        await dev.create_room("room")  # automatic dispatch to the agent without a name
        await dev.wait_until(lambda: any(j.ended for j in dev.jobs.values()))
    (job,) = dev.jobs.values()
    assert (job.status, job.error) == (agent.JS_FAILED, "could not start a job process: EMFILE")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "on_request raised" in m or "rejecting it" in m]
    assert any(f"job {job.job.id} was accepted but could not be launched" in m
               for m in messages)
