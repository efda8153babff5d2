"""ProcessSupervisor with real job processes running the scripted agents of tests/agents."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio
from livekit.protocol import agent, models

from trio_agents._errors import InitializeTimeout, JobProcessError
from trio_agents._options import JobExecutorType
from trio_agents._proc import INTERRUPTED
from trio_agents._supervisor import ProcessSupervisor

from agents import scripted
from proc_helpers import (
    FINAL, Reports, alive, job_info, make_config, open_fds, running_supervisor, watching_logs,
)


async def test_prewarmed_process_runs_the_job_with_setup_userdata() -> None:
    config = make_config(prewarm_fnc=scripted.setup, num_idle_processes=1)
    with watching_logs() as logs:
        async with running_supervisor(config) as (sup, reports):
            await sup.wait_pool_ready()
            (idle,) = sup.idle_processes
            await sup.launch(job_info("j1", "ok", attributes={"colour": "blue"}))
            assert reports.statuses("j1")[0] == agent.JS_RUNNING
            assert await reports.wait_final("j1") == (agent.JS_SUCCESS, "")
            record = await logs.wait_for("started ok")
    # The job ran in the prewarmed process, and saw what setup_fnc stored there.
    assert record.pid_seen == idle.pid == record.userdata  # type: ignore[attr-defined]
    # The child's record reached our logging with the job's fields and its context fields.
    assert record.name == "agents.scripted"
    assert (record.job_id, record.room, record.agent_name) == ("j1", "room-j1", "tester")  # type: ignore[attr-defined]
    assert record.scripted == "ok"  # type: ignore[attr-defined]
    assert record.process == idle.pid


async def test_twenty_jobs_in_parallel_each_in_its_own_process() -> None:
    with watching_logs() as logs:
        async with running_supervisor(make_config()) as (sup, reports):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(sup.launch, job_info(f"p{i}", "sleep:3600"))
            assert len(sup.running_jobs) == 20
            for i in range(20):
                sup.terminate(f"p{i}", "enough")
            for i in range(20):
                assert await reports.wait_final(f"p{i}") == (agent.JS_SUCCESS, "")
    pids = {r.pid_seen for r in logs.matching("started sleep")}  # type: ignore[attr-defined]
    assert len(pids) == 20


async def test_crashes_are_failures_with_their_cause_while_others_succeed() -> None:
    jobs = {"exit": "exit3", "raise": "raise", "segv": "segv", "a": "ok", "b": "sleep:0.3",
            "c": "shutdown"}
    async with running_supervisor(make_config()) as (sup, reports):
        async with trio.open_nursery() as nursery:
            for job_id, action in jobs.items():
                nursery.start_soon(sup.launch, job_info(job_id, action))
        results = {job_id: await reports.wait_final(job_id) for job_id in jobs}
    assert results["exit"] == (agent.JS_FAILED, "exit code 3")
    assert results["raise"] == (agent.JS_FAILED, "ValueError: scripted failure")
    assert results["segv"] == (agent.JS_FAILED, "killed by signal SIGSEGV")
    assert results["a"] == results["b"] == results["c"] == (agent.JS_SUCCESS, "")


async def test_blocked_and_sigterm_ignoring_jobs_are_gone_soon_after_terminate() -> None:
    config = make_config(shutdown_process_timeout=1.0)
    async with running_supervisor(config) as (sup, reports):
        await sup.launch(job_info("block", "block"))
        await sup.launch(job_info("deaf", "ignore_term"))
        pids = [h.pid for h in sup.job_processes]
        begun = trio.current_time()
        sup.terminate("block", "test")
        sup.terminate("deaf", "test")
        blocked = await reports.wait_final("block")
        deaf = await reports.wait_final("deaf")
        elapsed = trio.current_time() - begun
    assert elapsed < 1.0 + 1.0
    assert not any(alive(pid) for pid in pids)
    assert blocked == (agent.JS_FAILED, "did not stop within 1 s of the shutdown request; "
                                        "killed by signal SIGTERM")
    assert deaf == (agent.JS_FAILED, "did not stop within 1 s of the shutdown request; "
                                     "killed by signal SIGKILL")


async def test_sleeping_job_stops_at_once_on_terminate() -> None:
    async with running_supervisor(make_config(shutdown_process_timeout=5.0)) as (sup, reports):
        await sup.launch(job_info("s", "sleep:3600"))
        begun = trio.current_time()
        sup.terminate("s", "bye")
        assert await reports.wait_final("s") == (agent.JS_SUCCESS, "")
        assert trio.current_time() - begun < 0.5


async def test_grandchildren_do_not_survive_the_job() -> None:
    with watching_logs() as logs:
        async with running_supervisor(make_config()) as (sup, reports):
            await sup.launch(job_info("g", "grandchildren"))
            record = await logs.wait_for("spawned grandchildren")
            pids = [int(p) for p in record.grandchildren.split(",")]  # type: ignore[attr-defined]
            assert all(alive(pid) for pid in pids)
            sup.terminate("g", "done")
            assert await reports.wait_final("g") == (agent.JS_SUCCESS, "")
    assert not any(alive(pid) for pid in pids)
    assert logs.matching("left 2 process(es) behind; killed them")


async def test_memory_limit_kills_the_job() -> None:
    config = make_config(job_memory_limit_mb=150, memory_sample_interval=0.1)
    async with running_supervisor(config) as (sup, reports):
        await sup.launch(job_info("fat", "memory:300"))
        status, error = await reports.wait_final("fat")
    assert status == agent.JS_FAILED
    assert error.startswith("killed: memory limit 150 MB exceeded (")
    assert "pss" in error


async def test_memory_warning_without_limit_is_advisory() -> None:
    config = make_config(job_memory_warn_mb=100, memory_sample_interval=0.1)
    with watching_logs() as logs:
        async with running_supervisor(config) as (sup, reports):
            await sup.launch(job_info("big", "memory:150"))
            record = await logs.wait_for("above job_memory_warn_mb 100 MB (advisory")
            sup.terminate("big", "seen")
            assert await reports.wait_final("big") == (agent.JS_SUCCESS, "")
    assert record.job_id == "big"  # type: ignore[attr-defined]


async def test_missing_pongs_kill_the_job() -> None:
    config = make_config(ping_interval=0.1, ping_timeout=0.5, high_ping_threshold=0.05)
    async with running_supervisor(config) as (sup, reports):
        await sup.launch(job_info("hung", "block"))
        status, error = await reports.wait_final("hung")
    assert (status, error) == (agent.JS_FAILED,
                               "killed: no pong for 0.5 s (the job blocks its event loop)")


async def test_idle_process_killed_from_outside_is_replaced_and_never_used() -> None:
    config = make_config(num_idle_processes=1)
    with watching_logs() as logs:
        async with running_supervisor(config) as (sup, reports):
            await sup.wait_pool_ready()
            (victim,) = sup.idle_processes
            os.kill(victim.pid, signal.SIGKILL)
            await logs.wait_for("idle job process")
            await sup.wait_pool_ready()
            (fresh,) = sup.idle_processes
            assert fresh.pid != victim.pid
            await sup.launch(job_info("j", "ok"))
            assert await reports.wait_final("j") == (agent.JS_SUCCESS, "")
    assert logs.matching("started ok")[0].pid_seen == fresh.pid  # type: ignore[attr-defined]
    assert [c[0] for c in reports.calls] == ["j", "j"]  # nothing reported for the idle one


async def test_failing_setup_backs_off_and_logs_once() -> None:
    config = make_config(prewarm_fnc=scripted.failing_setup, num_idle_processes=1)
    with watching_logs() as logs:
        async with running_supervisor(config) as (sup, reports):
            await logs.wait_for("initialization failed again (2 in a row)")
            begun = trio.current_time()
            await logs.wait_for("initialization failed again (3 in a row)")
            # third retry waited for the 2nd backoff step (1 s) — no respawn loop
            assert trio.current_time() - begun >= 0.9
            with pytest.raises(JobProcessError, match="setup_fnc failed: RuntimeError: setup"):
                await sup.launch(job_info("j", "ok"))
            status, error = reports.final("j") or (None, "")
    errors = logs.matching("could not be initialized")
    assert len(errors) == 1
    assert "RuntimeError: setup is broken" in errors[0].getMessage()
    assert "Traceback" in errors[0].getMessage()  # the child's traceback, once
    assert status == agent.JS_FAILED and "setup is broken" in error


async def test_setup_timeout_is_enforced_by_the_parent() -> None:
    config = make_config(prewarm_fnc=scripted.slow_setup, initialize_process_timeout=0.5)
    async with running_supervisor(config) as (sup, reports):
        with pytest.raises(InitializeTimeout, match="did not finish within"):
            await sup.launch(job_info("j", "ok"))
        assert reports.final("j") is not None


async def test_bad_frame_from_the_child_is_a_clean_failure() -> None:
    async with running_supervisor(make_config()) as (sup, reports):
        await sup.launch(job_info("bad", "garbage"))
        status, error = await reports.wait_final("bad")
        await sup.launch(job_info("good", "ok"))  # the server carries on
        assert await reports.wait_final("good") == (agent.JS_SUCCESS, "")
    assert status == agent.JS_FAILED
    assert error.startswith("job process broke the IPC protocol: IPC frame of 4294967295 bytes")


async def test_no_fd_leak_over_fifty_jobs() -> None:
    async with running_supervisor(make_config()) as (sup, reports):
        await sup.launch(job_info("warmup", "ok"))
        await reports.wait_final("warmup")
        before = open_fds()
        for batch in range(5):
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(sup.launch, job_info(f"f{batch}-{i}", "ok"))
            await sup.wait_idle()
        assert open_fds() == before
    assert sum(1 for _, s, _ in reports.calls if s == agent.JS_SUCCESS) == 51


async def test_wait_idle_waits_for_every_job() -> None:
    async with running_supervisor(make_config()) as (sup, reports):
        for job_id, length in (("short", 0.1), ("mid", 0.4), ("long", 0.8)):
            await sup.launch(job_info(job_id, f"sleep:{length}"))
        await sup.wait_idle()
        assert [reports.final(j) for j in ("short", "mid", "long")] == [(agent.JS_SUCCESS, "")] * 3
        assert not sup.running_jobs


async def test_shutdown_callbacks_all_run() -> None:
    with watching_logs() as logs:
        async with running_supervisor(make_config()) as (sup, reports):
            await sup.launch(job_info("cb", "callbacks"))
            assert await reports.wait_final("cb") == (agent.JS_SUCCESS, "")
    ran = {r.getMessage() for r in logs.records if r.getMessage().startswith("callback")}
    assert ran == {"callback bound ran: callbacks test", "callback partial ran",
                   "callback plain ran", "callback with_reason ran: callbacks test"}
    (failure,) = logs.matching("shutdown callback")
    assert "failed" in failure.getMessage() and "callback boom" in (failure.exc_text or "")


async def test_cancelling_run_stops_every_job_and_reports_it() -> None:
    reports_seen: list[tuple[str, int, str]] = []
    sup = ProcessSupervisor(make_config(num_idle_processes=1),
                            report=lambda *call: reports_seen.append(call))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.launch(job_info("a", "sleep:3600"))
        await sup.launch(job_info("b", "sleep:3600"))
        pids = [h.pid for h in sup.job_processes]
        nursery.cancel_scope.cancel()
    finals = {(j, s, e) for j, s, e in reports_seen if s != agent.JS_RUNNING}
    assert finals == {("a", agent.JS_FAILED, INTERRUPTED), ("b", agent.JS_FAILED, INTERRUPTED)}
    assert not any(alive(pid) for pid in pids)


async def test_publisher_job_sees_its_publisher() -> None:
    info = job_info("pub", "ok")
    info.job.type = agent.JT_PUBLISHER
    info.job.participant.CopyFrom(models.ParticipantInfo(identity="alice"))
    with watching_logs() as logs:
        async with running_supervisor(make_config()) as (sup, reports):
            await sup.launch(info)
            assert await reports.wait_final("pub") == (agent.JS_SUCCESS, "")
    assert logs.matching("started ok")


# -- a job that joined its room (scripted.JoinedRoom stands in for the room) ------------------


@pytest.mark.parametrize("executor", [JobExecutorType.PROCESS, JobExecutorType.THREAD])
@pytest.mark.parametrize(("metadata", "expected"), [
    ("joined", (agent.JS_SUCCESS, "")),
    ("joined_raise", (agent.JS_FAILED, "ValueError: scripted failure in the room")),
])
async def test_a_job_in_its_room_is_reported_once_before_it_leaves(
    executor: JobExecutorType, metadata: str, expected: tuple[int, str],
) -> None:
    # LiveKit fails a job whose agent leaves the room before its status is reported.
    reports = Reports()
    left_before_the_report: list[bool] = []

    def report(job_id: str, status: int, error: str) -> None:
        if status in FINAL:
            left_before_the_report.append(bool(logs.matching("left the room")))
        reports(job_id, status, error)

    with watching_logs() as logs:
        async with running_supervisor(make_config(job_executor_type=executor),
                                      report) as (sup, _):
            await sup.launch(job_info("in", metadata))
            await sup.wait_idle()  # the process has exited and its end is handled
        await logs.wait_for("left the room")
    assert reports.final("in") == expected
    assert reports.statuses("in") == [agent.JS_RUNNING, expected[0]]
    assert left_before_the_report == [False]
    assert not logs.matching("did not acknowledge")  # the server answered JobEnding


async def test_a_reported_job_whose_process_then_fails_keeps_its_status() -> None:
    with watching_logs() as logs:
        async with running_supervisor(make_config()) as (sup, reports):
            await sup.launch(job_info("in", "joined_exit3"))
            await sup.wait_idle()
    assert reports.statuses("in") == [agent.JS_RUNNING, agent.JS_SUCCESS]
    (warning,) = logs.matching("exit code 3 after the job's status was reported")
    assert warning.levelno == logging.WARNING


async def test_a_job_in_its_room_interrupted_by_the_server_is_reported_at_exit() -> None:
    reports_seen: list[tuple[str, int, str]] = []
    sup = ProcessSupervisor(make_config(), report=lambda *call: reports_seen.append(call))
    with watching_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.launch(job_info("in", "joined_stay"))
            nursery.cancel_scope.cancel()
    # not the clean end the job announced: once, and without the escalation a missing ack
    # would have caused (2 s of waiting > shutdown_process_timeout)
    assert [(s, e) for _, s, e in reports_seen if s in FINAL] == [(agent.JS_FAILED,
                                                                   INTERRUPTED)]
    assert logs.matching("left the room")


async def test_a_job_process_announcing_the_end_of_no_job_is_refused() -> None:
    config = make_config(prewarm_fnc=scripted.ending_setup)
    async with running_supervisor(config) as (sup, reports):
        with pytest.raises(JobProcessError, match="sent an unexpected JobEnding"):
            await sup.launch(job_info("j", "ok"))
    status, error = reports.final("j") or (None, "")
    assert status == agent.JS_FAILED
    assert error.endswith("ended during initialization: job process sent an unexpected "
                          "JobEnding")


SERVER_SCRIPT = textwrap.dedent("""
    import os, sys, trio
    sys.path[:0] = {paths!r}
    from agents import scripted
    from proc_helpers import job_info, make_config
    from trio_agents._supervisor import ProcessSupervisor

    async def main():
        fast = ProcessSupervisor(make_config(num_idle_processes=1), report=lambda *a: None)
        slow = ProcessSupervisor(make_config(prewarm_fnc=scripted.slow_setup,
                                             num_idle_processes=1), report=lambda *a: None)
        async with trio.open_nursery() as nursery:
            await nursery.start(fast.run)
            await nursery.start(slow.run)
            await fast.launch(job_info("busy", "grandchildren"))
            await fast.wait_pool_ready()
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")


