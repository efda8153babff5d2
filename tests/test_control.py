"""The control plane against the real dev server, in virtual time over in-memory streams.

Every timer here (request deadline, availability window, assignment timeout, backoff) is
asserted exactly with ``autojump_clock``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator

import jwt
import pytest
import trio
import trio.testing
from livekit.protocol import agent

from trio_agents._auth import verify_token
from trio_agents._errors import AuthenticationError, ServerConnectionError
from trio_agents._jobs import JobRequest
from trio_agents.devserver import DevServer, open_dev_server
from trio_agents.testing import memory_opener
from trio_agents._control import OpenStream

from control_helpers import FixedRandom, RecordingSupervisor, constant_load, make_control, running


# pytest-trio only runs a test under a clock the test itself asks for: every test that uses
# the dev server takes ``autojump_clock`` directly.
@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False, api_key="devkey", api_secret="secret") as server:
        yield server


@pytest.fixture
def opener(dev: DevServer, nursery: trio.Nursery) -> OpenStream:
    return memory_opener(dev, nursery)


async def test_registers_and_reports_status(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    control, _ = make_control(opener, agent_name="")
    async with running(control) as worker_id:
        assert worker_id.startswith("AW_")
        assert control.registered
        await dev.wait_until(lambda: worker_id in dev.workers)
        assert dev.workers[worker_id].status == agent.WS_AVAILABLE


async def test_room_creation_dispatches_and_job_runs(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    control, supervisor = make_control(opener)
    async with running(control) as worker_id:
        t0 = trio.current_time()
        await dev.create_room("lobby")
        await supervisor.wait_launched(1)
        info = supervisor.launched[0]
        assert trio.current_time() == t0  # no timer on the happy path
        assert info.job.room.name == "lobby" and info.worker_id == worker_id
        assert info.accept_arguments.identity == f"agent-{info.job.id}"
        assert info.url == "ws://devserver:7880"
        await dev.wait_until(lambda: dev.jobs[info.job.id].status == agent.JS_RUNNING)
        supervisor.finish(info.job.id, agent.JS_FAILED, "ValueError: boom")
        await dev.wait_until(lambda: dev.jobs[info.job.id].status == agent.JS_FAILED)
        assert dev.jobs[info.job.id].error == "ValueError: boom"


async def test_explicit_dispatch_by_agent_name(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    named, named_sup = make_control(opener, agent_name="helper")
    anonymous, anon_sup = make_control(opener)
    async with running(named), running(anonymous):
        await dev.create_room("r1")  # default dispatch: only the anonymous worker
        await anon_sup.wait_launched(1)
        await dev.create_dispatch("r1", "helper", metadata='{"task": "x"}')
        await named_sup.wait_launched(1)
        job = named_sup.launched[0].job
        assert job.agent_name == "helper" and job.metadata == '{"task": "x"}'
        assert len(anon_sup.launched) == 1


async def test_accept_arguments_reach_the_assignment(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    async def on_request(req: JobRequest) -> None:
        await req.accept(name="Helper", identity="helper-1", metadata="meta",
                         attributes={"color": "blue"})

    control, supervisor = make_control(opener, request_fnc=on_request, agent_name="helper")
    async with running(control):
        await dev.create_dispatch("r2", "helper")
        await supervisor.wait_launched(1)
        info = supervisor.launched[0]
        args = info.accept_arguments
        assert (args.name, args.identity, args.metadata) == ("Helper", "helper-1", "meta")
        assert dict(args.attributes) == {"color": "blue", "lk.agent.name": "helper"}
        claims = jwt.decode(info.token, options={"verify_signature": False})
        verify_token(info.token, {"devkey": "secret"})  # signed with the worker's own secret
        assert claims["sub"] == "helper-1" and claims["name"] == "Helper"
        assert claims["metadata"] == "meta" and claims["kind"] == "agent"
        assert claims["attributes"] == {"color": "blue", "lk.agent.name": "helper"}
        assert claims["video"]["room"] == "r2" and claims["video"]["roomJoin"]


class FirstCandidate(random.Random):
    """The dev server's weighted pick, made deterministic: the first registered worker."""

    def choices(self, population, weights=None, *, cum_weights=None, k=1):  # type: ignore[no-untyped-def]
        return [population[0]]


