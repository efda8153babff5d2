"""LiveKit access tokens: minting (worker and room-join tokens) and verification.

Pure functions over pyjwt; the current time is an argument so tests need no clock.
Claim names follow livekit/protocol ``auth/grants.go`` (``video`` grants are camelCase).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Final, NoReturn

import attrs
import jwt

from ._errors import ConfigError

#: How long a worker token is valid. It is checked only when the websocket is opened.
WORKER_TOKEN_TTL: Final = 600.0
#: The server's leeway on ``exp``/``nbf`` (``tokenLeeway`` in livekit/protocol).
LEEWAY: Final = 60.0


@attrs.frozen(kw_only=True)
class VideoGrants:
    """The ``video`` claim of a LiveKit token (only the grants we use or check)."""

    room_create: bool = False
    room_list: bool = False
    room_admin: bool = False
    room_join: bool = False
    room: str = ""
    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    can_update_own_metadata: bool = False
    hidden: bool = False
    agent: bool = False
    can_subscribe_metrics: bool = False

    def to_claim(self) -> dict[str, Any]:
        claim: dict[str, Any] = {
            "roomCreate": self.room_create,
            "roomList": self.room_list,
            "roomAdmin": self.room_admin,
            "roomJoin": self.room_join,
            "canPublish": self.can_publish,
            "canSubscribe": self.can_subscribe,
            "canPublishData": self.can_publish_data,
            "canUpdateOwnMetadata": self.can_update_own_metadata,
            "hidden": self.hidden,
            "agent": self.agent,
            "canSubscribeMetrics": self.can_subscribe_metrics,
        }
        if self.room:
            claim["room"] = self.room
        # Omit false grants as the Go marshaller does (omitempty), keep the three that default true.
        defaults_true = {"canPublish", "canSubscribe", "canPublishData"}
        return {k: v for k, v in claim.items() if v or k in defaults_true}

    @classmethod
    def from_claim(cls, claim: Mapping[str, Any]) -> VideoGrants:
        # ``verify_token`` has checked the types: a grant is a JSON bool, or absent/null.
        def flag(name: str, default: bool = False) -> bool:
            value = claim.get(name)
            return value if isinstance(value, bool) else default

        return cls(
            room_create=flag("roomCreate"),
            room_list=flag("roomList"),
            room_admin=flag("roomAdmin"),
            room_join=flag("roomJoin"),
            room=_go_string(claim["room"]) if isinstance(claim.get("room"), str) else "",
            can_publish=flag("canPublish", True),
            can_subscribe=flag("canSubscribe", True),
            can_publish_data=flag("canPublishData", True),
            can_update_own_metadata=flag("canUpdateOwnMetadata"),
            hidden=flag("hidden"),
            agent=flag("agent"),
            can_subscribe_metrics=flag("canSubscribeMetrics"),
        )


@attrs.frozen(kw_only=True)
class SIPGrants:
    """The ``sip`` claim: ``admin`` manages trunks and dispatch rules, ``call`` places and
    transfers calls (``CreateSIPParticipant``, ``TransferSIPParticipant``)."""

    admin: bool = False
    call: bool = False

    def to_claim(self) -> dict[str, Any]:
        return {k: v for k, v in (("admin", self.admin), ("call", self.call)) if v}

    @classmethod
    def from_claim(cls, claim: Mapping[str, Any]) -> SIPGrants:
        return cls(admin=claim.get("admin") is True, call=claim.get("call") is True)


@attrs.frozen(kw_only=True)
class Claims:
    """The verified claims of a token."""

    api_key: str
    identity: str = ""
    name: str = ""
    kind: str = ""
    metadata: str = ""
    attributes: Mapping[str, str] = attrs.field(factory=dict)
    video: VideoGrants | None = None
    sip: SIPGrants | None = None
    expires_at: float = 0.0


def create_token(
    api_key: str,
    api_secret: str,
    *,
    video: VideoGrants,
    sip: SIPGrants | None = None,
    identity: str = "",
    name: str = "",
    kind: str = "",
    metadata: str = "",
    attributes: Mapping[str, str] | None = None,
    ttl: float = 3600.0,
    now: float | None = None,
) -> str:
    """Mint an HS256 LiveKit token, as ``livekit.api.AccessToken`` would."""
    if not api_key or not api_secret:
        raise ConfigError("an API key and secret are needed to sign a LiveKit token")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": api_key,
        "sub": identity,
        "nbf": issued,
        "iat": issued,
        "exp": issued + int(ttl),
        "video": video.to_claim(),
    }
    if sip is not None and sip.to_claim():
        payload["sip"] = sip.to_claim()
    if identity:
        payload["identity"] = identity
    if name:
        payload["name"] = name
    if kind:
        payload["kind"] = kind
    if metadata:
        payload["metadata"] = metadata
    if attributes:
        payload["attributes"] = dict(attributes)
    with _short_secrets_allowed():
        return jwt.encode(payload, api_secret, algorithm="HS256")


def worker_token(api_key: str, api_secret: str, *, now: float | None = None) -> str:
    """The token an agent server presents on ``/agent``: ``video.agent = true``, short-lived."""
    return create_token(
        api_key, api_secret, video=VideoGrants(agent=True), ttl=WORKER_TOKEN_TTL, now=now
    )


class TokenError(Exception):
    """A token failed verification; ``str(exc)`` is the server's plain-text 401 body."""


