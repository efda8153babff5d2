"""The sans-io /agent protocol core: every transition and every illegal message, no sockets."""

from __future__ import annotations

import pytest
from livekit.protocol import agent, models

from trio_agents._errors import LocalProtocolError, RemoteProtocolError
from trio_agents._protocol import (
    AgentProtocol,
    Ignored,
    JobAssigned,
    JobOffered,
    JobTerminated,
    Pong,
    Registered,
    State,
)


def new_protocol() -> AgentProtocol:
    return AgentProtocol(
        agent_name="bot",
        job_type=agent.JT_ROOM,
        version="0.1.0",
        permissions=models.ParticipantPermission(agent=True, can_publish=True),
    )


def registered() -> AgentProtocol:
    proto = new_protocol()
    proto.register()
    event = proto.receive(server(register=agent.RegisterWorkerResponse(worker_id="AW_1")))
    assert isinstance(event, Registered)
    return proto


def server(**kw: object) -> agent.ServerMessage:
    return agent.ServerMessage(**kw)  # type: ignore[arg-type]


def offer(job_id: str = "AJ_1") -> agent.ServerMessage:
    return server(
        availability=agent.AvailabilityRequest(
            job=agent.Job(id=job_id, type=agent.JT_ROOM, room=models.Room(name="r"))
        )
    )


def accept(job_id: str = "AJ_1", identity: str = "agent-AJ_1") -> agent.AvailabilityResponse:
    return agent.AvailabilityResponse(job_id=job_id, available=True, participant_identity=identity)


def test_register_message_carries_identity_of_the_worker() -> None:
    proto = new_protocol()
    states = [proto.state]
    msg = proto.register()
    states.append(proto.state)
    assert states == [State.IDLE, State.REGISTERING]
    assert msg.WhichOneof("message") == "register"
    assert msg.register.agent_name == "bot"
    assert msg.register.type == agent.JT_ROOM
    assert msg.register.version == "0.1.0"
    assert msg.register.allowed_permissions.agent
    assert msg.register.deployment == ""


def test_registration_response_moves_to_registered() -> None:
    proto = new_protocol()
    proto.register()
    info = models.ServerInfo(version="1.13.5", protocol=17)
    event = proto.receive(server(register=agent.RegisterWorkerResponse(worker_id="AW_x", server_info=info)))
    assert event == Registered("AW_x", info)
    assert proto.state is State.REGISTERED
    assert proto.worker_id == "AW_x"


def test_register_twice_is_a_local_error() -> None:
    proto = new_protocol()
    proto.register()
    with pytest.raises(LocalProtocolError):
        proto.register()


@pytest.mark.parametrize(
    "message",
    [
        offer(),
        server(termination=agent.JobTermination(job_id="AJ_1")),
        server(pong=agent.WorkerPong(last_timestamp=1, timestamp=2)),
        server(assignment=agent.JobAssignment(job=agent.Job(id="AJ_1"), token="t")),
    ],
)
def test_anything_but_register_first_is_remote_error(message: agent.ServerMessage) -> None:
    proto = new_protocol()
    proto.register()
    with pytest.raises(RemoteProtocolError, match="expected RegisterWorkerResponse"):
        proto.receive(message)


def test_register_response_without_id_is_remote_error() -> None:
    proto = new_protocol()
    proto.register()
    with pytest.raises(RemoteProtocolError, match="without a worker_id"):
        proto.receive(server(register=agent.RegisterWorkerResponse()))


def test_message_before_register_sent_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        new_protocol().receive(offer())


def test_empty_server_message_is_remote_error() -> None:
    with pytest.raises(RemoteProtocolError, match="no message"):
        registered().receive(agent.ServerMessage())


def test_second_register_response_is_remote_error() -> None:
    proto = registered()
    with pytest.raises(RemoteProtocolError, match="second"):
        proto.receive(server(register=agent.RegisterWorkerResponse(worker_id="AW_2")))


def test_garbage_bytes_are_remote_error() -> None:
    proto = registered()
    with pytest.raises(RemoteProtocolError, match="malformed"):
        proto.receive_data(b"\xff\xff\xff\xff")


def test_text_frames_are_ignored() -> None:
    assert isinstance(registered().receive_data('{"pong": {}}'), Ignored)


def test_offer_answer_assignment_cycle() -> None:
    proto = registered()
    event = proto.receive_data(offer().SerializeToString())
    assert isinstance(event, JobOffered) and event.job.id == "AJ_1" and not event.resuming
    msg = proto.answer(accept())
    assert msg.availability.available and msg.availability.participant_identity == "agent-AJ_1"
    assigned = proto.receive(
        server(assignment=agent.JobAssignment(job=agent.Job(id="AJ_1"), token="tok"))
    )
    assert assigned == JobAssigned(agent.Job(id="AJ_1"), None, "tok")


