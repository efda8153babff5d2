"""Job processes are forked from the zygote (or spawned cold when it is off), same behaviour."""

from __future__ import annotations

import os

import psutil
import pytest
from livekit.protocol import agent

from proc_helpers import job_info, make_config, running_supervisor


@pytest.mark.parametrize("use_zygote", [True, False])
async def test_job_process_origin(use_zygote: bool) -> None:
    async with running_supervisor(make_config(use_zygote=use_zygote)) as (sup, reports):
        await sup.launch(job_info("j", "sleep:30"))
        (handle,) = sup.job_processes
        parent = psutil.Process(handle.pid).parent()
        assert parent is not None
        if use_zygote:
            assert "trio_agents._zygote" in parent.cmdline()
        else:
            assert parent.pid == os.getpid()
        assert os.getsid(handle.pid) == handle.pid  # its own session and process group
        sup.terminate("j", "test")
        assert await reports.wait_final("j") == (agent.JS_SUCCESS, "")


async def test_forked_jobs_report_exit_codes_and_signals() -> None:
    async with running_supervisor(make_config(num_idle_processes=2)) as (sup, reports):
        for job_id, action in (("ok", "ok"), ("exit", "exit3"), ("segv", "segv")):
            await sup.launch(job_info(job_id, action))
        assert await reports.wait_final("ok") == (agent.JS_SUCCESS, "")
        assert await reports.wait_final("exit") == (agent.JS_FAILED, "exit code 3")
        assert await reports.wait_final("segv") == (agent.JS_FAILED, "killed by signal SIGSEGV")


async def test_the_zygote_stays_single_threaded_with_the_realtime_sdk_imported() -> None:
    # The room agent imports livekit.rtc, which imports numpy, whose BLAS would start a thread
    # pool at import: the zygote must still have one thread when it forks.
    from agents import room_agent

    config = make_config(entrypoint_fnc=room_agent.entrypoint, num_idle_processes=1)
    async with running_supervisor(config) as (sup, _):
        await sup.wait_pool_ready()
        (idle,) = sup.idle_processes
        zygote = psutil.Process(idle.pid).parent()
        assert zygote is not None and "trio_agents._zygote" in zygote.cmdline()
        assert zygote.num_threads() == 1
        assert zygote.environ()["OPENBLAS_NUM_THREADS"] == "1"
