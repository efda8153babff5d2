"""The floor of the media benchmark: a bare realtime-SDK participant (asyncio, no framework)
that joins one room and echoes every audio track it subscribes to.

    python echo_floor.py <url> <token>
"""

import asyncio
import signal
import sys

from livekit import rtc


async def main(url: str, token: str) -> None:
    room = rtc.Room()
    source = rtc.AudioSource(48000, 1, queue_size_ms=100)
    tasks: set[asyncio.Task[None]] = set()

    async def echo(track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1)
        async for event in stream:
            await source.capture_frame(event.frame)

    @room.on("track_subscribed")
    def subscribed(track: rtc.Track, *_: object) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            task = asyncio.ensure_future(echo(track))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    await room.connect(url, token)
    track = rtc.LocalAudioTrack.create_audio_track("echo", source)
    await room.local_participant.publish_track(
        track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await room.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
