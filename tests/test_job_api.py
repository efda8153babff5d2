"""The LiveKit API inside a job: the environment a job process gets, ``ctx.api`` and the SIP
helpers, end to end (dev server over TCP, real job processes, forked and cold).
``test_realserver_api.py`` runs the same job against the real livekit-server."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from agents import api_agent
from test_server import dev, no_load  # noqa: F401  (the dev server fixture)
from trio_agents import AgentServer
from trio_agents.devserver import DevServer

SEEN = ("environment", "rooms", "sip")


class _Seen(logging.Handler):
    """What ``api_agent`` logged, by message; ``done`` is set by its last record."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, Any] = {}
        self.done = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message in SEEN:  # each carries one JSON field, named after api_agent's extra=
            name = {"environment": "lk_env", "rooms": "rooms", "sip": "sip_answers"}[message]
            self.fields[message] = json.loads(record.__dict__[name])
        if message == SEEN[-1]:
            self.done.set()


async def run_api_job(url: str, key: str, secret: str,
                      dispatch: Callable[[], Awaitable[object]], *,
                      use_zygote: bool = True) -> tuple[dict[str, Any], AgentServer]:
    """Run ``api_agent.entrypoint`` once on an agent server registered at ``url``; what the
    job logged (``environment``, ``rooms``, ``sip``), and the (drained) server."""
    seen = _Seen()
    log = logging.getLogger("agents.api_agent")
    log.addHandler(seen)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        server = AgentServer(ws_url=url, api_key=key, api_secret=secret, port=0,
                             load_fnc=no_load, num_idle_processes=0, use_zygote=use_zygote)
        server.rtc_session(api_agent.entrypoint, agent_name="api")
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await dispatch()
            await seen.done.wait()
            await server.drain()
    finally:
        log.removeHandler(seen)
        log.setLevel(old_level)
    return seen.fields, server


@pytest.mark.parametrize("use_zygote", [True, False], ids=["forked", "cold"])
async def test_job_reaches_the_livekit_api(dev: DevServer, use_zygote: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)  # only the server's options may supply them
    seen, _ = await run_api_job(dev.url, dev.api_key, dev.api_secret,
                             lambda: dev.create_dispatch("call-room", "api"),
                             use_zygote=use_zygote)
    (job,) = dev.jobs.values()
    assert (job.status, job.error) == (2, "")  # JS_SUCCESS
    assert seen["environment"] == {"LIVEKIT_URL": dev.url, "LIVEKIT_API_KEY": dev.api_key,
                                   "LIVEKIT_API_SECRET": dev.api_secret}
    assert seen["rooms"] == ["call-room"]
    assert seen["sip"] == [["not_found", "requested sip trunk does not exist"],
                           ["not_found", "participant does not exist"]]
