"""trio_agents: a trio-native, structured-concurrency LiveKit agent server.

Define ``async def entrypoint(ctx: JobContext)``, register it with
``@server.rtc_session()`` on an ``AgentServer`` (or pass it to the legacy
``Worker(WorkerOptions(...))``), then run it with ``trio.run(server.run)``,
``await nursery.start(server.run)`` or ``cli.run_app(server)``.

Everything public is re-exported here; modules starting with ``_`` are private.
"""

from ._context import DEFAULT_PARTICIPANT_KINDS as DEFAULT_PARTICIPANT_KINDS
from ._context import AutoSubscribe as AutoSubscribe
from ._context import JobContext as JobContext
from ._context import JobProcess as JobProcess
from ._context import ParticipantKind as ParticipantKind
from ._context import get_job_context as get_job_context
from ._errors import AssignmentTimeoutError as AssignmentTimeoutError
from ._errors import AuthenticationError as AuthenticationError
from ._errors import ConfigError as ConfigError
from ._errors import MissingExtraError as MissingExtraError
from ._errors import RoomConnectError as RoomConnectError
from ._errors import ServerConnectionError as ServerConnectionError
from ._errors import TrioAgentsError as TrioAgentsError
from ._jobs import JobAcceptArguments as JobAcceptArguments
from ._jobs import JobRequest as JobRequest
from ._jobs import RunningJobInfo as RunningJobInfo
from ._options import JobExecutorType as JobExecutorType
from ._options import ServerEnvOption as ServerEnvOption
from ._options import ServerOptions as ServerOptions
from ._options import ServerType as ServerType
from ._options import WorkerOptions as WorkerOptions
from ._options import WorkerPermissions as WorkerPermissions
from ._options import WorkerType as WorkerType
from ._plugin import Plugin as Plugin
from ._server import AgentServer as AgentServer
from ._server import Worker as Worker
from ._version import __version__ as __version__

__all__ = [
    "DEFAULT_PARTICIPANT_KINDS",
    "AgentServer",
    "AutoSubscribe",
    "AssignmentTimeoutError",
    "AuthenticationError",
    "ConfigError",
    "JobAcceptArguments",
    "JobContext",
    "JobExecutorType",
    "JobProcess",
    "JobRequest",
    "MissingExtraError",
    "ParticipantKind",
    "Plugin",
    "RoomConnectError",
    "RunningJobInfo",
    "ServerConnectionError",
    "ServerEnvOption",
    "ServerOptions",
    "ServerType",
    "TrioAgentsError",
    "Worker",
    "WorkerOptions",
    "WorkerPermissions",
    "WorkerType",
    "__version__",
    "get_job_context",
]
