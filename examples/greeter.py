"""Greet everyone in the room with a participant entrypoint: it runs for each participant
already there when the agent joins and for each one who joins later.

    python examples/greeter.py dev

Needs the rtc extra: pip install 'trio-agents[rtc]'.
"""

import logging

import trio
from livekit import rtc

from trio_agents import AgentServer, JobContext, ParticipantKind, cli

logger = logging.getLogger("greeter")

server = AgentServer()


async def greet(ctx: JobContext, participant: rtc.RemoteParticipant) -> None:
    name = participant.name or participant.identity
    await ctx.agent.send_text(f"Hello, {name}!", topic="greeting",
                              destination_identities=[participant.identity])
    logger.info("greeted %s", participant.identity)


async def greet_callers(ctx: JobContext, participant: rtc.RemoteParticipant) -> None:
    # only for phone participants (kind=SIP); runs as long as the call needs it
    await ctx.agent.send_text("Thanks for calling.", topic="greeting",
                              destination_identities=[participant.identity])
    await trio.sleep_forever()  # cancelled when the agent leaves the room


@server.rtc_session(agent_name="greeter")
async def entrypoint(ctx: JobContext) -> None:
    # register before connecting, so that participants already in the room are greeted too
    ctx.add_participant_entrypoint(greet)
    ctx.add_participant_entrypoint(greet_callers, kind=ParticipantKind.SIP)
    await ctx.connect()


if __name__ == "__main__":
    cli.run_app(server)
