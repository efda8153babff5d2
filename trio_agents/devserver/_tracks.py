"""Media tracks on the dev server: publish, subscribe, forward (PROTOCOL.md §6).

What a client sees is what livekit-server shows it:

* ``AddTrackRequest`` → ``TrackPublishedResponse`` with the track's ``TR_`` sid; the track is
  published (in the participant's ``ParticipantUpdate``) once its media arrives on the
  publisher peer connection, and unpublished when the client renegotiates it away;
* subscribers get the track on a second peer connection that the server offers (the v0
  ``subscriber`` connection), with the stream id ``<participant sid>|<track sid>`` the SDKs
  map to the publication; auto-subscription follows the join's ``auto_subscribe`` and the
  token's ``canSubscribe``, and ``UpdateSubscription`` subscribes and unsubscribes by hand;
* mute and unmute (the client's ``mute`` request, or Twirp ``MutePublishedTrack``) reach
  every participant as a ``ParticipantUpdate``.

Forwarding decodes and re-encodes: aiortc hands a received track to us as decoded frames and
encodes what it sends, so each published track is decoded once (Opus or VP8) and encoded once
per subscriber. ``Publication.pump`` reads the frames (always, so aiortc's queue never grows)
and hands each to every subscriber's ``ForwardTrack``, which keeps the latest few and drops
the oldest when its encoder falls behind.

Owner: this module owns the media state: the publications, the subscriptions, the subscriber
peer connections and the forwarding, kept on each participant's ``Session`` and changed only
by the functions here (``MediaHost``, ``_media.py``, runs aiortc for them). ``Tracks`` is the
entry of the server's API; the session (``_rtc.py``) calls the functions for what a
participant asks.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, final

import trio
from livekit.protocol import models
from livekit.protocol import rtc as rtc_proto

from ..api import TwirpError
from ._media import MediaHost

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

    from ._rooms import Rooms
    from ._rtc import Session

logger = logging.getLogger("trio_agents.devserver")

#: Frames a subscriber's encoder may fall behind by before the oldest is dropped.
FORWARD_BUFFER: Final = 8


def forward_track(kind: str, track_sid: str) -> Any:
    """One subscriber's copy of a published track: an aiortc ``MediaStreamTrack`` whose id is
    the track's sid; ``push`` frames in, aiortc's encoder takes them out with ``recv``."""
    return _forward_track_class()(kind, track_sid)


@functools.cache
def _forward_track_class() -> type:
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class _ForwardTrack(MediaStreamTrack):
        def __init__(self, kind: str, track_sid: str) -> None:
            super().__init__()
            self.kind = kind
            self._id = track_sid
            self._frames: collections.deque[Any] = collections.deque(maxlen=FORWARD_BUFFER)
            self._ready = asyncio.Event()

        def push(self, frame: Any) -> None:
            self._frames.append(frame)
            self._ready.set()

        async def recv(self) -> Any:
            while not self._frames:
                if self.readyState != "live":
                    raise MediaStreamError
                self._ready.clear()
                await self._ready.wait()
            return self._frames.popleft()

        def stop(self) -> None:
            super().stop()
            self._ready.set()

    return _ForwardTrack


@final
class Publication:
    """A track a participant publishes, from ``AddTrackRequest`` to its end."""

    def __init__(self, info: models.TrackInfo, cid: str) -> None:
        self.info = info
        self.cid = cid
        self.source: Any = None  # aiortc's RemoteStreamTrack, once media arrived
        self.transceiver: Any = None
        self.forwards: dict[str, Any] = {}  # by subscriber identity
        self.ever_subscribed = False

    @property
    def sid(self) -> str:
        return self.info.sid

    @property
    def kind(self) -> str:
        return "audio" if self.info.type == models.AUDIO else "video"

    async def pump(self, host: MediaHost) -> None:
        """Read the publisher's frames as long as they come; hand each to every subscriber."""
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await host.call(self.source.recv)
            except (MediaStreamError, trio.ClosedResourceError):
                return
            for forward in list(self.forwards.values()):
                host.call_soon(forward.push, frame)

    def sending(self) -> bool:
        """Whether the client still sends this track (it renegotiates a removed one away)."""
        transceiver = self.transceiver
        return transceiver is None or transceiver._offerDirection in ("recvonly", "sendrecv")


