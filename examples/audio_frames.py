"""The job-lifecycle page's first example, on trio: process the frames of every audio track,
say hello on a text stream, and list who is in the room.

    python examples/audio_frames.py dev     # or start, with LIVEKIT_URL, _API_KEY, _API_SECRET

From livekit-agents, what changed: imports, `asyncio.create_task(...)` became an async
callback (it runs as a task of the room, cancelled when the room is left), and
`rtc.AudioStream` became `trio_agents.room.AudioStream`. Needs the rtc extra.
"""

import logging

import numpy as np
from livekit import rtc

from trio_agents import AgentServer, AutoSubscribe, JobContext, cli
from trio_agents.room import AudioStream

logger = logging.getLogger("audio-frames")

server = AgentServer()


async def do_something(track: rtc.RemoteAudioTrack, identity: str) -> None:
    audio_stream = AudioStream(track)
    frames = 0
    async for event in audio_stream:
        # process event.frame: here, its level, logged once a second (100 frames of 10 ms)
        frames += 1
        if frames % 100 == 0:
            samples = np.frombuffer(event.frame.data, dtype=np.int16).astype(np.float64)
            level = 20 * np.log10(max(float(np.sqrt(np.mean(samples * samples))), 1.0) / 32768)
            logger.info("heard %d audio frames from %s, level %.1f dBFS", frames, identity, level)
    await audio_stream.aclose()


@server.rtc_session(agent_name="my-agent")
async def my_agent(ctx: JobContext) -> None:
    room = ctx.room

    # set up listeners on the room before connecting
    @room.on("track_subscribed")
    async def on_track_subscribed(track: rtc.Track, _: rtc.RemoteTrackPublication,
                                  participant: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            await do_something(track, participant.identity)  # type: ignore[arg-type]

    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    # when connected, room.local_participant represents the agent
    await room.local_participant.send_text("hello world", topic="hello-world")
    for rp in room.remote_participants.values():
        logger.info("in the room: %s", rp.identity)


if __name__ == "__main__":
    cli.run_app(server)