async def test_sigkill_of_the_server_leaves_no_process_behind() -> None:
    tag = f"orphan-test-{os.getpid()}"
    env = dict(os.environ, ORPHAN_TEST_TAG=tag)
    script = SERVER_SCRIPT.format(paths=[p for p in sys.path if p])
    server = await trio.lowlevel.open_process([sys.executable, "-c", script], env=env,
                                              stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        with trio.fail_after(20):
            line = b""
            while not line.endswith(b"\n"):  # a pipe may hand the line over in pieces
                chunk = await server.stdout.receive_some()
                assert chunk, f"the server exited before it was ready: {line!r}"
                line += chunk
            assert line == b"ready\n"
        # server + 2 zygotes + idle + initializing (blocked in setup_fnc, before any event
        # loop) + busy job + its 2 grandchildren (one in its own session) + 2 reapers (the
        # grandchildren may still be starting when the launch returned)
        with trio.fail_after(10):
            while len(_tagged(tag)) < 10:
                await trio.sleep(0.05)
        server.kill()
        await server.wait()
        with trio.move_on_after(2):
            while _tagged(tag):
                await trio.sleep(0.05)
        assert _tagged(tag) == []
    finally:
        server.kill()
        await server.wait()
        await server.stdout.aclose()  # type: ignore[union-attr]


def _tagged(tag: str) -> list[int]:
    needle = f"ORPHAN_TEST_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return [pid for pid in found if alive(pid)]
