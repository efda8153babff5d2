"""The control plane against a LiveKit that misbehaves: a small scripted ``/agent`` server.

Each connection to ``HostileLiveKit`` runs the test's script (register, then break the session,
fall silent, send half a frame, flood offers...) and records every ``WorkerMessage`` it gets.
It runs over in-memory streams in virtual time (``MockClock``) and, for the one real-time
test, over TCP.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from livekit.protocol import agent, models

from trio_agents._control import CLOSE_TIMEOUT, ControlPlane, OpenStream
from trio_agents._errors import ServerConnectionError
from trio_agents._jobs import JobRequest
from trio_agents.testing import memory_opener

from control_helpers import make_control, running


class Gate(trio.abc.Stream):
    """A stream the server can make silent: nothing more is read or written once ``silent``
    (as a hung process or a black-holed network)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.silent = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.silent:
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.silent:
            await trio.sleep_forever()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class Connection:
    """One worker connection as the hostile server sees it."""

    def __init__(self, number: int, ws: trio_websocket.WebSocketConnection, gate: Gate) -> None:
        self.number = number
        self.ws = ws
        self.gate = gate
        self.worker_id = f"AW_hostile{number}"
        self.messages: list[agent.WorkerMessage] = []
        self.changed = trio.Event()
        self.opened_at = trio.current_time()

    async def register(self, *, delay: float = 0.0) -> None:
        data = await self.ws.get_message()
        assert isinstance(data, bytes)
        request = agent.WorkerMessage.FromString(data)
        assert request.WhichOneof("message") == "register"
        self._record(request)
        await trio.sleep(delay)
        await self.send(register=agent.RegisterWorkerResponse(
            worker_id=self.worker_id, server_info=models.ServerInfo(version="hostile")))

    async def send(self, **message: Any) -> None:
        await self.ws.send_message(agent.ServerMessage(**message).SerializeToString())

    async def offer(self, job_id: str) -> None:
        await self.send(availability=agent.AvailabilityRequest(
            job=agent.Job(id=job_id, room=models.Room(name=f"room-{job_id}"))))

    async def assign(self, job_id: str) -> None:
        await self.send(assignment=agent.JobAssignment(
            job=agent.Job(id=job_id, room=models.Room(name=f"room-{job_id}")), token="t"))

    async def record(self) -> None:
        """Read and record every message until the connection ends."""
        try:
            while True:
                data = await self.ws.get_message()
                assert isinstance(data, bytes)
                self._record(agent.WorkerMessage.FromString(data))
        except trio_websocket.ConnectionClosed:
            pass

    def _record(self, message: agent.WorkerMessage) -> None:
        self.messages.append(message)
        self.changed.set()
        self.changed = trio.Event()

    def kinds(self) -> list[str]:
        return [str(m.WhichOneof("message")) for m in self.messages]

    def answers(self) -> list[agent.AvailabilityResponse]:
        return [m.availability for m in self.messages if m.WhichOneof("message") == "availability"]

    def job_updates(self) -> list[tuple[str, int]]:
        return [(m.update_job.job_id, m.update_job.status) for m in self.messages
                if m.WhichOneof("message") == "update_job"]

    async def wait_for(self, predicate: Callable[[], object]) -> None:
        while not predicate():
            await self.changed.wait()

    async def half_frame(self) -> None:
        """The header of a 4 KiB binary frame and 10 bytes of it; then nothing."""
        await self.gate.inner.send_all(b"\x82\x7e\x10\x00" + b"x" * 10)

    async def abort(self) -> None:
        """Drop the TCP connection with no close frame (as livekit-server does)."""
        await self.gate.inner.aclose()


Script = Callable[[Connection], Awaitable[None]]


