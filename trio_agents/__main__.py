"""``python -m trio_agents start|dev|connect|download-files path/to/agent.py`` and
``python -m trio_agents devserver``."""

from ._cli import main

main()
