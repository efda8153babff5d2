"""Hot reload for ``dev``: this process watches the agent's files (and hosts the embedded dev
server, so LiveKit state survives reloads); the agent server runs in a child process that is
restarted when a Python file changes.

A reload stops the old server (SIGTERM: a ``dev`` server stops at once, its jobs through the
shutdown escalation), and kills it if it outlives that escalation; its job processes die with
it (they are bound to their parent), so nothing is orphaned. Jobs are not carried over: the
new server takes new ones. A server that dies by itself (a syntax or import error saved
mid-edit) is started again at the next change; the watcher, and the embedded dev server with
its rooms, live in this process and never stop for it.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
import watchfiles

from ._server import AgentServer

if TYPE_CHECKING:
    from .devserver import DevServer

logger = logging.getLogger("trio_agents")

#: What a stop may take beyond the job processes' own shutdown escalation before SIGKILL.
STOP_MARGIN: Final = 5.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def _stop(process: trio.Process, budget: float) -> None:
    """SIGTERM (a ``dev`` server stops at once, its jobs through the shutdown escalation),
    then SIGKILL if it is still there after ``budget``."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(budget):
            await process.wait()
    if process.returncode is None:
        logger.warning("the agent server (pid %d) did not stop within %.0f s: killing it",
                       process.pid, budget)
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


class _Outcome(enum.Enum):
    RELOAD = "a file changed"
    STOP = "asked to stop"
    EXITED = "exited by itself"


async def _serve_once(process: trio.Process, changes: trio.MemoryReceiveChannel[set[str]],
                      signals: AsyncIterator[int], stop_budget: float) -> _Outcome:
    """Until ``process`` ends: stop it on a change, pass a signal on; say which it was."""
    outcome = _Outcome.EXITED
    async with trio.open_nursery() as waiter:

        async def on_change() -> None:
            nonlocal outcome
            paths = await changes.receive()
            logger.info("%s changed: reloading", ", ".join(sorted(paths)))
            outcome = _Outcome.RELOAD
            await _stop(process, stop_budget)

        async def on_signal() -> None:
            nonlocal outcome
            async for signum in signals:
                outcome = _Outcome.STOP
                if process.returncode is None:
                    process.send_signal(signum)

        async def on_exit() -> None:
            await process.wait()
            waiter.cancel_scope.cancel()

        waiter.start_soon(on_change)
        waiter.start_soon(on_signal)
        waiter.start_soon(on_exit)
    return outcome


async def _wait_for_fix(changes: trio.MemoryReceiveChannel[set[str]],
                        signals: AsyncIterator[int]) -> bool:
    """After the server died by itself (a syntax or import error in a reload): True once a
    file changes (start it again), False on a signal (stop)."""
    restart = False
    async with trio.open_nursery() as waiter:

        async def on_change() -> None:
            nonlocal restart
            paths = await changes.receive()
            logger.info("%s changed: restarting the agent server", ", ".join(sorted(paths)))
            restart = True
            waiter.cancel_scope.cancel()

        async def on_signal() -> None:
            async for _ in signals:
                waiter.cancel_scope.cancel()

        waiter.start_soon(on_change)
        waiter.start_soon(on_signal)
    return restart


async def run_with_reload(server: AgentServer, script: str, embedded: bool) -> int:
    """Run ``script dev --no-reload`` as a child and restart it whenever a file changes.

    If the child dies by itself (a syntax or import error saved mid-edit: its traceback is on
    the terminal), the watcher keeps watching and the next change starts it again; the
    embedded dev server, and its rooms, live in this process and stay up throughout.
    """
    from ._cli import log_embedded
    from ._proc import TERM_GRACE

    root = str(Path(script).resolve().parent)
    base = [sys.executable, script, *sys.argv[1:], "--no-reload"]
    stop_budget = server.options.shutdown_process_timeout + TERM_GRACE + STOP_MARGIN
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
        code = 0
        first = True
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            while True:
                process = await trio.lowlevel.open_process(
                    [*base, *extra], preexec_fn=_die_with_parent
                )
                logger.info("started the agent server (pid %d); watching %s", process.pid, root)
                if first and dev is not None:
                    nursery.start_soon(_demo, dev, server.options.agent_name)
                    first = False
                outcome = await _serve_once(process, changes, signals, stop_budget)
                code = process.returncode or 0
                if outcome is _Outcome.STOP:
                    break
                if outcome is _Outcome.EXITED:
                    logger.error("the agent server exited with code %d; fix the error and "
                                 "save a file to restart it (Ctrl-C to stop)", code)
                    if not await _wait_for_fix(changes, signals):
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
