"""Helpers for tests that run real job processes."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import attrs
import trio
from livekit.protocol import agent, models

from trio_agents._jobs import JobAcceptArguments, RunningJobInfo
from trio_agents._options import RunConfig, ServerOptions, resolve_options
from trio_agents._supervisor import ProcessSupervisor

from agents import scripted

FINAL = (agent.JS_SUCCESS, agent.JS_FAILED)


def make_config(**options: Any) -> RunConfig:
    options.setdefault("entrypoint_fnc", scripted.entrypoint)
    options.setdefault("num_idle_processes", 0)
    options.setdefault("shutdown_process_timeout", 1.0)
    return resolve_options(ServerOptions(**options), devmode=True, require_credentials=False)


def job_info(job_id: str, metadata: str = "ok", *,
             attributes: dict[str, str] | None = None) -> RunningJobInfo:
    job = agent.Job(id=job_id, type=agent.JT_ROOM, metadata=metadata, agent_name="tester",
                    room=models.Room(name=f"room-{job_id}", sid=f"RM_{job_id}"))
    return RunningJobInfo(
        accept_arguments=JobAcceptArguments(name="agent", identity=f"agent-{job_id}",
                                            metadata="", attributes=attributes or {}),
        job=job, url="ws://localhost:7880", token="token", worker_id="AW_test",
    )


@attrs.define
class Reports:
    """Collects ``report(job_id, status, error)`` calls; lets a test wait for a final one."""

    calls: list[tuple[str, int, str]] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, job_id: str, status: int, error: str) -> None:
        self.calls.append((job_id, status, error))
        self.changed.set()
        self.changed = trio.Event()

    def final(self, job_id: str) -> tuple[int, str] | None:
        for jid, status, error in self.calls:
            if jid == job_id and status in FINAL:
                return status, error
        return None

    async def wait_final(self, job_id: str) -> tuple[int, str]:
        while (result := self.final(job_id)) is None:
            await self.changed.wait()
        return result

    def statuses(self, job_id: str) -> list[int]:
        return [status for jid, status, _ in self.calls if jid == job_id]


@asynccontextmanager
async def running_supervisor(
    config: RunConfig, reports: Callable[[str, int, str], None] | None = None,
) -> AsyncIterator[tuple[ProcessSupervisor, Reports]]:
    rec = Reports()
    sup = ProcessSupervisor(config, report=reports or rec)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        yield sup, rec
        nursery.cancel_scope.cancel()


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class LogWatch(logging.Handler):
    """Collects log records (ours and those shipped by job processes) and lets a test await one.

    Records re-emitted from job processes arrive on the trio thread; those of other threads
    (the realtime SDK's native side) wake the waiters through the trio token.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            self._token.run_sync_soon(self._add, record)
        else:
            self._add(record)

    def _add(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    def matching(self, text: str, **fields: object) -> list[logging.LogRecord]:
        return [r for r in self.records if text in r.getMessage()
                and all(getattr(r, k, None) == v for k, v in fields.items())]

    async def wait_for(self, text: str, *, count: int = 1, **fields: object) -> logging.LogRecord:
        """The ``count``-th record containing ``text`` (with those fields), once logged."""
        while len(found := self.matching(text, **fields)) < count:
            await self._changed.wait()
        return found[count - 1]


@contextmanager
def watching_logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(watch)
    root.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        root.removeHandler(watch)
        root.setLevel(old_level)
