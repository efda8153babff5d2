"""A job process that writes a malformed IPC frame: that job fails with the cause, and the
server (the process supervisor) goes on serving jobs."""

from __future__ import annotations

import pytest
import trio
from livekit.protocol import agent

from agents import ipc_agent
from proc_helpers import job_info, make_config, running_supervisor


@pytest.mark.parametrize(("kind", "cause"), [
    ("huge_int", "integer literal of 5000 characters"),
    ("deep", "10001 arrays or objects"),
    ("created_infinity", "Infinity is not a number JSON allows"),
    ("reserved_field", "LogRecord.fields: key '__class__' is a reserved log record attribute"),
    ("bad_outcome", "JobFinished.outcome: 'maybe' is not one of success, failed"),
])
async def test_a_malformed_frame_fails_that_job_and_the_server_serves_the_next(
        kind: str, cause: str) -> None:
    config = make_config(entrypoint_fnc=ipc_agent.entrypoint)
    async with running_supervisor(config) as (sup, reports):
        await sup.launch(job_info("bad", kind))
        with trio.fail_after(60):  # a guard, not a timing: unrefused, the job would hang
            status, error = await reports.wait_final("bad")
        await sup.launch(job_info("good", "ok"))
        assert await reports.wait_final("good") == (agent.JS_SUCCESS, "")
    assert status == agent.JS_FAILED
    assert error.startswith("job process broke the IPC protocol: "), error
    assert cause in error
