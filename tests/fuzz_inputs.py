"""Malformed and hostile requests for a LiveKit server, and one way to send them to any server.

The same cases go to the dev server (``tests/test_devserver_fuzz.py``) and to the real
livekit-server (the conformance suite), so that both can be compared on the same input.

API
---
* ``cases(api_key, api_secret)`` — a Hypothesis strategy of ``Case``; or one family of them:
  ``raw_requests()``, ``token_cases(...)``, ``join_cases(...)``, ``twirp_cases(...)``,
  ``worker_cases(...)``.
* ``Case`` — ``family`` and ``label`` (what it is), ``request`` (the exact bytes of the
  HTTP request), ``messages`` (worker cases: ``WorkerMessage`` frames sent after
  registering), ``expect`` (the statuses livekit-server's rules allow; ``CLOSED`` = no
  answer, the connection closed; ``UPGRADED`` = 101).
* ``await send_case(base_url, case, api_key=..., api_secret=...)`` → ``(status, body_kind)``:
  ``status`` is the HTTP status (``CLOSED`` = 0 if the server closed without answering,
  ``UPGRADED`` = 101 for an accepted websocket); ``body_kind`` is one of ``"text"``,
  ``"json"``, ``"protobuf"``, ``"empty"``, ``"none"`` (no answer), ``"websocket"``; a worker
  case's is ``"registered"`` or ``"refused"``, and its status that of the room creation
  which follows its messages (it makes the server pick a worker).
* ``await alive(base_url)`` — the server still answers ``GET /`` with 200.
* ``looser(ours, theirs)`` — ``ours`` accepted a request that ``theirs`` refused.

Everything is plain trio over TCP (``base_url`` is ``http://host:port``).

The expectations follow livekit-server's current rules (livekit/livekit, livekit/protocol).
livekit-server 1.8.3 predates ``/rtc/v1``, ``join_request`` and the ``attributes`` parameter
of ``/rtc`` and ignores them (it answers 200 where the rules below say 400), and it accepts a
token without ``exp`` (refused by current livekit/protocol and by the dev server).
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Iterable
from typing import Any, Final, NoReturn
from urllib.parse import quote, urlsplit

import attrs
import jwt
import trio
import wsproto
import wsproto.events as ws_events
import wsproto.utilities
from hypothesis import strategies as st
from livekit.protocol import agent, agent_dispatch, models, room, rtc

CLOSED: Final = 0
UPGRADED: Final = 101
#: Go's ``http.DefaultMaxHeaderBytes`` + 4096: a longer request head is answered 431.
MAX_HEAD: Final = (1 << 20) + 4096
#: Any answer a server may give to a request that is not refused for its credentials.
ANY_REFUSAL: Final = frozenset({301, 400, 404, 405, 413, 431, 505, CLOSED})

# The claims livekit-server decodes, and the JSON type it decodes each as.
VIDEO_TYPES: Final = {
    "roomCreate": bool, "roomList": bool, "roomRecord": bool, "roomAdmin": bool,
    "roomJoin": bool, "room": str, "canPublish": bool, "canSubscribe": bool,
    "canPublishData": bool, "canPublishSources": list, "canUpdateOwnMetadata": bool,
    "ingressAdmin": bool, "hidden": bool, "recorder": bool, "agent": bool,
    "canSubscribeMetrics": bool,
}
CLAIM_TYPES: Final = {
    "iss": str, "sub": str, "jti": str, "exp": float, "nbf": float, "iat": float,
    "name": str, "kind": str, "video": dict, "sip": dict, "roomPreset": str, "sha256": str,
    "metadata": str, "attributes": dict,
}


@attrs.frozen
class Case:
    family: str
    label: str
    request: bytes
    expect: frozenset[int]
    messages: tuple[bytes, ...] = ()

    def __repr__(self) -> str:  # Hypothesis prints it on failure: keep it readable
        head = self.request[:300]
        return (f"Case({self.family}: {self.label}, expect={sorted(self.expect)}, "
                f"request={head!r}{'...' if len(self.request) > 300 else ''}, "
                f"messages={len(self.messages)})")


# -- building requests ------------------------------------------------------------------------


def http_request(method: str, target: str, headers: Iterable[tuple[str, str]] = (),
                 body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: livekit"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def sign(claims: dict[str, Any], api_secret: str, alg: str = "HS256") -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, api_secret, algorithm=alg)


def raw_token(header: str, payload: str, api_secret: str, alg: str = "HS256") -> str:
    """A token from exact JSON text (duplicate members, odd numbers), signed."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signature = hmac.new(api_secret.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def base_claims(api_key: str, **video: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": api_key, "sub": "fuzz", "nbf": now - 5, "iat": now - 5, "exp": now + 600,
            "video": video}


