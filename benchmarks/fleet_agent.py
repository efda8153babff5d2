"""The agent of the fleet benchmark (benchmarks/fleet.py): ``python fleet_agent.py start``.

Each job appends "started"/"finished" JSON lines (``time.monotonic()``, system-wide on Linux,
the agent server's name from ``$FLEET_NAME``) to ``$FLEET_EVENTS``, sleeps for the seconds its
dispatch metadata says, and ends. The load it reports is its running jobs over
``$FLEET_CAPACITY``, so LiveKit's load-weighted choice sees how busy each server is.
"""

import json
import os
import time

import trio

from trio_agents import AgentServer, JobContext, cli

NAME = os.environ.get("FLEET_NAME", "agent")
CAPACITY = float(os.environ.get("FLEET_CAPACITY", "100"))


def record(event: str, ctx: JobContext) -> None:
    line = json.dumps({"event": event, "job_id": ctx.job.id, "room": ctx.job.room.name,
                       "agent": NAME, "worker_id": ctx.worker_id, "t": time.monotonic()})
    with open(os.environ["FLEET_EVENTS"], "a") as out:
        out.write(line + "\n")


def load(server: AgentServer) -> float:
    return min(1.0, len(server.active_jobs) / CAPACITY)


server = AgentServer(port=int(os.environ.get("FLEET_HEALTH_PORT", "0")), load_fnc=load,
                     num_idle_processes=int(os.environ.get("FLEET_IDLE", "2")))


@server.rtc_session(agent_name="fleet")
async def entrypoint(ctx: JobContext) -> None:
    record("started", ctx)
    await trio.sleep(float(ctx.job.metadata or "0"))
    record("finished", ctx)


if __name__ == "__main__":
    cli.run_app(server)
