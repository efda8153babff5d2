"""The dev server: LiveKit's agent dispatch, rooms and Twirp API, faithful to livekit-server
for everything an agent server can observe (PROTOCOL.md; its §9.4 is the checklist).

Theory of operation
-------------------
``open_dev_server`` owns one nursery: the TCP listener (unless ``listen=False``), one task per
connection (``handle_stream``), and one task per job being dispatched. Workers, jobs and
rooms are plain records in dicts (``_records.py``); every change calls ``_changed()``, which
wakes ``wait_until`` — tests and tools wait for a state, they never poll.

A job is offered to one worker at a time (``AvailabilityRequest``); the whole exchange,
retries on ``available=false`` included, must end within ``availability_timeout`` (3 s, the
psrpc deadline of the real server). A late answer finds no pending offer and is ignored.
The decisions themselves (who gets an offer, what the job token holds, which registrations
are refused) are pure functions in ``_dispatch.py``.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import random
import time
import types
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Final, NoReturn, final

import trio
from livekit.protocol import agent, agent_dispatch, models
from livekit.protocol import rtc as rtc_proto

from .._auth import Claims, TokenError, verify_token
from .._errors import ConfigError, MissingExtraError
from ..api import TwirpError
from ._dispatch import (
    MAX_ATTRIBUTES_BYTES,
    MAX_METADATA_BYTES,
    MAX_NAME_BYTES,
    Candidate,
    attributes_size,
    default_permissions,
    job_token,
    new_id,
    select_worker,
    validate_deployment,
    validate_registration,
)
from ._http import (
    Request,
    Response,
    SessionHandler,
    WebSocket,
    WebSocketClosed,
    decode_frame,
    encode_frame,
    serve_http,
)
from . import _tracks
from ._media import LOSSY, RELIABLE, MediaHost
from ._records import JobInfo, Pending, RoomInfo, WorkerInfo, now_ns
from ._rtc import (
    JOIN_TIMEOUT,
    JoinParams,
    Reason,
    Session,
    merge_update,
    parse_join,
    participant_info,
    refresh_token,
    run_session,
    server_packet,
)

logger = logging.getLogger("trio_agents.devserver")

SERVER_VERSION: Final = "1.13.5"
SIGNAL_PROTOCOL: Final = 17
AGENT_PROTOCOL: Final = 1
#: ``RegisterTimeout`` of livekit-server.
REGISTER_TIMEOUT: Final = 10.0
#: ``AssignJobTimeout``: what a simulated job has (it runs outside the 3 s RPC window).
SIMULATE_TIMEOUT: Final = 10.0
#: The psrpc deadline of ``JobRequest``, retries included (PROTOCOL.md §3.4).
AVAILABILITY_TIMEOUT: Final = 3.0
DEPENDENT_KINDS: Final = (models.ParticipantInfo.AGENT, models.ParticipantInfo.EGRESS)
AGENT_LEFT_ROOM: Final = "agent worker left the room"
#: ``room.empty_timeout`` / ``room.departure_timeout`` defaults, seconds.
EMPTY_TIMEOUT: Final = 300
DEPARTURE_TIMEOUT: Final = 20
NOT_FOUND: Final = b"404 page not found\n"
RTC_PATHS: Final = frozenset({"/rtc", "/rtc/v1", "/rtc/validate", "/rtc/v1/validate"})


class _Closed(Exception):
    """The worker's socket must be closed (the reason is the message)."""


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
        self.availability_timeout = availability_timeout
        self.register_timeout = register_timeout
        self._rng = rng or random.Random()
        self.join_timeout = join_timeout
        self.rtc_v1 = rtc_v1
        self.enable_remote_unmute = enable_remote_unmute
        self.media = MediaHost(rtc_address)
        self._secrets = {api_key: api_secret}
        self._workers: dict[str, WorkerInfo] = {}
        self._jobs: dict[str, JobInfo] = {}
        self._rooms: dict[str, RoomInfo] = {}
        self._change = trio.Event()
        self._connections: set[trio.CancelScope] = set()
        self._closed = False
        self.host = "127.0.0.1"
        self.port = 0

    # -- inspection -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``ws://host:port`` — what ``LIVEKIT_URL`` should be (only meaningful when listening)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def workers(self) -> Mapping[str, WorkerInfo]:
        """Registered workers by id (a read-only view of live records)."""
        return types.MappingProxyType(self._workers)

    @property
    def jobs(self) -> Mapping[str, JobInfo]:
        """Every job the server created, by id (a read-only view of live records)."""
        return types.MappingProxyType(self._jobs)

    @property
    def rooms(self) -> Mapping[str, RoomInfo]:
        """Live rooms by name (a read-only view of live records)."""
        return types.MappingProxyType(self._rooms)

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        """Return once ``predicate()`` is true; it is re-checked after every state change.

        Bound it with ``trio.fail_after`` if it may never happen.
        """
        while not predicate():
            await self._change.wait()

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    # -- rooms and dispatches (also reached through Twirp) --------------------------------

    async def create_room(self, name: str, *,
                          agents: Iterable[agent_dispatch.RoomAgentDispatch] | None = None,
                          metadata: str = "", empty_timeout: int = 0,
                          departure_timeout: int = 0, max_participants: int = 0) -> models.Room:
        """Create a room and request its JT_ROOM jobs at once; an existing room is returned
        unchanged (its agents and metadata are not touched), as livekit-server does.

        With no ``agents`` the room gets the default dispatch (agent name "": automatic
        dispatch); with some, only those. It closes by itself ``empty_timeout`` seconds
        (default 300) after creation if no one (agents aside) joins, or ``departure_timeout``
        (default 20) after the last one left.
        """
        existing = self._rooms.get(name)
        if existing is not None:
            return existing.room
        empty_timeout = empty_timeout or EMPTY_TIMEOUT  # 0: the server's default
        departure_timeout = departure_timeout or DEPARTURE_TIMEOUT
        _check_size("room name", name, MAX_NAME_BYTES, allow_empty=False)
        _check_size("metadata", metadata, MAX_METADATA_BYTES)
        specs = list(agents or ())
        for spec in specs:
            _check_dispatch(spec.deployment, spec.metadata, spec.attributes)
        now = time.time()
        room = RoomInfo(models.Room(
            sid=new_id("RM_"), name=name, metadata=metadata, empty_timeout=empty_timeout,
            departure_timeout=departure_timeout, max_participants=max_participants,
            creation_time=int(now), creation_time_ms=int(now * 1000)))
        self._rooms[name] = room
        self._nursery.start_soon(self._close_when_idle, room)
        room._closer.deadline = trio.current_time() + empty_timeout
        for spec in specs or [agent_dispatch.RoomAgentDispatch()]:
            self._add_dispatch(room, spec.agent_name, spec.metadata, dict(spec.attributes),
                               spec.deployment)
        logger.info("room %s created", name)
        self._changed()
        return room.room

    async def delete_room(self, name: str) -> None:
        """Close the room now: its participants get ``leave`` (ROOM_DELETED), and each
        running job of it gets ``JobTermination`` and ends ``JS_FAILED`` ("agent worker left
        the room").

        Unlike livekit-server, which terminates only the jobs whose agent is in the room,
        this also ends jobs whose agent has not joined (yet): a test can end a job that never
        connects, and on a real server such a job would be left running with no room.
        """
        room = self._rooms.get(name)
        if room is None:
            raise TwirpError("not_found", "requested room does not exist")
        self._close_room(room, "deleted", every_job=True)

    async def _close_when_idle(self, room: RoomInfo) -> None:
        """Close the room at its deadline: ``empty_timeout`` after creation if no one came,
        ``departure_timeout`` after the last participant left (agents do not count)."""
        with room._closer:
            await trio.sleep_forever()
        if room._closer.cancelled_caught and self._rooms.get(room.room.name) is room:
            self._close_room(room, "closed: empty", every_job=False)

    def _close_room(self, room: RoomInfo, why: str, *, every_job: bool) -> None:
        """``Room.Close``: participants removed (those on ``/rtc`` get ``leave``); a job whose
        agent is in the room (or every running job, for ``DeleteRoom``) gets
        ``JobTermination``; dispatches die with it."""
        del self._rooms[room.room.name]
        room._closer.deadline = -math.inf  # its idle task ends now
        reason = Reason.ROOM_DELETED if every_job else Reason.ROOM_CLOSED
        for session in list(room.sessions.values()):
            session.remove(reason)
        joined = set(room.participants)
        for job_id in room.job_ids:
            if every_job or self._jobs[job_id].participant_identity in joined:
                self._terminate(job_id, agent.JS_FAILED, AGENT_LEFT_ROOM)
        logger.info("room %s %s", room.room.name, why)
        self._changed()

    async def create_dispatch(self, room: str, agent_name: str, *, metadata: str = "",
                              attributes: Mapping[str, str] | None = None,
                              deployment: str = "") -> agent_dispatch.AgentDispatch:
        """``AgentDispatchService.CreateDispatch``: auto-creates the room (with its default
        dispatch, as the real server does), then launches this dispatch's jobs: JT_ROOM, and
        JT_PARTICIPANT / JT_PUBLISHER for the participants already there."""
        _check_dispatch(deployment, metadata, attributes or {})
        await self.create_room(room)
        info = self._rooms[room]
        dispatch = self._add_dispatch(info, agent_name, metadata, dict(attributes or {}),
                                      deployment)
        for participant in list(info.participants.values()):
            if not _dependent(participant):
                self._launch(info, dispatch, agent.JT_PARTICIPANT, participant)
        for identity in info.publishers:
            self._launch(info, dispatch, agent.JT_PUBLISHER, info.participants[identity])
        self._changed()
        return dispatch

    async def delete_dispatch(self, dispatch_id: str, room: str) -> agent_dispatch.AgentDispatch:
        """``DeleteDispatch``: its running jobs get ``JobTermination`` and end ``JS_SUCCESS``.

        Jobs of it still being offered are terminated as soon as their offer is over (the
        server waits for pending launches).
        """
        info = self._rooms.get(room)
        dispatch = info.dispatches.pop(dispatch_id, None) if info else None
        if info is None or dispatch is None:
            raise TwirpError("not_found", "dispatch ID not found")
        dispatch.state.deleted_at = now_ns()
        records = [self._jobs[j] for j in info.job_ids
                   if self._jobs[j].job.dispatch_id == dispatch_id]
        for record in records:
            if record.done:
                self._terminate(record.job.id, agent.JS_SUCCESS, "")
        pending = [r for r in records if not r.done]
        if pending:
            self._nursery.start_soon(self._terminate_when_launched, pending)
        self._changed()
        return dispatch

    async def _terminate_when_launched(self, records: list[JobInfo]) -> None:
        await self.wait_until(lambda: all(r.done for r in records))
        for record in records:
            self._terminate(record.job.id, agent.JS_SUCCESS, "")
        self._changed()

    def list_dispatches(self, room: str) -> list[agent_dispatch.AgentDispatch]:
        info = self._rooms.get(room)
        if info is None:
            raise TwirpError("not_found", "requested room does not exist")
        return list(info.dispatches.values())

    async def add_participant(self, room: str, identity: str, *, name: str = "",
                              kind: models.ParticipantInfo.Kind =
                              models.ParticipantInfo.STANDARD,
                              metadata: str = "",
                              attributes: Mapping[str, str] | None = None
                              ) -> models.ParticipantInfo:
        """A participant joins (simulated; auto-creates the room). A non-agent participant
        starts JT_PARTICIPANT jobs for every dispatch of the room. Joining with an identity
        that is already there replaces that participant (it leaves first)."""
        _check_size("identity", identity, MAX_NAME_BYTES, allow_empty=False)
        await self.create_room(room)
        info = self._rooms[room]
        if identity in info.participants:
            self._leave(info, identity, Reason.DUPLICATE_IDENTITY)
        now = time.time()
        participant = models.ParticipantInfo(
            sid=new_id("PA_"), identity=identity, name=name, metadata=metadata, kind=kind,
            attributes=dict(attributes or {}), state=models.ParticipantInfo.ACTIVE,
            joined_at=int(now), joined_at_ms=int(now * 1000), version=1)
        self._admit(info, participant)
        self._broadcast(info, participant, to_self=False)
        self._changed()
        return participant

    def _admit(self, info: RoomInfo, participant: models.ParticipantInfo) -> None:
        """The participant is in the room: counted (agents aside), and JT_PARTICIPANT jobs
        launched for every dispatch of the room."""
        info.participants[participant.identity] = participant
        if not _dependent(participant):
            info.room.num_participants += 1
            info.had_participant = True
            info._closer.deadline = math.inf
            for dispatch in info.dispatches.values():
                self._launch(info, dispatch, agent.JT_PARTICIPANT, participant)

    async def publish_track(self, room: str, identity: str) -> None:
        """A participant publishes a media track (simulated): the first time, a non-agent
        participant starts JT_PUBLISHER jobs for every dispatch of the room."""
        info = self._rooms.get(room)
        participant = info.participants.get(identity) if info else None
        if info is None or participant is None:
            raise TwirpError("not_found", "participant does not exist")
        participant.is_publisher = True
        if identity in info.publishers or _dependent(participant):
            self._changed()
            return
        info.publishers.add(identity)
        info.room.num_publishers += 1
        for dispatch in info.dispatches.values():
            self._launch(info, dispatch, agent.JT_PUBLISHER, participant)
        self._changed()

    async def remove_participant(self, room: str, identity: str) -> None:
        """``RemoveParticipant``: a participant on ``/rtc`` gets ``leave``
        (PARTICIPANT_REMOVED). If it is the agent of a running job, that job gets
        ``JobTermination`` and ends ``JS_FAILED`` (AGENT_LEFT_ROOM)."""
        info = self._rooms.get(room)
        if info is None or identity not in info.participants:
            raise TwirpError("not_found", "participant does not exist")
        self._leave(info, identity, Reason.PARTICIPANT_REMOVED)
        self._changed()

    async def update_participant(self, room: str, identity: str, *, metadata: str = "",
                                 name: str = "", attributes: Mapping[str, str] | None = None
                                 ) -> models.ParticipantInfo:
        """``UpdateParticipant``: empty name or metadata leave them unchanged; attributes are
        merged, ``""`` deleting a key. Everyone in the room (the participant too) is told."""
        info = self._rooms.get(room)
        participant = info.participants.get(identity) if info else None
        if info is None or participant is None:
            raise TwirpError("not_found", "participant does not exist")
        exceeded = merge_update(participant, name=name, metadata=metadata,
                                attributes=attributes or {})
        if exceeded:
            raise TwirpError("invalid_argument", f"{exceeded} exceeds the limit")
        self._participant_changed(info, participant)
        return participant

    async def mute_published_track(self, room: str, identity: str, track_sid: str,
                                   muted: bool) -> models.TrackInfo | None:
        """``MutePublishedTrack``: the publisher gets a ``mute`` request, and everyone a
        ``ParticipantUpdate`` if the track's state changed. The track's info, or ``None`` if
        the participant publishes no such track (not an error, as on livekit-server).

        Unmuting is refused (``failed_precondition``) unless the server was opened with
        ``enable_remote_unmute`` (``room.enable_remote_unmute`` of livekit-server).
        """
        session = self._rtc_participant(room, identity)
        if not muted and not self.enable_remote_unmute:
            raise TwirpError("failed_precondition", "remote unmute not enabled")
        if session is None:  # simulated: it publishes no real track
            return None
        return _tracks.set_muted(self, session, track_sid, muted, from_admin=True)

    async def update_subscriptions(self, room: str, identity: str, track_sids: Iterable[str],
                                   *, subscribe: bool,
                                   participant_tracks: Iterable[models.ParticipantTracks] = ()
                                   ) -> None:
        """``UpdateSubscriptions``: subscribe the participant to the tracks (or unsubscribe
        it), as its own ``UpdateSubscription`` would; unknown sids are ignored. It happens
        in the participant's session, after this returns (livekit-server answers first too).
        """
        session = self._rtc_participant(room, identity)
        if session is None:
            return
        request = rtc_proto.UpdateSubscription(track_sids=list(track_sids), subscribe=subscribe,
                                               participant_tracks=list(participant_tracks))
        (session.nursery or self._nursery).start_soon(
            _tracks.update_subscription, self, session, request)

    def _rtc_participant(self, room: str, identity: str) -> Session | None:
        """The participant a participant-scoped RPC goes to: its session (``None`` for a
        simulated one). livekit-server routes these to the participant's node, and with no
        such participant no node answers: ``unavailable``, not ``not_found``."""
        info = self._rooms.get(room)
        if info is None or identity not in info.participants:
            raise TwirpError("unavailable", "no response from servers")
        return info.sessions.get(identity)

    async def update_room_metadata(self, room: str, metadata: str) -> models.Room:
        """``UpdateRoomMetadata``: participants get ``room_update`` at once."""
        info = self._rooms.get(room)
        if info is None:
            raise TwirpError("not_found", "requested room does not exist")
        _check_size("metadata", metadata, MAX_METADATA_BYTES)
        info.room.metadata = metadata
        for session in info.sessions.values():
            if session.hears:
                session.post(rtc_proto.SignalResponse(
                    room_update=rtc_proto.RoomUpdate(room=info.room)))
        self._changed()
        return info.room

    async def send_data(self, room: str, data: bytes, *, kind: int = models.DataPacket.RELIABLE,
                        destination_identities: Iterable[str] = (), topic: str | None = None,
                        nonce: bytes = b"") -> None:
        """``SendData``: a ``UserPacket`` from the server, over the data channels of the
        participants on ``/rtc`` (all, or those of ``destination_identities``)."""
        info = self._rooms.get(room)
        if info is None:
            raise TwirpError("not_found", "requested room does not exist")
        if len(nonce) not in (0, 16):
            raise TwirpError("invalid_argument", "nonce should be 16-bytes or not present")
        targets = set(destination_identities)
        user = models.UserPacket(payload=data, destination_identities=sorted(targets),
                                 nonce=nonce)
        if topic is not None:
            user.topic = topic
        packet = server_packet(user, kind, sorted(targets))
        label = LOSSY if kind == models.DataPacket.LOSSY else RELIABLE
        for identity, session in info.sessions.items():
            if session.hears and (not targets or identity in targets):
                session.deliver(label, packet)

    def _leave(self, info: RoomInfo, identity: str,
                     reason: int = Reason.CLIENT_INITIATED) -> None:
        """``Room.RemoveParticipant``: out of the room (told with ``leave`` if on ``/rtc``),
        the others told, and a job whose agent it was terminated."""
        participant = info.participants.pop(identity)
        session = info.sessions.pop(identity, None)
        if session is not None:
            session.remove(reason)
        participant.state = models.ParticipantInfo.DISCONNECTED
        participant.disconnect_reason = reason  # type: ignore[assignment]
        self._broadcast(info, participant, to_self=False)
        logger.debug("participant %s left room %s (%s)", identity, info.room.name,
                    models.DisconnectReason.Name(reason))
        if not _dependent(participant):
            info.room.num_participants -= 1
            if info.humans == 0:
                info._closer.deadline = trio.current_time() + info.room.departure_timeout
        if identity in info.publishers:
            info.publishers.discard(identity)
            info.room.num_publishers -= 1
        for job_id in info.job_ids:
            if self._jobs[job_id].participant_identity == identity:
                self._terminate(job_id, agent.JS_FAILED, AGENT_LEFT_ROOM)

    # -- participants on /rtc ----------------------------------------------------------------

    async def _rtc(self, request: Request, claims: Claims | None) -> Response | SessionHandler:
        """``/rtc/v1``, ``/rtc``, and their ``/validate``: the join happens here, before the
        upgrade; the session (``_rtc.run_session``) then runs on the websocket."""
        validate = request.path.endswith("/validate")
        if (not validate and not request.wants_websocket) or (
                request.path.startswith("/rtc/v1") and not self.rtc_v1):
            return Response(404, NOT_FOUND)
        params = parse_join(request, claims)
        if isinstance(params, Response):
            return params
        try:
            await self.media.ensure_started(self._nursery)
        except (MissingExtraError, ConfigError) as exc:
            logger.error("a participant cannot join: %s", exc)
            return Response(500, f"{exc}\n".encode())
        if validate:
            return Response(200, b"success")
        if params.reconnect:
            return functools.partial(_refuse_resume, params)
        session = await self._join(params)
        return functools.partial(run_session, self, session)

    async def _join(self, params: JoinParams) -> Session:
        await self.create_room(params.room)  # room.auto_create
        info = self._rooms[params.room]
        if params.identity in info.participants:
            self._leave(info, params.identity, Reason.DUPLICATE_IDENTITY)
        session = Session(params, participant_info(params), info)
        info.sessions[params.identity] = session
        self._admit(info, session.info)
        self._nursery.start_soon(self._join_deadline, session)
        logger.debug("participant %s joined room %s", params.identity, params.room)
        self._changed()
        return session

    async def _join_deadline(self, session: Session) -> None:
        """livekit-server's one-minute rule: not ACTIVE by then, removed (JOIN_FAILURE)."""
        with trio.move_on_after(self.join_timeout):
            await session.settled.wait()
        if not session.settled.is_set():
            logger.info("participant %s did not complete WebRTC within %s s: removing it",
                        session.identity, self.join_timeout)
            self._remove_session(session, Reason.JOIN_FAILURE)

    def _remove_session(self, session: Session, reason: int) -> None:
        """A participant on ``/rtc`` leaves (unless it was removed already: every removal,
        by ``_leave`` or with its room, marks the session)."""
        if not session.removed:
            self._leave(session.room, session.identity, reason)
            self._changed()

    def _participant_joined(self, session: Session) -> None:
        """``JoinResponse`` is on its way: JOINED, and the others are told."""
        if session.removed:
            return
        session.info.state = models.ParticipantInfo.JOINED
        self._broadcast(session.room, session.info, to_self=False)
        self._changed()

    def _participant_active(self, session: Session) -> None:
        """Its peer connection is up: ACTIVE."""
        if session.removed or session.info.state == models.ParticipantInfo.ACTIVE:
            return
        session.info.state = models.ParticipantInfo.ACTIVE
        session.settled.set()
        self._broadcast(session.room, session.info, to_self=False)
        session.flush()
        self._changed()

    def _participant_changed(self, info: RoomInfo, participant: models.ParticipantInfo) -> None:
        """Name, metadata or attributes changed: everyone is told at once, itself included
        (with a refreshed token, as its claims changed)."""
        self._broadcast(info, participant, to_self=True)
        session = info.sessions.get(participant.identity)
        if session is not None:
            session.post(rtc_proto.SignalResponse(refresh_token=refresh_token(self, session)))
        self._changed()

    def _broadcast(self, info: RoomInfo, participant: models.ParticipantInfo, *,
                   to_self: bool) -> None:
        """A ``ParticipantUpdate`` with ``participant``'s info (its version bumped) to the
        participants on ``/rtc``; a hidden participant is shown to no one else.

        livekit-server batches join/leave/state updates of non-publishers for up to 3 s;
        here every update is sent at once (an order the batching could also produce).
        """
        participant.version += 1
        update = rtc_proto.SignalResponse(
            update=rtc_proto.ParticipantUpdate(participants=[participant]))
        for identity, session in info.sessions.items():
            if identity == participant.identity:
                if to_self and session.hears:
                    session.post(update)
            elif session.hears and not participant.permission.hidden:
                session.post(update)

    def drop_worker(self, worker_id: str) -> None:
        """Drop a worker's connection as a network failure would: the server forgets it at
        once (its offers move to the next worker, its running jobs stay as they are), and its
        socket is closed without a close frame (the client sees 1006)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            raise KeyError(f"no registered worker {worker_id!r}")
        socket = worker._socket
        self._deregister(worker, "dropped by drop_worker")
        if socket is not None:
            self._nursery.start_soon(socket.abort)

    def _add_dispatch(self, room: RoomInfo, agent_name: str, metadata: str,
                      attributes: dict[str, str], deployment: str) -> agent_dispatch.AgentDispatch:
        dispatch = agent_dispatch.AgentDispatch(
            id=new_id("AD_"), agent_name=agent_name, room=room.room.name, metadata=metadata,
            deployment=deployment, attributes=attributes,
            state=agent_dispatch.AgentDispatchState(created_at=now_ns()))
        room.dispatches[dispatch.id] = dispatch
        self._launch(room, dispatch, agent.JT_ROOM, None)
        return dispatch

    # -- dispatch ------------------------------------------------------------------------------

    def _launch(self, room: RoomInfo, dispatch: agent_dispatch.AgentDispatch,
                job_type: agent.JobType,
                participant: models.ParticipantInfo | None) -> None:
        job = agent.Job(
            id=new_id("AJ_"), dispatch_id=dispatch.id, type=job_type,
            room=room.room, namespace="", metadata=dispatch.metadata,
            agent_name=dispatch.agent_name, deployment=dispatch.deployment,
            attributes=dict(dispatch.attributes))
        if participant is not None:
            job.participant.CopyFrom(participant)
        if not any(w.matches(job) for w in self._workers.values()):
            # the room side's CheckEnabled finds no worker: the job is never created
            logger.info("not dispatching agent job since no worker is available "
                        "(room %s, agent name %r, %s)", room.room.name, dispatch.agent_name,
                        agent.JobType.Name(job_type),
                        extra={"room": room.room.name, "agent_name": dispatch.agent_name})
            return
        record = JobInfo(job=job, room=room.room.name)
        self._jobs[job.id] = record
        room.job_ids.append(job.id)
        self._nursery.start_soon(self._dispatch, record, dispatch)

    async def _dispatch(self, record: JobInfo, dispatch: agent_dispatch.AgentDispatch) -> None:
        """Offer the job until a worker takes it, ends it, or the window closes.

        The error boundary of one dispatch: an error of ours drops this job (logged), and
        the server, its rooms and its other jobs go on.
        """
        try:
            await self._dispatch_job(record, dispatch)
        except Exception as exc:
            logger.exception("dispatching job %s (room %s) failed on an error of the dev server",
                             record.job.id, record.room)
            record.dropped = record.dropped or f"dev server error: {exc!r}"
            record.done = True
            self._changed()

    async def _dispatch_job(self, record: JobInfo, dispatch: agent_dispatch.AgentDispatch) -> None:
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
                    record.job.state.worker_id = worker.id
                    record.set_status(agent.JS_SUCCESS)
                    break
                await self._assign(worker, record, response)
                dispatch.state.jobs.append(record.job)
                break
        if deadline.cancelled_caught:
            record.dropped = "context deadline exceeded"
        if record.dropped:
            logger.warning("failed to assign job %s (room %s) to a worker: %s", record.job.id,
                           record.room, record.dropped,
                           extra={"job_id": record.job.id, "room": record.room})
        record.done = True
        self._changed()

    async def _offer(self, worker: WorkerInfo, record: JobInfo) -> agent.AvailabilityResponse | None:
        """Send one ``AvailabilityRequest``; the answer, or ``None`` if the worker went away."""
        job = agent.Job()
        job.CopyFrom(record.job)
        now = now_ns()
        job.state.CopyFrom(agent.JobState(status=agent.JS_RUNNING, worker_id=worker.id,
                                          started_at=now, updated_at=now))
        pending = worker._pending[job.id] = Pending()
        try:
            record.offered_at = time.monotonic()
            await self._send(worker, agent.ServerMessage(
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
        now = now_ns()
        record.job.state.CopyFrom(agent.JobState(
            status=agent.JS_RUNNING, worker_id=worker.id, started_at=now, updated_at=now,
            participant_identity=response.participant_identity))
        record.worker_id = worker.id
        record.response = response
        record.token = job_token(api_key=worker.api_key, api_secret=worker.api_secret,
                                 room=record.room, agent_name=worker.agent_name,
                                 permissions=worker.permissions, response=response)
        record.set_status(agent.JS_RUNNING)
        worker.running_job_ids.add(record.job.id)
        try:
            record.assigned_at = time.monotonic()
            await self._send(worker, agent.ServerMessage(
                assignment=agent.JobAssignment(job=record.job, token=record.token)))
        except WebSocketClosed:
            logger.warning("worker %s closed before its assignment", worker.id)

    def _terminate(self, job_id: str, status: agent.JobStatus, error: str) -> None:
        """``JobTerminate``: only for a job still running on a connected worker. The job
        ends now; the server does not wait for the worker.

        The ``JobTermination`` is written by a task of the server: whoever ended the job (a
        participant's own session, leaving) may be cancelled right after, and the worker
        must still be told.
        """
        record = self._jobs.get(job_id)
        if record is None or record.ended or not record.worker_id:
            return
        worker = self._workers.get(record.worker_id)
        if worker is None or job_id not in worker.running_job_ids:
            return
        worker.running_job_ids.discard(job_id)
        record.set_status(status, error)
        self._nursery.start_soon(self._send_quietly, worker, agent.ServerMessage(
            termination=agent.JobTermination(job_id=job_id)))

    async def _send_quietly(self, worker: WorkerInfo, message: agent.ServerMessage) -> None:
        try:
            await self._send(worker, message)
        except WebSocketClosed:
            pass

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
            return functools.partial(self._agent_session, api_key=claims.api_key)
        if request.path in RTC_PATHS:
            return await self._rtc(request, claims)
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

    # -- /agent -----------------------------------------------------------------------------

    async def _agent_session(self, socket: WebSocket, *, api_key: str) -> None:
        """One worker connection: the registration window, then its messages until it ends.

        Whatever ends it, the socket is dropped without a close frame and the worker
        deregistered.
        """
        worker_id = new_id("AW_")  # at upgrade time, one per connection
        worker: WorkerInfo | None = None
        try:
            worker = await self._handshake(socket, worker_id, api_key)
            while True:
                message, worker._json = await _receive(socket)
                await self._handle(worker, message)
        except (_Closed, WebSocketClosed) as exc:
            logger.debug("closing worker %s: %s", worker_id, exc)
        finally:
            if worker is not None:
                self._deregister(worker, "connection closed")
            await socket.abort()

    async def _handshake(self, socket: WebSocket, worker_id: str, api_key: str) -> WorkerInfo:
        """``HandshakeAgentWorker``: only ``register`` and ``ping`` until registered."""
        with trio.move_on_after(self.register_timeout):
            while True:
                message, as_json = await _receive(socket)
                kind = message.WhichOneof("message")
                if kind == "ping":
                    await socket.send(encode_frame(_pong(message), as_json))
                elif kind == "register":
                    problem = validate_registration(message.register)
                    if problem:
                        raise _Closed(f"registration refused: {problem}")
                    worker = self._new_worker(worker_id, message.register, api_key, socket)
                    worker._json = as_json
                    await self._send(worker, agent.ServerMessage(
                        register=agent.RegisterWorkerResponse(
                            worker_id=worker_id, server_info=models.ServerInfo(
                                edition=models.ServerInfo.Standard, version=SERVER_VERSION,
                                protocol=SIGNAL_PROTOCOL, agent_protocol=AGENT_PROTOCOL,
                                node_id="ND_devserver"))))
                    self._workers[worker_id] = worker
                    logger.debug("worker %s registered (agent name %r, %s)", worker_id,
                                worker.agent_name, agent.JobType.Name(worker.job_type),
                                extra={"agent_name": worker.agent_name})
                    self._changed()
                    return worker
                else:
                    raise _Closed(f"{kind or 'an empty message'} before registration")
        raise _Closed(f"no registration within {self.register_timeout} s")

    def _new_worker(self, worker_id: str, request: agent.RegisterWorkerRequest, api_key: str,
                    socket: WebSocket) -> WorkerInfo:
        permissions = (request.allowed_permissions if request.HasField("allowed_permissions")
                       else default_permissions())
        return WorkerInfo(
            id=worker_id, agent_name=request.agent_name,
            namespace=request.namespace if request.HasField("namespace") else "",
            job_type=request.type, deployment=request.deployment, version=request.version,
            permissions=permissions, api_key=api_key, api_secret=self._secrets[api_key],
            socket=socket)

    def _deregister(self, worker: WorkerInfo, why: str) -> None:
        """Forget the worker (once): its pending offers fail over, its running jobs are left
        as they are (the real server only drops its bookkeeping)."""
        if self._workers.get(worker.id) is not worker:
            return
        del self._workers[worker.id]
        worker._socket = None
        for pending in worker._pending.values():
            pending.event.set()  # response None: the offer moves to the next worker
        logger.debug("worker %s deregistered: %s", worker.id, why)
        self._changed()

    async def _send(self, worker: WorkerInfo, message: agent.ServerMessage) -> None:
        if worker._socket is None:
            raise WebSocketClosed("worker is gone")
        await worker._socket.send(encode_frame(message, worker._json))

    async def _handle(self, worker: WorkerInfo, message: agent.WorkerMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "availability":
            pending = worker._pending.get(message.availability.job_id)
            if pending is None:
                logger.debug("availability response for unknown job %s ignored",
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
            self._update_job(worker, message.update_job)
        elif kind == "ping":
            await self._send(worker, _pong(message))
        elif kind == "migrate_job":
            worker.migrated_job_ids.extend(message.migrate_job.job_ids)  # recorded, then ignored
            self._changed()
        elif kind == "simulate_job":
            self._simulate(worker, message.simulate_job)
        else:  # register again, or nothing set
            raise _Closed(f"unexpected {kind or 'empty message'} from a registered worker")

    def _update_job(self, worker: WorkerInfo, update: agent.UpdateJobStatus) -> None:
        """``Worker.UpdateJobStatus``: only for a job running on this worker."""
        record = self._jobs.get(update.job_id)
        if record is None or update.job_id not in worker.running_job_ids:
            logger.debug("status for unknown job %s ignored", update.job_id)
            return
        if record.job.state.status == agent.JS_PENDING and update.status != agent.JS_PENDING:
            record.job.state.started_at = now_ns()
        record.set_status(update.status, update.error)
        if record.ended:
            worker.running_job_ids.discard(update.job_id)
        self._changed()

    def _simulate(self, worker: WorkerInfo, request: agent.SimulateJobRequest) -> None:
        """``HandleSimulateJob``: a job for this very worker, no room bookkeeping, 10 s."""
        if not request.HasField("room"):
            logger.warning("simulate_job without a room: livekit-server would fail on it")
        job = agent.Job(
            id=new_id("AJ_"), type=agent.JT_PUBLISHER if request.HasField("participant")
            else agent.JT_ROOM, room=request.room, namespace=worker.namespace,
            agent_name=worker.agent_name)
        if request.HasField("participant"):
            job.participant.CopyFrom(request.participant)
        record = JobInfo(job=job, room=request.room.name)
        self._jobs[job.id] = record
        self._changed()

        async def assign() -> None:
            try:
                await offer()
            except Exception as exc:  # this job's error boundary, as in ``_dispatch``
                logger.exception("simulated job %s failed on an error of the dev server",
                                 job.id)
                record.dropped = record.dropped or f"dev server error: {exc!r}"
                record.done = True
                self._changed()

        async def offer() -> None:
            with trio.move_on_after(SIMULATE_TIMEOUT) as deadline:
                record.attempts = 1
                response = await self._offer(worker, record)
                if response is None:
                    record.dropped = "worker closed"
                elif response.terminate:
                    record.set_status(agent.JS_SUCCESS)
                elif response.available:
                    await self._assign(worker, record, response)
                else:
                    record.dropped = "worker not available"
            if deadline.cancelled_caught:
                record.dropped = "availability timeout"
            record.done = True
            self._changed()

        self._nursery.start_soon(assign)


async def _refuse_resume(params: JoinParams, socket: WebSocket) -> None:
    """Resuming is not modelled: the client is told to join afresh (``leave`` RECONNECT)."""
    logger.debug("participant %s asked to resume its session: told to rejoin", params.identity)
    leave = rtc_proto.LeaveRequest(reason=Reason.STATE_MISMATCH, can_reconnect=True)
    if params.client.protocol >= 13:
        leave.action = rtc_proto.LeaveRequest.RECONNECT
    try:
        await socket.send(rtc_proto.SignalResponse(leave=leave).SerializeToString())
    except WebSocketClosed:
        return
    await socket.close()


def _check_options(api_key: str, api_secret: str, availability_timeout: float,
                   register_timeout: float) -> None:
    if not api_key or not api_secret:
        raise ConfigError("the dev server needs an API key and secret (e.g. --api-key devkey "
                          "--api-secret secret)")
    if not availability_timeout > 0 or not register_timeout > 0:
        raise ConfigError(f"the availability timeout ({availability_timeout}) and the register "
                          f"timeout ({register_timeout}) must be positive numbers of seconds")


def _dependent(participant: models.ParticipantInfo) -> bool:
    """Agents and egress never trigger jobs (``IsDependent``)."""
    return participant.kind in DEPENDENT_KINDS


def _check_size(what: str, value: str, limit: int, *, allow_empty: bool = True) -> None:
    if not value and not allow_empty:
        raise TwirpError("invalid_argument", f"{what} cannot be empty")
    if len(value.encode()) > limit:
        raise TwirpError("invalid_argument", f"{what} exceeds the limit of {limit} bytes")


def _check_dispatch(deployment: str, metadata: str, attributes: Mapping[str, str]) -> None:
    problem = validate_deployment(deployment)
    if problem:
        raise TwirpError("invalid_argument", f"invalid deployment {deployment!r}: {problem}")
    _check_size("metadata", metadata, MAX_METADATA_BYTES)
    if attributes_size(attributes) > MAX_ATTRIBUTES_BYTES:
        raise TwirpError("invalid_argument",
                         f"attributes exceed the limit of {MAX_ATTRIBUTES_BYTES} bytes")


async def _receive(socket: WebSocket) -> tuple[agent.WorkerMessage, bool]:
    """The next ``WorkerMessage`` and whether it came as protojson (a text frame)."""
    data = await socket.receive()
    try:
        return decode_frame(data, agent.WorkerMessage), isinstance(data, str)
    except ValueError as exc:
        raise _Closed(f"unparseable message: {exc}") from exc


def _pong(message: agent.WorkerMessage) -> agent.ServerMessage:
    return agent.ServerMessage(pong=agent.WorkerPong(
        last_timestamp=message.ping.timestamp, timestamp=int(time.time() * 1000)))


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