#: The algorithms livekit-server 1.8 verifies with an API secret (go-jose v3 takes any HMAC).
ALGORITHMS: Final = ("HS256", "HS384", "HS512")
_INT64: Final = 1 << 63

# The claims livekit-server decodes, by JSON type, as go-jose's JSON decoder reads them into
# ``jwt.Claims`` and ``auth.ClaimGrants`` (livekit/protocol): a member of another type fails
# the whole token. Names are matched case-sensitively and a duplicate member is refused
# (go-jose's fork of encoding/json); ``null`` leaves a member unset. Unknown members are ignored.
_VIDEO_SCHEMA: Final[Mapping[str, str]] = {
    "roomCreate": "bool", "roomList": "bool", "roomRecord": "bool", "roomAdmin": "bool",
    "roomJoin": "bool", "room": "str", "canPublish": "bool", "canSubscribe": "bool",
    "canPublishData": "bool", "canPublishSources": "str_list",
    "canUpdateOwnMetadata": "bool", "ingressAdmin": "bool", "hidden": "bool",
    "recorder": "bool", "agent": "bool", "canSubscribeMetrics": "bool",
}
_SIP_SCHEMA: Final[Mapping[str, str]] = {"admin": "bool", "call": "bool"}
_CLAIMS_SCHEMA: Final[Mapping[str, str]] = {
    "iss": "str", "sub": "str", "jti": "str", "aud": "audience",
    "exp": "date", "nbf": "date", "iat": "date",
    "name": "str", "kind": "str", "video": "video", "sip": "sip", "roomConfig": "room_config",
    "roomPreset": "str", "sha256": "str", "metadata": "str", "attributes": "str_map",
}


class _Number(str):
    """A JSON number kept as its text, so that it is read as Go reads it."""


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for key, value in pairs:
        if key in members:
            raise ValueError(f"duplicate member {key!r}")
        members[key] = value
    return members


def parse_json_strictly(data: bytes) -> Any:
    """JSON as go-jose's decoder accepts it: no NaN/Infinity, no duplicate members, numbers
    kept as text (``_Number``), invalid UTF-8 read as U+FFFD. Raises ``ValueError``."""
    try:
        return json.loads(data.decode("utf-8", "replace"), object_pairs_hook=_unique_members,
                          parse_int=_Number, parse_float=_Number, parse_constant=_no_constants)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _go_string(value: str) -> str:
    # Go decodes a lone surrogate escape as U+FFFD; Python would keep an unencodable str.
    return _SURROGATE.sub("\ufffd", value)


_SURROGATE: Final = re.compile("[\ud800-\udfff]")
#: go-jose's compact form: base64url parts (trailing "=" stripped before decoding).
_COMPACT_JWS: Final = re.compile(r"[A-Za-z0-9_-]*=*\.[A-Za-z0-9_-]*=*\.[A-Za-z0-9_-]*=*")


def numeric_date(value: _Number) -> int:
    """go-jose's ``NumericDate``: ``strconv.ParseFloat`` (out of range: refused), then
    ``int64(f)`` (a float beyond int64 becomes its minimum on amd64, i.e. the distant past)."""
    parsed = float(value)
    if math.isinf(parsed):
        raise ValueError(f"{value[:20]}... is out of range for a date")
    whole = int(parsed)
    return whole if -_INT64 <= whole < _INT64 else -_INT64


def _check(kind: str, value: Any, where: str) -> None:
    """Raise ``ValueError`` if ``value`` is not what Go would decode into a ``kind``."""
    if value is None:
        if kind == "audience":  # Audience.UnmarshalJSON is called with null, and refuses it
            raise ValueError(f"{where} must be a string or a list of strings, not null")
        return
    if kind == "str":
        ok = isinstance(value, str) and not isinstance(value, _Number)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "date":
        ok = isinstance(value, _Number)
        if ok:
            numeric_date(value)
    elif kind in ("str_list", "audience"):
        ok = (kind == "audience" and _is_str(value)) or (
            isinstance(value, list) and all(
                _is_str(v) or (v is None and kind == "str_list") for v in value))
    elif kind == "str_map":
        ok = isinstance(value, dict) and all(_is_str(v) or v is None for v in value.values())
    elif kind in ("video", "sip"):
        ok = isinstance(value, dict)
        if ok:
            schema = _VIDEO_SCHEMA if kind == "video" else _SIP_SCHEMA
            for name, member in value.items():
                if name in schema:
                    _check(schema[name], member, f"{where}.{name}")
    elif kind == "room_config":  # protojson.Unmarshal into livekit.RoomConfiguration
        ok = isinstance(value, dict)
        if ok:
            from google.protobuf import json_format
            from livekit.protocol import room as room_proto

            try:
                json_format.Parse(json.dumps(value), room_proto.RoomConfiguration())
            except (json_format.ParseError, ValueError, TypeError) as exc:
                raise ValueError(f"{where}: {exc}") from exc
    else:
        raise AssertionError(kind)
    if not ok:
        raise ValueError(f"{where} has the wrong type ({_json_type(value)}); "
                         f"livekit-server expects {_KIND_NAMES[kind]}")


