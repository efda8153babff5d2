"""What a job sees: ``JobContext`` (one per job) and ``JobProcess`` (one per job process).

Both are built by the job process (``_child``), never by user code. The entrypoint receives
the ``JobContext`` as its argument; ``get_job_context()`` is a convenience for code that has no
way to be handed it (it reads a context variable set around the entrypoint).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, final, overload

from livekit.protocol import agent, models

from ._jobs import JobAcceptArguments, RunningJobInfo
from ._options import JobExecutorType

logger = logging.getLogger("trio_agents.job")

#: ``cb()`` or ``cb(reason)``, async; any callable (``functools.partial``, bound methods, objects).
ShutdownCallback = Callable[..., Awaitable[None]]

if TYPE_CHECKING:
    from .api import LiveKitAPI


@final
class JobProcess:
    """The process (or thread, with ``JobExecutorType.THREAD``) a job runs in.

    ``setup_fnc(proc)`` runs once per process before any job; keep what it prepares (models,
    clients) in ``userdata``, where the entrypoint finds it as ``ctx.proc.userdata``.
    """

    def __init__(self, *, executor_type: JobExecutorType, http_proxy: str | None,
                 start_arguments: object = None) -> None:
        self._executor_type = executor_type
        self._http_proxy = http_proxy
        self._start_arguments = start_arguments
        self._userdata: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def userdata(self) -> dict[str, Any]:
        return self._userdata

    @property
    def start_arguments(self) -> object:
        """An opaque value given to the process at start (``None`` unless set by the caller)."""
        return self._start_arguments

    @property
    def http_proxy(self) -> str | None:
        return self._http_proxy

    @property
    def executor_type(self) -> JobExecutorType:
        return self._executor_type

    def __repr__(self) -> str:
        return f"<JobProcess pid={self.pid} executor={self._executor_type.value}>"


@final
class JobContext:
    """The job the entrypoint runs: ``ctx.job`` (the ``agent.Job``), ``ctx.proc``, the room and
    publisher it is for, and the ways to end it.

    The job ends when the entrypoint returns, when it calls ``ctx.shutdown(reason)``, or when
    the server asks (termination by LiveKit, server shutdown). Then ``on_session_end`` (bounded
    by ``session_end_timeout``) and every shutdown callback run (each bounded, all of them even
    if one fails).
    """

    def __init__(
        self,
        *,
        proc: JobProcess,
        info: RunningJobInfo,
        on_shutdown: Callable[[str], None],
        api_credentials: tuple[str, str, str] = ("", "", ""),
    ) -> None:
        self._proc = proc
        self._info = info
        self._on_shutdown = on_shutdown
        self._callbacks: list[ShutdownCallback] = []
        self._log_fields: dict[str, Any] = {}
        self._credentials = api_credentials
        self._api: LiveKitAPI | None = None

    # -- the job ------------------------------------------------------------------------------

    @property
    def proc(self) -> JobProcess:
        return self._proc

    @property
    def job(self) -> agent.Job:
        return self._info.job

    @property
    def info(self) -> RunningJobInfo:
        """The accepted job as the server received it (url, token, timestamps)."""
        return self._info

    @property
    def worker_id(self) -> str:
        return self._info.worker_id

    @property
    def room_name(self) -> str:
        return self._info.job.room.name

    @property
    def publisher(self) -> models.ParticipantInfo | None:
        """The publisher a ``ServerType.PUBLISHER`` job is for (``None`` for room jobs)."""
        job = self._info.job
        return job.participant if job.HasField("participant") else None

    @property
    def accept_arguments(self) -> JobAcceptArguments:
        """Name, identity, metadata and attributes the agent joins the room with."""
        return self._info.accept_arguments

    @property
    def metadata(self) -> str:
        """The dispatch metadata (``job.metadata``)."""
        return self._info.job.metadata

    # -- logging ------------------------------------------------------------------------------

    @property
    def log_context_fields(self) -> dict[str, Any]:
        """Fields added to every log record of this job (on top of job_id, room, agent_name)."""
        return self._log_fields

    @log_context_fields.setter
    def log_context_fields(self, fields: Mapping[str, Any]) -> None:
        self._log_fields = dict(fields)

    # -- ending the job -----------------------------------------------------------------------

    def shutdown(self, reason: str = "") -> None:
        """End the job: the entrypoint is cancelled, then the shutdown sequence runs."""
        self._on_shutdown(reason)

    def add_shutdown_callback(self, callback: ShutdownCallback) -> None:
        """Run ``await callback()`` or ``await callback(reason)`` when the job ends.

        Any callable works (functions, bound methods, ``functools.partial``, objects with an
        async ``__call__``); whether it takes the reason is read from its signature.
        """
        if not callable(callback):
            raise TypeError(f"shutdown callback {callback!r} is not callable")
        _takes_reason(callback)  # fail here, not at shutdown, if the signature is unusable
        self._callbacks.append(callback)

    @property
    def shutdown_callbacks(self) -> list[ShutdownCallback]:
        return list(self._callbacks)

    # -- LiveKit API --------------------------------------------------------------------------

    @property
    def api(self) -> LiveKitAPI:
        """A ``trio_agents.api.LiveKitAPI`` for the server the job came from (made on first use,
        so a job that never calls the API never imports httpx)."""
        if self._api is None:
            from .api import LiveKitAPI

            url, key, secret = self._credentials
            self._api = LiveKitAPI(url, key, secret)
        return self._api

    async def delete_room(self, room_name: str | None = None) -> None:
        """Delete the job's room (or ``room_name``); a room that is already gone is fine."""
        from livekit.protocol import room

        from .api import TwirpError

        try:
            await self.api.room.delete_room(room.DeleteRoomRequest(room=room_name or self.room_name))
        except TwirpError as exc:
            if exc.code != "not_found":
                raise

    def __repr__(self) -> str:
        return f"<JobContext job={self.job.id} room={self.room_name!r}>"


def _takes_reason(callback: Callable[..., object]) -> bool:
    """Whether ``callback`` accepts one positional argument (the reason)."""
    try:
        sig = inspect.signature(callback)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the signature of shutdown callback {callback!r}") from exc
    try:
        sig.bind("reason")
        return True
    except TypeError:
        pass
    try:
        sig.bind()
    except TypeError as exc:
        raise TypeError(
            f"shutdown callback {callback!r} must take no argument or one (the reason)"
        ) from exc
    return False


async def call_shutdown_callback(callback: ShutdownCallback, reason: str) -> None:
    if _takes_reason(callback):
        await callback(reason)
    else:
        await callback()


_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("trio_agents_job_context")


@overload
def get_job_context() -> JobContext: ...
@overload
def get_job_context(*, required: Literal[True]) -> JobContext: ...
@overload
def get_job_context(*, required: bool) -> JobContext | None: ...


def get_job_context(*, required: bool = True) -> JobContext | None:
    """The ``JobContext`` of the job running this code.

    Prefer the ``ctx`` argument of the entrypoint; this is for code that cannot be handed it.
    Raises ``RuntimeError`` outside a job unless ``required=False`` (then returns ``None``).
    """
    ctx = _current.get(None)
    if ctx is None and required:
        raise RuntimeError("no job is running here: get_job_context() works only inside a job "
                           "(the entrypoint and what it calls)")
    return ctx


def set_job_context(ctx: JobContext) -> contextvars.Token[JobContext]:
    return _current.set(ctx)
