"""One entrypoint whose behaviour is chosen by the job's metadata (``action`` or ``action:arg``).

The test sees what happened through the job's outcome and the log records the job process
ships back (logger ``agents.scripted``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import time

import trio

from trio_agents import JobContext, JobProcess

log = logging.getLogger("agents.scripted")


def setup(proc: JobProcess) -> None:
    proc.userdata["warmed_by"] = os.getpid()


class _Recorder:
    def __init__(self, name: str) -> None:
        self.name = name

    async def bound(self, reason: str) -> None:
        log.info("callback %s ran: %s", self.name, reason)


async def _partial_cb(tag: str) -> None:
    log.info("callback %s ran", tag)


async def _failing_cb() -> None:
    raise RuntimeError("callback boom")


class JoinedRoom:
    """Stands in for the job's room once joined (there is no LiveKit room in these tests):
    ``ctx.is_connected()`` is true until the job leaves it, which it logs."""

    def __init__(self) -> None:
        self.left = False

    def isconnected(self) -> bool:
        return not self.left

    async def disconnect(self) -> None:
        self.left = True
        log.info("left the room")


async def _exit3_cb() -> None:
    os._exit(3)


async def entrypoint(ctx: JobContext) -> None:
    action, _, arg = ctx.job.metadata.partition(":")
    ctx.log_context_fields = {"scripted": action}
    log.info("started %s", action, extra={"userdata": ctx.proc.userdata.get("warmed_by"),
                                          "pid_seen": os.getpid()})
    if action in ("ok", ""):  # no metadata: a plain job that just finishes
        return
    if action.startswith("joined"):  # in the room from here on: the job ends with JobEnding
        ctx._room = JoinedRoom()  # type: ignore[assignment]
        action = action.removeprefix("joined").removeprefix("_")
        if action == "":
            ctx.shutdown("done in the room")
        elif action == "exit3":  # the status is reported; then the process dies
            ctx.add_shutdown_callback(_exit3_cb)
            ctx.shutdown("done in the room")
        elif action == "raise":
            raise ValueError("scripted failure in the room")
        elif action != "stay":  # stay: until the server ends the job
            raise LookupError(f"unknown scripted action joined_{action}")
        await trio.sleep_forever()
    if action == "sleep":
        await trio.sleep(float(arg))
    elif action == "exit3":
        os._exit(3)
    elif action == "raise":
        raise ValueError("scripted failure")
    elif action == "segv":
        ctypes.string_at(0)
    elif action == "block":
        time.sleep(3600)  # blocks the thread and so the event loop
    elif action == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    elif action == "grandchildren":
        code = "import time; time.sleep(3600)"
        setsid = "import os, time; os.setsid(); time.sleep(3600)"
        a = subprocess.Popen([sys.executable, "-c", code])
        b = subprocess.Popen([sys.executable, "-c", setsid])
        log.info("spawned grandchildren %d %d", a.pid, b.pid, extra={"grandchildren": f"{a.pid},{b.pid}"})
        await trio.sleep(float(arg or 3600))
    elif action == "memory":
        blob = bytearray(int(arg) * 2**20)  # touched: bytearray zero-fills
        log.info("holding %d MB", len(blob) // 2**20)
        await trio.sleep(3600)
    elif action == "shutdown":
        ctx.shutdown("done by the job")
        await trio.sleep(3600)
    elif action == "callbacks":
        recorder = _Recorder("bound")
        ctx.add_shutdown_callback(recorder.bound)
        ctx.add_shutdown_callback(functools.partial(_partial_cb, "partial"))
        ctx.add_shutdown_callback(_failing_cb)

        async def plain() -> None:
            log.info("callback plain ran")

        async def with_reason(reason: str) -> None:
            log.info("callback with_reason ran: %s", reason)

        ctx.add_shutdown_callback(plain)
        ctx.add_shutdown_callback(with_reason)
        ctx.shutdown("callbacks test")
        await trio.sleep(3600)
    elif action == "garbage":
        # Write an oversized frame header straight onto the IPC socket (fd found via argv).
        fd = int(sys.argv[1])
        os.write(fd, b"\xff\xff\xff\xff")
        await trio.sleep(3600)
    else:
        raise LookupError(f"unknown scripted action {action!r}")


def ending_setup(proc: JobProcess) -> None:
    """A broken job process: announces the end of a job it never had (a JobEnding frame
    written straight onto the IPC socket, fd from argv, before the InitializeResponse)."""
    from trio_agents import _ipc

    frame = _ipc.encode_frame(_ipc.encode(_ipc.JobEnding(outcome=_ipc.SUCCESS)))
    os.write(int(sys.argv[1]), frame)


def failing_setup(proc: JobProcess) -> None:
    raise RuntimeError("setup is broken")


def slow_setup(proc: JobProcess) -> None:
    time.sleep(3600)
