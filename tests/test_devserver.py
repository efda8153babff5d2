"""The dev server on its own: what it accepts and refuses must match livekit-server.

A raw websocket client speaks WorkerMessage/ServerMessage directly (virtual time, in-memory
streams); the Twirp API and the API client run over real TCP.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio.testing
import trio_websocket
from google.protobuf import json_format
from livekit.protocol import agent, agent_dispatch, models, room

from trio_agents._auth import VideoGrants, create_token, verify_token, worker_token
from trio_agents.api import LiveKitAPI, TwirpError
from trio_agents.devserver import DevServer, open_dev_server
from trio_agents.devserver._dispatch import Candidate, job_token, select_worker, \
    validate_registration

KEY, SECRET = "devkey", "secret"


@asynccontextmanager
async def raw_worker(dev: DevServer, *, token: str | None = None,
                     query: str = "") -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A websocket to ``/agent`` over memory streams; the caller speaks the protocol."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev.handle_stream, server)
        headers = [] if token == "" else [
            (b"Authorization", f"Bearer {token or worker_token(KEY, SECRET)}".encode())]
        ws = await trio_websocket.wrap_client_stream(
            nursery, client, "devserver", "/agent" + query, extra_headers=headers)  # type: ignore[arg-type]
        yield ws
        nursery.cancel_scope.cancel()


async def send(ws: trio_websocket.WebSocketConnection, **message: object) -> None:
    await ws.send_message(agent.WorkerMessage(**message).SerializeToString())  # type: ignore[arg-type]


async def receive(ws: trio_websocket.WebSocketConnection) -> agent.ServerMessage:
    data = await ws.get_message()
    assert isinstance(data, bytes)
    return agent.ServerMessage.FromString(data)


def register(agent_name: str = "", **extra: object) -> dict[str, object]:
    return {"register": agent.RegisterWorkerRequest(type=agent.JT_ROOM, agent_name=agent_name,
                                                    version="test", **extra)}  # type: ignore[arg-type]


async def rejected(dev: DevServer, token: str, query: str = "") -> tuple[int, str]:
    """(status, body) of a refused upgrade (trio-websocket raises it from its reader task)."""
    with pytest.RaisesGroup(trio_websocket.ConnectionRejected, flatten_subgroups=True) as info:
        async with raw_worker(dev, token=token, query=query):
            pass
    (refusal,) = info.value.exceptions
    assert isinstance(refusal, trio_websocket.ConnectionRejected)
    return refusal.status_code, (refusal.body or b"").decode()


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False) as server:
        yield server


# -- authentication -------------------------------------------------------------------------


async def test_bad_tokens_get_the_servers_plain_text_401(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    assert await rejected(dev, worker_token(KEY, "wrong")) == (
        401, "invalid authorization token: Signature verification failed")
    assert await rejected(dev, worker_token("nokey", SECRET)) == (401, "invalid API key")
    room_token = create_token(KEY, SECRET, video=VideoGrants(room_join=True, room="r"),
                              identity="u")
    assert await rejected(dev, room_token) == (401, "no permissions to access the room")
    expired = worker_token(KEY, SECRET, now=0)
    status, body = await rejected(dev, expired)
    assert status == 401 and "expired" in body
    assert await rejected(dev, "") == (401, "no permissions to access the room")


async def test_token_in_query_is_accepted(dev: DevServer,
                                          autojump_clock: trio.testing.MockClock) -> None:
    async with raw_worker(dev, token="", query=f"?access_token={worker_token(KEY, SECRET)}") as ws:
        await send(ws, **register())
        assert (await receive(ws)).register.worker_id.startswith("AW_")


# -- registration ---------------------------------------------------------------------------


async def test_registration_reply_and_initial_state(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await send(ws, **register("bot"))
        reply = (await receive(ws)).register
        assert reply.server_info.version == "1.13.5" and reply.server_info.protocol == 17
        assert reply.server_info.agent_protocol == 1
        worker = dev.workers[reply.worker_id]
        assert (worker.agent_name, worker.status, worker.load) == ("bot", agent.WS_AVAILABLE, 0.0)
        assert worker.permissions.can_publish and worker.permissions.can_update_metadata


async def test_unregistered_socket_is_closed_after_ten_seconds(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        t0 = trio.current_time()
        await send(ws, ping=agent.WorkerPing(timestamp=42))  # pings are fine before register
        assert (await receive(ws)).pong.last_timestamp == 42
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert trio.current_time() - t0 == pytest.approx(10.0)
        assert info.value.reason is not None and info.value.reason.code == 1006  # no close frame


@pytest.mark.parametrize("message", [
    {"update_worker": agent.UpdateWorkerStatus(load=0.1)},
    register(deployment="has_underscore"),
    {"register": agent.RegisterWorkerRequest(type=7)},  # type: ignore[arg-type]
])
async def test_illegal_first_messages_close_the_socket(
    dev: DevServer, autojump_clock: trio.testing.MockClock, message: dict[str, object]
) -> None:
    async with raw_worker(dev) as ws:
        t0 = trio.current_time()
        await send(ws, **message)
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
        assert trio.current_time() == t0
    assert dev.workers == {}


async def test_second_register_closes_and_deregisters(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await send(ws, **register())
        worker_id = (await receive(ws)).register.worker_id
        await send(ws, **register())
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
    assert worker_id not in dev.workers


async def test_json_text_frames_get_json_replies(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await ws.send_message(json.dumps({"register": {"type": "JT_ROOM", "agentName": "j"}}))
        reply = await ws.get_message()
        assert isinstance(reply, str) and json.loads(reply)["register"]["workerId"].startswith("AW_")


# -- dispatch -------------------------------------------------------------------------------


async def test_offer_assignment_status_and_termination(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await send(ws, **register("bot"))
        worker_id = (await receive(ws)).register.worker_id
        await dev.create_dispatch("r", "bot", metadata="m", attributes={"a": "1"})
        offer = (await receive(ws)).availability.job
        assert (offer.room.name, offer.metadata, dict(offer.attributes)) == ("r", "m", {"a": "1"})
        assert offer.id.startswith("AJ_") and offer.state.status == agent.JS_RUNNING
        assert offer.state.worker_id == worker_id
        await send(ws, availability=agent.AvailabilityResponse(
            job_id=offer.id, available=True, participant_identity="me", participant_name="Me",
            participant_attributes={"lk.agent.name": "spoofed", "x": "y"}))
        assignment = (await receive(ws)).assignment
        claims = verify_token(assignment.token, {KEY: SECRET})
        assert (claims.identity, claims.name, claims.kind) == ("me", "Me", "agent")
        assert dict(claims.attributes) == {"lk.agent.name": "bot", "x": "y"}  # overwritten
        assert claims.video is not None and claims.video.room == "r" and claims.video.agent
        assert claims.expires_at - trio.current_time() > 0
        await send(ws, update_job=agent.UpdateJobStatus(job_id=offer.id, status=agent.JS_RUNNING))
        await send(ws, update_job=agent.UpdateJobStatus(job_id="AJ_unknown", status=agent.JS_FAILED))
        await dev.wait_until(lambda: dev.jobs[offer.id].history == [agent.JS_RUNNING] * 2)
        await dev.delete_room("r")
        assert (await receive(ws)).termination.job_id == offer.id
        assert dev.jobs[offer.id].status == agent.JS_FAILED
        assert dev.jobs[offer.id].error == "agent worker left the room"


async def test_terminate_answer_ends_the_job_without_other_workers(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await send(ws, **register())
        await receive(ws)
        await dev.create_room("r")
        offer = (await receive(ws)).availability.job
        await send(ws, availability=agent.AvailabilityResponse(job_id=offer.id, terminate=True))
        await dev.wait_until(lambda: dev.jobs[offer.id].done)
        assert dev.jobs[offer.id].status == agent.JS_SUCCESS and dev.jobs[offer.id].attempts == 1


async def test_late_answer_is_ignored_after_three_seconds(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await send(ws, **register())
        await receive(ws)
        t0 = trio.current_time()
        await dev.create_room("r")
        offer = (await receive(ws)).availability.job
        await dev.wait_until(lambda: dev.jobs[offer.id].done)
        assert trio.current_time() - t0 == pytest.approx(3.0)
        assert dev.jobs[offer.id].dropped == "context deadline exceeded"
        await send(ws, availability=agent.AvailabilityResponse(
            job_id=offer.id, available=True, participant_identity="late"))
        await send(ws, ping=agent.WorkerPing(timestamp=1))
        assert (await receive(ws)).WhichOneof("message") == "pong"  # no assignment came


async def test_no_worker_means_no_job(dev: DevServer,
                                      autojump_clock: trio.testing.MockClock) -> None:
    await dev.create_room("empty")
    assert dev.jobs == {}


async def test_migrate_is_recorded_and_simulate_job_offers_to_the_same_worker(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await send(ws, **register("sim"))
        worker_id = (await receive(ws)).register.worker_id
        await send(ws, migrate_job=agent.MigrateJobRequest(job_ids=["AJ_a", "AJ_b"]))
        await dev.wait_until(lambda: dev.workers[worker_id].migrated_job_ids == ["AJ_a", "AJ_b"])
        await send(ws, simulate_job=agent.SimulateJobRequest(
            room=models.Room(name="sim-room"),
            participant=models.ParticipantInfo(identity="alice")))
        offer = (await receive(ws)).availability.job
        assert (offer.type, offer.room.name, offer.participant.identity, offer.agent_name) == (
            agent.JT_PUBLISHER, "sim-room", "alice", "sim")


async def test_participant_and_publisher_jobs(dev: DevServer,
                                              autojump_clock: trio.testing.MockClock) -> None:
    async with raw_worker(dev) as ws:
        await send(ws, register={"type": agent.JT_PUBLISHER, "agent_name": ""})
        await receive(ws)
        await dev.add_participant("r", "alice")
        await dev.add_participant("r", "bot", kind=models.ParticipantInfo.AGENT)
        await dev.publish_track("r", "bot")  # dependent participants never trigger jobs
        await dev.publish_track("r", "alice")
        offer = (await receive(ws)).availability.job
        assert offer.type == agent.JT_PUBLISHER and offer.participant.identity == "alice"
        await dev.publish_track("r", "alice")  # only the first publication counts
        await send(ws, ping=agent.WorkerPing(timestamp=2))
        assert (await receive(ws)).WhichOneof("message") == "pong"


# -- pure dispatch rules ------------------------------------------------------------------------


def test_selection_rules() -> None:
    rng = random.Random(1)
    full = [Candidate("a", agent.WS_AVAILABLE, 0.7), Candidate("b", agent.WS_AVAILABLE, 0.9)]
    assert select_worker(full, set(), rng, first_attempt=True) == (
        None, "unavailable: no servers available")
    mixed = [Candidate("a", agent.WS_FULL, 0.0), Candidate("b", agent.WS_AVAILABLE, 0.2)]
    assert select_worker(mixed, set(), rng, first_attempt=True) == ("b", "")
    assert select_worker(mixed, {"b"}, rng, first_attempt=False) == (None, "no workers available")
    spent = [Candidate("a", agent.WS_AVAILABLE, 1.0)]
    assert select_worker(spent, set(), rng, first_attempt=False) == (
        None, "no workers with sufficient capacity")
    weighted = [Candidate("light", agent.WS_AVAILABLE, 0.0),
                Candidate("heavy", agent.WS_AVAILABLE, 0.9)]
    picks = [select_worker(weighted, set(), rng, first_attempt=True)[0] for _ in range(500)]
    assert 0.85 < picks.count("light") / 500 < 0.96  # weights 1.0 vs 0.1


def test_registration_validation() -> None:
    ok = agent.RegisterWorkerRequest(type=agent.JT_ROOM, deployment="prod-eu")
    assert validate_registration(ok) is None
    assert validate_registration(agent.RegisterWorkerRequest(deployment="a b")) is not None
    assert validate_registration(agent.RegisterWorkerRequest(deployment="x" * 65)) is not None


def test_job_token_copies_permissions() -> None:
    token = job_token(api_key=KEY, api_secret=SECRET, room="r", agent_name="n",
                      permissions=models.ParticipantPermission(can_publish=False, hidden=True,
                                                               can_update_metadata=True),
                      response=agent.AvailabilityResponse(participant_identity="i"))
    video = verify_token(token, {KEY: SECRET}).video
    assert video is not None
    assert (video.room_join, video.can_publish, video.hidden, video.can_update_own_metadata) == (
        True, False, True, True)


# -- Twirp over TCP -------------------------------------------------------------------------


@pytest.fixture
async def tcp_dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0) as server:
        yield server


def bearer(**grants: object) -> dict[str, str]:
    token = create_token(KEY, SECRET, video=VideoGrants(**grants))  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {token}"}


async def test_twirp_json_and_errors(tcp_dev: DevServer) -> None:
    base = f"http://127.0.0.1:{tcp_dev.port}/twirp/livekit.RoomService"
    async with httpx.AsyncClient() as http:
        created = await http.post(f"{base}/CreateRoom", json={"name": "json-room"},
                                  headers=bearer(room_create=True))
        body = created.json()
        assert created.status_code == 200 and body["name"] == "json-room"
        assert body["sid"].startswith("RM_") and "num_participants" in body  # snake_case, all
        denied = await http.post(f"{base}/CreateRoom", json={"name": "x"},
                                 headers=bearer(room_list=True))
        assert (denied.status_code, denied.json()) == (
            401, {"code": "unauthenticated", "msg": "permissions denied"})
        bad_token = await http.post(f"{base}/ListRooms", json={},
                                    headers={"Authorization": "Bearer not.a.jwt"})
        assert bad_token.status_code == 401 and bad_token.text.startswith("invalid")
        missing = await http.post(f"{base}/DeleteRoom", json={"room": "nope"},
                                  headers=bearer(room_create=True))
        assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
        route = await http.post(f"{base}/Nope", json={}, headers=bearer(room_create=True))
        assert (route.status_code, route.json()["code"]) == (404, "bad_route")
        other_room = await http.post(f"{base}/ListParticipants", json={"room": "json-room"},
                                     headers=bearer(room_admin=True, room="elsewhere"))
        assert other_room.status_code == 401
        listed = await http.post(f"{base}/ListRooms", content=room.ListRoomsRequest()
                                 .SerializeToString(),
                                 headers={**bearer(room_list=True),
                                          "Content-Type": "application/protobuf"})
        rooms = room.ListRoomsResponse.FromString(listed.content).rooms
        assert [r.name for r in rooms] == ["json-room"]
        assert json_format.MessageToDict(rooms[0])["name"] == "json-room"


async def test_api_client_round_trip(tcp_dev: DevServer) -> None:
    async with LiveKitAPI(tcp_dev.url, KEY, SECRET) as api:
        made = await api.room.create_room(room.CreateRoomRequest(name="api-room", metadata="m"))
        assert made.name == "api-room" and made.metadata == "m"
        dispatch = await api.agent_dispatch.create_dispatch(
            agent_dispatch.CreateAgentDispatchRequest(room="api-room", agent_name="x",
                                                      metadata="d"))
        assert dispatch.id.startswith("AD_") and dispatch.agent_name == "x"
        listed = await api.agent_dispatch.list_dispatch(
            agent_dispatch.ListAgentDispatchRequest(room="api-room"))
        assert {d.agent_name for d in listed.agent_dispatches} == {"", "x"}  # default + ours
        await api.agent_dispatch.delete_dispatch(
            agent_dispatch.DeleteAgentDispatchRequest(dispatch_id=dispatch.id, room="api-room"))
        await api.room.delete_room(room.DeleteRoomRequest(room="api-room"))
        with pytest.raises(TwirpError) as info:
            await api.room.delete_room(room.DeleteRoomRequest(room="api-room"))
        assert (info.value.code, info.value.status) == ("not_found", 404)
    async with LiveKitAPI(tcp_dev.url, KEY, "wrong") as bad:
        with pytest.raises(TwirpError, match="unauthenticated"):
            await bad.room.list_rooms(room.ListRoomsRequest())


async def test_agent_endpoint_without_upgrade_is_404(tcp_dev: DevServer) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{tcp_dev.port}/agent")
        assert response.status_code == 404
