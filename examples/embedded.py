"""Embed an agent server in your own trio program with ``nursery.start(server.run)``.

``nursery.start`` returns once the server is registered with LiveKit; cancelling the nursery
stops it (running jobs are shut down). Here the program also runs the local dev server and
creates a room, so it needs nothing else: ``python examples/embedded.py``.
"""

import logging

import trio

from trio_agents import AgentServer, JobContext
from trio_agents.devserver import open_dev_server

logger = logging.getLogger("embedded-agent")
finished = trio.Event()
server = AgentServer(num_idle_processes=1, port=0)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    logger.info("embedded agent running job %s in room %r", ctx.job.id, ctx.job.room.name)


async def main() -> None:
    async with open_dev_server(port=0) as dev, trio.open_nursery() as nursery:
        server.update_options(ws_url=dev.url, api_key=dev.api_key, api_secret=dev.api_secret)
        worker_id = await nursery.start(server.run)
        print(f"registered as {worker_id}")
        await dev.create_room("embedded-room")
        await dev.wait_until(lambda: any(job.ended for job in dev.jobs.values()))
        job = next(iter(dev.jobs.values()))
        print(f"job {job.job.id} ended with status {job.status_name}")
        await server.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    trio.run(main)
