"""One job process, supervised from the server.

Theory of operation
-------------------
The whole life of a job process is one call, ``JobProcessHandle.run()``, one task in the
supervisor's nursery::

    spawn         through ``_spawn`` (bound to the server's lifeline, see there): forked by the
                  zygote, or cold (``-m trio_agents._child``) if the zygote is off or cannot
                  fork; own session (= own process group), one end of a socketpair,
                  TRIO_AGENTS_TREE=<marker> in its environment. Any OSError → SpawnError
    ├── reader    every message of the child: InitializeResponse, Pong, JobStarted, LogRecord
    │             (re-emitted into our logging), JobEnding, JobFinished
    │             JobEnding (the job is about to leave its room): report its status now,
    │             then JobEndingAck — LiveKit fails a job whose agent leaves the room first
    ├── initialize  InitializeRequest, then the response within initialize_process_timeout
    │             → task_status.started(handle): the process is idle and may take one job
    ├── watchdog  Ping every ping_interval; warn when a pong takes > high_ping_threshold; the
    │             pong deadline is a cancel scope pushed forward by every pong: kill at ping_timeout
    ├── memory    PSS (else USS, else RSS) every memory_sample_interval in a thread; warn at
    │             job_memory_warn_mb (rate-limited), kill at job_memory_limit_mb
    └── wait for the child to exit
    finally, shielded from outside cancellation:
        stop it if still alive    ShutdownRequest → ≤ shutdown_process_timeout → SIGTERM to the
                                  group → ≤ TERM_GRACE → SIGKILL to the group (each step logged)
        kill what it left         its process group, then every process with its marker
        reap, read the last messages, report the job's outcome once (unless JobEnding did)

``stop(reason)`` (server termination, shutdown) and the watchdogs' ``_kill(reason)`` both end
up there by cancelling the life scope; a kill skips the graceful steps. The outcome is
``JS_SUCCESS`` only when the child reported a successful job *and* exited with status 0 —
except for a job that joined its room: its status is reported on ``JobEnding``, assuming a
clean exit (not if it was killed or interrupted by the server first); an exit that is not
clean after that is logged, the status stays.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, final

import trio
from livekit.protocol import agent

from . import _ipc
from ._errors import InitializeTimeout, JobProcessError, RemoteProtocolError
from ._jobs import RunningJobInfo, StatusReport, job_fields
from ._options import RunConfig, job_environment
from ._procutil import MARKER_ENV, kill_marked
from ._spawn import Spawned, SpawnError, spawn
from ._thread_executor import ThreadRun
from ._zygote import ForkedProcess, Zygote, ZygoteUnavailable

if TYPE_CHECKING:
    from ._child import Functions

logger = logging.getLogger("trio_agents.supervisor")

#: The error of a job the agent server stopped before it finished (see ``outcome``).
INTERRUPTED: Final = "stopped before it finished: the agent server shut down"
#: Wait between SIGTERM and SIGKILL of a job process group.
TERM_GRACE: Final = 0.5
#: How long a job about to leave its room waits for its status to be written to LiveKit (the
#: job itself waits at most 2 s for the ack).
ENDING_FLUSH_TIMEOUT: Final = 1.5
#: How long the last messages of an exited child may take to arrive.
DRAIN_TIMEOUT: Final = 1.0
#: A memory warning is repeated at most this often, unless usage grew by MEMORY_WARN_STEP_MB.
MEMORY_WARN_COOLDOWN: Final = 120.0
MEMORY_WARN_STEP_MB: Final = 50.0


class State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    STARTING_JOB = "starting job"
    RUNNING = "running"
    ENDED = "ended"


class NotHandedOver(JobProcessError):
    """The job never reached the process (it was gone already): try another one."""


@final
class JobProcessHandle:
    """The server's side of one job process. Build it, then ``await nursery.start(h.run)``."""

    def __init__(self, config: RunConfig, init: _ipc.InitializeRequest, *, report: StatusReport,
                 marker: str, functions: Functions | None = None,
                 zygote: Zygote | None = None,
                 flush: Callable[[], Awaitable[None]] | None = None) -> None:
        self._config = config
        self._flush = flush
        """Waits until the statuses reported so far are written to LiveKit."""
        self._zygote = zygote
        self._functions = functions
        """Given: run on a thread (``JobExecutorType.THREAD``) instead of a process."""
        self._opts = config.options
        self._init = init
        self._report = report
        self.marker = marker
        self.state = State.STARTING
        self.info: RunningJobInfo | None = None
        self.pid = 0
        self.spawned_at = 0.0
        self.ready_at = 0.0
        self.initialize_sent_at = 0.0
        self._process: Spawned | ThreadRun | ForkedProcess | None = None
        self._chan: _ipc.IpcChannel | None = None
        self._life = trio.CancelScope()
        self._pong_scope = trio.CancelScope()
        self._init_done = trio.Event()
        self._job_event = trio.Event()
        self._init_response: _ipc.InitializeResponse | None = None
        self._init_error: JobProcessError | None = None
        self._finished: _ipc.JobFinished | None = None
        self._kill_reason: str | None = None
        self._stop_reason: str | None = None
        self._escalated = ""
        self._interrupted = False
        self._eof = False
        self._reported = False
        self._reported_early = False
        self._ready = False

    # -- control --------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Shut down gracefully (through the escalation); the reason goes to the job."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._life.cancel()

    def _kill(self, reason: str) -> None:
        """Kill now (no graceful step); ``reason`` becomes the job's error."""
        if self._kill_reason is None:
            self._kill_reason = reason
            logger.error("job process %d: %s", self.pid, reason, extra=self._extra())
        self._life.cancel()

    async def start_job(self, info: RunningJobInfo) -> None:
        """Hand ``info`` to this idle process; return once its entrypoint runs.

        Raises ``NotHandedOver`` if the process was gone before it got the job (try another),
        ``JobProcessError`` if it died after (its outcome is then reported as failed).
        """
        if self.state is not State.IDLE or self._chan is None:
            raise NotHandedOver(f"job process {self.pid} is {self.state.value}, not idle")
        self.state = State.STARTING_JOB
        self.info = info
        try:
            await self._chan.send(_ipc.StartJob.from_info(info))
        except RemoteProtocolError as exc:
            self.info = None
            raise NotHandedOver(f"job process {self.pid} is gone: {exc}") from exc
        timeout = self._opts.initialize_process_timeout
        with trio.move_on_after(timeout) as scope:
            await self._job_event.wait()
        if self.state is State.RUNNING:
            return
        if scope.cancelled_caught:
            self._kill(f"entrypoint did not start within {timeout:g} s of the job's arrival")
        raise JobProcessError(f"job process {self.pid} ended before the entrypoint of job "
                              f"{info.job.id} started")

    # -- life -----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[JobProcessHandle]) -> None:
        """Spawn, initialize, report ready, supervise, and stop/reap/report at the end.

        Raises ``JobProcessError`` (``InitializeTimeout``) only before ``started``.
        """
        await self._spawn()  # SpawnError: nothing was started
        async with trio.open_nursery() as host:  # hosts the job thread (thread executor only)
            try:
                if isinstance(self._process, ThreadRun):
                    await host.start(self._process.run)
                with self._life:
                    await self._live(task_status)
            finally:
                with trio.CancelScope(shield=True):
                    await self._wind_down()
        if self._init_error is None and not self._ready:
            # killed while initializing (e.g. an unexpected message): not ready, say why
            self._init_error = JobProcessError(
                f"job process {self.pid} ended during initialization: "
                f"{self._kill_reason or self._stop_reason or 'stopped'}")
        if self._init_error is not None:
            raise self._init_error

    async def _spawn(self) -> None:
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            raise SpawnError(f"could not start a job process: {exc}") from exc
        self.spawned_at = trio.current_time()
        if self._functions is not None:  # the thread is started in run's nursery
            self._process = ThreadRun(theirs, self._functions)
        else:
            try:
                self._process = await self._start(theirs.fileno())
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
        self.pid = self._process.pid
        self._chan = _ipc.IpcChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))

    async def _start(self, fd: int) -> Spawned | ForkedProcess:
        if self._zygote is not None and self._zygote.alive:
            # forked from the pre-imported template: tens of ms instead of a cold start
            try:
                return await self._zygote.fork(fd, self.marker)
            except ZygoteUnavailable as exc:
                logger.debug("starting a job process cold: %s", exc)
        return await spawn(["-m", "trio_agents._child", str(fd)], what="a job process",
                           pass_fds=(fd,), env=child_environment(self.marker, self._config))

    async def _live(self, task_status: trio.TaskStatus[JobProcessHandle]) -> None:
        assert self._process is not None and self._chan is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop)
            self.initialize_sent_at = trio.current_time()
            try:
                await self._chan.send(self._init)
            except RemoteProtocolError:
                pass  # it died at once; the reader sees EOF and the exit status tells why
            timeout = self._opts.initialize_process_timeout
            with trio.move_on_after(timeout) as scope:
                await self._init_done.wait()
            response = self._init_response
            if response is None or response.error:
                if scope.cancelled_caught:
                    self._init_error = InitializeTimeout(
                        f"job process {self.pid}: setup_fnc did not finish within "
                        f"initialize_process_timeout ({timeout:g} s)"
                    )
                elif response is not None:
                    self._init_error = JobProcessError(response.error)
                    if response.traceback:
                        self._init_error.add_note(response.traceback)
                else:
                    with trio.move_on_after(DRAIN_TIMEOUT):
                        await self._process.wait()
                    self._init_error = JobProcessError(
                        f"job process {self.pid} ended during initialization "
                        f"({_exit_text(self._process.returncode)})"
                    )
                self._kill_reason = str(self._init_error)
                nursery.cancel_scope.cancel()
                return
            self.state = State.IDLE
            self.ready_at = trio.current_time()
            nursery.start_soon(self._watchdog)
            if self._functions is None:
                nursery.start_soon(self._memory_watch)
            self._ready = True
            task_status.started(self)
            await self._process.wait()
            nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        assert self._chan is not None
        while True:
            try:
                msg = await self._chan.receive()
            except trio.EndOfChannel:
                self._eof = True
                break
            except RemoteProtocolError as exc:
                self._kill(f"job process broke the IPC protocol: {exc}")
                break
            self._dispatch(msg)
            if isinstance(msg, _ipc.JobEnding):
                # Its status is reported now; the job leaves its room once LiveKit has it
                # (written to the websocket), or it would be marked failed for leaving first.
                if self._flush is not None:
                    with trio.move_on_after(ENDING_FLUSH_TIMEOUT):
                        await self._flush()
                await self._send_quietly(_ipc.JobEndingAck())
        self._init_done.set()
        self._job_event.set()

    def _dispatch(self, msg: _ipc.Message) -> None:
        if isinstance(msg, _ipc.LogRecord):
            self._emit_log(msg)
        elif isinstance(msg, _ipc.Pong):
            now = trio.current_time()
            rtt = now - msg.sent_at
            if rtt > self._opts.high_ping_threshold:
                logger.warning("job process %d is slow to answer: ping took %.0f ms", self.pid,
                               rtt * 1000, extra=self._extra(delay_ms=round(rtt * 1000)))
            self._pong_scope.deadline = now + self._opts.ping_timeout
        elif isinstance(msg, _ipc.InitializeResponse) and self._init_response is None:
            self._init_response = msg
            self._init_done.set()
        elif isinstance(msg, _ipc.JobStarted) and self.info is not None:
            self.state = State.RUNNING
            self._report(self.info.job.id, agent.JS_RUNNING, "")
            self._job_event.set()
        elif isinstance(msg, _ipc.JobEnding) and self.info is not None:
            self._report_ending(msg)
        elif isinstance(msg, _ipc.JobFinished):
            self._finished = msg
        else:
            self._kill(f"job process sent an unexpected {type(msg).__name__}")

    def _emit_log(self, msg: _ipc.LogRecord) -> None:
        target = logging.getLogger(msg.name)
        if not target.isEnabledFor(msg.level):
            return
        record = logging.makeLogRecord({
            "name": msg.name, "levelno": msg.level, "levelname": logging.getLevelName(msg.level),
            "msg": msg.msg, "args": None, "exc_text": msg.exc_text or None,
            "pathname": msg.pathname, "filename": os.path.basename(msg.pathname),
            "module": os.path.splitext(os.path.basename(msg.pathname))[0],
            "lineno": msg.lineno, "funcName": msg.func_name, "process": self.pid,
            "processName": "job", "threadName": "job",
        })
        record.created = msg.created
        record.msecs = (msg.created - int(msg.created)) * 1000
        record.pid = self.pid
        for key, value in msg.fields.items():
            if key not in record.__dict__:
                setattr(record, key, value)
        target.handle(record)

    async def _watchdog(self) -> None:
        assert self._chan is not None
        interval, timeout = self._opts.ping_interval, self._opts.ping_timeout
        self._pong_scope.deadline = trio.current_time() + timeout
        seq = 0
        with self._pong_scope:
            while True:
                seq += 1
                try:
                    await self._chan.send(_ipc.Ping(seq=seq, sent_at=trio.current_time()))
                except RemoteProtocolError:
                    return  # the child is exiting; its exit status tells the rest
                await trio.sleep(interval)
        if self._pong_scope.cancelled_caught:
            self._kill(f"killed: no pong for {timeout:g} s (the job blocks its event loop)")

    async def _memory_watch(self) -> None:
        warn, limit = self._opts.job_memory_warn_mb, self._opts.job_memory_limit_mb
        if warn <= 0 and limit <= 0:
            return
        warned_at, warned_mb = -math.inf, 0.0
        while True:
            sample = await trio.to_thread.run_sync(memory_mb, self.pid)
            if sample is None:
                return
            mb, metric = sample
            if limit > 0 and mb > limit:
                self._kill(f"killed: memory limit {limit:g} MB exceeded ({mb:.0f} MB {metric})")
                return
            now = trio.current_time()
            if warn > 0 and mb > warn and (now - warned_at >= MEMORY_WARN_COOLDOWN
                                           or mb - warned_mb >= MEMORY_WARN_STEP_MB):
                warned_at, warned_mb = now, mb
                advisory = "" if limit > 0 else " (advisory: no job_memory_limit_mb is set)"
                logger.warning("job process %d uses %.0f MB (%s), above job_memory_warn_mb "
                               "%g MB%s", self.pid, mb, metric, warn, advisory,
                               extra=self._extra(memory_mb=round(mb)))
            await trio.sleep(self._opts.memory_sample_interval)

    # -- the end --------------------------------------------------------------------------------

    async def _wind_down(self) -> None:
        process = self._process
        assert process is not None
        self.state = State.ENDED
        self._job_event.set()
        begun = trio.current_time()
        # Not stopped through stop() and still running its job: the server is going away.
        self._interrupted = (self._stop_reason is None and self._kill_reason is None
                             and self.info is not None and self._finished is None
                             and process.returncode is None)
        if process.returncode is None and self._kill_reason is None and self._init_response:
            reason = self._stop_reason or "server shutting down"
            await self._send_quietly(_ipc.ShutdownRequest(reason=reason))
            timeout = self._opts.shutdown_process_timeout
            with trio.move_on_after(timeout):
                await self._wait_reading(process)
            if process.returncode is None:
                self._escalated = f"did not stop within {timeout:g} s of the shutdown request"
                logger.warning("job process %d %s (%.1f s elapsed): SIGTERM to its group",
                               self.pid, self._escalated, trio.current_time() - begun,
                               extra=self._extra())
                self._signal(signal.SIGTERM)
                with trio.move_on_after(TERM_GRACE):
                    await self._wait_reading(process)
        if process.returncode is None:
            if self._escalated:
                logger.warning("job process %d still alive %.1f s after SIGTERM: SIGKILL to its "
                               "group", self.pid, trio.current_time() - begun,
                               extra=self._extra())
            self._signal(signal.SIGKILL)
            process.kill()  # a thread is abandoned: it cannot be killed
            await process.wait()
        # Anything it started: same group (gone with the leader unless setsid) or marked.
        killed = 0
        if self._functions is None:
            killed = await trio.to_thread.run_sync(kill_marked, self.marker)
        if killed:
            logger.warning("job process %d left %d process(es) behind; killed them", self.pid,
                           killed, extra=self._extra())
        if self._kill_reason is None and not self._eof:
            with trio.move_on_after(DRAIN_TIMEOUT):
                await self._read_loop()
        assert self._chan is not None
        await self._chan.aclose()
        if process.returncode != 0 or self.info is not None:
            logger.debug("job process %d exited (%s) after %.1f s", self.pid,
                         _exit_text(process.returncode), trio.current_time() - self.spawned_at,
                         extra=self._extra())
        self._report_outcome(process.returncode)

    def _signal(self, sig: int) -> None:
        process = self._process
        if process is not None and not isinstance(process, ThreadRun):  # never our own group
            process.signal_group(sig)

    async def _send_quietly(self, msg: _ipc.Message) -> None:
        assert self._chan is not None
        with trio.move_on_after(DRAIN_TIMEOUT):
            try:
                await self._chan.send(msg)
            except RemoteProtocolError:
                pass

    async def _wait_reading(self, process: Spawned | ThreadRun | ForkedProcess) -> None:
        async with trio.open_nursery() as nursery:
            if not self._eof and self._kill_reason is None:
                nursery.start_soon(self._read_loop)
            await process.wait()
            nursery.cancel_scope.cancel()

    def _report_ending(self, ending: _ipc.JobEnding) -> None:
        """The job is about to leave its room: report its status now, assuming a clean exit.

        Not when it was killed or the server interrupted it: that outcome is reported at exit.
        """
        if self._reported or self._kill_reason is not None or self._interrupted:
            return
        self._reported_early = True
        self._send_status(outcome(0, ending), ending.reason)

    def _report_outcome(self, returncode: int | None) -> None:
        if self.info is None:
            return
        if self._reported_early and returncode != 0:
            logger.warning("job process %d %s after the job's status was reported; the status "
                           "stays", self.pid, _exit_text(returncode), extra=self._extra())
        if self._reported:
            return
        self._send_status(outcome(returncode, self._finished, kill_reason=self._kill_reason,
                                  escalated=self._escalated, interrupted=self._interrupted),
                          self._finished.reason if self._finished else "")

    def _send_status(self, result: tuple[int, str], reason: str) -> None:
        assert self.info is not None
        self._reported = True
        status, error = result
        job_id = self.info.job.id
        if status == agent.JS_SUCCESS:
            logger.info("job %s finished (%s)", job_id, reason, extra=self._extra())
        else:
            logger.error("job %s failed: %s", job_id, error, extra=self._extra())
        self._report(job_id, status, error)

    def _extra(self, **more: object) -> dict[str, object]:
        fields: dict[str, object] = {"pid": self.pid}
        if self.info is not None:
            fields.update(job_fields(self.info.job))
        fields.update(more)
        return fields

    def __repr__(self) -> str:
        return f"<JobProcessHandle pid={self.pid} {self.state.value}>"


