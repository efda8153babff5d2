"""The dev server's /rtc side, spoken to by hand: join validation, JoinResponse, signal
requests, leave, removal rules, the Twirp methods that reach participants (PROTOCOL.md §6-7).

These participants never do WebRTC (a raw websocket speaking protobuf); tests/test_room.py
has the real SDK. The pure parts of ``_rtc`` are tested without sockets at the end.
"""

from __future__ import annotations

import base64
import gzip
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from livekit.protocol import agent, models, rtc
from livekit.protocol import room as room_proto

from trio_agents._auth import VideoGrants, create_token
from trio_agents.api import LiveKitAPI, TwirpError
from trio_agents.devserver import DevServer, open_dev_server
from trio_agents.devserver._http import Request
from trio_agents.devserver._rtc import JoinParams, decode_join_request, merge_update, parse_join, recipients

Reason = models.DisconnectReason


@pytest.fixture
async def dev(rtc_address: str) -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0, rtc_address=rtc_address, join_timeout=math.inf,
                               rtc_v1=True) as server:
        yield server


def token(dev: DevServer, room: str = "r", identity: str = "alice", **grants: Any) -> str:
    kind = grants.pop("kind", "")
    return create_token(dev.api_key, dev.api_secret, identity=identity, kind=kind,
                        video=VideoGrants(room_join=grants.pop("room_join", True), room=room,
                                          **grants))


def join_request(**fields: Any) -> str:
    request = rtc.JoinRequest(client_info=models.ClientInfo(protocol=17), **fields)
    wrapped = rtc.WrappedJoinRequest(compression=rtc.WrappedJoinRequest.GZIP,
                                     join_request=gzip.compress(request.SerializeToString()))
    return base64.urlsafe_b64encode(wrapped.SerializeToString()).decode()


class Participant:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, request: rtc.SignalRequest) -> None:
        await self.ws.send_message(request.SerializeToString())

    async def receive(self, kind: str | None = None, *, timeout: float = 5) -> rtc.SignalResponse:
        """The next message (of ``kind``, skipping others)."""
        with trio.fail_after(timeout):
            while True:
                message = rtc.SignalResponse.FromString(_binary(await self.ws.get_message()))
                if kind is None or message.WhichOneof("message") == kind:
                    return message

    async def update_of(self, identity: str, **expected: Any) -> models.ParticipantInfo:
        """The next ParticipantUpdate about ``identity`` whose fields match ``expected``."""
        while True:
            for info in (await self.receive("update")).update.participants:
                if info.identity == identity and all(
                        _plain(getattr(info, k)) == v for k, v in expected.items()):
                    return info


def _binary(data: bytes | str) -> bytes:
    assert isinstance(data, bytes), f"expected a binary frame, got {data!r}"
    return data


def _plain(value: Any) -> Any:
    return dict(value) if hasattr(value, "items") else value


@asynccontextmanager
async def connect(dev: DevServer, identity: str = "alice", room: str = "r", *,
                  path: str = "/rtc/v1", **grants: Any) -> AsyncIterator[Participant]:
    query = f"?join_request={join_request()}" if path == "/rtc/v1" else "?protocol=17"
    async with trio_websocket.open_websocket_url(
            dev.url + path + query, extra_headers=[
                (b"authorization", f"Bearer {token(dev, room, identity, **grants)}".encode())]
    ) as ws:
        try:
            yield Participant(ws)
        finally:
            stream = ws._stream
    await _close_stream(stream)


async def _close_stream(stream: trio.abc.Stream) -> None:
    """trio-websocket 0.12 leaves a client's TCP stream open when the server closed the
    websocket (the client waits for the TCP close, then forgets to close its end)."""
    await stream.aclose()


async def http_get(dev: DevServer, target: str, token_: str | None = None) -> httpx.Response:
    base = dev.url.replace("ws://", "http://")
    headers = {"authorization": f"Bearer {token_}"} if token_ else {}
    async with httpx.AsyncClient() as client:
        return await client.get(base + target, headers=headers)


# -- joining ---------------------------------------------------------------------------------


