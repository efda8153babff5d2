"""The media benchmark's livekit-agents echo agent (run with benchmarks/.venv-peer); its twin
is examples/echo.py (trio_agents). Both take every job (no load limit) and keep 2 idle
processes."""

import asyncio
import math

from livekit import rtc
from livekit.agents import AgentServer, AutoSubscribe, JobContext, cli

server = AgentServer(num_idle_processes=2, load_fnc=lambda *_: 0.0, load_threshold=math.inf,
                     port=0)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    source = rtc.AudioSource(48000, 1, queue_size_ms=100)
    tasks: set[asyncio.Task[None]] = set()

    async def echo(track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1)
        async for event in stream:
            await source.capture_frame(event.frame)

    @ctx.room.on("track_subscribed")
    def subscribed(track: rtc.Track, *_: object) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            task = asyncio.ensure_future(echo(track))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    track = rtc.LocalAudioTrack.create_audio_track("echo", source)
    await ctx.room.local_participant.publish_track(
        track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))


if __name__ == "__main__":
    cli.run_app(server)