@final
class SubscriberPeer:
    """The peer connection the server offers a participant, carrying what it subscribes to.

    Negotiation is one offer at a time: a change while an offer is out is offered again once
    the answer is in.
    """

    def __init__(self, host: MediaHost, session: Session) -> None:
        self._host = host
        self._session = session
        self.pc: Any = None
        self.transceivers: dict[str, Any] = {}  # what it sends, by track sid
        self._stopped: dict[str, Any] = {}  # what it sent, by track sid
        """A track subscribed again reuses its transceiver (its mid and stream): the SDK then
        keeps its track and sees no new ``track_subscribed``, as with livekit-server."""
        self._offer_out = False
        self._again = False
        self._offer_id = 0
        self._started: trio.Event | None = None

    async def start(self) -> None:
        """Make the peer connection, once; concurrent callers (the participant's own
        ``UpdateSubscription``, another's publication, Twirp) wait for the first."""
        if self._started is None:
            self._started = trio.Event()
            try:
                self.pc = await self._host.call(_new_subscriber_pc)
            finally:
                self._started.set()
        await self._started.wait()
        if self.pc is None:
            raise trio.ClosedResourceError("the subscriber peer connection did not start")

    async def add(self, publication: Publication, publisher_sid: str, forward: Any) -> None:
        await self.start()
        stopped = self._stopped.pop(publication.sid, None)
        if stopped is not None:
            await self._host.call(_resume_sending, stopped, forward)
            self.transceivers[publication.sid] = stopped
        else:
            self.transceivers[publication.sid] = await self._host.call(
                _add_sender, self.pc, forward, f"{publisher_sid}|{publication.sid}")
        await self.negotiate()

    async def remove(self, track_sid: str) -> None:
        transceiver = self.transceivers.pop(track_sid, None)
        if transceiver is None:
            return
        await self._host.call(_stop_sending, transceiver)
        self._stopped[track_sid] = transceiver
        await self.negotiate()

    async def negotiate(self) -> None:
        if self._offer_out:
            self._again = True
            return
        self._offer_out = True
        self._offer_id += 1
        sdp = await self._host.call(_make_offer, self.pc)
        self._session.post(rtc_proto.SignalResponse(offer=rtc_proto.SessionDescription(
            type="offer", sdp=sdp, id=self._offer_id)))

    async def answered(self, sdp: str) -> None:
        if not self._offer_out:
            logger.debug("participant %s: an answer without an offer ignored",
                          self._session.identity)
            return
        await self._host.call(_take_answer, self.pc, sdp)
        self._offer_out = False
        if self._again:
            self._again = False
            await self.negotiate()

    async def add_candidate(self, candidate_init: str) -> None:
        from ._media import _add_candidate

        await self._host.call(_add_candidate, self.pc, candidate_init)

    async def aclose(self) -> None:
        pc, self.pc = self.pc, None
        if pc is None:
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
            try:
                await self._host.call(pc.close)
            except (trio.ClosedResourceError, RuntimeError) as exc:
                logger.debug("closing a subscriber peer connection: %r", exc)


async def _new_subscriber_pc() -> RTCPeerConnection:
    from aiortc import RTCConfiguration, RTCPeerConnection

    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def _add_sender(pc: RTCPeerConnection, track: Any, stream_id: str) -> Any:
    transceiver = pc.addTransceiver(track, direction="sendonly")
    transceiver.sender._stream_id = stream_id  # what the SDKs map to participant|track
    return transceiver


async def _resume_sending(transceiver: Any, track: Any) -> None:
    transceiver.direction = "sendonly"
    transceiver.sender.replaceTrack(track)


async def _stop_sending(transceiver: Any) -> None:
    track = transceiver.sender.track
    transceiver.direction = "inactive"
    transceiver.sender.replaceTrack(None)
    if track is not None:
        track.stop()


async def _make_offer(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    offer: str = pc.localDescription.sdp
    return offer


async def _take_answer(pc: RTCPeerConnection, sdp: str) -> None:
    from aiortc import RTCSessionDescription

    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))


