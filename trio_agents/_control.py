"""The control plane: the ``/agent`` connection, job offers, status and load reports.

Theory of operation
-------------------
``ControlPlane.run`` is one component of the server's nursery tree::

    ControlPlane.run                 started(worker_id) on the first registration
    ├── load sampler                 every load_sample_interval: load_fnc() -> Capacity
    ├── offers                       one task per AvailabilityRequest (outlives a connection)
    └── connection loop              connect, register, run a session; on loss back off and retry
        └── session                  one registered websocket
            ├── receive loop         ServerMessage -> AgentProtocol -> events
            ├── send loop            the only writer of data frames
            ├── keepalive            a websocket ping every server_ping_interval
            └── status ticker        UpdateWorkerStatus every status_interval and on change

A session ends when its socket breaks or the server falls silent: every loop that notices
records why and cancels the session's scope, and the connection loop decides to retry; jobs
are never touched by this. A 401/403 is a configuration error and is never retried.

Liveness: livekit-server answers websocket pings (it pings us every 10 s too, but never
checks). We ping every ``server_ping_interval`` (5 s) and a pong must come within
``server_ping_timeout`` (10 s): a server that hangs, or stops in the middle of a frame, is
noticed within 15 s (livekit-agents: about 46 s); ``registered`` turns false (health 503) and
we reconnect. A pong that is late only because the server keeps sending (it waits behind those
messages) or because our own backpressure stopped reading is waited for: only a server that
neither sent nor read anything since the ping is given up. Final statuses written are
confirmed by the next pong; those not confirmed when a session dies are sent again.

Backoff (``_backoff``): the failure count is reset only by a session that was heard from for
``HEALTHY_SESSION`` seconds after registering, so a server that registers and then breaks
the session costs an attempt every few seconds, not hundreds a second, and ``max_retry``
applies to it. Failed attempts are logged at most once per ``LOG_WINDOW`` with a count.

Nothing is lost across a reconnect: job statuses reported while no session can take them
(including those still in a dead session's outbox) are kept, bounded by ``MAX_UNSENT``, and
sent after the next registration, after ``migrate_job``, in the order they were reported.

Backpressure: the outbox is the send loop's queue. When ``OUTBOX_SIZE`` messages wait in it,
the receive loop stops reading (so a flood of offers waits in the server's socket, not in our
memory) until the send loop has written half of them. A server that reads nothing is noticed
by the keepalive; ``OUTBOX_LIMIT`` is the last resort, a clear error.

Admission (``_capacity``): a job counts from the moment it is accepted until its final status
(``active_jobs``, which is what ``load_fnc(server)`` reads). Offers ask ``Capacity.admit``;
one that must wait for a load sample waits (within the request deadline). Refusals are logged
with their reason, at most once per ``LOG_WINDOW`` per reason, with a count.

Offers outlive sessions on purpose: a job that was assigned keeps launching even if the socket
drops meanwhile. An answer for a session that is gone is dropped (that server forgot the job).
"""

from __future__ import annotations

import collections
import logging
import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, final
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket
from livekit.protocol import agent, models

from ._auth import worker_token
from ._backoff import failures_after, reconnect_delay
from ._capacity import Admission, Admit, Capacity, Refuse, Wait
from ._errors import (
    AssignmentTimeoutError,
    AuthenticationError,
    JobProcessError,
    LocalProtocolError,
    RemoteProtocolError,
    ServerConnectionError,
)
from ._jobs import JobAcceptArguments, JobRequest, JobSupervisor, RunningJobInfo
from ._load import CpuLoad, sanitize_load
from ._options import RequestFnc, RunConfig, agent_url
from ._protocol import (
    AgentProtocol,
    Ignored,
    JobAssigned,
    JobOffered,
    JobTerminated,
    Pong,
    Registered,
)
from ._ratelimit import RateLimiter, suppressed_note
from ._version import __version__

if TYPE_CHECKING:
    from ._metrics import ServerMetrics

logger = logging.getLogger("trio_agents")

