"""The control plane: the ``/agent`` connection, job offers, status and load reports.

Theory of operation
-------------------
``ControlPlane.run`` is one component of the server's nursery tree::

    ControlPlane.run                 started(worker_id) on the first registration
    ├── load sampler                 every load_sample_interval: load_fnc() -> Capacity.load
    ├── offers                       one task per AvailabilityRequest (outlives a connection)
    └── connection loop              connect, register, run a session; on loss back off and retry
        └── session                  one registered websocket
            ├── receive loop         ServerMessage -> AgentProtocol -> events
            ├── send loop            the only writer of the websocket
            └── status ticker        UpdateWorkerStatus every status_interval and on change

A session ends when its socket breaks: every loop that notices records why and cancels the
session's scope, and the connection loop decides to retry; jobs are never touched by this.
The retry counter is reset only by a successful registration. A 401/403 is a configuration
error and is never retried.

Offers outlive sessions on purpose: a job that was assigned keeps launching even if the socket
drops meanwhile. An answer for a session that is gone is dropped (that server forgot the job).
"""

from __future__ import annotations

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
from ._backoff import reconnect_delay
from ._capacity import Capacity
from ._errors import (
    AssignmentTimeoutError,
    AuthenticationError,
    JobProcessError,
    LocalProtocolError,
    RemoteProtocolError,
    ServerConnectionError,
)
from ._jobs import JobAcceptArguments, JobRequest, JobSupervisor, RunningJobInfo
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
OUTBOX_SIZE: Final = 256

