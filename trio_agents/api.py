"""A small client of LiveKit's server API (Twirp over HTTP, via httpx, usable under trio).

Method names and request/response types follow ``livekit-api``, so porting is a change of
import::

    async with LiveKitAPI(url, api_key, api_secret) as api:
        room = await api.room.create_room(CreateRoomRequest(name="support"))
        await api.agent_dispatch.create_dispatch(
            CreateAgentDispatchRequest(room="support", agent_name="helper"))
        await api.sip.create_sip_participant(CreateSIPParticipantRequest(
            sip_trunk_id="ST_...", sip_call_to="+15550100", room_name="support"))

Each call carries a fresh short-lived token with just the grants it needs. Used outside
``async with``, each call opens (and closes) its own connection.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar, final

import httpx
from google.protobuf.message import Message
from livekit.protocol import agent_dispatch, models, room, sip

from ._auth import SIPGrants as SIPGrants
from ._auth import VideoGrants as VideoGrants
from ._auth import create_token
from ._errors import ConfigError, TrioAgentsError

M = TypeVar("M", bound=Message)
#: Lifetime of the token minted for each call (the server checks it once, on arrival).
TOKEN_TTL: Final = 600.0
#: Client-side floor for ``CreateSIPParticipant`` with ``wait_until_answered``: the call rings
#: first (livekit-server itself waits up to 80 s for an answer).
SIP_ANSWER_TIMEOUT: Final = 80.0

#: HTTP status of each Twirp error code (twirp v8 ``ServerHTTPStatusFromErrorCode``).
TWIRP_STATUS: Final[Mapping[str, int]] = {
    "canceled": 408, "unknown": 500, "invalid_argument": 400, "malformed": 400,
    "deadline_exceeded": 408, "not_found": 404, "bad_route": 404, "already_exists": 409,
    "permission_denied": 403, "unauthenticated": 401, "resource_exhausted": 429,
    "failed_precondition": 412, "aborted": 409, "out_of_range": 400, "unimplemented": 501,
    "internal": 500, "unavailable": 503, "dataloss": 500,
}


class TwirpError(TrioAgentsError):
    """A Twirp call failed: ``code`` is Twirp's (``not_found``, ``unauthenticated``, …),
    ``msg`` the server's text and ``status`` the HTTP status.

    The server refusing a malformed or badly signed token answers in plain text, not Twirp
    JSON; that becomes ``code="unauthenticated"`` with the text as ``msg``. When the server
    cannot be reached at all, ``code`` is ``"unavailable"`` and ``status`` is 0.
    The dev server raises the same class from its Python API.
    """

    def __init__(self, code: str, msg: str, status: int | None = None) -> None:
        status = TWIRP_STATUS.get(code, 500) if status is None else status
        super().__init__(f"{code}: {msg} (HTTP {status})" if status else f"{code}: {msg}")
        self.code, self.msg, self.status = code, msg, status


class SIPError(TwirpError):
    """A SIP call failed. When the server's message carries the SIP answer
    (``sip status: 486 (Busy Here)``), ``sip_status`` and ``sip_message`` hold it."""

    def __init__(self, code: str, msg: str, status: int | None = None) -> None:
        super().__init__(code, msg, status)
        found = re.search(r"sip status: (\d+) \((.*?)\)", msg)
        self.sip_status: int | None = int(found.group(1)) if found else None
        self.sip_message: str | None = found.group(2) if found else None


def http_base(url: str) -> str:
    """The HTTP base of a LiveKit URL: ``ws→http``, ``wss→https``, no trailing slash.

    Raises:
        ConfigError: the URL is empty or not ws(s)/http(s).
    """
    scheme, sep, rest = url.strip().partition("://")
    mapped = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(scheme.lower())
    if not sep or mapped is None or not rest.strip("/"):
        raise ConfigError(f"LiveKit URL {url!r} is not a ws://, wss://, http:// or https:// URL; "
                          "set LIVEKIT_URL (or --url), e.g. ws://127.0.0.1:7880")
    return f"{mapped}://{rest.rstrip('/')}"


@final
class LiveKitAPI:
    """The entry point: ``.room`` (RoomService), ``.agent_dispatch`` (AgentDispatchService) and
    ``.sip`` (placing and transferring SIP calls)."""

    def __init__(self, url: str, api_key: str, api_secret: str, *, timeout: float = 10.0) -> None:
        self._base = http_base(url)
        if not api_key or not api_secret:
            raise ConfigError("the LiveKit API needs an API key and secret; set "
                              "LIVEKIT_API_KEY and LIVEKIT_API_SECRET (or --api-key/--api-secret)")
        self._key = api_key
        self._secret = api_secret
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self.room = RoomService(self)
        self.agent_dispatch = AgentDispatchService(self)
        self.sip = SipService(self)

    async def __aenter__(self) -> LiveKitAPI:
        self._client = httpx.AsyncClient(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None:
            yield self._client
            return
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            yield client

    async def call(self, service: str, method: str, request: Message, response: type[M],
                   grants: VideoGrants, *, sip: SIPGrants | None = None,
                   timeout: float | None = None) -> M:
        """POST one Twirp call with a protobuf body; raise ``TwirpError`` on an error answer.

        ``timeout`` (seconds) replaces the client's for this call.
        """
        token = create_token(self._key, self._secret, video=grants, sip=sip, ttl=TOKEN_TTL)
        url = f"{self._base}/twirp/livekit.{service}/{method}"
        limit = self._timeout if timeout is None else timeout
        try:
            async with self._session() as client:
                answer = await client.post(
                    url,
                    content=request.SerializeToString(),
                    headers={"Authorization": f"Bearer {token}",
                             "Content-Type": "application/protobuf"},
                    timeout=limit,
                )
        except httpx.TimeoutException as exc:
            raise TwirpError("deadline_exceeded", f"no answer from {url} within "
                             f"{limit:g} s", 0) from exc
        except httpx.HTTPError as exc:  # refused, DNS, TLS, connection dropped, bad URL
            raise TwirpError("unavailable", f"cannot reach the LiveKit server at {url}: "
                             f"{exc or type(exc).__name__}; check the URL (LIVEKIT_URL)",
                             0) from exc
        if answer.status_code != 200:
            try:
                body = json.loads(answer.content)
                code, msg = str(body["code"]), str(body["msg"])
            except (ValueError, KeyError, TypeError):  # e.g. the plain-text 401 of a bad token
                code = "unauthenticated" if answer.status_code == 401 else "unknown"
                msg = answer.text.strip()
            raise TwirpError(code, msg, answer.status_code)
        return response.FromString(answer.content)


@final
class RoomService:
    def __init__(self, api: LiveKitAPI) -> None:
        self._api = api

    async def create_room(self, request: room.CreateRoomRequest) -> models.Room:
        return await self._api.call("RoomService", "CreateRoom", request, models.Room,
                                    VideoGrants(room_create=True))

    async def list_rooms(self, request: room.ListRoomsRequest) -> room.ListRoomsResponse:
        return await self._api.call("RoomService", "ListRooms", request, room.ListRoomsResponse,
                                    VideoGrants(room_list=True))

    async def delete_room(self, request: room.DeleteRoomRequest) -> room.DeleteRoomResponse:
        return await self._api.call("RoomService", "DeleteRoom", request,
                                    room.DeleteRoomResponse, VideoGrants(room_create=True))

    async def list_participants(
        self, request: room.ListParticipantsRequest
    ) -> room.ListParticipantsResponse:
        return await self._api.call("RoomService", "ListParticipants", request,
                                    room.ListParticipantsResponse,
                                    VideoGrants(room_admin=True, room=request.room))

    async def get_participant(self, request: room.RoomParticipantIdentity) -> models.ParticipantInfo:
        return await self._api.call("RoomService", "GetParticipant", request,
                                    models.ParticipantInfo,
                                    VideoGrants(room_admin=True, room=request.room))

    async def remove_participant(
        self, request: room.RoomParticipantIdentity
    ) -> room.RemoveParticipantResponse:
        return await self._api.call("RoomService", "RemoveParticipant", request,
                                    room.RemoveParticipantResponse,
                                    VideoGrants(room_admin=True, room=request.room))

    async def update_participant(self, request: room.UpdateParticipantRequest
                                 ) -> models.ParticipantInfo:
        return await self._api.call("RoomService", "UpdateParticipant", request,
                                    models.ParticipantInfo,
                                    VideoGrants(room_admin=True, room=request.room))

    async def mute_published_track(self, request: room.MuteRoomTrackRequest
                                   ) -> room.MuteRoomTrackResponse:
        return await self._api.call("RoomService", "MutePublishedTrack", request,
                                    room.MuteRoomTrackResponse,
                                    VideoGrants(room_admin=True, room=request.room))

    async def update_subscriptions(self, request: room.UpdateSubscriptionsRequest
                                   ) -> room.UpdateSubscriptionsResponse:
        return await self._api.call("RoomService", "UpdateSubscriptions", request,
                                    room.UpdateSubscriptionsResponse,
                                    VideoGrants(room_admin=True, room=request.room))

    async def update_room_metadata(self, request: room.UpdateRoomMetadataRequest) -> models.Room:
        return await self._api.call("RoomService", "UpdateRoomMetadata", request, models.Room,
                                    VideoGrants(room_admin=True, room=request.room))

    async def send_data(self, request: room.SendDataRequest) -> room.SendDataResponse:
        return await self._api.call("RoomService", "SendData", request, room.SendDataResponse,
                                    VideoGrants(room_admin=True, room=request.room))


@final
class AgentDispatchService:
    def __init__(self, api: LiveKitAPI) -> None:
        self._api = api

    async def create_dispatch(
        self, request: agent_dispatch.CreateAgentDispatchRequest
    ) -> agent_dispatch.AgentDispatch:
        return await self._api.call("AgentDispatchService", "CreateDispatch", request,
                                    agent_dispatch.AgentDispatch,
                                    VideoGrants(room_admin=True, room=request.room))

    async def list_dispatch(
        self, request: agent_dispatch.ListAgentDispatchRequest
    ) -> agent_dispatch.ListAgentDispatchResponse:
        return await self._api.call("AgentDispatchService", "ListDispatch", request,
                                    agent_dispatch.ListAgentDispatchResponse,
                                    VideoGrants(room_admin=True, room=request.room))

    async def delete_dispatch(
        self, request: agent_dispatch.DeleteAgentDispatchRequest
    ) -> agent_dispatch.AgentDispatch:
        return await self._api.call("AgentDispatchService", "DeleteDispatch", request,
                                    agent_dispatch.AgentDispatch,
                                    VideoGrants(room_admin=True, room=request.room))


@final
class SipService:
    """Placing and transferring calls (the ``SIP`` Twirp service). Needs a SIP outbound trunk
    configured in LiveKit, and a LiveKit with a SIP service: a self-hosted livekit-server
    without Redis answers ``internal: sip not connected (redis required)``."""

    def __init__(self, api: LiveKitAPI) -> None:
        self._api = api

    async def create_sip_participant(self, create: sip.CreateSIPParticipantRequest, *,
                                     timeout: float | None = None) -> sip.SIPParticipantInfo:
        """Dial ``sip_call_to`` through trunk ``sip_trunk_id`` into ``room_name``.

        ``timeout`` defaults to the client's, raised to 80 s with ``wait_until_answered``.
        Raises ``SIPError`` (e.g. ``not_found`` for an unknown trunk).
        """
        if timeout is None and create.wait_until_answered:
            timeout = max(self._api._timeout, SIP_ANSWER_TIMEOUT)
        try:
            return await self._api.call("SIP", "CreateSIPParticipant", create,
                                        sip.SIPParticipantInfo, VideoGrants(),
                                        sip=SIPGrants(call=True), timeout=timeout)
        except TwirpError as exc:
            raise SIPError(exc.code, exc.msg, exc.status) from exc

    async def transfer_sip_participant(
        self, transfer: sip.TransferSIPParticipantRequest
    ) -> sip.SIPParticipantInfo:
        """Transfer (SIP REFER) the caller ``participant_identity`` of ``room_name`` to
        ``transfer_to`` (``tel:+1...`` or ``sip:user@host``). Raises ``SIPError``."""
        try:
            return await self._api.call("SIP", "TransferSIPParticipant", transfer,
                                        sip.SIPParticipantInfo,
                                        VideoGrants(room_admin=True, room=transfer.room_name),
                                        sip=SIPGrants(call=True))
        except TwirpError as exc:
            raise SIPError(exc.code, exc.msg, exc.status) from exc


@final
class AccessToken:
    """A participant's (or a service's) token, built as with livekit-api::

        token = (AccessToken(api_key, api_secret).with_identity("alice").with_name("Alice")
                 .with_grants(VideoGrants(room_join=True, room="support")).to_jwt())

    Each ``with_*`` returns the same builder; ``to_jwt()`` signs it (HS256).
    """

    def __init__(self, api_key: str, api_secret: str) -> None:
        if not api_key or not api_secret:
            raise ConfigError("a token needs an API key and secret; set LIVEKIT_API_KEY and "
                              "LIVEKIT_API_SECRET")
        self._key, self._secret = api_key, api_secret
        self._claims: dict[str, Any] = {"video": VideoGrants()}
        self._ttl = datetime.timedelta(hours=6)

    def with_identity(self, identity: str) -> AccessToken:
        self._claims["identity"] = identity
        return self

    def with_name(self, name: str) -> AccessToken:
        self._claims["name"] = name
        return self

    def with_kind(self, kind: str) -> AccessToken:
        """``"agent"``, ``"sip"``, ...; empty for a standard participant."""
        self._claims["kind"] = kind
        return self

    def with_metadata(self, metadata: str) -> AccessToken:
        self._claims["metadata"] = metadata
        return self

    def with_attributes(self, attributes: Mapping[str, str]) -> AccessToken:
        self._claims["attributes"] = dict(attributes)
        return self

    def with_grants(self, grants: VideoGrants) -> AccessToken:
        self._claims["video"] = grants
        return self

    def with_sip_grants(self, grants: SIPGrants) -> AccessToken:
        self._claims["sip"] = grants
        return self

    def with_ttl(self, ttl: datetime.timedelta) -> AccessToken:
        self._ttl = ttl
        return self

    def to_jwt(self) -> str:
        return create_token(self._key, self._secret, ttl=self._ttl.total_seconds(),
                            **self._claims)


__all__ = ["TWIRP_STATUS", "AccessToken", "AgentDispatchService", "LiveKitAPI", "RoomService",
           "SIPError", "SIPGrants", "SipService", "TwirpError", "VideoGrants", "http_base"]
