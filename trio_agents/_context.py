"""What a job sees: ``JobContext`` (one per job) and ``JobProcess`` (one per job process).

Both are built by the job process (``_child``), never by user code. The entrypoint receives
the ``JobContext`` as its argument; ``get_job_context()`` is a convenience for code that has no
way to be handed it (it reads a context variable set around the entrypoint).
"""

from __future__ import annotations

import contextvars
import enum
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, final, overload

import trio
from livekit.protocol import agent, models

from ._jobs import JobAcceptArguments, RunningJobInfo
from ._options import JobExecutorType

logger = logging.getLogger("trio_agents.job")

#: ``cb()`` or ``cb(reason)``, async; any callable (``functools.partial``, bound methods, objects).
ShutdownCallback = Callable[..., Awaitable[None]]

if TYPE_CHECKING:
    from livekit import rtc
    from livekit.protocol import sip

    from ._room import Bridge, LocalParticipant, Room
    from .api import LiveKitAPI


class AutoSubscribe(str, enum.Enum):
    """Which tracks ``ctx.connect()`` subscribes to (the SDK's ``auto_subscribe`` and more)."""

    SUBSCRIBE_ALL = "subscribe_all"
    SUBSCRIBE_NONE = "subscribe_none"
    AUDIO_ONLY = "audio_only"
    VIDEO_ONLY = "video_only"


class ParticipantKind(enum.IntEnum):
    """``rtc.ParticipantKind`` values, usable without the rtc extra."""

    STANDARD = 0
    INGRESS = 1
    EGRESS = 2
    SIP = 3
    AGENT = 4
    CONNECTOR = 5
    BRIDGE = 6


#: The kinds ``wait_for_participant`` and participant entrypoints accept by default.
DEFAULT_PARTICIPANT_KINDS: Final = (ParticipantKind.CONNECTOR, ParticipantKind.SIP,
                                    ParticipantKind.STANDARD)
#: ``ParticipantInfo.State.ACTIVE``: WebRTC is up, data can flow.
_ACTIVE: Final = 2

#: ``fnc(ctx, participant)``, run for each matching participant.
ParticipantEntrypoint = Callable[["JobContext", "rtc.RemoteParticipant"], Awaitable[None]]


@final
class JobProcess:
    """The process (or thread, with ``JobExecutorType.THREAD``) a job runs in.

    ``setup_fnc(proc)`` runs once per process before any job; keep what it prepares (models,
    clients) in ``userdata``, where the entrypoint finds it as ``ctx.proc.userdata``.
    """

    def __init__(self, *, executor_type: JobExecutorType, http_proxy: str | None,
                 start_arguments: object = None) -> None:
        self._executor_type = executor_type
        self._http_proxy = http_proxy
        self._start_arguments = start_arguments
        self._userdata: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def userdata(self) -> dict[str, Any]:
        return self._userdata

    @property
    def start_arguments(self) -> object:
        """An opaque value given to the process at start (``None`` unless set by the caller)."""
        return self._start_arguments

    @property
    def http_proxy(self) -> str | None:
        return self._http_proxy

    @property
    def executor_type(self) -> JobExecutorType:
        return self._executor_type

    def __repr__(self) -> str:
        return f"<JobProcess pid={self.pid} executor={self._executor_type.value}>"


