"""The agent the soak runs (benchmarks/soak.py): one entrypoint, a job kind per dispatch.

The dispatch metadata is ``<kind>:<argument>``; every job appends ``{"event": "started",
"job_id", "pid", "t"}`` to $SOAK_EVENTS before it acts, so the soak knows each job process:

    normal:S      sleep S seconds, return                        → JS_SUCCESS
    long:S        the same with S > 15 (outlives an idle trio worker thread)
    grandchild:S  start a process that calls setsid() (leaves the job's process group),
                  record its pid, sleep S, return; the grandchild is left behind on purpose:
                  the supervisor must kill it                    → JS_SUCCESS
    raise:        raise an exception                             → JS_FAILED
    exit:C        os._exit(C)                                    → JS_FAILED
    segfault:     read address 0                                 → JS_FAILED (SIGSEGV)
    memory:MB     hold MB MiB (written, so resident), then sleep; job_memory_limit_mb is
                  below it                                       → JS_FAILED (killed)
    hang:         await forever (only a termination ends it)
    hang_sync:    block the event loop forever (only the escalation ends it)

Options come from the environment the soak sets: SOAK_HEALTH_PORT, SOAK_IDLE,
SOAK_MEMORY_LIMIT_MB, SOAK_DRAIN_TIMEOUT; every other option keeps its production default
(memory sampled every 5 s, shutdown steps of 10 s, ping timeout 60 s). The load threshold is disabled (load 0, threshold
inf) so that a busy 2-core machine refuses no job: the soak checks supervision, not admission.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
import time

import trio

from trio_agents import AgentServer, JobContext, cli

GRANDCHILD = "import os, time; os.setsid(); print('detached', flush=True); time.sleep(3600)"


def record(event: str, job_id: str, **more: object) -> None:
    line = json.dumps({"event": event, "job_id": job_id, "t": time.monotonic(),
                       "pid": os.getpid(), **more})
    with open(os.environ["SOAK_EVENTS"], "a") as out:
        out.write(line + "\n")


async def no_load() -> float:
    return 0.0


server = AgentServer(
    num_idle_processes=int(os.environ.get("SOAK_IDLE", "2")),
    port=int(os.environ.get("SOAK_HEALTH_PORT", "0")),
    job_memory_limit_mb=float(os.environ.get("SOAK_MEMORY_LIMIT_MB", "200")),
    drain_timeout=float(os.environ.get("SOAK_DRAIN_TIMEOUT", "15")),
    load_fnc=no_load,
    load_threshold=math.inf,
)


@server.rtc_session(agent_name="soak")
async def entrypoint(ctx: JobContext) -> None:
    kind, _, arg = ctx.job.metadata.partition(":")
    record("started", ctx.job.id, kind=kind)
    if kind in ("normal", "long"):
        await trio.sleep(float(arg))
    elif kind == "grandchild":
        child = subprocess.Popen([sys.executable, "-c", GRANDCHILD], stdout=subprocess.PIPE)
        assert child.stdout is not None
        await trio.to_thread.run_sync(child.stdout.readline)  # it has left our session
        record("grandchild", ctx.job.id, grandchild=child.pid)
        await trio.sleep(float(arg))
    elif kind == "raise":
        raise RuntimeError("soak: this job raises on purpose")
    elif kind == "exit":
        os._exit(int(arg))
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "memory":
        blob = b"\x01" * (int(arg) << 20)  # written: every page is resident
        await trio.sleep(60)
        del blob
    elif kind == "hang":
        await trio.sleep_forever()
    elif kind == "hang_sync":
        time.sleep(3600)
    else:
        raise ValueError(f"soak: unknown job kind {kind!r}")
    record("finished", ctx.job.id)


if __name__ == "__main__":
    cli.run_app(server)
