"""The ``/agent`` protocol as a sans-io state machine (in the manner of h11 and wsproto).

Theory of operation
-------------------
One ``AgentProtocol`` lives for one websocket connection. It never does I/O and never reads a
clock: the connection feeds it the bytes of each ``ServerMessage`` with ``receive_data()`` and
gets back one event; every command (``register()``, ``answer()``, ``update_worker()``, …)
returns the ``WorkerMessage`` to put on the wire. All legality checks live here, so they are
tested synchronously without sockets.

States::

    IDLE --register()--> REGISTERING --RegisterWorkerResponse--> REGISTERED
      (any state) --close()--> CLOSED

Rules (from livekit-server, see PROTOCOL.md §2–§5):

* Before registration the only legal server message is ``register``; the first frame must be
  it. A second ``register`` is illegal (the server closes the socket for a duplicate).
* ``AvailabilityRequest`` opens an *offer*; it is answered exactly once with ``answer()``.
  An ``available=True`` answer makes the job *awaiting assignment* until ``JobAssignment``
  arrives or ``forget()`` is called (our assignment timeout).
* A ``JobAssignment`` for a job not awaiting one is tolerated and reported as ``Ignored``:
  the server may assign late, after we gave up.
* ``JobTermination``, ``WorkerPong`` are passed on; fields the stock server never sends
  (``go_away``) are reported as ``Ignored``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import final

import attrs
from google.protobuf.message import DecodeError
from livekit.protocol import agent, models

from ._errors import LocalProtocolError, RemoteProtocolError


@final
class State(enum.Enum):
    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"
    CLOSED = "closed"


# -- events -------------------------------------------------------------------------------------


@final
@attrs.frozen
class Registered:
    worker_id: str
    server_info: models.ServerInfo


@final
@attrs.frozen
class JobOffered:
    job: agent.Job
    resuming: bool


@final
@attrs.frozen
class JobAssigned:
    job: agent.Job
    url: str | None
    token: str


@final
@attrs.frozen
class JobTerminated:
    job_id: str


@final
@attrs.frozen
class Pong:
    last_timestamp: int
    timestamp: int


@final
@attrs.frozen
class Ignored:
    """A legal but useless message; ``reason`` is worth a log line."""

    reason: str


Event = Registered | JobOffered | JobAssigned | JobTerminated | Pong | Ignored


@final
class AgentProtocol:
    """The worker side of ``/agent`` for one connection. See the module docstring."""

    def __init__(
        self,
        *,
        agent_name: str,
        job_type: int,
        version: str,
        permissions: models.ParticipantPermission,
        deployment: str = "",
    ) -> None:
        self._agent_name = agent_name
        self._job_type = job_type
        self._version = version
        self._permissions = permissions
        self._deployment = deployment
        self.state = State.IDLE
        self.worker_id: str | None = None
        self._offers: set[str] = set()
        self._awaiting_assignment: set[str] = set()

    # -- inbound --------------------------------------------------------------------------------

    def receive_data(self, data: bytes | str) -> Event:
        """Parse one websocket message. Text frames (protojson) are not used by workers."""
        if isinstance(data, str):
            return Ignored("text frame from the server ignored (workers speak binary protobuf)")
        message = agent.ServerMessage()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            raise RemoteProtocolError(f"malformed ServerMessage ({len(data)} bytes): {exc}") from exc
        return self.receive(message)

    def receive(self, message: agent.ServerMessage) -> Event:
        if self.state is State.CLOSED:
            raise LocalProtocolError("receive() on a closed protocol")
        kind = message.WhichOneof("message")
        if kind is None:
            raise RemoteProtocolError("ServerMessage with no message set")
        if self.state is State.IDLE:
            raise LocalProtocolError("a message arrived before register() was sent")
        if self.state is State.REGISTERING:
            if kind != "register":
                raise RemoteProtocolError(
                    f"expected RegisterWorkerResponse as the first server message, got {kind!r}"
                )
            if not message.register.worker_id:
                raise RemoteProtocolError("RegisterWorkerResponse without a worker_id")
            self.state = State.REGISTERED
            self.worker_id = message.register.worker_id
            return Registered(message.register.worker_id, message.register.server_info)
        # REGISTERED
        if kind == "register":
            raise RemoteProtocolError("second RegisterWorkerResponse on a registered connection")
        if kind == "availability":
            job = message.availability.job
            if not job.id:
                raise RemoteProtocolError("AvailabilityRequest for a job without an id")
            if job.id in self._offers or job.id in self._awaiting_assignment:
                return Ignored(f"duplicate AvailabilityRequest for job {job.id}")
            self._offers.add(job.id)
            return JobOffered(job, message.availability.resuming)
        if kind == "assignment":
            job = message.assignment.job
            if job.id not in self._awaiting_assignment:
                return Ignored(f"received an assignment for an unknown job {job.id!r}")
            self._awaiting_assignment.discard(job.id)
            url = message.assignment.url if message.assignment.HasField("url") else None
            return JobAssigned(job, url or None, message.assignment.token)
        if kind == "termination":
            return JobTerminated(message.termination.job_id)
        if kind == "pong":
            return Pong(message.pong.last_timestamp, message.pong.timestamp)
        return Ignored(f"server message {kind!r} is not handled by this worker")

    @property
    def open_offers(self) -> int:
        """Offers received and not answered yet: each will put one answer on the wire."""
        return len(self._offers)

    # -- outbound -------------------------------------------------------------------------------

    def register(self) -> agent.WorkerMessage:
        if self.state is not State.IDLE:
            raise LocalProtocolError(f"register() in state {self.state.value}")
        self.state = State.REGISTERING
        request = agent.RegisterWorkerRequest(
            type=self._job_type,  # type: ignore[arg-type]
            agent_name=self._agent_name,
            version=self._version,
            allowed_permissions=self._permissions,
        )
        if self._deployment:
            request.deployment = self._deployment
        return agent.WorkerMessage(register=request)

    def answer(self, response: agent.AvailabilityResponse) -> agent.WorkerMessage:
        """Answer an open offer exactly once."""
        self._require_registered("answer")
        if response.job_id not in self._offers:
            raise LocalProtocolError(f"answer() for job {response.job_id!r}, which has no open offer")
        self._offers.discard(response.job_id)
        if response.available:
            if not response.participant_identity:
                # the server would mint a token with an empty `sub`, and the join would fail later
                raise LocalProtocolError("an accepting answer needs a participant identity")
            self._awaiting_assignment.add(response.job_id)
        return agent.WorkerMessage(availability=response)

    def forget(self, job_id: str) -> None:
        """Stop waiting for the assignment of ``job_id`` (we timed out)."""
        self._awaiting_assignment.discard(job_id)

    def update_worker(self, *, status: int, load: float, job_count: int) -> agent.WorkerMessage:
        self._require_registered("update_worker")
        return agent.WorkerMessage(
            update_worker=agent.UpdateWorkerStatus(
                status=status, load=load, job_count=job_count  # type: ignore[arg-type]
            )
        )

    def update_job(self, job_id: str, status: int, error: str = "") -> agent.WorkerMessage:
        self._require_registered("update_job")
        return agent.WorkerMessage(
            update_job=agent.UpdateJobStatus(job_id=job_id, status=status, error=error)  # type: ignore[arg-type]
        )

    def migrate(self, job_ids: Iterable[str]) -> agent.WorkerMessage:
        self._require_registered("migrate")
        return agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=list(job_ids)))

    def ping(self, timestamp_ms: int) -> agent.WorkerMessage:
        if self.state in (State.IDLE, State.CLOSED):
            raise LocalProtocolError(f"ping() in state {self.state.value}")
        return agent.WorkerMessage(ping=agent.WorkerPing(timestamp=timestamp_ms))

    def simulate_job(
        self, room: models.Room, participant: models.ParticipantInfo | None = None
    ) -> agent.WorkerMessage:
        self._require_registered("simulate_job")
        request = agent.SimulateJobRequest(
            type=agent.JT_PUBLISHER if participant is not None else agent.JT_ROOM, room=room
        )
        if participant is not None:
            request.participant.CopyFrom(participant)
        return agent.WorkerMessage(simulate_job=request)

    def close(self) -> None:
        self.state = State.CLOSED
        self._offers.clear()
        self._awaiting_assignment.clear()

    def _require_registered(self, what: str) -> None:
        if self.state is not State.REGISTERED:
            raise LocalProtocolError(f"{what}() in state {self.state.value}; register first")
