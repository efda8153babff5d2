"""Audio and video from trio: the SDK's streams and sources with trio methods.

The realtime SDK's ``AudioStream``, ``VideoStream``, ``AudioSource`` and ``VideoSource`` are
asyncio objects bound to an event loop. The classes here *are* those objects (subclasses, so
``rtc.LocalAudioTrack.create_audio_track(name, source)`` and everything else of the SDK takes
them), bound to the trio-asyncio loop of the room they belong to, with their coroutines turned
into trio functions:

* ``AudioStream(track)`` / ``VideoStream(track)``: ``async for event in stream`` from trio.
  The buffer is bounded: when the consumer falls behind, the oldest frame is dropped and
  counted (``stream.dropped``). Cancelling an iteration loses no frame and leaves nothing
  behind; ``aclose()`` (or ``async with``) releases the native stream, and streams still open
  when their room's loop ends are closed then.
* ``AudioSource(...)``: ``await source.capture_frame(frame)`` waits while the source's queue
  (``queue_size_ms``) is full: backpressure from the native side.
* ``VideoSource(...)``: the native source keeps only the latest frame and never makes a caller
  wait, so ``await source.capture_frame(frame)`` hands the frame over and yields once.

The loop is found from the ``room=`` given, else the loop of the current ``open_room`` block,
else the room of the running job (``get_job_context()``), which must be connected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio
import trio_asyncio
from livekit import rtc
from livekit.rtc._utils import RingQueue

if TYPE_CHECKING:
    from ._room import Bridge, Room

logger = logging.getLogger("trio_agents.room")

T = TypeVar("T")

#: Default buffers: 1 s of 10 ms audio frames; a few video frames (latency beats completeness).
AUDIO_CAPACITY: Final = 100
VIDEO_CAPACITY: Final = 8
#: How long closing a native stream or source may take before we stop waiting.
CLOSE_TIMEOUT: Final = 5.0


def _bridge_for(room: Room | None) -> Bridge:
    """The bridge (asyncio loop + nursery) media objects of ``room`` belong to."""
    if room is not None:
        return room._connected()[1]
    from ._room import Bridge

    loop = trio_asyncio.current_loop.get()
    found = Bridge.of_loop(loop) if loop is not None else None
    if found is not None:
        return found
    from ._context import get_job_context

    ctx = get_job_context(required=False)
    if ctx is not None and ctx.is_connected():
        return ctx.room._connected()[1]
    raise RuntimeError("audio and video objects belong to a connected room: create them inside "
                       "a job after `await ctx.connect()`, inside an `open_room` block, or pass "
                       "room=")


class _CountingRing(RingQueue[T]):
    """The SDK's ring buffer (drop the oldest when full), counting what it drops."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.dropped = 0

    def put(self, item: T) -> None:
        if self._capacity > 0 and len(self._queue) == self._capacity:
            self.dropped += 1
        super().put(item)


