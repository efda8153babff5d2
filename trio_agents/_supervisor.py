"""``ProcessSupervisor``: runs every accepted job in its own supervised job process.

Theory of operation
-------------------
::

    ProcessSupervisor.run(*, task_status)     started() at once; returns when every child is reaped
    ├── reaper           one tiny process per server: kills every marked process if we die
    ├── zygote keeper    (shielded; stopped after the last job process) runs the zygote and
    │                    restarts it with backoff when it dies; forks fail fast meanwhile and
    │                    job processes start cold; a zygote that refuses to fork is not retried
    ├── pool keeper      keeps num_idle_processes initialized; woken by events, not a poll loop
    ├── job process      JobProcessHandle.run: one task per process, idle or busy (see _proc)
    └── ...

Every process is started through ``_spawn`` (lifeline, ``SpawnError``); see its process tree.
A spawn that fails (``EMFILE``, ``EAGAIN``, ...) fails that one job or idle slot and backs off
like a failed setup; it never reaches this nursery.

A process is *idle* once its ``setup_fnc`` ran (``nursery.start`` returned it). ``launch(info)``
takes an idle process, or starts one on demand, hands it the job and returns once the child
confirmed the entrypoint runs (the job is reported ``JS_RUNNING`` then). Each process runs one
job and exits; the keeper refills the pool. A process that dies while idle drops out of the pool
(its task ended) and is replaced at once; it is never handed a job.

A ``setup_fnc`` that keeps failing does not respawn in a loop: consecutive failures back off
exponentially (``setup_retry_delay``), the first failure of a kind is logged once with the
child's traceback, repeats only at debug level.

Stopping: ``terminate(job_id, reason)`` stops one job through the escalation; cancelling
``run`` stops all of them the same way (each process task shields its own wind-down, so final
statuses are still reported) and returns once every child has been reaped.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, final

import attrs
import trio
from livekit.protocol import agent

from . import _ipc, _procutil
from ._child import Functions
from ._errors import ConfigError, JobProcessError
from ._jobs import RunningJobInfo, StatusReport, job_fields
from ._loading import FunctionRef
from ._options import JobExecutorType, RunConfig
from ._proc import JobProcessHandle, NotHandedOver, State, child_environment
from ._spawn import Spawned, SpawnError, spawn
from ._zygote import ZYGOTE_SINGLE_THREADED
from ._zygote import Zygote

if TYPE_CHECKING:
    from ._metrics import ServerMetrics

logger = logging.getLogger("trio_agents.supervisor")

#: Attempts to hand a job to a process (a process may die between being idle and the hand-over).
LAUNCH_ATTEMPTS: Final = 3
#: First and largest delay before restarting a job process whose setup failed.
SETUP_RETRY_FIRST: Final = 0.5
SETUP_RETRY_MAX: Final = 60.0
#: A zygote that ran this long before it died restarts after the first delay again.
ZYGOTE_STABLE: Final = 60.0


def setup_retry_delay(failures: int) -> float:
    """Delay before the next start after ``failures`` consecutive setup failures (>= 1):
    0.5, 1, 2, 4, ... capped at 60 s, so a broken ``setup_fnc`` costs at most one process
    start a minute once it has failed eight times in a row."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    return float(min(SETUP_RETRY_FIRST * 2.0 ** (failures - 1), SETUP_RETRY_MAX))


def _max_concurrent_initializations() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