async def test_join_response_then_others_see_the_newcomer(dev: DevServer) -> None:
    await dev.add_participant("r", "simulated")
    async with connect(dev, "alice") as alice:
        join = (await alice.receive()).join  # the first message is always the join
        assert join.participant.identity == "alice"
        assert join.participant.state == models.ParticipantInfo.JOINING
        assert [p.identity for p in join.other_participants] == ["simulated"]
        assert join.room.name == "r" and join.server_info.protocol == 17
        assert (join.ping_interval, join.ping_timeout) == (5, 15)
        assert not join.subscriber_primary and not join.ice_servers
        assert (await alice.receive("refresh_token")).refresh_token
        async with connect(dev, "bob", path="/rtc") as bob:
            assert [p.identity for p in (await bob.receive()).join.other_participants] == [
                "simulated", "alice"]
            info = await alice.update_of("bob", state=models.ParticipantInfo.JOINED)
            assert info.kind == models.ParticipantInfo.STANDARD
        left = await alice.update_of("bob", state=models.ParticipantInfo.DISCONNECTED)
        assert left.disconnect_reason == Reason.SIGNAL_CLOSE  # closed before any WebRTC
    assert "bob" not in dev.rooms["r"].participants


@pytest.mark.parametrize(("target", "grants", "status", "body"), [
    ("/rtc/validate", None, 401, "no permissions to access the room"),
    ("/rtc/validate", {"room_join": False}, 401, "permissions denied"),
    ("/rtc/validate", {"identity": ""}, 400, "identity cannot be empty"),
    ("/rtc/validate", {"room": ""}, 400, "no room name"),
    ("/rtc/v1/validate", {}, 400, "join_request is required"),
    ("/rtc/v1/validate?join_request=%%%", {}, 400, "cannot decode join_request"),
    ("/rtc/validate", {}, 200, "success"),
    ("/rtc/v1/validate?join_request=" + join_request(), {}, 200, "success"),
    ("/rtc", {}, 404, "404 page not found"),  # not an upgrade
])
async def test_join_validation(dev: DevServer, target: str, grants: dict[str, Any] | None,
                               status: int, body: str) -> None:
    jwt = None
    if grants is not None:
        grants = dict(grants)
        jwt = token(dev, grants.pop("room", "r"), grants.pop("identity", "alice"), **grants)
    response = await http_get(dev, target, jwt)
    assert (response.status_code, response.text.strip()[:len(body)]) == (status, body)
    assert not dev.rooms  # validation joins nothing


async def test_a_participant_without_webrtc_is_removed_after_the_join_timeout(
        rtc_address: str) -> None:
    async with open_dev_server(port=0, rtc_address=rtc_address, join_timeout=0.5,
                               rtc_v1=True) as dev:
        # both are removed in time; the silent one first, as it joined first
        async with connect(dev, "silent") as silent, connect(dev, "watcher") as watcher:
            await silent.receive("join")
            leave = (await silent.receive("leave", timeout=10)).leave
            assert (leave.reason, leave.action) == (Reason.JOIN_FAILURE,
                                                    rtc.LeaveRequest.DISCONNECT)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await silent.receive()
            assert closed.value.reason is not None and closed.value.reason.code == 1000  # a close frame, as livekit-server
            info = await watcher.update_of("silent", state=models.ParticipantInfo.DISCONNECTED)
            assert info.disconnect_reason == Reason.JOIN_FAILURE


async def test_duplicate_identity_replaces_the_first_session(dev: DevServer) -> None:
    async with connect(dev, "alice") as first:
        old_sid = (await first.receive("join")).join.participant.sid
        async with connect(dev, "alice") as second:
            new_sid = (await second.receive("join")).join.participant.sid
            assert (await first.receive("leave")).leave.reason == Reason.DUPLICATE_IDENTITY
            assert old_sid != new_sid == dev.rooms["r"].participants["alice"].sid


async def test_leave_is_answered_and_the_socket_closed(dev: DevServer) -> None:
    async with connect(dev, "alice") as alice:
        await alice.receive("join")
        await alice.send(rtc.SignalRequest(leave=rtc.LeaveRequest(
            reason=Reason.USER_REJECTED)))
        leave = (await alice.receive("leave")).leave
        assert (leave.reason, leave.action) == (Reason.USER_REJECTED,
                                                rtc.LeaveRequest.DISCONNECT)
        with pytest.raises(trio_websocket.ConnectionClosed):
            await alice.receive()
    assert "alice" not in dev.rooms["r"].participants


async def test_a_resume_is_told_to_rejoin(dev: DevServer) -> None:
    query = "?protocol=17&reconnect=1&sid=PA_gone"
    async with trio_websocket.open_websocket_url(
            dev.url + "/rtc" + query,
            extra_headers=[(b"authorization", f"Bearer {token(dev)}".encode())]) as ws:
        leave = rtc.SignalResponse.FromString(_binary(await ws.get_message())).leave
        assert leave.action == rtc.LeaveRequest.RECONNECT
    await _close_stream(ws._stream)


