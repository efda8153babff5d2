"""Test participants (the realtime SDK under trio, through trio_agents.room) and a gate in
front of the dev server's /rtc, for tests/test_room.py."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import attrs
import trio
from livekit import rtc

from trio_agents import AgentServer, JobContext
from trio_agents._auth import VideoGrants, create_token
from trio_agents.devserver import DevServer
from trio_agents.room import Room, TextStream, open_room

#: Text-stream topics a test participant listens on.
TOPICS = ("events", "hello-world", "chat-reply", "greeting", "track-events", "publisher")


class Backend(Protocol):
    """A LiveKit to test against: the dev server or the real livekit-server."""

    @property
    def url(self) -> str: ...
    @property
    def api_key(self) -> str: ...
    @property
    def api_secret(self) -> str: ...


@attrs.frozen
class Message:
    kind: str  # "text:<topic>" or "data:<topic>"
    text: str
    sender: str


@attrs.define
class Peer:
    """A participant of the test: its room, and everything the agent sent it, in order."""

    room: Room
    inbox: trio.MemoryReceiveChannel[Message]
    seen: list[Message] = attrs.Factory(list)

    async def expect(self, match: Callable[[Message], bool] | str, *,
                     timeout: float = 10.0) -> Message:
        """The first message (seen before or arriving now) that matches, else fail."""
        test = match if callable(match) else (lambda m: m.text == match)
        for message in self.seen:
            if test(message):
                self.seen.remove(message)
                return message
        with trio.fail_after(timeout):
            async for message in self.inbox:
                if test(message):
                    return message
                self.seen.append(message)
        raise AssertionError(f"the room closed before {match!r} arrived; seen {self.seen}")

    async def expect_prefix(self, prefix: str, **kwargs: Any) -> str:
        message = await self.expect(lambda m: m.text.startswith(prefix), **kwargs)
        return message.text[len(prefix):]


def token(dev: Backend, room: str, identity: str, *, kind: str = "",
          attributes: Mapping[str, str] | None = None) -> str:
    return create_token(dev.api_key, dev.api_secret, identity=identity, kind=kind,
                        attributes=attributes,
                        video=VideoGrants(room_join=True, room=room, can_publish=True,
                                          can_subscribe=True, can_publish_data=True,
                                          can_update_own_metadata=True))


@asynccontextmanager
async def join(dev: Backend, room: str, identity: str, *, kind: str = "",
               url: str | None = None) -> AsyncIterator[Peer]:
    """Join ``room`` as ``identity``; the ``Peer`` collects what arrives for it."""
    send, receive = trio.open_memory_channel[Message](math.inf)
    peer_room = Room()

    def listen(topic: str) -> None:
        async def read(stream: TextStream, sender: str) -> None:
            send.send_nowait(Message(f"text:{topic}", await stream.read_all(), sender))
        peer_room.register_text_stream_handler(topic, read)

    for topic in TOPICS:
        listen(topic)

    @peer_room.on("data_received")
    def data(packet: rtc.DataPacket) -> None:
        sender = packet.participant.identity if packet.participant else ""
        send.send_nowait(Message(f"data:{packet.topic}", packet.data.decode(), sender))

    async with open_room(url or dev.url, token(dev, room, identity, kind=kind),
                         room=peer_room) as joined:
        yield Peer(joined, receive)


async def talk_both_ways(user: Peer, agent_identity: str) -> None:
    """With the echo agent in the room: data, text and RPC from the participant to the agent
    and back, then an RPC from the agent, answered by a trio handler."""
    me = user.room.local_participant.identity
    await user.room.local_participant.publish_data(
        b"ping", topic="t", destination_identities=[agent_identity])
    echo = await user.expect("echo:ping")
    assert echo.kind == "data:echo" and echo.sender == agent_identity
    await user.room.local_participant.send_text("hi", topic="chat")
    assert (await user.expect("echo:hi")).kind == "text:chat-reply"
    answer = await user.room.local_participant.perform_rpc(
        destination_identity=agent_identity, method="ping", payload="42")
    assert answer == f"pong:42:{me}"

    async def whoami(data: rtc.RpcInvocationData) -> str:
        await trio.sleep(0)
        return f"{me} answering {data.caller_identity} ({data.payload})"

    user.room.local_participant.register_rpc_method("whoami", whoami)
    await user.room.local_participant.publish_data(b"q", topic="call-me")
    assert await user.expect_prefix("rpc-result:") == f"{me} answering {agent_identity} (q)"


async def say_bye(user: Peer, agent_identity: str) -> None:
    """Ask the echo agent to end its job (``ctx.shutdown()``); return once it left the room."""
    with user.room.events("participant_disconnected") as left:
        await user.room.local_participant.publish_data(b"", topic="bye")
        with trio.fail_after(30):
            while (await left.receive()).args[0].identity != agent_identity:
                pass


def make_agent_server(dev: Backend, url: str | None = None, *,
                      entrypoint: Callable[[JobContext], Awaitable[None]] | None = None,
                      agent_name: str = "room-agent", **options: Any) -> AgentServer:
    from agents import room_agent

    async def no_load() -> float:
        return 0.0  # keep the dev server's 0.7 load rule out of these tests

    server = AgentServer(ws_url=url or dev.url, api_key=dev.api_key, api_secret=dev.api_secret,
                         port=0, load_fnc=no_load, load_threshold=math.inf,
                         num_idle_processes=options.pop("num_idle_processes", 1),
                         shutdown_process_timeout=2.0, **options)
    server.rtc_session(entrypoint or room_agent.entrypoint, agent_name=agent_name)
    return server


@asynccontextmanager
async def agent_server(dev: Backend, url: str | None = None, **options: Any
                       ) -> AsyncIterator[AgentServer]:
    server = make_agent_server(dev, url, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        await server.aclose()


async def dispatch(dev: DevServer, room: str, **params: Any) -> str:
    """Send the room agent to ``room`` with ``params`` as its metadata; its job id."""
    await dev.create_dispatch(room, "room-agent", metadata=json.dumps(params))
    await dev.wait_until(lambda: any(j.room == room and j.done for j in dev.jobs.values()))
    record = next(j for j in dev.jobs.values() if j.room == room)
    assert not record.dropped, record.dropped
    return record.job.id


@attrs.define
class RtcGate:
    """A TCP proxy to the dev server that holds every /rtc connection until ``open()``.

    What a slow network looks like to a connecting SDK: its connect is in flight, and can
    be cancelled there, and completes once the gate opens.
    """

    target_port: int
    port: int = 0
    opened: trio.Event = attrs.Factory(trio.Event)
    holding: trio.Event = attrs.Factory(trio.Event)

    def open(self) -> None:
        self.opened.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            head = await client.receive_some(65536)  # the request line comes first
            if head.startswith(b"GET /rtc"):
                self.holding.set()
                await self.opened.wait()
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with upstream, trio.open_nursery() as nursery:
                await upstream.send_all(head)
                nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream,
                scope: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()

