"""An agent that reports what it sees of the room's tracks, for tests/test_media_agents.py.

The dispatch metadata (JSON) names the subscription mode (``auto_subscribe``: an
``AutoSubscribe`` value, or ``manual``: subscribe to nothing, then to audio by hand). Every
track event is told to the test participant as ``<event>:<kind>`` on the ``track-events``
text topic."""

from __future__ import annotations

import json

import trio
from livekit import rtc

from trio_agents import AutoSubscribe, JobContext

EVENTS = ("track_published", "track_subscribed", "track_unsubscribed", "track_muted",
          "track_unmuted", "track_unpublished")


async def entrypoint(ctx: JobContext) -> None:
    params = json.loads(ctx.job.metadata or "{}")
    mode = params.get("auto_subscribe", "subscribe_all")
    room = ctx.room

    def reporter(event: str) -> None:
        async def report(*args: object) -> None:
            publication = next(a for a in args if isinstance(a, rtc.TrackPublication))
            kind = rtc.TrackKind.Name(publication.kind)
            if event == "track_published" and mode == "manual" and \
                    publication.kind == rtc.TrackKind.KIND_AUDIO:
                assert isinstance(publication, rtc.RemoteTrackPublication)
                publication.set_subscribed(True)
            await ctx.agent.send_text(f"{event}:{kind}", topic="track-events")

        room.on(event, report)

    for event in EVENTS:
        reporter(event)
    if params.get("cut_stream"):
        @room.on("track_subscribed")
        async def cut(track: rtc.Track, *_: object) -> None:
            await cut_stream_mid_frame(ctx, track)

    await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE if mode == "manual"
                      else AutoSubscribe(mode))
    await ctx.agent.send_text(f"ready:{room.name}", topic="track-events")


async def cut_stream_mid_frame(ctx: JobContext, track: rtc.Track) -> None:
    """Iterate an audio stream, cancel the iteration while it waits for a frame (twice: once
    left open for the job's end to close, once closed here), then end the job."""
    for close in (True, False):
        stream = ctx.room.audio_stream(track)
        frames = 0
        with trio.move_on_after(0.3):
            async for _ in stream:
                frames += 1
        if close:
            await stream.aclose()
        await ctx.agent.send_text(f"cut:{frames}:{'closed' if close else 'left open'}",
                                  topic="track-events")
    ctx.shutdown("cut the stream")