class _TrioStream:
    """What ``AudioStream`` and ``VideoStream`` share: trio iteration, closing, counting."""

    _bridge: Bridge
    _queue: Any
    _closed: bool

    def _adopt(self, bridge: Bridge, capacity: int) -> None:
        if not isinstance(getattr(self, "_queue", None), RingQueue):
            raise RuntimeError("this version of the livekit SDK keeps its stream buffer "
                               "differently; trio_agents supports livekit>=1.2,<2")
        self._bridge = bridge
        self._queue = _CountingRing(capacity)
        self._closed = False
        bridge.closers.add(self)

    @property
    def dropped(self) -> int:
        """Frames dropped because the consumer fell behind (the buffer was full)."""
        ring: _CountingRing[Any] = self._queue
        return ring.dropped

    async def _next(self, sdk_next: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self._closed:
            raise StopAsyncIteration
        return await self._bridge.call(sdk_next)

    async def _close(self, sdk_close: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._closed:
            return
        self._closed = True
        self._bridge.closers.discard(self)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            try:
                await self._bridge.call(sdk_close)
            except Exception:
                logger.exception("closing %r failed", self)
        if scope.cancelled_caught:
            logger.warning("closing %r took more than %.0f s; gave up waiting", self,
                           CLOSE_TIMEOUT)

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()  # type: ignore[attr-defined]


class AudioStream(_TrioStream, rtc.AudioStream):
    """The frames of a remote (or local) audio track, iterated from trio.

    ``async for event in AudioStream(track, sample_rate=48000, num_channels=1): event.frame``.
    """

    def __init__(self, track: rtc.Track, *, sample_rate: int = 48000, num_channels: int = 1,
                 capacity: int = AUDIO_CAPACITY, frame_size_ms: int | None = None,
                 noise_cancellation: Any = None, room: Room | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 frame, not {capacity}")
        bridge = _bridge_for(room)
        super().__init__(track, loop=bridge.loop, sample_rate=sample_rate,
                         num_channels=num_channels, frame_size_ms=frame_size_ms,
                         noise_cancellation=noise_cancellation)
        self._adopt(bridge, capacity)

    def __aiter__(self) -> AudioStream:
        return self

    async def __anext__(self) -> rtc.AudioFrameEvent:
        return await self._next(super().__anext__)

    async def aclose(self) -> None:
        """Release the native stream (bounded; safe to call twice)."""
        await self._close(super().aclose)

    def __repr__(self) -> str:
        return f"<AudioStream track={getattr(self._track, 'sid', None)!r}>"


class VideoStream(_TrioStream, rtc.VideoStream):
    """The frames of a video track, iterated from trio (``format``: a ``rtc.VideoBufferType``
    to convert each frame to, e.g. ``RGBA``; ``None`` keeps the track's own)."""

    def __init__(self, track: rtc.Track, *, format: Any = None,
                 capacity: int = VIDEO_CAPACITY, room: Room | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 frame, not {capacity}")
        bridge = _bridge_for(room)
        super().__init__(track, loop=bridge.loop, format=format)
        self._adopt(bridge, capacity)

    def __aiter__(self) -> VideoStream:
        return self

    async def __anext__(self) -> rtc.VideoFrameEvent:
        return await self._next(super().__anext__)

    async def aclose(self) -> None:
        """Release the native stream (bounded; safe to call twice)."""
        await self._close(super().aclose)

    def __repr__(self) -> str:
        return f"<VideoStream track={getattr(self._track, 'sid', None)!r}>"


class AudioSource(rtc.AudioSource):
    """Audio to publish (``rtc.LocalAudioTrack.create_audio_track(name, source)``), fed from
    trio: ``await source.capture_frame(frame)`` waits while ``queue_size_ms`` of audio is
    queued."""

    def __init__(self, sample_rate: int, num_channels: int, queue_size_ms: int = 1000, *,
                 room: Room | None = None) -> None:
        self._bridge = _bridge_for(room)
        super().__init__(sample_rate, num_channels, queue_size_ms, loop=self._bridge.loop)

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await self._bridge.call(super().capture_frame, frame)

    async def wait_for_playout(self) -> None:
        await self._bridge.call(super().wait_for_playout)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            await self._bridge.call(super().aclose)


class VideoSource(rtc.VideoSource):
    """Video to publish (``rtc.LocalVideoTrack.create_video_track(name, source)``) from trio.

    The native source keeps the latest frame only, so there is nothing to wait for:
    ``await source.capture_frame(frame)`` hands it over and yields to other tasks once.
    """

    def __init__(self, width: int, height: int, *, is_screencast: bool = False,
                 room: Room | None = None) -> None:
        self._bridge = _bridge_for(room)
        super().__init__(width, height, is_screencast=is_screencast)

    async def capture_frame(  # type: ignore[override]  # a trio function, on purpose
            self, frame: rtc.VideoFrame, *, timestamp_us: int = 0,
            rotation: rtc.VideoRotation.ValueType = rtc.VideoRotation.VIDEO_ROTATION_0) -> None:
        super().capture_frame(frame, timestamp_us=timestamp_us, rotation=rotation)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            await self._bridge.call(super().aclose)


async def close_all(closers: set[Any]) -> None:
    """Close the streams still open when their loop ends (no native handle outlives it)."""
    for stream in list(closers):
        await stream.aclose()
