"""Rooms and their participants: room lifecycle, dispatch records, simulated participants,
and the participants on ``/rtc`` (their sessions, PROTOCOL.md §6).

Owner: ``Rooms`` owns the rooms (``RoomInfo`` records: participants, sessions, dispatch
records) and every participant's presence in them: joining, the join deadline, updates sent
to the others, leaving, closing a room. It launches and ends jobs only through the
``Dispatcher`` (``_dispatcher.py``); tracks and forwarding are ``_tracks.py``'s, the signal
session itself ``_rtc.py``'s.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Final, final

import trio
from livekit.protocol import agent, agent_dispatch, models
from livekit.protocol import rtc as rtc_proto

from .._auth import Claims
from .._errors import ConfigError, MissingExtraError
from ..api import TwirpError
from ._dispatch import (
    MAX_ATTRIBUTES_BYTES,
    MAX_METADATA_BYTES,
    MAX_NAME_BYTES,
    attributes_size,
    new_id,
    validate_deployment,
)
from ._dispatcher import Dispatcher
from ._http import Request, Response, SessionHandler, WebSocket, WebSocketClosed
from ._media import LOSSY, RELIABLE, MediaHost
from ._records import Changes, RoomInfo, now_ns
from ._rtc import (
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

DEPENDENT_KINDS: Final = (models.ParticipantInfo.AGENT, models.ParticipantInfo.EGRESS)
AGENT_LEFT_ROOM: Final = "agent worker left the room"
#: ``room.empty_timeout`` / ``room.departure_timeout`` defaults, seconds.
EMPTY_TIMEOUT: Final = 300
DEPARTURE_TIMEOUT: Final = 20
NOT_FOUND: Final = b"404 page not found\n"


@final
class Rooms:
    """The rooms and who is in them (see the module docstring)."""

    def __init__(self, nursery: trio.Nursery, changes: Changes, dispatcher: Dispatcher,
                 media: MediaHost, *, secrets: Mapping[str, str], join_timeout: float,
                 rtc_v1: bool) -> None:
        self._nursery = nursery
        self._changed = changes.changed
        self._dispatcher = dispatcher
        self.media = media
        self._secrets = secrets
        self.join_timeout = join_timeout
        self.rtc_v1 = rtc_v1
        self._rooms: dict[str, RoomInfo] = {}

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
        """Close the room now: its participants get ``leave`` (ROOM_DELETED); a job whose
        agent is connected ends by itself when its agent leaves, as on livekit-server.

        Unlike livekit-server, which leaves a job whose agent has not joined (yet) running
        with no room, this terminates it (``JobTermination``, ``JS_FAILED`` "agent worker
        left the room"): a test can end a job that never connects.
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
        """``Room.Close``: participants removed (those on ``/rtc`` get ``leave``); dispatches
        die with it.

        As on livekit-server, an agent connected on ``/rtc`` is only told to leave (its job
        then ends by itself and reports its own status; the server sends no
        ``JobTermination``). A job whose agent is simulated (``add_participant``), or, for
        ``DeleteRoom``, never joined, gets ``JobTermination`` (``JS_FAILED``, "agent worker
        left the room"): nothing else would tell it.
        """
        del self._rooms[room.room.name]
        room._closer.deadline = -math.inf  # its idle task ends now
        reason = Reason.ROOM_DELETED if every_job else Reason.ROOM_CLOSED
        told = set(room.sessions)
        for session in list(room.sessions.values()):
            session.remove(reason)
        joined = set(room.participants)
        for job_id in room.job_ids:
            identity = self._dispatcher._jobs[job_id].participant_identity
            if identity not in told and (every_job or identity in joined):
                self._dispatcher._terminate(job_id, agent.JS_FAILED, AGENT_LEFT_ROOM)
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
                self._dispatcher._launch(info, dispatch, agent.JT_PARTICIPANT, participant)
        for identity in info.publishers:
            self._dispatcher._launch(info, dispatch, agent.JT_PUBLISHER,
                                     info.participants[identity])
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
        records = [self._dispatcher._jobs[j] for j in info.job_ids
                   if self._dispatcher._jobs[j].job.dispatch_id == dispatch_id]
        for record in records:
            if record.done:
                self._dispatcher._terminate(record.job.id, agent.JS_SUCCESS, "")
        pending = [r for r in records if not r.done]
        if pending:
            self._nursery.start_soon(self._dispatcher._terminate_when_launched, pending)
        self._changed()
        return dispatch

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
                self._dispatcher._launch(info, dispatch, agent.JT_PARTICIPANT, participant)

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
            self._dispatcher._launch(info, dispatch, agent.JT_PUBLISHER, participant)
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
            if self._dispatcher._jobs[job_id].participant_identity == identity:
                self._dispatcher._terminate(job_id, agent.JS_FAILED, AGENT_LEFT_ROOM)

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

    def _add_dispatch(self, room: RoomInfo, agent_name: str, metadata: str,
                      attributes: dict[str, str], deployment: str) -> agent_dispatch.AgentDispatch:
        dispatch = agent_dispatch.AgentDispatch(
            id=new_id("AD_"), agent_name=agent_name, room=room.room.name, metadata=metadata,
            deployment=deployment, attributes=attributes,
            state=agent_dispatch.AgentDispatchState(created_at=now_ns()))
        room.dispatches[dispatch.id] = dispatch
        self._dispatcher._launch(room, dispatch, agent.JT_ROOM, None)
        return dispatch


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
