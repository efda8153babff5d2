"""Job types of the server process: the offer (``JobRequest``), what an accepted job carries
(``RunningJobInfo``), and the boundary between the control plane and the job supervisor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, final

import attrs
import trio
from livekit.protocol import agent, models

from ._errors import LocalProtocolError

#: Attribute the server sets on every agent participant (``AgentNameAttributeKey``).
AGENT_NAME_ATTRIBUTE = "lk.agent.name"


@final
@attrs.frozen(kw_only=True)
class JobAcceptArguments:
    """How the agent joins the room: its participant name, identity, metadata and attributes."""

    name: str
    identity: str
    metadata: str
    attributes: Mapping[str, str] = attrs.field(factory=dict)


@final
@attrs.frozen(kw_only=True)
class RunningJobInfo:
    """An accepted and assigned job, as handed to the job supervisor and the job process.

    The four ``*_at`` fields are ``time.time()`` stamps of the dispatch timeline.
    """

    accept_arguments: JobAcceptArguments
    job: agent.Job
    url: str
    token: str
    worker_id: str
    fake_job: bool = False
    received_at: float = 0.0
    accepted_at: float = 0.0
    assigned_at: float = 0.0
    launched_at: float = 0.0


#: ``report(job_id, status, error)``: a job changed status (``agent.JS_RUNNING`` … ``JS_FAILED``).
StatusReport = Callable[[str, int, str], None]


class JobSupervisor(Protocol):
    """The component that runs accepted jobs (one process each). The control plane only sees this.

    ``run`` is started with ``nursery.start``; cancelling it stops every job through the
    shutdown escalation and returns only when every child is reaped. Status changes go to the
    ``StatusReport`` callback the supervisor was built with.
    """

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ...

    async def launch(self, info: RunningJobInfo) -> None:
        """Hand the job to a job process; return once its entrypoint has been started."""
        ...

    def terminate(self, job_id: str, reason: str) -> None:
        """Ask a running job to stop (escalating if it does not); unknown ids are ignored."""
        ...

    @property
    def running_jobs(self) -> Sequence[RunningJobInfo]:
        ...

    async def wait_idle(self) -> None:
        """Return once no job is running or being launched."""
        ...


class _OfferChannel(Protocol):
    def answer(self, response: agent.AvailabilityResponse) -> None: ...

    async def accepted(self, args: JobAcceptArguments) -> None: ...


@final
class JobRequest:
    """An offer of a job from the LiveKit server, handed to ``on_request``/``request_fnc``.

    Call exactly one of ``accept()`` or ``reject()``. ``accept()`` returns once the job has been
    assigned and started in a job process; it raises ``AssignmentTimeoutError`` if the server
    does not assign it in time. Not answering at all rejects the job (with a warning).
    """

    def __init__(self, job: agent.Job, *, agent_name: str, channel: _OfferChannel) -> None:
        self._job = job
        self._agent_name = agent_name
        self._channel = channel
        self._answered = False

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def job(self) -> agent.Job:
        return self._job

    @property
    def room(self) -> models.Room:
        return self._job.room

    @property
    def publisher(self) -> models.ParticipantInfo | None:
        return self._job.participant if self._job.HasField("participant") else None

    @property
    def agent_name(self) -> str:
        return self._job.agent_name

    @property
    def answered(self) -> bool:
        return self._answered

    def _claim(self, verb: str) -> None:
        if self._answered:
            raise LocalProtocolError(f"job request {self.id} was already answered; cannot {verb}")
        self._answered = True

    async def accept(
        self,
        *,
        name: str = "",
        identity: str = "",
        metadata: str = "",
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        """Take the job. ``identity`` defaults to ``agent-<job id>``."""
        self._claim("accept")
        merged = dict(attributes or {})
        merged[AGENT_NAME_ATTRIBUTE] = self._agent_name
        args = JobAcceptArguments(
            name=name,
            identity=identity or f"agent-{self.id}",
            metadata=metadata,
            attributes=merged,
        )
        await self._channel.accepted(args)

    async def reject(self, *, terminate: bool = False) -> None:
        """Decline the job. By default the server offers it to the next worker; with
        ``terminate=True`` it ends the job without trying another worker.

        (livekit-agents 1.x defaults to ``terminate=True``; we follow its documentation,
        "if the request is rejected, it's sent to the next available worker".)
        """
        self._claim("reject")
        self._channel.answer(
            agent.AvailabilityResponse(job_id=self.id, available=False, terminate=terminate)
        )

    def __repr__(self) -> str:
        return f"<JobRequest {self.id} room={self.room.name!r} agent_name={self.agent_name!r}>"


def job_fields(job: agent.Job) -> dict[str, str]:
    """The log fields that identify a job."""
    return {"job_id": job.id, "room": job.room.name, "room_id": job.room.sid,
            "agent_name": job.agent_name}


__all__: Sequence[str] = ()