@final
class Tracks:
    """What the server's API does to tracks (``MutePublishedTrack``, ``UpdateSubscriptions``):
    ``DevServer``'s way into this module."""

    def __init__(self, nursery: trio.Nursery, rooms: Rooms, *,
                 enable_remote_unmute: bool) -> None:
        self._nursery = nursery
        self._rooms = rooms
        self.enable_remote_unmute = enable_remote_unmute

    async def mute_published_track(self, room: str, identity: str, track_sid: str,
                                   muted: bool) -> models.TrackInfo | None:
        """``MutePublishedTrack``: the publisher gets a ``mute`` request, and everyone a
        ``ParticipantUpdate`` if the track's state changed. The track's info, or ``None`` if
        the participant publishes no such track (not an error, as on livekit-server).

        Unmuting is refused (``failed_precondition``) unless the server was opened with
        ``enable_remote_unmute`` (``room.enable_remote_unmute`` of livekit-server).
        """
        session = self._rooms._rtc_participant(room, identity)
        if not muted and not self.enable_remote_unmute:
            raise TwirpError("failed_precondition", "remote unmute not enabled")
        if session is None:  # simulated: it publishes no real track
            return None
        return set_muted(self._rooms, session, track_sid, muted, from_admin=True)

    async def update_subscriptions(self, room: str, identity: str, track_sids: Iterable[str],
                                   *, subscribe: bool,
                                   participant_tracks: Iterable[models.ParticipantTracks] = ()
                                   ) -> None:
        """``UpdateSubscriptions``: subscribe the participant to the tracks (or unsubscribe
        it), as its own ``UpdateSubscription`` would; unknown sids are ignored. It happens
        in the participant's session, after this returns (livekit-server answers first too).
        """
        session = self._rooms._rtc_participant(room, identity)
        if session is None:
            return
        request = rtc_proto.UpdateSubscription(track_sids=list(track_sids), subscribe=subscribe,
                                               participant_tracks=list(participant_tracks))
        (session.nursery or self._nursery).start_soon(
            update_subscription, self._rooms, session, request)



# -- what participants do with tracks --------------------------------------------------------


def add_track(session: Session, request: rtc_proto.AddTrackRequest) -> None:
    """``AddTrackRequest``: a sid for the track, told at once; published when media comes."""
    from ._dispatch import new_id

    if not session.params.grants.can_publish:
        logger.info("participant %s may not publish (canPublish is false): track %r refused",
                    session.identity, request.name)
        return
    info = models.TrackInfo(
        sid=new_id("TR_"), type=request.type, name=request.name, source=request.source,
        muted=request.muted, width=request.width, height=request.height,
        disable_dtx=request.disable_dtx, stereo=request.stereo,
        encryption=request.encryption, stream=request.stream)
    session.pending_tracks[request.cid] = Publication(info, request.cid)
    session.post(rtc_proto.SignalResponse(track_published=rtc_proto.TrackPublishedResponse(
        cid=request.cid, track=info)))


async def media_arrived(dev: Rooms, session: Session, track: Any, transceiver: Any) -> None:
    """Media of a requested track arrived: it is published; subscribers get it."""
    publication = session.pending_tracks.pop(track.id, None)
    if publication is None:  # a client that names its track otherwise: the oldest of its kind
        publication = next((p for cid, p in session.pending_tracks.items()
                            if p.kind == track.kind), None)
        if publication is None:
            logger.info("participant %s sent a %s track it did not announce: ignored",
                        session.identity, track.kind)
            return
        del session.pending_tracks[publication.cid]
    publication.source, publication.transceiver = track, transceiver
    session.publications[publication.sid] = publication
    session.info.tracks.append(publication.info)
    session.info.is_publisher = True
    assert session.nursery is not None
    session.nursery.start_soon(publication.pump, dev.media, name=f"pump {publication.sid}")
    logger.debug("participant %s published %s track %s", session.identity, track.kind,
                 publication.sid)
    dev._participant_changed(session.room, session.info)
    await dev.publish_track(session.room.room.name, session.identity)  # PUBLISHER dispatch
    for other in list(session.room.sessions.values()):
        if other is not session and _auto_subscribes(other):
            await subscribe(dev, other, session, publication)


async def renegotiated(dev: Rooms, session: Session) -> None:
    """After a publisher offer: tracks it no longer sends are unpublished."""
    for publication in list(session.publications.values()):
        if not publication.sending():
            await unpublish(dev, session, publication)


async def unpublish(dev: Rooms, session: Session, publication: Publication) -> None:
    session.publications.pop(publication.sid, None)
    kept = [t for t in session.info.tracks if t.sid != publication.sid]
    del session.info.tracks[:]
    session.info.tracks.extend(kept)
    for identity in list(publication.forwards):
        subscriber = session.room.sessions.get(identity)
        if subscriber is not None:
            await unsubscribe(subscriber, publication.sid)
    logger.debug("participant %s unpublished track %s", session.identity, publication.sid)
    if not session.removed:
        dev._participant_changed(session.room, session.info)


