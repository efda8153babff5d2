"""A video agent: report the mean colour of every video track it sees, as data.

    python examples/video_colour.py dev     # or start, with LIVEKIT_URL, _API_KEY, _API_SECRET

Twice a second it sends `r,g,b` (topic `colour`) to the participant whose camera it watches.
Needs the rtc extra.
"""

import logging

import numpy as np
import trio
from livekit import rtc

from trio_agents import AgentServer, AutoSubscribe, JobContext, cli

logger = logging.getLogger("video-colour")

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    @ctx.room.on("track_subscribed")
    async def on_track_subscribed(track: rtc.Track, _: rtc.RemoteTrackPublication,
                                  participant: rtc.RemoteParticipant) -> None:
        if track.kind != rtc.TrackKind.KIND_VIDEO:
            return
        next_report = trio.current_time()
        async with ctx.room.video_stream(track, format=rtc.VideoBufferType.RGBA) as stream:
            async for event in stream:
                if trio.current_time() < next_report:
                    continue
                next_report = trio.current_time() + 0.5
                frame = event.frame
                pixels = np.frombuffer(frame.data, dtype=np.uint8).reshape(
                    frame.height, frame.width, 4)
                r, g, b = (round(float(pixels[..., c].mean())) for c in range(3))
                logger.info("%s's camera: mean colour %d,%d,%d", participant.identity, r, g, b)
                await ctx.agent.publish_data(f"{r},{g},{b}", topic="colour",
                                             destination_identities=[participant.identity])

    await ctx.connect(auto_subscribe=AutoSubscribe.VIDEO_ONLY)


if __name__ == "__main__":
    cli.run_app(server)
