"""A small HTTP/1.1 + websocket front over any trio ``Stream`` (h11 for requests, wsproto once
a request upgrades).

It runs over TCP for ``python -m trio_agents devserver`` and over in-memory streams in tests,
which is why it is ours and not a framework's. It mirrors what livekit-server's front does
where clients can see it: plain-text error bodies before an upgrade, a 10 MiB request body
limit, websocket pings every 10 s, and a server-side close that just drops the TCP stream with
no close frame.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, final
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
import wsproto
import wsproto.events as ws_events
from wsproto.connection import ConnectionState

logger = logging.getLogger("trio_agents.devserver")

MAX_BODY: Final = 10 << 20
MAX_MESSAGE: Final = 2 << 20
PING_INTERVAL: Final = 10.0
RECEIVE_SIZE: Final = 65536


@final
@attrs.frozen(kw_only=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def param(self, name: str) -> str:
        values = self.query.get(name)
        return values[0] if values else ""

    @property
    def wants_websocket(self) -> bool:
        return (self.method == "GET" and "upgrade" in self.header("connection").lower()
                and self.header("upgrade").lower() == "websocket")


@final
@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


class WebSocketClosed(Exception):
    """The websocket is gone (closed by the peer, by us, or broken)."""


@final
class WebSocket:
    """The server side of one websocket. ``send`` may be called from any task."""

    def __init__(self, stream: trio.abc.Stream, ws: wsproto.WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._send_lock = trio.StrictFIFOLock()
        self._messages_send, self._messages = trio.open_memory_channel[bytes | str](64)
        self._closed = False

    async def receive(self) -> bytes | str:
        try:
            return await self._messages.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise WebSocketClosed("websocket closed") from exc

    async def send(self, data: bytes | str) -> None:
        event: ws_events.Event = (ws_events.BytesMessage(data=data) if isinstance(data, bytes)
                                  else ws_events.TextMessage(data=data))
        await self._write(event)

    async def abort(self) -> None:
        """Close the TCP stream without a close frame (what livekit-server does)."""
        self._closed = True
        self._messages_send.close()
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def _write(self, event: ws_events.Event) -> None:
        if self._closed:
            raise WebSocketClosed("websocket closed")
        try:
            data = self._ws.send(event)
            async with self._send_lock:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError,
                wsproto.utilities.LocalProtocolError) as exc:
            self._closed = True
            raise WebSocketClosed(str(exc)) from exc

    async def run(self, initial: bytes) -> None:
        """Read frames until the connection ends; answer pings; ping every 10 s."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ping_forever)
            try:
                await self._read(initial)
            finally:
                self._messages_send.close()
                nursery.cancel_scope.cancel()

    async def _ping_forever(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            try:
                await self._write(ws_events.Ping(payload=b"lk"))
            except WebSocketClosed:
                return

    async def _read(self, data: bytes) -> None:
        parts: list[bytes | str] = []
        size = 0
        while True:
            if data:
                self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, ws_events.Ping):
                    await self._write(event.response())
                elif isinstance(event, ws_events.CloseConnection):
                    if self._ws.state is ConnectionState.REMOTE_CLOSING:
                        try:
                            await self._write(event.response())
                        except WebSocketClosed:
                            pass
                    self._closed = True
                    return
                elif isinstance(event, (ws_events.BytesMessage, ws_events.TextMessage)):
                    parts.append(bytes(event.data) if isinstance(event.data, bytearray)
                                 else event.data)
                    size += len(event.data)
                    if size > MAX_MESSAGE:
                        logger.info("websocket message over %d bytes: closing", MAX_MESSAGE)
                        return
                    if event.message_finished:
                        message: bytes | str = (b"".join(p for p in parts if isinstance(p, bytes))
                                                if isinstance(parts[0], bytes)
                                                else "".join(p for p in parts
                                                             if isinstance(p, str)))
                        parts, size = [], 0
                        await self._messages_send.send(message)
            if self._closed:
                return
            try:
                data = bytes(await self._stream.receive_some(RECEIVE_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                self._ws.receive_data(None)
                return


#: Serves a plain request.
HttpHandler = Callable[[Request], Awaitable[Response]]
#: Decides on an upgrade: a ``Response`` refuses it, else the returned coroutine function
#: runs with the accepted websocket.
UpgradeHandler = Callable[[Request], Awaitable["Response | Callable[[WebSocket], Awaitable[None]]"]]


async def serve_http(stream: trio.abc.Stream, *, http: HttpHandler,
                     upgrade: UpgradeHandler) -> None:
    """Serve one connection: requests (keep-alive) until it closes or upgrades."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            request = await _read_request(stream, conn)
            if request is None:
                return
            if isinstance(request, Response):
                await _respond(stream, conn, request, close=True)
                return
            if request.wants_websocket:
                decision = await upgrade(request)
                if isinstance(decision, Response):
                    await _respond(stream, conn, decision, close=True)
                    return
                ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
                ws.initiate_upgrade_connection(
                    [(k.encode(), v.encode()) for k, v in request.headers.items()],
                    request.path + ("?" + _query_string(request) if request.query else ""),
                )
                for event in ws.events():
                    if isinstance(event, ws_events.Request):
                        await stream.send_all(ws.send(ws_events.AcceptConnection()))
                socket = WebSocket(stream, ws)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(socket.run, conn.trailing_data[0])
                    try:
                        await decision(socket)
                    finally:
                        nursery.cancel_scope.cancel()
                return
            response = await http(request)
            await _respond(stream, conn, response, close=False)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


def _query_string(request: Request) -> str:
    from urllib.parse import urlencode

    return urlencode([(k, v) for k, values in request.query.items() for v in values])


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> Request | Response | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                return Response(413, b"request entity too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = urlsplit(head.target.decode("latin-1"))
            return Request(
                method=head.method.decode(),
                path=target.path,
                query=parse_qs(target.query, keep_blank_values=True),
                headers={k.decode().lower(): v.decode("latin-1") for k, v in head.headers},
                body=bytes(body),
            )
        elif event is h11.PAUSED:
            return None


async def _respond(stream: trio.abc.Stream, conn: h11.Connection, response: Response, *,
                   close: bool) -> None:
    headers = [("content-type", response.content_type),
               ("content-length", str(len(response.body)))]
    if close:
        headers.append(("connection", "close"))
    try:
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return
    await stream.send_all(data)
