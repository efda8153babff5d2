"""LiveKit access tokens: minting (worker and room-join tokens) and verification.

Pure functions over pyjwt; the current time is an argument so tests need no clock.
Claim names follow livekit/protocol ``auth/grants.go`` (``video`` grants are camelCase).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Final

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
        def flag(name: str, default: bool = False) -> bool:
            value = claim.get(name, default)
            return bool(value) if value is not None else default

        return cls(
            room_create=flag("roomCreate"),
            room_list=flag("roomList"),
            room_admin=flag("roomAdmin"),
            room_join=flag("roomJoin"),
            room=str(claim.get("room") or ""),
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


def verify_token(
    token: str, secrets: Mapping[str, str], *, now: float | None = None
) -> Claims:
    """Verify a token as livekit-server does (``auth.ParseAPIToken`` + ``Verify``).

    HS256 only, ``iss`` must be a known key, ``exp`` is required, 60 s leeway, ``nbf`` honoured.
    Raises:
        TokenError: with the text the server puts in its plain-text 401 body.
    """
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid authorization token: {exc}") from exc
    api_key = unverified.get("iss")
    if not isinstance(api_key, str) or api_key not in secrets:
        raise TokenError("invalid API key")
    try:
        with _short_secrets_allowed():
            claims = jwt.decode(
                token,
                secrets[api_key],
                algorithms=["HS256"],
                issuer=api_key,
                # time claims are checked below against an injectable clock
                options={"require": ["exp"], "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid authorization token: {exc}") from exc
    current = time.time() if now is None else now
    try:
        expires_at = float(claims["exp"])
        not_before = float(claims.get("nbf", 0))
    except (TypeError, ValueError) as exc:
        raise TokenError(f"invalid authorization token: bad time claim: {exc}") from exc
    if expires_at + LEEWAY < current:
        raise TokenError("invalid authorization token: token is expired")
    if not_before - LEEWAY > current:
        raise TokenError("invalid authorization token: token is not valid yet")
    video = claims.get("video")
    sip = claims.get("sip")
    raw_attributes = claims.get("attributes") or {}
    return Claims(
        api_key=api_key,
        identity=str(claims.get("sub") or claims.get("jti") or ""),
        name=str(claims.get("name") or ""),
        kind=str(claims.get("kind") or ""),
        metadata=str(claims.get("metadata") or ""),
        attributes={str(k): str(v) for k, v in dict(raw_attributes).items()},
        video=VideoGrants.from_claim(video) if isinstance(video, Mapping) else None,
        sip=SIPGrants.from_claim(sip) if isinstance(sip, Mapping) else None,
        expires_at=expires_at,
    )


@contextlib.contextmanager
def _short_secrets_allowed() -> Iterator[None]:
    # LiveKit secrets are often short (``livekit-server --dev`` uses "secret"); the server
    # accepts them, so pyjwt's advisory warning about HMAC key length is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        yield
