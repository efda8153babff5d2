"""The health endpoint, a tiny ASGI app served by hypercorn on trio.

* ``GET /`` and ``GET /health/ready``: readiness — 200 "OK" when registered with LiveKit and
  taking jobs, else 503 with the reason (not registered, reconnecting, retries exhausted,
  draining). A load balancer or orchestrator should route by this.
* ``GET /health/live``: liveness — 200 while the process's event loop answers at all.
* ``GET /worker``: JSON about the server. Every field is always present and typed (the peer
  omits zero values and makes ``active_jobs`` a float).
"""

from __future__ import annotations

import errno
import json
import logging
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

PROTOCOL_VERSION: Final = 1


@final
@attrs.frozen(kw_only=True)
class HealthInfo:
    ready: bool
    reason: str
    worker_id: str
    agent_name: str
    worker_type: str
    active_jobs: int
    load: float
    draining: bool
    registered: bool


class HealthSource(Protocol):
    def health(self) -> HealthInfo: ...


@final
class HealthApp:
    """The ASGI application over a ``HealthSource``."""

    def __init__(self, source: HealthSource) -> None:
        self._source = source

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
        status, content_type, body = self.respond(scope["method"], scope["path"])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})

    def respond(self, method: str, path: str) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for a request: pure, so tests need no server."""
        text = b"text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed"
        if path == "/health/live":
            return 200, text, b"OK"
        info = self._source.health()
        if path in ("/", "/health/ready"):
            return (200, text, b"OK") if info.ready else (503, text, info.reason.encode())
        if path == "/worker":
            body = {
                "worker_id": info.worker_id,
                "agent_name": info.agent_name,
                "worker_type": info.worker_type,
                "active_jobs": info.active_jobs,
                "worker_load": round(info.load, 4),
                "draining": info.draining,
                "registered": info.registered,
                "ready": info.ready,
                "sdk_version": __version__,
                "protocol_version": PROTOCOL_VERSION,
            }
            return 200, b"application/json", json.dumps(body).encode()
        return 404, text, b"not found"


def _bind(address: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen ourselves, so the bound port is known and a failure leaks nothing."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = ("another process is listening there: stop it or choose another port "
                "(port= option)" if exc.errno == errno.EADDRINUSE else "check host= and port=")
        raise ConfigError(f"cannot serve the health endpoint on {address}:{port}: "
                          f"{exc.strerror or exc}; {hint}") from exc
    return sock


async def serve_health(
    source: HealthSource,
    *,
    host: str,
    port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started(bound_port)`` once listening (``port=0``: random).

    Raises:
        ConfigError: the address is in use or cannot be bound.
    """
    from hypercorn.config import Config, Sockets
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 0.5
    address = host or "0.0.0.0"
    sock = _bind(address, port, config.backlog)
    bound = sock.getsockname()[1]
    sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])
    logging.getLogger("trio_agents").info("health endpoint on http://%s:%d", address, bound,
                                          extra={"health_port": bound})
    # worker_serve rather than serve: it takes the sockets we bound (and know the port of)
    app = wrap_app(HealthApp(source), config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]

    async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await worker_serve(app, config, sockets=sockets, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(_serve)
        task_status.started(bound)
