"""Prewarm: load something expensive once per job process, before any job arrives.

``setup_fnc`` runs in each new job process; what it stores in ``proc.userdata`` is there for
the job that process later runs (``num_idle_processes`` processes are kept warm in production).
"""

import logging
import time

from trio_agents import AgentServer, JobContext, JobProcess, cli

logger = logging.getLogger("prewarm-agent")


def setup(proc: JobProcess) -> None:
    started = time.monotonic()
    proc.userdata["vocabulary"] = {word: len(word) for word in ("hello", "trio", "agents")}
    proc.userdata["loaded_in"] = time.monotonic() - started


server = AgentServer(setup_fnc=setup)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    vocabulary = ctx.proc.userdata["vocabulary"]
    logger.info("job %s uses a prewarmed vocabulary of %d words (pid %d)",
                ctx.job.id, len(vocabulary), ctx.proc.pid)


if __name__ == "__main__":
    cli.run_app(server)
