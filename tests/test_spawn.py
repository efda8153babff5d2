"""The spawn boundary with real processes: zygote forks matched by id, a dead zygote, a refused
spawn, an agent script without its ``__main__`` guard."""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import psutil
import pytest
import trio
import trio.testing
from livekit.protocol import agent

from trio_agents._errors import JobProcessError
from trio_agents._proc import child_environment
from trio_agents._zygote import ForkedProcess, Zygote, ZygoteUnavailable

from cli_helpers import run_cli
from proc_helpers import alive, job_info, make_config, running_supervisor, watching_logs


@asynccontextmanager
async def running_zygote() -> AsyncIterator[Zygote]:
    zygote = Zygote(child_environment("spawn-test/zygote/"), ["agents.scripted"])
    async with trio.open_nursery() as nursery:
        await nursery.start(zygote.run)
        yield zygote
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def forked(zygote: Zygote, marker: str) -> AsyncIterator[ForkedProcess]:
    """A forked job process, checked to hold the socket it was forked for; killed and reaped
    (through the zygote) at the end."""
    ours, theirs = socket.socketpair()
    link = f"socket:[{os.fstat(theirs.fileno()).st_ino}]"
    try:
        child = await zygote.fork(theirs.fileno(), marker)
    finally:
        theirs.close()
    try:
        assert link in fd_links(child.pid)  # its own socket: not another fork's reply
        yield child
    finally:
        ours.close()  # its IPC channel: EOF, it exits
        child.kill()
        with trio.CancelScope(shield=True):
            await child.wait()


def fd_links(pid: int) -> set[str]:
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return links


async def test_a_fork_cancelled_before_its_request_leaves_nothing_behind() -> None:
    async with running_zygote() as zygote:
        ours, theirs = socket.socketpair()
        with ours, theirs, trio.CancelScope() as scope:
            scope.cancel()
            await zygote.fork(theirs.fileno(), "spawn-test/cancelled/")
        assert scope.cancelled_caught
        assert zygote._pending == {}
        async with forked(zygote, "spawn-test/next/") as child:
            assert psutil.Process(child.pid).ppid() == zygote.pid


async def test_a_fork_cancelled_while_awaiting_its_reply_gets_its_child_killed() -> None:
    async with running_zygote() as zygote:
        os.kill(zygote.pid, signal.SIGSTOP)  # the request is sent; the reply cannot come yet
        try:
            ours, theirs = socket.socketpair()
            with ours, theirs:
                async with trio.open_nursery() as nursery:
                    scope = trio.CancelScope()

                    async def cancelled_fork() -> None:
                        with scope:
                            await zygote.fork(theirs.fileno(), "spawn-test/cancelled/")

                    nursery.start_soon(cancelled_fork)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(zygote._pending) == 1
                    scope.cancel()
                assert zygote._pending == {}
        finally:
            os.kill(zygote.pid, signal.SIGCONT)
        async with forked(zygote, "spawn-test/next/") as child:
            # forked() checked it is its own process, not the cancelled one (forked first)
            orphans = [c for c in zygote._children.values() if c is not child]
            for orphan in orphans:  # killed when its reply arrived
                with trio.fail_after(5):
                    assert await orphan.wait() == -signal.SIGKILL


async def test_forks_pending_when_the_zygote_dies_fail_at_once() -> None:
    async with running_zygote() as zygote:
        os.kill(zygote.pid, signal.SIGSTOP)
        errors: list[BaseException] = []
        socks = [socket.socketpair() for _ in range(3)]
        try:
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    async def fork(fd: int, i: int) -> None:
                        try:
                            await zygote.fork(fd, f"spawn-test/pending{i}/")
                        except ZygoteUnavailable as exc:
                            errors.append(exc)

                    for i, (_, theirs) in enumerate(socks):
                        nursery.start_soon(fork, theirs.fileno(), i)
                    await trio.testing.wait_all_tasks_blocked()
                    os.kill(zygote.pid, signal.SIGKILL)
        finally:
            for pair in socks:
                for end in pair:
                    end.close()
        assert [str(e) for e in errors] == ["the zygote exited"] * 3
        assert not zygote.alive


