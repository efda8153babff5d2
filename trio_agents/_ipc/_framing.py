"""Length-prefixed framing for the job-process IPC (sans-io).

A frame is a 4-byte big-endian unsigned length followed by that many payload bytes. The
decoder refuses a frame whose announced length exceeds ``max_frame_size`` *before* buffering
it, so a confused or hostile peer cannot make us allocate gigabytes; ``eof()`` tells a clean
end of stream (no partial frame buffered) from a truncated one.
"""

from __future__ import annotations

import struct
from typing import Final, final

from .._errors import LocalProtocolError, RemoteProtocolError

HEADER: Final = struct.Struct(">I")
#: Default largest payload accepted (4 MiB): a job protobuf is a few KB, a log record less.
MAX_FRAME_SIZE: Final = 4 * 1024 * 1024


def encode_frame(payload: bytes, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Header + payload. Raises ``LocalProtocolError`` if the payload is too large to send."""
    if len(payload) > max_frame_size:
        raise LocalProtocolError(
            f"IPC frame of {len(payload)} bytes exceeds the maximum of {max_frame_size} bytes"
        )
    return HEADER.pack(len(payload)) + payload


@final
class FrameDecoder:
    """Turns a byte stream into frames: ``feed(data) -> [payload, ...]``.

    Raises ``RemoteProtocolError`` for an oversized frame (the stream cannot be resynchronised
    after that, so the decoder stays broken) and, from ``eof()``, for a truncated frame.
    """

    def __init__(self, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max = max_frame_size
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Whole frames completed by ``data``. Frames before a bad header are still returned;
        the error is raised by the next call (``feed(b"")`` checks without new data)."""
        if self._broken is not None:
            raise RemoteProtocolError(self._broken, reconnect=False)
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self._max:
                self._broken = (
                    f"IPC frame of {length} bytes announced, more than the maximum of "
                    f"{self._max} bytes (corrupt stream or a peer speaking another protocol)"
                )
                if frames:
                    return frames
                raise RemoteProtocolError(self._broken, reconnect=False)
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[HEADER.size:end]))
            del self._buffer[:end]
        return frames

    def eof(self) -> None:
        """The stream ended: fine between frames, an error in the middle of one."""
        if self._buffer:
            if len(self._buffer) < HEADER.size:
                detail = f"{len(self._buffer)} byte(s) of a {HEADER.size}-byte header"
            else:
                (length,) = HEADER.unpack_from(self._buffer)
                detail = f"{len(self._buffer) - HEADER.size} of {length} payload bytes"
            raise RemoteProtocolError(f"IPC stream ended inside a frame ({detail})",
                                      reconnect=False)