@final
class ProcessSupervisor:
    """Runs jobs in job processes; implements the control plane's ``JobSupervisor``.

    Args:
        config: the resolved server options. ``entrypoint_fnc``, ``prewarm_fnc`` and
            ``session_end_fnc`` must be module-level functions (a job process imports them):
            anything else is a ``ConfigError`` here, at server start.
        report: called as ``report(job_id, status, error)`` on every job status change:
            ``JS_RUNNING`` once the entrypoint runs, then ``JS_SUCCESS`` or ``JS_FAILED`` with
            an error naming the cause.

    With ``JobExecutorType.THREAD`` each job runs on a thread of this process instead (same
    protocol over a socketpair). A thread cannot be killed or memory-limited: a job that
    ignores the shutdown request keeps its thread; ``job_memory_limit_mb`` and ``ping_timeout``
    are not enforced.
    """

    def __init__(self, config: RunConfig, *, report: StatusReport,
                 metrics: ServerMetrics | None = None,
                 flush: Callable[[], Awaitable[None]] | None = None) -> None:
        opts = config.options
        self._metrics = metrics
        self._flush = flush
        if opts.entrypoint_fnc is None:
            raise ConfigError("no entrypoint: register one with @server.rtc_session()")
        self._config = config
        self._report = report
        self._threaded = opts.job_executor_type is JobExecutorType.THREAD
        if self._threaded:
            entry = FunctionRef("", "")  # the thread executor is handed the functions themselves
            if opts.job_memory_limit_mb > 0:
                logger.warning("job_memory_limit_mb=%g is not enforced with "
                               "JobExecutorType.THREAD: a thread cannot be killed",
                               opts.job_memory_limit_mb)
        else:
            entry = FunctionRef.of(opts.entrypoint_fnc, what="entrypoint")
        self._init = _ipc.InitializeRequest(
            entrypoint=entry,
            setup=(FunctionRef.of(opts.prewarm_fnc, what="setup_fnc")
                   if opts.prewarm_fnc and not self._threaded else None),
            session_end=(FunctionRef.of(opts.session_end_fnc, what="on_session_end")
                         if opts.session_end_fnc and not self._threaded else None),
            executor_type=opts.job_executor_type.value,
            http_proxy=config.http_proxy,
            ws_url=config.ws_url,
            api_key=config.api_key,
            api_secret=config.api_secret,
            log_level=config.log_level,
            session_end_timeout=opts.session_end_timeout,
            shutdown_callback_timeout=opts.shutdown_process_timeout,
        )
        self._token = secrets.token_hex(8)
        self._zygote: Zygote | None = None
        if not self._threaded and config.options.use_zygote:
            preload = [ref.module if not ref.path else f"file:{ref.path}"
                       for ref in (self._init.entrypoint, self._init.setup,
                                   self._init.session_end) if ref is not None]
            env = child_environment(f"{self._token}/zygote/", config)
            for var in ZYGOTE_SINGLE_THREADED:  # numpy's BLAS would start threads on import
                env.setdefault(var, "1")
            self._zygote = Zygote(env, preload)
        self._counter = 0
        self._idle: deque[JobProcessHandle] = deque()
        self._jobs: dict[str, JobProcessHandle] = {}
        self._spawning = 0
        self._launching = 0
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._init_limiter = trio.CapacityLimiter(_max_concurrent_initializations())
        self._failures = 0
        self._retry_at = 0.0
        self._last_failure = ""

    # -- JobSupervisor ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled; then stop every job and return once all are reaped."""
        reaper = None if self._threaded else await self._start_reaper()
        # The zygote is the parent of every forked job process and takes them with it when it
        # dies, so it must outlive them: it runs shielded, and is stopped only once every job
        # process went through its own shutdown.
        zygote_scope = trio.CancelScope(shield=True)
        try:
            async with trio.open_nursery() as outer:
                if self._zygote is not None:  # first, so even the first processes are forks
                    await outer.start(self._run_zygote, zygote_scope)
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._keep_pool)
                        task_status.started()
                finally:
                    zygote_scope.cancel()
        finally:
            self._nursery = None
            if reaper is not None:
                with trio.CancelScope(shield=True):
                    await self._stop_reaper(reaper)

    async def launch(self, info: RunningJobInfo) -> None:
        """Run the job in an idle (or new) process; return once its entrypoint runs.

        Raises ``JobProcessError`` if no process could start it (the job is then reported
        ``JS_FAILED`` with the cause).
        """
        job_id = info.job.id
        if job_id in self._jobs:
            logger.warning("job %s is already running; not launching it twice", job_id,
                           extra=job_fields(info.job))
            return
        info = attrs.evolve(info, launched_at=time.time())
        self._launching += 1
        try:
            for _ in range(LAUNCH_ATTEMPTS):
                handle = self._take_idle()
                if handle is None:
                    logger.info("no idle job process; starting one for job %s", job_id,
                                extra=job_fields(info.job))
                    try:
                        handle = await self._start_process()
                    except JobProcessError as exc:
                        self._note_failure(exc)
                        self._report(job_id, agent.JS_FAILED,
                                     f"could not start a job process: {exc}")
                        raise
                self._jobs[job_id] = handle
                self._notify()
                try:
                    await handle.start_job(info)
                    return
                except NotHandedOver:
                    if self._jobs.get(job_id) is handle:
                        del self._jobs[job_id]
            error = f"no job process could take the job in {LAUNCH_ATTEMPTS} attempts"
            self._report(job_id, agent.JS_FAILED, error)
            raise JobProcessError(error)
        finally:
            self._launching -= 1
            self._notify()

    def terminate(self, job_id: str, reason: str) -> None:
        handle = self._jobs.get(job_id)
        if handle is not None:
            logger.info("stopping job %s: %s", job_id, reason, extra={"job_id": job_id})
            handle.stop(reason)

    @property
    def running_jobs(self) -> Sequence[RunningJobInfo]:
        return [h.info for h in self._jobs.values() if h.info is not None]

    async def wait_idle(self) -> None:
        while self._jobs or self._launching:
            await self._wait_changed()

    # -- introspection (tests, health) --------------------------------------------------------

    @property
    def idle_processes(self) -> Sequence[JobProcessHandle]:
        return list(self._idle)

    @property
    def job_processes(self) -> Sequence[JobProcessHandle]:
        return list(self._jobs.values())

    async def wait_pool_ready(self) -> None:
        """Wait until ``num_idle_processes`` processes are idle."""
        while len(self._idle) < self._config.num_idle_processes:
            await self._wait_changed()

    # -- the pool -----------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _take_idle(self) -> JobProcessHandle | None:
        while self._idle:
            handle = self._idle.popleft()
            if handle.state is State.IDLE:
                return handle
        return None

    async def _keep_pool(self) -> None:
        assert self._nursery is not None
        while True:
            missing = self._config.num_idle_processes - len(self._idle) - self._spawning
            if missing <= 0:
                await self._wait_changed()
                continue
            await trio.sleep_until(self._retry_at)  # backoff after setup failures (0 if none)
            for _ in range(missing):
                self._spawning += 1
                self._nursery.start_soon(self._spawn_idle)
            await self._wait_changed()

    async def _spawn_idle(self) -> None:
        try:
            handle = await self._start_process()
        except JobProcessError as exc:  # SpawnError (EMFILE, EAGAIN...) included
            self._note_failure(exc)
            return
        finally:
            self._spawning -= 1
            self._notify()
        self._idle.append(handle)
        self._notify()

    async def _start_process(self) -> JobProcessHandle:
        nursery = self._nursery
        if nursery is None:
            raise JobProcessError("the job supervisor is not running")
        self._counter += 1
        handle = self._make_handle(f"{self._token}/{self._counter}/")  # "/": 1/ is no prefix of 10/
        async with self._init_limiter:
            started: JobProcessHandle = await nursery.start(self._supervise, handle)
        if self._metrics is not None:
            self._metrics.process_ready(started)
        self._failures = 0
        self._last_failure = ""
        return started

    async def _run_zygote(self, scope: trio.CancelScope, *,
                          task_status: trio.TaskStatus[None]) -> None:
        """Run the zygote; restart it with backoff when it dies (not when it refuses)."""
        zygote = self._zygote
        assert zygote is not None
        failures = 0
        with scope:
            while True:
                started = trio.current_time()
                try:
                    await zygote.run(task_status=task_status)
                except SpawnError as exc:
                    reason = str(exc)
                    task_status.started()  # the first job processes start cold, then
                else:
                    reason = "it exited"
                task_status = trio.TASK_STATUS_IGNORED
                if zygote.refused is not None:
                    logger.warning("the zygote will not fork: %s", zygote.refused)
                    return
                failures = 1 if trio.current_time() - started > ZYGOTE_STABLE else failures + 1
                delay = setup_retry_delay(failures)
                logger.warning("the zygote is gone (%s); job processes start cold until it is "
                               "restarted in %.1f s", reason, delay)
                await trio.sleep(delay)

    def _make_handle(self, marker: str) -> JobProcessHandle:
        functions = None
        if self._threaded:
            opts = self._config.options
            assert opts.entrypoint_fnc is not None
            functions = Functions(entrypoint=opts.entrypoint_fnc, setup=opts.prewarm_fnc,
                                  session_end=opts.session_end_fnc)
        return JobProcessHandle(self._config, self._init, report=self._report, marker=marker,
                                functions=functions, zygote=self._zygote, flush=self._flush)

    async def _supervise(self, handle: JobProcessHandle, *,
                         task_status: trio.TaskStatus[JobProcessHandle]) -> None:
        try:
            await handle.run(task_status=task_status)
        finally:
            if handle in self._idle:
                self._idle.remove(handle)
                # an idle process stopped because the supervisor is being cancelled is no news
                if trio.current_effective_deadline() != -math.inf:
                    logger.warning("idle job process %d ended; replacing it", handle.pid,
                                   extra={"pid": handle.pid})
            if handle.info is not None and self._jobs.get(handle.info.job.id) is handle:
                del self._jobs[handle.info.job.id]
            self._notify()

    def _note_failure(self, exc: JobProcessError) -> None:
        self._failures += 1
        delay = setup_retry_delay(self._failures)
        self._retry_at = trio.current_time() + delay
        text = str(exc)
        if text != self._last_failure:
            self._last_failure = text
            notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))
            logger.error("job process could not be initialized: %s (next attempt in %.1f s; "
                         "repeats of this error are logged at debug level)%s", text, delay,
                         notes)
        else:
            logger.debug("job process initialization failed again (%d in a row): %s; next "
                         "attempt in %.1f s", self._failures, text, delay)

    # -- the reaper ---------------------------------------------------------------------------

    async def _start_reaper(self) -> Spawned | None:
        env = {k: v for k, v in os.environ.items() if k != _procutil.MARKER_ENV}
        try:
            # Not bound to the lifeline: it must outlive us to sweep. Its stdin is its own.
            return await spawn(["-I", _procutil.__file__, f"{self._token}/"], what="the reaper",
                               stdin=-1, env=env, with_lifeline=False)  # -1 = subprocess.PIPE
        except SpawnError as exc:
            logger.warning("%s; processes left by a job of a server that is SIGKILLed will not "
                           "be swept", exc)
            return None

    async def _stop_reaper(self, reaper: Spawned) -> None:
        # Closing its pipe is the same EOF it would see if we died: it sweeps (finding
        # nothing, every process was reaped) and exits.
        if reaper.stdin is not None:
            await reaper.stdin.aclose()
        with trio.move_on_after(5):
            await reaper.wait()
        if reaper.returncode is None:
            reaper.kill()
            await reaper.wait()


__all__ = ["ProcessSupervisor", "setup_retry_delay"]
