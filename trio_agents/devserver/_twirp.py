"""Twirp ``RoomService``, ``AgentDispatchService`` and the call-placing part of ``SIP``
(PROTOCOL.md §7): protobuf or JSON bodies,
grants checked as livekit-server does, JSON errors ``{"code", "msg"}``.

The token itself was already checked by the auth middleware (``DevServer.authenticate``); a
valid token without the grant a method needs gets Twirp's ``unauthenticated`` here.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from livekit.protocol import agent_dispatch, room, sip

from .._auth import Claims
from ..api import TWIRP_STATUS, TwirpError
from ._http import Request, Response

if TYPE_CHECKING:
    from ._server import DevServer

PREFIX: Final = "/twirp/livekit."
JSON: Final = "application/json"
PROTOBUF: Final = "application/protobuf"

Handler = Callable[["DevServer", Any], Awaitable[Message]]


@attrs.frozen
class Route:
    request: type[Message]
    handler: Handler
    grant: str
    """The ``VideoGrants`` attribute the token needs ("" for none)."""
    room_field: str | None = None
    """The request field that must equal the token's ``video.room`` (room-scoped methods)."""
    sip_grant: str = ""
    """The ``SIPGrants`` attribute the token needs ("" for none)."""
    validate: Callable[[Any], None] | None = None
    """Checks of the request that livekit-server makes before the grants."""


def error_response(error: TwirpError) -> Response:
    body = json.dumps({"code": error.code, "msg": error.msg}).encode()
    return Response(TWIRP_STATUS.get(error.code, 500), body, JSON)


def check_grant(claims: Claims | None, route: Route, request: Message) -> None:
    """``EnsureCreatePermission`` / ``EnsureListPermission`` / ``EnsureAdminPermission``."""
    video = claims.video if claims is not None else None
    sip_grants = claims.sip if claims is not None else None
    if route.sip_grant and (sip_grants is None or not getattr(sip_grants, route.sip_grant)):
        raise TwirpError("unauthenticated", "permissions denied")
    if route.grant and (video is None or not getattr(video, route.grant)):
        raise TwirpError("unauthenticated", "permissions denied")
    if route.room_field is not None and (video is None
                                         or video.room != getattr(request, route.room_field)):
        raise TwirpError("unauthenticated", "permissions denied")


async def _create_room(dev: DevServer, req: room.CreateRoomRequest) -> Message:
    return await dev.create_room(req.name, agents=list(req.agents), metadata=req.metadata,
                                 empty_timeout=req.empty_timeout,
                                 departure_timeout=req.departure_timeout,
                                 max_participants=req.max_participants)


async def _list_rooms(dev: DevServer, req: room.ListRoomsRequest) -> Message:
    names = set(req.names)
    return room.ListRoomsResponse(rooms=[r.room for n, r in dev.rooms.items()
                                         if not names or n in names])


async def _delete_room(dev: DevServer, req: room.DeleteRoomRequest) -> Message:
    await dev.delete_room(req.room)
    return room.DeleteRoomResponse()


async def _list_participants(dev: DevServer, req: room.ListParticipantsRequest) -> Message:
    info = dev.rooms.get(req.room)
    return room.ListParticipantsResponse(
        participants=list(info.participants.values()) if info else [])


async def _get_participant(dev: DevServer, req: room.RoomParticipantIdentity) -> Message:
    info = dev.rooms.get(req.room)
    participant = info.participants.get(req.identity) if info else None
    if participant is None:
        raise TwirpError("not_found", "participant does not exist")
    return participant


async def _remove_participant(dev: DevServer, req: room.RoomParticipantIdentity) -> Message:
    await dev.remove_participant(req.room, req.identity)
    return room.RemoveParticipantResponse()


async def _update_participant(dev: DevServer, req: room.UpdateParticipantRequest) -> Message:
    return await dev.update_participant(req.room, req.identity, metadata=req.metadata,
                                        name=req.name, attributes=dict(req.attributes))


async def _mute_published_track(dev: DevServer, req: room.MuteRoomTrackRequest) -> Message:
    track = await dev.mute_published_track(req.room, req.identity, req.track_sid, req.muted)
    return room.MuteRoomTrackResponse(track=track)


async def _update_subscriptions(dev: DevServer, req: room.UpdateSubscriptionsRequest) -> Message:
    await dev.update_subscriptions(req.room, req.identity, req.track_sids,
                                   subscribe=req.subscribe,
                                   participant_tracks=req.participant_tracks)
    return room.UpdateSubscriptionsResponse()


async def _update_room_metadata(dev: DevServer, req: room.UpdateRoomMetadataRequest) -> Message:
    return await dev.update_room_metadata(req.room, req.metadata)


async def _send_data(dev: DevServer, req: room.SendDataRequest) -> Message:
    await dev.send_data(req.room, req.data, kind=req.kind,
                        destination_identities=req.destination_identities,
                        topic=req.topic if req.HasField("topic") else None, nonce=req.nonce)
    return room.SendDataResponse()


async def _create_dispatch(dev: DevServer,
                           req: agent_dispatch.CreateAgentDispatchRequest) -> Message:
    return await dev.create_dispatch(req.room, req.agent_name, metadata=req.metadata,
                                     attributes=dict(req.attributes), deployment=req.deployment)


async def _list_dispatch(dev: DevServer, req: agent_dispatch.ListAgentDispatchRequest) -> Message:
    dispatches = [d for d in dev.list_dispatches(req.room)
                  if not req.dispatch_id or d.id == req.dispatch_id]
    return agent_dispatch.ListAgentDispatchResponse(agent_dispatches=dispatches)


