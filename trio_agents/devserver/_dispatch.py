"""Pure pieces of livekit-server's agent dispatch (PROTOCOL.md §2–§3), tested without sockets."""

from __future__ import annotations

import math
import random
import secrets
import string
import struct
from collections.abc import Mapping, Sequence
from typing import Final

import attrs
from livekit.protocol import agent, models

from .._auth import VideoGrants, create_token

#: ``agents.target_load``: a node only claims a job while some worker is below it.
TARGET_LOAD: Final = 0.7
JOB_TOKEN_TTL: Final = 3600.0
#: ``limit.*`` defaults of livekit-server.
MAX_NAME_BYTES: Final = 256
MAX_METADATA_BYTES: Final = 512 * 1024
MAX_ATTRIBUTES_BYTES: Final = 64 * 1024
AGENT_NAME_KEY: Final = "lk.agent.name"
_ALPHABET: Final = string.ascii_letters + string.digits


def attributes_size(attributes: Mapping[str, str]) -> int:
    """What counts against ``MAX_ATTRIBUTES_BYTES``: every key and value, UTF-8."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in attributes.items())


def new_id(prefix: str) -> str:
    """``guid.New(prefix)``: the prefix and 12 random base62 characters."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(12))


def float32(value: float) -> float:
    """``value`` rounded to float32, the type of ``load`` in the protocol and in Go: a worker
    reporting 0.7 is at the 0.7 target, not 1e-8 below it."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


@attrs.frozen
class Candidate:
    worker_id: str
    status: int
    load: float


def select_worker(
    candidates: Sequence[Candidate],
    tried: set[str],
    rng: random.Random,
    *,
    first_attempt: bool,
    target_load: float = TARGET_LOAD,
) -> tuple[str | None, str]:
    """Pick the worker for the next availability request, or ``(None, why not)``.

    ``candidates`` are the workers registered for the job's (agent name, namespace, type,
    deployment). On the first attempt the node must *claim* the job with an affinity
    ``Σ max(0, target_load − load)`` over its available workers; a claim of 0 is never
    selected, so the job is lost when every worker reports ``load >= 0.7``. Then a weighted
    random pick by ``max(0, 1 − load)`` among the available workers not yet tried.
    """
    available = [c for c in candidates if c.status == agent.WS_AVAILABLE]
    target = float32(target_load)  # loads are float32 on the wire and in the server
    # Go's max(0, x) is NaN for a NaN x: a NaN load makes the claim NaN, never > 0.
    if first_attempt and not sum(_go_max0(target - c.load) for c in available) > 0:
        return None, "unavailable: no servers available"
    pool = [c for c in available if c.worker_id not in tried]
    weights = [_go_max0(1.0 - c.load) for c in pool]
    if not pool:
        return None, "no workers available"
    total = sum(weights)
    if total == 0:
        return None, "no workers with sufficient capacity"
    if not math.isfinite(total):
        # A load of -inf (or NaN) makes Go's weighted scan run through inf/NaN without ever
        # landing, and selectWorkerWeightedByLoad falls back to the key's first worker.
        return candidates[0].worker_id, ""
    return rng.choices(pool, weights=weights)[0].worker_id, ""


def _go_max0(value: float) -> float:
    return value if math.isnan(value) else max(0.0, value)


def validate_deployment(deployment: str) -> str | None:
    """``agent.ValidateDeployment``: why this deployment name is refused, or ``None``."""
    if len(deployment.encode()) > 64:
        return "deployment longer than 64 bytes"
    if "_" in deployment or any(ch <= " " or ch == "\x7f" for ch in deployment):
        return "deployment contains '_', whitespace or control characters"
    return None


def validate_registration(request: agent.RegisterWorkerRequest) -> str | None:
    """Why the server would close the socket on this registration, or ``None``."""
    if request.type not in (agent.JT_ROOM, agent.JT_PUBLISHER, agent.JT_PARTICIPANT):
        return f"unknown job type {request.type}"
    return validate_deployment(request.deployment)


def default_permissions() -> models.ParticipantPermission:
    return models.ParticipantPermission(can_subscribe=True, can_publish=True,
                                        can_publish_data=True, can_update_metadata=True)


def job_token(
    *,
    api_key: str,
    api_secret: str,
    room: str,
    agent_name: str,
    permissions: models.ParticipantPermission,
    response: agent.AvailabilityResponse,
    now: float | None = None,
) -> str:
    """The token in ``JobAssignment`` (``BuildAgentToken``): signed with the worker's own key,
    ``lk.agent.name`` overwritten by its registered name, grants from its permissions."""
    attributes: Mapping[str, str] = {**response.participant_attributes,
                                     AGENT_NAME_KEY: agent_name}
    return create_token(
        api_key,
        api_secret,
        identity=response.participant_identity,
        name=response.participant_name,
        metadata=response.participant_metadata,
        kind="agent",
        attributes=attributes,
        video=VideoGrants(
            room_join=True,
            agent=True,
            room=room,
            can_subscribe=permissions.can_subscribe,
            can_publish=permissions.can_publish,
            can_publish_data=permissions.can_publish_data,
            hidden=permissions.hidden,
            can_update_own_metadata=permissions.can_update_metadata,
            can_subscribe_metrics=permissions.can_subscribe_metrics,
        ),
        ttl=JOB_TOKEN_TTL,
        now=now,
    )
