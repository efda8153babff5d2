"""The smallest agent: log the job it was given and finish.

    python examples/minimal.py dev      # no LiveKit needed: an embedded dev server dispatches a demo job
    python examples/minimal.py start    # production: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET
"""

import logging

from trio_agents import AgentServer, JobContext, cli

logger = logging.getLogger("minimal-agent")

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    logger.info("hello from job %s in room %r", ctx.job.id, ctx.job.room.name)


if __name__ == "__main__":
    cli.run_app(server)
