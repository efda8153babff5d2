"""The trio room face without a server: event fan-out, callbacks, the missing extra."""

from __future__ import annotations

import importlib
import sys

import pytest
import trio

from trio_agents import MissingExtraError
from trio_agents.room import Room, RoomEvent


async def test_events_fan_out_filter_and_end_with_the_room() -> None:
    room = Room()
    everything = room.events()
    joins = room.events("participant_connected")
    seen: list[tuple[object, ...]] = []
    room.on("participant_connected", lambda *args: seen.append(args))
    room._from_sdk("participant_connected", "p1")
    room._from_sdk("room_metadata_changed", "", "m")
    room._from_sdk("disconnected", 1)
    assert [e async for e in everything] == [
        RoomEvent("participant_connected", ("p1",)),
        RoomEvent("room_metadata_changed", ("", "m")),
        RoomEvent("disconnected", (1,)),
    ]
    assert [e async for e in joins] == [RoomEvent("participant_connected", ("p1",))]
    assert seen == [("p1",)]
    assert room.disconnect_reason == 1
    late = room.events()  # after the end: an empty, finished channel
    assert [e async for e in late] == []


async def test_a_closed_subscriber_is_forgotten_and_others_go_on() -> None:
    room = Room()
    with room.events() as gone:
        pass
    kept = room.events()
    room._from_sdk("participant_connected", "p1")
    assert len(room._subscribers) == 1
    assert kept.receive_nowait().args == ("p1",)
    with pytest.raises(trio.ClosedResourceError):
        gone.receive_nowait()


async def test_a_failing_sync_callback_is_logged_and_does_not_stop_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    room = Room()
    calls: list[str] = []

    @room.on("participant_connected")
    def boom(p: str) -> None:
        raise RuntimeError("callback bug")

    room.on("participant_connected", lambda p: calls.append(p))
    room._from_sdk("participant_connected", "p1")
    assert calls == ["p1"]
    assert "callback bug" in caplog.text
    room.off("participant_connected", boom)
    room._from_sdk("participant_connected", "p2")
    assert calls == ["p1", "p2"]


def test_unknown_events_and_unconnected_use_are_clear_errors() -> None:
    room = Room()
    with pytest.raises(ValueError, match="unknown room event 'participant_joined'"):
        room.on("participant_joined", print)
    with pytest.raises(ValueError, match="unknown room event"):
        room.events("nope")
    with pytest.raises(RuntimeError, match=r"not connected yet: call `await ctx.connect\(\)`"):
        room.local_participant
    with pytest.raises(ValueError, match="already registered"):
        async def handler(stream: object, identity: str) -> None: ...
        room.register_text_stream_handler("t", handler)
        room.register_text_stream_handler("t", handler)


def test_without_the_rtc_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("trio_agents.room", "trio_agents._room"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "livekit.rtc", None)  # what an absent package looks like
    monkeypatch.delattr(sys.modules["livekit"], "rtc")
    with pytest.raises(MissingExtraError) as info:
        importlib.import_module("trio_agents.room")
    assert str(info.value) == ("joining a room needs the rtc extra (livekit.rtc is not "
                               "installed): pip install 'trio-agents[rtc]'")
    assert isinstance(info.value, ImportError)


async def test_a_late_audio_source_does_not_crash_the_bridge() -> None:
    """The SDK's AudioSource asks for a negative call_later delay when its producer runs
    late; asyncio allows it, and so must the bridge's trio-asyncio loop."""
    from trio_agents._room import open_bridge

    async with open_bridge() as bridge:
        ran = trio.Event()
        bridge.loop.call_later(-0.01, ran.set)
        with trio.fail_after(5):
            await ran.wait()


class _StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_ready_asyncio_callbacks_run_together_in_order_and_trio_still_gets_turns() -> None:
    """trio-asyncio gave each asyncio callback a trio step of its own (a scheduler pass, a
    cancel scope); the bridge runs those that are ready together, in the same order."""
    import asyncio

    from trio_agents._room import open_bridge
    from trio_agents._util import CALLBACK_BATCH

    async with open_bridge() as bridge:
        order: list[str] = []
        done = trio.Event()

        def first() -> None:
            order.append("first")
            bridge.loop.call_soon(order.append, "queued by first")
            bridge.loop.call_soon(done.set)

        bridge.loop.call_soon(first)
        bridge.loop.call_soon(order.append, "second")
        bridge.loop.call_later(0, order.append, "timer")
        with trio.fail_after(5):
            await done.wait()
        # FIFO, and a due timer first, as trio-asyncio itself orders them
        assert order == ["first", "second", "timer", "queued by first"]

        # 1000 callbacks queued at once: a few dozen trio steps, not a thousand (this also
        # fails if the patch no longer applies to the trio-asyncio installed)
        counter = _StepCounter()
        finished = trio.Event()
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(999):
                bridge.loop.call_soon(lambda: None)
            bridge.loop.call_soon(finished.set)
            with trio.fail_after(5):
                await finished.wait()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps <= 4 * (1000 // CALLBACK_BATCH + 1), counter.steps

        # an asyncio task that never waits (sleep(0) forever) does not starve trio
        async def spin() -> None:
            while True:
                await asyncio.sleep(0)

        spinner = bridge.loop.create_task(spin())
        try:
            with trio.fail_after(5):
                for _ in range(20):
                    await trio.sleep(0.001)
        finally:
            spinner.cancel()
