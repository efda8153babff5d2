"""The dev server's ``/agent`` websocket: what it accepts and refuses must match livekit-server.

A raw client speaks WorkerMessage/ServerMessage directly, over memory streams in virtual time
(so the 10 s registration window and the 10 s pings are asserted to the instant).
Dispatch is in test_devserver_dispatch.py, the HTTP front in test_devserver_http.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto.events as ws_events
from livekit.protocol import agent, models

from trio_agents._auth import VideoGrants, create_token, worker_token
from trio_agents.devserver import DevServer, open_dev_server

from devserver_helpers import (
    close_code,
    KEY,
    SECRET,
    ServerDropped,
    expect_silence,
    frame_client,
    raw_worker,
    receive,
    register,
    registered,
    rejected,
    send,
)


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False) as server:
        yield server


# -- authentication -------------------------------------------------------------------------


async def test_bad_tokens_get_the_servers_plain_text_401(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    assert await rejected(dev, token=worker_token(KEY, "wrong")) == (
        401, "invalid authorization token: Signature verification failed")
    assert await rejected(dev, token=worker_token("nokey", SECRET)) == (401, "invalid API key")
    room_token = create_token(KEY, SECRET, video=VideoGrants(room_join=True, room="r"),
                              identity="u")
    assert await rejected(dev, token=room_token) == (401, "no permissions to access the room")
    assert await rejected(dev, token=worker_token(KEY, SECRET, now=0)) == (
        401, "invalid authorization token: token is expired")
    assert await rejected(dev, token="") == (401, "no permissions to access the room")
    assert await rejected(dev, headers=[(b"Authorization", b"Token abc")]) == (
        401, "invalid authorization header. Must start with Bearer ")
    assert dev.workers == {}


async def test_expiry_has_the_servers_one_minute_leeway(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    import time

    just_expired = create_token(KEY, SECRET, video=VideoGrants(agent=True), ttl=10,
                                now=time.time() - 60)  # expired 50 s ago: within the leeway
    async with raw_worker(dev, token=just_expired) as ws:
        assert (await registered(ws)).startswith("AW_")


async def test_token_in_the_query_is_accepted(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev, token="", query=f"?access_token={worker_token(KEY, SECRET)}") as ws:
        assert (await registered(ws)).startswith("AW_")


# -- registration ---------------------------------------------------------------------------


async def test_registration_reply_and_initial_state(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await send(ws, **register("bot", deployment="prod-eu", namespace="ns"))
        reply = (await receive(ws)).register
        info = reply.server_info
        assert (info.edition, info.version, info.protocol, info.agent_protocol) == (
            models.ServerInfo.Standard, "1.13.5", 17, 1)
        worker = dev.workers[reply.worker_id]
        assert (worker.agent_name, worker.namespace, worker.deployment, worker.type) == (
            "bot", "ns", "prod-eu", agent.JT_ROOM)
        assert (worker.status, worker.load, worker.running_job_ids) == (
            agent.WS_AVAILABLE, 0.0, set())
        default = models.ParticipantPermission(can_subscribe=True, can_publish=True,
                                               can_publish_data=True, can_update_metadata=True)
        assert worker.permissions == default


async def test_every_connection_gets_a_new_worker_id(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as first, raw_worker(dev) as second:
        ids = {await registered(first), await registered(second)}
    assert len(ids) == 2 and all(i.startswith("AW_") and len(i) == 15 for i in ids)


async def test_unregistered_socket_is_dropped_after_ten_seconds(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        t0 = trio.current_time()
        await trio.sleep(9.5)
        await send(ws, ping=agent.WorkerPing(timestamp=42))  # pings are fine before register
        assert (await receive(ws)).pong.last_timestamp == 42
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert trio.current_time() - t0 == 10.0  # the window is not extended by the ping
        assert close_code(info.value) == 1006  # no close frame


async def test_registering_at_nine_seconds_is_in_time_and_lifts_the_deadline(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await trio.sleep(9.9)
        worker_id = await registered(ws)
        await trio.sleep(60)
        await expect_silence(ws)
        assert worker_id in dev.workers


@pytest.mark.parametrize("message", [
    {"update_worker": agent.UpdateWorkerStatus(load=0.1)},
    {"availability": agent.AvailabilityResponse(job_id="AJ_x", available=True)},
    {},  # no oneof set
    register(deployment="has_underscore"),
    register(deployment="has space"),
    register(deployment="x" * 65),
    {"register": agent.RegisterWorkerRequest(type=7)},  # type: ignore[arg-type]
])
async def test_illegal_first_messages_drop_the_socket_at_once(
    dev: DevServer, autojump_clock: trio.testing.MockClock, message: dict[str, object]
) -> None:
    async with raw_worker(dev) as ws:
        t0 = trio.current_time()
        await send(ws, **message)
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert trio.current_time() == t0 and close_code(info.value) == 1006
    assert dev.workers == {}


async def test_unparseable_frame_drops_the_socket(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await registered(ws)
        await ws.send_message(b"\xff\xff\xff")
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
    assert dev.workers == {}


async def test_second_register_drops_and_deregisters(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        worker_id = await registered(ws)
        await send(ws, **register())
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert close_code(info.value) == 1006
    assert worker_id not in dev.workers


async def test_status_updates_store_status_only_if_present_and_load_always(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        worker_id = await registered(ws)
        worker = dev.workers[worker_id]
        await send(ws, update_worker=agent.UpdateWorkerStatus(status=agent.WS_FULL, load=0.5))
        await dev.wait_until(lambda: worker.status == agent.WS_FULL)
        assert worker.load == 0.5
        await send(ws, update_worker=agent.UpdateWorkerStatus(job_count=3))  # no status, no load
        await dev.wait_until(lambda: worker.load == 0.0)
        assert worker.status == agent.WS_FULL


async def test_ping_gets_pong_with_unix_milliseconds(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    import time

    async with raw_worker(dev) as ws:
        await registered(ws)
        await send(ws, ping=agent.WorkerPing(timestamp=123))
        pong = (await receive(ws)).pong
        assert pong.last_timestamp == 123
        assert abs(pong.timestamp - time.time() * 1000) < 5000


async def test_migrate_job_is_recorded_and_otherwise_ignored(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        worker_id = await registered(ws, "m")
        await send(ws, migrate_job=agent.MigrateJobRequest(job_ids=["AJ_a", "AJ_b"]))
        await send(ws, migrate_job=agent.MigrateJobRequest(job_ids=["AJ_c"]))
        await dev.wait_until(lambda: len(dev.workers[worker_id].migrated_job_ids) == 3)
        assert dev.workers[worker_id].migrated_job_ids == ["AJ_a", "AJ_b", "AJ_c"]
        assert dev.workers[worker_id].running_job_ids == set() and dev.jobs == {}
        await expect_silence(ws)


# -- framing ------------------------------------------------------------------------------------


async def test_text_frames_get_protojson_replies_until_the_next_binary_frame(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await ws.send_message(json.dumps({"register": {"type": "JT_ROOM", "agentName": "j"}}))
        reply = json.loads(await ws.get_message())
        worker_id = reply["register"]["workerId"]  # protojson: lowerCamelCase
        assert reply["register"]["serverInfo"]["version"] == "1.13.5"
        assert dev.workers[worker_id].agent_name == "j"
        await ws.send_message(json.dumps({"ping": {"timestamp": "5"}}))
        pong = json.loads(await ws.get_message())["pong"]  # int64 as a JSON string
        assert pong["lastTimestamp"] == "5" and int(pong["timestamp"]) > 0
        await send(ws, ping=agent.WorkerPing(timestamp=6))  # binary again: binary replies
        assert (await receive(ws)).pong.last_timestamp == 6


async def test_unknown_json_field_drops_the_socket(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await ws.send_message(json.dumps({"register": {"type": "JT_ROOM", "bogus": 1}}))
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()


async def test_control_pings_every_ten_seconds_and_client_pings_answered(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with frame_client(dev) as client:
        t0 = trio.current_time()  # the upgrade
        await client.register()
        for n in (1, 2, 3):
            event = await client.next_event()
            assert isinstance(event, ws_events.Ping)
            assert trio.current_time() - t0 == 10.0 * n
        await client.send(ws_events.Ping(payload=b"hi"))
        event = await client.next_event()
        assert isinstance(event, ws_events.Pong) and event.payload == b"hi"


async def test_server_side_close_sends_no_close_frame(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with frame_client(dev) as client:
        worker_id = await client.register()
        dev.drop_worker(worker_id)
        assert worker_id not in dev.workers  # forgotten at once
        with pytest.raises(ServerDropped):
            await client.next_event()


async def test_client_close_frame_is_echoed_and_deregisters(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with frame_client(dev) as client:
        worker_id = await client.register()
        await client.send(ws_events.CloseConnection(code=1000))
        event = await client.next_event()
        assert isinstance(event, ws_events.CloseConnection) and event.code == 1000
        await dev.wait_until(lambda: worker_id not in dev.workers)


async def test_message_size_limit_is_two_mebibytes(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await registered(ws)
        at_limit = agent.WorkerMessage(update_job=agent.UpdateJobStatus(job_id="AJ_x"))
        at_limit.update_job.error = "e" * (2 * 1024 * 1024 - at_limit.ByteSize())
        while at_limit.ByteSize() > 2 * 1024 * 1024:  # the length prefixes grew
            at_limit.update_job.error = at_limit.update_job.error[:-1]
        assert at_limit.ByteSize() == 2 * 1024 * 1024
        await ws.send_message(at_limit.SerializeToString())  # an unknown job: ignored
        await expect_silence(ws)
        at_limit.update_job.error += "e"
        await ws.send_message(at_limit.SerializeToString())
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert close_code(info.value) == 1006
