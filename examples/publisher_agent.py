"""A PUBLISHER agent: LiveKit starts one job per participant that publishes a track.

    python examples/publisher_agent.py dev     # or start, with LIVEKIT_URL, _API_KEY, _API_SECRET

The job knows its publisher (`ctx.publisher`), greets it by text stream, and reports each
track it publishes. Needs the rtc extra.
"""

import logging

from livekit import rtc

from trio_agents import AgentServer, AutoSubscribe, JobContext, ServerType, cli

logger = logging.getLogger("publisher-agent")

server = AgentServer()


@server.rtc_session(type=ServerType.PUBLISHER)
async def entrypoint(ctx: JobContext) -> None:
    publisher = ctx.publisher
    assert publisher is not None  # a PUBLISHER job always names its publisher
    await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)
    participant = await ctx.wait_for_participant(identity=publisher.identity)
    kinds = sorted(rtc.TrackKind.Name(p.kind) for p in participant.track_publications.values())
    logger.info("publisher %s publishes %s", participant.identity, ", ".join(kinds))
    await ctx.agent.send_text(f"hello {participant.identity}, I see you publish",
                              topic="publisher", destination_identities=[participant.identity])


if __name__ == "__main__":
    cli.run_app(server)
