"""The media benchmark: three echo participants side by side on the real livekit-server.

    .venv/bin/python benchmarks/media.py [--bursts 20] [--max-jobs 8] [--quick]
    .venv/bin/python benchmarks/media.py --forwarding [--window 10]

Contenders, each echoing a probe participant's audio back into its room:
- ours: trio_agents' examples/echo.py in an agent server (benchmarks/echo_ours.py);
- peer: the same agent on livekit-agents (benchmarks/echo_peer.py, in benchmarks/.venv-peer,
  which benchmarks/run.py creates);
- floor: a bare realtime-SDK participant, asyncio, no framework (benchmarks/echo_floor.py).

The probe (one per room, the realtime SDK under trio in this process) publishes 100 ms bursts
of a 440 Hz tone once a second and listens to the echo. Measured, per contender:
- the round trip, burst onset sent → its echo heard (p50, p90);
- the CPU of the contender's whole process tree while it echoes one probe (% of one core);
- how many rooms echoing at once 2 cores hold with under 1 % of the tone lost (tone frames
  heard ÷ sent), trying 1, 2, 4, ... up to --max-jobs.

``--forwarding`` measures the servers instead: the CPU of the dev server's process
(``python -m trio_agents devserver``, which decodes each published track once and encodes it
once per subscriber) and of livekit-server's (which forwards RTP as it comes) while k = 1, 2
and 4 participants publish audio (and one publishes video) to a participant subscribed to
everything; reported per forwarded stream, after subtracting the same participants idle.

Needs root (it runs in a network namespace of its own: WebRTC never uses loopback) and
../shared/livekit-server/livekit-server (or LIVEKIT_SERVER_BIN).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import numpy as np
import psutil
import trio

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

import netns  # noqa: E402
from cli_helpers import CliProcess, terminate  # noqa: E402
from livekit import rtc  # noqa: E402
from livekit_server import LiveKitServer, open_livekit_server  # noqa: E402
from media_helpers import (SAMPLE_RATE, participant_token, rms, silence_frame,  # noqa: E402
                           sine_frame)
from room_helpers import Backend  # noqa: E402
from run import PEER_PYTHON, ensure_peer_venv, peer_version  # noqa: E402

from trio_agents.room import AudioSource, Room, VideoSource, open_room  # noqa: E402

RESULTS: Final = HERE / "results"
BURST_FRAMES: Final = 10  # 100 ms of tone
PERIOD_FRAMES: Final = 100  # one burst a second
TONE_RMS: Final = 1000.0  # a frame louder than this carries the tone (the tone's rms is ~11600)
LOSS_LIMIT: Final = 0.01
#: --forwarding: (label, kind, publishers); each publisher's track goes to one subscriber.
FORWARDING_CASES: Final = (("audio ×1", "audio", 1), ("audio ×2", "audio", 2),
                           ("audio ×4", "audio", 4), ("video ×1", "video", 1))
VIDEO_SIZE: Final = (320, 240)
VIDEO_FPS: Final = 30


class Probe:
    """A participant that sends tone bursts and times their echoes."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.sent: list[float] = []  # onset times of the bursts sent
        self.heard: list[float] = []  # onset times of the echoes heard
        self.tone_sent = 0
        self.tone_heard = 0

    async def sing(self, bursts: int) -> None:
        """Publish, warm the echo up (a burst a second until one comes back, for up to 15 s:
        the contender subscribes to us only once we publish), then sing ``bursts`` bursts
        with the counters reset."""
        source = AudioSource(SAMPLE_RATE, 1, queue_size_ms=20, room=self.room)
        track = rtc.LocalAudioTrack.create_audio_track("probe", source)
        await self.room.local_participant.publish_track(track, rtc.TrackPublishOptions(
            source=rtc.TrackSource.SOURCE_MICROPHONE))
        try:
            for _ in range(15):
                await self._bursts(source, 1)
                if self.heard:
                    break
            else:
                raise RuntimeError("no echo came back in 15 s")
            self.sent.clear()
            self.heard.clear()
            self.tone_sent = self.tone_heard = 0
            await self._bursts(source, bursts)
            for _ in range(PERIOD_FRAMES):  # a second of silence: the last echo comes home
                await source.capture_frame(silence_frame())
        finally:
            await source.aclose()

    async def _bursts(self, source: AudioSource, count: int) -> None:
        for index in range(count * PERIOD_FRAMES):
            if index % PERIOD_FRAMES < BURST_FRAMES:
                if index % PERIOD_FRAMES == 0:
                    self.sent.append(trio.current_time())
                self.tone_sent += 1
                await source.capture_frame(sine_frame(440.0, index))
            else:
                await source.capture_frame(silence_frame())

    async def listen(self, track: rtc.Track) -> None:
        loud = False
        async with self.room.audio_stream(track, sample_rate=SAMPLE_RATE) as stream:
            async for event in stream:
                loud_now = rms(event.frame) > TONE_RMS
                if loud_now:
                    self.tone_heard += 1
                if loud_now and not loud:
                    self.heard.append(trio.current_time())
                loud = loud_now

    def round_trips(self) -> list[float]:
        """Each burst's echo delay: the first onset heard after it was sent, within 0.9 s."""
        trips = []
        for sent in self.sent:
            later = [h - sent for h in self.heard if 0 <= h - sent < 0.9]
            if later:
                trips.append(later[0])
        return trips

    def loss(self) -> float:
        return max(0.0, 1 - self.tone_heard / self.tone_sent) if self.tone_sent else 1.0


