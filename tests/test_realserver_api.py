"""``trio_agents.api`` and the LiveKit API inside a job, against the real livekit-server.

SIP needs a livekit-server with Redis: without it every SIP call answers ``internal: sip not
connected (redis required)``; with it, an unknown trunk is ``not_found``. Both are checked
(the Redis one when ``redis-server`` is installed: ``apt-get install redis-server``).

Each test runs its own livekit-server (and Redis) with ``tests/livekit_server.py``, in the
test session's private network namespace, on free ports.
"""

from __future__ import annotations

import pytest
from livekit.protocol import agent_dispatch, room, sip

from livekit_server import API_KEY as KEY
from livekit_server import API_SECRET as SECRET
from livekit_server import REDIS_SERVER, open_livekit_server, open_redis
from test_job_api import run_api_job
from trio_agents.api import LiveKitAPI, SIPError

pytestmark = pytest.mark.realserver


DIAL = sip.CreateSIPParticipantRequest(sip_trunk_id="ST_missing", sip_call_to="+15550100",
                                       room_name="call-room", participant_identity="caller")


async def dial(api: LiveKitAPI) -> tuple[str, str, int | None]:
    """The error of ``DIAL`` (code, message, HTTP status)."""
    with pytest.raises(SIPError) as info:
        await api.sip.create_sip_participant(DIAL)
    return info.value.code, info.value.msg, info.value.status


async def test_sip_without_redis_says_so(rtc_address: str) -> None:
    async with open_livekit_server(rtc_address) as livekit, \
            LiveKitAPI(livekit.url, KEY, SECRET) as api:
        assert await dial(api) == ("internal", "sip not connected (redis required)", 500)


@pytest.mark.skipif(REDIS_SERVER is None,
                    reason="redis-server is not installed (apt-get install redis-server)")
async def test_api_and_sip_in_a_job_against_the_real_server(
    rtc_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    async with open_redis() as redis, \
            open_livekit_server(rtc_address, extra_args=["--redis-host", redis]) as livekit, \
            LiveKitAPI(livekit.url, KEY, SECRET) as api:
        url = livekit.url
        assert await dial(api) == ("not_found", "requested sip trunk does not exist", 404)
        with pytest.raises(SIPError) as info:
            await api.sip.transfer_sip_participant(sip.TransferSIPParticipantRequest(
                room_name="call-room", transfer_to="tel:+15550101"))
        assert (info.value.code, info.value.msg) == ("invalid_argument",
                                                     "Missing participant identity")

        async def dispatch() -> None:
            await api.room.create_room(room.CreateRoomRequest(name="call-room"))
            await api.agent_dispatch.create_dispatch(agent_dispatch.CreateAgentDispatchRequest(
                room="call-room", agent_name="api"))

        seen, server = await run_api_job(url, KEY, SECRET, dispatch)
    assert seen["environment"] == {"LIVEKIT_URL": url, "LIVEKIT_API_KEY": KEY,
                                   "LIVEKIT_API_SECRET": SECRET}
    assert seen["rooms"] == ["call-room"]
    assert seen["sip"] == [["not_found", "requested sip trunk does not exist"],
                           ["not_found", "participant does not exist"]]
    # the server's metrics saw the offer, the dispatch and the job's success
    assert server.metrics is not None
    metrics = server.metrics.registry
    node = {"nodename": server.metrics.nodename}
    assert metrics.get_sample_value("trio_agents_offers_total",
                                    {**node, "answer": "accepted"}) == 1
    assert metrics.get_sample_value("trio_agents_dispatch_latency_seconds_count", node) == 1
    assert metrics.get_sample_value("trio_agents_jobs_total", {
        **node, "status": "JS_SUCCESS", "cause": "success"}) == 1
    assert metrics.get_sample_value("trio_agents_registrations_total", node) == 1
