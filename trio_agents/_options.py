"""Options of the agent server, their dev/prod defaults, and the one place the environment is read.

``ServerOptions`` (alias ``WorkerOptions``) is a frozen attrs class; a field may hold a
``ServerEnvOption(dev_default, prod_default)`` that is resolved when the server runs.
``resolve_options`` turns it into a ``RunConfig`` of plain values, reading ``LIVEKIT_URL``,
``LIVEKIT_API_KEY``, ``LIVEKIT_API_SECRET``, ``LIVEKIT_AGENT_NAME``, ``PROMETHEUS_MULTIPROC_DIR`` and the proxy
variables from the mapping it is given. Nothing here writes to ``os.environ``;
``job_environment`` is what a job process gets on top of the server's environment.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final
from urllib.parse import urlsplit, urlunsplit

import attrs
from livekit.protocol import agent, models

from ._errors import ConfigError

if TYPE_CHECKING:
    from ._context import JobContext, JobProcess
    from ._jobs import JobRequest

T = TypeVar("T")

EntrypointFnc = Callable[["JobContext"], Awaitable[None]]
RequestFnc = Callable[["JobRequest"], Awaitable[None]]
SetupFnc = Callable[["JobProcess"], Any]
SessionEndFnc = Callable[["JobContext"], Awaitable[None]]
#: ``load_fnc()`` or ``load_fnc(server)``, sync (run in a thread) or async; returns 0..1.
LoadFnc = Callable[..., "float | Awaitable[float]"]


@final
class ServerType(enum.Enum):
    """Which jobs the server takes: one per room, or one per publisher in a room."""

    ROOM = agent.JT_ROOM
    PUBLISHER = agent.JT_PUBLISHER


WorkerType = ServerType


@final
class JobExecutorType(enum.Enum):
    """Where a job runs: its own OS process (default) or a thread of the server process.

    A thread cannot be killed or memory-limited; use it only where processes are impossible.
    """

    PROCESS = "process"
    THREAD = "thread"


@final
@attrs.frozen(kw_only=True)
class WorkerPermissions:
    """What the agent participant may do in the room (sent at registration)."""

    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    can_update_metadata: bool = True
    can_publish_sources: tuple[int, ...] = ()
    hidden: bool = False

    def to_proto(self) -> models.ParticipantPermission:
        return models.ParticipantPermission(
            can_publish=self.can_publish,
            can_subscribe=self.can_subscribe,
            can_publish_data=self.can_publish_data,
            can_update_metadata=self.can_update_metadata,
            can_publish_sources=list(self.can_publish_sources),  # type: ignore[arg-type]
            hidden=self.hidden,
            agent=True,
        )


@final
@attrs.frozen
class ServerEnvOption(Generic[T]):
    """A value that differs between ``dev`` and production (``start``)."""

    dev_default: T
    prod_default: T

    def getvalue(self, devmode: bool) -> T:
        return self.dev_default if devmode else self.prod_default


_EnvOpt = ServerEnvOption


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _default_idle() -> ServerEnvOption[int]:
    return ServerEnvOption(0, min(_cpu_count(), 4))


@final
@attrs.frozen(kw_only=True)
class ServerOptions:
    """Everything an agent server can be configured with. Times are in seconds.

    Names and defaults follow livekit-agents; where we differ on purpose the field says so.
    """

    entrypoint_fnc: EntrypointFnc | None = None
    """The job body, run in the job process. Required to run."""
    request_fnc: RequestFnc | None = None
    """Decides on each job offer with ``req.accept()``/``req.reject()``; ``None`` accepts all."""
    prewarm_fnc: SetupFnc | None = None
    """Runs once per job process before any job (``setup_fnc`` on ``AgentServer``)."""
    session_end_fnc: SessionEndFnc | None = None
    """Runs in the job process after the job, bounded by ``session_end_timeout``."""
    load_fnc: LoadFnc | None = None
    """Returns the server's load 0..1; default is CPU utilisation over 2.5 s."""
    load_threshold: float | ServerEnvOption[float] = _EnvOpt(math.inf, 0.7)
    """At or above it the server reports ``WS_FULL`` and refuses offers."""
    job_executor_type: JobExecutorType = attrs.field(default=JobExecutorType.PROCESS,
                                                     converter=JobExecutorType)
    """``"process"`` or ``"thread"`` are taken too, as in livekit-agents."""
    job_memory_warn_mb: float = 1000.0
    job_memory_limit_mb: float = 0.0
    """0 disables the limit."""
    drain_timeout: float = 1800.0
    """How long a drain waits for running jobs (30 min, as the docs say; the peer uses 1 h)."""
    num_idle_processes: int | ServerEnvOption[int] = attrs.field(factory=_default_idle)
    shutdown_process_timeout: float = 10.0
    session_end_timeout: float = 300.0
    initialize_process_timeout: float = 10.0
    permissions: WorkerPermissions = attrs.field(factory=WorkerPermissions)
    agent_name: str = ""
    worker_type: ServerType = ServerType.ROOM
    max_retry: int = 16
    ws_url: str | None = None
    """``None`` reads ``LIVEKIT_URL``."""
    api_key: str | None = attrs.field(default=None, repr=False)
    api_secret: str | None = attrs.field(default=None, repr=False)
    host: str = ""
    port: int | ServerEnvOption[int] = _EnvOpt(0, 8081)
    http_proxy: str | None = None
    log_level: str | ServerEnvOption[str] = _EnvOpt("DEBUG", "INFO")
    prometheus_port: int | None = None
    """Also serve ``/metrics`` on this port (on ``host``); it is always on the health port."""
    prometheus_multiproc_dir: str | None = None
    """prometheus-client's multiprocess directory (default: ``PROMETHEUS_MULTIPROC_DIR``).
    Set, it is emptied at start and given to job processes, and ``/metrics`` adds what job
    processes record there with prometheus-client to the server's own metrics. Not needed
    for the server's metrics, which the server process collects itself."""
    # -- ours: every timer is an option --------------------------------------------------------
    request_timeout: float = 2.5
    """Time ``request_fnc`` has to answer an offer; the server gives up after ~3 s."""
    assignment_timeout: float = 7.5
    """Time to wait for ``JobAssignment`` after accepting."""
    ping_interval: float = 2.5
    high_ping_threshold: float = 0.5
    ping_timeout: float = 60.0
    memory_sample_interval: float = 5.0
    load_sample_interval: float = 0.5
    status_interval: float = 2.5
    server_ping_interval: float = 5.0
    """How often the ``/agent`` connection is pinged (websocket ping)."""
    server_ping_timeout: float = 10.0
    """A LiveKit server that does not answer a ping within this is treated as gone: health
    503, reconnect. Silence is noticed within ``server_ping_interval + server_ping_timeout``
    (livekit-agents: about 46 s)."""
    use_zygote: bool = True
    """Fork job processes from a pre-imported template process (fast, memory shared);
    ``False`` starts each job process as a fresh interpreter."""