async def subscribe(dev: Rooms, subscriber: Session, publisher: Session,
                    publication: Publication) -> None:
    if publication.sid in subscriber.subscriptions or subscriber.removed:
        return
    if not subscriber.params.grants.can_subscribe:
        return
    if subscriber.subscriber is None:
        subscriber.subscriber = SubscriberPeer(dev.media, subscriber)
    forward = forward_track(publication.kind, publication.sid)
    publication.forwards[subscriber.identity] = forward
    subscriber.subscriptions[publication.sid] = publication
    if not publication.ever_subscribed:  # ``OnTrackEverSubscribed``: the publisher is told once
        publication.ever_subscribed = True
        if _supports_track_subscribed(publisher.params.client):
            publisher.post(rtc_proto.SignalResponse(
                track_subscribed=rtc_proto.TrackSubscribed(track_sid=publication.sid)))
    await subscriber.subscriber.add(publication, publisher.info.sid, forward)


async def unsubscribe(subscriber: Session, track_sid: str) -> None:
    publication = subscriber.subscriptions.pop(track_sid, None)
    if publication is None:
        return
    forward = publication.forwards.pop(subscriber.identity, None)
    if forward is not None:
        forward.stop()
    if subscriber.subscriber is not None and not subscriber.removed:
        await subscriber.subscriber.remove(track_sid)


async def update_subscription(dev: Rooms, session: Session,
                              request: rtc_proto.UpdateSubscription) -> None:
    """``UpdateSubscription``: subscribe to or drop tracks by sid."""
    wanted = set(request.track_sids)
    for part in request.participant_tracks:
        wanted.update(part.track_sids)
    for sid in wanted:
        if not request.subscribe:
            await unsubscribe(session, sid)
            continue
        found = _find(session, sid)
        if found is not None:
            await subscribe(dev, session, *found)


def set_muted(dev: Rooms, session: Session, track_sid: str, muted: bool, *,
              from_admin: bool = False) -> models.TrackInfo | None:
    """A track muted or unmuted (by its publisher, or over Twirp): everyone is told, if it
    changed. Muted ``from_admin``, the publisher first gets a ``mute`` request (whatever the
    sid: ``SetTrackMuted`` sends it before looking the track up). The track's info, or
    ``None`` if the participant has no such track."""
    if from_admin:
        session.post(rtc_proto.SignalResponse(mute=rtc_proto.MuteTrackRequest(
            sid=track_sid, muted=muted)))
    publication = session.publications.get(track_sid)
    if publication is None:
        pending = next((p for p in session.pending_tracks.values() if p.sid == track_sid), None)
        if pending is None:
            return None
        pending.info.muted = muted
        return pending.info
    changed = publication.info.muted != muted
    publication.info.muted = muted
    for track in session.info.tracks:
        if track.sid == track_sid:
            track.muted = muted
    if changed:
        dev._participant_changed(session.room, session.info)
    return publication.info


async def joined(dev: Rooms, session: Session) -> None:
    """A new participant who auto-subscribes gets what the others already publish."""
    if not _auto_subscribes(session):
        return
    for other in list(session.room.sessions.values()):
        if other is not session:
            for publication in list(other.publications.values()):
                await subscribe(dev, session, other, publication)


async def session_ended(dev: Rooms, session: Session) -> None:
    """Its tracks end for their subscribers, and what it received stops being sent."""
    for publication in list(session.publications.values()):
        await unpublish(dev, session, publication)
    for sid in list(session.subscriptions):
        publication = session.subscriptions.pop(sid)
        forward = publication.forwards.pop(session.identity, None)
        if forward is not None:
            forward.stop()
    if session.subscriber is not None:
        await session.subscriber.aclose()


def _supports_track_subscribed(client: models.ClientInfo) -> bool:
    """``SupportTrackSubscribedEvent``: old Rust SDKs cannot decode ``TrackSubscribed``."""
    return not (client.sdk == models.ClientInfo.RUST and client.protocol < 10)


def _auto_subscribes(session: Session) -> bool:
    return (session.params.auto_subscribe and session.params.grants.can_subscribe
            and not session.removed)


def _find(session: Session, track_sid: str) -> tuple[Session, Publication] | None:
    for other in session.room.sessions.values():
        publication = other.publications.get(track_sid)
        if publication is not None and other is not session:
            return other, publication
    return None
