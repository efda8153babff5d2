"""Agents that hear and see, end to end: the examples and a reporting agent run as real agent
servers against the real livekit-server, with test participants that publish a 440 Hz sine
and solid-colour video and listen to what comes back."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
from livekit import rtc
from livekit.protocol.agent_dispatch import CreateAgentDispatchRequest
from livekit.protocol.room import DeleteRoomRequest, ListRoomsRequest

from cli_helpers import CliProcess, run_cli
from media_helpers import (first_track, peak_hz, publishing_colour, publishing_sine,
                           rms, silence_frame, sine_frame)
from proc_helpers import watching_logs
from room_helpers import Backend, Peer, agent_server, join
from trio_agents.api import LiveKitAPI
from trio_agents.room import AudioSource

pytestmark = pytest.mark.slow
log = logging.getLogger("tests.media")


def env(backend: Backend) -> dict[str, str]:
    return {"LIVEKIT_URL": backend.url, "LIVEKIT_API_KEY": backend.api_key,
            "LIVEKIT_API_SECRET": backend.api_secret}


@asynccontextmanager
async def example_agent(backend: Backend, example: str) -> AsyncIterator[CliProcess]:
    """``python examples/<example> dev --no-reload`` against ``backend``, registered; on
    leaving, the rooms are deleted, their jobs end, and SIGTERM stops it: it must exit 0.

    ``dev``, as a developer runs an example: its load threshold is off, so the machine's own
    load (a native WebRTC client per participant, on 2 cores) cannot make it refuse the job.
    """
    async with run_cli([f"examples/{example}", "dev", "--no-reload"],
                       env=env(backend)) as agent_cli:
        await agent_cli.wait_for("registered worker")
        try:
            yield agent_cli
        except BaseException:
            print(f"--- {example}, last lines:", *agent_cli.lines[-40:], sep="\n")
            raise
        async with LiveKitAPI(backend.url, backend.api_key, backend.api_secret) as api:
            for room in (await api.room.list_rooms(ListRoomsRequest())).rooms:
                await api.room.delete_room(DeleteRoomRequest(room=room.name))
        jobs = len([line for line in agent_cli.lines if "assigned, launching it" in line])
        with trio.fail_after(20):  # each job process exits once the server ends its job
            await agent_cli.wait_for(r"job process \d+ exited", count=jobs)
        agent_cli.signal(signal.SIGTERM)
        assert await agent_cli.wait() == 0, "\n".join(agent_cli.lines[-30:])


async def dispatch(backend: Backend, room: str, agent_name: str, **metadata: str) -> None:
    async with LiveKitAPI(backend.url, backend.api_key, backend.api_secret) as api:
        await api.agent_dispatch.create_dispatch(CreateAgentDispatchRequest(
            room=room, agent_name=agent_name, metadata=json.dumps(metadata)))


async def test_echo_agent_plays_the_sine_back(livekit: Backend) -> None:
    async with example_agent(livekit, "echo.py") as agent_cli, \
            join(livekit, "echo-room", "singer") as singer:
        await agent_cli.wait_for("publishing the echo")
        room = singer.room
        source = AudioSource(48000, 1, room=room)
        track = rtc.LocalAudioTrack.create_audio_track("voice", source)
        await room.local_participant.publish_track(track, rtc.TrackPublishOptions(
            source=rtc.TrackSource.SOURCE_MICROPHONE))
        echo = await first_track(room, rtc.TrackKind.KIND_AUDIO)
        onset = trio.Event()
        sent_at: list[float] = []

        async def sing() -> None:
            index = 0
            while True:
                if onset.is_set():
                    if not sent_at:
                        sent_at.append(trio.current_time())
                    await source.capture_frame(sine_frame(440.0, index))
                else:
                    await source.capture_frame(silence_frame())
                index += 1

        heard: list[rtc.AudioFrame] = []
        async with trio.open_nursery() as nursery, room.audio_stream(echo) as stream:
            nursery.start_soon(sing)
            with trio.fail_after(20):
                async for event in stream:  # silence first: the echo is up once frames flow
                    if len(heard) == 0 and not onset.is_set():
                        onset.set()
                    if sent_at and rms(event.frame) > 1000:
                        heard.append(event.frame)
                        if len(heard) == 1:
                            log.warning("echo round trip: %.0f ms (onset sent → heard)",
                                        (trio.current_time() - sent_at[0]) * 1000)
                        if len(heard) >= 100:
                            break
            nursery.cancel_scope.cancel()
        await source.aclose()
        assert abs(peak_hz(heard[-80:]) - 440.0) < 5.0


async def test_seed_example_processes_frames_and_says_hello(livekit: Backend) -> None:
    async with example_agent(livekit, "audio_frames.py") as agent_cli, \
            join(livekit, "seed", "listener") as user:
        async with publishing_sine(user.room, 440.0):
            await dispatch(livekit, "seed", "my-agent")
            hello = await user.expect("hello world", timeout=20)
            assert hello.kind == "text:hello-world"
            with trio.fail_after(20):
                await agent_cli.wait_for(r"heard 100 audio frames from listener, level -\d")


async def test_video_agent_reports_the_colour_it_sees(livekit: Backend) -> None:
    async with example_agent(livekit, "video_colour.py"), \
            join(livekit, "studio", "camera") as user:
        async with publishing_colour(user.room, (200, 30, 60)):
            report = await user.expect(lambda m: m.kind == "data:colour", timeout=20)
        r, g, b = (int(v) for v in report.text.split(","))
        assert abs(r - 200) < 25 and abs(g - 30) < 25 and abs(b - 60) < 25, report


async def test_a_publication_starts_a_publisher_agent(livekit: Backend) -> None:
    async with example_agent(livekit, "publisher_agent.py") as agent_cli, \
            join(livekit, "stage", "performer") as user:
        async with publishing_sine(user.room, 440.0):
            greeting = await user.expect(lambda m: m.kind == "text:publisher", timeout=20)
        assert greeting.text == "hello performer, I see you publish"
        await agent_cli.wait_for("publisher performer publishes KIND_AUDIO")


async def started_reporter(backend: Backend, user: Peer, room: str, mode: str) -> None:
    await dispatch(backend, room, "media-agent", auto_subscribe=mode)
    await user.expect(f"ready:{room}", timeout=20)


def media_agent_server(backend: Backend) -> AbstractAsyncContextManager[object]:
    from agents import media_agent

    return agent_server(backend, entrypoint=media_agent.entrypoint, agent_name="media-agent")


async def test_mute_unmute_and_unpublish_reach_the_agent(livekit: Backend) -> None:
    async with media_agent_server(livekit), join(livekit, "mutes", "speaker") as user:
        await started_reporter(livekit, user, "mutes", "subscribe_all")
        async with publishing_sine(user.room, 440.0) as publication:
            await user.expect("track_published:KIND_AUDIO", timeout=10)
            await user.expect("track_subscribed:KIND_AUDIO", timeout=10)
            track = publication.track
            assert isinstance(track, rtc.LocalAudioTrack)
            track.mute()
            await user.expect("track_muted:KIND_AUDIO", timeout=10)
            track.unmute()
            await user.expect("track_unmuted:KIND_AUDIO", timeout=10)
            await user.room.local_participant.unpublish_track(publication.sid)
            await user.expect("track_unpublished:KIND_AUDIO", timeout=10)


@pytest.mark.parametrize(("mode", "subscribed"), [
    ("subscribe_all", {"KIND_AUDIO", "KIND_VIDEO"}),
    ("audio_only", {"KIND_AUDIO"}),
    ("video_only", {"KIND_VIDEO"}),
    ("subscribe_none", set()),
    ("manual", {"KIND_AUDIO"}),  # SUBSCRIBE_NONE, then the agent subscribes to audio by hand
])
async def test_auto_subscribe_modes(livekit: Backend, mode: str,
                                    subscribed: set[str]) -> None:
    async with media_agent_server(livekit), join(livekit, f"subs-{mode}", "both") as user:
        await started_reporter(livekit, user, f"subs-{mode}", mode)
        async with publishing_sine(user.room, 440.0), publishing_colour(user.room, (0, 0, 255)):
            for kind in ("KIND_AUDIO", "KIND_VIDEO"):
                await user.expect(f"track_published:{kind}", timeout=10)
            for kind in sorted(subscribed):
                await user.expect(f"track_subscribed:{kind}", timeout=10)
            # what must not come has had the time the others took, and a second more
            with trio.move_on_after(1.0):
                unexpected = await user.expect(lambda m: m.text.startswith("track_subscribed"))
                pytest.fail(f"{mode}: the agent also subscribed ({unexpected.text})")


async def test_an_audio_stream_cut_mid_frame_in_a_job_leaves_a_clean_exit(
        livekit: Backend) -> None:
    with watching_logs() as logs:
        async with media_agent_server(livekit), join(livekit, "cut", "speaker") as user:
            await dispatch(livekit, "cut", "media-agent", auto_subscribe="audio_only",
                           cut_stream="yes")
            await user.expect("ready:cut", timeout=20)
            async with publishing_sine(user.room, 440.0):
                closed = await user.expect_prefix("cut:", timeout=20)
                left_open = await user.expect_prefix("cut:", timeout=20)
            assert closed.endswith(":closed") and int(closed.split(":")[0]) > 0
            assert left_open.endswith(":left open") and int(left_open.split(":")[0]) > 0
            # the job ends (ctx.shutdown) and its process exits 0: no native panic, no
            # SIGTERM from the SDK, although one stream was left open
            with trio.fail_after(20):
                await logs.wait_for("exited (exit code 0)")
        assert not logs.matching("panic") and not logs.matching("SIGTERM")


async def test_the_readme_way_echo_agent_and_tone_participant(livekit: Backend) -> None:
    """As the README says: the echo agent in one terminal, the tone participant in another."""
    async with example_agent(livekit, "echo.py"), \
            run_cli(["examples/tone_participant.py", "readme-echo"], env=env(livekit)) as singer:
        with trio.fail_after(40):
            line = await singer.wait_for(r"echo 5: \d+ Hz")
        assert await singer.wait() == 0
        echoes = [found for found in singer.lines if found.startswith("echo ")]
        assert all(abs(int(found.split(": ")[1].split(" Hz")[0]) - 440) <= 10
                   for found in echoes), echoes
        assert line