#: livekit-server closes a socket that has not registered within 10 s; we give up as fast.
REGISTER_TIMEOUT: Final = 10.0
CONNECT_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 1.0
#: the largest message the server sends or accepts on /agent (2 MiB).
MAX_MESSAGE_SIZE: Final = 2 << 20
#: Messages waiting to be written at which the receive loop stops reading from the server.
OUTBOX_SIZE: Final = 256
#: Messages waiting at which the session is given up as stuck (a clear error, never silent).
OUTBOX_LIMIT: Final = 16 * OUTBOX_SIZE
#: Job statuses kept while disconnected; beyond it the oldest are dropped, with an error.
MAX_UNSENT: Final = 10_000
#: At most one line per kind of repeated event (refused offer, failed attempt) per window.
LOG_WINDOW: Final = 10.0

#: ``open_stream(host, port, tls)``: the seam between the control plane and the network.
OpenStream = Callable[[str, int, bool], Awaitable[trio.abc.Stream]]
#: Returns the current load, 0..1 (before sanitising); ``None``: the default CPU load.
LoadSampler = Callable[[], Awaitable[object]]
#: (job_id, status, error) of a job status not yet written to the server.
_Status = tuple[str, int, str]
_FINAL: Final = (agent.JS_SUCCESS, agent.JS_FAILED)


