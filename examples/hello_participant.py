"""A programmatic participant: join the room, say hello on a text stream, and stay.

    python examples/hello_participant.py dev     # against the embedded dev server
    python examples/hello_participant.py start   # LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET

Needs the rtc extra: pip install 'trio-agents[rtc]'. Once connected, the job stays in the
room after the entrypoint returns, until the room closes or the server ends it.
"""

import logging

from livekit import rtc

from trio_agents import AgentServer, AutoSubscribe, JobContext, cli

logger = logging.getLogger("hello-participant")

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    room = ctx.room

    # listeners first, then connect: nothing is missed
    @room.on("participant_connected")
    def on_participant_connected(participant: rtc.RemoteParticipant) -> None:
        logger.info("%s joined", participant.identity)

    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    # when connected, room.local_participant is the agent
    await room.local_participant.send_text("hello world", topic="hello-world")
    logger.info("said hello in room %r as %s; %d others here", room.name,
                room.local_participant.identity, len(room.remote_participants))


if __name__ == "__main__":
    cli.run_app(server)