def twirp(method: str, token: str | None, body: bytes = b"{}",
          content_type: str = "application/json") -> bytes:
    headers = [("Content-Type", content_type)]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    return http_request("POST", f"/twirp/livekit.{method}", headers, body)


LIST_ROOMS: Final = "RoomService/ListRooms"


# -- JSON values of every type ---------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _json_kind(value: Any) -> type:
    if isinstance(value, bool):
        return bool
    if isinstance(value, (int, float)):
        return float
    return type(value)


def _wrong_type(expected: type) -> st.SearchStrategy[Any]:
    """A non-null JSON value that is not of ``expected`` (nor, for lists/maps, of the right
    element type)."""
    def wrong(value: Any) -> bool:
        if value is None:
            return False
        if _json_kind(value) is not expected:
            return True
        if expected is list:
            return any(not isinstance(v, str) and v is not None for v in value)
        if expected is dict:
            return False  # objects are checked member by member elsewhere
        return False
    base = st.one_of(json_values, st.just("false"), st.just("true"), st.just(1), st.just(0),
                     st.just("1700000000"), st.just("nan"), st.just("inf"), st.just([]),
                     st.just({}), st.just([1]))
    return base.filter(wrong)


# -- families ---------------------------------------------------------------------------------


def raw_requests() -> st.SearchStrategy[Case]:
    """Request lines, targets and headers that are malformed or odd; no credentials."""
    target_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7e)
    garbage_line = st.binary(min_size=1, max_size=80).filter(
        lambda b: b"\r\n\r\n" not in b and b.strip() != b"").map(lambda b: b + b"\r\n\r\n")
    odd_target = st.one_of(
        st.text(target_chars, min_size=1, max_size=40).map(lambda t: "/" + t),
        st.sampled_from(["//[", "//[::1", "http://[", "/%zz", "/rtc%2Fvalidate", "//agent",
                         "*", "http://livekit/", "/..", "/./", "/%00", "/?%%%"]))
    header_name = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                        exclude_characters=":"), min_size=1, max_size=12)
    header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff),
                           max_size=40).map(str.strip)
    return st.one_of(
        garbage_line.map(lambda b: Case("raw", "garbage", b, frozenset({400, 505, CLOSED}))),
        odd_target.map(lambda t: Case(
            "raw", f"target {t[:40]!r}", http_request("GET", t),
            frozenset({200, 301, 400, 401, 404}))),
        st.lists(st.tuples(header_name, header_value), max_size=6).map(lambda hs: Case(
            "raw", "odd headers", http_request("GET", "/", hs),
            frozenset({200, 400, 401, 501}))),
        st.integers(min_value=MAX_HEAD + 1, max_value=MAX_HEAD + 100_000).map(lambda n: Case(
            "raw", f"head of {n} bytes", http_request("GET", "/", [("X-Big", "a" * n)]),
            frozenset({431}))),
    )