async def _delete_dispatch(dev: DevServer,
                           req: agent_dispatch.DeleteAgentDispatchRequest) -> Message:
    return await dev.delete_dispatch(req.dispatch_id, req.room)


async def _create_sip_participant(dev: DevServer, req: sip.CreateSIPParticipantRequest
                                  ) -> Message:
    # The dev server keeps no SIP trunks, so every trunk is unknown: livekit-server (with
    # Redis, where SIP is available) answers this for a trunk it does not have.
    raise TwirpError("not_found", "requested sip trunk does not exist")


def _validate_transfer(req: sip.TransferSIPParticipantRequest) -> None:
    if not req.room_name:
        raise TwirpError("invalid_argument", "Missing room name")
    if not req.participant_identity:
        raise TwirpError("invalid_argument", "Missing participant identity")


async def _transfer_sip_participant(dev: DevServer, req: sip.TransferSIPParticipantRequest
                                    ) -> Message:
    info = dev.rooms.get(req.room_name)
    participant = info.participants.get(req.participant_identity) if info else None
    if participant is None:
        raise TwirpError("not_found", "participant does not exist")
    if "sip.callID" not in participant.attributes:
        raise TwirpError("invalid_argument", "no SIP session associated with participant")
    # a participant that claims a call, with no SIP service to carry the transfer
    raise TwirpError("unavailable", "no SIP service is connected to the dev server")


ROUTES: Final[dict[str, Route]] = {
    "RoomService/CreateRoom": Route(room.CreateRoomRequest, _create_room, "room_create"),
    "RoomService/ListRooms": Route(room.ListRoomsRequest, _list_rooms, "room_list"),
    "RoomService/DeleteRoom": Route(room.DeleteRoomRequest, _delete_room, "room_create"),
    "RoomService/ListParticipants": Route(room.ListParticipantsRequest, _list_participants,
                                          "room_admin", "room"),
    "RoomService/GetParticipant": Route(room.RoomParticipantIdentity, _get_participant,
                                        "room_admin", "room"),
    "RoomService/RemoveParticipant": Route(room.RoomParticipantIdentity, _remove_participant,
                                           "room_admin", "room"),
    "RoomService/UpdateParticipant": Route(room.UpdateParticipantRequest, _update_participant,
                                           "room_admin", "room"),
    "RoomService/MutePublishedTrack": Route(room.MuteRoomTrackRequest, _mute_published_track,
                                            "room_admin", "room"),
    "RoomService/UpdateSubscriptions": Route(room.UpdateSubscriptionsRequest,
                                             _update_subscriptions, "room_admin", "room"),
    "RoomService/UpdateRoomMetadata": Route(room.UpdateRoomMetadataRequest,
                                            _update_room_metadata, "room_admin", "room"),
    "RoomService/SendData": Route(room.SendDataRequest, _send_data, "room_admin", "room"),
    "AgentDispatchService/CreateDispatch": Route(agent_dispatch.CreateAgentDispatchRequest,
                                                 _create_dispatch, "room_admin", "room"),
    "AgentDispatchService/ListDispatch": Route(agent_dispatch.ListAgentDispatchRequest,
                                               _list_dispatch, "room_admin", "room"),
    "AgentDispatchService/DeleteDispatch": Route(agent_dispatch.DeleteAgentDispatchRequest,
                                                 _delete_dispatch, "room_admin", "room"),
    "SIP/CreateSIPParticipant": Route(sip.CreateSIPParticipantRequest, _create_sip_participant,
                                      "", sip_grant="call"),
    "SIP/TransferSIPParticipant": Route(sip.TransferSIPParticipantRequest,
                                        _transfer_sip_participant, "room_admin", "room_name",
                                        sip_grant="call", validate=_validate_transfer),
}


def decode(route: Route, content_type: str, body: bytes) -> Message:
    message = route.request()
    try:
        if content_type == JSON:  # protojson: one JSON object, an empty body is malformed
            parsed = json.loads(body)
            if not isinstance(parsed, dict):
                raise ValueError(f"a JSON object is expected, not {type(parsed).__name__}")
            json_format.ParseDict(parsed, message, ignore_unknown_fields=True)
        else:
            message.ParseFromString(body)
    except (DecodeError, json_format.ParseError, ValueError, RecursionError) as exc:
        raise TwirpError("malformed", f"the request could not be decoded: {exc}") from exc
    return message


def encode(message: Message, content_type: str) -> Response:
    if content_type == JSON:  # protojson with UseProtoNames and EmitUnpopulated
        text = json_format.MessageToJson(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True, indent=None)
        return Response(200, text.encode(), JSON)
    return Response(200, message.SerializeToString(), PROTOBUF)


async def handle_twirp(dev: DevServer, request: Request, claims: Claims | None) -> Response:
    """Serve one ``POST /twirp/livekit.<Service>/<Method>``."""
    route = ROUTES.get(request.path[len(PREFIX):]) if request.path.startswith(PREFIX) else None
    content_type = request.header("content-type").split(";")[0].strip().lower()
    try:
        if request.method != "POST":
            raise TwirpError("bad_route", f"unsupported method {request.method!r} "
                             "(only POST is allowed)")
        if route is None:
            raise TwirpError("bad_route", f"no handler for path {request.path!r}")
        if content_type not in (JSON, PROTOBUF):
            raise TwirpError("bad_route", f"unexpected Content-Type: {content_type!r}")
        message = decode(route, content_type, request.body)
        if route.validate is not None:
            route.validate(message)
        check_grant(claims, route, message)
        return encode(await route.handler(dev, message), content_type)
    except TwirpError as exc:
        return error_response(exc)