def test_assignment_url_is_passed_when_set() -> None:
    proto = registered()
    proto.receive(offer())
    proto.answer(accept())
    event = proto.receive(
        server(assignment=agent.JobAssignment(job=agent.Job(id="AJ_1"), token="t", url="wss://x"))
    )
    assert isinstance(event, JobAssigned) and event.url == "wss://x"


def test_answer_twice_is_local_error() -> None:
    proto = registered()
    proto.receive(offer())
    proto.answer(agent.AvailabilityResponse(job_id="AJ_1", available=False))
    with pytest.raises(LocalProtocolError, match="no open offer"):
        proto.answer(agent.AvailabilityResponse(job_id="AJ_1", available=False))


def test_answer_without_offer_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        registered().answer(accept("AJ_nope"))


def test_accept_without_identity_is_local_error() -> None:
    proto = registered()
    proto.receive(offer())
    with pytest.raises(LocalProtocolError, match="identity"):
        proto.answer(agent.AvailabilityResponse(job_id="AJ_1", available=True))


def test_rejected_job_assignment_is_ignored() -> None:
    proto = registered()
    proto.receive(offer())
    proto.answer(agent.AvailabilityResponse(job_id="AJ_1", available=False))
    event = proto.receive(server(assignment=agent.JobAssignment(job=agent.Job(id="AJ_1"))))
    assert isinstance(event, Ignored) and "unknown job" in event.reason


def test_forgotten_job_assignment_is_ignored() -> None:
    proto = registered()
    proto.receive(offer())
    proto.answer(accept())
    proto.forget("AJ_1")
    event = proto.receive(server(assignment=agent.JobAssignment(job=agent.Job(id="AJ_1"))))
    assert isinstance(event, Ignored)


def test_duplicate_offer_is_ignored() -> None:
    proto = registered()
    proto.receive(offer())
    assert isinstance(proto.receive(offer()), Ignored)
    proto.answer(accept())
    assert isinstance(proto.receive(offer()), Ignored)


def test_offer_without_job_id_is_remote_error() -> None:
    with pytest.raises(RemoteProtocolError):
        registered().receive(server(availability=agent.AvailabilityRequest(job=agent.Job())))


def test_termination_and_pong_events() -> None:
    proto = registered()
    assert proto.receive(server(termination=agent.JobTermination(job_id="AJ_9"))) == JobTerminated("AJ_9")
    assert proto.receive(server(pong=agent.WorkerPong(last_timestamp=5, timestamp=7))) == Pong(5, 7)


@pytest.mark.parametrize(
    "command",
    [
        lambda p: p.update_worker(status=agent.WS_AVAILABLE, load=0.1, job_count=0),
        lambda p: p.update_job("AJ_1", agent.JS_RUNNING),
        lambda p: p.migrate(["AJ_1"]),
        lambda p: p.simulate_job(models.Room(name="r")),
        lambda p: p.answer(accept()),
    ],
)
def test_commands_need_registration(command: object) -> None:
    proto = new_protocol()
    proto.register()
    with pytest.raises(LocalProtocolError, match="register first|no open offer"):
        command(proto)  # type: ignore[operator]


def test_status_job_and_migrate_messages() -> None:
    proto = registered()
    status = proto.update_worker(status=agent.WS_FULL, load=0.5, job_count=3).update_worker
    assert (status.status, round(status.load, 3), status.job_count) == (agent.WS_FULL, 0.5, 3)
    update = proto.update_job("AJ_1", agent.JS_FAILED, "boom").update_job
    assert (update.job_id, update.status, update.error) == ("AJ_1", agent.JS_FAILED, "boom")
    assert list(proto.migrate(["a", "b"]).migrate_job.job_ids) == ["a", "b"]


def test_ping_is_allowed_while_registering_but_not_idle() -> None:
    proto = new_protocol()
    with pytest.raises(LocalProtocolError):
        proto.ping(1)
    proto.register()
    assert proto.ping(42).ping.timestamp == 42


def test_simulate_job_type_follows_participant() -> None:
    proto = registered()
    room = models.Room(name="r")
    assert proto.simulate_job(room).simulate_job.type == agent.JT_ROOM
    msg = proto.simulate_job(room, models.ParticipantInfo(identity="u")).simulate_job
    assert msg.type == agent.JT_PUBLISHER and msg.participant.identity == "u"


def test_closed_protocol_rejects_everything() -> None:
    proto = registered()
    proto.receive(offer())
    proto.close()
    assert proto.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        proto.receive(offer("AJ_2"))
    with pytest.raises(LocalProtocolError):
        proto.answer(accept())
