"""The health endpoint: a tiny ASGI app served by hypercorn on trio.

Readiness and liveness are separate questions, so they have separate paths (the peer answers
200 on ``/`` even while it is disconnected and retrying):

* ``GET /`` and ``GET /health/ready`` — readiness: 200 "OK" when registered with LiveKit and
  taking jobs, else 503 with a short reason ("not registered", "reconnecting to LiveKit",
  "failed to connect to LiveKit after N attempts", "draining"). Route traffic and roll
  deployments by this.
* ``GET /health/live`` — liveness: 200 whenever the event loop answers at all. Restart the
  process only when this fails; a server that is reconnecting is alive.
* ``GET /worker`` — JSON about the server. Every field is always present and typed (the peer
  omits zero values and makes ``active_jobs`` a float).
* ``GET /metrics`` — Prometheus metrics (``trio_agents._metrics``), when the server gives a
  ``metrics`` function; the ``prometheus_port`` endpoint serves only this path.

We bind the listening socket ourselves rather than give hypercorn a ``bind`` string: the port
is then known exactly (``port=0`` asks for a random one), a busy port is a ``ConfigError`` raised
before anything starts, and the socket is closed however we leave.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Protocol, final

import attrs
import trio

from ._errors import ConfigError
from ._version import __version__

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: Returns the ``/metrics`` body (the Prometheus text format).
MetricsFn = Callable[[], Awaitable[bytes]]

#: ``WorkerInfo.protocol_version`` of the peer's ``/worker``.
PROTOCOL_VERSION: Final = 1
#: How long in-flight health requests may finish after ``shutdown_trigger`` fires (hypercorn's
#: default is 3 s; a probe is answered in microseconds, and a stop must not wait on idle
#: keep-alive connections).
GRACEFUL_TIMEOUT: Final = 0.2

logger = logging.getLogger("trio_agents")


@final
@attrs.frozen(kw_only=True)
class HealthInfo:
    """A snapshot of the agent server for one health request."""

    ready: bool
    """Registered with LiveKit and taking jobs: ``/`` answers 200."""
    reason: str
    """Why not ready (the 503 body); empty when ready."""
    worker_id: str
    """``AW_…`` once registered; empty before."""
    agent_name: str
    worker_type: str
    """``"JT_ROOM"`` or ``"JT_PUBLISHER"``."""
    active_jobs: int
    load: float
    """The load last reported to LiveKit, 0..1."""
    draining: bool
    registered: bool


class HealthSource(Protocol):
    """What the health endpoint asks, once per request (``AgentServer`` is one)."""

    def health(self) -> HealthInfo: ...


@final
class HealthApp:
    """The ASGI application over a :class:`HealthSource`."""

    def __init__(self, source: HealthSource | None, metrics: MetricsFn | None = None) -> None:
        self._source = source
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if (scope["path"] == "/metrics" and self._metrics is not None
                and scope["method"] in ("GET", "HEAD")):
            from ._metrics import CONTENT_TYPE

            status, headers, body = 200, [(b"content-type", CONTENT_TYPE.encode())], \
                await self._metrics()
        else:
            status, headers, body = self.respond(scope["method"], scope["path"])
        await send({"type": "http.response.start", "status": status, "headers": [
            *headers, (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})

    def respond(self, method: str, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers, body) for a request: pure, so it is tested without a server."""
        text = [(b"content-type", b"text/plain; charset=utf-8")]
        paths = (("/", "/health/ready", "/health/live", "/worker")
                 if self._source is not None else ())
        if path not in paths and not (path == "/metrics" and self._metrics is not None):
            return 404, text, b"not found"
        if method not in ("GET", "HEAD"):
            return 405, [*text, (b"allow", b"GET, HEAD")], b"method not allowed"
        if path == "/health/live":
            return 200, text, b"OK"
        assert self._source is not None
        info = self._source.health()
        if path == "/worker":
            return 200, [(b"content-type", b"application/json")], worker_json(info)
        return (200, text, b"OK") if info.ready else (503, text, info.reason.encode())


