"""``trio_agents.api.LiveKitAPI`` against the dev server over real loopback TCP (httpx under
trio), and its URL and error handling."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from livekit.protocol import agent_dispatch, room, sip

from trio_agents import ConfigError
from trio_agents._auth import SIPGrants, VideoGrants, create_token
from trio_agents.api import LiveKitAPI, SIPError, TwirpError, http_base
from trio_agents.devserver import DevServer, open_dev_server

from devserver_helpers import KEY, SECRET


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0) as server:
        yield server


async def test_round_trip(dev: DevServer) -> None:
    async with LiveKitAPI(dev.url, KEY, SECRET) as api:
        made = await api.room.create_room(room.CreateRoomRequest(name="api-room", metadata="m"))
        assert made.name == "api-room" and made.metadata == "m" and made.sid.startswith("RM_")
        listed = await api.room.list_rooms(room.ListRoomsRequest())
        assert [r.name for r in listed.rooms] == ["api-room"]
        dispatch = await api.agent_dispatch.create_dispatch(
            agent_dispatch.CreateAgentDispatchRequest(room="api-room", agent_name="x",
                                                      metadata="d"))
        assert dispatch.id.startswith("AD_") and dispatch.agent_name == "x"
        dispatches = await api.agent_dispatch.list_dispatch(
            agent_dispatch.ListAgentDispatchRequest(room="api-room"))
        assert {d.agent_name for d in dispatches.agent_dispatches} == {"", "x"}
        deleted = await api.agent_dispatch.delete_dispatch(
            agent_dispatch.DeleteAgentDispatchRequest(dispatch_id=dispatch.id, room="api-room"))
        assert deleted.id == dispatch.id and dispatch.id not in dev.rooms["api-room"].dispatches
        await dev.add_participant("api-room", "alice")
        people = await api.room.list_participants(room.ListParticipantsRequest(room="api-room"))
        assert [p.identity for p in people.participants] == ["alice"]
        alice = await api.room.get_participant(
            room.RoomParticipantIdentity(room="api-room", identity="alice"))
        assert alice.identity == "alice"
        await api.room.remove_participant(
            room.RoomParticipantIdentity(room="api-room", identity="alice"))
        await api.room.delete_room(room.DeleteRoomRequest(room="api-room"))
        assert dev.rooms == {}
        with pytest.raises(TwirpError) as info:
            await api.room.delete_room(room.DeleteRoomRequest(room="api-room"))
        assert (info.value.code, info.value.msg, info.value.status) == (
            "not_found", "requested room does not exist", 404)


async def test_without_async_with_each_call_has_its_own_connection(dev: DevServer) -> None:
    api = LiveKitAPI(dev.url + "/", KEY, SECRET)
    assert (await api.room.create_room(room.CreateRoomRequest(name="solo"))).name == "solo"
    await api.aclose()  # nothing to close, and harmless


async def test_server_errors(dev: DevServer) -> None:
    async with LiveKitAPI(dev.url, KEY, "wrong") as bad:
        with pytest.raises(TwirpError) as info:
            await bad.room.list_rooms(room.ListRoomsRequest())
        assert (info.value.code, info.value.status) == ("unauthenticated", 401)
        assert info.value.msg == "invalid authorization token: Signature verification failed"
    async with LiveKitAPI(dev.url, KEY, SECRET) as api:
        with pytest.raises(TwirpError) as info:
            await api.agent_dispatch.create_dispatch(agent_dispatch.CreateAgentDispatchRequest(
                room="r", agent_name="a", deployment="no_underscores"))
        assert (info.value.code, info.value.status) == ("invalid_argument", 400)
        assert "invalid_argument" in str(info.value) and "HTTP 400" in str(info.value)


async def test_unreachable_server_is_unavailable() -> None:
    with trio.socket.socket() as sock:  # a port that was free a moment ago, now closed
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with LiveKitAPI(f"ws://127.0.0.1:{port}", KEY, SECRET) as api:
        with pytest.raises(TwirpError) as info:
            await api.room.list_rooms(room.ListRoomsRequest())
    assert (info.value.code, info.value.status) == ("unavailable", 0)
    assert f"127.0.0.1:{port}" in info.value.msg and "LIVEKIT_URL" in info.value.msg


def test_http_base() -> None:
    assert http_base("ws://h:7880") == "http://h:7880"
    assert http_base("wss://x.livekit.cloud/") == "https://x.livekit.cloud"
    assert http_base("WSS://x/prefix/") == "https://x/prefix"
    assert http_base("http://h") == "http://h"
    for bad in ("", "h:7880", "ftp://h", "ws://"):
        with pytest.raises(ConfigError, match="LIVEKIT_URL"):
            http_base(bad)


def test_missing_credentials_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LIVEKIT_API_KEY"):
        LiveKitAPI("ws://h", "", SECRET)
    with pytest.raises(ConfigError, match="LIVEKIT_URL"):
        LiveKitAPI("", KEY, SECRET)


def test_twirp_error_status_follows_the_code() -> None:
    assert TwirpError("resource_exhausted", "x").status == 429
    assert TwirpError("made_up", "x").status == 500
    assert TwirpError("unavailable", "x", 0).status == 0


# -- SIP: the answers livekit-server 1.8.3 (with Redis) gives, checked by hand against it ------

DIAL = sip.CreateSIPParticipantRequest(sip_trunk_id="ST_missing", sip_call_to="+15550100",
                                       room_name="call-room", participant_identity="caller")


async def test_sip_create_with_an_unknown_trunk_is_not_found(dev: DevServer) -> None:
    async with LiveKitAPI(dev.url, KEY, SECRET) as api:
        with pytest.raises(SIPError) as info:
            await api.sip.create_sip_participant(DIAL)
    assert (info.value.code, info.value.msg, info.value.status) == (
        "not_found", "requested sip trunk does not exist", 404)
    assert info.value.sip_status is None


async def test_sip_transfer_answers(dev: DevServer) -> None:
    def transfer(room_name: str, identity: str) -> sip.TransferSIPParticipantRequest:
        return sip.TransferSIPParticipantRequest(room_name=room_name,
                                                 participant_identity=identity,
                                                 transfer_to="tel:+15550101")

    await dev.create_room("call-room")
    await dev.add_participant("call-room", "alice")
    async with LiveKitAPI(dev.url, KEY, SECRET) as api:
        for request, answer in [
            (transfer("", "alice"), ("invalid_argument", "Missing room name")),
            (transfer("call-room", ""), ("invalid_argument", "Missing participant identity")),
            (transfer("call-room", "bob"), ("not_found", "participant does not exist")),
            (transfer("call-room", "alice"),
             ("invalid_argument", "no SIP session associated with participant")),
        ]:
            with pytest.raises(SIPError) as info:
                await api.sip.transfer_sip_participant(request)
            assert (info.value.code, info.value.msg) == answer


@pytest.mark.parametrize(("method", "body", "video", "sip_grants"), [
    ("CreateSIPParticipant", {"sip_trunk_id": "ST_x"}, VideoGrants(room_admin=True,
                                                                   room="call-room"), None),
    ("CreateSIPParticipant", {"sip_trunk_id": "ST_x"}, VideoGrants(), SIPGrants(admin=True)),
    ("TransferSIPParticipant", {"room_name": "call-room", "participant_identity": "a"},
     VideoGrants(room_admin=True, room="call-room"), None),
    ("TransferSIPParticipant", {"room_name": "call-room", "participant_identity": "a"},
     VideoGrants(), SIPGrants(call=True)),
    ("TransferSIPParticipant", {"room_name": "call-room", "participant_identity": "a"},
     VideoGrants(room_admin=True, room="other"), SIPGrants(call=True)),
])
async def test_sip_calls_need_the_call_grant(dev: DevServer, method: str, body: dict[str, str],
                                             video: VideoGrants,
                                             sip_grants: SIPGrants | None) -> None:
    token = create_token(KEY, SECRET, video=video, sip=sip_grants)
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{dev.url.replace('ws', 'http', 1)}/twirp/livekit.SIP/"
                                   f"{method}", json=body,
                                   headers={"Authorization": f"Bearer {token}"})
    assert (answer.status_code, answer.json()) == (
        401, {"code": "unauthenticated", "msg": "permissions denied"})


def test_sip_error_reads_the_sip_status() -> None:
    error = SIPError("unavailable", "twirp error: sip status: 486 (Busy Here)", 503)
    assert (error.sip_status, error.sip_message, error.status) == (486, "Busy Here", 503)


def test_access_token_builds_what_the_servers_verify() -> None:
    from trio_agents._auth import verify_token
    from trio_agents.api import AccessToken, VideoGrants

    jwt = (AccessToken("devkey", "secret").with_identity("alice").with_name("Alice")
           .with_kind("sip").with_metadata("m").with_attributes({"a": "1"})
           .with_grants(VideoGrants(room_join=True, room="support")).to_jwt())
    claims = verify_token(jwt, {"devkey": "secret"})
    assert (claims.identity, claims.name, claims.kind, claims.metadata, dict(claims.attributes)) \
        == ("alice", "Alice", "sip", "m", {"a": "1"})
    assert claims.video is not None and claims.video.room_join and claims.video.room == "support"
    with pytest.raises(ConfigError):
        AccessToken("", "secret")
