"""An agent that reports what it sees of the room's tracks, for tests/test_media_agents.py.

The dispatch metadata (JSON) names the subscription mode (``auto_subscribe``: an
``AutoSubscribe`` value, or ``manual``: subscribe to nothing, then to audio by hand). Every
track event is told to the test participant as ``<event>:<kind>`` on the ``track-events``
text topic."""

from __future__ import annotations

import json

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
    await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE if mode == "manual"
                      else AutoSubscribe(mode))
    await ctx.agent.send_text(f"ready:{room.name}", topic="track-events")
