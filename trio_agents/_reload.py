"""Hot reload for ``dev``: this process watches the agent's files (and hosts the embedded dev
server, so LiveKit state survives reloads); the agent server runs in a child process that is
restarted when a Python file changes.

A reload drains the old server for a few seconds, then asks it to stop its jobs (a second,
different signal), then kills it; its job processes die with it (each watches its server's
lifeline), so nothing is orphaned. Jobs are not carried over: the new server takes new ones.

The child is started through ``_spawn`` (``_lifeline.py <fd> agent.py dev --no-reload``): it
watches this process's lifeline from its first instruction and exits when this process ends,
however it ends. It shares our process group (Ctrl-C in the terminal reaches it too), so its
lifeline kills only itself; what it started watches its own lifeline in turn.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
import watchfiles

from ._server import AgentServer
from ._spawn import Spawned, spawn

if TYPE_CHECKING:
    from .devserver import DevServer

logger = logging.getLogger("trio_agents")

RELOAD_DRAIN: Final = 3.0
STOP_GRACE: Final = 15.0


async def _stop(process: Spawned) -> None:
    """Drain briefly, then stop the jobs, then kill; every step bounded."""
    for signum, budget in ((signal.SIGTERM, RELOAD_DRAIN), (signal.SIGINT, STOP_GRACE)):
        if process.returncode is not None:
            return
        process.send_signal(signum)
        with trio.move_on_after(budget):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


async def _watch(paths: Sequence[str], changed: trio.MemorySendChannel[set[str]],
                 stop: trio.Event) -> None:
    # watchfiles waits in a thread that cannot be cancelled: it returns when ``stop`` is set,
    # so the owner sets ``stop`` before cancelling this task
    async for changes in watchfiles.awatch(
        *paths, watch_filter=watchfiles.PythonFilter(), stop_event=stop, debounce=300,
    ):
        await changed.send({path for _, path in changes})


async def run_with_reload(server: AgentServer, script: str, embedded: bool) -> int:
    """Run ``script dev --no-reload`` as a child and restart it whenever a file changes."""
    from ._cli import log_embedded

    root = str(Path(script).resolve().parent)
    base = [script, *sys.argv[1:], "--no-reload"]
    async with trio.open_nursery() as nursery:
        extra: list[str] = []
        dev: DevServer | None = None
        if embedded:
            dev = await nursery.start(_embedded)
            extra = ["--url", dev.url, "--api-key", dev.api_key, "--api-secret", dev.api_secret]
            log_embedded(dev)
        send_changes, changes = trio.open_memory_channel[set[str]](0)
        stop_watching = trio.Event()
        nursery.start_soon(_watch, [root], send_changes, stop_watching)
        stopping = False
        code = 0
        first = True
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            while True:
                process = await spawn([*base, *extra], what="the agent server",
                                      new_session=False)
                logger.info("started the agent server (pid %d); watching %s", process.pid, root)
                if first and dev is not None:
                    nursery.start_soon(_demo, dev, server.options.agent_name)
                    first = False
                reload = False
                async with trio.open_nursery() as waiter:

                    async def on_change() -> None:
                        nonlocal reload
                        paths = await changes.receive()
                        logger.info("%s changed: reloading", ", ".join(sorted(paths)))
                        reload = True
                        await _stop(process)

                    async def on_signal() -> None:
                        nonlocal stopping
                        async for signum in signals:
                            stopping = True
                            if process.returncode is None:
                                process.send_signal(signum)

                    async def on_exit() -> None:
                        await process.wait()
                        waiter.cancel_scope.cancel()

                    waiter.start_soon(on_change)
                    waiter.start_soon(on_signal)
                    waiter.start_soon(on_exit)
                code = process.returncode or 0
                if stopping or not reload:
                    break
        stop_watching.set()
        nursery.cancel_scope.cancel()
    return code


async def _embedded(*, task_status: trio.TaskStatus[DevServer]) -> None:
    from .devserver import open_dev_server

    async with open_dev_server(host="127.0.0.1", port=0) as dev:
        task_status.started(dev)
        await trio.sleep_forever()


async def _demo(dev: DevServer, agent_name: str) -> None:
    """Once the first server registered, dispatch one demo job."""
    from ._cli import dispatch_demo

    await dev.wait_until(lambda: len(dev.workers) > 0)
    await dispatch_demo(dev, agent_name or os.environ.get("LIVEKIT_AGENT_NAME", ""))
