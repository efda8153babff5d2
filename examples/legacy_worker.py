"""The legacy livekit-agents form: ``WorkerOptions`` + ``cli.run_app`` (or ``Worker``)."""

import logging

from trio_agents import JobContext, JobProcess, JobRequest, WorkerOptions, WorkerType, cli

logger = logging.getLogger("legacy-agent")


def prewarm(proc: JobProcess) -> None:
    proc.userdata["greeting"] = "hello"


async def request_fnc(req: JobRequest) -> None:
    await req.accept(name="legacy agent")


async def entrypoint(ctx: JobContext) -> None:
    logger.info("%s from the legacy worker, job %s", ctx.proc.userdata["greeting"], ctx.job.id)


opts = WorkerOptions(
    entrypoint_fnc=entrypoint,
    request_fnc=request_fnc,
    prewarm_fnc=prewarm,
    worker_type=WorkerType.ROOM,
)

if __name__ == "__main__":
    cli.run_app(opts)