_KIND_NAMES: Final[Mapping[str, str]] = {
    "str": "a string", "bool": "true or false", "date": "a JSON number of seconds",
    "str_list": "a list of strings", "audience": "a string or a list of strings",
    "str_map": "an object of strings", "video": "an object", "sip": "an object",
    "room_config": "an object",
}


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and not isinstance(value, _Number)


def _json_type(value: Any) -> str:
    if isinstance(value, _Number):
        return "a number"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def check_claims(payload: Any) -> dict[str, Any]:
    """The claims object, each known claim checked by type as livekit-server decodes it.

    Raises ``ValueError`` naming the claim at fault.
    """
    if not isinstance(payload, dict):
        raise ValueError(f"the claims must be a JSON object, not {_json_type(payload)}")
    for name, value in payload.items():
        kind = _CLAIMS_SCHEMA.get(name)
        if kind is not None:
            _check(kind, value, name)
    return payload


def _header(token: str) -> dict[str, Any]:
    segment = token.split(".", 1)[0]
    try:
        header = parse_json_strictly(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise TokenError(f"invalid authorization token: bad header: {exc}") from exc
    if not isinstance(header, dict) or header.get("alg") not in ALGORITHMS:
        raise TokenError("invalid authorization token: unsupported signing algorithm "
                         f"(livekit-server verifies {', '.join(ALGORITHMS)} with the API secret)")
    if "crit" in header:
        raise TokenError("invalid authorization token: unsupported crit header")
    return header


def verify_token(
    token: str, secrets: Mapping[str, str], *, now: float | None = None
) -> Claims:
    """Verify a token as livekit-server 1.8 does (``auth.ParseAPIToken`` + ``Verify``, go-jose).

    HS256, HS384 or HS512; ``iss`` a known key; every known claim of the JSON type the server
    decodes it as (``check_claims``); ``exp`` required (as livekit/protocol now requires it,
    "require exp claim when verifying access tokens"; livekit-server 1.8 accepts a token
    without one, which never expires); ``exp``/``nbf``/``iat`` with 60 s leeway. Newer
    livekit/protocol (golang-jwt) accepts HS256 only; 1.8 (go-jose v3) any HMAC size.
    Raises:
        TokenError: with the text the server puts in its plain-text 401 body.
    """
    if not _COMPACT_JWS.fullmatch(token):
        raise TokenError("invalid authorization token: not a compact JWS (three base64url "
                         "parts separated by dots)")
    header = _header(token)
    try:
        with _short_secrets_allowed():
            unverified = jwt.api_jws.decode_complete(
                token, options={"verify_signature": False})
        claims = check_claims(parse_json_strictly(unverified["payload"]))
    except (jwt.PyJWTError, ValueError) as exc:
        raise TokenError(f"invalid authorization token: {exc}") from exc
    api_key = claims.get("iss")
    if not isinstance(api_key, str) or api_key not in secrets:
        raise TokenError("invalid API key")
    try:
        with _short_secrets_allowed():
            jwt.api_jws.decode_complete(token, secrets[api_key], algorithms=[header["alg"]])
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid authorization token: {exc}") from exc
    current = time.time() if now is None else now
    if claims.get("exp") is None:
        raise TokenError("invalid authorization token: the token has no exp (expiry) claim")
    expires_at = numeric_date(claims["exp"])
    if current - LEEWAY > expires_at:
        raise TokenError("invalid authorization token: token is expired")
    for name, problem in (("nbf", "token is not valid yet"), ("iat", "token issued in the future")):
        if claims.get(name) is not None and current + LEEWAY < numeric_date(claims[name]):
            raise TokenError(f"invalid authorization token: {problem}")
    video = claims.get("video")
    sip = claims.get("sip")
    attributes = claims.get("attributes") or {}
    return Claims(
        api_key=api_key,
        identity=_go_string(claims.get("sub") or claims.get("jti") or ""),
        name=_go_string(claims.get("name") or ""),
        kind=_go_string(claims.get("kind") or ""),
        metadata=_go_string(claims.get("metadata") or ""),
        attributes={_go_string(k): _go_string(v or "") for k, v in attributes.items()},
        video=VideoGrants.from_claim(video) if isinstance(video, dict) else None,
        sip=SIPGrants.from_claim(sip) if isinstance(sip, dict) else None,
        expires_at=float(expires_at),
    )


@contextlib.contextmanager
def _short_secrets_allowed() -> Iterator[None]:
    # LiveKit secrets are often short (``livekit-server --dev`` uses "secret"); the server
    # accepts them, so pyjwt's advisory warning about HMAC key length is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        yield
