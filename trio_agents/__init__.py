"""trio_agents: a trio-native LiveKit agent server."""

from ._version import __version__ as __version__
