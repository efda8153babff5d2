"""A job that uses the LiveKit API from inside: its environment, ``ctx.api`` and the SIP
helpers. It logs what it saw (logger ``agents.api_agent``, as JSON: log fields cross the IPC as text)."""

from __future__ import annotations

import json
import logging
import os

from livekit.protocol import room

from trio_agents import JobContext
from trio_agents.api import SIPError

log = logging.getLogger("agents.api_agent")


async def entrypoint(ctx: JobContext) -> None:
    log.info("environment", extra={"lk_env": json.dumps({
        name: os.environ.get(name, "")
        for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")})})
    rooms = await ctx.api.room.list_rooms(room.ListRoomsRequest(names=[ctx.room_name]))
    log.info("rooms", extra={"rooms": json.dumps([r.name for r in rooms.rooms])})
    answers = []
    try:
        await ctx.add_sip_participant(call_to="+15550100", trunk_id="ST_missing",
                                      participant_identity="caller")
    except SIPError as exc:
        answers.append([exc.code, exc.msg])
    try:
        await ctx.transfer_sip_participant("nobody", "tel:+15550101")
    except SIPError as exc:
        answers.append([exc.code, exc.msg])
    log.info("sip", extra={"sip_answers": json.dumps(answers)})


async def count_in_job(ctx: JobContext) -> None:
    """Records a metric of its own with prometheus-client's default registry (multiprocess
    mode when the server gives the job a ``PROMETHEUS_MULTIPROC_DIR``)."""
    from prometheus_client import Counter

    Counter("job_custom_events", "Events counted inside a job", ["room"]).labels(
        ctx.room_name).inc(3)
