"""Dispatch in the dev server (PROTOCOL.md §3): the moments jobs are requested, which worker
is asked, the 3 s availability window, assignment tokens, status tracking, termination.

Raw workers over memory streams in virtual time; ``FirstChoice`` makes the weighted pick
deterministic when several workers could be asked.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import jwt
import pytest
import trio
import trio.testing
import trio_websocket
from livekit.protocol import agent, agent_dispatch, models

from trio_agents._auth import verify_token
from trio_agents.devserver import DevServer, TwirpError, open_dev_server
from trio_agents.devserver._dispatch import Candidate, job_token, select_worker, \
    validate_registration

from devserver_helpers import (
    close_code,
    KEY,
    SECRET,
    FirstChoice,
    expect_silence,
    raw_worker,
    receive,
    registered,
    send,
)

Socket = trio_websocket.WebSocketConnection


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False, rng=FirstChoice()) as server:
        yield server


async def offer(ws: Socket) -> agent.Job:
    message = await receive(ws)
    assert message.WhichOneof("message") == "availability", message
    return message.availability.job


async def accept(ws: Socket, job: agent.Job, identity: str = "agent-x",
                 **extra: object) -> agent.JobAssignment:
    await send(ws, availability=agent.AvailabilityResponse(
        job_id=job.id, available=True, participant_identity=identity, **extra))  # type: ignore[arg-type]
    message = await receive(ws)
    assert message.WhichOneof("message") == "assignment", message
    return message.assignment


async def answer(ws: Socket, job: agent.Job, *, available: bool = False,
                 terminate: bool = False) -> None:
    await send(ws, availability=agent.AvailabilityResponse(
        job_id=job.id, available=available, terminate=terminate))


async def loaded(dev: DevServer, ws: Socket, load: float) -> None:
    """Register and report ``load``; return when the server has stored it."""
    worker_id = await registered(ws)
    await send(ws, update_worker=agent.UpdateWorkerStatus(load=load))
    await dev.wait_until(lambda: dev.workers[worker_id].load > 0)


# -- when jobs are requested ----------------------------------------------------------------


async def test_room_creation_offers_the_automatic_dispatch_at_once(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        worker_id = await registered(ws)
        t0 = trio.current_time()
        room = await dev.create_room("r", metadata="room-meta")
        job = await offer(ws)
        assert trio.current_time() == t0
        assert room.sid.startswith("RM_") and room.creation_time > 0
        assert (job.type, job.agent_name, job.room.name, job.room.sid) == (
            agent.JT_ROOM, "", "r", room.sid)
        assert job.id.startswith("AJ_") and job.dispatch_id.startswith("AD_")
        assert (job.state.status, job.state.worker_id) == (agent.JS_RUNNING, worker_id)
        assert job.state.started_at == job.state.updated_at > 0  # Unix ns
        assert dev.jobs[job.id].status == agent.JS_PENDING  # only offered so far


async def test_dispatch_by_agent_name_reaches_only_that_name(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as auto, raw_worker(dev) as named:
        await registered(auto)
        await registered(named, "bot")
        dispatch = await dev.create_dispatch("r", "bot", metadata="m", attributes={"a": "1"})
        first, second = await offer(auto), await offer(named)  # default dispatch + ours
        assert first.agent_name == "" and first.dispatch_id != dispatch.id
        assert (second.agent_name, second.dispatch_id, second.metadata, dict(second.attributes)) \
            == ("bot", dispatch.id, "m", {"a": "1"})
        await answer(auto, first, terminate=True)
        await answer(named, second, terminate=True)
        await dev.create_dispatch("r", "other")  # nobody registered as "other"
        await expect_silence(auto)
        await expect_silence(named)
    assert len(dev.jobs) == 2


async def test_room_with_agents_gets_no_default_dispatch(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as auto, raw_worker(dev) as named:
        await registered(auto)
        await registered(named, "bot")
        await dev.create_room("r", agents=[agent_dispatch.RoomAgentDispatch(agent_name="bot")])
        assert (await offer(named)).agent_name == "bot"
        await expect_silence(auto)
        assert [d.agent_name for d in dev.list_dispatches("r")] == ["bot"]
        await dev.create_room("r")  # exists: returned as it is, nothing launched
        await expect_silence(auto)


async def test_matching_includes_job_type_namespace_and_deployment(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as publisher, raw_worker(dev) as eu, raw_worker(dev) as ns:
        await registered(publisher, "bot", job_type=agent.JT_PUBLISHER)
        await registered(eu, "bot", deployment="eu")
        await registered(ns, "bot", namespace="ns")
        await dev.create_dispatch("r", "bot", deployment="eu")
        assert (await offer(eu)).deployment == "eu"
        for other in (publisher, ns):
            await expect_silence(other)
        await dev.create_dispatch("r2", "bot")  # deployment "" and namespace "": nobody
        for ws in (publisher, eu, ns):
            await expect_silence(ws)


async def test_no_worker_means_no_job_and_no_later_dispatch(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    await dev.create_room("early")
    assert dev.jobs == {}
    async with raw_worker(dev) as ws:
        await registered(ws)
        await trio.sleep(120)
        await expect_silence(ws)  # the room's job is not offered to the newcomer


async def test_participant_and_publisher_jobs(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as parts, raw_worker(dev) as pubs:
        await registered(parts, job_type=agent.JT_PARTICIPANT)
        await registered(pubs, job_type=agent.JT_PUBLISHER)
        alice = await dev.add_participant("r", "alice")
        assert alice.sid.startswith("PA_") and dev.rooms["r"].room.num_participants == 1
        job = await offer(parts)
        assert (job.type, job.participant.identity) == (agent.JT_PARTICIPANT, "alice")
        await dev.add_participant("r", "bot", kind=models.ParticipantInfo.AGENT)
        assert dev.rooms["r"].room.num_participants == 1  # agents are not counted
        await dev.publish_track("r", "bot")  # dependent participants never trigger jobs
        await dev.publish_track("r", "alice")
        job = await offer(pubs)
        assert (job.type, job.participant.identity) == (agent.JT_PUBLISHER, "alice")
        await dev.publish_track("r", "alice")  # only the first publication counts
        await expect_silence(pubs)
        await expect_silence(parts)  # bot joining started nothing
        assert dev.rooms["r"].room.num_publishers == 1


async def test_create_dispatch_launches_for_participants_already_there(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    await dev.add_participant("r", "alice")
    await dev.publish_track("r", "alice")
    async with raw_worker(dev) as parts, raw_worker(dev) as pubs:
        await registered(parts, "x", job_type=agent.JT_PARTICIPANT)
        await registered(pubs, "x", job_type=agent.JT_PUBLISHER)
        await dev.create_dispatch("r", "x")
        assert (await offer(parts)).participant.identity == "alice"
        assert (await offer(pubs)).participant.identity == "alice"


# -- which worker is asked ------------------------------------------------------------------


async def test_rejection_moves_the_offer_to_the_next_worker(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as first, raw_worker(dev) as second:
        await registered(first)
        second_id = await registered(second)
        await dev.create_room("r")
        job = await offer(first)
        await answer(first, job, available=False)
        retried = await offer(second)
        assert retried.id == job.id and retried.state.worker_id == second_id
        await accept(second, retried)
        record = dev.jobs[job.id]
        await dev.wait_until(lambda: record.done)
        assert (record.worker_id, record.attempts, record.status) == (
            second_id, 2, agent.JS_RUNNING)
        await expect_silence(first)  # the first worker is not asked again


async def test_everyone_rejecting_drops_the_job(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await registered(ws)
        await dev.create_room("r")
        job = await offer(ws)
        await answer(ws, job)
        record = dev.jobs[job.id]
        await dev.wait_until(lambda: record.done)
        assert (record.dropped, record.attempts, record.worker_id) == (
            "no workers available", 1, "")


async def test_terminate_ends_the_job_without_asking_anyone_else(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as first, raw_worker(dev) as second:
        await registered(first)
        await registered(second)
        await dev.create_room("r")
        job = await offer(first)
        await answer(first, job, available=True, terminate=True)  # terminate wins
        record = dev.jobs[job.id]
        await dev.wait_until(lambda: record.done)
        assert (record.status, record.attempts, record.token, record.dropped) == (
            agent.JS_SUCCESS, 1, "", "")
        assert record.job.state.ended_at > 0
        await expect_silence(first)  # no assignment
        await expect_silence(second)  # and no second offer


async def test_full_workers_are_skipped(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as full, raw_worker(dev) as free:
        full_id = await registered(full)
        free_id = await registered(free)
        await send(full, update_worker=agent.UpdateWorkerStatus(status=agent.WS_FULL, load=0.0))
        await dev.wait_until(lambda: dev.workers[full_id].status == agent.WS_FULL)
        await dev.create_room("r")
        assert (await offer(free)).state.worker_id == free_id
        await expect_silence(full)


async def test_all_loads_at_target_drop_the_job_without_an_offer(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as a, raw_worker(dev) as b:
        await loaded(dev, a, 0.7)
        await loaded(dev, b, 0.95)
        t0 = trio.current_time()
        await dev.create_room("r")
        (record,) = dev.jobs.values()
        await dev.wait_until(lambda: record.done)
        assert trio.current_time() == t0
        assert (record.dropped, record.attempts) == ("unavailable: no servers available", 0)
        await expect_silence(a)
        await expect_silence(b)


async def test_one_worker_under_target_lets_the_heavier_be_retried(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    """The 0.7 rule is the node's claim (once); inside the node any load < 1 can be asked."""
    async with raw_worker(dev) as light, raw_worker(dev) as heavy:
        await loaded(dev, light, 0.6)
        await loaded(dev, heavy, 0.9)
        await dev.create_room("r")
        job = await offer(light)
        await answer(light, job)
        assert (await offer(heavy)).id == job.id