class HostileLiveKit:
    """Serves every connection with ``script``; keeps the connections for the test."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections: list[Connection] = []
        self.changed = trio.Event()

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        gate = Gate(stream)
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, gate)
            ws = await request.accept()
            connection = Connection(len(self.connections) + 1, ws, gate)
            self.connections.append(connection)
            self.changed.set()
            self.changed = trio.Event()
            try:
                await self.script(connection)
            except trio_websocket.ConnectionClosed:
                pass
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def wait_connections(self, count: int) -> None:
        while len(self.connections) < count:
            await self.changed.wait()


def opener_for(server: HostileLiveKit, nursery: trio.Nursery) -> OpenStream:
    return memory_opener(server, nursery)


def registered(control: ControlPlane) -> bool:
    """``control.registered``, read anew (mypy keeps a narrowed property across awaits)."""
    return control.registered


# -- registers, then breaks the session ---------------------------------------------------------


async def test_a_server_that_breaks_every_session_costs_a_bounded_rate(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It used to get 470-560 reconnects a second: a registration reset the failure count and
    the first retry waited 0 s (here, in virtual time, that is an endless loop at t=0)."""

    async def register_then_break(conn: Connection) -> None:
        await conn.register()
        if len(server.connections) > 200:  # the old hot loop: stop it so the test can fail
            await trio.sleep_forever()
        await conn.abort()

    server = HostileLiveKit(register_then_break)
    control, _ = make_control(opener_for(server, nursery), max_retry=16)
    caplog.set_level(logging.WARNING, logger="trio_agents")
    t0 = trio.current_time()
    with trio.move_on_after(600):
        with pytest.raises(ServerConnectionError, match="after 17 attempts"):
            await control.run()
    opened = [c.opened_at - t0 for c in server.connections]
    assert len(opened) == 17  # max_retry applies: 16 retries, then the clear error
    # after the first immediate retry, at most one attempt every 2 s (0, 0, 2, 6, 12, 20, ...)
    assert opened[:4] == [0, 0, 2, 6]
    assert all(b - a >= 2 for a, b in zip(opened[1:], opened[2:]))
    assert control.failure and not control.registered
    # a bounded log: failed attempts are logged at most once per 10 s, with a count
    warnings = [r for r in caplog.records if "connection failed" in r.getMessage()]
    assert len(warnings) <= 1 + opened[-1] / 10
    assert any("left out" in r.getMessage() for r in warnings)


async def test_a_session_heard_from_for_a_while_starts_the_count_again(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
) -> None:
    async def healthy_then_break(conn: Connection) -> None:
        await conn.register()
        async with trio.open_nursery() as inner:
            inner.start_soon(conn.record)
            await trio.sleep(60)  # pings answered all along: a healthy session
            await conn.abort()

    server = HostileLiveKit(healthy_then_break)
    control, _ = make_control(opener_for(server, nursery), max_retry=1)
    async with running(control):
        with trio.fail_after(600):  # never "after 2 attempts": each session was healthy
            await server.wait_connections(4)
        opened = [round(c.opened_at, 6) for c in server.connections]
        assert [b - a for a, b in zip(opened, opened[1:])] == [60, 60, 60]


# -- goes silent, or stops in the middle of a frame ---------------------------------------------