async def test_reject_sends_the_job_to_the_next_worker(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async def refuse(req: JobRequest) -> None:
        await req.reject()

    async with open_dev_server(listen=False, rng=FirstCandidate()) as dev:
        opener = memory_opener(dev, nursery)
        picky, picky_sup = make_control(opener, request_fnc=refuse)
        willing, willing_sup = make_control(opener)
        async with running(picky):
            async with running(willing):
                for n in range(3):
                    await dev.create_room(f"room-{n}")
                await willing_sup.wait_launched(3)
                # each job went to the picky worker first, which said no
                assert [job.attempts for job in dev.jobs.values()] == [2, 2, 2]
        assert picky_sup.launched == []


@pytest.mark.parametrize("behaviour", ["silent", "raises"])
async def test_unanswered_or_raising_handler_rejects(
    dev: DevServer, opener: OpenStream, behaviour: str, caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def handler(req: JobRequest) -> None:
        if behaviour == "raises":
            raise RuntimeError("handler bug")

    odd, odd_sup = make_control(opener, request_fnc=handler)
    async with running(odd):  # alone, so the offer surely comes to it
        t0 = trio.current_time()
        await dev.create_room("room")
        job_id = await _only_job_id(dev)
        await dev.wait_until(lambda: dev.jobs[job_id].done)
        assert trio.current_time() == t0  # the rejection is immediate, not a timeout
        assert dev.jobs[job_id].attempts == 1 and dev.jobs[job_id].dropped  # no one else
    assert odd_sup.launched == []
    expected = "raised" if behaviour == "raises" else "without accepting or rejecting"
    assert any(expected in r.getMessage() for r in caplog.records)


async def test_slow_handler_is_cut_at_the_request_deadline(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    async def slow(req: JobRequest) -> None:
        await trio.sleep(100)

    slowpoke, slow_sup = make_control(opener, request_fnc=slow, request_timeout=2.5)
    async with running(slowpoke):
        t0 = trio.current_time()
        await dev.create_room("r")
        job_id = await _only_job_id(dev)
        # our 2.5 s deadline answers "not available" before the server's 3 s window closes
        await dev.wait_until(lambda: dev.jobs[job_id].attempts >= 1 and dev.jobs[job_id].done)
        assert trio.current_time() - t0 == pytest.approx(2.5)
    assert slow_sup.launched == []


async def test_late_answer_is_never_assigned(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    outcome: list[BaseException] = []
    failed = trio.Event()

    async def late(req: JobRequest) -> None:
        await trio.sleep(4)  # past the server's 3 s window
        try:
            await req.accept()
        except Exception as exc:
            outcome.append(exc)
            failed.set()
            raise

    control, supervisor = make_control(opener, request_fnc=late, request_timeout=10.0)
    async with running(control):
        t0 = trio.current_time()
        await dev.create_room("r")
        await failed.wait()
        # accepted at t0+4, then the 7.5 s assignment timeout
        assert trio.current_time() - t0 == pytest.approx(4 + 7.5, abs=0.5)
    assert type(outcome[0]).__name__ == "AssignmentTimeoutError"
    assert supervisor.launched == []


async def test_full_worker_gets_no_job(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    control, supervisor = make_control(opener, load=constant_load(0.8), load_threshold=0.7)
    async with running(control) as worker_id:
        await dev.wait_until(lambda: dev.workers[worker_id].status == agent.WS_FULL)
        assert dev.workers[worker_id].load == pytest.approx(0.8)
        await dev.create_room("r")
        job_id = await _only_job_id(dev)
        await dev.wait_until(lambda: dev.jobs[job_id].done)
    assert supervisor.launched == []


async def test_drain_refuses_new_offers(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    control, supervisor = make_control(opener)
    async with running(control) as worker_id:
        await dev.create_room("before")
        await supervisor.wait_launched(1)
        control.start_draining()
        await dev.wait_until(lambda: dev.workers[worker_id].status == agent.WS_FULL)
        await dev.create_room("after")
        await control.wait_offers_done()
        assert [i.job.room.name for i in supervisor.launched] == ["before"]
        assert len(supervisor.running_jobs) == 1  # the running job is untouched


async def test_termination_is_routed_to_the_supervisor(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    control, supervisor = make_control(opener)
    async with running(control):
        await dev.create_room("doomed")
        await supervisor.wait_launched(1)
        job_id = supervisor.launched[0].job.id
        await dev.delete_room("doomed")
        await supervisor.wait_idle()
        assert supervisor.terminated == [(job_id, "terminated by the LiveKit server")]


async def test_dropped_connection_reregisters_and_reports_running_jobs(
    dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock
) -> None:
    control, supervisor = make_control(opener)
    async with running(control) as first_id:
        await dev.create_room("keep")
        await supervisor.wait_launched(1)
        job_id = supervisor.launched[0].job.id
        t0 = trio.current_time()
        dev.drop_worker(first_id)
        await dev.wait_until(lambda: bool(control.worker_id) and control.worker_id != first_id
                             and control.worker_id in dev.workers)
        assert trio.current_time() == t0  # the first retry after a registration is immediate
        second = dev.workers[control.worker_id]
        await dev.wait_until(lambda: list(second.migrated_job_ids) == [job_id])
        assert [i.job.id for i in supervisor.running_jobs] == [job_id]
        assert supervisor.terminated == []


async def test_bad_secret_is_one_clear_error_without_retry(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    control, _ = make_control(opener, api_secret="wrong")
    t0 = trio.current_time()
    with pytest.raises(AuthenticationError, match="rejected our credentials.*401"):
        await control.run()
    assert trio.current_time() == t0
    assert dev.workers == {} or len(dev.workers) == 0


async def test_max_retry_then_clear_error(autojump_clock: trio.testing.MockClock) -> None:
    attempts: list[float] = []

    async def refuse(host: str, port: int, tls: bool) -> trio.abc.Stream:
        attempts.append(trio.current_time())
        raise OSError(111, "Connection refused")

    control, _ = make_control(refuse, max_retry=4)
    t0 = trio.current_time()
    with pytest.raises(ServerConnectionError, match="after 5 attempts.*Connection refused"):
        await control.run()
    assert [round(t - t0, 6) for t in attempts] == [0, 0, 2, 6, 12]
    assert "after 5 attempts" in control.failure


async def test_backoff_is_not_reset_by_a_socket_that_never_registers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[float] = []

    async def accept_then_hang_up(host: str, port: int, tls: bool) -> trio.abc.Stream:
        attempts.append(trio.current_time())
        client, server = trio.testing.memory_stream_pair()
        await server.aclose()  # the TCP connection opens, then closes before any upgrade
        return client

    control, _ = make_control(accept_then_hang_up, max_retry=3)
    with pytest.raises(ServerConnectionError, match="no websocket"):
        await control.run()
    # each attempt waits out the 10 s connect timeout, then backs off 0, 2, 4 s: a server that
    # accepts sockets but never registers us is not retried in a hot loop
    assert [round(t - attempts[0], 6) for t in attempts] == [0, 10, 22, 36]


async def test_status_change_is_reported_at_once(dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock) -> None:
    load = {"value": 0.1}

    async def sample() -> object:
        return load["value"]

    control, _ = make_control(opener, load=sample, load_threshold=0.7, status_interval=2.5)
    async with running(control) as worker_id:
        await dev.wait_until(lambda: dev.workers[worker_id].load == pytest.approx(0.1))
        t0 = trio.current_time()
        load["value"] = 0.9
        await dev.wait_until(lambda: dev.workers[worker_id].status == agent.WS_FULL)
        # within one load sample (0.5 s), not at the next 2.5 s tick
        assert trio.current_time() - t0 <= 0.5


async def test_bad_load_values_are_clamped(dev: DevServer, opener: OpenStream, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock) -> None:
    sampled = trio.Event()
    calls = 0

    async def nan_load() -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            sampled.set()
        return float("nan")

    control, _ = make_control(opener, load=nan_load, load_threshold=0.7)
    caplog.set_level(logging.WARNING)
    async with running(control) as worker_id:
        await sampled.wait()
        await control.flush()
        assert dev.workers[worker_id].status == agent.WS_AVAILABLE
    warnings = [r for r in caplog.records if "load_fnc returned" in r.getMessage()]
    assert len(warnings) == 1  # three NaN samples, one warning


async def _only_job_id(dev: DevServer) -> str:
    await dev.wait_until(lambda: len(dev.jobs) == 1)
    return next(iter(dev.jobs))


def test_fixed_random_has_no_jitter() -> None:
    assert FixedRandom().random() == 0.0


@pytest.mark.parametrize("max_retry", [0, 3])
async def test_a_cancel_that_lands_on_the_last_retry_stays_a_cancel(
    autojump_clock: trio.testing.MockClock, max_retry: int,
) -> None:
    """The server is being stopped (its scope cancelled) just as the last attempt fails: the
    cancel must win. It used to surface as ``ServerConnectionError`` (the attempt's error
    was turned into the final failure with no checkpoint in between), which
    ``AgentServer.run`` then raised instead of stopping quietly."""
    attempts = 0
    scope = trio.CancelScope()

    async def failing(host: str, port: int, tls: bool) -> trio.abc.Stream:
        nonlocal attempts
        attempts += 1
        if attempts == max_retry + 1:
            scope.cancel()  # lands while this attempt fails, before any checkpoint
        raise OSError(111, "Connection refused")

    control, _ = make_control(failing, max_retry=max_retry)
    with scope:
        await control.run()
    assert scope.cancelled_caught
    assert attempts == max_retry + 1
    assert control.failure == ""


@pytest.mark.parametrize("idle", [1, 2, 8])
async def test_capacity_is_exact_whatever_the_idle_processes(
    dev: DevServer, opener: OpenStream, autojump_clock: trio.testing.MockClock, idle: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """load = jobs / 2 with threshold 1.0 holds exactly 2 jobs. The old guess (threshold /
    num_idle_processes per offer) took all 5 simultaneous offers with 8 idle processes and
    only 1 with 1 idle process."""
    supervisor = RecordingSupervisor()

    async def two_jobs_fill_it() -> object:
        return len(supervisor.running_jobs) / 2

    control, _ = make_control(opener, supervisor=supervisor, load=two_jobs_fill_it,
                              load_threshold=1.0, num_idle_processes=idle)
    caplog.set_level(logging.INFO, logger="trio_agents")
    async with running(control):
        for n in range(5):  # five offers at the same instant
            await dev.create_room(f"room-{n}")
        await dev.wait_until(lambda: len(dev.jobs) == 5 and all(j.done for j in dev.jobs.values()))
        assert len(supervisor.launched) == 2
        assert sum(1 for j in dev.jobs.values() if j.dropped) == 3
    refusals = [r.getMessage() for r in caplog.records if "refusing job" in r.getMessage()]
    assert refusals and "reserved slot" in refusals[0]  # the real reason, not "load=0.0"
