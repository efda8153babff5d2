"""A job supervisor that runs no process: it records what the control plane hands it.

It implements the same ``JobSupervisor`` boundary as the process supervisor, so the control
plane is tested in virtual time with no child processes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio
from livekit.protocol import agent

from trio_agents._control import ControlPlane, LoadSampler, OpenStream
from trio_agents._jobs import RunningJobInfo, StatusReport
from trio_agents._options import RequestFnc, ServerOptions, resolve_options


class RecordingSupervisor:
    def __init__(self) -> None:
        self.report: StatusReport = lambda job_id, status, error: None
        self.launched: list[RunningJobInfo] = []
        self.terminated: list[tuple[str, str]] = []
        self._running: dict[str, RunningJobInfo] = {}
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def launch(self, info: RunningJobInfo) -> None:
        self.launched.append(info)
        self._running[info.job.id] = info
        self.report(info.job.id, agent.JS_RUNNING, "")
        self._notify()

    def terminate(self, job_id: str, reason: str) -> None:
        self.terminated.append((job_id, reason))
        self.finish(job_id, agent.JS_SUCCESS)

    def finish(self, job_id: str, status: int, error: str = "") -> None:
        if self._running.pop(job_id, None) is not None:
            self.report(job_id, status, error)
            self._notify()

    @property
    def running_jobs(self) -> Sequence[RunningJobInfo]:
        return list(self._running.values())

    async def wait_idle(self) -> None:
        while self._running:
            await self._changed.wait()

    async def wait_launched(self, count: int) -> None:
        while len(self.launched) < count:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class FixedRandom(random.Random):
    """No jitter: delays are exactly 0, 2, 4, ..."""

    def random(self) -> float:
        return 0.0


def constant_load(value: float) -> LoadSampler:
    async def sample() -> object:
        return value

    return sample


def make_control(
    open_stream: OpenStream,
    *,
    supervisor: RecordingSupervisor | None = None,
    request_fnc: RequestFnc | None = None,
    load: LoadSampler | None = None,
    api_secret: str = "secret",
    **options: object,
) -> tuple[ControlPlane, RecordingSupervisor]:
    supervisor = supervisor or RecordingSupervisor()
    opts = ServerOptions(
        ws_url="ws://devserver:7880", api_key="devkey", api_secret=api_secret,
        load_threshold=options.pop("load_threshold", math.inf),  # type: ignore[arg-type]
        num_idle_processes=options.pop("num_idle_processes", 1),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )
    config = resolve_options(opts, devmode=False, environ={})
    control = ControlPlane(
        config, supervisor=supervisor, request_fnc=request_fnc,
        load_sampler=load or constant_load(0.0), open_stream=open_stream, rng=FixedRandom(),
    )
    supervisor.report = control.report_job_status
    return control, supervisor


@asynccontextmanager
async def running(control: ControlPlane) -> AsyncIterator[str]:
    """Run a control plane until registered; cancel it on exit."""
    async with trio.open_nursery() as nursery:
        worker_id: str = await nursery.start(control.run)
        yield worker_id
        nursery.cancel_scope.cancel()
