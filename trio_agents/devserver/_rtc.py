"""Participants for real: ``/rtc/v1``, ``/rtc`` and ``/rtc/validate`` (PROTOCOL.md §6).

A join is validated and performed before the websocket upgrade, as livekit-server does (the
participant is in the room, its ``JT_PARTICIPANT`` jobs launched, before the socket exists);
the session then sends ``JoinResponse`` first and serves ``SignalRequest``s until the
participant leaves or is removed. Its peer connection (``_media.Peer``) answers the client's
offer — in ``JoinRequest.publisher_offer`` or a later ``offer`` — and the participant becomes
``ACTIVE`` once that connection is up; one that is not ``ACTIVE`` within ``join_timeout``
(60 s, as livekit-server) is removed with ``JOIN_FAILURE``.

One peer connection per participant, the client offering: ``/rtc/v1`` is the single-PC mode
of livekit-server; on ``/rtc`` (v0) ``subscriber_primary`` is false, so the client negotiates
its publisher connection, which then carries the data both ways (the SDKs read the channels
they opened). Resuming a session is not modelled: a resume request is told to rejoin.

The pure parts (parsing a join, the metadata merge rules, who receives a data packet) are
functions here that tests call without sockets.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import logging
import math
import re
import time
import zlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, NoReturn, final

import attrs
import trio
from google.protobuf.message import DecodeError
from livekit.protocol import models, rtc

from .._auth import Claims, VideoGrants, create_token
from ._dispatch import (
    MAX_ATTRIBUTES_BYTES,
    MAX_METADATA_BYTES,
    MAX_NAME_BYTES,
    attributes_size,
    new_id,
)
from ._dispatcher import SERVER_VERSION, SIGNAL_PROTOCOL
from ._http import Request, Response, WebSocket, WebSocketClosed, decode_frame, encode_frame
from . import _tracks
from ._media import LOSSY, RELIABLE, Peer, PeerEvent
from ._tracks import Publication, SubscriberPeer

if TYPE_CHECKING:
    from ._records import RoomInfo
    from ._rooms import Rooms

logger = logging.getLogger("trio_agents.devserver")

Kind = models.ParticipantInfo.Kind
Reason = models.DisconnectReason

#: ``JoinResponse.ping_interval`` / ``ping_timeout`` of livekit-server, seconds.
PING_INTERVAL: Final = 5
PING_TIMEOUT: Final = 15
#: ``Room.Join``: a participant not ACTIVE this long after joining is removed.
JOIN_TIMEOUT: Final = 60.0
#: ``http.DefaultMaxHeaderBytes``: the largest decompressed ``join_request``.
MAX_JOIN_REQUEST: Final = 1 << 20
#: Signal responses queued for one participant before it counts as stuck and is dropped.
OUTBOX_SIZE: Final = 1024
#: How long the last messages and the close frame may take to be written.
CLOSE_WRITE_TIMEOUT: Final = 2.0
#: Reliable packets kept for a participant whose channel is not open yet.
PENDING_RELIABLE: Final = 256
#: Token kinds (``kind`` claim) → participant kinds.
KINDS: Final[Mapping[str, int]] = {
    "": Kind.STANDARD, "standard": Kind.STANDARD, "ingress": Kind.INGRESS,
    "egress": Kind.EGRESS, "sip": Kind.SIP, "agent": Kind.AGENT, "connector": Kind.CONNECTOR,
    "bridge": Kind.BRIDGE,
}
#: Reasons a client may give in its ``leave``; anything else is a plain client leave.
CLIENT_REASONS: Final = frozenset({Reason.CLIENT_INITIATED, Reason.USER_UNAVAILABLE,
                                   Reason.USER_REJECTED, Reason.AGENT_ERROR})
#: ``ClientInfo.SDK`` by the ``sdk`` query parameter of ``/rtc``.
SDKS: Final[Mapping[str, int]] = {
    "js": 1, "ios": 2, "swift": 2, "android": 3, "flutter": 4, "go": 5, "unity": 6,
    "reactnative": 7, "rust": 8, "python": 9, "cpp": 10, "unityweb": 11, "node": 12,
    "esp32": 14,
}


# -- joining (pure) ---------------------------------------------------------------------------


@final
@attrs.frozen(kw_only=True)
class JoinParams:
    """Everything a join asks for, validated."""

    room: str
    identity: str
    name: str
    kind: int
    metadata: str
    attributes: Mapping[str, str]
    grants: VideoGrants
    claims: Claims
    client: models.ClientInfo
    single_pc: bool
    publisher_offer: rtc.SessionDescription | None = None
    reconnect: bool = False
    auto_subscribe: bool = True


def parse_join(request: Request, claims: Claims | None) -> JoinParams | Response:
    """``ValidateConnectRequest`` + the query or ``join_request`` of a join: the join, or the
    plain-text error livekit-server answers before the upgrade."""
    video = claims.video if claims is not None else None
    if claims is None or video is None:
        return Response(401, b"no permissions to access the room")
    if not video.room_join:
        return Response(401, b"permissions denied")
    if not claims.identity:
        return Response(400, b"identity cannot be empty")
    if len(claims.identity.encode()) > MAX_NAME_BYTES:
        return Response(400, f"identity exceeds the limit of {MAX_NAME_BYTES} bytes".encode())
    if not video.room:
        return Response(400, b"no room name")
    if len(video.room.encode()) > MAX_NAME_BYTES:
        return Response(400, f"room name exceeds the limit of {MAX_NAME_BYTES} bytes".encode())
    v1 = request.path.startswith("/rtc/v1")
    wrapped = request.param("join_request")
    if v1 and not wrapped:
        return Response(400, b"join_request is required")
    metadata, attributes = claims.metadata, dict(claims.attributes)
    offer: rtc.SessionDescription | None = None
    if wrapped:
        join = decode_join_request(wrapped)
        if isinstance(join, str):
            return Response(400, join.encode())
        client, reconnect = join.client_info, join.reconnect
        auto_subscribe = (not join.HasField("connection_settings")
                          or join.connection_settings.auto_subscribe)
        if join.metadata:
            metadata = join.metadata
        attributes.update({k: v for k, v in join.participant_attributes.items() if v})
        if join.HasField("publisher_offer"):
            offer = join.publisher_offer
    else:
        client = _client_info(request)
        reconnect = _flag(request.param("reconnect"))
        auto_subscribe = request.param("auto_subscribe") not in ("0", "false")
        encoded = request.param("attributes")
        if encoded:
            extra = decode_attributes(encoded)
            if extra is None:
                if request.path.endswith("/validate"):
                    return Response(400, b"cannot decode attributes")
            else:
                attributes.update({k: v for k, v in extra.items() if v})
    if len(metadata.encode()) > MAX_METADATA_BYTES or attributes_size(attributes) > \
            MAX_ATTRIBUTES_BYTES:
        return Response(400, b"metadata or attributes exceed the server's limits")
    return JoinParams(
        room=video.room, identity=claims.identity, name=claims.name,
        kind=KINDS.get(claims.kind, Kind.STANDARD), metadata=metadata, attributes=attributes,
        grants=video, claims=claims, client=client, single_pc=bool(wrapped),
        publisher_offer=offer, reconnect=reconnect, auto_subscribe=auto_subscribe)


def decode_join_request(value: str) -> rtc.JoinRequest | str:
    """A ``join_request`` parameter (base64url ``WrappedJoinRequest``) → the request, or why
    it cannot be read."""
    try:
        wrapper = rtc.WrappedJoinRequest.FromString(
            base64.b64decode(_padded(value), altchars=b"-_", validate=True))
        data = wrapper.join_request
        if wrapper.compression == rtc.WrappedJoinRequest.GZIP:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as unzipped:
                data = unzipped.read(MAX_JOIN_REQUEST + 1)
        if len(data) > MAX_JOIN_REQUEST:
            return "join_request is too large"
        return rtc.JoinRequest.FromString(data)
    except (binascii.Error, ValueError, DecodeError, OSError, EOFError, zlib.error) as exc:
        return f"cannot decode join_request: {exc}"


def decode_attributes(value: str) -> dict[str, str] | None:
    """The ``attributes`` parameter of ``/rtc`` (base64url JSON object of strings), or
    ``None`` if it cannot be read (``decodeAttributes``: livekit-server then joins without
    them, and ``/validate`` answers 400)."""
    try:
        raw = base64.urlsafe_b64decode(_padded(value))
        # as Go reads JSON: UTF-8 only (invalid bytes as U+FFFD), no NaN or Infinity
        decoded = json.loads(raw.decode("utf-8", "replace"), parse_constant=_not_json)
    except (binascii.Error, ValueError, RecursionError):
        return None
    if decoded is None:  # Go unmarshals null into a nil map, without an error
        return {}
    if not isinstance(decoded, dict) or not all(
            isinstance(v, str) or v is None for v in decoded.values()):
        return None  # Go's map[string]string takes strings (null: "") and nothing else
    return {k: v or "" for k, v in decoded.items()}


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def go_atoi32(value: str) -> int:
    """``int32(strconv.Atoi(value))`` as ``ParseClientInfo`` reads ``protocol``: ASCII digits
    with an optional sign, 0 if unreadable or beyond int64, wrapped to int32."""
    if not _ATOI.fullmatch(value):
        return 0
    number = int(value)
    if not -(1 << 63) <= number < 1 << 63:
        return 0
    return (number + (1 << 31)) % (1 << 32) - (1 << 31)


_ATOI: Final = re.compile(r"[+-]?[0-9]+")


def _padded(value: str) -> bytes:
    return (value + "=" * (-len(value) % 4)).encode()


def _flag(value: str) -> bool:
    return value in ("1", "true")


def _client_info(request: Request) -> models.ClientInfo:
    protocol = request.param("protocol")
    client_protocol = request.param("client_protocol")
    return models.ClientInfo(
        sdk=SDKS.get(request.param("sdk"), 0),  # type: ignore[arg-type]
        version=request.param("version"), os=request.param("os"),
        os_version=request.param("os_version"), device_model=request.param("device_model"),
        browser=request.param("browser"), browser_version=request.param("browser_version"),
        network=request.param("network"),
        protocol=go_atoi32(protocol), client_protocol=go_atoi32(client_protocol))


def merge_update(info: models.ParticipantInfo, *, name: str, metadata: str,
                 attributes: Mapping[str, str]) -> str:
    """Apply ``UpdateParticipantMetadata`` / ``UpdateParticipant`` rules to ``info``: empty
    name or metadata = unchanged, attributes merged with ``""`` deleting a key. Returns
    the limit that would be exceeded ("" if none; ``info`` is then unchanged)."""
    if len(name.encode()) > MAX_NAME_BYTES:
        return "name"
    if len(metadata.encode()) > MAX_METADATA_BYTES:
        return "metadata"
    merged = dict(info.attributes)
    for key, value in attributes.items():
        if value:
            merged[key] = value
        else:
            merged.pop(key, None)
    if attributes_size(merged) > MAX_ATTRIBUTES_BYTES:
        return "attributes"
    if name:
        info.name = name
    if metadata:
        info.metadata = metadata
    if dict(info.attributes) != merged:
        info.attributes.clear()
        info.attributes.update(merged)
    return ""


def recipients(packet: models.DataPacket, sender: str,
               present: Iterable[str]) -> list[str]:
    """Who gets a participant's data packet: everyone else, or those of its
    ``destination_identities`` (also the deprecated ``user.destination_identities``)."""
    targets = set(packet.destination_identities)
    if packet.WhichOneof("value") == "user":
        targets.update(packet.user.destination_identities)
    return [identity for identity in present
            if identity != sender and (not targets or identity in targets)]


def participant_info(params: JoinParams) -> models.ParticipantInfo:
    now = time.time()
    grants = params.grants
    return models.ParticipantInfo(
        sid=new_id("PA_"), identity=params.identity, name=params.name,
        metadata=params.metadata, attributes=dict(params.attributes), kind=params.kind,  # type: ignore[arg-type]
        state=models.ParticipantInfo.JOINING, joined_at=int(now), joined_at_ms=int(now * 1000),
        version=1, client_protocol=params.client.client_protocol,
        permission=models.ParticipantPermission(
            can_subscribe=grants.can_subscribe, can_publish=grants.can_publish,
            can_publish_data=grants.can_publish_data, hidden=grants.hidden,
            can_update_metadata=grants.can_update_own_metadata, agent=grants.agent,
            can_subscribe_metrics=grants.can_subscribe_metrics))


# -- a connected participant ------------------------------------------------------------------


@final
class Session:
    """One participant on ``/rtc``: its info (in its room), its signal outbox, its peer."""

    def __init__(self, params: JoinParams, info: models.ParticipantInfo, room: RoomInfo) -> None:
        self.params = params
        self.info = info
        self.room = room
        self.peer: Peer | None = None
        self.subscriber: SubscriberPeer | None = None
        """The peer connection the server offers, once it subscribes to something."""
        self.pending_tracks: dict[str, Publication] = {}  # AddTrackRequests, by cid
        self.publications: dict[str, Publication] = {}  # its published tracks, by sid
        self.subscriptions: dict[str, Publication] = {}  # what it receives, by track sid
        self.nursery: trio.Nursery | None = None
        self.json = False
        self.settled = trio.Event()
        """Set once the participant is ACTIVE or gone (what the join deadline waits for)."""
        self.removed = False
        self._out, self._outbox = trio.open_memory_channel[rtc.SignalResponse | None](
            OUTBOX_SIZE)
        self._pending: list[bytes] = []

    @property
    def identity(self) -> str:
        return self.info.identity

    @property
    def protocol(self) -> int:
        return self.params.client.protocol

    @property
    def hears(self) -> bool:
        """It receives room and participant updates (JOINED or ACTIVE)."""
        return not self.removed and self.info.state in (models.ParticipantInfo.JOINED,
                                                         models.ParticipantInfo.ACTIVE)

    def post(self, message: rtc.SignalResponse) -> None:
        """Queue a signal message; a participant too slow to take them is disconnected."""
        try:
            self._out.send_nowait(message)
        except trio.WouldBlock:
            logger.warning("participant %s does not read its signal connection: closing it",
                           self.identity)
            self.end()
        except trio.ClosedResourceError:
            pass

    def remove(self, reason: int) -> None:
        """It is out of its room: tell it (unless its socket is what went away), close."""
        self.removed = True
        self.settled.set()
        if reason == Reason.SIGNAL_CLOSE:
            self.end()  # nothing to tell it
        else:
            self.leave(reason)

    def leave(self, reason: int) -> None:
        """Tell it to go (``leave`` with DISCONNECT), then close its signal connection."""
        leave = rtc.LeaveRequest(reason=reason)  # type: ignore[arg-type]
        if self.protocol >= 13:
            leave.action = rtc.LeaveRequest.DISCONNECT
        self.post(rtc.SignalResponse(leave=leave))
        self.end()

    def end(self) -> None:
        """Close its signal connection once what is queued has been written."""
        try:
            self._out.send_nowait(None)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass
        self._out.close()

    def deliver(self, label: str, data: bytes) -> None:
        """Send a data packet on its channel ``label``; reliable ones wait for the channel."""
        if self.peer is not None and self.peer.send(label, data):
            return
        if label == RELIABLE and len(self._pending) < PENDING_RELIABLE:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for data in pending:
            self.deliver(RELIABLE, data)

    async def write(self, socket: WebSocket) -> None:
        """Write queued messages in order; after ``end()``, close with a close frame."""
        async for message in self._outbox:
            if message is None:
                break
            await socket.send(encode_frame(message, self.json))
        await socket.close()


def refresh_token(dev: Rooms, session: Session) -> str:
    """A fresh token with the participant's current claims (``RoomManager.refreshToken``)."""
    params, info = session.params, session.info
    ttl = max(600.0, params.claims.expires_at - time.time())
    return create_token(params.claims.api_key, dev._secrets[params.claims.api_key],
                        video=params.grants, identity=info.identity, name=info.name,
                        kind=_kind_name(info.kind), metadata=info.metadata,
                        attributes=dict(info.attributes), ttl=ttl)


