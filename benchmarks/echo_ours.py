"""The media benchmark's trio_agents echo agent: examples/echo.py's entrypoint, with the same
settings as its livekit-agents twin (echo_peer.py): every job taken, 2 idle processes."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from echo import entrypoint  # noqa: E402

from trio_agents import AgentServer, cli  # noqa: E402


async def no_load() -> float:
    return 0.0


server = AgentServer(num_idle_processes=2, load_fnc=no_load, load_threshold=math.inf, port=0)
server.rtc_session(entrypoint)

if __name__ == "__main__":
    cli.run_app(server)
