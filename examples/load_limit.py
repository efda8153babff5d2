"""Report your own load: here, at most MAX_JOBS concurrent jobs per agent server.

The load is a number from 0 to 1; at or above ``load_threshold`` the server tells LiveKit it is
full and refuses offers, so LiveKit sends jobs to other servers.
"""

import logging

import trio

from trio_agents import AgentServer, JobContext, cli

logger = logging.getLogger("limited-agent")
MAX_JOBS = 2


def load(server: AgentServer) -> float:
    return len(server.active_jobs) / MAX_JOBS


server = AgentServer(load_fnc=load, load_threshold=1.0)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    logger.info("job %s started", ctx.job.id)
    await trio.sleep(float(ctx.job.metadata or 1))


if __name__ == "__main__":
    cli.run_app(server)