def _kind_name(kind: int) -> str:
    return "" if kind == Kind.STANDARD else Kind.Name(kind).lower()


async def run_session(dev: Rooms, session: Session, socket: WebSocket) -> None:
    """The websocket of one participant, from ``JoinResponse`` to its leaving."""
    events_send, events = trio.open_memory_channel[PeerEvent](math.inf)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_then_stop, session, socket, nursery.cancel_scope)
            session.post(rtc.SignalResponse(join=join_response(dev, session)))
            session.post(rtc.SignalResponse(refresh_token=refresh_token(dev, session)))
            session.nursery = nursery
            session.peer = await dev.media.new_peer(events_send)
            dev._participant_joined(session)
            nursery.start_soon(_peer_events, dev, session, events)
            if session.params.publisher_offer is not None:
                await _answer(dev, session, session.params.publisher_offer)
            await _tracks.joined(dev, session)
            await _read(dev, session, socket)
            if not session.removed:  # the client closed its websocket without a leave
                dev._remove_session(session, Reason.SIGNAL_CLOSE)
            session.end()  # the writer sends what is queued (a leave), then the close frame
            nursery.cancel_scope.deadline = trio.current_time() + CLOSE_WRITE_TIMEOUT
    except Exception:
        logger.exception("participant %s: signal session failed", session.identity)
    finally:
        with trio.CancelScope(shield=True):
            if not session.removed:
                dev._remove_session(session, Reason.SIGNAL_CLOSE)
            await _tracks.session_ended(dev, session)
            if session.peer is not None:
                await session.peer.aclose()
                dev._changed()
            events_send.close()


