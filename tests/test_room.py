"""Agents in their rooms, for real: job processes join the dev server's rooms through the
official realtime SDK (WebRTC, data channels) under trio, and talk with test participants
that use the same SDK through ``trio_agents.room``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio
from livekit import rtc
from livekit.protocol import agent

from proc_helpers import watching_logs
from room_helpers import RtcGate, agent_server, dispatch, join, say_bye, talk_both_ways
from trio_agents.devserver import DevServer, open_dev_server

pytestmark = pytest.mark.slow


@pytest.fixture
async def dev(rtc_address: str) -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0, rtc_address=rtc_address) as server:
        yield server


async def ended(dev: DevServer, job_id: str) -> tuple[int, str]:
    with trio.fail_after(15):
        await dev.wait_until(lambda: dev.jobs[job_id].ended)
    return dev.jobs[job_id].status, dev.jobs[job_id].error


async def test_agent_joins_talks_both_ways_and_leaves_on_shutdown(dev: DevServer) -> None:
    async with agent_server(dev), join(dev, "talk", "user1") as user:
        job_id = await dispatch(dev, "talk", scenario="echo")
        timing = json.loads(await user.expect_prefix("timing:"))
        assert timing["connected"] - timing["entry"] < 1.0, timing  # joined within 1 s
        hello = await user.expect("hello world")
        assert hello.kind == "text:hello-world" and hello.sender.startswith("agent-")
        agent_identity = hello.sender
        assert agent_identity in user.room.remote_participants

        # user → agent and back: data (with a topic, to one identity), text, RPC; agent → user
        await talk_both_ways(user, agent_identity)
        # ctx.shutdown() leaves the room and the job succeeds
        await say_bye(user, agent_identity)
        assert await ended(dev, job_id) == (agent.JS_SUCCESS, "")


async def test_metadata_and_attribute_changes_reach_the_agent(dev: DevServer) -> None:
    async with agent_server(dev), join(dev, "meta", "user1") as user:
        await dispatch(dev, "meta", scenario="echo")
        await user.expect("hello world")
        await user.room.local_participant.set_metadata("busy")
        assert await user.expect_prefix("metadata:user1:") == "busy"
        await user.room.local_participant.set_attributes({"lang": "fr"})
        assert json.loads(await user.expect_prefix("attributes:user1:")) == {"lang": "fr"}
        from livekit.protocol import room as room_proto

        async with dev_api(dev) as api:
            await api.room.update_room_metadata(
                room_proto.UpdateRoomMetadataRequest(room="meta", metadata="v2"))
            assert await user.expect_prefix("room-metadata:") == "v2"
            # data from the server itself (Twirp SendData) arrives over the data channel
            await api.room.send_data(room_proto.SendDataRequest(
                room="meta", data=b"from the server", topic="notice",
                destination_identities=["user1"]))
            notice = await user.expect("from the server")
            assert (notice.kind, notice.sender) == ("data:notice", "")


def dev_api(dev: DevServer):  # type: ignore[no-untyped-def]
    from trio_agents.api import LiveKitAPI

    return LiveKitAPI(dev.url, dev.api_key, dev.api_secret)


async def test_wait_for_participant_present_and_later(dev: DevServer) -> None:
    async with agent_server(dev), join(dev, "wait", "first") as first:
        await dispatch(dev, "wait", scenario="wait", identity="late")
        assert await first.expect_prefix("found:") == "first"
        async with join(dev, "wait", "late"):
            assert await first.expect_prefix("found:") == "late"


async def test_participant_entrypoints_run_for_present_and_later_participants_by_kind(
        dev: DevServer) -> None:
    async with agent_server(dev), join(dev, "greet", "early") as early:
        await dispatch(dev, "greet", scenario="greeter")
        await early.expect("hello:early")
        async with join(dev, "greet", "phone", kind="sip"):
            await early.expect("sip:phone")
            async with join(dev, "greet", "late"):
                await early.expect("hello:late")
                await early.room.local_participant.publish_data(b"report")
                seen = json.loads(await early.expect_prefix("seen:"))
    # "hello" runs for the default kinds (standard, SIP, connector), "sip" for SIP only
    assert seen == ["hello:early", "hello:late", "hello:phone", "sip:phone", "twice:refused"]


async def test_deleting_the_room_ends_the_job(dev: DevServer) -> None:
    with watching_logs() as logs:
        async with agent_server(dev), join(dev, "doomed", "user1") as user:
            job_id = await dispatch(dev, "doomed", scenario="echo")
            pid = json.loads(await user.expect_prefix("timing:"))["pid"]
            await user.expect("hello world")  # its entrypoint has returned
            with user.room.events("disconnected") as events:
                await dev.delete_room("doomed")
                with trio.fail_after(10):
                    event = await events.receive()
            assert event.args[0] == rtc.DisconnectReason.ROOM_DELETED
            # as livekit-server: no JobTermination, the job ends because its room
            # disconnected, and reports its own outcome
            assert await ended(dev, job_id) == (agent.JS_SUCCESS, "")
            with trio.fail_after(10):
                await logs.wait_for(f"job process {pid} exited (exit code 0)")


async def test_a_connect_cancelled_half_way_is_settled_and_the_next_job_connects(
        dev: DevServer) -> None:
    gate = RtcGate(dev.port)
    with watching_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(gate.run)
            async with agent_server(dev, url=gate.url):
                job_id = await dispatch(dev, "slow", scenario="cancelled_connect",
                                        cancel_after=0.5, linger=20)
                with trio.fail_after(10):
                    await gate.holding.wait()  # the SDK's connect is in flight, held here
                with trio.fail_after(10):
                    await logs.wait_for("connect cancelled: True")
                gate.open()  # the native connect completes now, with nobody waiting for it
                with trio.fail_after(10):
                    await logs.wait_for("completed after all; leaving it")
                # The settled connect left the room, so the server ends the job (its agent
                # left) and the worker stops the process. Had the connect stayed unobserved,
                # the job would linger 20 s in the room, and 15 s in the native client would
                # panic and the SDK SIGTERM the job process.
                with trio.fail_after(30):
                    await dev.wait_until(lambda: dev.jobs[job_id].ended)
                assert (dev.jobs[job_id].status, dev.jobs[job_id].error) == (
                    agent.JS_FAILED, "agent worker left the room")
                with trio.fail_after(30):
                    await logs.wait_for("exited (exit code 0)")
                assert not logs.matching("panic") and not logs.matching("SIGTERM")
                # the next job, in a new process, connects normally
                async with join(dev, "after", "user1") as user:
                    await dispatch(dev, "after", scenario="echo")
                    await user.expect("hello world")
            nursery.cancel_scope.cancel()