def worker_json(info: HealthInfo) -> bytes:
    """The ``/worker`` body: every field, always, with its JSON type (int, float, bool)."""
    load = float(info.load)
    return json.dumps({
        "worker_id": info.worker_id,
        "agent_name": info.agent_name,
        "worker_type": info.worker_type,
        "active_jobs": int(info.active_jobs),
        "worker_load": round(load, 4) if math.isfinite(load) else 0.0,  # NaN is not JSON
        "draining": bool(info.draining),
        "registered": bool(info.registered),
        "sdk_version": __version__,
        "protocol_version": PROTOCOL_VERSION,
    }).encode()


async def _bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket on ``host:port``, or a ``ConfigError`` that says what to change.

    ``host=""`` is every IPv4 interface, as the peer's default. A name is resolved with trio's
    ``getaddrinfo`` (which does not block the loop); the bind itself is then numeric.
    """
    address = host.strip("[]") or "0.0.0.0"
    shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        infos = await trio.socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                              flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"cannot serve the health endpoint on {shown}: cannot resolve "
                          f"{address!r} ({exc}); check the host= option") from exc
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hints = {
            errno.EADDRINUSE: "another process is listening there: stop it, or choose another "
                              "port (the port= option; 0 picks a free one)",
            errno.EADDRNOTAVAIL: "that is not an address of this machine; check the host= "
                                 "option",
            errno.EACCES: "ports below 1024 need privileges: choose another port (the port= "
                          "option)",
        }
        hint = hints.get(exc.errno or 0, "check the host= and port= options")
        raise ConfigError(f"cannot serve the health endpoint on {shown}: "
                          f"{exc.strerror or exc}; {hint}") from exc
    return sock


async def serve_health(
    source: HealthSource | None,
    *,
    host: str,
    port: int,
    metrics: MetricsFn | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the health endpoint until cancelled, or until ``shutdown_trigger`` returns.

    Cancellation stops it at once (open connections are dropped: a probe retries).
    ``shutdown_trigger`` is hypercorn's graceful stop: requests in flight get
    :data:`GRACEFUL_TIMEOUT` to finish, then ``serve_health`` returns.

    Args:
        source: asked for a :class:`HealthInfo` on every request; ``None`` serves only
            ``/metrics`` (the ``prometheus_port`` endpoint).
        metrics: returns the ``/metrics`` body; ``None``: no ``/metrics``.
        host: address to listen on; ``""`` is every IPv4 interface.
        port: TCP port; ``0`` picks a free one.
        shutdown_trigger: an async function whose return asks for a graceful stop.
        task_status: ``started(bound_port)`` once the endpoint answers requests.

    Raises:
        ConfigError: the address is in use, not ours, privileged, or cannot be resolved.
    """
    from hypercorn.config import Config, Sockets
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    config = Config()
    config.accesslog = None  # a probe every few seconds is not worth a log line
    config.errorlog = logging.getLogger("hypercorn.error")  # through our handler, not stderr
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.include_server_header = False
    sock = await _bind(host, port, config.backlog)
    try:
        bound: int = sock.getsockname()[1]
        # hypercorn.trio.serve only takes bind strings; worker_serve (which serve calls after
        # wrapping the app) also takes the sockets we bound, so we know the port exactly.
        app = wrap_app(HealthApp(source, metrics),  # type: ignore[arg-type]
                       config.wsgi_max_body_size,
                       "asgi")
        sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])

        async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await worker_serve(app, config, sockets=sockets, shutdown_trigger=shutdown_trigger,
                               task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(run_hypercorn)
            if source is not None:
                logger.info("health endpoint on http://%s:%d/", host or "0.0.0.0", bound,
                            extra={"health_port": bound})
            else:
                logger.info("Prometheus metrics on http://%s:%d/metrics", host or "0.0.0.0",
                            bound, extra={"prometheus_port": bound})
            task_status.started(bound)
    finally:
        sock.close()  # hypercorn closes it when it served; not if cancelled while starting
