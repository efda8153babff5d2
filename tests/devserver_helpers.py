"""Clients for testing the dev server over in-memory streams (virtual time, no sockets).

* ``raw_worker``: a trio-websocket connection to ``/agent``; the test speaks
  ``WorkerMessage``/``ServerMessage`` itself (``send``, ``receive``, ``register``).
* ``FrameClient``: a bare wsproto client that shows every frame, pings and close frames
  included, and whether the server closed with or without a close frame.
* ``HttpClient``: a bare h11 client, several requests on one connection.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from fractions import Fraction
from typing import TYPE_CHECKING, Any, TypeVar

import h11
import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.events as ws_events
from livekit.protocol import agent

from trio_agents._auth import worker_token
from trio_agents.devserver import DevServer

if TYPE_CHECKING:
    from _typeshed import SupportsLenAndGetItem

KEY, SECRET = "devkey", "secret"
#: The headers of a websocket upgrade request (a fixed key).
UPGRADE = [("connection", "Upgrade"), ("upgrade", "websocket"),
           ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]
T = TypeVar("T")


class FirstChoice(random.Random):
    """An ``rng`` for the dev server that always offers to the first eligible worker (in
    registration order), so tests with several workers know who is asked first."""

    def choices(self, population: SupportsLenAndGetItem[T],
                weights: Sequence[float | Fraction] | None = None, *,
                cum_weights: Sequence[float | Fraction] | None = None, k: int = 1) -> list[T]:
        return [population[0]]


# -- trio-websocket worker ------------------------------------------------------------------


@asynccontextmanager
async def raw_worker(dev: DevServer, *, token: str | None = None, query: str = "",
                     headers: list[tuple[bytes, bytes]] | None = None
                     ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A websocket to ``/agent`` over memory streams, authenticated with a worker token
    unless ``token`` says otherwise ("" = no Authorization header)."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev.handle_stream, server)
        if headers is None:
            headers = [] if token == "" else [
                (b"Authorization", f"Bearer {token or worker_token(KEY, SECRET)}".encode())]
        ws = await trio_websocket.wrap_client_stream(
            nursery, client, "devserver", "/agent" + query,  # type: ignore[arg-type]
            extra_headers=headers)
        yield ws
        nursery.cancel_scope.cancel()


async def send(ws: trio_websocket.WebSocketConnection, **message: Any) -> None:
    await ws.send_message(agent.WorkerMessage(**message).SerializeToString())


async def receive(ws: trio_websocket.WebSocketConnection) -> agent.ServerMessage:
    data = await ws.get_message()
    assert isinstance(data, bytes), f"expected a binary frame, got {data!r}"
    return agent.ServerMessage.FromString(data)


def register(agent_name: str = "", job_type: agent.JobType = agent.JT_ROOM,
             **extra: Any) -> dict[str, Any]:
    return {"register": agent.RegisterWorkerRequest(type=job_type, agent_name=agent_name,
                                                    version="test", **extra)}


async def registered(ws: trio_websocket.WebSocketConnection, agent_name: str = "",
                     **extra: Any) -> str:
    """Register and return the worker id."""
    await send(ws, **register(agent_name, **extra))
    reply = await receive(ws)
    assert reply.WhichOneof("message") == "register", reply
    return reply.register.worker_id


async def expect_silence(ws: trio_websocket.WebSocketConnection) -> None:
    """Nothing is queued for the worker: a ping's pong is the next message."""
    await send(ws, ping=agent.WorkerPing(timestamp=7))
    reply = await receive(ws)
    assert reply.WhichOneof("message") == "pong", reply


def close_code(closed: trio_websocket.ConnectionClosed) -> int:
    """The close code a client saw (1006: the server sent no close frame)."""
    assert closed.reason is not None
    return closed.reason.code


async def rejected(dev: DevServer, **kwargs: Any) -> tuple[int, str]:
    """(status, body) of a refused upgrade (trio-websocket raises it from its reader task)."""
    with pytest.RaisesGroup(trio_websocket.ConnectionRejected, flatten_subgroups=True) as info:
        async with raw_worker(dev, **kwargs):
            pass
    (refusal,) = info.value.exceptions
    assert isinstance(refusal, trio_websocket.ConnectionRejected)
    return refusal.status_code, (refusal.body or b"").decode()


# -- bare frames ----------------------------------------------------------------------------


class ServerDropped(Exception):
    """The server closed the stream with no close frame."""


class FrameClient:
    """A websocket client that hands out wsproto events one by one."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._events: list[ws_events.Event] = []

    async def connect(self, target: str, headers: list[tuple[bytes, bytes]]) -> None:
        await self.stream.send_all(self.ws.send(ws_events.Request(
            host="devserver", target=target, extra_headers=headers)))
        event = await self.next_event()
        assert isinstance(event, ws_events.AcceptConnection), event

    async def send(self, event: ws_events.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> ws_events.Event:
        """The next event; ``ServerDropped`` if the stream ends without a close frame."""
        while not self._events:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise ServerDropped("the server closed the stream without a close frame")
            self.ws.receive_data(bytes(data))
            self._events.extend(self.ws.events())
        return self._events.pop(0)

    async def register(self) -> str:
        """Register (automatic dispatch, JT_ROOM) and return the worker id."""
        await self.send(ws_events.BytesMessage(
            data=agent.WorkerMessage(**register()).SerializeToString()))
        reply = await self.next_message()
        assert reply.WhichOneof("message") == "register", reply
        return reply.register.worker_id

    async def next_message(self) -> agent.ServerMessage:
        """The next data message (control frames before it are skipped)."""
        while True:
            event = await self.next_event()
            if isinstance(event, ws_events.BytesMessage):
                return agent.ServerMessage.FromString(bytes(event.data))
            assert isinstance(event, ws_events.Ping), event


@asynccontextmanager
async def frame_client(dev: DevServer, *, token: str | None = None) -> AsyncIterator[FrameClient]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev.handle_stream, server_stream)
        client = FrameClient(client_stream)
        await client.connect("/agent", [
            (b"authorization", f"Bearer {token or worker_token(KEY, SECRET)}".encode())])
        yield client
        nursery.cancel_scope.cancel()


# -- plain HTTP -------------------------------------------------------------------------------


class HttpClient:
    """HTTP/1.1 over one stream; each ``request`` waits for its whole response."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str, target: str, *, body: bytes = b"",
                      headers: Sequence[tuple[str, str]] = ()) -> tuple[int, dict[str, str], bytes]:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("host", "devserver"), ("content-length", str(len(body))), *headers]
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        data = (data or b"") + (self.conn.send(h11.Data(data=body)) or b"") if body else data
        await self.stream.send_all((data or b"") + (self.conn.send(h11.EndOfMessage()) or b""))
        return await self.response()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(1 << 16)))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def at_eof(self) -> bool:
        """The server closed the connection (nothing more to read)."""
        return await self.stream.receive_some(1) == b""


@asynccontextmanager
async def http_client(dev: DevServer) -> AsyncIterator[HttpClient]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev.handle_stream, server_stream)
        yield HttpClient(client_stream)
        nursery.cancel_scope.cancel()
