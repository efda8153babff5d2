"""Every example in examples/ runs against the dev server."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from livekit.protocol import agent
from livekit.protocol.agent_dispatch import RoomAgentDispatch

from cli_helpers import CliProcess, run_cli
from trio_agents.devserver import DevServer, open_dev_server


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0) as server:
        yield server


def env(dev: DevServer, **extra: str) -> dict[str, str]:
    return {"LIVEKIT_URL": dev.url, "LIVEKIT_API_KEY": dev.api_key,
            "LIVEKIT_API_SECRET": dev.api_secret, **extra}


async def test_minimal(dev: DevServer) -> None:
    async with run_cli(["examples/minimal.py", "start"], env=env(dev)) as cli:
        await cli.wait_for("registered worker")
        await dev.create_room("lobby")
        await cli.wait_for("hello from job AJ_")
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


async def test_request_handler_accepts_and_rejects_by_metadata(dev: DevServer) -> None:
    async with run_cli(["examples/request_handler.py", "start"], env=env(dev)) as cli:
        await cli.wait_for("registered worker")
        await dev.create_dispatch("english", "triage", metadata='{"lang": "en"}')
        await dev.create_dispatch("german", "triage", metadata='{"lang": "de"}')
        await dev.wait_until(lambda: len(dev.jobs) == 2
                             and all(j.done for j in dev.jobs.values()))
        by_room = {j.room: j for j in dev.jobs.values()}
        accepted = by_room["english"].response
        assert accepted is not None and accepted.participant_identity.startswith("triage-")
        assert dict(accepted.participant_attributes)["lang"] == "en"
        assert by_room["german"].worker_id == "" and by_room["german"].dropped
        await cli.wait_for("triaging room 'english'")
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


async def test_prewarm(dev: DevServer) -> None:
    async with run_cli(["examples/prewarm.py", "start"], env=env(dev)) as cli:
        await cli.wait_for("registered worker")
        await dev.create_room("r")
        await cli.wait_for("uses a prewarmed vocabulary of 3 words")
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


async def test_load_limit_refuses_a_third_job(dev: DevServer) -> None:
    async with run_cli(["examples/load_limit.py", "start"], env=env(dev)) as cli:
        await cli.wait_for("registered worker")
        for room in ("a", "b"):  # two jobs that sleep 3 s: the server is then full
            await dev.create_room(room, agents=[RoomAgentDispatch(metadata="3")])
        await dev.wait_until(lambda: sum(j.status == agent.JS_RUNNING
                                         for j in dev.jobs.values()) == 2)
        worker = next(iter(dev.workers.values()))
        await dev.wait_until(lambda: worker.status == agent.WS_FULL)
        await dev.create_room("c")
        await dev.wait_until(lambda: any(j.room == "c" and j.done for j in dev.jobs.values()))
        third = next(j for j in dev.jobs.values() if j.room == "c")
        assert third.dropped and not third.worker_id
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


async def test_embedded() -> None:
    async with run_cli(["examples/embedded.py"]) as cli:
        assert await cli.wait() == 0
    assert any(line.startswith("registered as AW_") for line in cli.lines)
    assert any(line.endswith("ended with status JS_SUCCESS") for line in cli.lines)


async def test_legacy_worker(dev: DevServer) -> None:
    async with run_cli(["examples/legacy_worker.py", "start"], env=env(dev)) as cli:
        await cli.wait_for("registered worker")
        await dev.create_room("old-school")
        await cli.wait_for("hello from the legacy worker")
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


# -- examples that join the room (the rtc extra; WebRTC needs a non-loopback address) ----------


@pytest.fixture
async def rtc_dev(rtc_address: str) -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0, rtc_address=rtc_address) as server:
        yield server


@asynccontextmanager
async def room_example(dev: DevServer, script: str, room: str, *,
                       dispatched_by_name: bool = False) -> AsyncIterator[CliProcess]:
    """Run an example with ``start``, create its room, and after the block stop it with
    SIGTERM, which lets running jobs finish: the room closes (and its job ends) 1 s after
    the last participant left, not the default 20 s."""
    async with run_cli([f"examples/{script}", "start"], env=env(dev)) as cli:
        await cli.wait_for("registered worker")
        # a named agent is dispatched explicitly; else the room's creation dispatches it
        agents = [RoomAgentDispatch(agent_name="nobody")] if dispatched_by_name else None
        await dev.create_room(room, departure_timeout=1, agents=agents)
        yield cli
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


async def test_hello_participant(rtc_dev: DevServer) -> None:
    from room_helpers import join

    async with room_example(rtc_dev, "hello_participant.py", "lobby") as cli, \
            join(rtc_dev, "lobby", "user1") as user:
        hello = await user.expect("hello world")
        assert hello.kind == "text:hello-world"
        await cli.wait_for("said hello in room 'lobby'")


async def test_greeter(rtc_dev: DevServer) -> None:
    from room_helpers import join

    async with room_example(rtc_dev, "greeter.py", "hall", dispatched_by_name=True):
        async with join(rtc_dev, "hall", "early") as early:
            await rtc_dev.create_dispatch("hall", "greeter")
            assert (await early.expect("Hello, early!")).kind == "text:greeting"
            async with join(rtc_dev, "hall", "late") as late:
                await late.expect("Hello, late!")
            async with join(rtc_dev, "hall", "caller", kind="sip") as caller:
                await caller.expect("Thanks for calling.")


async def test_rpc_responder(rtc_dev: DevServer) -> None:
    from livekit import rtc

    from room_helpers import join

    async with room_example(rtc_dev, "rpc_responder.py", "calc",
                            dispatched_by_name=True) as cli, \
            join(rtc_dev, "calc", "user1") as user:
        async def whoami(data: rtc.RpcInvocationData) -> str:
            return "a test"

        user.room.local_participant.register_rpc_method("whoami", whoami)
        with user.room.events("participant_connected") as joined:
            await rtc_dev.create_dispatch("calc", "rpc-responder")
            responder = (await joined.receive()).args[0].identity
        await cli.wait_for("user1 says they are 'a test'")
        me = user.room.local_participant
        assert await me.perform_rpc(destination_identity=responder, method="add",
                                    payload='{"a": 1, "b": 2}') == "3"
        with pytest.raises(rtc.RpcError) as error:
            await me.perform_rpc(destination_identity=responder, method="add",
                                 payload="nope")
        assert error.value.code == rtc.RpcError.ErrorCode.APPLICATION_ERROR
