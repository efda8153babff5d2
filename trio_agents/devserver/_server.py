"""The dev server: LiveKit's agent dispatch, rooms and Twirp API, faithful to livekit-server
for everything an agent server can observe (PROTOCOL.md; its §9.4 is the checklist).

Theory of operation
-------------------
``open_dev_server`` owns one nursery: the TCP listener (unless ``listen=False``), one task per
connection (``handle_stream``), and the tasks of the parts below. Workers, jobs and rooms are
plain records in dicts (``_records.py``); every change calls ``Changes.changed()``, which wakes
``wait_until`` — tests and tools wait for a state, they never poll.

``DevServer`` is the public face: it routes each request and hands each call to the one part
that owns what it changes:

* ``Dispatcher`` (``_dispatcher.py``): workers on ``/agent``, jobs, offers and assignments;
* ``Rooms`` (``_rooms.py``): rooms, dispatch records, participants and their sessions on
  ``/rtc`` (the session protocol itself is ``_rtc.py``);
* ``Tracks`` (``_tracks.py``): published tracks, subscriptions and forwarding, with
  ``MediaHost`` (``_media.py``) running aiortc;
* Twirp (``_twirp.py``) decodes API calls into ``DevServer`` methods.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import types
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Final, NoReturn, final

import trio

from .._auth import Claims, TokenError, verify_token
from .._errors import ConfigError
from ._dispatcher import AVAILABILITY_TIMEOUT, REGISTER_TIMEOUT, Dispatcher
from ._http import Request, Response, SessionHandler, serve_http
from ._media import MediaHost
from ._records import Changes, JobInfo, RoomInfo, WorkerInfo
from ._rooms import NOT_FOUND, Rooms
from ._rtc import JOIN_TIMEOUT
from ._tracks import Tracks

logger = logging.getLogger("trio_agents.devserver")

__all__ = ["AVAILABILITY_TIMEOUT", "REGISTER_TIMEOUT", "DevServer", "open_dev_server"]

RTC_PATHS: Final = frozenset({"/rtc", "/rtc/v1", "/rtc/validate", "/rtc/v1/validate"})


@final
class DevServer:
    """A local LiveKit server for agents. Build it with ``open_dev_server``.

    Python API (tests, the CLI demo): ``create_room``, ``delete_room``, ``create_dispatch``,
    ``delete_dispatch``, ``add_participant``, ``publish_track``, ``remove_participant``,
    ``update_participant``, ``mute_published_track``, ``update_subscriptions``,
    ``update_room_metadata``, ``send_data``, ``drop_worker``;
    read-only views ``workers``, ``jobs``, ``rooms``; ``wait_until``. Real participants join
    on ``/rtc`` (``_rtc.py``) with a LiveKit SDK.
    Errors a client would get from Twirp are raised as ``trio_agents.api.TwirpError``.
    """

    def __init__(self, nursery: trio.Nursery, *, api_key: str, api_secret: str,
                 availability_timeout: float = AVAILABILITY_TIMEOUT,
                 register_timeout: float = REGISTER_TIMEOUT,
                 rng: random.Random | None = None, rtc_address: str | None = None,
                 join_timeout: float = JOIN_TIMEOUT, rtc_v1: bool = False,
                 enable_remote_unmute: bool = False) -> None:
        _check_options(api_key, api_secret, availability_timeout, register_timeout)
        if not join_timeout > 0:
            raise ConfigError(f"the join timeout ({join_timeout}) must be a positive number of "
                              "seconds (math.inf: never remove a participant for it)")
        self._nursery = nursery
        self.api_key = api_key
        self.api_secret = api_secret
        self.media = MediaHost(rtc_address)
        self._secrets = {api_key: api_secret}
        self._changes = Changes()
        self._dispatcher = Dispatcher(
            nursery, self._changes, secrets=self._secrets,
            availability_timeout=availability_timeout, register_timeout=register_timeout,
            rng=rng or random.Random())
        self._rooms = Rooms(nursery, self._changes, self._dispatcher, self.media,
                            secrets=self._secrets, join_timeout=join_timeout, rtc_v1=rtc_v1)
        self._tracks = Tracks(nursery, self._rooms, enable_remote_unmute=enable_remote_unmute)
        self._connections: set[trio.CancelScope] = set()
        self._closed = False
        self.host = "127.0.0.1"
        self.port = 0
        # the Python API: each call goes to the part that owns what it changes
        rooms = self._rooms
        self.create_room = rooms.create_room
        self.delete_room = rooms.delete_room
        self.create_dispatch = rooms.create_dispatch
        self.delete_dispatch = rooms.delete_dispatch
        self.list_dispatches = rooms.list_dispatches
        self.add_participant = rooms.add_participant
        self.publish_track = rooms.publish_track
        self.remove_participant = rooms.remove_participant
        self.update_participant = rooms.update_participant
        self.update_room_metadata = rooms.update_room_metadata
        self.send_data = rooms.send_data
        self.mute_published_track = self._tracks.mute_published_track
        self.update_subscriptions = self._tracks.update_subscriptions
        self.drop_worker = self._dispatcher.drop_worker
        self.wait_until = self._changes.wait_until

    # -- inspection -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``ws://host:port`` — what ``LIVEKIT_URL`` should be (only meaningful when listening)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def workers(self) -> Mapping[str, WorkerInfo]:
        """Registered workers by id (a read-only view of live records)."""
        return types.MappingProxyType(self._dispatcher._workers)

    @property
    def jobs(self) -> Mapping[str, JobInfo]:
        """Every job the server created, by id (a read-only view of live records)."""
        return types.MappingProxyType(self._dispatcher._jobs)

    @property
    def rooms(self) -> Mapping[str, RoomInfo]:
        """Live rooms by name (a read-only view of live records)."""
        return types.MappingProxyType(self._rooms._rooms)

    @property
    def availability_timeout(self) -> float:
        return self._dispatcher.availability_timeout

    @property
    def register_timeout(self) -> float:
        return self._dispatcher.register_timeout

    @property
    def join_timeout(self) -> float:
        return self._rooms.join_timeout

    @property
    def rtc_v1(self) -> bool:
        return self._rooms.rtc_v1

    @property
    def enable_remote_unmute(self) -> bool:
        return self._tracks.enable_remote_unmute

    # -- connections ------------------------------------------------------------------------

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (TCP or in-memory) until it closes; it is closed on return.

        It may run in any nursery: when the server closes, its connections are cut too.
        """
        if self._closed:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                await serve_http(stream, self._route)
            finally:
                self._connections.discard(scope)

    def _close(self) -> None:
        """Cut every connection, wherever its task runs (``open_dev_server`` on exit)."""
        self._closed = True
        for scope in self._connections:
            scope.cancel()

    async def _route(self, request: Request) -> Response | SessionHandler:
        from ._twirp import handle_twirp

        claims = self.authenticate(request)  # the middleware runs before any handler
        if isinstance(claims, Response):
            return claims
        if request.path == "/agent":
            if not request.wants_websocket:
                return Response(404, NOT_FOUND)
            if claims is None or claims.video is None or not claims.video.agent:
                return Response(401, b"no permissions to access the room")
            return functools.partial(self._dispatcher._agent_session,
                                     api_key=claims.api_key)
        if request.path in RTC_PATHS:
            return await self._rooms._rtc(request, claims)
        if request.path.startswith("/twirp/"):
            return await handle_twirp(self, request, claims)
        if request.path == "/" and request.method in ("GET", "HEAD"):
            return Response(200, b"OK")
        return Response(404, NOT_FOUND)

    def authenticate(self, request: Request) -> Claims | Response | None:
        """``APIKeyAuthMiddleware``: the claims, a plain-text 401, or ``None`` (no token)."""
        header = request.header("authorization")
        if header:
            if not header.startswith("Bearer "):
                return Response(401, b"invalid authorization header. Must start with Bearer ")
            token = header[len("Bearer "):]
        else:
            token = request.param("access_token")
        if not token:
            return None
        try:
            return verify_token(token, self._secrets)
        except TokenError as exc:
            return Response(401, str(exc).encode())



