"""Agents that join their room, for tests/test_room.py. The job's metadata (JSON) names the
scenario; what the agent sees, it tells the test participant over the room itself."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from livekit import rtc

from trio_agents import JobContext, ParticipantKind
from trio_agents.room import TextStream

log = logging.getLogger("agents.room")


async def entrypoint(ctx: JobContext) -> None:
    params = json.loads(ctx.job.metadata or "{}")
    await SCENARIOS[params["scenario"]](ctx, params)


async def tell(ctx: JobContext, text: str, *, to: str | None = None) -> None:
    await ctx.agent.send_text(text, topic="events",
                              destination_identities=None if to is None else [to])


async def echo(ctx: JobContext, params: dict[str, Any]) -> None:
    """Greets, measures its connect, echoes data/text/RPC, reports what it sees, leaves on
    'bye', calls back over RPC on 'call-me'."""
    started = time.monotonic()
    room = ctx.room

    async def chat(stream: TextStream, identity: str) -> None:
        text = await stream.read_all()
        await ctx.agent.send_text(f"echo:{text}", topic="chat-reply", destination_identities=[identity])

    room.register_text_stream_handler("chat", chat)

    @room.on("data_received")
    async def on_data(packet: rtc.DataPacket) -> None:
        sender = packet.participant.identity if packet.participant else ""
        if packet.topic == "bye":
            ctx.shutdown("bye received")
        elif packet.topic == "call-me":
            answer = await ctx.agent.perform_rpc(destination_identity=sender, method="whoami",
                                                 payload=packet.data.decode())
            await tell(ctx, f"rpc-result:{answer}")
        else:
            await ctx.agent.publish_data(b"echo:" + packet.data, topic="echo",
                                         destination_identities=[sender])

    @room.on("participant_metadata_changed")
    async def on_metadata(p: rtc.Participant, old: str, new: str) -> None:
        await tell(ctx, f"metadata:{p.identity}:{new}")

    @room.on("participant_attributes_changed")
    async def on_attributes(changed: dict[str, str], p: rtc.Participant) -> None:
        await tell(ctx, f"attributes:{p.identity}:{json.dumps(changed, sort_keys=True)}")

    @room.on("room_metadata_changed")
    async def on_room_metadata(old: str, new: str) -> None:
        await tell(ctx, f"room-metadata:{new}")

    await ctx.connect()
    connected = time.monotonic()

    async def ping(data: rtc.RpcInvocationData) -> str:
        await trio.sleep(0)  # a trio function, really
        return f"pong:{data.payload}:{data.caller_identity}"

    ctx.agent.register_rpc_method("ping", ping)
    await tell(ctx, "timing:" + json.dumps({"entry": started, "connected": connected,
                                             "pid": __import__("os").getpid()}))
    await ctx.agent.send_text("hello world", topic="hello-world")
    # returning does not end the job: it stays in the room


async def wait(ctx: JobContext, params: dict[str, Any]) -> None:
    first = await ctx.wait_for_participant()
    await tell(ctx, f"found:{first.identity}")
    late = await ctx.wait_for_participant(identity=str(params["identity"]))
    await tell(ctx, f"found:{late.identity}")


async def greeter(ctx: JobContext, params: dict[str, Any]) -> None:
    seen: list[str] = []

    def entry(tag: str) -> Callable[[JobContext, rtc.RemoteParticipant], Awaitable[None]]:
        async def run(ctx: JobContext, p: rtc.RemoteParticipant) -> None:
            seen.append(f"{tag}:{p.identity}")
            await tell(ctx, f"{tag}:{p.identity}")
        run.__name__ = tag
        return run

    ctx.add_participant_entrypoint(entry("hello"))
    ctx.add_participant_entrypoint(entry("sip"), kind=ParticipantKind.SIP)
    try:
        ctx.add_participant_entrypoint(ctx._participant_entrypoints[0][0])
    except ValueError:
        seen.append("twice:refused")

    @ctx.room.on("data_received")
    async def report(packet: rtc.DataPacket) -> None:
        await tell(ctx, "seen:" + json.dumps(sorted(seen)))

    await ctx.connect()


async def cancelled_connect(ctx: JobContext, params: dict[str, Any]) -> None:
    """Cancel ctx.connect() half-way, then live on for ``linger`` seconds."""
    with trio.move_on_after(float(params["cancel_after"])) as scope:
        await ctx.connect()
    log.info("connect cancelled: %s; connected: %s", scope.cancelled_caught, ctx.is_connected())
    if not scope.cancelled_caught:
        raise RuntimeError("the connect finished before it could be cancelled")
    await trio.sleep(float(params["linger"]))
    log.info("still alive after lingering")


SCENARIOS: dict[str, Callable[[JobContext, dict[str, Any]], Awaitable[None]]] = {
    "echo": echo,
    "wait": wait,
    "greeter": greeter,
    "cancelled_connect": cancelled_connect,
}
