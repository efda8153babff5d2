"""Fixtures shared by several test modules (a plugin of conftest.py; a module's own fixture
of the same name wins):

* ``dev`` + ``opener``: the dev server over in-memory streams (``listen=False``), for virtual-
  time tests of the control plane;
* ``livekit``: each test twice, against the dev server and against the real livekit-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from livekit_server import open_livekit_server
from room_helpers import Backend
from trio_agents._control import OpenStream
from trio_agents.devserver import DevServer, open_dev_server
from trio_agents.testing import memory_opener


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False, api_key="devkey", api_secret="secret") as server:
        yield server


@pytest.fixture
def opener(dev: DevServer, nursery: trio.Nursery) -> OpenStream:
    return memory_opener(dev, nursery)


@pytest.fixture(params=["devserver", pytest.param("livekit-server", marks=pytest.mark.realserver)])
async def livekit(request: pytest.FixtureRequest, rtc_address: str) -> AsyncIterator[Backend]:
    """The same test against the dev server and against the real livekit-server."""
    if request.param == "devserver":
        async with open_dev_server(port=0, rtc_address=rtc_address) as server:
            yield server
    else:
        async with open_livekit_server(rtc_address) as real:
            yield real