def _check_options(api_key: str, api_secret: str, availability_timeout: float,
                   register_timeout: float) -> None:
    if not api_key or not api_secret:
        raise ConfigError("the dev server needs an API key and secret (e.g. --api-key devkey "
                          "--api-secret secret)")
    if not availability_timeout > 0 or not register_timeout > 0:
        raise ConfigError(f"the availability timeout ({availability_timeout}) and the register "
                          f"timeout ({register_timeout}) must be positive numbers of seconds")




@asynccontextmanager
async def open_dev_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str = "devkey",
    api_secret: str = "secret",
    availability_timeout: float = AVAILABILITY_TIMEOUT,
    register_timeout: float = REGISTER_TIMEOUT,
    listen: bool = True,
    rng: random.Random | None = None,
    rtc_address: str | None = None,
    join_timeout: float = JOIN_TIMEOUT,
    rtc_v1: bool = False,
    enable_remote_unmute: bool = False,
) -> AsyncIterator[DevServer]:
    """Run a dev server for the duration of the block; everything it started ends with it.

    Args:
        host, port: where to listen (port 0 picks a free one; ``dev.port`` tells which).
        api_key, api_secret: the one key pair it accepts (``livekit-server --dev``'s default).
        availability_timeout: how long a job may take to be accepted, retries on other
            workers included (3 s on a stock livekit-server).
        register_timeout: how long a new connection has to register (10 s).
        listen: ``False`` binds nothing: serve connections with ``dev.handle_stream``
            (in-memory tests in virtual time).
        rng: the source of the weighted worker choice (seed it for reproducible tests).
        rtc_address: the one host address WebRTC is offered on (never loopback: WebRTC does
            not use it); default: the first non-loopback IPv4 address of this host. Only
            participants joining on ``/rtc`` need it (and the ``devserver-rtc`` extra).
        join_timeout: how long a participant has to complete WebRTC before it is removed
            with ``JOIN_FAILURE`` (60 s, as livekit-server; ``math.inf`` disables it).
        rtc_v1: also serve ``/rtc/v1``, the single-peer-connection signaling of newer
            livekit-servers, data only (no media). Off by default: as livekit-server 1.8.3,
            ``/rtc/v1`` is not found, and the SDKs fall back to ``/rtc`` with two peer
            connections, on which media is forwarded.
        enable_remote_unmute: let ``MutePublishedTrack`` unmute (``room.enable_remote_unmute``
            of livekit-server; off, unmuting is ``failed_precondition``).
    Raises:
        ConfigError: the address cannot be listened on (e.g. the port is in use).
    """
    _check_options(api_key, api_secret, availability_timeout, register_timeout)
    listeners: list[trio.SocketListener] = []
    if listen:  # bound before the nursery opens, so a busy port is a plain ConfigError
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            hint = (f"stop the other server using port {port} or pick another port "
                    "(--port, or port=0 for a free one)"
                    if exc.errno == errno.EADDRINUSE else "check the host and port")
            raise ConfigError(f"the dev server cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}; {hint}") from exc
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            dev = DevServer(nursery, api_key=api_key, api_secret=api_secret,
                            availability_timeout=availability_timeout,
                            register_timeout=register_timeout, rng=rng,
                            rtc_address=rtc_address, join_timeout=join_timeout, rtc_v1=rtc_v1,
                            enable_remote_unmute=enable_remote_unmute)
            if listeners:
                dev.host = host
                dev.port = listeners[0].socket.getsockname()[1]
                nursery.start_soon(trio.serve_listeners, dev.handle_stream, listeners)
            try:
                yield dev
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                dev._close()
                if dev.media.peers:  # let the sessions close their peers while the loop runs
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                        await dev.wait_until(lambda: not dev.media.peers)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The block's own error, alone: raise it as it was raised, not wrapped in the group
        # of the nursery that happens to surround the block.
        if body_error is None or list(group.exceptions) != [body_error]:
            raise
        _reraise_unwrapped(body_error)
    finally:
        for listener in listeners:  # serve_listeners closes them, unless it never started
            with trio.CancelScope(shield=True):
                await listener.aclose()


def _reraise_unwrapped(error: BaseException) -> NoReturn:
    cause, context, suppress = error.__cause__, error.__context__, error.__suppress_context__
    try:
        raise error
    finally:  # keep the error's own chain, not "during handling of the group ..."
        error.__cause__, error.__context__ = cause, context
        error.__suppress_context__ = suppress