async def _write_then_stop(session: Session, socket: WebSocket, scope: trio.CancelScope) -> None:
    try:
        await session.write(socket)
    except WebSocketClosed:
        pass
    scope.cancel()


def join_response(dev: Rooms, session: Session) -> rtc.JoinResponse:
    room = session.room
    others = [s for s in room.participants.values()
              if s.identity != session.identity and not s.permission.hidden]
    return rtc.JoinResponse(
        room=room.room, participant=session.info, other_participants=others,
        server_version=SERVER_VERSION, ice_servers=[], subscriber_primary=False,
        server_region="", ping_timeout=PING_TIMEOUT, ping_interval=PING_INTERVAL,
        server_info=models.ServerInfo(edition=models.ServerInfo.Standard,
                                      version=SERVER_VERSION, protocol=SIGNAL_PROTOCOL,
                                      node_id="ND_devserver"),
        sif_trailer=room.sif_trailer, fast_publish=session.params.grants.can_publish,
        client_configuration=models.ClientConfiguration())


async def _answer(dev: Rooms, session: Session, offer: rtc.SessionDescription) -> None:
    assert session.peer is not None
    try:
        sdp = await session.peer.answer(offer.sdp)
    except Exception as exc:  # aiortc's errors are plain exceptions of many kinds
        logger.warning("participant %s: cannot answer its offer: %r", session.identity, exc)
        session.leave(Reason.STATE_MISMATCH)
        return
    session.post(rtc.SignalResponse(answer=rtc.SessionDescription(
        type="answer", sdp=sdp, id=offer.id)))
    await _tracks.renegotiated(dev, session)


