"""Dispatch: the agent servers (workers) on ``/agent``, the jobs, and the availability
exchange that gives each job to a worker (PROTOCOL.md §3).

Owner: ``Dispatcher`` owns the workers and the jobs (``WorkerInfo`` / ``JobInfo`` records),
every ``/agent`` connection, every job offer and assignment, and the ``JobTermination``s.
Rooms (``_rooms.py``) ask it to launch a job (``_launch``) or to end one (``_terminate``);
nothing else changes a worker or a job.

A job is offered to one worker at a time (``AvailabilityRequest``); the whole exchange,
retries on ``available=false`` included, must end within ``availability_timeout`` (3 s, the
psrpc deadline of the real server). A late answer finds no pending offer and is ignored.
The decisions themselves (who gets an offer, what the job token holds, which registrations
are refused) are pure functions in ``_dispatch.py``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Final, final

import trio
from livekit.protocol import agent, agent_dispatch, models

from ._dispatch import (
    Candidate,
    default_permissions,
    job_token,
    new_id,
    select_worker,
    validate_registration,
)
from ._http import WebSocket, WebSocketClosed, decode_frame, encode_frame
from ._records import Changes, JobInfo, Pending, RoomInfo, WorkerInfo, now_ns

logger = logging.getLogger("trio_agents.devserver")

SERVER_VERSION: Final = "1.13.5"
SIGNAL_PROTOCOL: Final = 17
AGENT_PROTOCOL: Final = 1
#: ``RegisterTimeout`` of livekit-server.
REGISTER_TIMEOUT: Final = 10.0
#: ``AssignJobTimeout``: what a simulated job has (it runs outside the 3 s RPC window).
SIMULATE_TIMEOUT: Final = 10.0
#: The psrpc deadline of ``JobRequest``, retries included (PROTOCOL.md §3.4).
AVAILABILITY_TIMEOUT: Final = 3.0


class _Closed(Exception):
    """The worker's socket must be closed (the reason is the message)."""



