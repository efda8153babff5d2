"""A local LiveKit-compatible server for agents: dispatch, rooms, the Twirp API.

``python -m trio_agents devserver`` runs it on port 7880 with the key ``devkey`` and the secret
``secret`` (as ``livekit-server --dev``); in Python::

    async with open_dev_server(port=0) as dev:
        ...  # dev.url, dev.api_key, dev.api_secret; dev.create_room(...), dev.wait_until(...)
"""

from ._server import DevServer as DevServer
from ._server import JobInfo as JobInfo
from ._server import RoomInfo as RoomInfo
from ._server import TwirpError as TwirpError
from ._server import WorkerInfo as WorkerInfo
from ._server import open_dev_server as open_dev_server

__all__ = ["DevServer", "JobInfo", "RoomInfo", "TwirpError", "WorkerInfo", "open_dev_server"]