WorkerOptions = ServerOptions


def http_to_ws(url: str) -> str:
    """``http(s)://`` → ``ws(s)://``; a trailing ``/`` is dropped; a path prefix is kept."""
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError(
            f"LiveKit URL {url!r} is not a ws://, wss://, http:// or https:// URL "
            "(set --url or LIVEKIT_URL, e.g. ws://localhost:7880)"
        )
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def agent_url(ws_url: str) -> str:
    """The ``/agent`` endpoint under a LiveKit URL."""
    base = http_to_ws(ws_url)
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, parts.path + "/agent", parts.query, ""))


@final
@attrs.frozen(kw_only=True)
class RunConfig:
    """``ServerOptions`` with dev/prod values chosen and the environment applied."""

    options: ServerOptions
    devmode: bool
    ws_url: str
    api_key: str
    api_secret: str
    agent_name: str
    load_threshold: float
    num_idle_processes: int
    port: int
    log_level: str
    http_proxy: str | None
    prometheus_port: int | None = None
    prometheus_multiproc_dir: str | None = None


def resolve_options(
    options: ServerOptions,
    *,
    devmode: bool,
    environ: Mapping[str, str] | None = None,
    require_credentials: bool = True,
) -> RunConfig:
    """Apply the environment and the dev/prod defaults; raise ``ConfigError`` naming what is missing."""
    env = os.environ if environ is None else environ

    def pick(value: T | ServerEnvOption[T]) -> T:
        return value.getvalue(devmode) if isinstance(value, ServerEnvOption) else value

    ws_url = options.ws_url or env.get("LIVEKIT_URL", "")
    api_key = options.api_key or env.get("LIVEKIT_API_KEY", "")
    api_secret = options.api_secret or env.get("LIVEKIT_API_SECRET", "")
    if require_credentials:
        for value, variable, flag in (
            (ws_url, "LIVEKIT_URL", "--url"),
            (api_key, "LIVEKIT_API_KEY", "--api-key"),
            (api_secret, "LIVEKIT_API_SECRET", "--api-secret"),
        ):
            if not value:
                raise ConfigError(
                    f"{variable} is not set: export {variable}=... or pass {flag} "
                    f"(or the matching ServerOptions field)"
                )
    if ws_url:
        ws_url = http_to_ws(ws_url)
    threshold = float(pick(options.load_threshold))
    if math.isnan(threshold) or threshold <= 0:
        raise ConfigError(f"load_threshold must be > 0, got {threshold}")
    idle = int(pick(options.num_idle_processes))
    if idle < 0:
        raise ConfigError(f"num_idle_processes must be >= 0, got {idle}")
    prometheus_port = options.prometheus_port
    if prometheus_port is not None and not 0 <= prometheus_port <= 65535:
        raise ConfigError(f"prometheus_port must be a TCP port 0..65535 (0 picks a free one), "
                          f"got {prometheus_port}")
    if options.max_retry < 0:
        raise ConfigError(f"max_retry must be >= 0, got {options.max_retry}")
    for name in (
        "drain_timeout", "shutdown_process_timeout", "initialize_process_timeout",
        "request_timeout", "assignment_timeout", "ping_interval", "ping_timeout",
        "memory_sample_interval", "load_sample_interval", "status_interval",
        "server_ping_interval", "server_ping_timeout",
    ):
        if getattr(options, name) <= 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {getattr(options, name)}")
    return RunConfig(
        options=options,
        devmode=devmode,
        ws_url=ws_url,
        api_key=api_key,
        api_secret=api_secret,
        agent_name=options.agent_name or env.get("LIVEKIT_AGENT_NAME", ""),
        load_threshold=threshold,
        num_idle_processes=idle,
        port=int(pick(options.port)),
        log_level=str(pick(options.log_level)).upper(),
        http_proxy=options.http_proxy or env.get("HTTPS_PROXY") or env.get("HTTP_PROXY") or None,
        prometheus_port=prometheus_port,
        prometheus_multiproc_dir=(options.prometheus_multiproc_dir
                                  or env.get("PROMETHEUS_MULTIPROC_DIR") or None),
    )


def job_environment(config: RunConfig) -> dict[str, str]:
    """What a job process finds in its environment on top of the server's, as in
    livekit-agents: the server's ``LIVEKIT_URL``, ``LIVEKIT_API_KEY`` and
    ``LIVEKIT_API_SECRET`` (so LiveKit clients made in a job work unconfigured), and
    ``PROMETHEUS_MULTIPROC_DIR`` when a multiprocess directory is set."""
    env = {"LIVEKIT_URL": config.ws_url, "LIVEKIT_API_KEY": config.api_key,
           "LIVEKIT_API_SECRET": config.api_secret,
           "PROMETHEUS_MULTIPROC_DIR": config.prometheus_multiproc_dir or ""}
    return {name: value for name, value in env.items() if value}
