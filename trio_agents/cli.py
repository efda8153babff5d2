"""``cli.run_app(server)``: run an agent server from ``python agent.py start|dev|connect``."""

from ._cli import run_app as run_app

__all__ = ["run_app"]
