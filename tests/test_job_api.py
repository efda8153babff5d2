"""The LiveKit API inside a job: the environment a job process gets, ``ctx.api`` and the SIP
helpers, end to end (dev server over TCP, real job processes, forked and cold)."""

from __future__ import annotations

import json
import logging
import pytest
import trio

from agents import api_agent
from test_server import dev, no_load  # noqa: F401  (the dev server fixture)
from trio_agents import AgentServer
from trio_agents.devserver import DevServer


@pytest.mark.parametrize("use_zygote", [True, False], ids=["forked", "cold"])
async def test_job_reaches_the_livekit_api(dev: DevServer, use_zygote: bool,
                                           caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)  # only the server's options may supply them
    caplog.set_level(logging.INFO, logger="agents.api_agent")
    server = AgentServer(ws_url=dev.url, api_key=dev.api_key, api_secret=dev.api_secret,
                         port=0, load_fnc=no_load, num_idle_processes=0, use_zygote=use_zygote)
    server.rtc_session(api_agent.entrypoint, agent_name="api")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await dev.create_dispatch("call-room", "api")
        await dev.wait_until(lambda: any(j.ended for j in dev.jobs.values()))
        await server.aclose()
    (job,) = dev.jobs.values()
    assert (job.status, job.error) == (2, "")  # JS_SUCCESS
    seen = {r.getMessage(): r for r in caplog.records if r.name == "agents.api_agent"}
    assert json.loads(seen["environment"].__dict__["lk_env"]) == {"LIVEKIT_URL": dev.url,
                                          "LIVEKIT_API_KEY": dev.api_key,
                                          "LIVEKIT_API_SECRET": dev.api_secret}
    assert json.loads(seen["rooms"].__dict__["rooms"]) == ["call-room"]
    assert json.loads(seen["sip"].__dict__["sip_answers"]) == [
        ["not_found", "requested sip trunk does not exist"],
        ["not_found", "participant does not exist"]]
