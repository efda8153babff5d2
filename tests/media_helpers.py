"""Sound and pictures for the media tests: a sine to publish, the spectral peak of what
arrives, solid-colour video, and participants that publish or listen from trio."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import numpy as np
import trio
from livekit import rtc

from trio_agents._auth import VideoGrants, create_token
from trio_agents.room import AudioSource, Room, VideoSource

SAMPLE_RATE = 48000
FRAME_MS = 10
SAMPLES = SAMPLE_RATE * FRAME_MS // 1000


def participant_token(key: str, secret: str, room: str, identity: str) -> str:
    return create_token(key, secret, identity=identity,
                        video=VideoGrants(room_join=True, room=room, can_publish=True,
                                          can_subscribe=True, can_publish_data=True,
                                          can_update_own_metadata=True))


def sine_frame(freq: float, index: int, *, amplitude: float = 0.5) -> rtc.AudioFrame:
    """The ``index``-th 10 ms frame of a continuous sine of ``freq`` Hz."""
    t = (np.arange(SAMPLES) + index * SAMPLES) / SAMPLE_RATE
    samples = (amplitude * 32767 * np.sin(2 * math.pi * freq * t)).astype(np.int16)
    frame = rtc.AudioFrame.create(SAMPLE_RATE, 1, SAMPLES)
    np.frombuffer(frame.data, dtype=np.int16)[:] = samples
    return frame


def silence_frame() -> rtc.AudioFrame:
    return rtc.AudioFrame.create(SAMPLE_RATE, 1, SAMPLES)


def peak_hz(frames: Sequence[rtc.AudioFrame]) -> float:
    """The frequency of the strongest component of the concatenated (mono) frames."""
    data = np.concatenate([np.frombuffer(f.data, dtype=np.int16)[::f.num_channels]
                           for f in frames]).astype(np.float64)
    rate = frames[0].sample_rate
    spectrum = np.abs(np.fft.rfft(data * np.hanning(len(data))))
    return float(np.fft.rfftfreq(len(data), 1 / rate)[int(np.argmax(spectrum[1:])) + 1])


def rms(frame: rtc.AudioFrame) -> float:
    data = np.frombuffer(frame.data, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(data * data))) if len(data) else 0.0


def solid_frame(rgb: tuple[int, int, int], width: int = 64, height: int = 48) -> rtc.VideoFrame:
    pixels = np.empty((height, width, 4), dtype=np.uint8)
    pixels[...] = (*rgb, 255)
    return rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, pixels.tobytes())


def mean_rgb(frame: rtc.VideoFrame) -> tuple[int, int, int]:
    rgba = frame if frame.type == rtc.VideoBufferType.RGBA else frame.convert(
        rtc.VideoBufferType.RGBA)
    pixels = np.frombuffer(rgba.data, dtype=np.uint8).reshape(rgba.height, rgba.width, 4)
    r, g, b = (int(round(float(pixels[..., c].mean()))) for c in range(3))
    return r, g, b


@asynccontextmanager
async def _publishing(room: Room, track: rtc.LocalTrack, source: AudioSource | VideoSource,
                      kind_source: rtc.TrackSource.ValueType,
                      play: Callable[[], Awaitable[None]]
                      ) -> AsyncIterator[rtc.LocalTrackPublication]:
    """Publish ``track`` and run ``play`` (feeding its source) while the block runs."""
    publication = await room.local_participant.publish_track(
        track, rtc.TrackPublishOptions(source=kind_source))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(play)
        try:
            yield publication
        finally:
            nursery.cancel_scope.cancel()
    await source.aclose()


def publishing_sine(room: Room, freq: float, *, name: str = "sine"
                    ) -> AbstractAsyncContextManager[rtc.LocalTrackPublication]:
    """Publish a microphone track playing ``freq`` Hz for as long as the block runs."""
    source = AudioSource(SAMPLE_RATE, 1, room=room)

    async def play() -> None:
        index = 0
        while True:
            await source.capture_frame(sine_frame(freq, index))
            index += 1

    return _publishing(room, rtc.LocalAudioTrack.create_audio_track(name, source), source,
                       rtc.TrackSource.SOURCE_MICROPHONE, play)


def publishing_colour(room: Room, rgb: tuple[int, int, int], *, name: str = "colour"
                      ) -> AbstractAsyncContextManager[rtc.LocalTrackPublication]:
    """Publish a camera track of one solid colour (15 frames a second) while the block runs."""
    source = VideoSource(64, 48, room=room)
    frame = solid_frame(rgb)

    async def play() -> None:
        while True:
            await source.capture_frame(frame)
            await trio.sleep(1 / 15)

    return _publishing(room, rtc.LocalVideoTrack.create_video_track(name, source), source,
                       rtc.TrackSource.SOURCE_CAMERA, play)


async def first_track(room: Room, kind: int, *, from_identity: str | None = None,
                      timeout: float = 15.0) -> rtc.RemoteTrack:
    """The first subscribed track of ``kind`` (already there or coming)."""
    def existing() -> rtc.RemoteTrack | None:
        for participant in room.remote_participants.values():
            if from_identity is not None and participant.identity != from_identity:
                continue
            for publication in participant.track_publications.values():
                if publication.kind == kind and publication.track is not None:
                    return publication.track
        return None

    with trio.fail_after(timeout), room.events("track_subscribed") as events:
        track = existing()
        if track is not None:
            return track
        async for event in events:
            arrived: rtc.RemoteTrack = event.args[0]
            if arrived.kind == kind and (from_identity is None
                                         or event.args[2].identity == from_identity):
                return arrived
    raise AssertionError("the room closed before a track arrived")