# -- signal requests ---------------------------------------------------------------------------


async def test_pings_are_answered(dev: DevServer) -> None:
    async with connect(dev) as alice:
        await alice.send(rtc.SignalRequest(ping_req=rtc.Ping(timestamp=1234, rtt=3)))
        pong = (await alice.receive("pong_resp")).pong_resp
        assert pong.last_ping_timestamp == 1234 and pong.timestamp > 1234
        await alice.send(rtc.SignalRequest(ping=1))
        assert (await alice.receive("pong")).pong > 1


async def test_own_metadata_updates_follow_the_merge_rules(dev: DevServer) -> None:
    async with connect(dev, "bob") as bob, connect(dev, "alice",
                                                   can_update_own_metadata=True) as alice:
        await alice.receive("join")
        await alice.send(rtc.SignalRequest(update_metadata=rtc.UpdateParticipantMetadata(
            metadata="busy", name="Alice", attributes={"a": "1", "b": "2"}, request_id=7)))
        assert (await alice.update_of("alice", metadata="busy")).name == "Alice"  # to itself too
        response = (await alice.receive("request_response")).request_response
        assert (response.request_id, response.reason) == (7, rtc.RequestResponse.OK)
        seen = await bob.update_of("alice", metadata="busy")
        assert (seen.name, dict(seen.attributes)) == ("Alice", {"a": "1", "b": "2"})
        await alice.send(rtc.SignalRequest(update_metadata=rtc.UpdateParticipantMetadata(
            attributes={"a": ""}, request_id=8)))  # "" deletes; empty name/metadata: unchanged
        seen = await bob.update_of("alice", attributes={"b": "2"})
        assert (seen.name, seen.metadata) == ("Alice", "busy")

        await bob.send(rtc.SignalRequest(update_metadata=rtc.UpdateParticipantMetadata(
            metadata="x", request_id=9)))
        refused = (await bob.receive("request_response")).request_response
        assert refused.reason == rtc.RequestResponse.NOT_ALLOWED
        assert dev.rooms["r"].participants["bob"].metadata == ""


async def test_twirp_methods_reach_the_participants(dev: DevServer) -> None:
    async with connect(dev, "alice") as alice, LiveKitAPI(dev.url, dev.api_key,
                                                          dev.api_secret) as api:
        await alice.receive("join")
        room = await api.room.update_room_metadata(
            room_proto.UpdateRoomMetadataRequest(room="r", metadata="v2"))
        assert room.metadata == "v2"
        assert (await alice.receive("room_update")).room_update.room.metadata == "v2"
        info = await api.room.update_participant(room_proto.UpdateParticipantRequest(
            room="r", identity="alice", name="A", attributes={"k": "v"}))
        assert (info.name, dict(info.attributes)) == ("A", {"k": "v"})
        assert (await alice.update_of("alice", name="A")).attributes["k"] == "v"
        await api.room.send_data(room_proto.SendDataRequest(room="r", data=b"x"))  # no channel
        with pytest.raises(TwirpError, match="nonce"):
            await api.room.send_data(room_proto.SendDataRequest(room="r", data=b"x",
                                                                nonce=b"short"))
        await api.room.remove_participant(room_proto.RoomParticipantIdentity(
            room="r", identity="alice"))
        assert (await alice.receive("leave")).leave.reason == Reason.PARTICIPANT_REMOVED


async def test_deleting_the_room_tells_its_participants(dev: DevServer) -> None:
    async with connect(dev, "alice") as alice:
        await alice.receive("join")
        await dev.delete_room("r")
        assert (await alice.receive("leave")).leave.reason == Reason.ROOM_DELETED


async def test_an_agent_leaving_ends_its_job(dev: DevServer) -> None:
    """A job's agent participant is identified by the identity its worker accepted with."""
    from devserver_helpers import raw_worker

    async with raw_worker(dev) as worker:
        await worker.send_message(agent.WorkerMessage(register=agent.RegisterWorkerRequest(
            type=agent.JT_ROOM)).SerializeToString())
        await worker.get_message()
        await dev.create_room("r")
        offer = agent.ServerMessage.FromString(_binary(await worker.get_message())).availability
        await worker.send_message(agent.WorkerMessage(availability=agent.AvailabilityResponse(
            job_id=offer.job.id, available=True, participant_identity="bot"
        )).SerializeToString())
        await worker.get_message()  # the assignment
        async with connect(dev, "bot", kind="agent", agent=True) as bot:
            await bot.receive("join")
            assert dev.rooms["r"].room.num_participants == 0  # agents are not counted
        termination = agent.ServerMessage.FromString(_binary(await worker.get_message())).termination
        assert termination.job_id == offer.job.id
        assert dev.jobs[offer.job.id].error == "agent worker left the room"