def token_cases(api_key: str, api_secret: str) -> st.SearchStrategy[Case]:
    """Tokens for ``ListRooms`` (needs ``video.roomList``): claims of every type, times, algs.

    Built so that the rules' answer is known: a claim of the wrong JSON type, a bad time, a
    bad signature or algorithm is 401; the same token with claims of the right type is 200.
    """
    def request(token: str) -> bytes:
        return twirp(LIST_ROOMS, token)

    def with_claim(path: tuple[str, ...], value: Any) -> dict[str, Any]:
        claims = base_claims(api_key, roomList=True)
        target = claims
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
        return claims

    claim_paths = st.one_of(
        st.sampled_from(sorted(CLAIM_TYPES)).map(lambda k: ((k,), CLAIM_TYPES[k])),
        st.sampled_from(sorted(VIDEO_TYPES)).map(lambda k: (("video", k), VIDEO_TYPES[k])),
        st.sampled_from(["admin", "call"]).map(lambda k: (("sip", k), bool)))

    @st.composite
    def wrong_type(draw: st.DrawFn) -> Case:
        path, expected = draw(claim_paths)
        if path == ("iss",):
            expected = str
        value = draw(_wrong_type(expected))
        claims = with_claim(path, value)
        return Case("token", f"{'.'.join(path)} = {value!r:.40}",
                    request(raw_token('{"alg":"HS256"}', json.dumps(claims), api_secret)),
                    frozenset({401}))

    @st.composite
    def wrong_member(draw: st.DrawFn) -> Case:  # list members, attribute values
        kind = draw(st.sampled_from(["attributes", "canPublishSources"]))
        bad = draw(_wrong_type(str))
        if kind == "attributes":
            claims = with_claim(("attributes",), {"k": bad})
        else:
            claims = with_claim(("video", "canPublishSources"), ["camera", bad])
        token = raw_token('{"alg":"HS256"}', json.dumps(claims), api_secret)
        return Case("token", f"{kind} member {bad!r:.40}", request(token), frozenset({401}))

    @st.composite
    def right_type(draw: st.DrawFn) -> Case:
        claims = base_claims(api_key, roomList=True)
        claims["name"] = draw(st.text(max_size=30))
        claims["metadata"] = draw(st.text(max_size=30))
        claims["attributes"] = draw(st.dictionaries(st.text(max_size=8),
                                                    st.text(max_size=8) | st.none(),
                                                    max_size=4))
        claims["video"]["room"] = draw(st.text(max_size=20))
        claims["video"]["canPublish"] = draw(st.booleans() | st.none())
        claims[draw(st.text(min_size=1, max_size=8).filter(
            lambda k: k not in CLAIM_TYPES and k not in ("aud", "roomConfig")))] = draw(
            json_values)
        alg = draw(st.sampled_from(["HS256", "HS384", "HS512"]))
        return Case("token", f"well-typed claims, {alg}",
                    request(sign(claims, api_secret, alg)), frozenset({200}))

    @st.composite
    def times(draw: st.DrawFn) -> Case:
        now = int(time.time())
        which = draw(st.sampled_from(["exp past", "exp huge", "nbf future", "iat future",
                                      "exp digits", "exp fraction"]))
        claims = base_claims(api_key, roomList=True)
        payload = None
        expect = frozenset({401})
        if which == "exp past":
            claims["exp"] = now - draw(st.integers(min_value=120, max_value=10**12))
        elif which == "exp huge":
            claims["exp"] = draw(st.integers(min_value=2**63, max_value=10**300))
        elif which == "nbf future":
            claims["nbf"] = now + draw(st.integers(min_value=120, max_value=10**12))
        elif which == "iat future":
            claims["iat"] = now + draw(st.integers(min_value=120, max_value=10**12))
        elif which == "exp digits":  # beyond float64: ParseFloat fails
            digits = draw(st.integers(min_value=310, max_value=2000))
            payload = json.dumps(claims).replace(str(claims["exp"]), "9" * digits)
        else:
            claims["exp"] = now + 600.5
            expect = frozenset({200})
        token = (raw_token('{"alg":"HS256","typ":"JWT"}', payload, api_secret)
                 if payload else sign(claims, api_secret))
        return Case("token", which, request(token), expect)

    @st.composite
    def forged(draw: st.DrawFn) -> Case:
        claims = base_claims(api_key, roomList=True)
        which = draw(st.sampled_from(["wrong secret", "alg none", "unknown key",
                                      "duplicate member", "no exp", "not json", "no grant",
                                      "garbage"]))
        if which == "wrong secret":
            token = sign(claims, api_secret + "x")
        elif which == "alg none":
            token = raw_token('{"alg":"none"}', json.dumps(claims), api_secret).rsplit(
                ".", 1)[0] + "."
        elif which == "unknown key":
            token = sign({**claims, "iss": api_key + "x"}, api_secret)
        elif which == "duplicate member":
            text = json.dumps(claims)
            token = raw_token('{"alg":"HS256"}', text[:-1] + ', "sub": "again"}', api_secret)
        elif which == "no exp":
            del claims["exp"]
            token = sign(claims, api_secret)
        elif which == "not json":
            token = raw_token('{"alg":"HS256"}', draw(st.text(max_size=30)), api_secret)
        elif which == "no grant":
            claims["video"] = {"roomList": False}
            token = sign(claims, api_secret)
        else:
            token = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                                 max_size=60))
        return Case("token", which, request(token), frozenset({401}))

    return st.one_of(wrong_type(), wrong_member(), right_type(), times(), forged())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def join_cases(api_key: str, api_secret: str) -> st.SearchStrategy[Case]:
    """``/rtc/validate`` with a good join token and odd ``protocol``, ``attributes`` and
    ``join_request`` parameters."""
    def token() -> str:
        claims = base_claims(api_key, roomJoin=True, room="fuzz-room")
        return sign(claims, api_secret)

    def validate(query: str) -> bytes:
        return http_request("GET", f"/rtc/validate?access_token={token()}&{query}")

    param_text = st.text(max_size=30)
    deep = st.integers(min_value=50, max_value=50_000).map(lambda n: "[" * n + "]" * n)
    attributes = st.one_of(
        st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3).map(
            lambda d: (_b64(json.dumps(d).encode()), 200)),
        json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: (_b64(json.dumps(v).encode()), 200 if v is None else 400)),
        st.dictionaries(st.text(max_size=8), json_values.filter(
            lambda v: v is not None and not isinstance(v, str)), min_size=1, max_size=3).map(
            lambda d: (_b64(json.dumps(d).encode()), 400)),
        deep.map(lambda text: (_b64(('{"a":' + text + "}").encode()), 400)),
        st.binary(min_size=1, max_size=30).map(lambda b: (_b64(b), 400)).filter(
            lambda c: not _is_json_map(base64.urlsafe_b64decode(c[0]))),
        st.sampled_from([("%%%", 400), ("!!", 400)]),
    )

    def wrapped(data: bytes, compression: int) -> str:
        return _b64(rtc.WrappedJoinRequest(compression=compression,  # type: ignore[arg-type]
                                           join_request=data).SerializeToString())

    good_join = rtc.JoinRequest(client_info=models.ClientInfo(protocol=16)).SerializeToString()
    join_request = st.one_of(
        st.just((wrapped(gzip.compress(good_join), rtc.WrappedJoinRequest.GZIP), 200)),
        st.binary(max_size=40).map(lambda b: (wrapped(b"\x1f\x8b" + b,
                                                      rtc.WrappedJoinRequest.GZIP), 400)),
        st.binary(min_size=1, max_size=40).map(lambda b: (wrapped(
            gzip.compress(good_join)[: len(b) % 20 + 1] + b, rtc.WrappedJoinRequest.GZIP),
            400)),
        st.binary(max_size=40).map(lambda b: (_b64(b"\xff" + b), 400)),
        st.sampled_from([("%%%", 400), ("@@@@", 400)]),
    )
    return st.one_of(
        param_text.map(lambda p: Case("join", f"protocol={p!r:.30}",
                                      validate(f"protocol={quote(p)}"), frozenset({200}))),
        attributes.map(lambda a: Case("join", f"attributes {a[0][:30]}",
                                      validate(f"attributes={quote(a[0])}"),
                                      frozenset({a[1]}))),
        join_request.map(lambda j: Case("join", f"join_request {j[0][:30]}",
                                        validate(f"join_request={quote(j[0])}"),
                                        frozenset({j[1]}))),
    )


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _is_json_map(data: bytes) -> bool:
    try:
        value = json.loads(data.decode("utf-8", "replace"), parse_constant=_not_json)
    except (ValueError, RecursionError):
        return False
    return value is None or (isinstance(value, dict) and all(
        isinstance(v, str) or v is None for v in value.values()))


