"""The dev server's WebRTC side: aiortc, on an asyncio loop that trio-asyncio runs in the
server's own nursery.

``MediaHost`` owns the loop (started on the first ``/rtc`` join, so a server nobody joins
never imports aiortc). ``Peer`` is one participant's peer connection: it answers the client's
offer, takes the client's trickled candidates, and reports what happens on it (connection
state, data channel messages) to trio through a memory channel.

The client's ``_reliable`` and ``_lossy`` channels carry ``DataPacket``s both ways (the client
listens on the channels it created); the media it sends arrives as tracks (``_tracks.py``
forwards them to subscribers on a peer connection of their own, which the server offers).

WebRTC never uses loopback, so aiortc is told which one host address to advertise
(``rtc_address``); it must not add a public STUN server either (``iceServers=[]``).
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import attrs
import trio

from .._errors import ConfigError, MissingExtraError

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection

logger = logging.getLogger("trio_agents.devserver")

T = TypeVar("T")

#: Labels of the data channels the LiveKit SDKs open.
RELIABLE: Final = "_reliable"
LOSSY: Final = "_lossy"
#: How long closing a peer connection may take before we stop waiting.
CLOSE_TIMEOUT: Final = 2.0

_advertised: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trio_agents_devserver_rtc_address", default=None)


def _import_aiortc() -> None:
    try:
        import aiortc  # noqa: F401
        import trio_asyncio  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            f"the dev server's WebRTC side needs the devserver-rtc extra ({exc.name} is not "
            "installed): pip install 'trio-agents[devserver-rtc]'") from None


@functools.cache
def _restrict_host_addresses() -> None:
    """Make aioice gather only the address set in ``_advertised`` (when one is set).

    aioice asks ``get_host_addresses`` for every interface; the dev server must offer one
    address (a veth in tests, the host's own address on a laptop). The override only acts
    inside the dev server's own gathering, where ``_advertised`` is set.
    """
    import aioice.ice

    original = aioice.ice.get_host_addresses

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        address = _advertised.get()
        return [address] if address is not None else original(use_ipv4, use_ipv6)

    aioice.ice.get_host_addresses = host_addresses


def host_address() -> str | None:
    """The first IPv4 address of an interface of this host that is up and not loopback."""
    import socket

    import psutil

    stats = psutil.net_if_stats()
    for name, addresses in psutil.net_if_addrs().items():
        if name in stats and stats[name].isup:
            for address in addresses:
                if address.family == socket.AF_INET and not address.address.startswith("127."):
                    return str(address.address)
    return None


def default_rtc_address() -> str:
    """``host_address()``, or a clear error when this host has none."""
    address = host_address()
    if address is None:
        raise ConfigError("the dev server found no non-loopback IPv4 address to offer WebRTC "
                          "on (WebRTC never uses loopback); pass rtc_address= / --rtc-address")
    return address


@attrs.frozen
class PeerEvent:
    """Something that happened on a peer connection.

    ``kind``: ``"state"`` (``value`` = the new connection state: ``connected``, ``failed``,
    ``closed``, ...), ``"channel"`` (``value`` = the label of a data channel now open) or
    ``"data"`` (``value`` = the label, ``payload`` = the message) or ``"track"`` (``value`` =
    the track's id, the client's ``cid``; ``obj`` = ``(track, transceiver)``: media arrived).
    """

    kind: str
    value: str
    payload: bytes = b""
    obj: Any = None


@final
class MediaHost:
    """The asyncio loop the peers live on; ``run`` is its task in the server's nursery."""

    def __init__(self, rtc_address: str | None) -> None:
        self._rtc_address = rtc_address
        self._loop: Any = None
        self._lock = trio.Lock()
        self.peers: set[Peer] = set()

    @property
    def address(self) -> str:
        if self._rtc_address is None:
            self._rtc_address = default_rtc_address()
        return self._rtc_address

    async def ensure_started(self, nursery: trio.Nursery) -> None:
        """Start the loop in ``nursery`` if it is not running yet (raises if it cannot)."""
        async with self._lock:
            if self._loop is None:
                _import_aiortc()
                _restrict_host_addresses()
                logger.info("WebRTC: offering host address %s", self.address)
                await nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        from .._util import open_aio_loop

        async with open_aio_loop() as loop:
            self._loop = loop
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._loop = None

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the asyncio loop, with the advertised address in effect."""
        import trio_asyncio

        address = self.address

        async def run() -> T:
            _advertised.set(address)
            return await fn(*args)

        if self._loop is None:
            raise trio.ClosedResourceError("the dev server's WebRTC loop is closed")
        # What aiortc starts from here (socket readers: trio tasks of trio-asyncio) inherits
        # this task's context, where asyncio must find its running loop.
        trio_asyncio.current_loop.set(self._loop)
        result: T = await self._loop.run_aio_coroutine(run())
        return result

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the asyncio loop, after what was scheduled before."""
        if self._loop is not None:
            self._loop.call_soon(fn, *args)

    async def new_peer(self, events: trio.MemorySendChannel[PeerEvent]) -> Peer:
        peer = Peer(self, events)
        peer.pc = await self.call(_new_peer_connection, peer)
        self.peers.add(peer)
        return peer


async def _new_peer_connection(peer: Peer) -> RTCPeerConnection:
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    @pc.on("connectionstatechange")
    def on_state() -> None:
        peer.post(PeerEvent("state", pc.connectionState))

    @pc.on("datachannel")
    def on_channel(channel: RTCDataChannel) -> None:
        peer.adopt(channel)

    @pc.on("track")
    def on_track(track: Any) -> None:
        transceiver = next((t for t in pc.getTransceivers() if t.receiver.track is track), None)
        peer.post(PeerEvent("track", track.id, obj=(track, transceiver)))

    return pc


@final
class Peer:
    """One participant's peer connection (the client offers, we answer)."""

    def __init__(self, host: MediaHost, events: trio.MemorySendChannel[PeerEvent]) -> None:
        self._host = host
        self._events = events
        self.pc: Any = None
        self.channels: dict[str, RTCDataChannel] = {}

    def post(self, event: PeerEvent) -> None:
        try:
            self._events.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            logger.debug("peer event dropped: %s", event)

    def adopt(self, channel: RTCDataChannel) -> None:
        label = channel.label

        @channel.on("message")
        def on_message(message: bytes | str) -> None:
            data = message.encode() if isinstance(message, str) else message
            self.post(PeerEvent("data", label, data))

        def opened() -> None:
            self.channels[label] = channel
            self.post(PeerEvent("channel", label))

        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    async def answer(self, sdp: str) -> str:
        """Take the client's offer; our answer (with our candidates in it)."""
        return await self._host.call(_answer, self.pc, sdp)

    async def add_candidate(self, candidate_init: str) -> None:
        """A candidate the client trickled (``TrickleRequest.candidate_init``, JSON)."""
        await self._host.call(_add_candidate, self.pc, candidate_init)

    def send(self, label: str, data: bytes) -> bool:
        """Queue ``data`` on the client's channel ``label``; ``False`` if it is not open."""
        channel = self.channels.get(label)
        if channel is None or channel.readyState != "open":
            return False
        self._host.call_soon(_send, channel, data)
        return True

    async def aclose(self) -> None:
        self._host.peers.discard(self)
        if self.pc is None:
            return
        pc, self.pc = self.pc, None
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
            try:
                await self._host.call(pc.close)
            except (trio.ClosedResourceError, RuntimeError) as exc:
                logger.debug("closing a peer connection: %r", exc)


def _send(channel: RTCDataChannel, data: bytes) -> None:
    if channel.readyState == "open":
        channel.send(data)


async def _answer(pc: RTCPeerConnection, sdp: str) -> str:
    from aiortc import RTCSessionDescription

    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    answer: str = pc.localDescription.sdp
    return answer


async def _add_candidate(pc: RTCPeerConnection, candidate_init: str) -> None:
    from aiortc.sdp import candidate_from_sdp

    init = json.loads(candidate_init)
    line: str = init.get("candidate") or ""
    if not line:  # end of candidates
        return
    candidate = candidate_from_sdp(line.removeprefix("candidate:"))
    candidate.sdpMid = init.get("sdpMid")
    candidate.sdpMLineIndex = init.get("sdpMLineIndex")
    await pc.addIceCandidate(candidate)
