"""What the dev server knows about workers, jobs and rooms.

These are live records: the server updates them in place and ``DevServer.workers`` /
``.jobs`` / ``.rooms`` hand out read-only mappings of them, so a test may hold a record and
wait for it to change (``await dev.wait_until(lambda: job.ended)``). Read them; never assign
to them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, final

import attrs
import trio
from livekit.protocol import agent, agent_dispatch, models

if TYPE_CHECKING:
    from ._http import WebSocket
    from ._rtc import Session


@final
class Changes:
    """The server's one signal of change, shared by its parts: each calls ``changed()``
    after changing a record; ``wait_until`` re-checks its predicate after every change."""

    def __init__(self) -> None:
        self._change = trio.Event()

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        """Return once ``predicate()`` is true; it is re-checked after every state change.

        Bound it with ``trio.fail_after`` if it may never happen.
        """
        while not predicate():
            await self._change.wait()

    def changed(self) -> None:
        self._change.set()
        self._change = trio.Event()


def now_ns() -> int:
    """Unix nanoseconds, the unit of ``JobState.*_at`` and ``AgentDispatchState.*_at``."""
    return time.time_ns()


@attrs.define(eq=False)
class Pending:
    """One outstanding ``AvailabilityRequest``: set when the answer (or the worker's end) comes."""

    event: trio.Event = attrs.field(factory=trio.Event)
    response: agent.AvailabilityResponse | None = None


@final
@attrs.define(eq=False)
class WorkerInfo:
    """A registered worker, as the server sees it."""

    id: str
    agent_name: str
    namespace: str
    job_type: int
    deployment: str
    version: str
    permissions: models.ParticipantPermission
    api_key: str = attrs.field(repr=False)
    api_secret: str = attrs.field(repr=False)
    status: int = agent.WS_AVAILABLE
    load: float = 0.0
    registered_at: float = attrs.field(factory=time.monotonic)
    """``time.monotonic()`` when the server answered the registration (system-wide on Linux)."""
    running_job_ids: set[str] = attrs.field(factory=set)
    """Jobs assigned to it and not ended (what ``JobTermination`` can still reach)."""
    migrated_job_ids: list[str] = attrs.field(factory=list)
    """Every id it sent in ``MigrateJobRequest`` (the server ignores them otherwise)."""
    # internals of the server: its socket, whether it speaks protojson (its last frame was
    # text), and its outstanding availability requests by job id
    _socket: WebSocket | None = attrs.field(default=None, repr=False)
    _json: bool = attrs.field(default=False, repr=False)
    _pending: dict[str, Pending] = attrs.field(factory=dict, repr=False)

    @property
    def type(self) -> int:
        """The ``JobType`` it registered for (same as ``job_type``)."""
        return self.job_type

    def matches(self, job: agent.Job) -> bool:
        """The registry key of livekit-server: agent name, namespace, job type, deployment."""
        return (self.agent_name, self.namespace, self.job_type, self.deployment) == (
            job.agent_name, job.namespace, job.type, job.deployment)


@final
@attrs.define(eq=False)
class JobInfo:
    """A job the server created, and what became of it."""

    job: agent.Job
    """The job as last sent (its ``state`` follows the worker's status updates)."""
    room: str
    worker_id: str = ""
    """The worker it was assigned to ("" if none was)."""
    status: int = agent.JS_PENDING
    error: str = ""
    history: list[int] = attrs.field(factory=list)
    """Every status it went through, from the assignment on."""
    token: str = attrs.field(default="", repr=False)
    """The token of its ``JobAssignment``."""
    response: agent.AvailabilityResponse | None = None
    """The accepting answer (participant identity, name, metadata, attributes)."""
    attempts: int = 0
    """How many workers were offered the job."""
    done: bool = False
    """The dispatch is over: assigned, ended by ``terminate``, or dropped."""
    dropped: str = ""
    """Why no worker got it ("" if one did)."""
    ended: bool = False
    # ``time.monotonic()`` stamps of the dispatch timeline, for benchmarks (0 = not yet)
    offered_at: float = 0.0
    answered_at: float = 0.0
    assigned_at: float = 0.0
    ended_at: float = 0.0

    @property
    def status_name(self) -> str:
        return agent.JobStatus.Name(self.status)

    @property
    def participant_identity(self) -> str:
        return self.response.participant_identity if self.response is not None else ""

    def set_status(self, status: int, error: str = "") -> None:
        self.status, self.error = status, error
        self.history.append(status)
        self.job.state.status = status  # type: ignore[assignment]
        self.job.state.error = error
        self.job.state.updated_at = now_ns()
        if status in (agent.JS_SUCCESS, agent.JS_FAILED):
            self.ended = True
            self.ended_at = time.monotonic()
            self.job.state.ended_at = now_ns()


@final
@attrs.define(eq=False)
class RoomInfo:
    """A live room: its ``Room`` proto, dispatches, participants and jobs.

    ``participants`` holds everyone in the room: those connected on ``/rtc`` (each also has
    an entry in ``sessions``) and those simulated with ``DevServer.add_participant``.
    """

    room: models.Room
    dispatches: dict[str, agent_dispatch.AgentDispatch] = attrs.field(factory=dict)
    participants: dict[str, models.ParticipantInfo] = attrs.field(factory=dict)
    sessions: dict[str, Session] = attrs.field(factory=dict, repr=False)
    """The participants connected on ``/rtc``, by identity."""
    sif_trailer: bytes = attrs.field(factory=lambda: os.urandom(32), repr=False)
    publishers: set[str] = attrs.field(factory=set)
    job_ids: list[str] = attrs.field(factory=list)
    had_participant: bool = False
    """A non-agent participant joined once: an empty room then closes after
    ``departure_timeout`` rather than ``empty_timeout``."""
    _closer: trio.CancelScope = attrs.field(factory=trio.CancelScope, repr=False)
    """Its deadline is when the room closes by itself (``inf`` while someone is there)."""

    @property
    def humans(self) -> int:
        """Participants that keep the room open (not agents, not egress)."""
        return self.room.num_participants