TWIRP_METHODS: Final = {
    "RoomService/CreateRoom": room.CreateRoomRequest,
    "RoomService/ListRooms": room.ListRoomsRequest,
    "RoomService/DeleteRoom": room.DeleteRoomRequest,
    "RoomService/ListParticipants": room.ListParticipantsRequest,
    "RoomService/GetParticipant": room.RoomParticipantIdentity,
    "RoomService/UpdateRoomMetadata": room.UpdateRoomMetadataRequest,
    "RoomService/SendData": room.SendDataRequest,
    "AgentDispatchService/ListDispatch": agent_dispatch.ListAgentDispatchRequest,
    "AgentDispatchService/DeleteDispatch": agent_dispatch.DeleteAgentDispatchRequest,
}


def twirp_cases(api_key: str, api_secret: str) -> st.SearchStrategy[Case]:
    """Twirp calls with every grant (room "fuzz-room") and odd bodies: random protobuf
    bytes, random JSON, wrong content types. The answer is a Twirp one, never a crash."""
    def token() -> str:
        return sign(base_claims(api_key, roomCreate=True, roomList=True, roomAdmin=True,
                                room="fuzz-room"), api_secret)

    body = st.one_of(
        st.tuples(st.binary(max_size=60), st.just("application/protobuf")),
        st.tuples(json_values.map(lambda v: json.dumps(v).encode()),
                  st.just("application/json")),
        st.tuples(st.integers(min_value=50, max_value=20_000).map(
            lambda n: b'{"name":' + b"[" * n + b"]" * n + b"}"), st.just("application/json")),
        st.tuples(st.binary(max_size=20), st.sampled_from(["text/plain", ""])),
    )
    not_an_object = st.one_of(
        st.just(b""), json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: json.dumps(v).encode()))
    return st.one_of(
        st.tuples(st.sampled_from(sorted(TWIRP_METHODS)), body).map(
            lambda m: Case("twirp", f"{m[0]} {m[1][1]!r} {m[1][0][:30]!r}",
                           twirp(m[0], token(), m[1][0], m[1][1]),
                           frozenset({200, 400, 401, 404, 405, 409, 412}))),
        st.tuples(st.sampled_from(sorted(TWIRP_METHODS)), not_an_object).map(
            lambda m: Case("twirp", f"{m[0]} JSON body {m[1][:30]!r} (not an object)",
                           twirp(m[0], token(), m[1]), frozenset({400}))),
    )