async def test_the_window_is_three_seconds_for_all_attempts_together(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as first, raw_worker(dev) as second:
        await registered(first)
        await registered(second)
        t0 = trio.current_time()
        await dev.create_room("r")
        job = await offer(first)
        await trio.sleep(2.0)
        await answer(first, job)
        await offer(second)  # at t0 + 2 s, and never answered
        assert trio.current_time() - t0 == 2.0
        record = dev.jobs[job.id]
        await dev.wait_until(lambda: record.done)
        assert trio.current_time() - t0 == 3.0  # not 2 + 3
        assert record.dropped == "context deadline exceeded"


async def test_late_acceptance_gets_no_assignment(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        worker_id = await registered(ws)
        await dev.create_room("r")
        job = await offer(ws)
        await trio.sleep(3.5)
        await send(ws, availability=agent.AvailabilityResponse(
            job_id=job.id, available=True, participant_identity="late"))
        await expect_silence(ws)  # no assignment, and the connection is still open
        assert dev.jobs[job.id].worker_id == "" and dev.workers[worker_id].running_job_ids == set()


async def test_availability_timeout_is_configurable(
    autojump_clock: trio.testing.MockClock
) -> None:
    async with open_dev_server(listen=False, availability_timeout=10.0) as dev:
        async with raw_worker(dev) as ws:
            await registered(ws)
            t0 = trio.current_time()
            await dev.create_room("r")
            job = await offer(ws)
            await trio.sleep(9.0)
            await accept(ws, job)
            assert trio.current_time() - t0 == 9.0


async def test_a_worker_dropped_mid_offer_passes_it_on_at_once(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as first, raw_worker(dev) as second:
        first_id = await registered(first)
        await registered(second)
        await dev.create_room("r")
        job = await offer(first)
        await trio.sleep(1.0)
        t1 = trio.current_time()
        dev.drop_worker(first_id)
        assert (await offer(second)).id == job.id
        assert trio.current_time() == t1
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await first.get_message()
        assert close_code(info.value) == 1006


async def test_drop_worker_of_an_unknown_id_says_so(dev: DevServer) -> None:
    with pytest.raises(KeyError, match="AW_nope"):
        dev.drop_worker("AW_nope")


# -- assignment and after -----------------------------------------------------------------------


async def test_assignment_token_is_built_like_livekit_server(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        permissions = models.ParticipantPermission(
            can_subscribe=True, can_publish=False, can_publish_data=True, hidden=True,
            can_update_metadata=True, can_subscribe_metrics=True, can_manage_agent_session=True,
            can_publish_sources=[models.TrackSource.MICROPHONE])
        await registered(ws, "bot", allowed_permissions=permissions)
        await dev.create_dispatch("r", "bot")
        job = await offer(ws)
        assignment = await accept(
            ws, job, "me", participant_name="Me", participant_metadata="pm",
            participant_attributes={"lk.agent.name": "spoofed", "x": "y"})
        assert assignment.job.id == job.id and not assignment.HasField("url")
        assert assignment.job.state.participant_identity == "me"
        assert verify_token(assignment.token, {KEY: SECRET}).api_key == KEY  # signed with ours
        claims = jwt.decode(assignment.token, options={"verify_signature": False})
        assert claims["iss"] == KEY
        assert claims["exp"] - claims["nbf"] == 3600
        assert (claims["sub"], claims["name"], claims["metadata"], claims["kind"]) == (
            "me", "Me", "pm", "agent")
        assert claims["attributes"] == {"lk.agent.name": "bot", "x": "y"}  # overwritten
        assert claims["video"] == {
            "roomJoin": True, "agent": True, "room": "r", "canSubscribe": True,
            "canPublish": False, "canPublishData": True, "hidden": True,
            "canUpdateOwnMetadata": True, "canSubscribeMetrics": True}  # no sources, no session
        record = dev.jobs[job.id]
        assert record.token == assignment.token and record.response is not None
        assert record.response.participant_name == "Me"
        dispatch = dev.list_dispatches("r")[-1]
        assert [j.id for j in dispatch.state.jobs] == [job.id]


async def test_job_status_tracking(dev: DevServer, autojump_clock: trio.testing.MockClock) -> None:
    async with raw_worker(dev) as ws, raw_worker(dev) as other:
        worker_id = await registered(ws)
        await registered(other, "someone-else")
        await dev.create_room("r")
        job = await offer(ws)
        await accept(ws, job)
        record = dev.jobs[job.id]
        assert dev.workers[worker_id].running_job_ids == {job.id}
        started = record.job.state.started_at
        await send(other, update_job=agent.UpdateJobStatus(job_id=job.id, status=agent.JS_FAILED))
        await send(ws, update_job=agent.UpdateJobStatus(job_id="AJ_unknown",
                                                        status=agent.JS_FAILED))
        await send(ws, update_job=agent.UpdateJobStatus(job_id=job.id, status=agent.JS_RUNNING))
        await dev.wait_until(lambda: len(record.history) == 2)
        await send(ws, update_job=agent.UpdateJobStatus(job_id=job.id, status=agent.JS_FAILED,
                                                        error="boom"))
        await dev.wait_until(lambda: record.ended)
        assert record.history == [agent.JS_RUNNING, agent.JS_RUNNING, agent.JS_FAILED]
        assert (record.status, record.error, record.status_name) == (
            agent.JS_FAILED, "boom", "JS_FAILED")
        assert record.job.state.started_at == started  # set once, when it left PENDING
        assert record.job.state.ended_at >= started
        assert dev.workers[worker_id].running_job_ids == set()
        await send(ws, update_job=agent.UpdateJobStatus(job_id=job.id, status=agent.JS_SUCCESS))
        await expect_silence(ws)
        assert record.status == agent.JS_FAILED  # an ended job takes no more updates


async def test_deleting_the_room_terminates_its_running_jobs(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await registered(ws)
        await dev.create_room("r")
        job = await offer(ws)
        await accept(ws, job)
        await dev.delete_room("r")
        assert (await receive(ws)).termination.job_id == job.id
        record = dev.jobs[job.id]
        assert (record.status, record.error) == (agent.JS_FAILED, "agent worker left the room")
        assert "r" not in dev.rooms
        await send(ws, update_job=agent.UpdateJobStatus(job_id=job.id, status=agent.JS_SUCCESS))
        await expect_silence(ws)
        assert record.status == agent.JS_FAILED  # ended by the server: later reports ignored
        with pytest.raises(TwirpError) as info:
            await dev.delete_room("r")
        assert (info.value.code, info.value.msg) == ("not_found", "requested room does not exist")


async def test_deleting_a_dispatch_terminates_its_jobs_as_success(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await registered(ws, "bot")
        dispatch = await dev.create_dispatch("r", "bot")
        job = await offer(ws)
        await accept(ws, job)
        deleted = await dev.delete_dispatch(dispatch.id, "r")
        assert deleted.state.deleted_at > 0
        assert (await receive(ws)).termination.job_id == job.id
        assert (dev.jobs[job.id].status, dev.jobs[job.id].error) == (agent.JS_SUCCESS, "")
        assert dispatch.id not in {d.id for d in dev.list_dispatches("r")}
        with pytest.raises(TwirpError, match="dispatch ID not found"):
            await dev.delete_dispatch(dispatch.id, "r")


async def test_deleting_a_dispatch_during_its_offer_terminates_after_the_assignment(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await registered(ws, "bot")
        dispatch = await dev.create_dispatch("r", "bot")
        job = await offer(ws)
        await dev.delete_dispatch(dispatch.id, "r")
        await accept(ws, job)
        assert (await receive(ws)).termination.job_id == job.id
        await dev.wait_until(lambda: dev.jobs[job.id].ended)
        assert dev.jobs[job.id].status == agent.JS_SUCCESS


async def test_the_agent_leaving_terminates_its_job(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await registered(ws)
        await dev.create_room("r")
        job = await offer(ws)
        await accept(ws, job, identity="agent-1")
        await dev.add_participant("r", "agent-1", kind=models.ParticipantInfo.AGENT)
        await dev.remove_participant("r", "agent-1")
        assert (await receive(ws)).termination.job_id == job.id
        assert dev.jobs[job.id].error == "agent worker left the room"


async def test_a_dropped_worker_keeps_its_jobs_running_and_unreachable(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        worker_id = await registered(ws)
        await dev.create_room("r")
        job = await offer(ws)
        await accept(ws, job)
    await dev.wait_until(lambda: worker_id not in dev.workers)
    await dev.delete_room("r")  # nothing to send it to
    assert dev.jobs[job.id].status == agent.JS_RUNNING


async def test_simulate_job_offers_to_the_same_worker_only(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws, raw_worker(dev) as other:
        await registered(ws, "sim")
        await registered(other, "sim")
        await send(ws, simulate_job=agent.SimulateJobRequest(
            type=agent.JT_ROOM, room=models.Room(name="sim-room"),
            participant=models.ParticipantInfo(identity="alice")))
        job = await offer(ws)
        assert (job.type, job.room.name, job.participant.identity, job.agent_name) == (
            agent.JT_PUBLISHER, "sim-room", "alice", "sim")  # the request's type is ignored
        t0 = trio.current_time()
        record = dev.jobs[job.id]
        await dev.wait_until(lambda: record.done)
        assert trio.current_time() - t0 == 10.0  # AssignJobTimeout, not the 3 s window
        assert record.dropped == "availability timeout"
        await expect_silence(other)
        assert "sim-room" not in dev.rooms


# -- the Python API's own checks ------------------------------------------------------------


@pytest.mark.parametrize(("call", "message"), [
    (lambda dev: dev.create_room(""), "room name cannot be empty"),
    (lambda dev: dev.create_room("x" * 257), "room name exceeds the limit of 256 bytes"),
    (lambda dev: dev.create_dispatch("r", "a", deployment="a_b"), "invalid deployment 'a_b'"),
    (lambda dev: dev.create_dispatch("r", "a", metadata="m" * (512 * 1024 + 1)), "metadata"),
    (lambda dev: dev.publish_track("r", "nobody"), "participant does not exist"),
])
async def test_invalid_calls_raise_twirp_errors(dev: DevServer, call, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TwirpError, match=message):
        await call(dev)
    assert dev.rooms == {}


async def test_rejoining_with_the_same_identity_replaces_the_participant(
    dev: DevServer
) -> None:
    first = await dev.add_participant("r", "alice")
    second = await dev.add_participant("r", "alice")
    assert first.sid != second.sid and dev.rooms["r"].room.num_participants == 1
    await dev.remove_participant("r", "alice")
    assert dev.rooms["r"].room.num_participants == 0


async def test_an_error_in_the_block_is_raised_as_itself() -> None:
    with pytest.raises(LookupError):
        async with open_dev_server(listen=False):
            raise LookupError("mine")


async def test_bad_options_are_config_errors() -> None:
    from trio_agents import ConfigError

    with pytest.raises(ConfigError, match="availability timeout"):
        async with open_dev_server(listen=False, availability_timeout=0):
            pass


# -- pure dispatch rules ------------------------------------------------------------------------


def test_selection_rules() -> None:
    rng = random.Random(1)
    at_target = [Candidate("a", agent.WS_AVAILABLE, 0.7), Candidate("b", agent.WS_AVAILABLE, 0.9)]
    assert select_worker(at_target, set(), rng, first_attempt=True) == (
        None, "unavailable: no servers available")
    assert select_worker(at_target, {"a"}, rng, first_attempt=False) == ("b", "")  # a retry
    mixed = [Candidate("a", agent.WS_FULL, 0.0), Candidate("b", agent.WS_AVAILABLE, 0.2)]
    assert select_worker(mixed, set(), rng, first_attempt=True) == ("b", "")
    assert select_worker(mixed, {"b"}, rng, first_attempt=False) == (None, "no workers available")
    spent = [Candidate("a", agent.WS_AVAILABLE, 1.0)]
    assert select_worker(spent, set(), rng, first_attempt=False) == (
        None, "no workers with sufficient capacity")
    assert select_worker([], set(), rng, first_attempt=True) == (
        None, "unavailable: no servers available")
    weighted = [Candidate("light", agent.WS_AVAILABLE, 0.0),
                Candidate("heavy", agent.WS_AVAILABLE, 0.9)]
    picks = [select_worker(weighted, set(), rng, first_attempt=True)[0] for _ in range(2000)]
    assert 0.87 < picks.count("light") / 2000 < 0.95  # weights 1.0 vs 0.1: 10/11


def test_registration_validation() -> None:
    assert validate_registration(agent.RegisterWorkerRequest(
        type=agent.JT_PARTICIPANT, deployment="prod-eu.1")) is None
    assert validate_registration(agent.RegisterWorkerRequest(deployment="d" * 64)) is None
    for bad in ("a b", "a_b", "x" * 65, "tab\t", "del\x7f", "é" * 33):
        assert validate_registration(agent.RegisterWorkerRequest(deployment=bad)) is not None
    assert validate_registration(agent.RegisterWorkerRequest(type=3)) == "unknown job type 3"  # type: ignore[arg-type]


def test_job_token_without_identity_still_verifies() -> None:
    token = job_token(api_key=KEY, api_secret=SECRET, room="r", agent_name="",
                      permissions=models.ParticipantPermission(),
                      response=agent.AvailabilityResponse())
    claims = verify_token(token, {KEY: SECRET})
    assert claims.identity == "" and dict(claims.attributes) == {"lk.agent.name": ""}
    assert claims.video is not None and not claims.video.can_publish


# -- rooms close by themselves (§3.12) --------------------------------------------------------


async def test_a_room_nobody_joins_closes_after_its_empty_timeout(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    t0 = trio.current_time()
    await dev.create_room("default")
    await dev.create_room("short", empty_timeout=30)
    await dev.wait_until(lambda: "short" not in dev.rooms)
    assert trio.current_time() - t0 == 30
    await dev.wait_until(lambda: "default" not in dev.rooms)
    assert trio.current_time() - t0 == 300


async def test_a_room_closes_departure_timeout_after_the_last_one_left(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    t0 = trio.current_time()
    await dev.create_room("r", empty_timeout=30)
    await trio.sleep(10)
    await dev.add_participant("r", "alice")
    await dev.add_participant("r", "bob")
    await trio.sleep(100)  # past the empty timeout: people are there
    await dev.remove_participant("r", "alice")
    await trio.sleep(100)
    await dev.remove_participant("r", "bob")
    await dev.add_participant("r", "agent", kind=models.ParticipantInfo.AGENT)  # no matter
    await dev.wait_until(lambda: "r" not in dev.rooms)
    assert trio.current_time() - t0 == 210 + 20


async def test_closing_by_itself_terminates_only_jobs_whose_agent_is_in_the_room(
    dev: DevServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_worker(dev) as ws:
        await registered(ws)
        t0 = trio.current_time()
        await dev.create_room("r", empty_timeout=60)
        await dev.create_dispatch("r", "")  # a second automatic-dispatch job
        joined, absent = await offer(ws), await offer(ws)
        await accept(ws, joined, identity="agent-in")
        await accept(ws, absent, identity="agent-out")
        await dev.add_participant("r", "agent-in", kind=models.ParticipantInfo.AGENT)
        message = await receive(ws)  # at the empty timeout: the agent does not keep it open
        assert message.termination.job_id == joined.id and trio.current_time() - t0 == 60
        assert dev.jobs[joined.id].error == "agent worker left the room"
        assert dev.jobs[absent.id].status == agent.JS_RUNNING
        assert "r" not in dev.rooms
        await expect_silence(ws)
