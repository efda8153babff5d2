"""Audio and video from trio, end to end: participants and agents publish and receive real
tracks through ``trio_agents.room`` (the realtime SDK under trio), on the real livekit-server."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest
import trio
from livekit import rtc

from livekit_server import open_livekit_server
from media_helpers import first_track, mean_rgb, participant_token, peak_hz, publishing_colour, publishing_sine
from room_helpers import Backend
from trio_agents.devserver import open_dev_server
from trio_agents.room import Room, open_room

pytestmark = pytest.mark.slow


@pytest.fixture(params=["devserver", pytest.param("livekit-server", marks=pytest.mark.realserver)])
async def livekit(request: pytest.FixtureRequest, rtc_address: str) -> AsyncIterator[Backend]:
    """The same test against the dev server and against the real livekit-server."""
    if request.param == "devserver":
        async with open_dev_server(port=0, rtc_address=rtc_address) as dev:
            yield dev
    else:
        async with open_livekit_server(rtc_address) as server:
            yield server


def token(server: Backend, room: str, identity: str) -> str:
    return participant_token(server.api_key, server.api_secret, room, identity)


async def test_a_sine_published_from_trio_arrives_at_440_hz(livekit: Backend) -> None:
    async with open_room(livekit.url, token(livekit, "tone", "speaker")) as speaker, \
            open_room(livekit.url, token(livekit, "tone", "listener")) as listener, \
            publishing_sine(speaker, 440.0):
        track = await first_track(listener, rtc.TrackKind.KIND_AUDIO)
        frames: list[rtc.AudioFrame] = []
        async with listener.audio_stream(track, sample_rate=48000) as stream:
            with trio.fail_after(10):
                async for event in stream:
                    frames.append(event.frame)
                    if len(frames) >= 150:  # 1.5 s
                        break
            assert stream.dropped == 0
        # the first frames may be silence while the decoder starts: use the last second
        assert abs(peak_hz(frames[-100:]) - 440.0) < 5.0


async def test_solid_colour_video_arrives_with_its_colour(livekit: Backend) -> None:
    async with open_room(livekit.url, token(livekit, "paint", "camera")) as camera, \
            open_room(livekit.url, token(livekit, "paint", "viewer")) as viewer, \
            publishing_colour(camera, (200, 30, 60)):
        track = await first_track(viewer, rtc.TrackKind.KIND_VIDEO)
        async with viewer.video_stream(track, format=rtc.VideoBufferType.RGBA) as stream:
            seen = []
            with trio.fail_after(10):
                async for event in stream:
                    seen.append(mean_rgb(event.frame))
                    if len(seen) >= 5:
                        break
        r, g, b = seen[-1]
        assert abs(r - 200) < 25 and abs(g - 30) < 25 and abs(b - 60) < 25, seen


async def test_an_audio_stream_cancelled_mid_iteration_leaves_nothing_behind(
        livekit: Backend) -> None:
    async with open_room(livekit.url, token(livekit, "cut", "speaker")) as speaker, \
            open_room(livekit.url, token(livekit, "cut", "listener")) as listener, \
            publishing_sine(speaker, 440.0):
        track = await first_track(listener, rtc.TrackKind.KIND_AUDIO)
        stream = listener.audio_stream(track)
        got = 0
        with trio.move_on_after(0.5):
            async for _ in stream:
                got += 1
        assert got > 0
        # nothing was lost to the cancellation: the stream goes on where it was
        with trio.fail_after(5):
            await stream.__anext__()
        bridge = listener._connected()[1]
        assert stream in bridge.closers
        await stream.aclose()
        assert stream not in bridge.closers
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()


async def test_room_and_agent_cover_every_public_member_of_the_sdk(livekit: Backend) -> None:
    async with open_room(livekit.url, token(livekit, "members", "me")) as room:
        for ours, sdk in ((room, room.rtc_room),
                          (room.local_participant, room.local_participant.rtc_participant)):
            for name in (n for n in dir(type(sdk)) if not n.startswith("_")):
                assert name in dir(ours), name
                theirs = inspect.getattr_static(type(sdk), name)
                if inspect.iscoroutinefunction(theirs):
                    assert inspect.iscoroutinefunction(getattr(ours, name)), name
                else:
                    getattr(ours, name)  # properties and sync methods are reachable as they are
        # a coroutine of the SDK's, run from trio
        assert (await room.get_rtc_stats()) is not None
        writer = await room.local_participant.stream_text(topic="notes")
        await writer.write("one")
        await writer.aclose()
        assert isinstance(room.num_participants, int)  # a property of the SDK room, as it is


def test_a_job_room_has_its_name_before_connecting() -> None:
    assert Room(name="lobby").name == "lobby"
    with pytest.raises(RuntimeError, match="not connected yet"):
        Room().name