@pytest.mark.parametrize("how", ["silent", "half frame"])
async def test_a_hung_server_is_noticed_and_the_running_job_is_reported_later(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, how: str,
) -> None:
    """A hung server kept us "registered" (health 200) forever and the job's status was lost.
    Now: silence is noticed within ping interval + timeout (5 + 10 s), we reconnect, the job
    runs on untouched, and its final status reaches the next session."""

    async def script(conn: Connection) -> None:
        await conn.register(delay=0 if conn.number == 1 else 5)  # LiveKit is slow to come back
        async with trio.open_nursery() as inner:
            inner.start_soon(conn.record)
            if conn.number == 1:
                await conn.offer("AJ_1")
                await conn.wait_for(lambda: conn.answers())
                await conn.assign("AJ_1")
                await conn.wait_for(lambda: ("AJ_1", agent.JS_RUNNING) in conn.job_updates())
                hung.set()
                if how == "half frame":
                    await conn.half_frame()
                conn.gate.silent = True
            await trio.sleep_forever()

    hung = trio.Event()
    server = HostileLiveKit(script)
    control, supervisor = make_control(opener_for(server, nursery))
    async with running(control):
        await hung.wait()
        t_hung = trio.current_time()
        assert control.registered
        # the job ends while the server is hung: its status is written into a dead socket
        supervisor.finish("AJ_1", agent.JS_SUCCESS)
        with trio.fail_after(60):
            await server.wait_connections(2)  # we gave up on the first and connect again
        noticed = trio.current_time() - t_hung
        # a ping every 5 s, 10 s for its pong; then up to CLOSE_TIMEOUT for the close
        assert 10 <= noticed <= 15 + CLOSE_TIMEOUT
        assert not registered(control)  # what the health endpoint reads: 503 until registered
        second = server.connections[1]
        with trio.fail_after(60):
            await second.wait_for(lambda: second.job_updates())
        assert supervisor.terminated == []  # the job was never touched
        # the status written while the server was hung was never confirmed (no pong after
        # it): it is sent again after the re-registration
        assert second.job_updates() == [("AJ_1", agent.JS_SUCCESS)]
        assert second.kinds()[:2] == ["register", "update_job"]
        assert registered(control)


# -- statuses while the control plane is away ---------------------------------------------------


async def test_statuses_reported_during_a_disconnect_arrive_after_reregistration_in_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
) -> None:
    """They used to be dropped: no session, nothing sent, never replayed."""

    async def script(conn: Connection) -> None:
        if conn.number == 1:
            await conn.register()
            async with trio.open_nursery() as inner:
                inner.start_soon(conn.record)
                for job_id in ("AJ_1", "AJ_2", "AJ_3"):
                    await conn.offer(job_id)
                    await conn.wait_for(lambda: any(a.job_id == job_id for a in conn.answers()))
                    await conn.assign(job_id)
                await conn.wait_for(lambda: len(conn.job_updates()) == 3)
                await conn.abort()
        else:
            await conn.register(delay=5)  # LiveKit is slow to come back
            await conn.record()

    server = HostileLiveKit(script)
    control, supervisor = make_control(opener_for(server, nursery))
    async with running(control):
        await supervisor.wait_launched(3)
        await server.wait_connections(2)
        assert not control.registered
        # while no session can take them (the second one is not registered yet)
        supervisor.finish("AJ_2", agent.JS_FAILED, "boom")
        supervisor.finish("AJ_1", agent.JS_SUCCESS)
        second = server.connections[1]
        with trio.fail_after(60):
            await second.wait_for(lambda: len(second.job_updates()) == 2)
        kinds = second.kinds()
        assert kinds[:4] == ["register", "migrate_job", "update_job", "update_job"]
        assert list(second.messages[1].migrate_job.job_ids) == ["AJ_3"]  # still running
        assert second.job_updates() == [("AJ_2", agent.JS_FAILED), ("AJ_1", agent.JS_SUCCESS)]
        assert second.messages[2].update_job.error == "boom"


# -- floods offers --------------------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "handler_delay"), [(math.inf, 0), (0.7, 0), (math.inf, 1)])
async def test_an_offer_flood_is_answered_without_dropping_the_session(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture, threshold: float, handler_delay: float,
) -> None:
    """Accepting a flood overflowed the 256-message outbox and dropped the session ("none
    could be written"); refusing one logged one INFO line per offer."""
    flood = 3000

    async def script(conn: Connection) -> None:
        await conn.register()
        async with trio.open_nursery() as inner:
            inner.start_soon(conn.record)
            for n in range(flood):
                await conn.offer(f"AJ_{n}")
            await trio.sleep_forever()

    server = HostileLiveKit(script)
    load = 0.8 if threshold < 1 else 0.0

    async def sample() -> object:
        return load

    async def on_request(request: JobRequest) -> None:
        await trio.sleep(handler_delay)  # every answer is owed at once, then comes at once
        await request.accept()

    control, _ = make_control(opener_for(server, nursery), load_threshold=threshold,
                              load=sample, request_fnc=on_request)
    caplog.set_level(logging.INFO, logger="trio_agents")
    async with running(control):
        await server.wait_connections(1)
        first = server.connections[0]
        with trio.fail_after(120):
            await first.wait_for(lambda: len(first.answers()) == flood)
        assert len(server.connections) == 1 and control.registered
        assert all(a.available == (threshold == math.inf) for a in first.answers())
    assert not any("could be written" in r.getMessage() for r in caplog.records)
    refusals = [r for r in caplog.records if "refusing job" in r.getMessage()]
    assert len(refusals) <= 1 + trio.current_time() / 10


