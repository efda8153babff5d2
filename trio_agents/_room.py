"""The room, from trio: LiveKit's realtime SDK under trio-asyncio.

The SDK (``livekit.rtc``) is asyncio over a native WebRTC client. Here it runs on an asyncio
loop that trio-asyncio drives from inside the trio run (``open_bridge``: one per job, or one
per ``open_room`` block), and this module gives it a trio face:

* ``Room`` owns one SDK room once connected; its events reach trio as memory channels
  (``room.events()``) or callbacks (``room.on``, sync or async); the tasks it starts (async
  callbacks, stream and RPC handlers) live in a nursery of its own that ends with the room.
* ``LocalParticipant`` exposes the SDK's coroutines as trio functions; RPC handlers are trio
  functions.

Connecting is cancel-safe. Cancelling the trio side of ``Room.connect`` does not stop the
native connect, which goes on trying; if it then succeeded with nobody watching, the native
library would panic later and the SDK would SIGTERM its own process. So a cancelled connect is
handed to the bridge, which waits for the native side to settle and disconnects it. At the
end of a job the bridge may instead abandon it (``abandon_pending``): the job process is about
to exit, and the native client dies with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import typing
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, ClassVar, Final, Generic, TypeVar, final

import attrs
import trio
import trio_asyncio
from livekit import rtc
from livekit.rtc.room import EventTypes

from ._errors import RoomConnectError
from ._util import open_aio_loop, reraise_unwrapped, sole_error

if typing.TYPE_CHECKING:
    from ._media import AudioStream, VideoStream

logger = logging.getLogger("trio_agents.room")

T = TypeVar("T")
Chunk = TypeVar("Chunk", str, bytes)

#: Every event the SDK's ``rtc.Room`` emits.
EVENT_TYPES: Final[frozenset[str]] = frozenset(typing.get_args(EventTypes))
#: How long a disconnect may take before we stop waiting for the native side.
DISCONNECT_TIMEOUT: Final = 10.0
#: How long a cancelled connect may go on settling before its owner stops waiting (the native
#: client retries for up to a minute).
SETTLE_TIMEOUT: Final = 60.0

RpcHandler = Callable[[rtc.RpcInvocationData], Awaitable[str]]


@final
class Bridge:
    """An asyncio loop on trio (trio-asyncio) and a nursery for what must outlive a caller."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nursery: trio.Nursery, *,
                 abandon_pending: bool) -> None:
        self.loop = loop
        self.nursery = nursery
        self.abandon_pending = abandon_pending
        self.rooms: set[Room] = set()
        #: Media streams still open (closed when the bridge ends: no native handle outlives it).
        self.closers: set[Any] = set()

    _by_loop: ClassVar[weakref.WeakValueDictionary[asyncio.AbstractEventLoop, Bridge]] = (
        weakref.WeakValueDictionary())

    @classmethod
    def of_loop(cls, loop: asyncio.AbstractEventLoop) -> Bridge | None:
        """The bridge that runs ``loop``, if it is one of ours."""
        return cls._by_loop.get(loop)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` on the asyncio loop; cancelling us cancels it there."""
        result: T = await self.loop.run_aio_coroutine(fn(*args, **kwargs))  # type: ignore[attr-defined]
        return result

    def as_aio(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """A trio async function made callable (and awaitable) from asyncio code."""
        wrapped: Callable[..., Awaitable[T]] = trio_asyncio.trio_as_aio(fn, loop=self.loop)
        return wrapped


@contextlib.asynccontextmanager
async def open_bridge(*, abandon_pending: bool = False) -> AsyncIterator[Bridge]:
    """Run an asyncio loop for the SDK for the duration of the block.

    On leaving, rooms still connected are left, and connects that were cancelled but are
    still settling are waited for (up to ``SETTLE_TIMEOUT``) and then left, unless
    ``abandon_pending`` (for a process that exits right after, taking the native client along).
    """
    body_error: BaseException | None = None
    try:
        async with open_aio_loop() as loop, trio.open_nursery() as nursery:
            bridge = Bridge(loop, nursery, abandon_pending=abandon_pending)
            Bridge._by_loop[loop] = bridge
            try:
                yield bridge
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                from ._media import close_all

                await close_all(bridge.closers)
                for room in list(bridge.rooms):
                    await room.disconnect()
                if abandon_pending:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if body_error is None or sole_error(group) is not body_error:
            raise
        reraise_unwrapped(body_error)  # the caller's own error, not a group of one


@final
@attrs.frozen
class RoomEvent:
    """One event of the room: ``type`` is the SDK's event name, ``args`` what it carries.

    For example ``participant_connected`` → ``(participant,)``, ``data_received`` →
    ``(rtc.DataPacket,)``, ``participant_metadata_changed`` → ``(participant, old, new)``,
    ``participant_attributes_changed`` → ``(changed, participant)``,
    ``room_metadata_changed`` → ``(old, new)``, ``disconnected`` → ``(reason,)``.
    """

    type: str
    args: tuple[Any, ...]


class _Stream(Generic[Chunk]):
    def __init__(self, bridge: Bridge, reader: Any) -> None:
        self._bridge = bridge
        self._reader = reader

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        chunks = self._reader.__aiter__()
        while True:
            try:
                yield await self._bridge.call(chunks.__anext__)
            except StopAsyncIteration:
                return


@final
class TextStream(_Stream[str]):
    """An incoming text stream (``room.register_text_stream_handler``), read from trio:
    ``await stream.read_all()`` or ``async for chunk in stream``."""

    @property
    def info(self) -> rtc.TextStreamInfo:
        info: rtc.TextStreamInfo = self._reader.info
        return info

    async def read_all(self) -> str:
        return "".join([chunk async for chunk in self])


@final
class ByteStream(_Stream[bytes]):
    """An incoming byte stream (``room.register_byte_stream_handler``), read from trio."""

    @property
    def info(self) -> rtc.ByteStreamInfo:
        info: rtc.ByteStreamInfo = self._reader.info
        return info

    async def read_all(self) -> bytes:
        return b"".join([chunk async for chunk in self])


def _trio_member(bridge: Bridge, sdk: object, name: str) -> Any:
    """``sdk.<name>`` for trio: coroutine methods become trio functions run on the bridge's
    loop; objects the SDK hands back to be used with ``await`` (stream writers) are wrapped
    the same way; properties and sync methods are returned as they are."""
    if name.startswith("_"):
        raise AttributeError(name)
    value = getattr(sdk, name)
    if not inspect.iscoroutinefunction(value):
        return value

    @functools.wraps(value)
    async def trio_method(*args: Any, **kwargs: Any) -> Any:
        result = await bridge.call(value, *args, **kwargs)
        return AioObject(bridge, result) if _has_coroutines(result) else result

    return trio_method


def _has_coroutines(obj: object) -> bool:
    return not isinstance(obj, (str, bytes, int, float, type(None), rtc.TrackPublication)) and any(
        inspect.iscoroutinefunction(getattr(type(obj), n, None))
        for n in dir(type(obj)) if not n.startswith("_"))


@final
class AioObject:
    """An SDK object (e.g. the writer of ``stream_text``) whose coroutine methods are trio
    functions here; everything else is the object's own. ``aio_object`` is the object."""

    def __init__(self, bridge: Bridge, obj: object) -> None:
        self._bridge = bridge
        self.aio_object = obj

    def __getattr__(self, name: str) -> Any:
        return _trio_member(self._bridge, self.aio_object, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self.aio_object)))

    async def __aenter__(self) -> AioObject:
        return self

    async def __aexit__(self, *_: object) -> None:
        if hasattr(self.aio_object, "aclose"):
            await self._bridge.call(self.aio_object.aclose)

    def __repr__(self) -> str:
        return f"<trio face of {self.aio_object!r}>"


@final
class LocalParticipant:
    """The agent in the room: the SDK's local participant with trio methods."""

    def __init__(self, room: Room, bridge: Bridge, sdk: rtc.LocalParticipant) -> None:
        self._room = room
        self._bridge = bridge
        self._sdk = sdk

    @property
    def identity(self) -> str:
        return self._sdk.identity

    @property
    def sid(self) -> str:
        return self._sdk.sid

    @property
    def name(self) -> str:
        return self._sdk.name

    @property
    def metadata(self) -> str:
        return self._sdk.metadata

    @property
    def attributes(self) -> dict[str, str]:
        return dict(self._sdk.attributes)

    @property
    def kind(self) -> int:
        return int(self._sdk.kind)

    @property
    def rtc_participant(self) -> rtc.LocalParticipant:
        """The SDK object, for what this face does not cover (``room.aio`` runs its coroutines)."""
        return self._sdk

    async def publish_data(self, payload: bytes | str, *, reliable: bool = True,
                           destination_identities: Iterable[str] = (), topic: str = "") -> None:
        await self._bridge.call(self._sdk.publish_data, payload, reliable=reliable,
                                destination_identities=list(destination_identities), topic=topic)

    async def send_text(self, text: str, *, topic: str = "",
                        destination_identities: Iterable[str] | None = None,
                        attributes: Mapping[str, str] | None = None) -> rtc.TextStreamInfo:
        return await self._bridge.call(
            self._sdk.send_text, text, topic=topic,
            destination_identities=None if destination_identities is None
            else list(destination_identities),
            attributes=None if attributes is None else dict(attributes))

    async def send_bytes(self, data: bytes, *, topic: str = "", name: str | None = None,
                         mime_type: str | None = None,
                         destination_identities: Iterable[str] | None = None,
                         attributes: Mapping[str, str] | None = None) -> rtc.ByteStreamInfo:
        return await self._bridge.call(
            self._sdk.send_bytes, data, topic=topic, name=name, mime_type=mime_type,
            destination_identities=None if destination_identities is None
            else list(destination_identities),
            attributes=None if attributes is None else dict(attributes))

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None) -> str:
        """Call ``method`` on another participant; raises ``rtc.RpcError`` as the SDK does."""
        return await self._bridge.call(self._sdk.perform_rpc,
                                       destination_identity=destination_identity,
                                       method=method, payload=payload,
                                       response_timeout=response_timeout)

    @typing.overload
    def register_rpc_method(self, method: str) -> Callable[[RpcHandler], RpcHandler]: ...
    @typing.overload
    def register_rpc_method(self, method: str, handler: RpcHandler) -> RpcHandler: ...

    def register_rpc_method(self, method: str, handler: RpcHandler | None = None
                            ) -> RpcHandler | Callable[[RpcHandler], RpcHandler]:
        """Answer calls of ``method`` with ``await handler(data)`` (a trio function returning
        the response payload; raise ``rtc.RpcError`` to answer with an error). A decorator
        when ``handler`` is left out."""
        def register(fn: RpcHandler) -> RpcHandler:
            if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(
                    getattr(fn, "__call__", None)):
                raise TypeError(f"RPC handler {fn!r} for {method!r} must be an async function")
            self._sdk.register_rpc_method(method, self._bridge.as_aio(fn))
            return fn

        return register if handler is None else register(handler)

    def unregister_rpc_method(self, method: str) -> None:
        self._sdk.unregister_rpc_method(method)

    async def set_metadata(self, metadata: str) -> None:
        await self._bridge.call(self._sdk.set_metadata, metadata)

    async def set_name(self, name: str) -> None:
        await self._bridge.call(self._sdk.set_name, name)

    async def set_attributes(self, attributes: Mapping[str, str]) -> None:
        await self._bridge.call(self._sdk.set_attributes, dict(attributes))

    # -- media --------------------------------------------------------------------------------

    @property
    def track_publications(self) -> Mapping[str, rtc.LocalTrackPublication]:
        """The agent's published tracks, by track sid (the SDK's objects, always current)."""
        return self._sdk.track_publications

    async def publish_track(self, track: rtc.LocalTrack, options: rtc.TrackPublishOptions | None
                            = None) -> rtc.LocalTrackPublication:
        """Publish a local track (``rtc.LocalAudioTrack.create_audio_track(name, source)`` with
        a ``trio_agents.room.AudioSource``, or a video track) and wait until LiveKit has it."""
        return await self._bridge.call(self._sdk.publish_track, track,
                                       options if options is not None else rtc.TrackPublishOptions())

    async def unpublish_track(self, track_sid: str) -> None:
        await self._bridge.call(self._sdk.unpublish_track, track_sid)

    # -- everything else of rtc.LocalParticipant ----------------------------------------------

    def __getattr__(self, name: str) -> Any:
        """The rest of ``rtc.LocalParticipant``: its coroutine methods as trio functions
        (``stream_text``, ``send_file``, ``publish_dtmf``, ...), its properties as they are."""
        return _trio_member(self._bridge, self._sdk, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {n for n in dir(self._sdk) if not n.startswith("_")})

    def __repr__(self) -> str:
        return f"<LocalParticipant identity={self.identity!r}>"


EventCallback = Callable[..., object]
C = TypeVar("C", bound=EventCallback)


@final
class Room:
    """A LiveKit room joined through the realtime SDK, driven from trio.

    Callbacks (``on``) and stream handlers can be registered before connecting. After
    ``disconnect`` (or a disconnect by the server) event channels end and the room's tasks are
    cancelled; a ``Room`` connects once.
    """

    def __init__(self, *, name: str | None = None) -> None:
        self._name = name  # known before connecting when a job made us (the job's room)
        self._sdk: rtc.Room | None = None
        self._bridge: Bridge | None = None
        self._local: LocalParticipant | None = None
        self._callbacks: dict[str, list[EventCallback]] = {}
        self._subscribers: list[tuple[frozenset[str] | None, trio.MemorySendChannel[RoomEvent]]] = []
        self._text_handlers: dict[str, Callable[[TextStream, str], Awaitable[None]]] = {}
        self._byte_handlers: dict[str, Callable[[ByteStream, str], Awaitable[None]]] = {}
        self._tasks: trio.Nursery | None = None
        self._closed = trio.Event()
        self._connecting = False
        self._we_disconnected = False
        self.disconnect_reason: int | None = None

    # -- state --------------------------------------------------------------------------------

    def isconnected(self) -> bool:
        return (self._sdk is not None and not self._closed.is_set()
                and self._sdk.connection_state != rtc.ConnectionState.CONN_DISCONNECTED)

    @property
    def rtc_room(self) -> rtc.Room:
        """The SDK's room (connected), for what this face does not cover."""
        return self._connected()[0]

    @property
    def name(self) -> str:
        """The room's name: the job's room even before ``connect()``."""
        if self._sdk is None and self._name is not None:
            return self._name
        return self._connected()[0].name

    @property
    def sid(self) -> str:
        """The room's server id (``RM_...``)."""
        return self._connected()[0]._info.sid

    @property
    def metadata(self) -> str:
        return self._connected()[0].metadata

    @property
    def local_participant(self) -> LocalParticipant:
        self._connected()
        assert self._local is not None
        return self._local

    @property
    def remote_participants(self) -> Mapping[str, rtc.RemoteParticipant]:
        """Everyone else in the room, by identity (the SDK's objects, always current)."""
        return self._connected()[0].remote_participants

    @property
    def connection_state(self) -> int:
        return int(self._sdk.connection_state) if self._sdk else rtc.ConnectionState.CONN_DISCONNECTED

    async def aio(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run one of the SDK's coroutine functions from trio (``await room.aio(f, ...)``)."""
        return await self._connected()[1].call(fn, *args, **kwargs)

    def _connected(self) -> tuple[rtc.Room, Bridge]:
        if self._sdk is None or self._bridge is None:
            raise RuntimeError("the room is not connected yet: call `await ctx.connect()` first")
        return self._sdk, self._bridge

    def __getattr__(self, name: str) -> Any:
        """The rest of ``rtc.Room`` (``num_participants``, ``e2ee_manager``,
        ``get_rtc_stats``, ...): coroutine methods as trio functions, the rest as it is."""
        if name.startswith("_") or not hasattr(rtc.Room, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        sdk, bridge = self._connected()
        return _trio_member(bridge, sdk, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {n for n in dir(rtc.Room) if not n.startswith("_")})

    # -- media --------------------------------------------------------------------------------

    def audio_stream(self, track: rtc.Track, *, sample_rate: int = 48000, num_channels: int = 1,
                     capacity: int | None = None, frame_size_ms: int | None = None) -> AudioStream:
        """The frames of ``track`` as a trio async iterator (``async with`` closes it);
        resampled to ``sample_rate``/``num_channels``. See ``trio_agents.room.AudioStream``."""
        from ._media import AUDIO_CAPACITY, AudioStream

        return AudioStream(track, sample_rate=sample_rate, num_channels=num_channels,
                           capacity=AUDIO_CAPACITY if capacity is None else capacity,
                           frame_size_ms=frame_size_ms, room=self)

    def video_stream(self, track: rtc.Track, *, format: Any = None,
                     capacity: int | None = None) -> VideoStream:
        """The frames of a video ``track`` as a trio async iterator (``format``: an
        ``rtc.VideoBufferType`` to convert to, e.g. ``RGBA``)."""
        from ._media import VIDEO_CAPACITY, VideoStream

        return VideoStream(track, format=format,
                           capacity=VIDEO_CAPACITY if capacity is None else capacity, room=self)

    # -- events -------------------------------------------------------------------------------

    def events(self, *types: str, buffer: float = math.inf) -> trio.MemoryReceiveChannel[RoomEvent]:
        """A channel of the room's events from now on (only ``types``, if given).

        Iterate it (``async for event in room.events(): ...``); it ends when the room
        disconnects, after the ``disconnected`` event. Close it (``with room.events() as
        events:``) to unsubscribe. Nothing is dropped unless ``buffer`` is bounded and full.
        """
        unknown = set(types) - EVENT_TYPES
        if unknown:
            raise ValueError(f"unknown room event(s) {sorted(unknown)}; known: {sorted(EVENT_TYPES)}")
        send, receive = trio.open_memory_channel[RoomEvent](buffer)
        if self._closed.is_set():
            send.close()
        else:
            self._subscribers.append((frozenset(types) or None, send))
        return receive

    @typing.overload
    def on(self, event: str) -> Callable[[C], C]: ...
    @typing.overload
    def on(self, event: str, callback: C) -> C: ...

    def on(self, event: str, callback: C | None = None) -> C | Callable[[C], C]:
        """Call ``callback(*args)`` on each ``event`` (a decorator without ``callback``).

        A sync callback runs in place and must not block; an async one (a trio function) runs
        as a task of the room. Its errors are logged, not raised.
        """
        if event not in EVENT_TYPES:
            raise ValueError(f"unknown room event {event!r}; known: {sorted(EVENT_TYPES)}")

        def register(fn: C) -> C:
            if not callable(fn):
                raise TypeError(f"room event callback {fn!r} is not callable")
            self._callbacks.setdefault(event, []).append(fn)
            return fn

        return register if callback is None else register(callback)

    def once(self, event: str, callback: C | None = None) -> C | Callable[[C], C]:
        """Like ``on``, for the next ``event`` only."""
        def register(fn: C) -> C:
            def one_shot(*args: Any) -> object:
                self.off(event, one_shot)
                return fn(*args)

            self.on(event, one_shot)
            return fn

        return register if callback is None else register(callback)

    def off(self, event: str, callback: EventCallback) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._callbacks[event].remove(callback)

    def _emit(self, type: str, *args: Any) -> None:
        event = RoomEvent(type, args)
        live: list[tuple[frozenset[str] | None, trio.MemorySendChannel[RoomEvent]]] = []
        for types, send in self._subscribers:
            if types is not None and type not in types:
                live.append((types, send))
                continue
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                logger.warning("room event %s dropped: a subscriber's buffer is full", type)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # the subscriber closed its end: forget it
            live.append((types, send))
        self._subscribers = live
        for callback in list(self._callbacks.get(type, ())):
            self._call(callback, args, f"room event {type!r} callback {callback!r}")

    def _call(self, callback: Callable[..., object], args: tuple[Any, ...], what: str) -> None:
        try:
            result = callback(*args)
        except Exception:
            logger.exception("%s failed", what)
            return
        if inspect.iscoroutine(result):
            if self._tasks is None:
                result.close()
                return
            self._tasks.start_soon(self._guard, result, what)

    @staticmethod
    async def _guard(work: Awaitable[object], what: str) -> None:
        try:
            await work
        except Exception:
            logger.exception("%s failed", what)

    def start_task(self, fn: Callable[..., Awaitable[object]], *args: Any, name: str) -> None:
        """Run ``fn(*args)`` as a task of the room (cancelled when it disconnects; errors
        logged)."""
        if self._tasks is None or self._closed.is_set():
            raise RuntimeError("the room is not connected")
        self._tasks.start_soon(self._guard, fn(*args), name, name=name)

    # -- data streams -------------------------------------------------------------------------

    def register_text_stream_handler(self, topic: str,
                                     handler: Callable[[TextStream, str], Awaitable[None]]) -> None:
        """Run ``await handler(stream, participant_identity)`` for each text stream on
        ``topic`` (as a task of the room)."""
        if topic in self._text_handlers:
            raise ValueError(f"a text stream handler for topic {topic!r} is already registered")
        self._text_handlers[topic] = handler
        if self._sdk is not None:
            self._install_text(topic)

    def register_byte_stream_handler(self, topic: str,
                                     handler: Callable[[ByteStream, str], Awaitable[None]]) -> None:
        """Like ``register_text_stream_handler``, for byte streams."""
        if topic in self._byte_handlers:
            raise ValueError(f"a byte stream handler for topic {topic!r} is already registered")
        self._byte_handlers[topic] = handler
        if self._sdk is not None:
            self._install_bytes(topic)

    def unregister_text_stream_handler(self, topic: str) -> None:
        self._text_handlers.pop(topic, None)
        if self._sdk is not None:
            self._sdk.unregister_text_stream_handler(topic)

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self._byte_handlers.pop(topic, None)
        if self._sdk is not None:
            self._sdk.unregister_byte_stream_handler(topic)

    def _install_text(self, topic: str) -> None:
        sdk, bridge = self._connected()
        handler = self._text_handlers[topic]

        def opened(reader: rtc.TextStreamReader, identity: str) -> None:
            self._call(handler, (TextStream(bridge, reader), identity),
                       f"text stream handler for {topic!r}")

        sdk.register_text_stream_handler(topic, opened)

    def _install_bytes(self, topic: str) -> None:
        sdk, bridge = self._connected()
        handler = self._byte_handlers[topic]

        def opened(reader: rtc.ByteStreamReader, identity: str) -> None:
            self._call(handler, (ByteStream(bridge, reader), identity),
                       f"byte stream handler for {topic!r}")

        sdk.register_byte_stream_handler(topic, opened)

    # -- connecting ---------------------------------------------------------------------------

    async def connect(self, bridge: Bridge, url: str, token: str,
                      options: rtc.RoomOptions | None = None) -> None:
        """Join the room; cancel-safe (see the module docstring). Raises ``RoomConnectError``."""
        if self._sdk is not None or self._closed.is_set():
            raise RuntimeError("this Room has already been connected; make a new one")
        if self._connecting:
            raise RuntimeError("this Room is already connecting")
        self._connecting = True
        try:
            sdk = await bridge.call(_new_sdk_room)  # its futures must belong to the loop
            wired = {name: functools.partial(self._from_sdk, name) for name in EVENT_TYPES}
            for name, listener in wired.items():
                sdk.on(name, listener)  # type: ignore[arg-type]
            future = asyncio.ensure_future(sdk.connect(url, token, options or rtc.RoomOptions()),
                                           loop=bridge.loop)
            settled = trio.Event()
            future.add_done_callback(lambda _: settled.set())
            try:
                await settled.wait()
            finally:
                if not future.done():  # cancelled: the native connect goes on without us
                    for name, listener in wired.items():
                        sdk.off(name, listener)  # type: ignore[arg-type]
                    bridge.nursery.start_soon(_settle, bridge, sdk, future, settled,
                                              name=f"settle cancelled connect to {url}")
            if future.cancelled():
                raise RoomConnectError(f"the connect to {url} was cancelled on the asyncio side")
            error = future.exception()
            if error is not None:
                raise RoomConnectError(f"could not join the room at {url}: {error}") from error
            self._sdk, self._bridge = sdk, bridge
            bridge.rooms.add(self)
            self._local = LocalParticipant(self, bridge, sdk.local_participant)
            await bridge.nursery.start(self._serve, name=f"room {sdk.name}")
            for topic in self._text_handlers:
                self._install_text(topic)
            for topic in self._byte_handlers:
                self._install_bytes(topic)
        finally:
            self._connecting = False

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                task_status.started()
                await self._closed.wait()
                tasks.cancel_scope.cancel()
        finally:
            self._tasks = None

    def _from_sdk(self, name: str, *args: Any) -> None:
        if self._closed.is_set():
            return
        if name == "disconnected":
            self.disconnect_reason = int(args[0]) if args else None
        self._emit(name, *args)
        if name == "disconnected":
            self._close()

    def _close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._bridge is not None:
            self._bridge.rooms.discard(self)
        for _, send in self._subscribers:
            send.close()
        self._subscribers = []

    @property
    def closed_by_us(self) -> bool:
        return self._we_disconnected

    async def wait_closed(self) -> None:
        """Return once the room has disconnected (by us or by the server)."""
        await self._closed.wait()

    async def disconnect(self) -> None:
        """Leave the room (bounded by ``DISCONNECT_TIMEOUT``, not cancellable half-way)."""
        if self._sdk is None or self._bridge is None or self._closed.is_set():
            self._close()
            return
        self._we_disconnected = True
        sdk, bridge = self._sdk, self._bridge
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + DISCONNECT_TIMEOUT
            try:
                await bridge.call(sdk.disconnect)
            except Exception:
                logger.exception("leaving room %s failed", sdk.name)
        if scope.cancelled_caught:
            logger.warning("leaving room %s took more than %.0f s; gave up waiting", sdk.name,
                           DISCONNECT_TIMEOUT)
        if not self._closed.is_set():
            self._from_sdk("disconnected", rtc.DisconnectReason.CLIENT_INITIATED)

    def __repr__(self) -> str:
        if self._sdk is None:
            return "<Room not connected>"
        return f"<Room {self._sdk.name!r} connected={self.isconnected()}>"


async def _new_sdk_room() -> rtc.Room:
    return rtc.Room()


async def _settle(bridge: Bridge, sdk: rtc.Room, future: asyncio.Future[None],
                  settled: trio.Event) -> None:
    """A connect nobody waits for any more: let it finish, then leave what it joined.

    Shielded (bounded) unless the bridge may abandon it: a success nobody observes would make
    the native client panic later and the SDK SIGTERM this process.
    """
    with trio.CancelScope(shield=not bridge.abandon_pending) as scope:
        scope.deadline = trio.current_time() + SETTLE_TIMEOUT
        await settled.wait()
        if future.cancelled() or future.exception() is not None:  # retrieved: no asyncio noise
            return
        logger.info("a cancelled connect to room %s completed after all; leaving it", sdk.name)
        scope.deadline = trio.current_time() + DISCONNECT_TIMEOUT
        await bridge.call(sdk.disconnect)


def room_options(*, auto_subscribe: bool = True, e2ee: rtc.E2EEOptions | None = None,
                 rtc_config: rtc.RtcConfiguration | None = None) -> rtc.RoomOptions:
    return rtc.RoomOptions(auto_subscribe=auto_subscribe, encryption=e2ee, rtc_config=rtc_config)


@contextlib.asynccontextmanager
async def open_room(url: str, token: str, *, room: Room | None = None, auto_subscribe: bool = True,
                    e2ee: rtc.E2EEOptions | None = None,
                    rtc_config: rtc.RtcConfiguration | None = None) -> AsyncIterator[Room]:
    """Join a room as a participant of your own (outside a job), leave it on exit.

    ``room``: a ``Room`` with callbacks or stream handlers already registered. The block owns
    an asyncio loop for the SDK; leaving it waits for a connect cancelled half-way to settle.
    """
    room = room if room is not None else Room()
    async with open_bridge() as bridge:
        await room.connect(bridge, url, token, room_options(
            auto_subscribe=auto_subscribe, e2ee=e2ee, rtc_config=rtc_config))
        try:
            yield room
        finally:
            await room.disconnect()