# -- pure parts ----------------------------------------------------------------------------------


def test_join_request_decoding() -> None:
    offer = rtc.SessionDescription(type="offer", sdp="v=0")
    decoded = decode_join_request(join_request(metadata="m", publisher_offer=offer))
    assert isinstance(decoded, rtc.JoinRequest)
    assert (decoded.metadata, decoded.publisher_offer.sdp) == ("m", "v=0")
    plain = rtc.WrappedJoinRequest(join_request=rtc.JoinRequest(metadata="p").SerializeToString())
    unpadded = base64.urlsafe_b64encode(plain.SerializeToString()).decode().rstrip("=")
    assert decode_join_request(unpadded).metadata == "p"  # type: ignore[union-attr]
    assert isinstance(decode_join_request("!!"), str)


def test_parse_join_takes_metadata_and_attributes_from_the_join_request() -> None:
    from trio_agents._auth import verify_token

    claims = verify_token(create_token("k", "s", identity="i", kind="sip", attributes={"a": "1"},
                                       video=VideoGrants(room_join=True, room="r")), {"k": "s"})
    query = {"join_request": [join_request(metadata="m", participant_attributes={"b": "2"})]}
    params = parse_join(Request(method="GET", target="/rtc/v1", path="/rtc/v1", query=query,
                                headers={}), claims)
    assert isinstance(params, JoinParams)
    assert (params.identity, params.metadata, dict(params.attributes), params.kind,
            params.single_pc) == ("i", "m", {"a": "1", "b": "2"}, models.ParticipantInfo.SIP,
                                  True)


def test_merge_update_rules() -> None:
    info = models.ParticipantInfo(name="n", metadata="m", attributes={"a": "1", "b": "2"})
    assert merge_update(info, name="", metadata="", attributes={"a": "", "c": "3"}) == ""
    assert (info.name, info.metadata, dict(info.attributes)) == ("n", "m", {"b": "2", "c": "3"})
    assert merge_update(info, name="x" * 300, metadata="", attributes={}) == "name"
    assert info.name == "n"


def test_recipients_follow_destination_identities() -> None:
    everyone = ["a", "b", "c"]
    assert recipients(models.DataPacket(), "a", everyone) == ["b", "c"]
    assert recipients(models.DataPacket(destination_identities=["c", "a"]), "a",
                      everyone) == ["c"]
    legacy = models.DataPacket(user=models.UserPacket(destination_identities=["b"]))
    assert recipients(legacy, "a", everyone) == ["b"]


async def test_rtc_v1_is_not_found_by_default_as_on_livekit_server_1_8(
        rtc_address: str) -> None:
    """The SDKs then fall back to /rtc, the two peer connections media is forwarded on."""
    async with open_dev_server(port=0, rtc_address=rtc_address) as plain:
        bearer = token(plain, "r", "alice")
        assert (await http_get(plain, f"/rtc/v1/validate?join_request={join_request()}",
                               bearer)).status_code == 404
        assert (await http_get(plain, "/rtc/validate?protocol=16", bearer)).status_code == 200


def test_auto_subscribe_is_read_from_the_join() -> None:
    from trio_agents._auth import verify_token

    claims = verify_token(create_token("k", "s", identity="i",
                                       video=VideoGrants(room_join=True, room="r")), {"k": "s"})

    def parsed(path: str, **query: str) -> bool:
        params = parse_join(Request(method="GET", target=path, path=path, query={
            k: [v] for k, v in query.items()}, headers={}), claims)
        assert isinstance(params, JoinParams)
        return params.auto_subscribe

    assert parsed("/rtc", protocol="16") and parsed("/rtc", auto_subscribe="1")
    assert not parsed("/rtc", auto_subscribe="0")
    assert parsed("/rtc/v1", join_request=join_request())
    off = join_request(connection_settings=rtc.ConnectionSettings(auto_subscribe=False))
    assert not parsed("/rtc/v1", join_request=off)