async def echo_track(room: Room, timeout: float = 30.0) -> rtc.RemoteTrack:
    with trio.fail_after(timeout), room.events("track_subscribed") as events:
        for participant in room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None and publication.kind == rtc.TrackKind.KIND_AUDIO:
                    return publication.track
        async for event in events:
            track: rtc.RemoteTrack = event.args[0]
            if track.kind == rtc.TrackKind.KIND_AUDIO:
                return track
    raise RuntimeError("the room closed before the echo arrived")


@asynccontextmanager
async def contender(name: str, server: LiveKitServer, rooms: list[str]
                    ) -> AsyncIterator[list[psutil.Process]]:
    """Start ``name`` for ``rooms``: an agent server (ours, peer) or one bare participant per
    room (floor). Yields the processes whose trees are measured; stops them on exit."""
    env = {**os.environ, "LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": server.api_key,
           "LIVEKIT_API_SECRET": server.api_secret, "PYTHONPATH": str(ROOT)}
    if name == "floor":
        argvs = [[sys.executable, str(HERE / "echo_floor.py"), server.url,
                  participant_token(server.api_key, server.api_secret, room, f"floor-{room}")]
                 for room in rooms]
    else:
        python = sys.executable if name == "ours" else str(PEER_PYTHON)
        script = HERE / ("echo_ours.py" if name == "ours" else "echo_peer.py")
        argvs = [[python, str(script), "start", "--log-level", "info"]]
    async with trio.open_nursery() as nursery:
        processes = []
        for argv in argvs:
            process = await trio.lowlevel.open_process(argv, env=env, stdout=-1, stderr=-2,
                                                       cwd=str(ROOT), start_new_session=True)
            output = CliProcess(process)
            nursery.start_soon(output._read)
            processes.append((process, output))
        try:
            if name != "floor":
                with trio.fail_after(60):
                    await processes[0][1].wait_for("registered worker")
            yield [psutil.Process(p.pid) for p, _ in processes]
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as stopping:  # all at once, one SIGTERM each
                    for process, _ in processes:
                        stopping.start_soon(terminate, process, 20)
                for process, _ in processes:
                    # what its tree left behind (livekit-agents leaves its forkserver): gone too
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
            nursery.cancel_scope.cancel()


def tree_cpu(roots: list[psutil.Process]) -> float:
    """CPU seconds used so far by ``roots`` and their live descendants."""
    total = 0.0
    for root in roots:
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


async def echo_rooms(server: LiveKitServer, rooms: list[str], bursts: int,
                     roots: list[psutil.Process]) -> tuple[list[Probe], float]:
    """Join each room with a probe, wait for its echo track, then sing ``bursts`` bursts in
    all at once. Returns the probes and the contender's CPU (% of one core) while singing."""
    probes: list[Probe] = []
    ready = trio.Semaphore(0)
    go = trio.Event()

    async def one(room_name: str) -> None:
        token = participant_token(server.api_key, server.api_secret, room_name,
                                  f"probe-{room_name}")
        async with open_room(server.url, token) as room, trio.open_nursery() as inner:
            probe = Probe(room)
            probes.append(probe)
            inner.start_soon(probe.listen, await echo_track(room))
            ready.release()
            await go.wait()
            await probe.sing(bursts)
            inner.cancel_scope.cancel()

    with trio.fail_after(bursts + 120):
        async with trio.open_nursery() as nursery:
            for room_name in rooms:
                nursery.start_soon(one, room_name)
            for _ in rooms:
                await ready.acquire()
            cpu0, t0 = tree_cpu(roots), time.monotonic()
            go.set()
        cpu = (tree_cpu(roots) - cpu0) / (time.monotonic() - t0) * 100
    return probes, cpu


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


