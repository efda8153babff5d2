"""The room a job joins (``ctx.connect()``, ``ctx.room``), and ``open_room`` for joining one
yourself, e.g. as a test participant.

Needs the ``rtc`` extra (``pip install 'trio-agents[rtc]'``): LiveKit's realtime SDK, run on
trio through trio-asyncio. Participant objects, ``DataPacket``, ``RpcError`` and the enums are
the SDK's own (``from livekit import rtc``). Media: ``AudioStream``/``VideoStream`` iterate a
track's frames from trio, ``AudioSource``/``VideoSource`` feed a published track from trio.
"""

from __future__ import annotations

from ._errors import MissingExtraError

try:
    from ._media import AudioSource as AudioSource
    from ._media import AudioStream as AudioStream
    from ._media import VideoSource as VideoSource
    from ._media import VideoStream as VideoStream
    from ._room import AioObject as AioObject
    from ._room import ByteStream as ByteStream
    from ._room import LocalParticipant as LocalParticipant
    from ._room import Room as Room
    from ._room import RoomEvent as RoomEvent
    from ._room import TextStream as TextStream
    from ._room import open_room as open_room
except ImportError as exc:
    if (exc.name or "").split(".")[0] not in {"livekit", "trio_asyncio"}:
        raise
    raise MissingExtraError(
        f"joining a room needs the rtc extra ({exc.name} is not installed): "
        "pip install 'trio-agents[rtc]'") from None

__all__ = ["AioObject", "AudioSource", "AudioStream", "ByteStream", "LocalParticipant", "Room",
           "RoomEvent", "TextStream", "VideoSource", "VideoStream", "open_room"]
