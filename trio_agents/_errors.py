"""Exceptions raised by trio_agents.

Who is at fault decides the class, as in trio and httpx::

    TrioAgentsError
    ├── ConfigError (also ValueError)          bad options or environment; fix the configuration
    │   └── AuthenticationError                the LiveKit server rejected our key/secret (401/403)
    ├── ProtocolError                          abstract
    │   ├── LocalProtocolError                 we misused the /agent or IPC protocol (a bug here)
    │   └── RemoteProtocolError                the server or a job process sent something illegal
    ├── ServerConnectionError                  could not (re)connect and register after max_retry
    ├── AssignmentTimeoutError (also TimeoutError)
    │                                          accepted a job, but no JobAssignment arrived in time
    └── JobProcessError                        a job process failed to start or initialize
        └── InitializeTimeout (also TimeoutError)

Errors of dependencies (trio-websocket, httpx, OSError) are translated at exactly one boundary
with ``raise ... from exc``.
"""

from __future__ import annotations


class TrioAgentsError(Exception):
    """Base class of every error trio_agents raises on purpose."""


class ConfigError(TrioAgentsError, ValueError):
    """The options or the environment are wrong; the message says what to change."""


class AuthenticationError(ConfigError):
    """The LiveKit server refused our credentials. Retrying cannot help."""


class ProtocolError(TrioAgentsError):
    """Something broke the rules of a protocol (see the two subclasses)."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow in the current state (a bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    ``reconnect`` says whether opening a new connection may help.
    """

    def __init__(self, message: str, *, reconnect: bool = True) -> None:
        super().__init__(message)
        self.reconnect = reconnect


class ServerConnectionError(TrioAgentsError):
    """The agent server could not reach or register with LiveKit after ``max_retry`` attempts."""


class AssignmentTimeoutError(TrioAgentsError, TimeoutError):
    """A job was accepted but the LiveKit server sent no ``JobAssignment`` in time."""


class JobProcessError(TrioAgentsError):
    """A job process could not be started or initialized."""


class InitializeTimeout(JobProcessError, TimeoutError):
    """``setup_fnc`` did not finish within ``initialize_process_timeout``."""


class MissingExtraError(TrioAgentsError, ImportError):
    """An optional feature was used without the extra that provides it; the message names it."""


class RoomConnectError(TrioAgentsError):
    """Joining a LiveKit room failed (the server refused the token, or WebRTC did not connect)."""
