"""Twirp RoomService / AgentDispatchService of the dev server (PROTOCOL.md §7), over memory
streams: JSON and protobuf bodies, grants, Twirp JSON errors, the middleware's plain 401."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf.message import Message
from livekit.protocol import agent_dispatch, models, room

from trio_agents._auth import VideoGrants, create_token
from trio_agents.devserver import DevServer, open_dev_server

from devserver_helpers import KEY, SECRET, HttpClient, http_client

ROOMS = "/twirp/livekit.RoomService/"
DISPATCH = "/twirp/livekit.AgentDispatchService/"


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False) as server:
        yield server


@pytest.fixture
async def http(dev: DevServer) -> AsyncIterator[HttpClient]:
    async with http_client(dev) as client:
        yield client


def auth(**grants: Any) -> tuple[str, str]:
    return ("authorization", f"Bearer {create_token(KEY, SECRET, video=VideoGrants(**grants))}")


async def call_json(http: HttpClient, path: str, body: dict[str, Any] | str,
                    **grants: Any) -> tuple[int, Any]:
    headers = [("content-type", "application/json; charset=utf-8")]
    if grants:
        headers.append(auth(**grants))
    status, response_headers, data = await http.request(
        "POST", path, body=(body if isinstance(body, str) else json.dumps(body)).encode(),
        headers=headers)
    if response_headers["content-type"] == "application/json":
        return status, json.loads(data)
    return status, data.decode()


async def call_proto(http: HttpClient, path: str, message: Message,
                     response: type[Message], **grants: Any) -> Message:
    status, headers, data = await http.request(
        "POST", path, body=message.SerializeToString(),
        headers=[("content-type", "application/protobuf"), auth(**grants)])
    assert (status, headers["content-type"]) == (200, "application/protobuf"), data
    return response.FromString(data)


async def test_create_room_in_json_answers_snake_case_with_every_field(
    dev: DevServer, http: HttpClient
) -> None:
    status, body = await call_json(http, ROOMS + "CreateRoom",
                                   {"name": "j", "emptyTimeout": 30, "somethingNew": True},
                                   room_create=True)
    assert status == 200
    assert body["name"] == "j" and body["sid"].startswith("RM_") and body["empty_timeout"] == 30
    assert body["num_participants"] == 0 and body["metadata"] == ""  # unpopulated, printed
    assert isinstance(body["creation_time"], str)  # int64 as a string
    assert dev.rooms["j"].room.empty_timeout == 30


async def test_protobuf_bodies(dev: DevServer, http: HttpClient) -> None:
    made = await call_proto(http, ROOMS + "CreateRoom", room.CreateRoomRequest(
        name="p", agents=[agent_dispatch.RoomAgentDispatch(agent_name="bot", metadata="m")]),
        models.Room, room_create=True)
    assert isinstance(made, models.Room) and made.name == "p"
    listed = await call_proto(http, ROOMS + "ListRooms", room.ListRoomsRequest(names=["p", "x"]),
                              room.ListRoomsResponse, room_list=True)
    assert isinstance(listed, room.ListRoomsResponse) and [r.sid for r in listed.rooms] == [made.sid]
    dispatches = await call_proto(http, DISPATCH + "ListDispatch",
                                  agent_dispatch.ListAgentDispatchRequest(room="p"),
                                  agent_dispatch.ListAgentDispatchResponse,
                                  room_admin=True, room="p")
    assert isinstance(dispatches, agent_dispatch.ListAgentDispatchResponse)
    assert [(d.agent_name, d.metadata) for d in dispatches.agent_dispatches] == [("bot", "m")]


async def test_dispatch_methods(dev: DevServer, http: HttpClient) -> None:
    grants = {"room_admin": True, "room": "d"}
    status, created = await call_json(http, DISPATCH + "CreateDispatch",
                                      {"room": "d", "agent_name": "bot", "metadata": "x",
                                       "attributes": {"k": "v"}}, **grants)
    assert status == 200 and created["id"].startswith("AD_") and created["attributes"] == {"k": "v"}
    # the room was auto-created, with its default dispatch
    assert sorted(d.agent_name for d in dev.list_dispatches("d")) == ["", "bot"]
    status, listed = await call_json(http, DISPATCH + "ListDispatch",
                                     {"room": "d", "dispatch_id": created["id"]}, **grants)
    assert [d["id"] for d in listed["agent_dispatches"]] == [created["id"]]
    status, deleted = await call_json(http, DISPATCH + "DeleteDispatch",
                                      {"room": "d", "dispatch_id": created["id"]}, **grants)
    assert status == 200 and deleted["state"]["deleted_at"] != "0"
    status, error = await call_json(http, DISPATCH + "DeleteDispatch",
                                    {"room": "d", "dispatch_id": created["id"]}, **grants)
    assert (status, error) == (404, {"code": "not_found", "msg": "dispatch ID not found"})
    status, error = await call_json(http, DISPATCH + "CreateDispatch",
                                    {"room": "d", "agent_name": "b", "deployment": "a_b"},
                                    **grants)
    assert (status, error["code"]) == (400, "invalid_argument")


async def test_participant_methods(dev: DevServer, http: HttpClient) -> None:
    await dev.add_participant("p", "alice", name="Alice")
    grants = {"room_admin": True, "room": "p"}
    status, listed = await call_json(http, ROOMS + "ListParticipants", {"room": "p"}, **grants)
    assert [p["identity"] for p in listed["participants"]] == ["alice"]
    status, alice = await call_json(http, ROOMS + "GetParticipant",
                                    {"room": "p", "identity": "alice"}, **grants)
    assert (status, alice["name"], alice["kind"]) == (200, "Alice", "STANDARD")
    assert (await call_json(http, ROOMS + "RemoveParticipant",
                            {"room": "p", "identity": "alice"}, **grants)) == (200, {})
    assert await call_json(http, ROOMS + "GetParticipant", {"room": "p", "identity": "alice"},
                           **grants) == (404, {"code": "not_found",
                                               "msg": "participant does not exist"})


async def test_participant_scoped_track_methods(dev: DevServer, http: HttpClient) -> None:
    """``MutePublishedTrack`` and ``UpdateSubscriptions`` go to the participant's node on
    livekit-server: with no such participant, no node answers (``unavailable``). A simulated
    participant publishes nothing: no track, no error. Unmuting needs
    ``enable_remote_unmute``. (Their effect on real participants: tests/test_media.py.)"""
    await dev.add_participant("p", "alice")
    grants = {"room_admin": True, "room": "p"}
    gone = (503, {"code": "unavailable", "msg": "no response from servers"})
    for identity in ("bob", "alice"):
        for room_name in ("p", "elsewhere"):
            if identity == "alice" and room_name == "p":
                continue
            assert await call_json(http, ROOMS + "MutePublishedTrack", {
                "room": room_name, "identity": identity, "track_sid": "TR_x", "muted": True},
                **{**grants, "room": room_name}) == gone
            assert await call_json(http, ROOMS + "UpdateSubscriptions", {
                "room": room_name, "identity": identity, "track_sids": ["TR_x"]},
                **{**grants, "room": room_name}) == gone
    muted = await call_proto(http, ROOMS + "MutePublishedTrack", room.MuteRoomTrackRequest(
        room="p", identity="alice", track_sid="TR_x", muted=True),
        room.MuteRoomTrackResponse, **grants)
    assert not muted.HasField("track")
    assert await call_json(http, ROOMS + "MutePublishedTrack", {
        "room": "p", "identity": "alice", "track_sid": "TR_x", "muted": False}, **grants) == (
        412, {"code": "failed_precondition", "msg": "remote unmute not enabled"})
    assert await call_json(http, ROOMS + "UpdateSubscriptions", {
        "room": "p", "identity": "alice", "track_sids": ["TR_x"], "subscribe": True},
        **grants) == (200, {})
    for method in ("MutePublishedTrack", "UpdateSubscriptions"):
        assert await call_json(http, ROOMS + method, {"room": "p", "identity": "alice"},
                               room_admin=True, room="elsewhere") == DENIED


async def test_delete_room(dev: DevServer, http: HttpClient) -> None:
    await dev.create_room("gone")
    assert await call_json(http, ROOMS + "DeleteRoom", {"room": "gone"}, room_create=True) == (
        200, {})
    assert await call_json(http, ROOMS + "DeleteRoom", {"room": "gone"}, room_create=True) == (
        404, {"code": "not_found", "msg": "requested room does not exist"})


DENIED = (401, {"code": "unauthenticated", "msg": "permissions denied"})


@pytest.mark.parametrize(("path", "body", "grants"), [
    (ROOMS + "CreateRoom", {"name": "x"}, {"room_list": True}),
    (ROOMS + "ListRooms", {}, {"room_create": True}),
    (ROOMS + "DeleteRoom", {"room": "x"}, {"room_admin": True, "room": "x"}),
    (ROOMS + "ListParticipants", {"room": "x"}, {"room_admin": True, "room": "elsewhere"}),
    (ROOMS + "ListParticipants", {"room": "x"}, {"room_join": True, "room": "x"}),
    (DISPATCH + "CreateDispatch", {"room": "x", "agent_name": "a"}, {"room_create": True}),
    (DISPATCH + "ListDispatch", {"room": "x"}, {"room_admin": True}),
    (ROOMS + "ListRooms", {}, {}),  # no token at all: the middleware lets it through
])
async def test_missing_grants_are_twirp_unauthenticated(
    dev: DevServer, http: HttpClient, path: str, body: dict[str, Any], grants: dict[str, Any]
) -> None:
    if grants:
        assert await call_json(http, path, body, **grants) == DENIED
    else:
        status, _, data = await http.request("POST", path, body=b"{}",
                                             headers=[("content-type", "application/json")])
        assert (status, json.loads(data)) == DENIED
    assert dev.rooms == {}


async def test_a_bad_token_is_the_middlewares_plain_401_even_on_a_bad_route(
    http: HttpClient
) -> None:
    token = create_token(KEY, "wrong", video=VideoGrants(room_list=True))
    for path in (ROOMS + "ListRooms", ROOMS + "Nope"):
        status, headers, body = await http.request(
            "POST", path, body=b"{}", headers=[("content-type", "application/json"),
                                               ("authorization", f"Bearer {token}")])
        assert (status, body) == (401, b"invalid authorization token: Signature verification failed")
        assert headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(("method", "path", "content_type"), [
    ("POST", ROOMS + "Nope", "application/json"),
    ("POST", "/twirp/livekit.Nope/ListRooms", "application/json"),
    ("POST", "/twirp/other.RoomService/ListRooms", "application/json"),
    ("GET", ROOMS + "ListRooms", "application/json"),
    ("POST", ROOMS + "ListRooms", "text/plain"),
])
async def test_bad_routes(http: HttpClient, method: str, path: str, content_type: str) -> None:
    status, _, body = await http.request(method, path, body=b"{}", headers=[
        ("content-type", content_type), auth(room_list=True)])
    assert (status, json.loads(body)["code"]) == (404, "bad_route")


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/json", b"{not json"),
    ("application/json", b'{"names": 5}'),
    ("application/json", b"\xff\xfe"),
    ("application/protobuf", b"\xff\xff\xff"),
])
async def test_undecodable_bodies_are_malformed(http: HttpClient, content_type: str,
                                                body: bytes) -> None:
    status, _, data = await http.request("POST", ROOMS + "ListRooms", body=body, headers=[
        ("content-type", content_type), auth(room_list=True)])
    assert (status, json.loads(data)["code"]) == (400, "malformed")


async def test_create_room_on_a_live_room_returns_it_unchanged(
    dev: DevServer, http: HttpClient
) -> None:
    first = await dev.create_room("live", metadata="one")
    status, again = await call_json(http, ROOMS + "CreateRoom",
                                    {"name": "live", "metadata": "two",
                                     "agents": [{"agent_name": "x"}]}, room_create=True)
    assert (again["sid"], again["metadata"]) == (first.sid, "one")
    assert [d.agent_name for d in dev.list_dispatches("live")] == [""]
