"""In the room, for real: the job process joins the server's room over WebRTC (the realtime
SDK), talks with a test participant, and is terminated when the room is deleted; against the
real livekit-server and the dev server."""

from __future__ import annotations

import json

import trio
from livekit.protocol import agent_dispatch
from livekit.protocol import room as room_proto

from agents import room_agent
from proc_helpers import watching_logs
from room_helpers import join, say_bye, talk_both_ways
from trio_agents.room import Room

from .conftest import REAL, WAIT, Backend, make_agent_server, running


async def send_room_agent(backend: Backend, room: str, **params: object) -> None:
    async with backend.api() as api:
        await api.agent_dispatch.create_dispatch(agent_dispatch.CreateAgentDispatchRequest(
            room=room, agent_name="room-agent", metadata=json.dumps(params)))


async def participant_present(room: Room, identity: str) -> None:
    with room.events("participant_connected") as joined, trio.fail_after(30):
        while identity not in room.remote_participants:
            await joined.receive()


async def test_room_join_data_and_rpc_both_ways(backend: Backend) -> None:
    server = make_agent_server(backend, room_agent.entrypoint, agent_name="room-agent")
    async with running(server) as worker_id, join(backend, "talk", "user1") as user:
        await send_room_agent(backend, "talk", scenario="echo")
        job = await backend.job_in("talk", worker_id)
        hello = await user.expect("hello world")
        assert hello.kind == "text:hello-world"
        agent_identity = hello.sender
        # livekit-server may announce the agent after its first data (it batches
        # participant updates of non-publishers): wait for it
        await participant_present(user.room, agent_identity)

        await talk_both_ways(user, agent_identity)
        # the job says goodbye: it reports success before its agent leaves the room
        await say_bye(user, agent_identity)
        ended = await backend.ended(job.id)
        assert (ended.status, ended.error) == ("JS_SUCCESS", "")


async def test_deleting_the_room_disconnects_the_agent_and_its_job_ends(
        backend: Backend) -> None:
    """DeleteRoom tells everyone in the room to leave (ROOM_DELETED). livekit-server sends
    the job no JobTermination: the job ends because its room disconnected, and the status it
    reports is the one the server keeps."""
    server = make_agent_server(backend, room_agent.entrypoint, agent_name="room-agent")
    with watching_logs() as logs:
        async with running(server) as worker_id:
            async with join(backend, "doomed", "user1") as user:
                await send_room_agent(backend, "doomed", scenario="echo")
                job = await backend.job_in("doomed", worker_id)
                await user.expect("hello world")  # the agent is in the room
                async with backend.api() as api:
                    await api.room.delete_room(room_proto.DeleteRoomRequest(room="doomed"))
                ended = await backend.ended(job.id)
                assert (ended.status, ended.error) == ("JS_SUCCESS", "")
            with trio.fail_after(WAIT):
                await logs.wait_for(f"job {job.id} finished (room disconnected (ROOM_DELETED))")
                await server._supervisor.wait_idle()  # type: ignore[union-attr]
            assert not logs.matching(f"LiveKit terminated job {job.id}")


async def test_removing_the_agent_ends_its_job(backend: Backend) -> None:
    """RemoveParticipant of a job's agent. livekit-server 1.8.3 only closes the participant:
    the job ends because its room disconnected (PARTICIPANT_REMOVED) and reports success. The
    dev server follows later livekit-servers (``TerminateJob`` with AGENT_LEFT_ROOM): it sends
    JobTermination and records JS_FAILED ("agent worker left the room") itself."""
    server = make_agent_server(backend, room_agent.entrypoint, agent_name="room-agent")
    with watching_logs() as logs:
        async with running(server) as worker_id, join(backend, "kick", "user1") as user:
            await send_room_agent(backend, "kick", scenario="echo")
            job = await backend.job_in("kick", worker_id)
            agent_identity = (await user.expect("hello world")).sender
            async with backend.api() as api:
                await api.room.remove_participant(room_proto.RoomParticipantIdentity(
                    room="kick", identity=agent_identity))
            ended = await backend.ended(job.id)
            with trio.fail_after(WAIT):
                await server._supervisor.wait_idle()  # type: ignore[union-attr]
            if backend.name == REAL:
                assert (ended.status, ended.error) == ("JS_SUCCESS", "")
                assert logs.matching(f"job {job.id} finished (room disconnected "
                                     "(PARTICIPANT_REMOVED))")
                assert not logs.matching(f"LiveKit terminated job {job.id}")
            else:
                assert (ended.status, ended.error) == ("JS_FAILED", "agent worker left the room")
                with trio.fail_after(WAIT):
                    await logs.wait_for(f"LiveKit terminated job {job.id}")