async def open_tcp_stream(host: str, port: int, tls: bool) -> trio.abc.Stream:
    """The default ``OpenStream``: TCP, with TLS for ``wss://``."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if tls:
        stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host)
    return stream


async def accept_all(request: JobRequest) -> None:
    """The default ``on_request``: take every job."""
    await request.accept()


class _ConnectionLost(Exception):
    """A connection attempt or session ended in a way that a retry may fix."""


@final
class _Session:
    """One registered connection. ``send`` never blocks: producers are bounded elsewhere (see
    the module doc, backpressure); reaching ``OUTBOX_LIMIT`` ends the session with a reason."""

    def __init__(self, proto: AgentProtocol, scope: trio.CancelScope) -> None:
        self.proto = proto
        self.scope = scope
        self.worker_id = proto.worker_id or ""
        self.lost_reason = ""
        self.registered_at = trio.current_time()
        self.last_heard = self.registered_at
        self.last_written = self.registered_at
        self.paused = False
        """The receive loop waits for room in the outbox (it is not reading)."""
        # a trio.Event in the outbox is a flush marker: set once everything before it is written
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[
            agent.WorkerMessage | trio.Event
        ](math.inf)
        self._room = trio.Event()
        self._room.set()
        self.unconfirmed: list[_Status] = []
        """Final job statuses written, but not yet followed by a pong (the server's reader
        may never have seen them), then the one whose write failed: sent again on the next
        session if this one dies."""

    def heard(self) -> None:
        self.last_heard = trio.current_time()

    @property
    def queued(self) -> int:
        return self.outbox_receive.statistics().current_buffer_used

    @property
    def owed(self) -> int:
        """Messages queued, and answers owed to offers already read."""
        return self.queued + self.proto.open_offers

    async def wait_for_room(self) -> None:
        """Backpressure for the receive loop: wait while ``OUTBOX_SIZE`` messages are queued
        or owed (an offer still in ``on_request`` will queue its answer later)."""
        if self.owed >= OUTBOX_SIZE:
            self._room = trio.Event()
            self.paused = True
            try:
                await self._room.wait()
            finally:
                self.paused = False

    def written(self) -> None:
        """The send loop wrote a message; readers may go on once half the outbox is free."""
        self.last_written = trio.current_time()
        if not self._room.is_set() and self.owed <= OUTBOX_SIZE // 2:
            self._room.set()

    @property
    def alive(self) -> bool:
        return not self.scope.cancel_called

    def lose(self, reason: str) -> None:
        if not self.lost_reason:
            self.lost_reason = reason
        self.scope.cancel()

    def close(self) -> list[_Status]:
        """No more sending; release anyone waiting for a flush of this session. Returns the job
        statuses that were never written or never confirmed, in order."""
        self.scope.cancel()
        self.outbox_send.close()
        self._room.set()
        unsent = self.unconfirmed
        self.unconfirmed = []
        while True:
            try:
                item = self.outbox_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return unsent
            if isinstance(item, trio.Event):
                item.set()
            elif item.WhichOneof("message") == "update_job":
                update = item.update_job
                unsent.append((update.job_id, update.status, update.error))

    def send(self, build: Callable[[AgentProtocol], agent.WorkerMessage]) -> bool:
        """Queue the message ``build(proto)``; ``False`` if this session can no longer send it."""
        if not self.alive:
            return False
        if self.queued >= OUTBOX_LIMIT:
            self.lose(f"{self.queued} messages are waiting to be written: the LiveKit server "
                      "is not reading from the connection")
            return False
        try:
            message = build(self.proto)
            self.outbox_send.send_nowait(message)
        except LocalProtocolError as exc:
            logger.debug("not sent on the old connection: %s", exc)
            return False
        except trio.ClosedResourceError:
            return False
        return True


@attrs.define(eq=False)
class _Assignment:
    event: trio.Event = attrs.field(factory=trio.Event)
    value: JobAssigned | None = None


@final
class ControlPlane:
    """Registers with LiveKit, answers offers, reports load and job status. See module doc."""

    def __init__(
        self,
        config: RunConfig,
        *,
        supervisor: JobSupervisor,
        request_fnc: RequestFnc | None = None,
        load_sampler: LoadSampler | None = None,
        open_stream: OpenStream = open_tcp_stream,
        rng: random.Random | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._config = config
        self.metrics = metrics
        self._options = config.options
        self._supervisor = supervisor
        self._request_fnc = request_fnc or accept_all
        self._load_sampler = load_sampler
        self._open_stream = open_stream
        self._rng = rng or random.Random()
        self.capacity = Capacity(threshold=config.load_threshold)
        self.worker_id = ""
        self.failure = ""
        self._session: _Session | None = None
        self._reported_status: int | None = None
        self._status_changed = trio.Event()
        self._capacity_changed = trio.Event()
        self._assignments: dict[str, _Assignment] = {}
        self._jobs: dict[str, RunningJobInfo] = {}
        self._unsent: collections.deque[_Status] = collections.deque()
        self._offers_in_flight = 0
        self._offers_done = trio.Event()
        self._offers_done.set()
        self._closing = False
        self._connect_scope = trio.CancelScope()
        self._log_limiter = RateLimiter(LOG_WINDOW)

    # -- state for the server and its health endpoint -----------------------------------------

    @property
    def registered(self) -> bool:
        return self._session is not None and self._session.alive

    @property
    def draining(self) -> bool:
        return self.capacity.draining

    @property
    def active_jobs(self) -> list[RunningJobInfo]:
        """Every job from its acceptance to its final status (the token is "" until the job
        is assigned)."""
        return list(self._jobs.values())

    def status(self) -> int:
        return self.capacity.status()

    def start_draining(self) -> None:
        """Refuse new offers and tell the server we are full; running jobs are not touched."""
        self.capacity.draining = True
        self._capacity_may_have_changed()

    async def wait_offers_done(self) -> None:
        """Return once no offer is being answered or launched."""
        await self._offers_done.wait()

    def report_job_status(self, job_id: str, status: int, error: str) -> None:
        """The supervisor's ``StatusReport``: forward a job status to the server.

        Without a session that can take it, the status is kept and sent after the next
        registration (see the module doc)."""
        if status in _FINAL:
            self._job_ended(job_id)
        session = self._session
        if session is None or not session.send(
                lambda proto: proto.update_job(job_id, status, error)):
            self._keep_unsent([(job_id, status, error)])
        self._capacity_may_have_changed()

    def _keep_unsent(self, statuses: list[_Status], *, first: bool = False) -> None:
        if first:
            self._unsent.extendleft(reversed(statuses))
        else:
            self._unsent.extend(statuses)
        dropped = 0
        while len(self._unsent) > MAX_UNSENT:
            self._unsent.popleft()
            dropped += 1
        if dropped:
            logger.error("%d job status(es) dropped: more than %d were waiting for LiveKit to "
                         "come back", dropped, MAX_UNSENT)

    async def flush(self) -> None:
        """Wait until every message queued so far is written (or the connection is gone)."""
        session = self._session
        if session is None or not session.alive:
            return
        marker = trio.Event()
        try:
            session.outbox_send.send_nowait(marker)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return
        await marker.wait()

    def close(self) -> None:
        """Stop: end the session with a websocket close handshake (while its reader still
        runs, so the peer's answer is read: no ``CLOSE_TIMEOUT`` wait) and do not reconnect;
        ``run`` then returns."""
        self._closing = True
        if self._session is not None and self._session.alive:
            self._session.lose("the agent server is stopping")
        else:
            self._connect_scope.cancel()  # connecting or backing off: nothing to close politely

    def simulate_job(self, room: str, participant_identity: str | None = None) -> None:
        """Ask the server to offer this worker a job for ``room`` (``SimulateJobRequest``)."""
        session = self._session
        if session is None:
            raise ServerConnectionError("not connected to LiveKit; cannot simulate a job")
        participant = (
            models.ParticipantInfo(identity=participant_identity) if participant_identity else None
        )
        session.send(lambda proto: proto.simulate_job(models.Room(name=room), participant))

    # -- the component ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; raise ``AuthenticationError`` or ``ServerConnectionError``."""
        failure: AuthenticationError | ServerConnectionError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample_load_forever)
            try:
                with self._connect_scope:
                    await self._connect_forever(nursery, task_status)
            except (AuthenticationError, ServerConnectionError) as exc:
                failure = exc  # raised below, outside the nursery: not wrapped in a group
            nursery.cancel_scope.cancel()  # failed, or close(): offers and sampling end too
        if failure is not None:
            raise failure

    async def _connect_forever(
        self, offers: trio.Nursery, task_status: trio.TaskStatus[str]
    ) -> None:
        url = agent_url(self._config.ws_url)
        failures = 0
        started = False

        def registered() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started(self.worker_id)

        while True:
            attempt = _Attempt()
            try:
                await self._connect_once(url, offers, registered, attempt)
                reason = "connection closed"
            except _ConnectionLost as exc:
                reason = str(exc)
            except AuthenticationError as exc:
                self.failure = str(exc)
                raise
            if self._closing:
                return
            # a cancel that arrived while the attempt failed is a cancel, not a failure
            await trio.lowlevel.checkpoint_if_cancelled()
            failures = failures_after(failures, registered_at=attempt.registered_at,
                                      last_heard=attempt.last_heard)
            if failures > self._options.max_retry:
                self.failure = (
                    f"failed to connect to LiveKit at {url} after {failures} attempts: {reason}"
                )
                raise ServerConnectionError(self.failure)
            delay = reconnect_delay(failures, self._rng)
            if self.metrics is not None:
                self.metrics.reconnecting()
            left_out = self._log_limiter.check("reconnect", trio.current_time())
            if left_out is not None:
                logger.warning(
                    "LiveKit connection failed: %s; retrying in %.1f s (attempt %d of %d)%s",
                    reason, delay, failures, self._options.max_retry, suppressed_note(left_out),
                    extra={"url": url},
                )
            await trio.sleep(delay)

    async def _connect_once(
        self, url: str, offers: trio.Nursery, registered: Callable[[], None], attempt: _Attempt
    ) -> None:
        """One connection attempt; returns or raises ``_ConnectionLost`` when it is over."""
        parts = urlsplit(url)
        tls = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        token = worker_token(self._config.api_key, self._config.api_secret)
        headers = [(b"Authorization", f"Bearer {token}".encode())]
        deadline = trio.current_time() + CONNECT_TIMEOUT
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await self._open_stream(host, port, tls)
        except trio.TooSlowError as exc:
            raise _ConnectionLost(f"no connection to {url} within {CONNECT_TIMEOUT:.0f} s") from exc
        except Exception as exc:
            raise _translate(exc, url) from exc
        async with stream:  # closed on every path, a refused handshake included
            try:
                # this nursery hosts trio-websocket's reader task, which is where a refused
                # handshake or a broken socket surfaces: translate them here, once
                async with trio.open_nursery() as nursery:
                    with trio.move_on_at(deadline) as upgrade:
                        ws = await trio_websocket.wrap_client_stream(
                            # typed for socket streams, but any trio Stream works (the dev
                            # server's in-memory streams in virtual-time tests)
                            nursery, stream, host, resource,  # type: ignore[arg-type]
                            extra_headers=headers, max_message_size=MAX_MESSAGE_SIZE,
                        )
                    if upgrade.cancelled_caught:
                        raise _ConnectionLost(
                            f"no websocket to {url} within {CONNECT_TIMEOUT:.0f} s")
                    try:
                        await self._run_session(ws, offers, registered, attempt)
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                            await ws.aclose()
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                leaves = _leaves(group)
                if any(isinstance(exc, trio.Cancelled) for exc in leaves):
                    raise  # a cancel stays a cancel, whatever else broke meanwhile
                if len(leaves) != 1:
                    raise
                raise _translate(leaves[0], url) from leaves[0].__cause__

    async def _run_session(
        self,
        ws: trio_websocket.WebSocketConnection,
        offers: trio.Nursery,
        registered: Callable[[], None],
        attempt: _Attempt,
    ) -> None:
        options = self._options
        proto = AgentProtocol(
            agent_name=self._config.agent_name,
            job_type=options.worker_type.value,
            version=__version__,
            permissions=options.permissions.to_proto(),
        )
        try:
            await ws.send_message(proto.register().SerializeToString())
            with trio.fail_after(REGISTER_TIMEOUT):
                event = proto.receive_data(await ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            raise _ConnectionLost(f"closed before registration ({_close_text(exc)})") from exc
        except trio.TooSlowError as exc:
            raise _ConnectionLost(f"no registration reply within {REGISTER_TIMEOUT:.0f} s") from exc
        except RemoteProtocolError as exc:
            raise _ConnectionLost(str(exc)) from exc
        assert isinstance(event, Registered)  # the protocol allows nothing else first
        with trio.CancelScope() as scope:
            session = _Session(proto, scope)
            attempt.session = session
            self._session = session
            self.worker_id = session.worker_id
            self.failure = ""
            self._reported_status = None
            logger.info(
                "registered worker %s", session.worker_id,
                extra={"worker_id": session.worker_id, "agent_name": self._config.agent_name,
                       "server_version": event.server_info.version,
                       "region": event.server_info.region},
            )
            running = [info.job.id for info in self._supervisor.running_jobs]
            if running:
                # the new connection has a new worker id; tell the server what still runs
                session.send(lambda p: p.migrate(running))
            self._send_unsent(session)
            if self.metrics is not None:
                self.metrics.registered_now()
            registered()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop, ws, session)
                    nursery.start_soon(self._status_loop, session)
                    nursery.start_soon(self._keepalive, ws, session)
                    await self._receive_loop(ws, session, offers)
            finally:
                self._session = None
                self._keep_unsent(session.close(), first=True)
                proto.close()
                self._capacity_may_have_changed()
        raise _ConnectionLost(session.lost_reason or "session ended")

    def _send_unsent(self, session: _Session) -> None:
        """Statuses kept while disconnected, in order, on the new session."""
        if self._unsent:
            logger.info("sending %d job status(es) kept while disconnected", len(self._unsent))
        while self._unsent:
            job_id, status, error = self._unsent[0]
            if not session.send(lambda p: p.update_job(job_id, status, error)):
                return
            self._unsent.popleft()

    async def _receive_loop(
        self, ws: trio_websocket.WebSocketConnection, session: _Session, offers: trio.Nursery
    ) -> None:
        while True:
            await session.wait_for_room()
            try:
                data = await ws.get_message()
                event = session.proto.receive_data(data)
            except trio_websocket.ConnectionClosed as exc:
                session.lose(f"closed by the server ({_close_text(exc)})")
                return
            except RemoteProtocolError as exc:
                session.lose(f"protocol error from the server: {exc}")
                return
            session.heard()
            if isinstance(event, JobOffered):
                self._offer_started()
                offers.start_soon(self._answer_offer, session, event.job, trio.current_time())
            elif isinstance(event, JobAssigned):
                pending = self._assignments.get(event.job.id)
                if pending is None:
                    logger.warning("received an assignment for an unknown job %s", event.job.id)
                else:
                    pending.value = event
                    pending.event.set()
            elif isinstance(event, JobTerminated):
                logger.info("LiveKit terminated job %s", event.job_id,
                            extra={"job_id": event.job_id})
                self._supervisor.terminate(event.job_id, "terminated by the LiveKit server")
            elif isinstance(event, Ignored):
                logger.debug("ignored: %s", event.reason)
            elif isinstance(event, Pong):
                pass
            else:  # pragma: no cover - Registered is impossible here (the protocol rejects it)
                raise AssertionError(event)

    async def _send_loop(self, ws: trio_websocket.WebSocketConnection, session: _Session) -> None:
        async for message in session.outbox_receive:
            if isinstance(message, trio.Event):
                message.set()
                continue
            try:
                await ws.send_message(message.SerializeToString())
            except trio_websocket.ConnectionClosed as exc:
                if message.WhichOneof("message") == "update_job":  # not written: keep it
                    update = message.update_job  # (close() returns it, before the rest)
                    session.unconfirmed.append((update.job_id, update.status, update.error))
                session.lose(f"closed while sending ({_close_text(exc)})")
                return
            if (message.WhichOneof("message") == "update_job"
                    and message.update_job.status in _FINAL):
                update = message.update_job
                session.unconfirmed.append((update.job_id, update.status, update.error))
            session.written()

    async def _keepalive(self, ws: trio_websocket.WebSocketConnection, session: _Session) -> None:
        """A websocket ping every ``server_ping_interval``; no pong within
        ``server_ping_timeout`` ends the session (see the module doc)."""
        interval = self._options.server_ping_interval
        timeout = self._options.server_ping_timeout
        while True:
            await trio.sleep(interval)
            # the server answers a ping once its reader got there: what was written before it
            # has been read
            written = len(session.unconfirmed)
            while True:
                sent_at = trio.current_time()
                with trio.move_on_after(timeout) as waited:
                    try:
                        await ws.ping()
                    except trio_websocket.ConnectionClosed as exc:
                        session.lose(f"closed by the server ({_close_text(exc)})")
                        return
                if not waited.cancelled_caught:
                    break
                # No pong, but the server may be fine: it kept sending (the pong waits behind
                # its messages), or we stopped reading (backpressure) while it kept reading
                # what we wrote. Only a server that did neither is gone.
                if not (session.last_heard >= sent_at
                        or (session.paused and session.last_written >= sent_at)):
                    session.lose(
                        f"the LiveKit server did not answer a ping within {timeout:g} s")
                    return
            session.heard()
            del session.unconfirmed[:written]

    async def _status_loop(self, session: _Session) -> None:
        while True:
            changed = self._status_changed
            status = self.status()
            jobs = self.capacity.active_jobs
            load = self.capacity.load
            self._reported_status = status
            # send() calls the builder at once, inside this iteration
            session.send(lambda p: p.update_worker(status=status, load=load, job_count=jobs))
            with trio.move_on_after(self._options.status_interval):
                await changed.wait()

    def _capacity_may_have_changed(self) -> None:
        """Wake offers waiting for admission, and report a change of status."""
        self._capacity_changed.set()
        self._capacity_changed = trio.Event()
        status = self.status()
        if status == self._reported_status:
            return
        if self._reported_status is not None:
            extra = {"load": round(self.capacity.load, 3),
                     "active_jobs": self.capacity.active_jobs,
                     "reserved": self.capacity.reserved}
            if status == agent.WS_FULL:
                logger.info("worker is %s, marking it unavailable",
                            "draining" if self.draining else "full", extra=extra)
            else:
                logger.info("worker is below capacity, marking it available", extra=extra)
        self._reported_status = status
        self._status_changed.set()
        self._status_changed = trio.Event()

    async def _sample_load_forever(self) -> None:
        cpu = CpuLoad() if self._load_sampler is None else None
        previous_mark = self.capacity.mark()
        last_problem: str | None = None
        while True:
            mark = self.capacity.mark()
            job_load: float | None = None
            try:
                if cpu is not None:
                    average = cpu.sample(trio.current_time())
                    # the moving average lags a new job: admission also sees the last interval,
                    # and learns the weight of the jobs that ran through all of it
                    raw: object = max(average, cpu.last or 0.0)
                    job_load = cpu.last
                    reflects = previous_mark
                else:
                    raw = await self._load_sampler()  # type: ignore[misc]
                    reflects = mark
            except Exception:
                logger.exception("load_fnc raised; keeping the last load %.2f", self.capacity.load)
            else:
                value, problem = sanitize_load(raw)
                if problem and problem != last_problem:  # once per kind of problem, not per tick
                    logger.warning("load_fnc returned %r: %s; using %.2f", raw, problem, value)
                last_problem = problem
                self.capacity.sampled(value, mark=reflects, job_load=job_load)
                self._capacity_may_have_changed()
            previous_mark = mark
            await trio.sleep(self._options.load_sample_interval)

    # -- offers -------------------------------------------------------------------------------

    def _offer_started(self) -> None:
        if self._offers_in_flight == 0:
            self._offers_done = trio.Event()
        self._offers_in_flight += 1

    def _offer_finished(self) -> None:
        self._offers_in_flight -= 1
        if self._offers_in_flight == 0:
            self._offers_done.set()

    async def _admission(self, deadline: float) -> Admission:
        """Ask ``Capacity`` until it admits or refuses, or the request deadline passes."""
        decision: Admission = Wait("")
        with trio.move_on_at(deadline):
            while True:
                decision = self.capacity.admit()
                if not isinstance(decision, Wait):
                    return decision
                await self._capacity_changed.wait()
        assert isinstance(decision, Wait)
        return Refuse(f"no load sample could price it within the request deadline "
                      f"({decision.reason})", "reserved")

    async def _answer_offer(self, session: _Session, job: agent.Job, received: float) -> None:
        deadline = received + self._options.request_timeout
        try:
            decision = await self._admission(deadline)
            if isinstance(decision, Refuse):
                self._log_refusal(job, decision)
                if self.metrics is not None:
                    self.metrics.offer_answered("rejected")
                session.send(lambda p: p.answer(
                    agent.AvailabilityResponse(job_id=job.id, available=False)))
                return
            assert isinstance(decision, Admit)
            offer = _Offer(self, session, job, deadline)
            try:
                self._capacity_may_have_changed()
                await offer.run()
            finally:
                if offer.holds_reservation:
                    self.capacity.release()
                self._capacity_may_have_changed()
        finally:
            self._offer_finished()

    def _log_refusal(self, job: agent.Job, refusal: Refuse) -> None:
        left_out = self._log_limiter.check(f"refuse:{refusal.kind}", trio.current_time())
        if left_out is not None:
            logger.info("refusing job %s: %s%s", job.id, refusal.reason,
                        suppressed_note(left_out),
                        extra={"job_id": job.id, "room": job.room.name,
                               "reason": refusal.kind, "left_out": left_out})

    def _job_accepted(self, info: RunningJobInfo) -> None:
        self.capacity.accepted(info.job.id)
        self._jobs[info.job.id] = info
        self._capacity_may_have_changed()

    def _job_ended(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        if self.capacity.ended(job_id):
            self._capacity_may_have_changed()


@final
class _Attempt:
    """What the backoff needs to know of one connection attempt."""

    def __init__(self) -> None:
        self.session: _Session | None = None

    @property
    def registered_at(self) -> float | None:
        return self.session.registered_at if self.session else None

    @property
    def last_heard(self) -> float:
        return self.session.last_heard if self.session else 0.0


@final
class _Offer:
    """One job offer: runs ``on_request`` under its deadline and carries out its answer."""

    def __init__(self, control: ControlPlane, session: _Session, job: agent.Job,
                 deadline: float) -> None:
        self._control = control
        self._session = session
        self._job = job
        self._received_at = time.time()
        self._deadline = deadline
        self._answer_scope = trio.CancelScope()
        self._extra = {"job_id": job.id, "room": job.room.name, "agent_name": job.agent_name}
        self.holds_reservation = True
        """The admission slot is still this offer's (not yet turned into an active job)."""

    async def run(self) -> None:
        control = self._control
        request = JobRequest(self._job, agent_name=control._config.agent_name, channel=self)
        timeout = control._options.request_timeout
        with self._answer_scope:
            self._answer_scope.deadline = self._deadline
            try:
                await control._request_fnc(request)
            except AssignmentTimeoutError as exc:
                # a server that accepts and never assigns does it to every offer: one line a
                # window, with a count
                left_out = control._log_limiter.check("assignment-timeout", trio.current_time())
                if left_out is not None:
                    logger.warning("%s%s", exc, suppressed_note(left_out), extra=self._extra)
            except JobProcessError as exc:
                # from accept(): the job was accepted and assigned, and the supervisor already
                # reported it JS_FAILED; on_request did nothing wrong and nothing is rejected
                logger.error("job %s was accepted but could not be launched: %s", self._job.id,
                             exc, extra=self._extra)
            except Exception:
                logger.exception("on_request raised for job %s; rejecting it", self._job.id,
                                 extra=self._extra)
        if request.answered:
            return
        if self._answer_scope.cancelled_caught:
            logger.warning(
                "on_request did not answer job %s within %.1f s; rejecting it "
                "(LiveKit gives an offer about 3 s)", self._job.id, timeout, extra=self._extra)
        else:
            logger.warning("on_request returned without accepting or rejecting job %s; "
                           "rejecting it", self._job.id, extra=self._extra)
        self.answer(agent.AvailabilityResponse(job_id=self._job.id, available=False))

    def answer(self, response: agent.AvailabilityResponse) -> None:
        if self._control.metrics is not None:
            self._control.metrics.offer_answered(
                "timeout" if self._answer_scope.cancelled_caught else "rejected")
        self._session.send(lambda p: p.answer(response))

    async def accepted(self, args: JobAcceptArguments) -> None:
        control = self._control
        job_id = self._job.id
        # The answer is given: from here the request deadline no longer applies; the
        # assignment and launch are bounded by their own timeouts.
        self._answer_scope.deadline = math.inf
        if control.metrics is not None:
            control.metrics.offer_answered("accepted")
        accepted_at = time.time()
        info = RunningJobInfo(
            accept_arguments=args,
            job=self._job,
            url=control._config.ws_url,
            token="",
            worker_id=self._session.worker_id,
            received_at=self._received_at,
            accepted_at=accepted_at,
        )
        # the job counts from now on (active_jobs, load_fnc, admission) until its final status
        control._job_accepted(info)
        self.holds_reservation = False
        pending = control._assignments[job_id] = _Assignment()
        try:
            try:
                sent = self._session.send(lambda p: p.answer(agent.AvailabilityResponse(
                    job_id=job_id,
                    available=True,
                    participant_identity=args.identity,
                    participant_name=args.name,
                    participant_metadata=args.metadata,
                    participant_attributes=dict(args.attributes),
                )))
                timeout = control._options.assignment_timeout
                if sent:
                    with trio.move_on_after(timeout):
                        await pending.event.wait()
                if pending.value is None:
                    self._session.proto.forget(job_id)
                    raise AssignmentTimeoutError(
                        f"job {job_id} was accepted but LiveKit did not assign it within "
                        f"{timeout:.1f} s (the server drops offers answered after about 3 s)"
                        if sent else
                        f"job {job_id} was accepted but the connection it came on is gone"
                    )
            finally:
                del control._assignments[job_id]
            assigned = pending.value
            info = attrs.evolve(
                info, job=assigned.job, url=assigned.url or control._config.ws_url,
                token=assigned.token, assigned_at=time.time())
            if job_id in control._jobs:
                control._jobs[job_id] = info
            logger.info("job %s assigned, launching it", job_id, extra=self._extra)
            await control._supervisor.launch(info)
        except Exception:
            # never assigned, or no process could take it (the supervisor reported JS_FAILED):
            # the job is over either way
            control._job_ended(job_id)
            raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _translate(exc: BaseException, url: str) -> BaseException:
    """Map an error of the network stack to ours: a 401/403 is a configuration error (never
    retried), anything else that a new connection may fix is ``_ConnectionLost``."""
    if isinstance(exc, (_ConnectionLost, AuthenticationError)):
        return exc
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = (exc.body or b"").decode(errors="replace").strip()
        if exc.status_code in (401, 403):
            return AuthenticationError(
                f"LiveKit at {url} rejected our credentials (HTTP {exc.status_code}: {body}). "
                "Check LIVEKIT_API_KEY and LIVEKIT_API_SECRET (or --api-key/--api-secret).")
        return _ConnectionLost(f"HTTP {exc.status_code} from {url}: {body}")
    if isinstance(exc, trio_websocket.ConnectionClosed):
        return _ConnectionLost(f"closed by the server ({_close_text(exc)})")
    if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                        trio_websocket.HandshakeError)):
        detail = str(exc) or (str(exc.__cause__) if exc.__cause__ else type(exc).__name__)
        return _ConnectionLost(f"cannot reach {url}: {detail}")
    return exc


def _close_text(exc: trio_websocket.ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close reason"
    text = f"code {reason.code} {reason.name}"
    return f"{text}: {reason.reason}" if reason.reason else text