#: ``open_stream(host, port, tls)``: the seam between the control plane and the network.
OpenStream = Callable[[str, int, bool], Awaitable[trio.abc.Stream]]
#: Returns the current load, 0..1 (before sanitising).
LoadSampler = Callable[[], Awaitable[object]]


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
    """One registered connection. ``send`` never blocks; overflow means the socket is stuck."""

    def __init__(self, proto: AgentProtocol, scope: trio.CancelScope) -> None:
        self.proto = proto
        self.scope = scope
        self.worker_id = proto.worker_id or ""
        self.lost_reason = ""
        # a trio.Event in the outbox is a flush marker: set once everything before it is written
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[
            agent.WorkerMessage | trio.Event
        ](OUTBOX_SIZE)

    @property
    def alive(self) -> bool:
        return not self.scope.cancel_called

    def lose(self, reason: str) -> None:
        if not self.lost_reason:
            self.lost_reason = reason
        self.scope.cancel()

    def close(self) -> None:
        """No more sending; release anyone waiting for a flush of this session."""
        self.scope.cancel()
        self.outbox_send.close()
        while True:
            try:
                item = self.outbox_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if isinstance(item, trio.Event):
                item.set()

    def send(self, build: Callable[[AgentProtocol], agent.WorkerMessage]) -> bool:
        """Queue the message ``build(proto)``; ``False`` if this session can no longer send it."""
        if not self.alive:
            return False
        try:
            message = build(self.proto)
            self.outbox_send.send_nowait(message)
        except LocalProtocolError as exc:
            logger.debug("not sent on the old connection: %s", exc)
            return False
        except trio.WouldBlock:
            self.lose(f"{OUTBOX_SIZE} messages queued and none could be written")
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
        load_sampler: LoadSampler,
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
        self.capacity = Capacity(
            threshold=config.load_threshold, idle_target=config.num_idle_processes
        )
        self.worker_id = ""
        self.failure = ""
        self._session: _Session | None = None
        self._reported_status: int | None = None
        self._status_changed = trio.Event()
        self._assignments: dict[str, _Assignment] = {}
        self._offers_in_flight = 0
        self._offers_done = trio.Event()
        self._offers_done.set()
        self._closing = False
        self._connect_scope = trio.CancelScope()

    # -- state for the server and its health endpoint -----------------------------------------

    @property
    def registered(self) -> bool:
        return self._session is not None and self._session.alive

    @property
    def draining(self) -> bool:
        return self.capacity.draining

    def status(self) -> int:
        return self.capacity.status(len(self._supervisor.running_jobs))

    def start_draining(self) -> None:
        """Refuse new offers and tell the server we are full; running jobs are not touched."""
        self.capacity.draining = True
        self._status_may_have_changed()

    async def wait_offers_done(self) -> None:
        """Return once no offer is being answered or launched."""
        await self._offers_done.wait()

    def report_job_status(self, job_id: str, status: int, error: str) -> None:
        """The supervisor's ``StatusReport``: forward a job status to the server."""
        session = self._session
        if session is not None:
            session.send(lambda proto: proto.update_job(job_id, status, error))
        self._status_may_have_changed()

    async def flush(self) -> None:
        """Wait until every message queued so far is written (or the connection is gone)."""
        session = self._session
        if session is None or not session.alive:
            return
        marker = trio.Event()
        try:
            session.outbox_send.send_nowait(marker)
        except trio.WouldBlock:
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
            nonlocal failures, started
            failures = 0  # only a registration resets the count, never a socket merely opening
            if not started:
                started = True
                task_status.started(self.worker_id)

        while True:
            try:
                await self._connect_once(url, offers, registered)
                reason = "connection closed"
            except _ConnectionLost as exc:
                reason = str(exc)
            except AuthenticationError as exc:
                self.failure = str(exc)
                raise
            if self._closing:
                return
            failures += 1
            if failures > self._options.max_retry:
                self.failure = (
                    f"failed to connect to LiveKit at {url} after {failures} attempts: {reason}"
                )
                raise ServerConnectionError(self.failure)
            delay = reconnect_delay(failures, self._rng)
            if self.metrics is not None:
                self.metrics.reconnecting()
            logger.warning(
                "LiveKit connection failed: %s; retrying in %.1f s (attempt %d of %d)",
                reason, delay, failures, self._options.max_retry,
                extra={"url": url},
            )
            await trio.sleep(delay)

    async def _connect_once(
        self, url: str, offers: trio.Nursery, registered: Callable[[], None]
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
                        await self._run_session(ws, offers, registered)
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                            await ws.aclose()
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                leaves = [exc for exc in _leaves(group) if not isinstance(exc, trio.Cancelled)]
                if len(leaves) != 1:
                    raise
                raise _translate(leaves[0], url) from leaves[0].__cause__

    async def _run_session(
        self,
        ws: trio_websocket.WebSocketConnection,
        offers: trio.Nursery,
        registered: Callable[[], None],
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
            if self.metrics is not None:
                self.metrics.registered_now()
            registered()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop, ws, session)
                    nursery.start_soon(self._status_loop, session)
                    await self._receive_loop(ws, session, offers)
            finally:
                self._session = None
                session.close()
                proto.close()
        raise _ConnectionLost(session.lost_reason or "session ended")

    async def _receive_loop(
        self, ws: trio_websocket.WebSocketConnection, session: _Session, offers: trio.Nursery
    ) -> None:
        while True:
            try:
                data = await ws.get_message()
                event = session.proto.receive_data(data)
            except trio_websocket.ConnectionClosed as exc:
                session.lose(f"closed by the server ({_close_text(exc)})")
                return
            except RemoteProtocolError as exc:
                session.lose(f"protocol error from the server: {exc}")
                return
            if isinstance(event, JobOffered):
                self._offer_started()
                offers.start_soon(self._answer_offer, session, event.job)
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
                session.lose(f"closed while sending ({_close_text(exc)})")
                return

    async def _status_loop(self, session: _Session) -> None:
        while True:
            changed = self._status_changed
            status = self.status()
            jobs = len(self._supervisor.running_jobs)
            load = self.capacity.load
            self._reported_status = status
            # send() calls the builder at once, inside this iteration
            session.send(lambda p: p.update_worker(status=status, load=load, job_count=jobs))
            with trio.move_on_after(self._options.status_interval):
                await changed.wait()

    def _status_may_have_changed(self) -> None:
        status = self.status()
        if status == self._reported_status:
            return
        if self._reported_status is not None:
            if status == agent.WS_FULL:
                logger.info("worker is full or draining, marking it unavailable",
                            extra={"load": round(self.capacity.load, 3)})
            else:
                logger.info("worker is below capacity, marking it available",
                            extra={"load": round(self.capacity.load, 3)})
        self._reported_status = status
        self._status_changed.set()
        self._status_changed = trio.Event()

    async def _sample_load_forever(self) -> None:
        from ._load import sanitize_load

        last_problem: str | None = None
        while True:
            try:
                raw = await self._load_sampler()
            except Exception:
                logger.exception("load_fnc raised; keeping the last load %.2f", self.capacity.load)
            else:
                value, problem = sanitize_load(raw)
                if problem and problem != last_problem:  # once per kind of problem, not per tick
                    logger.warning("load_fnc returned %r: %s; using %.2f", raw, problem, value)
                last_problem = problem
                self.capacity.load = value
                self._status_may_have_changed()
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

    async def _answer_offer(self, session: _Session, job: agent.Job) -> None:
        try:
            if not self.capacity.try_reserve(len(self._supervisor.running_jobs)):
                logger.info("refusing job %s: %s", job.id,
                            "draining" if self.draining else "at capacity",
                            extra={"job_id": job.id, "room": job.room.name})
                if self.metrics is not None:
                    self.metrics.offer_answered("rejected")
                session.send(lambda p: p.answer(
                    agent.AvailabilityResponse(job_id=job.id, available=False)))
                return
            try:
                self._status_may_have_changed()
                await _Offer(self, session, job).run()
            finally:
                self.capacity.release()
                self._status_may_have_changed()
        finally:
            self._offer_finished()


@final
class _Offer:
    """One job offer: runs ``on_request`` under its deadline and carries out its answer."""

    def __init__(self, control: ControlPlane, session: _Session, job: agent.Job) -> None:
        self._control = control
        self._session = session
        self._job = job
        self._received_at = time.time()
        self._answer_scope = trio.CancelScope()
        self._extra = {"job_id": job.id, "room": job.room.name, "agent_name": job.agent_name}

    async def run(self) -> None:
        control = self._control
        request = JobRequest(self._job, agent_name=control._config.agent_name, channel=self)
        timeout = control._options.request_timeout
        with self._answer_scope:
            self._answer_scope.deadline = trio.current_time() + timeout
            try:
                await control._request_fnc(request)
            except AssignmentTimeoutError as exc:
                logger.warning("%s", exc, extra=self._extra)
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
        pending = control._assignments[job_id] = _Assignment()
        try:
            sent = self._session.send(lambda p: p.answer(agent.AvailabilityResponse(
                job_id=job_id,
                available=True,
                participant_identity=args.identity,
                participant_name=args.name,
                participant_metadata=args.metadata,
                participant_attributes=dict(args.attributes),
            )))
            accepted_at = time.time()
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
        info = RunningJobInfo(
            accept_arguments=args,
            job=assigned.job,
            url=assigned.url or control._config.ws_url,
            token=assigned.token,
            worker_id=self._session.worker_id,
            received_at=self._received_at,
            accepted_at=accepted_at,
            assigned_at=time.time(),
        )
        logger.info("job %s assigned, launching it", job_id, extra=self._extra)
        await control._supervisor.launch(info)


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

