"""Run the CLI as a real subprocess and wait for what it prints, line by line."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

TESTS = Path(__file__).parent
ROOT = TESTS.parent


class CliProcess:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = trio.Event()
        self.closed = False

    async def _read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)
            self._notify()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, pattern: str, count: int = 1) -> str:
        """The ``count``-th line matching ``pattern`` (a regex), waiting for it to be printed."""
        regex = re.compile(pattern)
        while True:
            found = [line for line in self.lines if regex.search(line)]
            if len(found) >= count:
                return found[count - 1]
            if self.closed:
                raise AssertionError(f"never printed {pattern!r} {count} time(s):\n"
                                     + "\n".join(self.lines))
            await self._changed.wait()

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        return await self.process.wait()


@asynccontextmanager
async def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None,
                  timeout: float = 60) -> AsyncIterator[CliProcess]:
    """Start ``python <args>`` with stdout+stderr captured; kill it (and wait) on exit."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    environ.update(env or {})
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                [sys.executable, *args], stdout=-1, stderr=-2, env=environ, cwd=str(ROOT))
            cli = CliProcess(process)
            nursery.start_soon(cli._read)
            try:
                yield cli
            finally:
                if process.returncode is None:
                    process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()


async def terminate(process: trio.Process, grace: float = 10.0,
                    sig: signal.Signals = signal.SIGTERM) -> int:
    """Stop ``process``: ``sig``, then SIGKILL if it is still there after ``grace`` seconds;
    reaped. Shielded, so it runs to the end when cancelled. Its exit code (negative: the
    signal)."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(sig)
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.wait()
    assert process.returncode is not None
    return process.returncode


def lines_matching(cli: CliProcess, predicate: Callable[[str], bool]) -> list[str]:
    return [line for line in cli.lines if predicate(line)]
