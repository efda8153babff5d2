"""Decide on each job offer: accept jobs whose dispatch metadata asks for us, reject the rest.

A rejected job is offered to the next agent server. Dispatch one with metadata, e.g.
``lk dispatch create --agent-name triage --room r1 --metadata '{"lang": "en"}'``.
"""

import json
import logging

from trio_agents import AgentServer, JobContext, JobRequest, cli

logger = logging.getLogger("triage-agent")

server = AgentServer()
SUPPORTED = {"en", "fr"}


async def on_request(req: JobRequest) -> None:
    try:
        lang = json.loads(req.job.metadata or "{}").get("lang", "en")
    except json.JSONDecodeError:
        lang = "?"
    if lang in SUPPORTED:
        await req.accept(name=f"Triage ({lang})", identity=f"triage-{req.id}",
                         attributes={"lang": lang})
    else:
        await req.reject()


@server.rtc_session(agent_name="triage", on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    logger.info("triaging room %r with metadata %r", ctx.job.room.name, ctx.job.metadata)


if __name__ == "__main__":
    cli.run_app(server)