# -- the same in real time, over TCP, through AgentServer and its health endpoint -------------


async def no_load() -> float:
    return 0.0


@pytest.mark.slow
async def test_a_silent_livekit_is_noticed_in_real_time(nursery: trio.Nursery) -> None:
    """Real sockets, real clock, default ping options: the server registers us and hangs.
    Health answers 503 once the silence is noticed (within 5 + 10 s), and we register again."""
    import httpx

    from trio_agents import AgentServer

    from agents import scripted

    async def script(conn: Connection) -> None:
        if conn.number == 1:
            await conn.register()
            conn.gate.silent = True
            await trio.sleep_forever()
        else:
            await conn.register(delay=3)  # so the 503 can be seen before the next registration
            await conn.record()

    hostile = HostileLiveKit(script)
    listeners = await nursery.start(partial(trio.serve_tcp, hostile.handle_stream, 0,
                                            host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    server = AgentServer(ws_url=f"ws://127.0.0.1:{port}", api_key="devkey", api_secret="secret",
                         port=0, load_fnc=no_load, load_threshold=math.inf,
                         num_idle_processes=0, use_zygote=False)
    server.rtc_session(scripted.entrypoint)
    async with trio.open_nursery() as inner:
        await inner.start(server.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.health_port}") as http:
            assert (await http.get("/")).status_code == 200
            t0 = trio.current_time()
            with trio.fail_after(60):
                await hostile.wait_connections(2)
            noticed = trio.current_time() - t0
            ready = await http.get("/")
            assert (ready.status_code, ready.text) == (503, "reconnecting to LiveKit")
            second = hostile.connections[1]
            with trio.fail_after(60):  # the first status report follows the registration
                await second.wait_for(lambda: "update_worker" in second.kinds())
            assert (await http.get("/")).status_code == 200
        assert noticed >= 10  # not before a ping went unanswered for its whole timeout
        await server.aclose()


# -- accepts, never assigns -----------------------------------------------------------------------


async def test_offers_accepted_but_never_assigned_log_a_bounded_warning(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each offer's AssignmentTimeoutError was its own WARNING: a server that never assigns
    (or a worker that LiveKit no longer routes to) filled the log with one line per offer."""
    offers = 200

    async def script(conn: Connection) -> None:
        await conn.register()
        async with trio.open_nursery() as inner:
            inner.start_soon(conn.record)
            for number in range(offers):  # one offer every 0.5 s, for 100 s; none assigned
                await conn.offer(f"AJ_{number}")
                await trio.sleep(0.5)
            await trio.sleep_forever()

    server = HostileLiveKit(script)
    control, supervisor = make_control(opener_for(server, nursery))
    caplog.set_level(logging.WARNING, logger="trio_agents")
    async with running(control):
        await server.wait_connections(1)
        conn = server.connections[0]
        with trio.fail_after(200):
            await conn.wait_for(lambda: len(conn.answers()) == offers)
            await control.wait_offers_done()  # the last offer's assignment timeout too
    assert all(a.available for a in conn.answers())
    assert supervisor.launched == []
    timeouts = [r.getMessage() for r in caplog.records if "did not assign it" in r.getMessage()]
    # about 107 s of timeouts, one line per 10 s window at most, the left-out ones counted
    assert 1 <= len(timeouts) <= 1 + 110 / 10, timeouts
    assert any("left out" in line for line in timeouts), timeouts
