"""A small HTTP/1.1 + websocket front over any trio ``Stream`` (h11 for requests, wsproto once
a request upgrades).

It runs over TCP for ``python -m trio_agents devserver`` and over in-memory streams in tests,
which is why it is ours and not a framework's. It mirrors what livekit-server's front does
where clients can see it: plain-text error bodies before an upgrade, a 10 MiB request body
limit (413), websocket control pings every 10 s (a ping that cannot be written within 2 s
ends the connection), a 2 MiB message limit, and a server-side close that just drops the TCP
stream with no close frame (the client sees 1006).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar, final
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
import trio
import wsproto
import wsproto.events as ws_events
import wsproto.utilities
from wsproto.connection import ConnectionState

logger = logging.getLogger("trio_agents.devserver")

#: ``limit.max_api_request_body_size``.
MAX_BODY: Final = 10 << 20
#: ``limit.agent_signal_message_size_limit``.
MAX_MESSAGE: Final = 2 << 20
#: gorilla's ``pingFrequency`` / ``pingTimeout`` in livekit-server's ``WSSignalConnection``.
PING_INTERVAL: Final = 10.0
PING_WRITE_TIMEOUT: Final = 2.0
#: How long ``close`` waits for the peer's close frame.
CLOSE_ECHO_TIMEOUT: Final = 1.0
RECEIVE_SIZE: Final = 65536
#: Go's ``http.DefaultMaxHeaderBytes`` plus the 4 KiB slack its server allows; a longer
#: request head is answered 431.
MAX_HEAD: Final = (1 << 20) + 4096
#: After an error answer with ``Connection: close``, how long what the client still sends is
#: read and discarded (Go's ``rstAvoidanceDelay``), so that closing does not reset the
#: connection before the client has read the answer.
LINGER: Final = 0.5
LINGER_BYTES: Final = 4 << 20


@final
@attrs.frozen(kw_only=True)
class Request:
    """One parsed HTTP request (the whole body read)."""

    method: str
    target: str
    """The raw request target: path and query string."""
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    raw_headers: Sequence[tuple[bytes, bytes]] = ()
    body: bytes = b""

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def param(self, name: str) -> str:
        values = self.query.get(name)
        return values[0] if values else ""

    @property
    def wants_websocket(self) -> bool:
        """gorilla's ``IsWebSocketUpgrade``: tokens ``upgrade`` and ``websocket``."""
        connection = {t.strip().lower() for t in self.header("connection").split(",")}
        upgrade = {t.strip().lower() for t in self.header("upgrade").split(",")}
        return self.method == "GET" and "upgrade" in connection and "websocket" in upgrade


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
    """The server side of one accepted websocket.

    ``receive`` yields whole messages (``bytes`` for binary frames, ``str`` for text);
    ``send`` may be called from any task. The server ends it with ``abort`` (no close frame,
    the ``/agent`` way) or ``close`` (a close frame first, the ``/rtc`` way).
    """

    def __init__(self, stream: trio.abc.Stream, ws: wsproto.WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._send_lock = trio.StrictFIFOLock()
        self._messages_send, self._messages = trio.open_memory_channel[bytes | str](64)
        self._closed = False
        self._read_done = trio.Event()

    async def receive(self) -> bytes | str:
        try:
            return await self._messages.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise WebSocketClosed("websocket closed") from exc

    async def send(self, data: bytes | str) -> None:
        event: ws_events.Event = (ws_events.BytesMessage(data=data) if isinstance(data, bytes)
                                  else ws_events.TextMessage(data=data))
        await self._write(event)

    async def close(self, code: int = 1000) -> None:
        """Send a close frame, then drop the stream (how livekit-server ends a participant's
        signal connection). The peer's answering close frame is awaited briefly, so that the
        peer sees a clean close rather than a reset."""
        try:
            await self._write(ws_events.CloseConnection(code=code))
        except WebSocketClosed:
            pass
        else:
            with trio.move_on_after(CLOSE_ECHO_TIMEOUT):
                await self._read_done.wait()
        await self.abort()

    async def abort(self) -> None:
        """Close the TCP stream without a close frame (what livekit-server does to a worker)."""
        self._closed = True
        self._messages_send.close()
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def _write(self, event: ws_events.Event) -> None:
        # Frames are produced and written under one lock, so concurrent senders can never
        # put them on the wire in another order than wsproto produced them.
        async with self._send_lock:
            if self._closed:
                raise WebSocketClosed("websocket closed")
            try:
                await self._stream.send_all(self._ws.send(event))
            except (trio.BrokenResourceError, trio.ClosedResourceError,
                    wsproto.utilities.LocalProtocolError) as exc:
                self._closed = True
                raise WebSocketClosed(str(exc) or type(exc).__name__) from exc

    async def run(self, initial: bytes) -> None:
        """Read frames until the connection ends; answer pings; ping every 10 s."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ping_forever)
            try:
                await self._read(initial)
            finally:
                self._read_done.set()
                self._messages_send.close()
                nursery.cancel_scope.cancel()

    async def _ping_forever(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            with trio.move_on_after(PING_WRITE_TIMEOUT) as write:
                try:
                    await self._write(ws_events.Ping(payload=b""))
                except WebSocketClosed:
                    return
            if write.cancelled_caught:
                logger.debug("websocket ping not written within %s s: closing", PING_WRITE_TIMEOUT)
                await self.abort()
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
                        try:  # gorilla's default close handler echoes the close frame
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
                        logger.debug("websocket message over %d bytes: closing", MAX_MESSAGE)
                        return
                    if event.message_finished:
                        try:
                            await self._messages_send.send(_join(parts))
                        except trio.ClosedResourceError:
                            return  # the session ended (``abort``) while this was read
                        parts, size = [], 0
            if self._closed:
                return
            try:
                data = bytes(await self._stream.receive_some(RECEIVE_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                self._ws.receive_data(None)
                return


def _join(parts: list[bytes | str]) -> bytes | str:
    if isinstance(parts[0], bytes):
        return b"".join(p for p in parts if isinstance(p, bytes))
    return "".join(p for p in parts if isinstance(p, str))


M = TypeVar("M", bound=Message)


def encode_frame(message: Message, as_json: bool) -> bytes | str:
    """A protobuf message as livekit-server writes it: binary, or protojson (lowerCamelCase
    names, unpopulated fields left out) in a text frame to a client that spoke JSON."""
    if as_json:
        return json_format.MessageToJson(message, indent=None)
    return message.SerializeToString()


def decode_frame(data: bytes | str, message_type: type[M]) -> M:
    """A frame as a ``message_type`` (binary: protobuf, text: protojson).

    Raises ``ValueError`` if it is neither.
    """
    message = message_type()
    try:
        if isinstance(data, bytes):
            message.ParseFromString(data)
        else:
            json_format.Parse(data, message)
    except (DecodeError, json_format.ParseError, RecursionError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
    return message


#: Runs with an accepted websocket; when it returns, the connection is dropped (no close frame).
SessionHandler = Callable[[WebSocket], Awaitable[None]]
#: Answers a request: a ``Response``, or (for an upgrade request) the session to run.
Handler = Callable[[Request], Awaitable["Response | SessionHandler"]]


async def serve_http(stream: trio.abc.Stream, handler: Handler) -> None:
    """Serve one connection: requests (keep-alive) until it closes or upgrades.

    Malformed requests get a plain-text 4xx and the connection is closed. Nothing raises out
    of it (cancellation aside): this is the error boundary of one connection. An error of
    ours while serving it is logged, answered 500 if no answer was started, and the
    connection closed; the server and its other connections go on. The stream is closed on
    return.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        await _serve(stream, conn, handler)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        logger.exception("a connection failed on an error of the dev server; closing it "
                         "(the server goes on)")
        if conn.our_state is h11.SEND_RESPONSE:
            with trio.move_on_after(CLOSE_ECHO_TIMEOUT):
                try:
                    await _respond(stream, conn, Response(500, b"internal server error\n"),
                                   close=True)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _serve(stream: trio.abc.Stream, conn: h11.Connection, handler: Handler) -> None:
    while True:
        request = await _read_request(stream, conn)
        if request is None:
            return
        if isinstance(request, Response):
            await _respond(stream, conn, request, close=True)
            await _linger(stream)
            return
        result = await handler(request)
        if isinstance(result, Response):
            await _respond(stream, conn, result, close=request.wants_websocket)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
            continue
        if not request.wants_websocket:
            raise AssertionError("a session handler for a request that is not an upgrade")
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(request.raw_headers), request.target)
        except wsproto.utilities.RemoteProtocolError as exc:
            await _respond(stream, conn, Response(400, f"websocket: {exc}".encode()),
                           close=True)
            return
        await stream.send_all(ws.send(ws_events.AcceptConnection()))
        await _run_session(stream, ws, conn.trailing_data[0], result)
        return


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read and drop what the client still sends, for a moment: closing a
    socket with unread data resets it, and the client would lose the answer just sent."""
    with trio.move_on_after(LINGER):
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        discarded = 0
        while discarded < LINGER_BYTES:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            discarded += len(data)


async def _run_session(stream: trio.abc.Stream, ws: wsproto.WSConnection, initial: bytes,
                       session: SessionHandler) -> None:
    socket = WebSocket(stream, ws)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(socket.run, initial)
        try:
            await session(socket)
        finally:
            nursery.cancel_scope.cancel()


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> Request | Response | None:
    """The next request, a ``Response`` refusing it (400, 413), or ``None`` at EOF."""
    head: h11.Request | None = None
    body = bytearray()
    received = 0  # this cycle's bytes: h11 bounds only a head that is still incomplete
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return Response(exc.error_status_hint, f"bad request: {exc}".encode())
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                                      or b"")
            data = bytes(await stream.receive_some(RECEIVE_SIZE))
            received += len(data)
            conn.receive_data(data)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        elif isinstance(event, h11.Request):
            if received - len(conn.trailing_data[0]) > MAX_HEAD:
                return Response(431, b"431 Request Header Fields Too Large")
            head = event
            length = dict(event.headers).get(b"content-length", b"0")
            if length.isdigit() and int(length) > MAX_BODY:
                return Response(413, b"http: request body too large")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                return Response(413, b"http: request body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = head.target.decode("latin-1")
            try:
                path, query = split_target(target)
            except ValueError as exc:
                return Response(400, f"bad request: {exc}".encode())
            return Request(
                method=head.method.decode("latin-1"),
                target=target,
                path=path,
                query=parse_qs(query, keep_blank_values=True),
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers},
                raw_headers=tuple((bytes(k), bytes(v)) for k, v in head.headers),
                body=bytes(body),
            )


def split_target(target: str) -> tuple[str, str]:
    """A request target's path (percent-decoded) and raw query, as Go's
    ``url.ParseRequestURI`` reads them: a target starting with "/" is a path (``//[`` too:
    no authority is parsed there); an absolute URL is parsed. Raises ``ValueError`` for what
    is neither, or for a bad percent escape (Go answers 400)."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target == "*":
        return target, ""
    else:
        parts = urlsplit(target)  # ValueError for e.g. "http://[": an unclosed IPv6 host
        if not parts.scheme:
            raise ValueError(f"invalid request target {target[:100]!r}")
        path, query = parts.path or "/", parts.query
    if _BAD_ESCAPE.search(path):
        raise ValueError(f"invalid URL escape in {path[:100]!r}")
    # Go's ServeMux matches unescaped segments: an escaped "/" stays inside its segment
    path = unquote(_ESCAPED_SLASH.sub("%252F", path), errors="replace")
    # livekit-server's RemoveDoubleSlashes middleware: "//agent" is "/agent"
    return (path[1:] if path.startswith("//") else path), query


_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPED_SLASH: Final = re.compile("%2[fF]")


async def _respond(stream: trio.abc.Stream, conn: h11.Connection, response: Response, *,
                   close: bool) -> None:
    headers = [("content-type", response.content_type),
               ("content-length", str(len(response.body)))]
    if close:
        headers.append(("connection", "close"))
    try:
        data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:  # the connection is past the point of answering
        return
    await stream.send_all(data)
