"""A participant to try the echo agent with: it joins a room, sings short 440 Hz bursts and
says when, and at what pitch, each comes back.

    python examples/echo.py dev      # terminal 1: its log names the dev server's URL, key, secret
    LIVEKIT_URL=ws://127.0.0.1:PORT LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret \\
        python examples/tone_participant.py echo-test     # terminal 2: any room name

Needs the rtc extra. Also a minimal participant of your own: a token from
`trio_agents.api.AccessToken`, then `trio_agents.room.open_room`.
"""

import os
import sys

import numpy as np
import trio
from livekit import rtc

from trio_agents.api import AccessToken, VideoGrants
from trio_agents.room import AudioSource, open_room

RATE = 48000
FRAME = RATE // 100  # 10 ms
BURSTS = 5


def frame_of(samples: np.ndarray) -> rtc.AudioFrame:
    frame = rtc.AudioFrame.create(RATE, 1, FRAME)
    np.frombuffer(frame.data, dtype=np.int16)[:] = samples
    return frame


async def main(room_name: str) -> None:
    url = os.environ["LIVEKIT_URL"]
    token = (AccessToken(os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"])
             .with_identity("singer").with_grants(VideoGrants(room_join=True, room=room_name))
             .to_jwt())
    async with open_room(url, token) as room:
        print(f"joined room {room_name!r}; waiting for someone to echo", flush=True)
        source = AudioSource(RATE, 1, queue_size_ms=20)
        await room.local_participant.publish_track(
            rtc.LocalAudioTrack.create_audio_track("voice", source),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        t = np.arange(FRAME) / RATE
        sent: list[float] = []

        async def sing() -> None:
            silence = frame_of(np.zeros(FRAME, dtype=np.int16))
            for burst in range(BURSTS + 30):  # until 5 echoes came back (or 35 s)
                sent.append(trio.current_time())
                for i in range(100):  # 100 ms of tone, then 900 ms of silence
                    tone = (12000 * np.sin(2 * np.pi * 440 * (t + i * FRAME / RATE)))
                    await source.capture_frame(frame_of(tone.astype(np.int16)) if i < 10
                                               else silence)

        async def listen(track: rtc.Track) -> None:
            heard, quiet, began = 0, 0, 0.0
            burst: list[np.ndarray] = []
            async with room.audio_stream(track, sample_rate=RATE) as stream:
                async for event in stream:
                    samples = np.frombuffer(event.frame.data, dtype=np.int16).astype(float)
                    if np.sqrt(np.mean(samples ** 2)) > 1000:
                        if not burst:  # when it began, against when the last burst was sung
                            began = (trio.current_time() - sent[-1]) * 1000
                        burst.append(samples)
                        quiet = 0
                        continue
                    if not burst:
                        continue
                    # a busy machine can drop a frame mid-burst: the burst ends only after
                    # 200 ms of quiet (the bursts are 900 ms apart)
                    quiet += 1
                    burst.append(samples)
                    if quiet < 20:
                        continue
                    data = np.concatenate(burst[:-quiet])
                    # zero-padded to 1 s: 1 Hz bins (a 100 ms burst alone resolves 10 Hz)
                    spectrum = np.abs(np.fft.rfft(data * np.hanning(len(data)), n=RATE))
                    pitch = np.fft.rfftfreq(RATE, 1 / RATE)[int(np.argmax(spectrum))]
                    heard += 1
                    print(f"echo {heard}: {pitch:.0f} Hz, {began:.0f} ms after it was sung",
                          flush=True)
                    burst = []
                    if heard == BURSTS:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sing)
            with room.events("track_subscribed") as events:
                async for event in events:
                    if event.args[0].kind == rtc.TrackKind.KIND_AUDIO:
                        print(f"{event.args[2].identity} publishes audio: listening", flush=True)
                        await listen(event.args[0])
                        break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "echo-test")
