"""The scripted agent behind the CLI tests: ``python cli_agent.py start|dev|connect``."""

import math
import os

from trio_agents import AgentServer, cli

from agents import scripted


async def no_load() -> float:
    return 0.0


server = AgentServer(
    port=int(os.environ.get("TEST_HEALTH_PORT", "0")),
    num_idle_processes=int(os.environ.get("TEST_IDLE", "1")),
    shutdown_process_timeout=2.0,
    load_fnc=no_load,
    load_threshold=math.inf,
)
server.setup_fnc = scripted.setup
server.rtc_session(scripted.entrypoint, agent_name=os.environ.get("TEST_AGENT_NAME", "scripted"))

if __name__ == "__main__":
    cli.run_app(server)