async def _read(dev: Rooms, session: Session, socket: WebSocket) -> None:
    while not session.removed:
        try:
            data = await socket.receive()
        except WebSocketClosed:
            return
        session.json = isinstance(data, str)
        try:
            message = decode_frame(data, rtc.SignalRequest)
        except ValueError as exc:
            logger.debug("participant %s sent an unreadable signal message (%s): closing",
                        session.identity, exc)
            return
        await _handle(dev, session, message)


async def _handle(dev: Rooms, session: Session, message: rtc.SignalRequest) -> None:
    kind = message.WhichOneof("message")
    if kind == "offer":
        await _answer(dev, session, message.offer)
    elif kind == "answer":
        if session.subscriber is not None:
            try:
                await session.subscriber.answered(message.answer.sdp)
            except Exception as exc:  # aiortc's errors are plain exceptions of many kinds
                logger.warning("participant %s: cannot take its answer: %r", session.identity,
                               exc)
                session.leave(Reason.STATE_MISMATCH)
    elif kind == "trickle":
        target: Peer | SubscriberPeer | None = (
            session.subscriber if message.trickle.target == rtc.SUBSCRIBER else session.peer)
        if target is not None and message.trickle.candidateInit:
            try:
                await target.add_candidate(message.trickle.candidateInit)
            except Exception as exc:  # a candidate aiortc cannot use is skipped, as by pion
                logger.debug("participant %s: candidate ignored: %r", session.identity, exc)
    elif kind == "add_track":
        _tracks.add_track(session, message.add_track)
    elif kind == "mute":
        _tracks.set_muted(dev, session, message.mute.sid, message.mute.muted)
    elif kind == "subscription":
        await _tracks.update_subscription(dev, session, message.subscription)
    elif kind == "ping":
        session.post(rtc.SignalResponse(pong=int(time.time() * 1000)))
    elif kind == "ping_req":
        session.post(rtc.SignalResponse(pong_resp=rtc.Pong(
            last_ping_timestamp=message.ping_req.timestamp, timestamp=int(time.time() * 1000))))
    elif kind == "update_metadata":
        _update_own_metadata(dev, session, message.update_metadata)
    elif kind == "leave":
        reason = message.leave.reason
        dev._remove_session(
            session, reason if reason in CLIENT_REASONS else Reason.CLIENT_INITIATED)
    else:  # track settings, sync state, simulate...: nothing the dev server models
        logger.debug("participant %s: %s ignored", session.identity, kind)


