"""The dev server is as sturdy and as strict as livekit-server (issue 13, item 6).

Each of the nine inputs below used to kill the dev server; livekit-server 1.8.3 survives all
of them (answers checked against it: 404, 401, 401, 401, 101, 200, 200, 200 and a normal
dispatch; it predates the ``attributes`` and ``join_request`` parameters, which the dev
server reads as livekit-server does today and refuses with 400 on ``/validate``). Claims of
the wrong JSON type were read through ``bool()``/``float()``; livekit-server refuses them
with 401 (go-jose decodes the claims into typed Go structs).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from livekit.protocol import agent, agent_dispatch, rtc

from trio_agents._auth import TokenError, VideoGrants, create_token, verify_token
from trio_agents.devserver import DevServer, open_dev_server

from devserver_helpers import (
    KEY,
    SECRET,
    UPGRADE,
    http_client,
    raw_worker,
    receive,
    registered,
    send,
)
from fuzz_inputs import MAX_HEAD, exchange, http_request, raw_token


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False) as server:
        yield server


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": KEY, "sub": "someone", "nbf": now - 5, "exp": now + 600, **extra}


def token_of(payload: dict[str, Any] | str, alg: str = "HS256") -> str:
    """Signed exactly as given (no library checks on the claims' types)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return raw_token(json.dumps({"alg": alg, "typ": "JWT"}), text, SECRET, alg)


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


async def list_rooms(dev: DevServer, token: str) -> tuple[int, bytes]:
    async with http_client(dev) as http:
        status, _, body = await http.request(
            "POST", "/twirp/livekit.RoomService/ListRooms", body=b"{}",
            headers=[("content-type", "application/json"), bearer(token)])
        return status, body


async def still_serving(dev: DevServer) -> None:
    async with http_client(dev) as http:
        assert (await http.request("GET", "/"))[::2] == (200, b"OK")


# -- the nine inputs that killed it -------------------------------------------------------------


async def test_an_unclosed_ipv6_looking_target_is_just_a_path(dev: DevServer) -> None:
    async with http_client(dev) as http:
        await http.stream.send_all(b"GET //[ HTTP/1.1\r\nhost: x\r\n\r\n")
        status, _, body = await http.response()
        assert (status, body) == (404, b"404 page not found\n")  # livekit-server: the same
    async with http_client(dev) as http:
        await http.stream.send_all(b"GET http://[ HTTP/1.1\r\nhost: x\r\n\r\n")
        status, _, body = await http.response()
        assert status == 400 and b"IPv6" in body
    await still_serving(dev)


async def test_targets_are_routed_as_go_routes_them(dev: DevServer) -> None:
    async with http_client(dev) as http:
        assert (await http.request("GET", "//"))[::2] == (200, b"OK")  # RemoveDoubleSlashes
        assert (await http.request("GET", "/%61gent"))[0] == 404  # /agent, not an upgrade
        assert (await http.request("GET", "/rtc/%76alidate"))[0] == 401  # /rtc/validate
        assert (await http.request("GET", "/rtc%2Fvalidate"))[0] == 404  # one segment
        assert (await http.request("GET", "/%zz"))[0] == 400


@pytest.mark.parametrize("body", [b"", b"[]", b'"rooms"', b"null"])
async def test_a_twirp_json_body_must_be_an_object(dev: DevServer, body: bytes) -> None:
    """livekit-server (protojson) answers these 400 malformed; found by the differential
    run, where the dev server answered ListRooms 200."""
    token = create_token(KEY, SECRET, video=VideoGrants(room_list=True))
    async with http_client(dev) as http:
        status, _, answer = await http.request(
            "POST", "/twirp/livekit.RoomService/ListRooms", body=body,
            headers=[("content-type", "application/json"), bearer(token)])
        assert status == 400 and json.loads(answer)["code"] == "malformed"


@pytest.mark.parametrize("attributes", [["a", "b"], "a=b"], ids=["list", "string"])
async def test_attributes_that_are_not_an_object_are_401(dev: DevServer,
                                                         attributes: object) -> None:
    status, body = await list_rooms(dev, token_of(claims(video={"roomList": True},
                                                         attributes=attributes)))
    assert status == 401 and b"attributes" in body
    await still_serving(dev)


async def test_an_exp_of_401_digits_is_401(dev: DevServer) -> None:
    payload = json.dumps(claims(video={"roomList": True}, exp=0)).replace(
        '"exp": 0', '"exp": ' + "9" * 401)
    status, body = await list_rooms(dev, token_of(payload))
    assert status == 401 and b"out of range" in body
    await still_serving(dev)


def join_token(dev: DevServer) -> str:
    return create_token(dev.api_key, dev.api_secret, identity="alice",
                        video=VideoGrants(room_join=True, room="r"))


async def test_a_protocol_of_non_ascii_digits_reads_as_zero(dev: DevServer) -> None:
    async with http_client(dev) as http:
        status, _, body = await http.request(
            "GET", f"/rtc/validate?access_token={join_token(dev)}&protocol=%C2%B2")
        assert (status, body) == (200, b"success")
    from trio_agents.devserver._rtc import go_atoi32

    assert go_atoi32("²") == 0 and go_atoi32("+17") == 17 and go_atoi32("-3") == -3
    assert go_atoi32(str(2**32 + 17)) == 17  # Atoi, then int32() wraps
    assert go_atoi32(str(2**63)) == 0  # beyond int64: Atoi fails
    await still_serving(dev)


async def test_deeply_nested_attributes_are_400_on_validate(dev: DevServer) -> None:
    nested = ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    encoded = base64.urlsafe_b64encode(nested).decode()
    async with http_client(dev) as http:
        status, _, body = await http.request(
            "GET", f"/rtc/validate?access_token={join_token(dev)}&attributes={encoded}")
        assert (status, body) == (400, b"cannot decode attributes")
    await still_serving(dev)


@pytest.mark.parametrize("attributes,status", [
    ({"a": 1}, 400), ({"a": {"b": "c"}}, 400), ([], 400), (None, 200), ({"a": None}, 200),
    ({"a": "b"}, 200)])
async def test_attributes_must_be_an_object_of_strings(dev: DevServer, attributes: object,
                                                       status: int) -> None:
    encoded = base64.urlsafe_b64encode(json.dumps(attributes).encode()).decode()
    async with http_client(dev) as http:
        answer, _, _ = await http.request(
            "GET", f"/rtc/validate?access_token={join_token(dev)}&attributes={encoded}")
        assert answer == status


async def test_a_corrupt_gzip_join_request_is_400(dev: DevServer) -> None:
    good = gzip.compress(rtc.JoinRequest(metadata="m").SerializeToString())
    invalid_block_type = good[:10] + b"\x07" + good[11:]  # zlib.error, not an OSError
    for corrupt in (invalid_block_type, b"\x1f\x8b\x08\x00garbage", good[:-3] + b"zzz",
                    good[:12] + b"\xff" * 8 + good[20:]):
        wrapped = rtc.WrappedJoinRequest(compression=rtc.WrappedJoinRequest.GZIP,
                                         join_request=corrupt)
        encoded = base64.urlsafe_b64encode(wrapped.SerializeToString()).decode()
        async with http_client(dev) as http:
            status, _, body = await http.request(
                "GET", f"/rtc/validate?access_token={join_token(dev)}&join_request={encoded}")
            assert status == 400 and body.startswith(b"cannot decode join_request"), corrupt
    await still_serving(dev)


@pytest.mark.parametrize("load", [float("-inf"), float("nan"), float("inf")])
async def test_a_non_finite_load_does_not_stop_dispatch(
    dev: DevServer, autojump_clock: trio.testing.MockClock, load: float
) -> None:
    """Go's float semantics: -inf makes the weighted scan fall back to the first worker of
    the key (it is offered the job); NaN poisons the node's claim and +inf leaves no
    capacity (the job is dropped, as with any full worker)."""
    async with raw_worker(dev) as ws:
        worker_id = await registered(ws)
        await send(ws, update_worker=agent.UpdateWorkerStatus(load=load))
        await send(ws, ping=agent.WorkerPing(timestamp=1))
        assert (await receive(ws)).WhichOneof("message") == "pong"
        await dev.create_room("r")
        (record,) = dev.jobs.values()
        if load == float("-inf"):
            message = await receive(ws)
            assert message.availability.job.state.worker_id == worker_id
            await send(ws, availability=agent.AvailabilityResponse(
                job_id=record.job.id, available=True, participant_identity="a"))
            await dev.wait_until(lambda: record.done)
            assert record.status == agent.JS_RUNNING
        else:
            await dev.wait_until(lambda: record.done)
            assert record.dropped and record.attempts == 0
    await still_serving(dev)


# -- claims of the wrong type -------------------------------------------------------------------


@pytest.mark.parametrize("video", [{"roomList": "false"}, {"roomList": "true"},
                                   {"roomList": 1}, {"roomList": [True]}],
                         ids=["string-false", "string-true", "one", "list"])
async def test_a_grant_that_is_not_a_json_bool_is_401(dev: DevServer,
                                                     video: dict[str, Any]) -> None:
    status, body = await list_rooms(dev, token_of(claims(video=video)))
    assert status == 401 and b"video.roomList has the wrong type" in body


async def test_room_admin_false_as_a_string_is_refused(dev: DevServer) -> None:
    token = token_of(claims(video={"roomAdmin": "false", "room": "r"}))
    async with http_client(dev) as http:
        status, _, body = await http.request(
            "POST", "/twirp/livekit.RoomService/ListParticipants", body=b'{"room": "r"}',
            headers=[("content-type", "application/json"), bearer(token)])
        assert status == 401 and b"roomAdmin" in body


@pytest.mark.parametrize("agent_claim", ["false", 1], ids=["string-false", "one"])
async def test_an_agent_grant_that_is_not_a_bool_cannot_register(
    dev: DevServer, agent_claim: object
) -> None:
    async with http_client(dev) as http:
        status, _, body = await http.request(
            "GET", "/agent",
            headers=[*UPGRADE, bearer(token_of(claims(video={"agent": agent_claim})))])
        assert status == 401 and b"video.agent" in body
    assert not dev.workers


async def test_room_join_false_as_a_string_cannot_join(dev: DevServer) -> None:
    token = token_of(claims(video={"roomJoin": "false", "room": "r"}))
    async with http_client(dev) as http:
        status, _, body = await http.request("GET", f"/rtc/validate?access_token={token}")
        assert status == 401 and b"roomJoin" in body
    assert not dev.rooms


@pytest.mark.parametrize("name,value", [
    ("exp", "4102444800"), ("exp", "nan"), ("exp", "inf"), ("exp", True), ("nbf", "0"),
    ("iat", "0"), ("exp", [4102444800])])
async def test_times_must_be_json_numbers(dev: DevServer, name: str, value: object) -> None:
    status, body = await list_rooms(dev, token_of(claims(video={"roomList": True},
                                                         **{name: value})))
    assert status == 401 and name.encode() in body


@pytest.mark.parametrize("payload", [
    claims(video={"roomList": True}, sub=5), claims(video={"roomList": True}, name=["x"]),
    claims(video={"roomList": True}, metadata={}), claims(video={"roomList": True}, kind=1),
    claims(video={"roomList": True}, attributes={"a": 1}),
    claims(video={"roomList": True, "room": 7}),
    claims(video={"roomList": True, "canPublishSources": "camera"}),
    claims(video={"roomList": True}, sip={"admin": "yes"}),
    claims(video={"roomList": True}, aud=None),
    claims(video={"roomList": True}, roomConfig={"emptyTimeout": "soon"}),
    claims(video="all"),
], ids=["sub", "name", "metadata", "kind", "attribute", "room", "sources", "sip", "aud",
        "roomConfig", "video"])
async def test_every_claim_is_checked_by_type(dev: DevServer, payload: dict[str, Any]) -> None:
    assert (await list_rooms(dev, token_of(payload)))[0] == 401


def test_duplicate_members_and_json_extensions_are_refused() -> None:
    text = json.dumps(claims(video={"roomList": True}))
    for payload in (text[:-1] + ', "sub": "again"}', text[:-1] + ', "x": NaN}'):
        with pytest.raises(TokenError):
            verify_token(token_of(payload), {KEY: SECRET})


async def test_well_typed_odd_claims_are_accepted(dev: DevServer) -> None:
    payload = claims(video={"roomList": True, "canPublish": None, "canPublishSources": []},
                     attributes={"a": None}, aud=["x"], unknown={"any": [1, None]},
                     exp=time.time() + 600.5, name=None)
    assert (await list_rooms(dev, token_of(payload)))[0] == 200


def test_go_time_semantics() -> None:
    now = float(int(time.time()))
    def verify(**extra: Any) -> None:
        verify_token(token_of(claims(**extra)), {KEY: SECRET}, now=now)
    verify(exp=now - 59, nbf=now + 59, iat=now + 59)  # 60 s leeway each way
    for bad in ({"exp": now - 61}, {"nbf": now + 61}, {"iat": now + 61}, {"exp": 2**63},
                {"exp": 1e300}):
        with pytest.raises(TokenError):  # a date beyond int64 is the distant past in Go
            verify(**bad)
    verify(nbf=1e300)  # ... which makes such an nbf no obstacle, as in livekit-server


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_tokens_of_every_size_are_accepted(dev: DevServer, alg: str) -> None:
    assert (await list_rooms(dev, token_of(claims(video={"roomList": True}), alg)))[0] == 200


@pytest.mark.parametrize("alg", ["none", "RS256"])
async def test_other_algorithms_are_refused(dev: DevServer, alg: str) -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": alg}).encode()).rstrip(b"=").decode()
    signed = token_of(claims(video={"roomList": True}))
    status, _ = await list_rooms(dev, header + signed[signed.index("."):])
    assert status == 401


def test_pyjwt_tokens_of_the_worker_side_still_verify() -> None:
    token = create_token(KEY, SECRET, video=VideoGrants(agent=True, room="r"),
                         identity="w", attributes={"k": "v"})
    verified = verify_token(token, {KEY: SECRET})
    assert verified.video is not None and verified.video.agent and verified.video.room == "r"
    assert (verified.identity, dict(verified.attributes)) == ("w", {"k": "v"})
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


# -- the HTTP front -----------------------------------------------------------------------------


async def test_a_head_over_the_limit_is_431_over_tcp() -> None:
    """Answered, not reset: the server reads what the client still sends before closing."""
    async with open_dev_server(port=0) as dev:
        url = f"http://127.0.0.1:{dev.port}"
        big = http_request("GET", "/", [("X-Big", "a" * (MAX_HEAD + 10_000))])
        status, _, body = await exchange(url, big)
        assert (status, body) == (431, b"431 Request Header Fields Too Large")
        small = http_request("GET", "/", [("X-Big", "a" * 200_000)])
        assert (await exchange(url, small))[0] == 200  # under Go's 1 MiB: served


async def test_an_error_of_ours_is_contained_to_its_connection(
    dev: DevServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a handler: that client gets a 500 and is logged; the server goes on."""
    def broken(self: DevServer, request: object) -> None:
        raise RuntimeError("a bug")
    monkeypatch.setattr(DevServer, "authenticate", broken)
    async with http_client(dev) as http:
        status, headers, _ = await http.request("GET", "/")
        assert status == 500 and headers["connection"] == "close" and await http.at_eof()
    assert "a bug" in caplog.text
    monkeypatch.undo()
    await still_serving(dev)


async def test_an_error_in_a_dispatch_drops_only_that_job(
    dev: DevServer, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    import trio_agents.devserver._dispatcher as server_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("selection bug")
    async with raw_worker(dev) as ws:
        await registered(ws)
        monkeypatch.setattr(server_module, "select_worker", broken)
        await dev.create_room("r1")
        (record,) = dev.jobs.values()
        await dev.wait_until(lambda: record.done)
        assert "selection bug" in record.dropped and "selection bug" in caplog.text
        monkeypatch.undo()
        await dev.create_room("r2")
        message = await receive(ws)
        assert message.availability.job.room.name == "r2"
    await still_serving(dev)


# -- list_dispatch after a job failed -----------------------------------------------------------


async def test_list_dispatch_shows_the_job_as_assigned_even_after_it_failed(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    """livekit-server keeps, in a dispatch's state, each job as its JobRequest returned it
    (``Room.handleNewJobs``) and never updates it: checked on livekit-server 1.8.3, a job
    that ended JS_FAILED ("boom") was still listed JS_RUNNING with no error 10 s later. The
    dev server answers the same, and its ``jobs`` records carry the real status."""
    async with raw_worker(dev) as ws:
        await registered(ws, "probe")
        await dev.create_dispatch("r", "probe")
        job = (await receive(ws)).availability.job
        await send(ws, availability=agent.AvailabilityResponse(
            job_id=job.id, available=True, participant_identity="agent-probe"))
        assert (await receive(ws)).WhichOneof("message") == "assignment"
        await send(ws, update_job=agent.UpdateJobStatus(job_id=job.id, status=agent.JS_FAILED,
                                                        error="boom"))
        await dev.wait_until(lambda: dev.jobs[job.id].ended)
        assert (dev.jobs[job.id].status, dev.jobs[job.id].error) == (agent.JS_FAILED, "boom")
        token = create_token(KEY, SECRET, video=VideoGrants(room_admin=True, room="r"))
        async with http_client(dev) as http:
            status, _, body = await http.request(
                "POST", "/twirp/livekit.AgentDispatchService/ListDispatch",
                body=agent_dispatch.ListAgentDispatchRequest(room="r").SerializeToString(),
                headers=[("content-type", "application/protobuf"), bearer(token)])
        assert status == 200
        listed = agent_dispatch.ListAgentDispatchResponse.FromString(body)
        (dispatch,) = [d for d in listed.agent_dispatches if d.agent_name == "probe"]
        (state,) = [j.state for j in dispatch.state.jobs]
        assert (state.status, state.error) == (agent.JS_RUNNING, "")
        assert state.participant_identity == "agent-probe"


# -- connection chatter -------------------------------------------------------------------------


async def test_connection_chatter_is_debug(
    dev: DevServer, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_agents.devserver")
    async with raw_worker(dev) as ws:
        await registered(ws)
        await send(ws, availability=agent.AvailabilityResponse(job_id="AJ_unknown"))
        await send(ws, register=agent.RegisterWorkerRequest())  # closes the connection
        await dev.wait_until(lambda: not dev.workers)
    chatter = [r for r in caplog.records if any(
        word in r.getMessage() for word in ("registered", "deregistered", "closing worker",
                                            "unknown job"))]
    assert len(chatter) >= 4
    assert {r.levelno for r in chatter} == {logging.DEBUG}