async def measure(server: LiveKitServer, name: str, *, bursts: int, max_jobs: int,
                  serial: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    rooms = [f"{name}-{serial}-rt"]
    async with contender(name, server, rooms) as roots:
        probes, cpu = await echo_rooms(server, rooms, bursts, roots)
    trips = probes[0].round_trips()
    result.update(rt_p50_ms=pct(trips, 50) * 1000, rt_p90_ms=pct(trips, 90) * 1000,
                  echoed=len(trips), sent=len(probes[0].sent), cpu_pct=cpu,
                  loss_one=probes[0].loss())
    held = 0
    levels = [n for n in (1, 2, 4, 6, 8, 12, 16) if n <= max_jobs]
    result["levels"] = {}
    for n in levels:
        rooms = [f"{name}-{serial}-c{n}-{i}" for i in range(n)]
        failed = ""
        try:
            async with contender(name, server, rooms) as roots:
                probes, cpu = await echo_rooms(server, rooms, max(5, bursts // 2), roots)
        except* Exception as group:  # e.g. a probe could not even publish: not held
            failed = repr(group.exceptions[0])[:200]
        if failed:
            result["levels"][n] = {"error": failed}
            print(f"  {name}: {n} rooms at once failed: {failed}", flush=True)
            break
        worst = max(p.loss() for p in probes)
        result["levels"][n] = {"worst_loss": worst, "cpu_pct": cpu}
        print(f"  {name}: {n} rooms at once, worst tone loss {worst:.2%}, CPU {cpu:.0f}%",
              flush=True)
        if worst >= LOSS_LIMIT:
            break
        held = n
    result["held"] = held
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    floor = results["floor"]
    rows = ["| echo participant | round trip p50 (ms) | round trip p90 (ms) | CPU (% of one core) "
            "| rooms held (< 1 % lost) |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, label in (("ours", "trio_agents"), ("peer", "livekit-agents"),
                        ("floor", "bare SDK (the floor)")):
        r = results[name]
        rows.append(f"| {label} | {r['rt_p50_ms']:.0f} | {r['rt_p90_ms']:.0f} | "
                    f"{r['cpu_pct']:.1f} | {r['held']} |")
    ours, peer = results["ours"], results["peer"]
    rows.append("")
    rows.append(f"targets: p50 ≤ floor + 10 ms: {ours['rt_p50_ms']:.0f} vs "
                f"{floor['rt_p50_ms'] + 10:.0f} → "
                f"{'met' if ours['rt_p50_ms'] <= floor['rt_p50_ms'] + 10 else 'missed'}; "
                f"CPU ≤ 1.15× floor: {ours['cpu_pct'] / floor['cpu_pct']:.2f}× → "
                f"{'met' if ours['cpu_pct'] <= 1.15 * floor['cpu_pct'] else 'missed'}; "
                f"rooms ≥ peer's and ≥ 0.85× floor's: {ours['held']} vs {peer['held']} / "
                f"{floor['held']} → "
                f"{'met' if ours['held'] >= peer['held'] and ours['held'] >= 0.85 * floor['held'] else 'missed'}")
    return "\n".join(rows)


# -- --forwarding: what a server spends to forward a stream ------------------------------------


@asynccontextmanager
async def dev_server_process(address: str) -> AsyncIterator[tuple[Backend, psutil.Process]]:
    """``python -m trio_agents devserver`` on a free port, offering WebRTC on ``address``."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_agents", "devserver", "--port", "0",
         "--rtc-address", address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    output = CliProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output._read)
            with trio.fail_after(30):
                line = await output.wait_for(r"LiveKit dev server on ws://")
            found = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
            if found is None:
                raise RuntimeError(f"the dev server announced no port: {line!r}")
            try:
                yield _Served(f"ws://127.0.0.1:{found.group(1)}"), psutil.Process(process.pid)
            except BaseException:
                print("--- the dev server's last lines:", *output.lines[-30:], sep="\n")
                raise
            nursery.cancel_scope.cancel()
    finally:
        await terminate(process)
        if process.stdout is not None:
            with trio.CancelScope(shield=True):
                await process.stdout.aclose()


class _Served:
    """A dev server's address and its (default) key pair."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.api_key = "devkey"
        self.api_secret = "secret"


async def _publish(room: Room, kind: str, index: int) -> None:
    """Publish a track of ``kind`` from ``room`` and feed it in real time until cancelled."""
    if kind == "audio":
        # 200 ms of queue, not the probe's 20: a capture late by more than the queue makes
        # the SDK schedule a negative delay, which trio-asyncio's loop refuses (an
        # AssertionError out of capture_frame)
        source = AudioSource(SAMPLE_RATE, 1, queue_size_ms=200, room=room)
        track: rtc.LocalTrack = rtc.LocalAudioTrack.create_audio_track(f"tone-{index}", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    else:
        width, height = VIDEO_SIZE
        video = VideoSource(width, height, room=room)
        track = rtc.LocalVideoTrack.create_video_track(f"pattern-{index}", video)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)
    await room.local_participant.publish_track(track, options)
    try:
        if kind == "audio":
            frame = 0
            while True:  # paced by the source's queue
                await source.capture_frame(sine_frame(220.0 * (index + 1), frame))
                frame += 1
        else:  # a moving gradient: the encoder has something to do in every frame
            x = np.arange(width, dtype=np.uint16)
            y = np.arange(height, dtype=np.uint16)[:, None]
            frames = []
            for shift in range(VIDEO_FPS):
                rgba = np.empty((height, width, 4), dtype=np.uint8)
                rgba[..., 0] = (x + shift * 8) % 256
                rgba[..., 1] = (y + shift * 4) % 256
                rgba[..., 2] = ((x + y) // 2 + shift * 16) % 256
                rgba[..., 3] = 255
                frames.append(rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA,
                                             rgba.tobytes()))
            start = trio.current_time()
            for count in range(1 << 62):
                await video.capture_frame(frames[count % VIDEO_FPS])
                await trio.sleep_until(start + (count + 1) / VIDEO_FPS)
    finally:
        await (source if kind == "audio" else video).aclose()


class _Received:
    """Frames received on each subscribed track; ``flowing`` once every one has had one."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.counts: dict[str, int] = {}
        self.flowing = trio.Event()

    def total(self) -> int:
        return sum(self.counts.values())

    async def count(self, room: Room, track: rtc.RemoteTrack) -> None:
        self.counts[track.sid] = 0
        stream = (room.audio_stream(track, sample_rate=SAMPLE_RATE)
                  if track.kind == rtc.TrackKind.KIND_AUDIO else room.video_stream(track))
        async with stream:
            async for _ in stream:
                self.counts[track.sid] += 1
                if len(self.counts) == self.streams and all(self.counts.values()):
                    self.flowing.set()


async def forwarding_case(server: Backend, root: psutil.Process, room_name: str, kind: str,
                          publishers: int, window: float) -> dict[str, Any]:
    """``publishers`` participants publish (none if ``kind`` is "idle") and one participant
    receives every track; the server's CPU over ``window`` seconds once all flow."""
    streams = 0 if kind == "idle" else publishers
    received = _Received(streams)
    async with AsyncExitStack() as stack:
        rooms = [await stack.enter_async_context(open_room(
            server.url, participant_token(server.api_key, server.api_secret, room_name,
                                          f"publisher-{i}"), auto_subscribe=False))
                 for i in range(publishers)]
        listener = await stack.enter_async_context(open_room(
            server.url, participant_token(server.api_key, server.api_secret, room_name,
                                          "listener")))
        async with trio.open_nursery() as nursery:
            if streams:
                with listener.events("track_subscribed") as subscribed, trio.fail_after(60):
                    for index, room in enumerate(rooms):
                        nursery.start_soon(_publish, room, kind, index)
                    tracks = 0
                    async for event in subscribed:
                        nursery.start_soon(received.count, listener, event.args[0])
                        tracks += 1
                        if tracks == streams:
                            break
                    await received.flowing.wait()
            await trio.sleep(2)  # settle: encoders and jitter buffers at their pace
            frames0, cpu0, t0 = received.total(), tree_cpu([root]), time.monotonic()
            await trio.sleep(window)
            elapsed = time.monotonic() - t0
            cpu = (tree_cpu([root]) - cpu0) / elapsed * 100
            frames = received.total() - frames0
            nursery.cancel_scope.cancel()
    return {"streams": streams, "cpu_pct": cpu,
            "frames_per_s_per_stream": frames / elapsed / streams if streams else 0.0}


async def measure_forwarding(address: str, window: float) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    for name in ("dev server", "livekit-server"):
        rows: list[dict[str, Any]] = []
        served: Any = (dev_server_process(address) if name == "dev server"
                       else open_livekit_server(address))
        async with served as opened:
            if name == "dev server":
                server, root = opened
            else:
                server, root = opened, psutil.Process(opened.output.process.pid)
            cases = (("idle", "idle", 1), *FORWARDING_CASES)
            for serial, (label, kind, publishers) in enumerate(cases):
                try:
                    row = await forwarding_case(server, root, f"fwd-{serial}", kind,
                                                publishers, window)
                except Exception as exc:  # one case failing leaves the others to run
                    for leaf in _leaves(exc):
                        traceback.print_exception(leaf)
                    print(f"  {name}, {label}: failed ({exc!r})", flush=True)
                    rows.append({"case": label, "streams": publishers, "error": repr(exc)})
                    continue
                row["case"] = label
                rows.append(row)
                print(f"  {name}, {label}: CPU {row['cpu_pct']:.1f}% "
                      f"({row['frames_per_s_per_stream']:.0f} frames/s a stream)", flush=True)
        results[name] = rows
    return results


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def forwarding_table(results: dict[str, list[dict[str, Any]]]) -> str:
    rows = ["| server | case | streams | CPU (% of one core) | CPU per stream, idle "
            "subtracted | frames/s a stream |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, cases in results.items():
        idle = next((c["cpu_pct"] for c in cases if c["case"] == "idle" and "error" not in c),
                    math.nan)
        for case in cases:
            streams = case["streams"]
            if "error" in case:
                rows.append(f"| {name} | {case['case']} | {streams} | failed: "
                            f"{case['error'][:60]} | | |")
                continue
            per = f"{(case['cpu_pct'] - idle) / streams:.1f}" if streams else "–"
            fps = f"{case['frames_per_s_per_stream']:.0f}" if streams else "–"
            label = ("idle (2 participants, no media)" if case["case"] == "idle"
                     else case["case"])
            rows.append(f"| {name} | {label} | {streams} | {case['cpu_pct']:.1f} | {per} | "
                        f"{fps} |")
    return "\n".join(rows)


async def forwarding_main(window: float) -> None:
    address, why = netns.rtc_address()
    if address is None:
        sys.exit(why)
    t_start = time.monotonic()
    results = await measure_forwarding(address, window)
    header = (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, forwarding to one "
              f"subscriber ({address} in a network namespace); audio: Opus 48 kHz mono; video: "
              f"VP8 {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} published at {VIDEO_FPS} fps; "
              f"{window:.0f} s a case; {time.monotonic() - t_start:.0f} s")
    report("media_forwarding.json", header, results, forwarding_table(results))


def report(file_name: str, header: str, results: Any, text: str) -> None:
    """Print the header and the table; keep them, with the figures, in results/."""
    print()
    print(header)
    print()
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / file_name).write_text(json.dumps(
        {"header": header, "results": results, "table": text}, indent=1))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=20, help="bursts per round-trip run")
    parser.add_argument("--max-jobs", type=int, default=8, help="most rooms echoing at once")
    parser.add_argument("--quick", action="store_true", help="8 bursts, up to 2 rooms at once")
    parser.add_argument("--forwarding", action="store_true",
                        help="measure the servers' forwarding CPU instead of the echo agents")
    parser.add_argument("--window", type=float, default=10.0,
                        help="--forwarding: seconds measured per case")
    args = parser.parse_args()
    if args.forwarding:
        await forwarding_main(args.window)
        return
    bursts, max_jobs = (8, 2) if args.quick else (args.bursts, args.max_jobs)
    address, why = netns.rtc_address()
    if address is None:
        sys.exit(why)
    t_start = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    async with open_livekit_server(address) as server:
        for serial, name in enumerate(("floor", "peer", "ours")):
            print(f"{name}: echoing...", flush=True)
            results[name] = await measure(server, name, bursts=bursts, max_jobs=max_jobs,
                                          serial=serial)
    header = (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, livekit-server (real, "
              f"{address} in a network namespace), livekit-agents {peer_version()}, "
              f"{bursts} bursts of 100 ms once a second; {time.monotonic() - t_start:.0f} s")
    report("media.json", header, results, table(results))


if __name__ == "__main__":
    if "--forwarding" not in sys.argv:
        ensure_peer_venv()  # first: pip needs the host's network
    netns.enter_private_network()  # before any thread: WebRTC needs a non-loopback address
    trio.run(main)
