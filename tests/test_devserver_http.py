"""The dev server's HTTP front (h11 + wsproto over any trio stream): keep-alive, limits, the
middleware's plain-text 401s before routing, refusals that never take the server down."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from trio_agents._auth import VideoGrants, create_token, worker_token
from trio_agents.devserver import DevServer, open_dev_server

from devserver_helpers import KEY, SECRET, UPGRADE, http_client, registered


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False) as server:
        yield server


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


async def test_several_requests_on_one_connection(dev: DevServer) -> None:
    async with http_client(dev) as http:
        assert (await http.request("GET", "/"))[::2] == (200, b"OK")
        status, headers, body = await http.request("GET", "/nope")
        assert (status, body) == (404, b"404 page not found\n")
        assert headers["content-type"].startswith("text/plain")
        status, _, body = await http.request(
            "POST", "/twirp/livekit.RoomService/ListRooms", body=b"{}",
            headers=[("content-type", "application/json"),
                     bearer(create_token(KEY, SECRET, video=VideoGrants(room_list=True)))])
        assert (status, body) == (200, b'{"rooms": []}')


async def test_agent_without_upgrade_is_404_but_a_bad_token_is_401_first(dev: DevServer) -> None:
    async with http_client(dev) as http:
        assert (await http.request("GET", "/agent"))[0] == 404
        status, _, body = await http.request("GET", "/agent",
                                             headers=[bearer(worker_token(KEY, "bad"))])
        assert (status, body) == (
            401, b"invalid authorization token: Signature verification failed")


async def test_body_over_ten_mebibytes_is_413_without_reading_it(dev: DevServer) -> None:
    async with http_client(dev) as http:
        request = (b"POST /twirp/livekit.RoomService/ListRooms HTTP/1.1\r\nhost: x\r\n"
                   b"content-length: %d\r\n\r\n" % (10 * 1024 * 1024 + 1))
        await http.stream.send_all(request)
        status, headers, body = await http.response()
        assert (status, body) == (413, b"http: request body too large")
        assert headers["connection"] == "close" and await http.at_eof()


async def test_body_of_exactly_ten_mebibytes_is_read(dev: DevServer) -> None:
    async with http_client(dev) as http:
        status, _, body = await http.request(
            "POST", "/twirp/livekit.RoomService/ListRooms", body=b" " * (10 * 1024 * 1024),
            headers=[("content-type", "application/json")])
        assert status == 400 and b"malformed" in body  # read, then refused by Twirp


async def test_garbage_gets_a_400_and_the_server_keeps_serving(dev: DevServer) -> None:
    async with http_client(dev) as http:
        await http.stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = await http.response()
        assert status == 400 and body.startswith(b"bad request")
        assert await http.at_eof()
    async with http_client(dev) as http:
        assert (await http.request("GET", "/"))[0] == 200


async def test_bad_websocket_handshake_is_400(dev: DevServer) -> None:
    async with http_client(dev) as http:
        status, _, body = await http.request(
            "GET", "/agent", headers=[*UPGRADE[:2], bearer(worker_token(KEY, SECRET))])
        assert status == 400 and body.startswith(b"websocket:")
        assert await http.at_eof()


async def test_upgrade_elsewhere_is_404(dev: DevServer) -> None:
    async with http_client(dev) as http:
        status, _, _ = await http.request("GET", "/rtc/v2", headers=UPGRADE)
        assert status == 404


async def test_refused_upgrade_closes_the_connection(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with http_client(dev) as http:
        status, headers, body = await http.request("GET", "/agent", headers=UPGRADE)
        assert (status, body) == (401, b"no permissions to access the room")
        assert headers["connection"] == "close" and await http.at_eof()


async def test_connections_end_with_the_server(autojump_clock: trio.testing.MockClock) -> None:
    """Nothing outlives ``open_dev_server``: a live worker connection is cut when it exits."""
    async with trio.open_nursery() as nursery:
        client, remote = trio.testing.memory_stream_pair()
        async with open_dev_server(listen=False) as dev:
            nursery.start_soon(dev.handle_stream, remote)
            await client.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert b"200" in await client.receive_some(1000)
        assert await client.receive_some(1000) == b""  # closed by the server's exit


async def test_a_worker_over_tcp() -> None:
    """The same ``handle_stream`` behind ``trio.serve_tcp`` (here: real loopback sockets)."""
    import trio_websocket

    async with open_dev_server(port=0) as dev:
        assert dev.url == f"ws://127.0.0.1:{dev.port}" and dev.port > 0
        async with trio_websocket.open_websocket_url(
            f"{dev.url}/agent", extra_headers=[
                (b"Authorization", f"Bearer {worker_token(KEY, SECRET)}".encode())]) as ws:
            worker_id = await registered(ws)
            assert worker_id in dev.workers