@final
class JobContext:
    """The job the entrypoint runs: ``ctx.job`` (the ``agent.Job``), ``ctx.proc``, the room and
    publisher it is for, and the ways to end it.

    The job ends when it calls ``ctx.shutdown(reason)``, when the server asks (termination by
    LiveKit, server shutdown), when its room disconnects, or when the entrypoint returns
    without having connected (once connected, the job stays in the room after the entrypoint
    returns, as in livekit-agents). Then ``on_session_end`` (bounded by
    ``session_end_timeout``) runs, the room is left, and every shutdown callback runs (each
    bounded, all of them even if one fails).
    """

    def __init__(
        self,
        *,
        proc: JobProcess,
        info: RunningJobInfo,
        on_shutdown: Callable[[str], None],
        api_credentials: tuple[str, str, str] = ("", "", ""),
        services: trio.Nursery | None = None,
        on_room_closed: Callable[[str], None] | None = None,
        abandon_pending_connects: bool = True,
    ) -> None:
        self._proc = proc
        self._info = info
        self._on_shutdown = on_shutdown
        self._callbacks: list[ShutdownCallback] = []
        self._log_fields: dict[str, Any] = {}
        self._credentials = api_credentials
        self._api: LiveKitAPI | None = None
        self._services = services
        self._on_room_closed = on_room_closed
        self._abandon = abandon_pending_connects
        self._room: Room | None = None
        self._bridge: Bridge | None = None
        self._connect_lock = trio.Lock()
        self._connected_once = False
        self._participant_entrypoints: list[tuple[ParticipantEntrypoint, frozenset[int]]] = []
        self._participant_tasks: set[tuple[str, ParticipantEntrypoint]] = set()

    # -- the job ------------------------------------------------------------------------------

    @property
    def proc(self) -> JobProcess:
        return self._proc

    @property
    def job(self) -> agent.Job:
        return self._info.job

    @property
    def info(self) -> RunningJobInfo:
        """The accepted job as the server received it (url, token, timestamps)."""
        return self._info

    @property
    def worker_id(self) -> str:
        return self._info.worker_id

    @property
    def room_name(self) -> str:
        return self._info.job.room.name

    @property
    def publisher(self) -> models.ParticipantInfo | None:
        """The publisher a ``ServerType.PUBLISHER`` job is for (``None`` for room jobs)."""
        job = self._info.job
        return job.participant if job.HasField("participant") else None

    @property
    def accept_arguments(self) -> JobAcceptArguments:
        """Name, identity, metadata and attributes the agent joins the room with."""
        return self._info.accept_arguments

    @property
    def metadata(self) -> str:
        """The dispatch metadata (``job.metadata``)."""
        return self._info.job.metadata

    # -- the room -----------------------------------------------------------------------------

    @property
    def room(self) -> Room:
        """The job's room (``trio_agents.room.Room``); connected by ``await ctx.connect()``.

        Register callbacks on it (``ctx.room.on(...)``) before connecting if you like.
        """
        if self._room is None:
            from .room import Room

            self._room = Room(name=self._info.job.room.name or None)
            self._room.on("disconnected", self._room_disconnected)
        return self._room

    @property
    def agent(self) -> LocalParticipant:
        """The agent's own participant in the room (after ``connect``)."""
        return self.room.local_participant

    def is_connected(self) -> bool:
        return self._room is not None and self._room.isconnected()

    async def connect(self, *, auto_subscribe: AutoSubscribe = AutoSubscribe.SUBSCRIBE_ALL,
                      e2ee: rtc.E2EEOptions | None = None,
                      rtc_config: rtc.RtcConfiguration | None = None) -> None:
        """Join the job's room as the agent (with the job's token). Idempotent.

        Cancel-safe: cancelled half-way, it leaves nothing connected behind. Once connected,
        the job lasts until ``shutdown()``, a termination, or the room disconnecting.
        Raises ``trio_agents.RoomConnectError`` if the room cannot be joined and
        ``MissingExtraError`` without the rtc extra.
        """
        room = self.room
        auto_subscribe = AutoSubscribe(auto_subscribe)
        async with self._connect_lock:
            if room.isconnected():
                return
            if self._connected_once:
                raise RuntimeError("the job's room has disconnected; a job joins its room once")
            from ._room import room_options

            bridge = await self._open_bridge()
            info = self._info
            url = info.url or self._credentials[0]
            await room.connect(bridge, url, info.token, room_options(
                auto_subscribe=auto_subscribe == AutoSubscribe.SUBSCRIBE_ALL, e2ee=e2ee,
                rtc_config=rtc_config))
            self._connected_once = True
        logger.debug("connected to room %s as %s", room.name, room.local_participant.identity)
        if auto_subscribe in (AutoSubscribe.AUDIO_ONLY, AutoSubscribe.VIDEO_ONLY):
            self._subscribe_by_kind(auto_subscribe)
        room.on("participant_connected", self._participant_joined)
        for participant in list(room.remote_participants.values()):
            self._participant_joined(participant)

    async def _open_bridge(self) -> Bridge:
        if self._bridge is None:
            if self._services is None:
                raise RuntimeError("this JobContext was not made by a job process; it has no "
                                   "room to connect to")
            self._bridge = await self._services.start(self._run_bridge)
        return self._bridge

    async def _run_bridge(self, *, task_status: trio.TaskStatus[Bridge]) -> None:
        from ._room import open_bridge

        async with open_bridge(abandon_pending=self._abandon) as bridge:
            task_status.started(bridge)
            await trio.sleep_forever()

    def _room_disconnected(self, reason: int) -> None:
        room = self._room
        if room is None or room.closed_by_us or self._on_room_closed is None:
            return
        from livekit import rtc

        try:
            name = rtc.DisconnectReason.Name(reason)  # type: ignore[arg-type]
        except ValueError:
            name = str(reason)
        self._on_room_closed(f"room disconnected ({name})")

    async def close_room(self) -> None:
        """Leave the room if connected (the job's end does this; no need to call it)."""
        if self._room is not None:
            await self._room.disconnect()

    def _subscribe_by_kind(self, mode: AutoSubscribe) -> None:
        from livekit import rtc

        wanted = (rtc.TrackKind.KIND_AUDIO if mode == AutoSubscribe.AUDIO_ONLY
                  else rtc.TrackKind.KIND_VIDEO)

        def published(publication: rtc.RemoteTrackPublication, _: object = None) -> None:
            if publication.kind == wanted:
                publication.set_subscribed(True)

        room = self.room
        room.on("track_published", published)
        for participant in room.remote_participants.values():
            for publication in participant.track_publications.values():
                published(publication)

    # -- participants -------------------------------------------------------------------------

    async def wait_for_participant(
        self, *, identity: str | None = None,
        kind: int | Iterable[int] = DEFAULT_PARTICIPANT_KINDS,
    ) -> rtc.RemoteParticipant:
        """The first remote participant (``identity``, if given) of one of ``kind`` whose
        WebRTC connection is up; one already in the room is returned at once.

        Connects first if needed. Raises ``RuntimeError`` if the room disconnects meanwhile.
        """
        await self.connect()
        kinds = _kinds(kind)
        room = self.room

        def matches(p: rtc.RemoteParticipant) -> bool:
            return ((identity is None or p.identity == identity) and int(p.kind) in kinds
                    and int(p.state) == _ACTIVE)

        with room.events("participant_connected", "participant_active",
                         "disconnected") as events:
            for participant in room.remote_participants.values():
                if matches(participant):
                    return participant
            async for event in events:
                if event.type == "disconnected":
                    break
                if matches(event.args[0]):
                    return event.args[0]  # type: ignore[no-any-return]
        raise RuntimeError("the room disconnected while waiting for a participant"
                           + (f" ({identity!r})" if identity else ""))

    def add_participant_entrypoint(self, entrypoint_fnc: ParticipantEntrypoint, *_: object,
                                   kind: int | Iterable[int] = DEFAULT_PARTICIPANT_KINDS) -> None:
        """Run ``await entrypoint_fnc(ctx, participant)`` for every participant of ``kind``:
        those in the room when ``connect()`` joins it and those who join later (once per
        participant at a time; cancelled when the room is left; errors logged).

        Register before ``connect()``: registered later, it runs only for participants who
        join afterwards (as in livekit-agents).
        """
        if any(fnc is entrypoint_fnc for fnc, _ in self._participant_entrypoints):
            raise ValueError(f"participant entrypoint {entrypoint_fnc!r} is already registered")
        if not callable(entrypoint_fnc):
            raise TypeError(f"participant entrypoint {entrypoint_fnc!r} is not callable")
        self._participant_entrypoints.append((entrypoint_fnc, _kinds(kind)))

    def _participant_joined(self, participant: rtc.RemoteParticipant) -> None:
        for entry in self._participant_entrypoints:
            self._start_participant_entry(entry, participant)

    def _start_participant_entry(self, entry: tuple[ParticipantEntrypoint, frozenset[int]],
                                 participant: rtc.RemoteParticipant) -> None:
        fnc, kinds = entry
        if int(participant.kind) not in kinds:
            return
        key = (participant.identity, fnc)
        if key in self._participant_tasks:
            logger.warning("participant entrypoint %r is still running for %s; not starting "
                           "another", fnc, participant.identity)
            return
        self._participant_tasks.add(key)
        name = getattr(fnc, "__name__", repr(fnc))
        self.room.start_task(self._run_participant_entry, key, participant,
                             name=f"participant entrypoint {name} for {participant.identity}")

    async def _run_participant_entry(self, key: tuple[str, ParticipantEntrypoint],
                                     participant: rtc.RemoteParticipant) -> None:
        try:
            await key[1](self, participant)
        finally:
            self._participant_tasks.discard(key)

    # -- logging ------------------------------------------------------------------------------

    @property
    def log_context_fields(self) -> dict[str, Any]:
        """Fields added to every log record of this job (on top of job_id, room, agent_name)."""
        return self._log_fields

    @log_context_fields.setter
    def log_context_fields(self, fields: Mapping[str, Any]) -> None:
        self._log_fields = dict(fields)

    # -- ending the job -----------------------------------------------------------------------

    def shutdown(self, reason: str = "") -> None:
        """End the job: the entrypoint is cancelled, then the shutdown sequence runs."""
        self._on_shutdown(reason)

    def add_shutdown_callback(self, callback: ShutdownCallback) -> None:
        """Run ``await callback()`` or ``await callback(reason)`` when the job ends.

        Any callable works (functions, bound methods, ``functools.partial``, objects with an
        async ``__call__``); whether it takes the reason is read from its signature.
        """
        if not callable(callback):
            raise TypeError(f"shutdown callback {callback!r} is not callable")
        _takes_reason(callback)  # fail here, not at shutdown, if the signature is unusable
        self._callbacks.append(callback)

    @property
    def shutdown_callbacks(self) -> list[ShutdownCallback]:
        return list(self._callbacks)

    # -- LiveKit API --------------------------------------------------------------------------

    @property
    def api(self) -> LiveKitAPI:
        """A ``trio_agents.api.LiveKitAPI`` for the server the job came from, with the agent
        server's credentials (made on first use, so a job that never calls the API never
        imports httpx). The same URL, key and secret are in the job process's environment as
        ``LIVEKIT_URL``, ``LIVEKIT_API_KEY`` and ``LIVEKIT_API_SECRET``."""
        if self._api is None:
            from .api import LiveKitAPI

            url, key, secret = self._credentials
            self._api = LiveKitAPI(url, key, secret)
        return self._api

    async def delete_room(self, room_name: str | None = None) -> None:
        """Delete the job's room (or ``room_name``); a room that is already gone is fine."""
        from livekit.protocol import room

        from .api import TwirpError

        try:
            await self.api.room.delete_room(room.DeleteRoomRequest(room=room_name or self.room_name))
        except TwirpError as exc:
            if exc.code != "not_found":
                raise

    async def add_sip_participant(self, *, call_to: str, trunk_id: str,
                                  participant_identity: str,
                                  participant_name: str = "SIP-participant"
                                  ) -> sip.SIPParticipantInfo:
        """Dial ``call_to`` (``+15550100`` or ``sip:user@host``) through the outbound trunk
        ``trunk_id`` into the job's room, as ``participant_identity``.

        Needs an outbound SIP trunk in LiveKit. Raises ``trio_agents.api.SIPError`` (an
        unknown trunk is ``not_found``).
        """
        from livekit.protocol import sip

        return await self.api.sip.create_sip_participant(sip.CreateSIPParticipantRequest(
            room_name=self.room_name, participant_identity=participant_identity,
            sip_trunk_id=trunk_id, sip_call_to=call_to, participant_name=participant_name))

    async def transfer_sip_participant(self, participant: rtc.RemoteParticipant | str,
                                       transfer_to: str, play_dialtone: bool = False
                                       ) -> sip.SIPParticipantInfo:
        """Transfer the caller ``participant`` (a SIP participant of the job's room, or its
        identity) to ``transfer_to`` (``tel:+15550100`` or ``sip:user@host``); returns when
        the transfer is done. Needs call transfer enabled on the SIP trunk.

        Raises ``ValueError`` for a participant that is not a SIP one, and
        ``trio_agents.api.SIPError`` when LiveKit refuses.
        """
        from livekit.protocol import sip

        if isinstance(participant, str):
            identity = participant
        else:
            if int(participant.kind) != ParticipantKind.SIP:
                raise ValueError(f"participant {participant.identity!r} is not a SIP "
                                 "participant; only callers can be transferred")
            identity = participant.identity
        return await self.api.sip.transfer_sip_participant(sip.TransferSIPParticipantRequest(
            room_name=self.room_name, participant_identity=identity, transfer_to=transfer_to,
            play_dialtone=play_dialtone))

    def __repr__(self) -> str:
        return f"<JobContext job={self.job.id} room={self.room_name!r}>"