def worker_cases(api_key: str, api_secret: str) -> st.SearchStrategy[Case]:
    """A registered worker sends odd messages (non-finite or huge loads, unknown statuses and
    jobs, unparseable frames); then a room is created, so the server picks a worker."""
    floats = st.floats(width=32) | st.sampled_from([float("-inf"), float("inf"), float("nan")])
    message = st.one_of(
        st.builds(lambda load, status: agent.WorkerMessage(update_worker=agent.UpdateWorkerStatus(
            load=load, status=status)), floats, st.integers(min_value=0, max_value=5)),
        st.builds(lambda job_id, status, error: agent.WorkerMessage(
            update_job=agent.UpdateJobStatus(job_id=job_id, status=status, error=error)),
            st.text(max_size=12), st.integers(min_value=0, max_value=9), st.text(max_size=12)),
        st.builds(lambda job_id, available: agent.WorkerMessage(
            availability=agent.AvailabilityResponse(job_id=job_id, available=available)),
            st.text(max_size=12), st.booleans()),
        st.builds(lambda ts: agent.WorkerMessage(ping=agent.WorkerPing(timestamp=ts)),
                  st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        st.builds(lambda ids: agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(
            job_ids=ids)), st.lists(st.text(max_size=8), max_size=3)),
    ).map(lambda m: m.SerializeToString())
    frames = st.lists(message | st.binary(max_size=20), min_size=1, max_size=6)
    return frames.map(lambda fs: Case(
        "worker", f"{len(fs)} messages", b"", frozenset({200}), tuple(fs)))


def cases(api_key: str = "devkey", api_secret: str = "secret") -> st.SearchStrategy[Case]:
    return st.one_of(raw_requests(), token_cases(api_key, api_secret),
                     join_cases(api_key, api_secret), twirp_cases(api_key, api_secret),
                     worker_cases(api_key, api_secret))


# -- sending ----------------------------------------------------------------------------------


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    assert parts.hostname and parts.port, base_url
    return parts.hostname, parts.port


