"""The benchmark agent, livekit-agents side (run with benchmarks/.venv-peer). See ours_agent.py."""

import asyncio
import json
import math
import os
import time

from livekit.agents import AgentServer, JobContext, cli


def record(event: str, job_id: str) -> None:
    line = json.dumps({"event": event, "job_id": job_id, "t": time.monotonic(),
                       "pid": os.getpid()})
    with open(os.environ["BENCH_EVENTS"], "a") as out:
        out.write(line + "\n")


def no_load(*_: object) -> float:
    return 0.0


server = AgentServer(
    num_idle_processes=int(os.environ.get("BENCH_IDLE", "2")),
    port=0,
    **({"load_fnc": no_load, "load_threshold": math.inf}
       if os.environ.get("BENCH_NO_LOAD") else {}),
)


@server.rtc_session(agent_name="bench")
async def entrypoint(ctx: JobContext) -> None:
    record("started", ctx.job.id)
    action, _, arg = ctx.job.metadata.partition(":")
    if action == "sleep":
        await asyncio.sleep(float(arg))
    elif action == "connect":
        await ctx.connect()
        record("connected", ctx.job.id)
        await asyncio.sleep(float(arg))
    record("finished", ctx.job.id)
    ctx.shutdown("done")  # in livekit-agents returning does not end the job


if __name__ == "__main__":
    cli.run_app(server)