def child_environment(marker: str, config: RunConfig | None = None) -> dict[str, str]:
    """The environment of a job process (or the zygote): ours, its marker, our sys.path, and
    the server's LiveKit URL and credentials (``job_environment``)."""
    env = dict(os.environ)
    env[MARKER_ENV] = marker
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    if config is not None:
        env.update(job_environment(config))
    return env


def outcome(returncode: int | None, finished: _ipc.JobFinished | _ipc.JobEnding | None, *,
            kill_reason: str | None = None, escalated: str = "",
            interrupted: bool = False) -> tuple[int, str]:
    """The job status and error for a job process that ended (pure: see the tests).

    ``finished`` is what the job said of its end; for a ``JobEnding`` (the job has yet to
    leave its room and exit), ``returncode`` 0 gives the status it is reported with early.

    ``interrupted``: the agent server itself stopped the job while it ran (a forced stop, or
    a drain whose budget ran out) — not the job's own end, nor a termination LiveKit asked for,
    so it is not a success even if the job wound down cleanly.
    """
    if kill_reason:
        return agent.JS_FAILED, kill_reason
    if interrupted and (finished is None or finished.outcome != _ipc.FAILED):
        return agent.JS_FAILED, INTERRUPTED + (f"; {escalated}" if escalated else "")
    if finished is not None:
        if finished.outcome == _ipc.FAILED:
            return agent.JS_FAILED, finished.error or "the job failed"
        if returncode == 0:
            return agent.JS_SUCCESS, ""
        return agent.JS_FAILED, f"the job finished but its process {_exit_text(returncode)}"
    if escalated:
        return agent.JS_FAILED, f"{escalated}; {_exit_text(returncode)}"
    if returncode == 0:
        return agent.JS_FAILED, "the job process exited (code 0) before the job finished"
    return agent.JS_FAILED, _exit_text(returncode)


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def memory_mb(pid: int) -> tuple[float, str] | None:
    """Memory of ``pid`` in MB: PSS where the OS has it, else USS, else RSS; ``None`` if gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        try:
            full = proc.memory_full_info()
        except psutil.AccessDenied:
            return proc.memory_info().rss / 2**20, "rss"
        for metric in ("pss", "uss", "rss"):
            value = getattr(full, metric, None)
            if value:
                return float(value) / 2**20, metric
        return full.rss / 2**20, "rss"
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None