async def test_a_dead_zygote_is_restarted_and_forks_again() -> None:
    with watching_logs() as logs:
        async with running_supervisor(make_config()) as (sup, reports):
            await logs.wait_for("the zygote is up")
            zygote = sup._zygote
            assert zygote is not None
            first = zygote.pid
            os.kill(first, signal.SIGKILL)
            await logs.wait_for("the zygote is gone")
            await logs.wait_for("the zygote is up", count=2)
            assert zygote.pid != first
            await sup.launch(job_info("after", "sleep:30"))
            (handle,) = sup.job_processes
            assert psutil.Process(handle.pid).ppid() == zygote.pid
            sup.terminate("after", "test")
            assert await reports.wait_final("after") == (agent.JS_SUCCESS, "")


NORMAL_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)


@contextmanager
def no_free_fds() -> Iterator[None]:
    """RLIMIT_NOFILE at our lowest free fd number: any new fd is EMFILE."""
    used = {int(fd) for fd in os.listdir("/proc/self/fd")}
    lowest_free = next(n for n in range(len(used) + 1) if n not in used)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, NORMAL_LIMIT[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, NORMAL_LIMIT)


@pytest.mark.parametrize("use_zygote", [True, False])
async def test_no_fds_at_spawn_fails_that_job_and_the_next_one_runs(use_zygote: bool) -> None:
    with watching_logs() as logs:
        async with running_supervisor(make_config(use_zygote=use_zygote)) as (sup, reports):
            if use_zygote:
                await logs.wait_for("the zygote is up")
            with no_free_fds():
                with pytest.raises(JobProcessError, match="Too many open files"):
                    await sup.launch(job_info("starved", "ok"))
            status, error = reports.final("starved") or (None, "")
            assert status == agent.JS_FAILED and "Too many open files" in error
            await sup.launch(job_info("next", "ok"))
            assert await reports.wait_final("next") == (agent.JS_SUCCESS, "")


async def test_no_fds_at_start_fails_slots_not_the_supervisor_and_it_recovers() -> None:
    with watching_logs() as logs:
        with no_free_fds():  # reaper, zygote and the idle slot all fail to start
            async with running_supervisor(make_config(num_idle_processes=1)) as (sup, _):
                record = await logs.wait_for("could not start a job process")
                assert record.levelno == logging.ERROR
                assert "next attempt in" in record.getMessage()
                await logs.wait_for("the zygote is gone (could not start the zygote")
                resource.setrlimit(resource.RLIMIT_NOFILE, NORMAL_LIMIT)
                with trio.fail_after(30):  # after the backoff, all of it is up again
                    await sup.wait_pool_ready()
                    await logs.wait_for("the zygote is up")
                (idle,) = sup.idle_processes
                assert alive(idle.pid)


UNGUARDED = '''\
import logging

from trio_agents import AgentServer, JobContext, cli

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    logging.getLogger("unguarded").info("never runs")


cli.run_app(server)  # no `if __name__ == "__main__":`
'''


async def test_an_agent_script_without_main_guard_fails_its_job_in_one_line(
        tmp_path: trio.Path) -> None:
    script = trio.Path(tmp_path) / "unguarded_agent.py"
    await script.write_text(UNGUARDED)
    async with run_cli([str(script), "dev", "--no-reload"]) as cli:
        # what is wrong and the fix, in one line; the job is failed with it (JobProcessError)
        line = await cli.wait_for("ERROR .*job process could not be initialized: ")
        assert f"{script} calls cli.run_app() when it is imported" in line
        assert 'put that call under `if __name__ == "__main__":`' in line
        cli.signal(signal.SIGTERM)
        with trio.fail_after(5):  # no launch holds the drain
            await cli.wait()


async def test_the_zygote_refuses_to_fork_with_a_thread_and_names_its_module() -> None:
    from agents import threaded_agent

    config = make_config(entrypoint_fnc=threaded_agent.entrypoint)
    with watching_logs() as logs:
        async with running_supervisor(config) as (sup, reports):
            record = await logs.wait_for("the zygote will not fork")
            await sup.launch(job_info("cold", "ok"))
            (handle,) = sup.job_processes
            assert psutil.Process(handle.pid).ppid() == os.getpid()  # started cold
            assert await reports.wait_final("cold") == (agent.JS_SUCCESS, "")
    assert ("thread 'import-time-worker' (and 0 more) was started while importing "
            "agents.threaded_agent") in record.getMessage()
