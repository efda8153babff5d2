"""A message channel over a trio ``Stream`` (one end of the job process's socketpair).

``receive`` returns the next message, raises ``trio.EndOfChannel`` when the peer closed
cleanly between messages, and ``RemoteProtocolError`` for everything else that can go wrong
on the far side (a broken or reset socket, a truncated or oversized frame, an undecodable
message): never anything else, whatever the peer sends.

Sending: whole frames, or a channel known to be broken
------------------------------------------------------
``send`` frames one message and writes it under a lock, so the pinger, the launcher and the
shutdown path can share the channel and frames never interleave. A frame is written whole
even when the sender is cancelled, because half a frame would desynchronise the stream for
good. Over a socket (``trio.SocketStream``), the channel is the only writer of the socket and
counts every byte it writes itself:

- cancelled before the first byte of the frame went out: ``Cancelled``, nothing written;
- cancelled after: the rest of the frame is written under a shield, for at most
  ``frame_grace`` seconds, then ``Cancelled`` is raised. If the peer did not take it in that
  time, the channel is *broken*: its write side is shut down, so the peer sees the stream end
  inside a frame (a ``RemoteProtocolError`` over there, never a corrupt message), and every
  later ``send`` raises ``RemoteProtocolError``.

``send_urgent`` is ``send`` without the scheduling point in front: when no other send is
under way and the socket buffer takes the frame, it is written before the caller yields (for
``JobStarted``, which must be out before user code can block the thread). Otherwise it queues
behind the send under way like any other, so order and wholeness are the same.

Over any other stream (tests' memory streams) the channel cannot count bytes: each frame is
written under a shield bounded by ``frame_grace``.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Final, final

import trio

from .._errors import RemoteProtocolError
from ._framing import MAX_FRAME_SIZE, FrameDecoder, encode_frame
from ._messages import Message, decode, encode

_RECEIVE_SIZE: Final = 65536
#: How long a frame already begun may keep a cancelled sender (see the module docstring).
FRAME_GRACE: Final = 1.0


@final
class IpcChannel:
    def __init__(self, stream: trio.abc.Stream, *, max_frame_size: int = MAX_FRAME_SIZE,
                 frame_grace: float = FRAME_GRACE) -> None:
        self._stream = stream
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._max = max_frame_size
        self._grace = frame_grace
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._pending: deque[bytes] = deque()
        self._send_lock = trio.Lock()
        self._broken: str | None = None
        self._eof = False

    # -- sending --------------------------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Write one message, whole. ``RemoteProtocolError`` if the other side is gone."""
        frame = encode_frame(encode(msg), max_frame_size=self._max)
        async with self._send_lock:
            await self._write(memoryview(frame), 0)

    async def send_urgent(self, msg: Message) -> None:
        """``send``, but written before this task yields when nothing else is being sent and
        the socket takes the frame whole (no checkpoint then, even in a cancelled scope)."""
        frame = encode_frame(encode(msg), max_frame_size=self._max)
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send(msg)  # another send is under way: queue behind it
            return
        try:
            view = memoryview(frame)
            sent = self._write_nowait(view) if self._socket is not None else 0
            if sent < len(view):
                await self._write(view, sent)
        finally:
            self._send_lock.release()

    async def _write(self, view: memoryview, sent: int) -> None:
        """Write ``view[sent:]``, the rest of one frame (the send lock is held)."""
        if self._broken is not None:
            raise RemoteProtocolError(self._broken, reconnect=False)
        if self._socket is None:
            await self._write_stream(view)
            return
        fd = self._socket.fileno()
        try:
            while True:
                sent += self._write_nowait(view[sent:])
                if sent == len(view):
                    return
                await trio.lowlevel.wait_writable(fd)
        except trio.Cancelled:
            if sent:
                await self._finish_frame(view, sent)
            raise

    async def _finish_frame(self, view: memoryview, sent: int) -> None:
        """Cancelled with part of a frame written: finish it within the grace, or break."""
        assert self._socket is not None
        fd = self._socket.fileno()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._grace
            while sent < len(view):
                await trio.lowlevel.wait_writable(fd)
                sent += self._write_nowait(view[sent:])
        if sent < len(view):
            self._break(f"IPC peer did not take the rest of a frame ({sent} of {len(view)} "
                        f"bytes written) within {self._grace:g} s of a cancelled send")

    def _write_nowait(self, data: memoryview) -> int:
        """Bytes of ``data`` the socket takes now (0 if its buffer is full)."""
        assert self._socket is not None
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the IPC channel was closed")
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._break(f"IPC peer is gone: {exc}")
            raise RemoteProtocolError(self._broken or "", reconnect=False) from exc

    async def _write_stream(self, view: memoryview) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._grace
            try:
                await self._stream.send_all(view)
            except (trio.BrokenResourceError, OSError) as exc:
                self._break(f"IPC peer is gone: {exc}")
                raise RemoteProtocolError(self._broken or "", reconnect=False) from exc
        if scope.cancelled_caught:
            self._break(f"IPC peer did not take a frame within {self._grace:g} s")
            raise RemoteProtocolError(self._broken or "", reconnect=False)

    def _break(self, reason: str) -> None:
        """No frame can follow a partial one: shut our side so the peer sees a cut frame."""
        if self._broken is None:
            self._broken = reason
            if self._socket is not None and self._socket.fileno() >= 0:
                try:
                    self._socket.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the peer is gone already: it sees no more frames either way

    # -- receiving ------------------------------------------------------------------------------

    async def receive(self) -> Message:
        """The next message. Cancel-safe: bytes already read stay buffered for the next call."""
        while not self._pending:
            if self._eof:
                raise trio.EndOfChannel
            self._decoder.feed(b"")  # raises if the stream broke after the last whole frame
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if not isinstance(cause, ConnectionResetError):
                    raise RemoteProtocolError(f"IPC connection broken: {exc}",
                                              reconnect=False) from exc
                data = b""  # the peer exited with bytes unread: that is its end of stream
            if not data:
                self._eof = True
                self._decoder.eof()
                continue
            self._pending.extend(self._decoder.feed(data))
        return decode(self._pending.popleft())

    async def aclose(self) -> None:
        await self._stream.aclose()