@final
class Dispatcher:
    """The workers, the jobs, and what passes between them (see the module docstring)."""

    def __init__(self, nursery: trio.Nursery, changes: Changes, *,
                 secrets: Mapping[str, str], availability_timeout: float,
                 register_timeout: float, rng: random.Random) -> None:
        self._nursery = nursery
        self._changed = changes.changed
        self.wait_until = changes.wait_until
        self._secrets = secrets
        self.availability_timeout = availability_timeout
        self.register_timeout = register_timeout
        self._rng = rng
        self._workers: dict[str, WorkerInfo] = {}
        self._jobs: dict[str, JobInfo] = {}

    def drop_worker(self, worker_id: str) -> None:
        """Drop a worker's connection as a network failure would: the server forgets it at
        once (its offers move to the next worker, its running jobs stay as they are), and its
        socket is closed without a close frame (the client sees 1006)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            raise KeyError(f"no registered worker {worker_id!r}")
        socket = worker._socket
        self._deregister(worker, "dropped by drop_worker")
        if socket is not None:
            self._nursery.start_soon(socket.abort)


    # -- dispatch ------------------------------------------------------------------------------

    def _launch(self, room: RoomInfo, dispatch: agent_dispatch.AgentDispatch,
                job_type: agent.JobType,
                participant: models.ParticipantInfo | None) -> None:
        job = agent.Job(
            id=new_id("AJ_"), dispatch_id=dispatch.id, type=job_type,
            room=room.room, namespace="", metadata=dispatch.metadata,
            agent_name=dispatch.agent_name, deployment=dispatch.deployment,
            attributes=dict(dispatch.attributes))
        if participant is not None:
            job.participant.CopyFrom(participant)
        if not any(w.matches(job) for w in self._workers.values()):
            # the room side's CheckEnabled finds no worker: the job is never created
            logger.info("not dispatching agent job since no worker is available "
                        "(room %s, agent name %r, %s)", room.room.name, dispatch.agent_name,
                        agent.JobType.Name(job_type),
                        extra={"room": room.room.name, "agent_name": dispatch.agent_name})
            return
        record = JobInfo(job=job, room=room.room.name)
        self._jobs[job.id] = record
        room.job_ids.append(job.id)
        self._nursery.start_soon(self._dispatch, record, dispatch)

    async def _dispatch(self, record: JobInfo, dispatch: agent_dispatch.AgentDispatch) -> None:
        """Offer the job until a worker takes it, ends it, or the window closes.

        The error boundary of one dispatch: an error of ours drops this job (logged), and
        the server, its rooms and its other jobs go on.
        """
        try:
            await self._dispatch_job(record, dispatch)
        except Exception as exc:
            logger.exception("dispatching job %s (room %s) failed on an error of the dev server",
                             record.job.id, record.room)
            record.dropped = record.dropped or f"dev server error: {exc!r}"
            record.done = True
            self._changed()

    async def _dispatch_job(self, record: JobInfo, dispatch: agent_dispatch.AgentDispatch) -> None:
        tried: set[str] = set()
        with trio.move_on_after(self.availability_timeout) as deadline:
            while True:
                candidates = [Candidate(w.id, w.status, w.load)
                              for w in self._workers.values() if w.matches(record.job)]
                worker_id, why = select_worker(candidates, tried, self._rng,
                                               first_attempt=not tried)
                if worker_id is None:
                    record.dropped = why
                    break
                tried.add(worker_id)
                record.attempts += 1
                self._changed()
                worker = self._workers[worker_id]
                response = await self._offer(worker, record)
                if response is None or (not response.available and not response.terminate):
                    continue  # closed or not available: the next worker
                if response.terminate:
                    record.job.state.worker_id = worker.id
                    record.set_status(agent.JS_SUCCESS)
                    break
                await self._assign(worker, record, response)
                dispatch.state.jobs.append(record.job)
                break
        if deadline.cancelled_caught:
            record.dropped = "context deadline exceeded"
        if record.dropped:
            logger.warning("failed to assign job %s (room %s) to a worker: %s", record.job.id,
                           record.room, record.dropped,
                           extra={"job_id": record.job.id, "room": record.room})
        record.done = True
        self._changed()

    async def _offer(self, worker: WorkerInfo, record: JobInfo) -> agent.AvailabilityResponse | None:
        """Send one ``AvailabilityRequest``; the answer, or ``None`` if the worker went away."""
        job = agent.Job()
        job.CopyFrom(record.job)
        now = now_ns()
        job.state.CopyFrom(agent.JobState(status=agent.JS_RUNNING, worker_id=worker.id,
                                          started_at=now, updated_at=now))
        pending = worker._pending[job.id] = Pending()
        try:
            record.offered_at = time.monotonic()
            await self._send(worker, agent.ServerMessage(
                availability=agent.AvailabilityRequest(job=job)))
            await pending.event.wait()
            record.answered_at = time.monotonic()
            return pending.response
        except WebSocketClosed:
            return None
        finally:
            worker._pending.pop(job.id, None)

    async def _assign(self, worker: WorkerInfo, record: JobInfo,
                      response: agent.AvailabilityResponse) -> None:
        now = now_ns()
        record.job.state.CopyFrom(agent.JobState(
            status=agent.JS_RUNNING, worker_id=worker.id, started_at=now, updated_at=now,
            participant_identity=response.participant_identity))
        record.worker_id = worker.id
        record.response = response
        record.token = job_token(api_key=worker.api_key, api_secret=worker.api_secret,
                                 room=record.room, agent_name=worker.agent_name,
                                 permissions=worker.permissions, response=response)
        record.set_status(agent.JS_RUNNING)
        worker.running_job_ids.add(record.job.id)
        try:
            record.assigned_at = time.monotonic()
            await self._send(worker, agent.ServerMessage(
                assignment=agent.JobAssignment(job=record.job, token=record.token)))
        except WebSocketClosed:
            logger.warning("worker %s closed before its assignment", worker.id)

    def _terminate(self, job_id: str, status: agent.JobStatus, error: str) -> None:
        """``JobTerminate``: only for a job still running on a connected worker. The job
        ends now; the server does not wait for the worker.

        The ``JobTermination`` is written by a task of the server: whoever ended the job (a
        participant's own session, leaving) may be cancelled right after, and the worker
        must still be told.
        """
        record = self._jobs.get(job_id)
        if record is None or record.ended or not record.worker_id:
            return
        worker = self._workers.get(record.worker_id)
        if worker is None or job_id not in worker.running_job_ids:
            return
        worker.running_job_ids.discard(job_id)
        record.set_status(status, error)
        self._nursery.start_soon(self._send_quietly, worker, agent.ServerMessage(
            termination=agent.JobTermination(job_id=job_id)))

    async def _send_quietly(self, worker: WorkerInfo, message: agent.ServerMessage) -> None:
        try:
            await self._send(worker, message)
        except WebSocketClosed:
            pass

    async def _terminate_when_launched(self, records: list[JobInfo]) -> None:
        await self.wait_until(lambda: all(r.done for r in records))
        for record in records:
            self._terminate(record.job.id, agent.JS_SUCCESS, "")
        self._changed()


    # -- /agent -----------------------------------------------------------------------------

    async def _agent_session(self, socket: WebSocket, *, api_key: str) -> None:
        """One worker connection: the registration window, then its messages until it ends.

        Whatever ends it, the socket is dropped without a close frame and the worker
        deregistered.
        """
        worker_id = new_id("AW_")  # at upgrade time, one per connection
        worker: WorkerInfo | None = None
        try:
            worker = await self._handshake(socket, worker_id, api_key)
            while True:
                message, worker._json = await _receive(socket)
                await self._handle(worker, message)
        except (_Closed, WebSocketClosed) as exc:
            logger.debug("closing worker %s: %s", worker_id, exc)
        finally:
            if worker is not None:
                self._deregister(worker, "connection closed")
            await socket.abort()

    async def _handshake(self, socket: WebSocket, worker_id: str, api_key: str) -> WorkerInfo:
        """``HandshakeAgentWorker``: only ``register`` and ``ping`` until registered."""
        with trio.move_on_after(self.register_timeout):
            while True:
                message, as_json = await _receive(socket)
                kind = message.WhichOneof("message")
                if kind == "ping":
                    await socket.send(encode_frame(_pong(message), as_json))
                elif kind == "register":
                    problem = validate_registration(message.register)
                    if problem:
                        raise _Closed(f"registration refused: {problem}")
                    worker = self._new_worker(worker_id, message.register, api_key, socket)
                    worker._json = as_json
                    await self._send(worker, agent.ServerMessage(
                        register=agent.RegisterWorkerResponse(
                            worker_id=worker_id, server_info=models.ServerInfo(
                                edition=models.ServerInfo.Standard, version=SERVER_VERSION,
                                protocol=SIGNAL_PROTOCOL, agent_protocol=AGENT_PROTOCOL,
                                node_id="ND_devserver"))))
                    self._workers[worker_id] = worker
                    logger.debug("worker %s registered (agent name %r, %s)", worker_id,
                                worker.agent_name, agent.JobType.Name(worker.job_type),
                                extra={"agent_name": worker.agent_name})
                    self._changed()
                    return worker
                else:
                    raise _Closed(f"{kind or 'an empty message'} before registration")
        raise _Closed(f"no registration within {self.register_timeout} s")

    def _new_worker(self, worker_id: str, request: agent.RegisterWorkerRequest, api_key: str,
                    socket: WebSocket) -> WorkerInfo:
        permissions = (request.allowed_permissions if request.HasField("allowed_permissions")
                       else default_permissions())
        return WorkerInfo(
            id=worker_id, agent_name=request.agent_name,
            namespace=request.namespace if request.HasField("namespace") else "",
            job_type=request.type, deployment=request.deployment, version=request.version,
            permissions=permissions, api_key=api_key, api_secret=self._secrets[api_key],
            socket=socket)

    def _deregister(self, worker: WorkerInfo, why: str) -> None:
        """Forget the worker (once): its pending offers fail over, its running jobs are left
        as they are (the real server only drops its bookkeeping)."""
        if self._workers.get(worker.id) is not worker:
            return
        del self._workers[worker.id]
        worker._socket = None
        for pending in worker._pending.values():
            pending.event.set()  # response None: the offer moves to the next worker
        logger.debug("worker %s deregistered: %s", worker.id, why)
        self._changed()

    async def _send(self, worker: WorkerInfo, message: agent.ServerMessage) -> None:
        if worker._socket is None:
            raise WebSocketClosed("worker is gone")
        await worker._socket.send(encode_frame(message, worker._json))

    async def _handle(self, worker: WorkerInfo, message: agent.WorkerMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "availability":
            pending = worker._pending.get(message.availability.job_id)
            if pending is None:
                logger.debug("availability response for unknown job %s ignored",
                            message.availability.job_id)
                return
            pending.response = message.availability
            pending.event.set()
        elif kind == "update_worker":
            update = message.update_worker
            if update.HasField("status"):
                worker.status = update.status
            worker.load = update.load
            self._changed()
        elif kind == "update_job":
            self._update_job(worker, message.update_job)
        elif kind == "ping":
            await self._send(worker, _pong(message))
        elif kind == "migrate_job":
            worker.migrated_job_ids.extend(message.migrate_job.job_ids)  # recorded, then ignored
            self._changed()
        elif kind == "simulate_job":
            self._simulate(worker, message.simulate_job)
        else:  # register again, or nothing set
            raise _Closed(f"unexpected {kind or 'empty message'} from a registered worker")

    def _update_job(self, worker: WorkerInfo, update: agent.UpdateJobStatus) -> None:
        """``Worker.UpdateJobStatus``: only for a job running on this worker."""
        record = self._jobs.get(update.job_id)
        if record is None or update.job_id not in worker.running_job_ids:
            logger.debug("status for unknown job %s ignored", update.job_id)
            return
        if record.job.state.status == agent.JS_PENDING and update.status != agent.JS_PENDING:
            record.job.state.started_at = now_ns()
        record.set_status(update.status, update.error)
        if record.ended:
            worker.running_job_ids.discard(update.job_id)
        self._changed()

    def _simulate(self, worker: WorkerInfo, request: agent.SimulateJobRequest) -> None:
        """``HandleSimulateJob``: a job for this very worker, no room bookkeeping, 10 s."""
        if not request.HasField("room"):
            logger.warning("simulate_job without a room: livekit-server would fail on it")
        job = agent.Job(
            id=new_id("AJ_"), type=agent.JT_PUBLISHER if request.HasField("participant")
            else agent.JT_ROOM, room=request.room, namespace=worker.namespace,
            agent_name=worker.agent_name)
        if request.HasField("participant"):
            job.participant.CopyFrom(request.participant)
        record = JobInfo(job=job, room=request.room.name)
        self._jobs[job.id] = record
        self._changed()

        async def assign() -> None:
            try:
                await offer()
            except Exception as exc:  # this job's error boundary, as in ``_dispatch``
                logger.exception("simulated job %s failed on an error of the dev server",
                                 job.id)
                record.dropped = record.dropped or f"dev server error: {exc!r}"
                record.done = True
                self._changed()

        async def offer() -> None:
            with trio.move_on_after(SIMULATE_TIMEOUT) as deadline:
                record.attempts = 1
                response = await self._offer(worker, record)
                if response is None:
                    record.dropped = "worker closed"
                elif response.terminate:
                    record.set_status(agent.JS_SUCCESS)
                elif response.available:
                    await self._assign(worker, record, response)
                else:
                    record.dropped = "worker not available"
            if deadline.cancelled_caught:
                record.dropped = "availability timeout"
            record.done = True
            self._changed()

        self._nursery.start_soon(assign)



async def _receive(socket: WebSocket) -> tuple[agent.WorkerMessage, bool]:
    """The next ``WorkerMessage`` and whether it came as protojson (a text frame)."""
    data = await socket.receive()
    try:
        return decode_frame(data, agent.WorkerMessage), isinstance(data, str)
    except ValueError as exc:
        raise _Closed(f"unparseable message: {exc}") from exc


def _pong(message: agent.WorkerMessage) -> agent.ServerMessage:
    return agent.ServerMessage(pong=agent.WorkerPong(
        last_timestamp=message.ping.timestamp, timestamp=int(time.time() * 1000)))
