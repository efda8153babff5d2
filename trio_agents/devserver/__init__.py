"""A local LiveKit-compatible server for agents: dispatch, rooms, the Twirp API.

``python -m trio_agents devserver`` runs it on port 7880 with the key ``devkey`` and the secret
``secret`` (as ``livekit-server --dev``); in Python::

    async with open_dev_server(port=0) as dev:
        ...  # dev.url, dev.api_key, dev.api_secret
        await dev.create_room("demo")              # JT_ROOM jobs for the default dispatch
        await dev.wait_until(lambda: any(j.done for j in dev.jobs.values()))

With ``listen=False`` it binds nothing; ``dev.handle_stream(stream)`` serves any trio stream
(``trio.testing.memory_stream_pair``), so tests run in virtual time. What it does and does not
model is PROTOCOL.md's checklist (§9.4); the README lists the gaps.
"""

from ..api import TwirpError as TwirpError
from ._records import JobInfo as JobInfo
from ._records import RoomInfo as RoomInfo
from ._records import WorkerInfo as WorkerInfo
from ._server import AVAILABILITY_TIMEOUT as AVAILABILITY_TIMEOUT
from ._server import REGISTER_TIMEOUT as REGISTER_TIMEOUT
from ._server import DevServer as DevServer
from ._server import open_dev_server as open_dev_server

__all__ = ["AVAILABILITY_TIMEOUT", "REGISTER_TIMEOUT", "DevServer", "JobInfo", "RoomInfo",
           "TwirpError", "WorkerInfo", "open_dev_server"]
