"""The dev server: LiveKit's agent dispatch, rooms and Twirp API, faithful to livekit-server
for everything an agent server can observe (PROTOCOL.md; its §9.4 is the checklist).

Theory of operation
-------------------
``open_dev_server`` owns one nursery: the TCP listener (unless ``listen=False``), one task per
connection (``handle_stream``), and one task per job being dispatched. Workers and jobs are
plain records in dicts; every change calls ``_changed()``, which wakes ``wait_until`` — tests
and tools wait for a state, they never poll.

A job is offered to one worker at a time (``AvailabilityRequest``); the whole exchange,
retries on ``available=false`` included, must end within ``availability_timeout`` (3 s, the
psrpc deadline of the real server). A late answer finds no pending offer and is ignored.
"""

from __future__ import annotations

import errno
import logging
import random
import time
import types
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Final, final

import attrs
import trio
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from livekit.protocol import agent, agent_dispatch, models

from .._auth import Claims, TokenError, verify_token
from .._errors import ConfigError
from ._dispatch import Candidate, default_permissions, job_token, new_id, select_worker, \
    validate_registration
from ._http import Request, Response, WebSocket, WebSocketClosed, serve_http

logger = logging.getLogger("trio_agents.devserver")

SERVER_VERSION: Final = "1.13.5"
SIGNAL_PROTOCOL: Final = 17
REGISTER_TIMEOUT: Final = 10.0
SIMULATE_TIMEOUT: Final = 10.0
DEPENDENT_KINDS: Final = (models.ParticipantInfo.AGENT, models.ParticipantInfo.EGRESS)


def _now_ns() -> int:
    return time.time_ns()


class _Closed(Exception):
    """The worker's socket must be (or was) closed."""


@attrs.define(eq=False)
class _Pending:
    event: trio.Event = attrs.field(factory=trio.Event)
    response: agent.AvailabilityResponse | None = None


@final
@attrs.define(eq=False)
class WorkerInfo:
    """A registered worker, as the server sees it."""

    id: str
    agent_name: str
    namespace: str
    job_type: int
    deployment: str
    version: str
    permissions: models.ParticipantPermission
    api_key: str = attrs.field(repr=False)
    api_secret: str = attrs.field(repr=False)
    status: int = agent.WS_AVAILABLE
    load: float = 0.0
    registered_at: float = attrs.field(factory=time.monotonic)
    """``time.monotonic()`` when the server answered the registration (system-wide on Linux)."""
    running_job_ids: set[str] = attrs.field(factory=set)
    migrated_job_ids: list[str] = attrs.field(factory=list)
    _socket: WebSocket | None = attrs.field(default=None, repr=False)
    _json: bool = attrs.field(default=False, repr=False)
    _pending: dict[str, _Pending] = attrs.field(factory=dict, repr=False)

    def matches(self, job: agent.Job) -> bool:
        return (self.agent_name, self.namespace, self.job_type, self.deployment) == (
            job.agent_name, job.namespace, job.type, job.deployment)

    async def send(self, message: agent.ServerMessage) -> None:
        if self._socket is None:
            raise WebSocketClosed("worker is gone")
        await self._socket.send(json_format.MessageToJson(message) if self._json
                                else message.SerializeToString())


@final
@attrs.define(eq=False)
class JobInfo:
    """A job the server created, and what became of it."""

    job: agent.Job
    room: str
    worker_id: str = ""
    status: int = agent.JS_PENDING
    error: str = ""
    history: list[int] = attrs.field(factory=list)
    token: str = attrs.field(default="", repr=False)
    response: agent.AvailabilityResponse | None = None
    attempts: int = 0
    done: bool = False
    """The dispatch is over: assigned, ended by ``terminate``, or dropped."""
    dropped: str = ""
    """Why no worker got it ("" if one did)."""
    ended: bool = False
    # ``time.monotonic()`` stamps of the dispatch timeline, for benchmarks (0 = not yet)
    offered_at: float = 0.0
    answered_at: float = 0.0
    assigned_at: float = 0.0
    ended_at: float = 0.0

    @property
    def status_name(self) -> str:
        return agent.JobStatus.Name(self.status)

    def set_status(self, status: int, error: str = "") -> None:
        self.status, self.error = status, error
        self.history.append(status)
        self.job.state.status = status  # type: ignore[assignment]
        self.job.state.error = error
        self.job.state.updated_at = _now_ns()
        if status in (agent.JS_SUCCESS, agent.JS_FAILED):
            self.ended = True
            self.ended_at = time.monotonic()
            self.job.state.ended_at = _now_ns()


