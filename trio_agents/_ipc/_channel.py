"""A message channel over a trio ``Stream`` (one end of the job process's socketpair).

``send`` frames and writes one message (serialised by a lock, so the pinger, the launcher and
the shutdown path can share it). ``receive`` returns the next message, raises
``trio.EndOfChannel`` when the peer closed cleanly between messages, and
``RemoteProtocolError`` for everything else that can go wrong on the far side (a broken or
reset socket, a truncated or oversized frame, an undecodable message).
"""

from __future__ import annotations

import os
from collections import deque
from typing import final

import trio

from .._errors import RemoteProtocolError
from ._framing import MAX_FRAME_SIZE, FrameDecoder, encode_frame
from ._messages import Message, decode, encode

_RECEIVE_SIZE = 65536


@final
class IpcChannel:
    def __init__(self, stream: trio.abc.Stream, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._stream = stream
        self._max = max_frame_size
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._pending: deque[bytes] = deque()
        self._send_lock = trio.Lock()
        self._eof = False

    async def send(self, msg: Message) -> None:
        """Write one message. ``RemoteProtocolError`` if the other side is gone."""
        frame = encode_frame(encode(msg), max_frame_size=self._max)
        async with self._send_lock:
            try:
                await self._stream.send_all(frame)
            except (trio.BrokenResourceError, OSError) as exc:
                raise RemoteProtocolError(f"IPC peer is gone: {exc}", reconnect=False) from exc

    async def send_urgent(self, msg: Message) -> None:
        """``send``, but written before this task yields when the socket takes it whole.

        For the one message that must be out before user code runs (``JobStarted``): an
        ordinary send yields to the scheduler, which costs a loop iteration (~0.5 ms on the
        start path) before the entrypoint can begin.
        """
        frame = encode_frame(encode(msg), max_frame_size=self._max)
        sock = getattr(self._stream, "socket", None)
        if sock is not None:
            try:
                self._send_lock.acquire_nowait()
            except trio.WouldBlock:
                pass  # another send is under way: queue behind it
            else:
                try:
                    written = os.write(sock.fileno(), frame)
                except BlockingIOError:
                    written = 0
                except OSError as exc:
                    self._send_lock.release()
                    raise RemoteProtocolError(f"IPC peer is gone: {exc}", reconnect=False) from exc
                try:
                    if written < len(frame):
                        await self._stream.send_all(frame[written:])
                except (trio.BrokenResourceError, OSError) as exc:
                    raise RemoteProtocolError(f"IPC peer is gone: {exc}",
                                              reconnect=False) from exc
                finally:
                    self._send_lock.release()
                return
        await self.send(msg)

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