def _update_own_metadata(dev: Rooms, session: Session,
                         update: rtc.UpdateParticipantMetadata) -> None:
    def respond(reason: int, text: str = "") -> None:
        if reason != rtc.RequestResponse.OK or session.protocol >= 15:
            session.post(rtc.SignalResponse(request_response=rtc.RequestResponse(
                request_id=update.request_id, reason=reason, message=text,  # type: ignore[arg-type]
                update_metadata=update)))

    if not session.params.grants.can_update_own_metadata:
        respond(rtc.RequestResponse.NOT_ALLOWED, "does not have permission to update own metadata")
        return
    exceeded = merge_update(session.info, name=update.name, metadata=update.metadata,
                            attributes=update.attributes)
    if exceeded:
        respond(rtc.RequestResponse.LIMIT_EXCEEDED, f"{exceeded} exceeds the limit")
        return
    dev._participant_changed(session.room, session.info)
    respond(rtc.RequestResponse.OK)


async def _peer_events(dev: Rooms, session: Session,
                       events: trio.MemoryReceiveChannel[PeerEvent]) -> None:
    async for event in events:
        if event.kind == "state":
            logger.debug("participant %s: peer connection %s", session.identity, event.value)
            if event.value == "connected":
                dev._participant_active(session)
            elif event.value == "failed" and not session.removed:
                dev._remove_session(session, Reason.MEDIA_FAILURE)
        elif event.kind == "channel":
            if event.value == RELIABLE:
                session.flush()
        elif event.kind == "data" and event.value in (RELIABLE, LOSSY):
            forward(dev, session, event.value, event.payload)
        elif event.kind == "track":
            track, transceiver = event.obj
            await _tracks.media_arrived(dev, session, track, transceiver)