async def _read_response(stream: trio.abc.Stream, head_only: bool = False
                         ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw stream; ``(CLOSED, {}, b"")`` if the server closed
    (or reset) without answering."""
    data = bytearray()
    try:
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return CLOSED, {}, b""
            data += chunk
        head, _, rest = bytes(data).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = bytearray(rest)
        if head_only or status in (101, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                body += chunk
            return status, headers, bytes(body[:length])
        while True:  # chunked or until close: read to the end
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            body += chunk
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray(_dechunk(bytes(body)))
        return status, headers, bytes(body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return CLOSED, {}, b""


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


def _body_kind(status: int, headers: dict[str, str], body: bytes) -> str:
    if status == CLOSED:
        return "none"
    if not body:
        return "empty"
    content_type = headers.get("content-type", "")
    if "json" in content_type:
        return "json"
    if "protobuf" in content_type:
        return "protobuf"
    return "text"


async def exchange(base_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes on a new connection, return (status, headers, body)."""
    host, port = _address(base_url)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        try:
            await stream.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server answered early (431, 413) and closed: read what it said
        return await _read_response(stream, head_only=request.startswith(b"HEAD "))


async def send_case(base_url: str, case: Case, *, api_key: str = "devkey",
                    api_secret: str = "secret") -> tuple[int, str]:
    """Send one case to the server at ``base_url``; ``(status, body_kind)``."""
    if case.family == "worker":
        return await _send_worker_case(base_url, case, api_key, api_secret)
    status, headers, body = await exchange(base_url, case.request)
    return status, _body_kind(status, headers, body)


class _Closed(Exception):
    pass


class _WebSocket:
    """A bare websocket client on a stream the caller owns (wsproto, no background task)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.events: list[ws_events.Event] = []

    async def _next(self) -> ws_events.Event:
        while not self.events:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Closed from exc
            if not data:
                raise _Closed
            self.ws.receive_data(bytes(data))
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def connect(self, target: str, token: str) -> bool:
        await self.stream.send_all(self.ws.send(ws_events.Request(
            host="livekit", target=target,
            extra_headers=[(b"authorization", f"Bearer {token}".encode())])))
        return isinstance(await self._next(), ws_events.AcceptConnection)

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(self.ws.send(ws_events.BytesMessage(data=data)))
        except (trio.BrokenResourceError, trio.ClosedResourceError,
                wsproto.utilities.LocalProtocolError) as exc:
            raise _Closed from exc

    async def receive(self) -> agent.ServerMessage:
        parts = bytearray()
        while True:
            event = await self._next()
            if isinstance(event, ws_events.Ping):
                await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, ws_events.CloseConnection):
                raise _Closed
            elif isinstance(event, ws_events.Message):
                parts += event.data if isinstance(event.data, (bytes, bytearray)) \
                    else event.data.encode()
                if event.message_finished:
                    return agent.ServerMessage.FromString(bytes(parts))


async def _create_dispatch(base_url: str, api_key: str, api_secret: str) -> tuple[int, str]:
    admin = sign(base_claims(api_key, roomAdmin=True, roomCreate=True, room="fuzz-room"),
                 api_secret)
    request = agent_dispatch.CreateAgentDispatchRequest(room="fuzz-room",
                                                        agent_name="fuzz-agent")
    status, headers, body = await exchange(base_url, twirp(
        "AgentDispatchService/CreateDispatch", admin, request.SerializeToString(),
        "application/protobuf"))
    return status, _body_kind(status, headers, body)


async def _send_worker_case(base_url: str, case: Case, api_key: str,
                            api_secret: str) -> tuple[int, str]:
    host, port = _address(base_url)
    token = sign(base_claims(api_key, agent=True), api_secret)
    kind = "refused"
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        ws = _WebSocket(stream)
        try:
            if not await ws.connect("/agent", token):
                return (await _create_dispatch(base_url, api_key, api_secret))[0], kind
            await ws.send(agent.WorkerMessage(register=agent.RegisterWorkerRequest(
                type=agent.JT_ROOM, agent_name="fuzz-agent", version="fuzz")
            ).SerializeToString())
            if (await ws.receive()).WhichOneof("message") == "register":
                kind = "registered"
            for frame in case.messages:
                await ws.send(frame)
            # the server has read everything before its pong (or closed the connection)
            await ws.send(agent.WorkerMessage(ping=agent.WorkerPing(timestamp=1)
                                              ).SerializeToString())
            while True:
                message = await ws.receive()
                if message.WhichOneof("message") == "pong" and message.pong.last_timestamp == 1:
                    break
            # a dispatch while the fuzzed worker is registered: the server weighs its load
            status, body_kind = await _create_dispatch(base_url, api_key, api_secret)
            return status, kind if status == 200 else body_kind
        except _Closed:
            pass
    # the worker's connection was closed (as livekit-server closes it on an unreadable
    # frame): the dispatch is still made, with no worker of that name left
    return (await _create_dispatch(base_url, api_key, api_secret))[0], kind


async def alive(base_url: str) -> bool:
    """The server answers ``GET /`` with 200 on a new connection."""
    status, _, _ = await exchange(base_url, http_request("GET", "/"))
    return status == 200


def accepted(status: int) -> bool:
    return 200 <= status < 300 or status == UPGRADED


def looser(ours: int, theirs: int) -> bool:
    """``ours`` accepted what ``theirs`` refused."""
    return accepted(ours) and not accepted(theirs)
