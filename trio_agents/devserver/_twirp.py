"""Twirp ``RoomService`` and ``AgentDispatchService`` (PROTOCOL.md §7): protobuf or JSON bodies,
grants checked as livekit-server does, JSON errors ``{"code", "msg"}``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from livekit.protocol import agent_dispatch, room

from ._http import Request, Response

if TYPE_CHECKING:
    from ._server import DevServer

PREFIX: Final = "/twirp/livekit."

Handler = Callable[["DevServer", Any], Awaitable[Message]]


def _grant(claims: Any, grant: str, room_name: str | None = None) -> None:
    from ._server import TwirpError

    video = claims.video if claims is not None else None
    if video is None or not getattr(video, grant):
        raise TwirpError("unauthenticated", "permissions denied")
    if room_name is not None and video.room != room_name:
        raise TwirpError("unauthenticated", "permissions denied")


async def _create_room(dev: DevServer, req: room.CreateRoomRequest) -> Message:
    return await dev.create_room(req.name, agents=list(req.agents) or None, metadata=req.metadata,
                                 empty_timeout=req.empty_timeout or 300,
                                 departure_timeout=req.departure_timeout or 20,
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
    from ._server import TwirpError

    info = dev.rooms.get(req.room)
    participant = info.participants.get(req.identity) if info else None
    if participant is None:
        raise TwirpError("not_found", "participant does not exist")
    return participant


async def _remove_participant(dev: DevServer, req: room.RoomParticipantIdentity) -> Message:
    await dev.remove_participant(req.room, req.identity)
    return room.RemoveParticipantResponse()


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


# (service, method) -> (request type, handler, grant, room field or None)
ROUTES: Final[dict[tuple[str, str], tuple[type[Message], Handler, str, str | None]]] = {
    ("RoomService", "CreateRoom"): (room.CreateRoomRequest, _create_room, "room_create", None),
    ("RoomService", "ListRooms"): (room.ListRoomsRequest, _list_rooms, "room_list", None),
    ("RoomService", "DeleteRoom"): (room.DeleteRoomRequest, _delete_room, "room_create", None),
    ("RoomService", "ListParticipants"): (room.ListParticipantsRequest, _list_participants,
                                          "room_admin", "room"),
    ("RoomService", "GetParticipant"): (room.RoomParticipantIdentity, _get_participant,
                                        "room_admin", "room"),
    ("RoomService", "RemoveParticipant"): (room.RoomParticipantIdentity, _remove_participant,
                                           "room_admin", "room"),
    ("AgentDispatchService", "CreateDispatch"): (agent_dispatch.CreateAgentDispatchRequest,
                                                 _create_dispatch, "room_admin", "room"),
    ("AgentDispatchService", "ListDispatch"): (agent_dispatch.ListAgentDispatchRequest,
                                               _list_dispatch, "room_admin", "room"),
    ("AgentDispatchService", "DeleteDispatch"): (agent_dispatch.DeleteAgentDispatchRequest,
                                                 _delete_dispatch, "room_admin", "room"),
}


async def handle_twirp(dev: DevServer, request: Request) -> Response:
    from ._server import TwirpError

    service, _, method = request.path[len(PREFIX):].partition("/") if request.path.startswith(
        PREFIX) else ("", "", "")
    route = ROUTES.get((service, method))
    content_type = request.header("content-type").split(";")[0].strip()
    try:
        if request.method != "POST" or route is None or content_type not in (
                "application/protobuf", "application/json"):
            raise TwirpError("bad_route", f"no handler for path {request.path!r}")
        claims = dev.authenticate(request)
        if isinstance(claims, Response):
            return claims  # an invalid token: the middleware's plain-text 401
        message_type, handler, grant, room_field = route
        body = message_type()
        try:
            if content_type == "application/json":
                json_format.Parse(request.body or b"{}", body, ignore_unknown_fields=True)
            else:
                body.ParseFromString(request.body)
        except (DecodeError, json_format.ParseError) as exc:
            raise TwirpError("malformed", f"the request could not be decoded: {exc}") from exc
        _grant(claims, grant, getattr(body, room_field) if room_field else None)
        result = await handler(dev, body)
    except TwirpError as exc:
        return exc.response()
    if content_type == "application/json":
        return Response(200, json_format.MessageToJson(
            result, preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True).encode(), "application/json")
    return Response(200, result.SerializeToString(), "application/protobuf")
