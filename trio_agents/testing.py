"""Helpers to test agents and the agent server in virtual time, with no sockets.

``memory_opener(dev, nursery)`` connects an ``AgentServer`` (``run(open_stream=...)``) or a
control plane to an in-process dev server over ``trio.testing.memory_stream_pair``, so tests
can use ``trio.testing.MockClock(autojump_threshold=0)`` and assert exact times.
"""

from __future__ import annotations

from typing import Protocol

import trio
import trio.testing

from ._control import OpenStream


class StreamHandler(Protocol):
    async def handle_stream(self, stream: trio.abc.Stream) -> None: ...


def memory_opener(server: StreamHandler, nursery: trio.Nursery) -> OpenStream:
    """An ``open_stream`` that serves each connection with ``server.handle_stream`` in memory."""

    async def open_stream(host: str, port: int, tls: bool) -> trio.abc.Stream:
        client, remote = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, remote)
        return client

    return open_stream


__all__ = ["memory_opener"]
