"""Echo agent: subscribe to the room's audio and play it back into the room.

    python examples/echo.py dev     # or start, with LIVEKIT_URL, _API_KEY, _API_SECRET

Every subscribed audio track is read from trio (`ctx.room.audio_stream`) and its frames are
captured into one published track (`AudioSource`, which makes the reader wait while its
queue is full). Needs the rtc extra.
"""

import logging

import trio
from livekit import rtc

from trio_agents import AgentServer, AutoSubscribe, JobContext, cli
from trio_agents.room import AudioSource

logger = logging.getLogger("echo")

SAMPLE_RATE = 48000
NUM_CHANNELS = 1

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    publishing = trio.Event()
    source: AudioSource | None = None

    @ctx.room.on("track_subscribed")
    async def on_track_subscribed(track: rtc.Track, _: rtc.RemoteTrackPublication,
                                  participant: rtc.RemoteParticipant) -> None:
        if track.kind != rtc.TrackKind.KIND_AUDIO:
            return
        await publishing.wait()
        assert source is not None
        logger.info("echoing %s", participant.identity)
        async with ctx.room.audio_stream(track, sample_rate=SAMPLE_RATE,
                                         num_channels=NUM_CHANNELS) as stream:
            async for event in stream:
                await source.capture_frame(event.frame)

    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    source = AudioSource(SAMPLE_RATE, NUM_CHANNELS, queue_size_ms=100)
    track = rtc.LocalAudioTrack.create_audio_track("echo", source)
    await ctx.agent.publish_track(
        track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
    publishing.set()
    logger.info("publishing the echo in room %s", ctx.room.name)


if __name__ == "__main__":
    cli.run_app(server)