def _kinds(kind: int | Iterable[int]) -> frozenset[int]:
    return frozenset([int(kind)] if isinstance(kind, int) else (int(k) for k in kind))


def _takes_reason(callback: Callable[..., object]) -> bool:
    """Whether ``callback`` accepts one positional argument (the reason)."""
    try:
        sig = inspect.signature(callback)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the signature of shutdown callback {callback!r}") from exc
    try:
        sig.bind("reason")
        return True
    except TypeError:
        pass
    try:
        sig.bind()
    except TypeError as exc:
        raise TypeError(
            f"shutdown callback {callback!r} must take no argument or one (the reason)"
        ) from exc
    return False


async def call_shutdown_callback(callback: ShutdownCallback, reason: str) -> None:
    if _takes_reason(callback):
        await callback(reason)
    else:
        await callback()


_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("trio_agents_job_context")


@overload
def get_job_context() -> JobContext: ...
@overload
def get_job_context(*, required: Literal[True]) -> JobContext: ...
@overload
def get_job_context(*, required: bool) -> JobContext | None: ...


def get_job_context(*, required: bool = True) -> JobContext | None:
    """The ``JobContext`` of the job running this code.

    Prefer the ``ctx`` argument of the entrypoint; this is for code that cannot be handed it.
    Raises ``RuntimeError`` outside a job unless ``required=False`` (then returns ``None``).
    """
    ctx = _current.get(None)
    if ctx is None and required:
        raise RuntimeError("no job is running here: get_job_context() works only inside a job "
                           "(the entrypoint and what it calls)")
    return ctx


def set_job_context(ctx: JobContext) -> contextvars.Token[JobContext]:
    return _current.set(ctx)
