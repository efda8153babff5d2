"""The floor of the dispatch path: a worker that does nothing but the protocol.

Run with the project venv (trio, trio-websocket, livekit-protocol, pyjwt). It registers as
agent "bench", answers every AvailabilityRequest at once with available=True, and on each
JobAssignment appends a "started" line (time.monotonic(), like the agents) to $BENCH_EVENTS
and reports JS_SUCCESS. No job process, no entrypoint: what it measures is the dev server, the
websocket and protobuf on this machine, which any Python worker pays before its own work.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import jwt
import trio
import trio_websocket
from livekit.protocol import agent


def record(event: str, job_id: str) -> None:
    line = json.dumps({"event": event, "job_id": job_id, "t": time.monotonic(),
                       "pid": os.getpid()})
    with open(os.environ["BENCH_EVENTS"], "a") as out:
        out.write(line + "\n")


def token(api_key: str, api_secret: str) -> str:
    now = int(time.time())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dev server's secret is short
        return jwt.encode({"iss": api_key, "sub": "", "nbf": now, "exp": now + 3600,
                           "video": {"agent": True}}, api_secret, algorithm="HS256")


async def main() -> None:
    url = os.environ["LIVEKIT_URL"].rstrip("/") + "/agent"
    headers = [("Authorization",
                "Bearer " + token(os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]))]
    async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
        register = agent.RegisterWorkerRequest(type=agent.JT_ROOM, agent_name="bench",
                                               version="null")
        await ws.send_message(agent.WorkerMessage(register=register).SerializeToString())
        while True:
            data = await ws.get_message()
            msg = agent.ServerMessage.FromString(
                data if isinstance(data, bytes) else data.encode())
            kind = msg.WhichOneof("message")
            if kind == "availability":
                answer = agent.AvailabilityResponse(job_id=msg.availability.job.id,
                                                    available=True)
                await ws.send_message(agent.WorkerMessage(availability=answer).SerializeToString())
            elif kind == "assignment":
                job_id = msg.assignment.job.id
                record("started", job_id)
                record("finished", job_id)
                update = agent.UpdateJobStatus(job_id=job_id, status=agent.JS_SUCCESS)
                await ws.send_message(agent.WorkerMessage(update_job=update).SerializeToString())


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
