"""``AgentServer``: the nursery tree that ties the control plane, the job supervisor and the
health endpoint together, and the legacy ``Worker`` facade over it.

Theory of operation
-------------------
::

    AgentServer.run(*, task_status)          started(worker_id) once registered
    ├── health server                        hypercorn on trio; started(bound port); /metrics
    ├── metrics server                       only with prometheus_port: /metrics alone
    ├── job supervisor                       idle pool + one task per job process
    └── control plane                        /agent connection, offers, status, load

Stopping always goes the same way, whatever asked for it (``drain()`` when the running jobs
are done or its budget ran out, ``aclose()``, or the control plane failing for good):

1. cancel the supervisor: every job process left goes through the shutdown escalation
   (IPC shutdown → SIGTERM → SIGKILL of its process group) and reports a final status;
2. flush those statuses to LiveKit (bounded: ``FLUSH_TIMEOUT``);
3. close the websocket with a close handshake, its reader still running so that the peer's
   answer is read at once (bounded: ``CLOSE_TIMEOUT``);
4. cancel the rest (the health server); ``run`` returns once every child is reaped.

If the control plane fails for good (``AuthenticationError``, ``ServerConnectionError``) or a
part cannot start (a busy health port: ``ConfigError``), the error propagates: it cancels the
nursery (job processes still go through their shielded escalation) and leaves ``run`` as
itself, not as an exception group around it (``_util.unwrap_errors``, the one place that
does this).

Cancelling the scope around ``run`` from outside is a hard stop: the escalation still runs for
every job process, but final statuses may not reach LiveKit.
"""

from __future__ import annotations

import inspect
import logging
import math
from functools import partial
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final, overload

import attrs
import trio

from ._errors import ConfigError, TrioAgentsError
from ._jobs import JobSupervisor, RunningJobInfo
from ._options import (
    EntrypointFnc,
    LoadFnc,
    RequestFnc,
    RunConfig,
    ServerOptions,
    ServerType,
    SessionEndFnc,
    SetupFnc,
    resolve_options,
)
from ._util import unwrap_errors

if TYPE_CHECKING:
    # imported when the server runs: job processes import the user's module (and so this
    # one) and should not pay for the websocket stack
    from ._control import ControlPlane, OpenStream
    from ._health import HealthInfo
    from ._metrics import ServerMetrics, ServerState

logger = logging.getLogger("trio_agents")

#: How long final job statuses may take to reach LiveKit when the server stops.
FLUSH_TIMEOUT = 2.0


