"""The benchmark agent, trio_agents side. Its twin is peer_agent.py (livekit-agents).

Both do the same: report "started" (and "finished") with time.monotonic(), which is
system-wide on Linux, as a JSON line appended to $BENCH_EVENTS; then sleep if the dispatch
metadata says "sleep:<seconds>"; then end the job. Only with "connect:<seconds>" do they
join the room (and report "connected"), then stay for that long.
"""

import json
import math
import os
import time

import trio

from trio_agents import AgentServer, JobContext, cli

if os.environ.get("BENCH_ROOM"):
    # an agent that joins rooms imports the realtime SDK at the top, as the examples do
    # (the zygote then shares it with every job process)
    from livekit import rtc  # noqa: F401


def record(event: str, job_id: str) -> None:
    line = json.dumps({"event": event, "job_id": job_id, "t": time.monotonic(),
                       "pid": os.getpid()})
    with open(os.environ["BENCH_EVENTS"], "a") as out:
        out.write(line + "\n")


async def no_load() -> float:
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
        await trio.sleep(float(arg))
    elif action == "connect":
        await ctx.connect()
        record("connected", ctx.job.id)
        await trio.sleep(float(arg))
    record("finished", ctx.job.id)
    ctx.shutdown("done")


if __name__ == "__main__":
    cli.run_app(server)