def forward(dev: Rooms, session: Session, label: str, data: bytes) -> None:
    """``handleReceivedDataMessage``: check, stamp the sender, pass to the recipients."""
    if not session.params.grants.can_publish_data:
        return
    packet = models.DataPacket()
    try:
        packet.ParseFromString(data)
    except DecodeError:
        logger.debug("participant %s sent an unreadable data packet", session.identity)
        return
    value = packet.WhichOneof("value")
    if value == "metrics" or (value == "transcription" and session.info.kind != Kind.AGENT):
        return
    info = session.info
    if not (info.kind == Kind.AGENT and packet.participant_identity):
        packet.participant_identity = info.identity
    packet.participant_sid = info.sid
    if value == "user":
        packet.user.participant_identity = info.identity
        packet.user.participant_sid = info.sid
    stamped = packet.SerializeToString()
    sessions = session.room.sessions
    for identity in recipients(packet, info.identity, list(sessions)):
        target = sessions[identity]
        if target.hears:
            target.deliver(label, stamped)


def server_packet(user: models.UserPacket, kind: int,
                  destination_identities: Iterable[str]) -> bytes:
    """A ``DataPacket`` from the server itself (``SendData``)."""
    return models.DataPacket(kind=kind, user=user,  # type: ignore[arg-type]
                             destination_identities=list(destination_identities)
                             ).SerializeToString()