@final
class _Ready:
    """A ``TaskStatus`` that just records that (and with what) it was started."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value = ""

    def started(self, value: str | None = None) -> None:
        self.value = value or ""
        self.event.set()


@final
class AgentServer:
    """Runs your agent: registers with LiveKit, takes jobs, runs each in its own process.

    Options are the keyword arguments of ``ServerOptions`` (``load_threshold``,
    ``num_idle_processes``, ``drain_timeout``, …) with livekit-agents' names and defaults.
    Register the job body with ``@server.rtc_session()``; set ``server.setup_fnc`` to prewarm
    job processes and ``server.load_fnc`` to report your own load.

    Run it with ``trio.run(server.run)``, ``await nursery.start(server.run)`` (returns once
    registered) or ``cli.run_app(server)``.
    """

    def __init__(
        self,
        *,
        setup_fnc: SetupFnc | None = None,
        load_fnc: LoadFnc | None = None,
        **options: Any,
    ) -> None:
        if "entrypoint_fnc" in options or "request_fnc" in options:
            raise ConfigError(
                "register the entrypoint and request handler with @server.rtc_session(...), "
                "not as AgentServer(...) arguments"
            )
        try:
            self._options = ServerOptions(prewarm_fnc=setup_fnc, load_fnc=load_fnc, **options)
        except TypeError as exc:
            raise ConfigError(f"unknown AgentServer option: {exc}") from exc
        self._session_registered = False
        self._running = False
        self._config: RunConfig | None = None
        self._control: ControlPlane | None = None
        self._supervisor: JobSupervisor | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._drained_cleanly = False
        self._metrics: ServerMetrics | None = None
        self.health_port = 0
        self.prometheus_port = 0
        """The bound ``prometheus_port`` (0 when not serving one)."""

    @classmethod
    def from_server_options(cls, options: ServerOptions) -> AgentServer:
        """Build a server from a ``ServerOptions``/``WorkerOptions`` (the legacy form)."""
        server = cls()
        server._options = options
        server._session_registered = options.entrypoint_fnc is not None
        return server

    # -- configuration ------------------------------------------------------------------------

    @property
    def options(self) -> ServerOptions:
        return self._options

    def _update(self, **changes: Any) -> None:
        if self._running:
            raise RuntimeError("cannot change options of a running AgentServer")
        self._options = attrs.evolve(self._options, **changes)

    def update_options(self, **changes: Any) -> None:
        """Change options before ``run`` (e.g. from the CLI's flags)."""
        try:
            self._update(**changes)
        except TypeError as exc:
            raise ConfigError(f"unknown AgentServer option: {exc}") from exc

    @overload
    def rtc_session(
        self, func: EntrypointFnc, *, agent_name: str = "", type: ServerType = ServerType.ROOM,
        on_request: RequestFnc | None = None, on_session_end: SessionEndFnc | None = None,
    ) -> EntrypointFnc: ...

    @overload
    def rtc_session(
        self, func: None = None, *, agent_name: str = "", type: ServerType = ServerType.ROOM,
        on_request: RequestFnc | None = None, on_session_end: SessionEndFnc | None = None,
    ) -> Callable[[EntrypointFnc], EntrypointFnc]: ...

    def rtc_session(
        self,
        func: EntrypointFnc | None = None,
        *,
        agent_name: str = "",
        type: ServerType = ServerType.ROOM,
        on_request: RequestFnc | None = None,
        on_session_end: SessionEndFnc | None = None,
    ) -> EntrypointFnc | Callable[[EntrypointFnc], EntrypointFnc]:
        """Register the job entrypoint; use as ``@server.rtc_session(...)`` or call directly.

        ``agent_name`` non-empty means explicit dispatch only. ``on_request`` decides on each
        offer (default: accept). Only one session can be registered per server.
        """

        def register(fn: EntrypointFnc) -> EntrypointFnc:
            if self._session_registered:
                raise RuntimeError("this AgentServer already has an rtc_session; only one is allowed")
            _require_async(fn, "the rtc_session entrypoint")
            if on_request is not None:
                _require_async(on_request, "on_request")
            if on_session_end is not None:
                _require_async(on_session_end, "on_session_end")
            self._update(
                entrypoint_fnc=fn,
                request_fnc=on_request,
                session_end_fnc=on_session_end,
                agent_name=agent_name or self._options.agent_name,
                worker_type=type,
            )
            self._session_registered = True
            return fn

        return register if func is None else register(func)

    @property
    def setup_fnc(self) -> SetupFnc | None:
        return self._options.prewarm_fnc

    @setup_fnc.setter
    def setup_fnc(self, fn: SetupFnc | None) -> None:
        if fn is not None and not callable(fn):
            raise ConfigError("setup_fnc must be callable, e.g. def setup(proc: JobProcess): ...")
        self._update(prewarm_fnc=fn)

    @property
    def load_fnc(self) -> LoadFnc | None:
        return self._options.load_fnc

    @load_fnc.setter
    def load_fnc(self, fn: LoadFnc | None) -> None:
        if fn is not None and not callable(fn):
            raise ConfigError("load_fnc must be callable and return a float between 0 and 1")
        self._update(load_fnc=fn)

    # -- state ------------------------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        """The id LiveKit gave this server at its last registration ("" before)."""
        return self._control.worker_id if self._control else ""

    id = worker_id

    @property
    def active_jobs(self) -> list[RunningJobInfo]:
        """Every job from its acceptance until its final status (what ``load_fnc(server)``
        should count; a job not yet assigned has an empty ``token``)."""
        return self._control.active_jobs if self._control else []

    @property
    def draining(self) -> bool:
        return self._control.draining if self._control else False

    @property
    def registered(self) -> bool:
        return self._control.registered if self._control else False

    @property
    def metrics(self) -> ServerMetrics | None:
        """The Prometheus metrics of the current (or last) run; ``None`` before ``run``."""
        return self._metrics

    def _metrics_state(self) -> ServerState:
        from ._metrics import ServerState, job_pids

        control = self._control
        return ServerState(
            active_jobs=len(self.active_jobs),
            load=control.capacity.load if control else 0.0,
            draining=self.draining,
            registered=self.registered,
            job_pids=job_pids(getattr(self._supervisor, "job_processes", ())),
        )

    def health(self) -> HealthInfo:
        """A snapshot for the health endpoint (``/`` readiness, ``/worker``)."""
        from ._health import HealthInfo

        control = self._control
        reason = ""
        if control is None:
            reason = "not started"
        elif control.failure:
            reason = control.failure
        elif not control.registered:
            reason = "reconnecting to LiveKit" if control.worker_id else "not registered"
        elif control.draining:
            reason = "draining"
        return HealthInfo(
            ready=not reason,
            reason=reason,
            worker_id=self.worker_id,
            agent_name=self._config.agent_name if self._config else self._options.agent_name,
            worker_type="JT_PUBLISHER"
            if self._options.worker_type is ServerType.PUBLISHER else "JT_ROOM",
            active_jobs=len(self.active_jobs),
            load=control.capacity.load if control else 0.0,
            draining=self.draining,
            registered=self.registered,
        )

    # -- running ------------------------------------------------------------------------------

    async def run(
        self,
        *,
        devmode: bool = False,
        open_stream: OpenStream | None = None,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until drained, closed or cancelled. See the module docstring.

        Args:
            devmode: development defaults (no idle processes, no load threshold, random health
                port, debug logs) instead of production ones.
            open_stream: how to open the byte stream to LiveKit (default TCP/TLS); the seam
                ``trio_agents.testing`` uses to run against an in-memory dev server.
        Raises:
            ConfigError: bad options, a missing ``LIVEKIT_*`` variable, a non-async entrypoint,
                or a busy health port.
            AuthenticationError: (a ``ConfigError``) LiveKit rejected the key or secret.
            ServerConnectionError: LiveKit could not be reached after ``max_retry`` attempts.

        Each is raised as itself, never wrapped in an exception group.
        """
        if self._running:
            raise RuntimeError("this AgentServer is already running")
        config = resolve_options(self._options, devmode=devmode)
        entrypoint = config.options.entrypoint_fnc
        if entrypoint is None:
            raise ConfigError(
                "no entrypoint: decorate an async function with @server.rtc_session() "
                "(or pass entrypoint_fnc= to WorkerOptions)"
            )
        _require_async(entrypoint, "the entrypoint")
        if config.options.request_fnc is not None:
            _require_async(config.options.request_fnc, "request_fnc/on_request")

        from ._control import CLOSE_TIMEOUT, ControlPlane, open_tcp_stream
        from ._health import serve_health
        from ._metrics import ServerMetrics, prepare_multiproc_dir
        from ._supervisor import ProcessSupervisor

        logger.debug(
            "starting the agent server", extra={
                "devmode": devmode, "url": config.ws_url, "agent_name": config.agent_name,
                "load_threshold": config.load_threshold,
                "num_idle_processes": config.num_idle_processes,
                "executor": config.options.job_executor_type.value,
                "drain_timeout": config.options.drain_timeout,
            })
        self._running = True
        self._config = config
        self._stop = trio.Event()
        self._stopped = trio.Event()
        if config.prometheus_multiproc_dir:
            prepare_multiproc_dir(config.prometheus_multiproc_dir)
        metrics = self._metrics = ServerMetrics(multiproc_dir=config.prometheus_multiproc_dir)
        metrics.state = self._metrics_state
        supervisor = ProcessSupervisor(config, report=self._report_job_status, metrics=metrics,
                                       flush=self._flush_statuses)
        control = ControlPlane(
            config,
            supervisor=supervisor,
            request_fnc=config.options.request_fnc,
            load_sampler=self._load_sampler(config),
            open_stream=open_stream or open_tcp_stream,
            metrics=metrics,
        )
        self._supervisor, self._control = supervisor, control
        try:
            # errors leave the nursery by propagating; the one TrioAgentsError among them is
            # raised as itself (the Raises: above), never as a group around it
            with unwrap_errors(TrioAgentsError):
                async with trio.open_nursery() as root:
                    self.health_port = await root.start(partial(
                        serve_health, self, host=config.options.host, port=config.port,
                        metrics=metrics.scrape))
                    if config.prometheus_port is not None:
                        self.prometheus_port = await root.start(partial(
                            serve_health, None, host=config.options.host,
                            port=config.prometheus_port, metrics=metrics.scrape))
                    jobs_scope = trio.CancelScope()
                    jobs_done = trio.Event()
                    await root.start(_run_supervisor, supervisor, jobs_scope, jobs_done)
                    ready = _Ready()
                    control_done = trio.Event()
                    root.start_soon(_run_control, control, ready, control_done)
                    with trio.CancelScope() as waiting:
                        root.start_soon(_cancel_when, self._stop, waiting)
                        await ready.event.wait()
                        task_status.started(ready.value)
                        await self._stop.wait()
                    jobs_scope.cancel()
                    await jobs_done.wait()
                    with trio.move_on_after(FLUSH_TIMEOUT):
                        await control.flush()
                    # a close handshake while the websocket's reader still runs: the peer's
                    # answer is read at once, so nothing waits for CLOSE_TIMEOUT
                    control.close()
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await control_done.wait()
                    self._stopped.set()
                    root.cancel_scope.cancel()  # the health server
        finally:
            self._stopped.set()
            self._running = False

    async def _flush_statuses(self) -> None:
        """Until the job statuses reported so far are written to LiveKit (or it is away)."""
        if self._control is not None:
            await self._control.flush()

    def _report_job_status(self, job_id: str, status: int, error: str) -> None:
        if self._metrics is not None:
            info = next((i for i in self.active_jobs if i.job.id == job_id), None)
            self._metrics.job_status(job_id, status, error, info.received_at if info else None)
        if self._control is not None:
            self._control.report_job_status(job_id, status, error)

    def _load_sampler(self, config: RunConfig) -> Callable[[], Any] | None:
        fnc = config.options.load_fnc
        if fnc is None:
            return None  # the control plane's own CPU load (it learns a per-job weight)
        args: tuple[Any, ...] = () if _arity(fnc) == 0 else (self,)
        if inspect.iscoroutinefunction(fnc):
            async def sample_async() -> object:
                return await fnc(*args)

            return sample_async

        name = getattr(fnc, "__qualname__", repr(fnc))

        async def sample_in_thread() -> object:
            returned = False

            def call() -> object:
                nonlocal returned
                try:
                    return fnc(*args)
                finally:
                    returned = True

            try:
                # abandoned when cancelled: a load_fnc that hangs must not hold the server up
                return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
            except trio.Cancelled:
                if not returned:
                    logger.warning("load_fnc %s did not return before the server stopped; "
                                   "abandoning its thread (make it return quickly: it is "
                                   "called every load_sample_interval)", name)
                raise

        return sample_in_thread

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking jobs, wait for running ones (at most ``timeout``, default
        ``drain_timeout``; 0 waits forever), then stop the server.

        Returns True if every job finished by itself, False if some had to be shut down
        (the budget ran out, or ``aclose()`` was called meanwhile). Calling it again while a
        drain runs waits for the same stop. It raises nothing of the server's: if the server
        fails meanwhile, ``run`` raises that, and ``drain`` returns.
        """
        control = self._control
        if not self._running or control is None or self._supervisor is None:
            return True
        if control.draining:
            await self._stopped.wait()
            return self._drained_cleanly
        budget = self._options.drain_timeout if timeout is None else timeout
        logger.info("draining: no new jobs; waiting up to %.0f s for %d running job(s)",
                    budget, len(self.active_jobs))
        control.start_draining()
        with trio.move_on_after(budget if budget > 0 else math.inf) as scope:
            await control.wait_offers_done()
            await self._supervisor.wait_idle()
        if scope.cancelled_caught:
            logger.warning("drain timeout of %.0f s reached; stopping %d job(s)",
                           budget, len(self.active_jobs))
        self._drained_cleanly = not scope.cancelled_caught and not self._stop.is_set()
        self._stop.set()
        await self._stopped.wait()
        return self._drained_cleanly

    async def aclose(self) -> None:
        """Stop now: running jobs are shut down through the escalation; returns once the
        server stopped. Idempotent. Raises nothing of the server's (``run`` raises that)."""
        if not self._running:
            return
        self._stop.set()
        await self._stopped.wait()

    async def simulate_job(self, room: str, *, participant_identity: str | None = None) -> None:
        """Ask LiveKit to offer this server a job for ``room`` (``SimulateJobRequest``)."""
        if self._control is None:
            raise RuntimeError("the server is not running")
        self._control.simulate_job(room, participant_identity)


async def _run_supervisor(
    supervisor: JobSupervisor,
    scope: trio.CancelScope,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with scope:
            await supervisor.run(task_status=task_status)
    finally:
        done.set()


async def _run_control(control: ControlPlane, ready: _Ready, done: trio.Event) -> None:
    try:
        await control.run(task_status=ready)
    finally:
        done.set()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _require_async(fn: Callable[..., Any], what: str) -> None:
    target = getattr(fn, "func", fn)  # functools.partial
    # a plain async function, or an object whose class has an async __call__
    if not (inspect.iscoroutinefunction(target)
            or inspect.iscoroutinefunction(getattr(type(target), "__call__", None))):
        name = getattr(target, "__qualname__", repr(target))
        raise ConfigError(f"{what} {name} must be an async function (async def ...)")


def _arity(fn: Callable[..., Any]) -> int:
    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return 1


@final
class Worker:
    """The legacy form: ``Worker(WorkerOptions(entrypoint_fnc=...))``; a thin facade over
    ``AgentServer``. ``devmode`` defaults to True, as in livekit-agents 0.x.
    """

    def __init__(self, opts: ServerOptions, *, devmode: bool = True) -> None:
        if opts.entrypoint_fnc is None:
            raise ConfigError("WorkerOptions needs entrypoint_fnc=<async function>")
        _require_async(opts.entrypoint_fnc, "entrypoint_fnc")
        self._server = AgentServer.from_server_options(opts)
        self._devmode = devmode

    @property
    def server(self) -> AgentServer:
        return self._server

    async def run(
        self,
        *,
        open_stream: OpenStream | None = None,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._server.run(devmode=self._devmode, open_stream=open_stream,
                               task_status=task_status)

    @property
    def id(self) -> str:
        return self._server.worker_id

    @property
    def active_jobs(self) -> list[RunningJobInfo]:
        return self._server.active_jobs

    async def drain(self, timeout: float | None = None) -> None:
        await self._server.drain(timeout)

    async def aclose(self) -> None:
        await self._server.aclose()

    async def simulate_job(self, room: str, participant_identity: str | None = None) -> None:
        await self._server.simulate_job(room, participant_identity=participant_identity)