@final
@attrs.define(eq=False)
class RoomInfo:
    room: models.Room
    dispatches: dict[str, agent_dispatch.AgentDispatch] = attrs.field(factory=dict)
    participants: dict[str, models.ParticipantInfo] = attrs.field(factory=dict)
    publishers: set[str] = attrs.field(factory=set)
    job_ids: list[str] = attrs.field(factory=list)


class TwirpError(Exception):
    STATUS: Final = {"invalid_argument": 400, "malformed": 400, "unauthenticated": 401,
                     "permission_denied": 403, "not_found": 404, "bad_route": 404,
                     "already_exists": 409, "internal": 500, "unimplemented": 501}

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg

    def response(self) -> Response:
        import json

        return Response(self.STATUS.get(self.code, 500),
                        json.dumps({"code": self.code, "msg": self.msg}).encode(),
                        "application/json")


@final
class DevServer:
    """A local LiveKit server for agents. Build it with ``open_dev_server``."""

    def __init__(self, nursery: trio.Nursery, *, api_key: str, api_secret: str,
                 availability_timeout: float, register_timeout: float,
                 rng: random.Random | None) -> None:
        self._nursery = nursery
        self.api_key = api_key
        self.api_secret = api_secret
        self.availability_timeout = availability_timeout
        self.register_timeout = register_timeout
        self._rng = rng or random.Random()
        self._secrets = {api_key: api_secret}
        self._workers: dict[str, WorkerInfo] = {}
        self._jobs: dict[str, JobInfo] = {}
        self._rooms: dict[str, RoomInfo] = {}
        self._change = trio.Event()
        self.host = "127.0.0.1"
        self.port = 0

    # -- inspection -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def workers(self) -> Mapping[str, WorkerInfo]:
        return types.MappingProxyType(self._workers)

    @property
    def jobs(self) -> Mapping[str, JobInfo]:
        return types.MappingProxyType(self._jobs)

    @property
    def rooms(self) -> Mapping[str, RoomInfo]:
        return types.MappingProxyType(self._rooms)

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        """Return once ``predicate()`` is true; it is re-checked on every state change."""
        while not predicate():
            await self._change.wait()

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    # -- rooms and dispatches (also reached through Twirp) --------------------------------

    async def create_room(self, name: str, *, agents: list[agent_dispatch.RoomAgentDispatch]
                          | None = None, metadata: str = "", empty_timeout: int = 300,
                          departure_timeout: int = 20, max_participants: int = 0) -> models.Room:
        """Create a room (and request its JT_ROOM jobs); an existing room is returned as is."""
        existing = self._rooms.get(name)
        if existing is not None:
            return existing.room
        if not name or len(name.encode()) > 256:
            raise TwirpError("invalid_argument", "room name must be 1 to 256 bytes")
        now = time.time()
        room = RoomInfo(models.Room(
            sid=new_id("RM_"), name=name, metadata=metadata, empty_timeout=empty_timeout,
            departure_timeout=departure_timeout, max_participants=max_participants,
            creation_time=int(now), creation_time_ms=int(now * 1000)))
        self._rooms[name] = room
        for spec in agents or [agent_dispatch.RoomAgentDispatch()]:  # none: automatic dispatch
            self._add_dispatch(room, spec.agent_name, spec.metadata, dict(spec.attributes),
                               spec.deployment)
        logger.info("room %s created", name)
        self._changed()
        return room.room

    async def delete_room(self, name: str) -> None:
        room = self._rooms.pop(name, None)
        if room is None:
            raise TwirpError("not_found", "requested room does not exist")
        for job_id in room.job_ids:
            await self._terminate(job_id, agent.JS_FAILED, "agent worker left the room")
        logger.info("room %s deleted", name)
        self._changed()

    async def create_dispatch(self, room: str, agent_name: str, *, metadata: str = "",
                              attributes: Mapping[str, str] | None = None,
                              deployment: str = "") -> agent_dispatch.AgentDispatch:
        """``AgentDispatchService.CreateDispatch``: auto-creates the room (with its default
        dispatch, as the real server does), then launches this dispatch's jobs."""
        await self.create_room(room)
        info = self._rooms[room]
        dispatch = self._add_dispatch(info, agent_name, metadata, dict(attributes or {}),
                                      deployment)
        for identity in info.participants:
            if not self._dependent(info.participants[identity]):
                self._launch(info, dispatch, agent.JT_PARTICIPANT, info.participants[identity])
        for identity in info.publishers:
            self._launch(info, dispatch, agent.JT_PUBLISHER, info.participants[identity])
        self._changed()
        return dispatch

    async def delete_dispatch(self, dispatch_id: str, room: str) -> agent_dispatch.AgentDispatch:
        info = self._rooms.get(room)
        dispatch = info.dispatches.pop(dispatch_id, None) if info else None
        if info is None or dispatch is None:
            raise TwirpError("not_found", "dispatch ID not found")
        for job_id in info.job_ids:
            if self._jobs[job_id].job.dispatch_id == dispatch_id:
                await self._terminate(job_id, agent.JS_SUCCESS, "")
        dispatch.state.deleted_at = _now_ns()
        self._changed()
        return dispatch

    def list_dispatches(self, room: str) -> list[agent_dispatch.AgentDispatch]:
        info = self._rooms.get(room)
        if info is None:
            raise TwirpError("not_found", "requested room does not exist")
        return list(info.dispatches.values())

    async def add_participant(self, room: str, identity: str, *, name: str = "",
                              kind: int = models.ParticipantInfo.STANDARD,
                              metadata: str = "") -> models.ParticipantInfo:
        """A participant joins (simulated; creates the room): JT_PARTICIPANT jobs."""
        await self.create_room(room)
        info = self._rooms[room]
        now = time.time()
        participant = models.ParticipantInfo(
            sid=new_id("PA_"), identity=identity, name=name, metadata=metadata,
            kind=kind,  # type: ignore[arg-type]
            state=models.ParticipantInfo.ACTIVE, joined_at=int(now),
            joined_at_ms=int(now * 1000))
        info.participants[identity] = participant
        if not self._dependent(participant):
            info.room.num_participants += 1
            for dispatch in info.dispatches.values():
                self._launch(info, dispatch, agent.JT_PARTICIPANT, participant)
        self._changed()
        return participant

    async def publish_track(self, room: str, identity: str) -> None:
        """A participant publishes its first track (simulated): JT_PUBLISHER jobs."""
        info = self._rooms.get(room)
        participant = info.participants.get(identity) if info else None
        if info is None or participant is None:
            raise TwirpError("not_found", "participant does not exist")
        participant.is_publisher = True
        if identity in info.publishers or self._dependent(participant):
            return
        info.publishers.add(identity)
        info.room.num_publishers += 1
        for dispatch in info.dispatches.values():
            self._launch(info, dispatch, agent.JT_PUBLISHER, participant)
        self._changed()

    async def remove_participant(self, room: str, identity: str) -> None:
        info = self._rooms.get(room)
        if info is None or info.participants.pop(identity, None) is None:
            raise TwirpError("not_found", "participant does not exist")
        info.publishers.discard(identity)
        self._changed()

    def drop_worker(self, worker_id: str) -> None:
        """Close a worker's socket without a close frame, as a network drop looks."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker._socket is not None:
            self._nursery.start_soon(worker._socket.abort)

    @staticmethod
    def _dependent(participant: models.ParticipantInfo) -> bool:
        return participant.kind in DEPENDENT_KINDS

    def _add_dispatch(self, room: RoomInfo, agent_name: str, metadata: str,
                      attributes: dict[str, str], deployment: str) -> agent_dispatch.AgentDispatch:
        dispatch = agent_dispatch.AgentDispatch(
            id=new_id("AD_"), agent_name=agent_name, room=room.room.name, metadata=metadata,
            deployment=deployment, attributes=attributes,
            state=agent_dispatch.AgentDispatchState(created_at=_now_ns()))
        room.dispatches[dispatch.id] = dispatch
        self._launch(room, dispatch, agent.JT_ROOM, None)
        return dispatch

    # -- dispatch ------------------------------------------------------------------------------

    def _launch(self, room: RoomInfo, dispatch: agent_dispatch.AgentDispatch, job_type: int,
                participant: models.ParticipantInfo | None) -> None:
        job = agent.Job(
            id=new_id("AJ_"), dispatch_id=dispatch.id, type=job_type,  # type: ignore[arg-type]
            room=room.room, namespace="", metadata=dispatch.metadata,
            agent_name=dispatch.agent_name, deployment=dispatch.deployment,
            attributes=dict(dispatch.attributes))
        if participant is not None:
            job.participant.CopyFrom(participant)
        if not any(w.matches(job) for w in self._workers.values()):
            logger.info("not dispatching agent job since no worker is available",
                        extra={"room": room.room.name, "agent_name": dispatch.agent_name})
            return
        record = JobInfo(job=job, room=room.room.name)
        self._jobs[job.id] = record
        room.job_ids.append(job.id)
        self._nursery.start_soon(self._dispatch, record, dispatch)

    async def _dispatch(self, record: JobInfo, dispatch: agent_dispatch.AgentDispatch) -> None:
        tried: set[str] = set()
        with trio.move_on_after(self.availability_timeout) as deadline:
            while True:
                candidates = [Candidate(w.id, w.status, w.load)
                              for w in self._workers.values() if w.matches(record.job)]
                worker_id, why = select_worker(candidates, tried, self._rng,
                                               first_attempt=not tried)
                if worker_id is None:
                    record.dropped = why
                    break
                tried.add(worker_id)
                record.attempts += 1
                self._changed()
                worker = self._workers[worker_id]
                response = await self._offer(worker, record)
                if response is None or (not response.available and not response.terminate):
                    continue  # closed or not available: the next worker
                if response.terminate:
                    record.set_status(agent.JS_SUCCESS)
                    break
                await self._assign(worker, record, response)
                dispatch.state.jobs.append(record.job)
                break
        if deadline.cancelled_caught:
            record.dropped = "context deadline exceeded"
        if record.dropped:
            logger.warning("failed to assign job: %s", record.dropped,
                           extra={"job_id": record.job.id, "room": record.room})
        record.done = True
        self._changed()

    async def _offer(self, worker: WorkerInfo, record: JobInfo) -> agent.AvailabilityResponse | None:
        job = agent.Job()
        job.CopyFrom(record.job)
        now = _now_ns()
        job.state.CopyFrom(agent.JobState(status=agent.JS_RUNNING, worker_id=worker.id,
                                          started_at=now, updated_at=now))
        pending = worker._pending[job.id] = _Pending()
        try:
            record.offered_at = time.monotonic()
            await worker.send(agent.ServerMessage(
                availability=agent.AvailabilityRequest(job=job)))
            await pending.event.wait()
            record.answered_at = time.monotonic()
            return pending.response
        except WebSocketClosed:
            return None
        finally:
            worker._pending.pop(job.id, None)

    async def _assign(self, worker: WorkerInfo, record: JobInfo,
                      response: agent.AvailabilityResponse) -> None:
        record.job.state.CopyFrom(agent.JobState(
            status=agent.JS_RUNNING, worker_id=worker.id, started_at=_now_ns(),
            updated_at=_now_ns(), participant_identity=response.participant_identity))
        record.worker_id = worker.id
        record.response = response
        record.token = job_token(api_key=worker.api_key, api_secret=worker.api_secret,
                                 room=record.room, agent_name=worker.agent_name,
                                 permissions=worker.permissions, response=response)
        record.set_status(agent.JS_RUNNING)
        worker.running_job_ids.add(record.job.id)
        try:
            record.assigned_at = time.monotonic()
            await worker.send(agent.ServerMessage(
                assignment=agent.JobAssignment(job=record.job, token=record.token)))
        except WebSocketClosed:
            logger.warning("worker %s closed before its assignment", worker.id)

    async def _terminate(self, job_id: str, status: int, error: str) -> None:
        record = self._jobs.get(job_id)
        if record is None or record.ended or not record.worker_id:
            return
        worker = self._workers.get(record.worker_id)
        if worker is None or job_id not in worker.running_job_ids:
            return
        worker.running_job_ids.discard(job_id)
        record.set_status(status, error)  # the server does not wait for the worker
        try:
            await worker.send(agent.ServerMessage(termination=agent.JobTermination(job_id=job_id)))
        except WebSocketClosed:
            pass

    # -- /agent -----------------------------------------------------------------------------

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (TCP or in-memory) until it closes."""
        from ._twirp import handle_twirp

        async def http(request: Request) -> Response:
            if request.path.startswith("/twirp/"):
                return await handle_twirp(self, request)
            if request.path in ("/agent", "/rtc", "/rtc/v1"):
                return Response(404, b"404 page not found")
            if request.path == "/":
                return Response(200, b"OK")
            return Response(404, b"404 page not found")

        async def upgrade(request: Request) -> Response | Callable[[WebSocket], object]:
            if request.path != "/agent":
                return Response(404, b"404 page not found")
            claims = self.authenticate(request)
            if isinstance(claims, Response):
                return claims
            if claims is None or claims.video is None or not claims.video.agent:
                return Response(401, b"no permissions to access the room")
            api_key = claims.api_key

            async def session(socket: WebSocket) -> None:
                await self._agent_session(socket, api_key)

            return session

        await serve_http(stream, http=http, upgrade=upgrade)  # type: ignore[arg-type]

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

    async def _agent_session(self, socket: WebSocket, api_key: str) -> None:
        worker_id = new_id("AW_")
        worker: WorkerInfo | None = None
        state = {"json": False}
        try:
            with trio.move_on_after(self.register_timeout):
                while worker is None:
                    message = await self._receive(socket, state)
                    kind = message.WhichOneof("message")
                    if kind == "ping":
                        await self._reply(socket, state, self._pong(message))
                    elif kind == "register":
                        problem = validate_registration(message.register)
                        if problem:
                            raise _Closed(f"registration refused: {problem}")
                        worker = self._register(worker_id, message.register, api_key, socket)
                        worker._json = state["json"]
                        await worker.send(agent.ServerMessage(register=agent.RegisterWorkerResponse(
                            worker_id=worker_id,
                            server_info=models.ServerInfo(
                                edition=models.ServerInfo.Standard, version=SERVER_VERSION,
                                protocol=SIGNAL_PROTOCOL, agent_protocol=1, node_id="ND_dev"))))
                        self._workers[worker_id] = worker
                        logger.info("worker %s registered", worker_id,
                                    extra={"agent_name": worker.agent_name})
                        self._changed()
                    else:
                        raise _Closed(f"{kind or 'empty message'} before registration")
            if worker is None:
                raise _Closed("no registration within the register timeout")
            while True:
                message = await self._receive(socket, state)
                worker._json = state["json"]
                await self._handle(worker, message)
        except (_Closed, WebSocketClosed) as exc:
            logger.info("closing worker %s: %s", worker_id, exc)
        finally:
            if worker is not None:
                self._deregister(worker)
            await socket.abort()

    def _register(self, worker_id: str, request: agent.RegisterWorkerRequest, api_key: str,
                  socket: WebSocket) -> WorkerInfo:
        permissions = (request.allowed_permissions if request.HasField("allowed_permissions")
                       else default_permissions())
        return WorkerInfo(
            id=worker_id, agent_name=request.agent_name,
            namespace=request.namespace if request.HasField("namespace") else "",
            job_type=request.type, deployment=request.deployment, version=request.version,
            permissions=permissions, api_key=api_key, api_secret=self._secrets[api_key],
            socket=socket)

    def _deregister(self, worker: WorkerInfo) -> None:
        self._workers.pop(worker.id, None)
        worker._socket = None
        for pending in worker._pending.values():
            pending.event.set()  # response None: the offer moves to the next worker
        logger.info("worker %s deregistered", worker.id)
        self._changed()

    async def _receive(self, socket: WebSocket, state: dict[str, bool]) -> agent.WorkerMessage:
        data = await socket.receive()
        message = agent.WorkerMessage()
        try:
            if isinstance(data, bytes):
                message.ParseFromString(data)
                state["json"] = False
            else:
                json_format.Parse(data, message)
                state["json"] = True
        except (DecodeError, json_format.ParseError) as exc:
            raise _Closed(f"unparseable message: {exc}") from exc
        return message

    async def _reply(self, socket: WebSocket, state: dict[str, bool],
                     message: agent.ServerMessage) -> None:
        await socket.send(json_format.MessageToJson(message) if state["json"]
                          else message.SerializeToString())

    @staticmethod
    def _pong(message: agent.WorkerMessage) -> agent.ServerMessage:
        return agent.ServerMessage(pong=agent.WorkerPong(
            last_timestamp=message.ping.timestamp, timestamp=int(time.time() * 1000)))

    async def _handle(self, worker: WorkerInfo, message: agent.WorkerMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "availability":
            pending = worker._pending.get(message.availability.job_id)
            if pending is None:
                logger.info("availability response for unknown job %s",
                            message.availability.job_id)
                return
            pending.response = message.availability
            pending.event.set()
        elif kind == "update_worker":
            update = message.update_worker
            if update.HasField("status"):
                worker.status = update.status
            worker.load = update.load
            self._changed()
        elif kind == "update_job":
            await self._update_job(worker, message.update_job)
        elif kind == "ping":
            await worker.send(self._pong(message))
        elif kind == "migrate_job":
            worker.migrated_job_ids.extend(message.migrate_job.job_ids)  # recorded, then ignored
            self._changed()
        elif kind == "simulate_job":
            self._simulate(worker, message.simulate_job)
        else:  # register again, or nothing set
            raise _Closed(f"unexpected {kind or 'empty message'} from a registered worker")

    async def _update_job(self, worker: WorkerInfo, update: agent.UpdateJobStatus) -> None:
        record = self._jobs.get(update.job_id)
        if record is None or update.job_id not in worker.running_job_ids:
            logger.debug("status for unknown job %s ignored", update.job_id)
            return
        if record.job.state.status == agent.JS_PENDING and update.status != agent.JS_PENDING:
            record.job.state.started_at = _now_ns()
        record.set_status(update.status, update.error)
        if record.ended:
            worker.running_job_ids.discard(update.job_id)
        self._changed()

    def _simulate(self, worker: WorkerInfo, request: agent.SimulateJobRequest) -> None:
        job = agent.Job(
            id=new_id("AJ_"), type=agent.JT_PUBLISHER if request.HasField("participant")
            else agent.JT_ROOM, room=request.room, namespace=worker.namespace,
            agent_name=worker.agent_name)
        if request.HasField("participant"):
            job.participant.CopyFrom(request.participant)
        record = JobInfo(job=job, room=request.room.name)
        self._jobs[job.id] = record

        async def assign() -> None:
            with trio.move_on_after(SIMULATE_TIMEOUT):
                record.attempts = 1
                response = await self._offer(worker, record)
                if response is not None and response.available and not response.terminate:
                    await self._assign(worker, record, response)
            record.done = True
            self._changed()

        self._nursery.start_soon(assign)


@asynccontextmanager
async def open_dev_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str = "devkey",
    api_secret: str = "secret",
    availability_timeout: float = 3.0,
    register_timeout: float = REGISTER_TIMEOUT,
    listen: bool = True,
    rng: random.Random | None = None,
) -> AsyncIterator[DevServer]:
    """Run a dev server for the duration of the block.

    Args:
        port: TCP port (0 picks a free one; ``dev.port`` tells which).
        availability_timeout: how long a job may take to be accepted, retries included
            (3 s on a stock livekit-server).
        listen: ``False`` binds nothing: use ``dev.handle_stream`` (in-memory tests).
    Raises:
        ConfigError: the port is in use.
    """
    listeners: list[trio.SocketListener] = []
    if listen:  # bound before the nursery opens, so a busy port is a plain ConfigError
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            hint = ("stop the other server or pick another port with --port"
                    if exc.errno == errno.EADDRINUSE else "check --host and --port")
            raise ConfigError(f"the dev server cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}; {hint}") from exc
    async with trio.open_nursery() as nursery:
        dev = DevServer(nursery, api_key=api_key, api_secret=api_secret,
                        availability_timeout=availability_timeout,
                        register_timeout=register_timeout, rng=rng)
        if listeners:
            dev.host = host
            dev.port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, dev.handle_stream, listeners)
        try:
            yield dev
        finally:
            nursery.cancel_scope.cancel()
