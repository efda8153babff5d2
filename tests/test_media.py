"""Audio and video from trio, end to end: participants and agents publish and receive real
tracks through ``trio_agents.room`` (the realtime SDK under trio), on the real livekit-server."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import pytest
import trio
from livekit import rtc
from livekit.protocol.room import MuteRoomTrackRequest, UpdateSubscriptionsRequest

from media_helpers import first_track, mean_rgb, participant_token, peak_hz, publishing_colour, publishing_sine
from room_helpers import Backend
from livekit_server import open_livekit_server
from trio_agents.api import LiveKitAPI, TwirpError
from trio_agents.devserver import open_dev_server
from trio_agents.room import AudioStream, Room, open_room

pytestmark = pytest.mark.slow


@pytest.fixture(params=["devserver", pytest.param("livekit-server", marks=pytest.mark.realserver)])
async def remote_unmute(request: pytest.FixtureRequest, rtc_address: str
                        ) -> AsyncIterator[Backend]:
    """Both servers, configured to let ``MutePublishedTrack`` unmute."""
    server: AbstractAsyncContextManager[Backend] = (
        open_dev_server(port=0, rtc_address=rtc_address, enable_remote_unmute=True)
        if request.param == "devserver" else
        open_livekit_server(rtc_address, config="room:\n  enable_remote_unmute: true\n"))
    async with server as backend:
        yield backend


def token(server: Backend, room: str, identity: str) -> str:
    return participant_token(server.api_key, server.api_secret, room, identity)


def twirp(server: Backend) -> LiveKitAPI:
    return LiveKitAPI(server.url, server.api_key, server.api_secret)


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


async def test_a_track_muted_over_twirp_is_seen_muted_by_everyone(livekit: Backend) -> None:
    async with open_room(livekit.url, token(livekit, "hush", "speaker")) as speaker, \
            open_room(livekit.url, token(livekit, "hush", "listener")) as listener, \
            publishing_sine(speaker, 440.0) as publication, twirp(livekit) as api:
        await first_track(listener, rtc.TrackKind.KIND_AUDIO)
        remote = listener.remote_participants["speaker"].track_publications[publication.sid]
        with listener.events("track_muted") as heard, speaker.events("track_muted") as own:
            answer = await api.room.mute_published_track(MuteRoomTrackRequest(
                room="hush", identity="speaker", track_sid=publication.sid, muted=True))
            assert (answer.track.sid, answer.track.muted) == (publication.sid, True)
            with trio.fail_after(10):
                assert (await heard.receive()).args[1].sid == publication.sid
                assert (await own.receive()).args[1].sid == publication.sid
        assert remote.muted and publication.muted
        # by default a track muted remotely cannot be unmuted remotely
        with pytest.raises(TwirpError) as refused:
            await api.room.mute_published_track(MuteRoomTrackRequest(
                room="hush", identity="speaker", track_sid=publication.sid, muted=False))
        assert (refused.value.code, refused.value.status) == ("failed_precondition", 412)
        # an unknown track is no error (no track in the answer); a participant not there is
        # answered by no server
        unknown = await api.room.mute_published_track(MuteRoomTrackRequest(
            room="hush", identity="speaker", track_sid="TR_unknown", muted=True))
        assert not unknown.HasField("track")
        with pytest.raises(TwirpError) as nobody:
            await api.room.mute_published_track(MuteRoomTrackRequest(
                room="hush", identity="nobody", track_sid=publication.sid, muted=True))
        assert (nobody.value.code, nobody.value.status) == ("unavailable", 503)
        assert remote.muted and publication.muted


async def test_remote_unmute_when_the_server_allows_it(remote_unmute: Backend) -> None:
    """The speaker mutes itself; the server unmutes it (the speaker's SDK follows).

    Not a remote mute first: the speaker's SDK answers one with its own mute request, which
    may reach the server after the unmute and mute the track again (on both servers)."""
    server = remote_unmute
    async with open_room(server.url, token(server, "again", "speaker")) as speaker, \
            open_room(server.url, token(server, "again", "listener")) as listener, \
            publishing_sine(speaker, 440.0) as publication, twirp(server) as api:
        await first_track(listener, rtc.TrackKind.KIND_AUDIO)
        remote = listener.remote_participants["speaker"].track_publications[publication.sid]
        assert publication.track is not None
        with listener.events("track_muted") as heard:
            publication.track.mute()
            with trio.fail_after(10):
                assert (await heard.receive()).args[1].sid == publication.sid
        with listener.events("track_unmuted") as heard, speaker.events("track_unmuted") as own:
            answer = await api.room.mute_published_track(MuteRoomTrackRequest(
                room="again", identity="speaker", track_sid=publication.sid, muted=False))
            assert (answer.track.sid, answer.track.muted) == (publication.sid, False)
            with trio.fail_after(10):
                assert (await heard.receive()).args[1].sid == publication.sid
                assert (await own.receive()).args[1].sid == publication.sid
        assert not remote.muted and not publication.muted


async def _quiet(stream: AudioStream, gap: float = 0.3) -> None:
    """Return once no frame has come for ``gap`` seconds (what was in flight is drained)."""
    while True:
        with trio.move_on_after(gap) as idle:
            await stream.__anext__()
        if idle.cancelled_caught:
            return


async def test_update_subscriptions_over_twirp(livekit: Backend) -> None:
    """A participant that does not auto-subscribe is subscribed over Twirp, then
    unsubscribed (its audio stops while another's goes on), then subscribed again (the same
    track resumes: neither server nor SDK makes a new one)."""
    async with open_room(livekit.url, token(livekit, "subs", "speaker")) as speaker, \
            open_room(livekit.url, token(livekit, "subs", "picky"),
                      auto_subscribe=False) as picky, \
            open_room(livekit.url, token(livekit, "subs", "keen")) as keen, \
            publishing_sine(speaker, 440.0) as publication, twirp(livekit) as api:
        keen_track = await first_track(keen, rtc.TrackKind.KIND_AUDIO)

        async def subscribe(subscribe: bool) -> None:
            await api.room.update_subscriptions(UpdateSubscriptionsRequest(
                room="subs", identity="picky", track_sids=[publication.sid],
                subscribe=subscribe))

        with picky.events("track_subscribed") as subscribed:
            await subscribe(True)
            with trio.fail_after(15):
                track = (await subscribed.receive()).args[0]
        assert track.sid == publication.sid
        async with picky.audio_stream(track) as heard, keen.audio_stream(keen_track) as control:
            with trio.fail_after(10):
                await heard.__anext__()
            await subscribe(False)
            with trio.fail_after(10):
                await _quiet(heard)
            late = 0

            async def count() -> None:
                nonlocal late
                async for _ in heard:
                    late += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(count)
                with trio.fail_after(10):
                    for _ in range(100):  # 1 s of audio for the one still subscribed
                        await control.__anext__()
                nursery.cancel_scope.cancel()
            assert late == 0
            await subscribe(True)
            with trio.fail_after(10):
                await heard.__anext__()
        with pytest.raises(TwirpError) as nobody:
            await api.room.update_subscriptions(UpdateSubscriptionsRequest(
                room="subs", identity="nobody", track_sids=[publication.sid], subscribe=True))
        assert nobody.value.code == "unavailable"
