"""Real time: nothing we start dies because a thread of ours went idle.

The cause, in one library-free sentence: trio runs ``Popen`` in a worker thread, retires an idle
worker thread after 10 s (``trio/_core/_thread_cache.py``), and ``PR_SET_PDEATHSIG`` fires when
the parent *thread* exits (prctl(2)). The first test shows it with a bare ``open_process``; the
others check that every process of ours outlives that moment (they failed before the lifeline).
"""

from __future__ import annotations

import signal
import sys

import psutil
import pytest
import trio
from livekit.protocol import agent

from trio_agents._spawn import BOOTSTRAP, spawn

from cli_helpers import run_cli
from proc_helpers import alive, job_info, make_config, running_supervisor

pytestmark = pytest.mark.slow

#: trio's worker-thread idle timeout (IDLE_TIMEOUT in trio/_core/_thread_cache.py).
THREAD_IDLE = 10.0
QUIET = 25.0

ARMED = ("import ctypes, signal, time; ctypes.CDLL(None).prctl(1, signal.SIGKILL);"
         " time.sleep(3600)")


def zygote_pids() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)
            if "trio_agents._zygote" in p.cmdline()]


async def test_pdeathsig_fires_with_the_worker_thread_but_the_lifeline_does_not(
        tmp_path: trio.Path) -> None:
    script = trio.Path(tmp_path) / "idle.py"
    await script.write_text("import time\ntime.sleep(3600)\n")
    ours = await spawn([str(script)], what="an idle test process")
    control = await trio.lowlevel.open_process([sys.executable, "-c", ARMED])
    try:
        assert BOOTSTRAP in psutil.Process(ours.pid).cmdline()
        with trio.fail_after(THREAD_IDLE * 3):  # the control's spawning thread retires
            assert await control.wait() == -signal.SIGKILL
        await trio.sleep(2)  # and so did ours, spawned the same way just before
        assert ours.returncode is None and alive(ours.pid)
    finally:
        for process in (control, ours):
            process.kill()
            await process.wait()


async def test_after_25_s_of_quiet_a_job_is_forked_by_the_same_zygote() -> None:
    async with running_supervisor(make_config()) as (sup, reports):
        await sup.launch(job_info("first", "ok"))
        assert await reports.wait_final("first") == (agent.JS_SUCCESS, "")
        (zygote,) = zygote_pids()
        await trio.sleep(QUIET)
        assert zygote_pids() == [zygote]
        await sup.launch(job_info("later", "sleep:30"))
        (handle,) = sup.job_processes
        assert psutil.Process(handle.pid).ppid() == zygote
        sup.terminate("later", "test")
        assert await reports.wait_final("later") == (agent.JS_SUCCESS, "")


async def test_a_job_sleeping_40_s_succeeds_with_and_without_the_zygote() -> None:
    async def one(use_zygote: bool) -> None:
        async with running_supervisor(make_config(use_zygote=use_zygote)) as (sup, reports):
            await sup.launch(job_info(f"long-{use_zygote}", "sleep:40"))
            with trio.fail_after(80):
                status = await reports.wait_final(f"long-{use_zygote}")
            assert status == (agent.JS_SUCCESS, ""), f"use_zygote={use_zygote}"

    async with trio.open_nursery() as nursery:  # side by side: 40 s, not 80
        nursery.start_soon(one, True)
        nursery.start_soon(one, False)


async def test_the_dev_reload_child_is_alive_25_s_after_a_reload(tmp_path: trio.Path) -> None:
    source = trio.Path("examples/minimal.py")
    agent_file = trio.Path(tmp_path) / "reloading_agent.py"
    await agent_file.write_text(await source.read_text())
    async with run_cli([str(agent_file), "dev"], timeout=120) as cli:
        await cli.wait_for("hello from job")
        await agent_file.write_text(await agent_file.read_text() + "\n# changed\n")
        line = await cli.wait_for("started the agent server \\(pid", count=2)
        child = int(line.split("(pid ")[1].split(")")[0])
        await cli.wait_for("registered worker", count=2)
        await trio.sleep(QUIET)
        assert alive(child), "\n".join(cli.lines)
        assert not [line for line in cli.lines if "zygote is gone" in line]
        cli.signal(signal.SIGINT)
        assert await cli.wait() == 0
