"""Pieces of the job process that need no child process: outcome rules, callback signatures,
the setup backoff schedule, the thread executor (the child loop on a thread), and the end of
a job in its room (the child loop in the test's own trio run, under a mock clock)."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from livekit.protocol import agent

from trio_agents import _child, _ipc
from trio_agents._context import JobProcess, _takes_reason
from trio_agents._loading import FunctionRef
from trio_agents._options import JobExecutorType
from trio_agents._proc import INTERRUPTED, outcome
from trio_agents._supervisor import setup_retry_delay

from agents import scripted
from proc_helpers import job_info, make_config, running_supervisor, watching_logs

OK = _ipc.JobFinished(outcome=_ipc.SUCCESS, reason="entrypoint returned")
CRASHED = _ipc.JobFinished(outcome=_ipc.FAILED, error="ValueError: x", reason="job crashed")
#: What a job in its room says before leaving it; reported as if its process exits with 0.
ENDING = _ipc.JobEnding(outcome=_ipc.SUCCESS, user_initiated=True, reason="done in the room")
ENDING_CRASHED = _ipc.JobEnding(outcome=_ipc.FAILED, error="ValueError: x", reason="job crashed")


@pytest.mark.parametrize(("returncode", "finished", "kill", "escalated", "expected"), [
    (0, OK, None, "", (agent.JS_SUCCESS, "")),
    (0, CRASHED, None, "", (agent.JS_FAILED, "ValueError: x")),  # the peer says success here
    (3, OK, None, "", (agent.JS_FAILED, "the job finished but its process exit code 3")),
    (3, None, None, "", (agent.JS_FAILED, "exit code 3")),
    (-11, None, None, "", (agent.JS_FAILED, "killed by signal SIGSEGV")),
    (0, None, None, "", (agent.JS_FAILED,
                         "the job process exited (code 0) before the job finished")),
    (-9, None, "killed: no pong for 60 s", "", (agent.JS_FAILED, "killed: no pong for 60 s")),
    (-15, None, None, "did not stop within 1 s of the shutdown request",
     (agent.JS_FAILED, "did not stop within 1 s of the shutdown request; "
                       "killed by signal SIGTERM")),
    (0, ENDING, None, "", (agent.JS_SUCCESS, "")),
    (0, ENDING_CRASHED, None, "", (agent.JS_FAILED, "ValueError: x")),
    (0, _ipc.JobEnding(outcome=_ipc.FAILED), None, "", (agent.JS_FAILED, "the job failed")),
])
def test_outcome(returncode: int, finished: _ipc.JobFinished | _ipc.JobEnding | None,
                 kill: str | None,
                 escalated: str, expected: tuple[int, str]) -> None:
    assert outcome(returncode, finished, kill_reason=kill, escalated=escalated) == expected


STOPPED = _ipc.JobFinished(outcome=_ipc.SUCCESS, reason="server shutting down")


@pytest.mark.parametrize(("returncode", "finished", "escalated", "expected"), [
    # wound down cleanly, but only because the server stopped it: not a success
    (0, STOPPED, "", (agent.JS_FAILED, INTERRUPTED)),
    (-15, None, "did not stop within 1 s of the shutdown request",
     (agent.JS_FAILED, f"{INTERRUPTED}; did not stop within 1 s of the shutdown request")),
    # a crash during the wind-down still names the crash
    (0, CRASHED, "", (agent.JS_FAILED, "ValueError: x")),
])
def test_outcome_of_a_job_the_server_interrupted(
    returncode: int, finished: _ipc.JobFinished | None, escalated: str,
    expected: tuple[int, str],
) -> None:
    assert outcome(returncode, finished, escalated=escalated, interrupted=True) == expected


def test_setup_retry_schedule() -> None:
    assert [setup_retry_delay(n) for n in range(1, 10)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    with pytest.raises(ValueError):
        setup_retry_delay(0)


class _Holder:
    async def with_reason(self, reason: str) -> None: ...

    async def without(self) -> None: ...

    async def __call__(self, reason: str = "") -> None: ...


async def _two(a: str, b: str) -> None: ...


async def _kw_only(*, reason: str) -> None: ...


def test_shutdown_callback_arity_from_the_signature() -> None:
    holder = _Holder()
    assert _takes_reason(holder.with_reason)  # bound method: self is not counted
    assert not _takes_reason(holder.without)
    assert _takes_reason(holder)  # callable object
    assert _takes_reason(functools.partial(_two, "a"))
    assert not _takes_reason(functools.partial(_two, "a", "b"))
    with pytest.raises(TypeError, match="must take no argument or one"):
        _takes_reason(_two)
    with pytest.raises(TypeError, match="must take no argument or one"):
        _takes_reason(_kw_only)


async def test_thread_executor_runs_the_same_loop() -> None:
    config = make_config(job_executor_type=JobExecutorType.THREAD, prewarm_fnc=scripted.setup,
                         num_idle_processes=1)
    with watching_logs() as logs:
        async with running_supervisor(config) as (sup, reports):
            await sup.wait_pool_ready()
            await sup.launch(job_info("t1", "callbacks"))
            assert await reports.wait_final("t1") == (agent.JS_SUCCESS, "")
            await sup.launch(job_info("t2", "raise"))
            assert await reports.wait_final("t2") == (agent.JS_FAILED,
                                                      "ValueError: scripted failure")
            await sup.launch(job_info("t3", "sleep:3600"))
            sup.terminate("t3", "stop")
            assert await reports.wait_final("t3") == (agent.JS_SUCCESS, "")
    started = logs.matching("started callbacks")[0]
    assert started.userdata == started.process  # type: ignore[attr-defined]  # same process
    assert logs.matching("callback with_reason ran: callbacks test")


async def test_thread_executor_warns_that_memory_limits_do_not_apply() -> None:
    with watching_logs() as logs:
        make_config(job_executor_type=JobExecutorType.THREAD, job_memory_limit_mb=100)
        from trio_agents._supervisor import ProcessSupervisor

        ProcessSupervisor(make_config(job_executor_type=JobExecutorType.THREAD,
                                      job_memory_limit_mb=100), report=lambda *a: None)
    assert logs.matching("is not enforced with JobExecutorType.THREAD")
    assert all(r.levelno == logging.WARNING for r in logs.matching("not enforced"))


async def test_child_loop_answers_pings_before_a_job() -> None:
    # The child loop over a socketpair, in-process (thread executor machinery), driven by hand.
    import socket

    from trio_agents import _child
    from trio_agents._thread_executor import ThreadRun

    ours, theirs = socket.socketpair()
    chan = _ipc.IpcChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    thread = ThreadRun(theirs, _child.Functions(entrypoint=scripted.entrypoint))
    async with trio.open_nursery() as nursery:
        await nursery.start(thread.run)
        await chan.send(_ipc.InitializeRequest(entrypoint=FunctionRef("", "")))
        assert await chan.receive() == _ipc.InitializeResponse()
        await chan.send(_ipc.Ping(seq=1, sent_at=2.5))
        assert await chan.receive() == _ipc.Pong(seq=1, sent_at=2.5)
        await chan.send(_ipc.ShutdownRequest(reason="idle"))
        assert await thread.wait() == 0
        with pytest.raises(trio.EndOfChannel):
            await chan.receive()
    await chan.aclose()



# -- the end of a job in its room -------------------------------------------------------------


@asynccontextmanager
async def job_loop(metadata: str) -> AsyncIterator[_ipc.IpcChannel]:
    """A job process's job loop running ``scripted.entrypoint`` in this trio run (so a mock
    clock drives its timeouts); the test is its server, at the other end of a socketpair.
    Yields once the entrypoint runs; leaving waits for the loop to end."""
    ours, theirs = socket.socketpair()
    chan = _ipc.IpcChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    job = _child._Job(req=_ipc.InitializeRequest(entrypoint=FunctionRef("", "")),
                      functions=_child.Functions(entrypoint=scripted.entrypoint),
                      proc=JobProcess(executor_type=JobExecutorType.THREAD, http_proxy=None),
                      outbox=_child._Outbox(theirs), handler=None, in_thread=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.serve, theirs)
            await chan.send(_ipc.StartJob.from_info(job_info("j", metadata)))
            assert await chan.receive() == _ipc.JobStarted()
            yield chan
    finally:
        await chan.aclose()
        theirs.close()


async def test_a_job_in_its_room_waits_for_the_ack_before_leaving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with watching_logs() as logs:
        async with job_loop("joined") as chan:
            assert await chan.receive() == ENDING
            begun = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()  # the job does all it can without us
            assert not logs.matching("left the room")
            await chan.send(_ipc.JobEndingAck())
            assert await chan.receive() == _ipc.JobFinished(
                outcome=_ipc.SUCCESS, user_initiated=True, reason="done in the room")
            assert trio.current_time() == begun  # left on the ack, not on the timeout
    assert logs.matching("left the room")
    assert not logs.matching("did not acknowledge")


async def test_a_job_whose_server_never_acks_leaves_after_the_bounded_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with watching_logs() as logs:
        async with job_loop("joined_raise") as chan:
            assert await chan.receive() == _ipc.JobEnding(
                outcome=_ipc.FAILED, error="ValueError: scripted failure in the room",
                reason="job crashed")
            begun = trio.current_time()
            assert await chan.receive() == _ipc.JobFinished(
                outcome=_ipc.FAILED, error="ValueError: scripted failure in the room",
                reason="job crashed")
            assert trio.current_time() - begun == pytest.approx(_child.ENDING_ACK_TIMEOUT)
    assert logs.matching("left the room")
    (warning,) = logs.matching("did not acknowledge the end of the job within 2.0 s")
    assert warning.levelno == logging.WARNING


async def test_a_job_that_never_joined_its_room_does_not_announce_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with job_loop("ok") as chan:
        assert await chan.receive() == _ipc.JobFinished(outcome=_ipc.SUCCESS,
                                                        reason="entrypoint returned")
