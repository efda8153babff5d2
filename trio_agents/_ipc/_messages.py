"""The messages between the server and a job process, and the one codec for all of them.

Every message is a frozen attrs class registered in ``MESSAGES``. ``encode(msg)`` writes a
JSON array ``[tag, field1, field2, ...]`` (fields in declaration order); ``decode`` checks the
tag, the number of fields and the type of every field against the class's annotations, so a
new field is carried without any hand-written read/write pair. Supported field types: ``str``,
``int``, ``float``, ``bool``, ``bytes`` (base64), ``Mapping[str, str]``,
``Mapping[str, JsonScalar]``, ``FunctionRef`` and ``X | None`` of those. The ``agent.Job``
travels as protobuf bytes, times as float64 seconds.

Direction: P→C parent to child, C→P child to parent::

    P→C InitializeRequest   what to load and how to behave     C→P InitializeResponse
    P→C Ping                                                   C→P Pong
    P→C StartJob            one per process                    C→P JobStarted
    P→C ShutdownRequest     stop the job (server termination)  C→P JobEnding (in its room)
    P→C JobEndingAck        its status is reported: leave      C→P JobFinished (then exit)
                                                               C→P LogRecord (any time)

``JobEnding`` comes only from a job that joined its room, before it leaves it: LiveKit fails a
job whose agent leaves the room before the worker reported how the job ended, so the server
reports the status on ``JobEnding`` and the job waits (bounded) for ``JobEndingAck``.
"""

from __future__ import annotations

import base64
import binascii
import json
import types
import typing
from collections.abc import Mapping
from typing import Final, Union, final

import attrs
from livekit.protocol import agent

from .._errors import RemoteProtocolError
from .._jobs import JobAcceptArguments, RunningJobInfo
from .._loading import FunctionRef

JsonScalar = str | int | float | bool | None


@final
@attrs.frozen(kw_only=True)
class InitializeRequest:
    """Everything the job process needs before it runs ``setup_fnc``."""

    entrypoint: FunctionRef
    setup: FunctionRef | None = None
    session_end: FunctionRef | None = None
    executor_type: str = "process"
    http_proxy: str | None = None
    ws_url: str = ""
    api_key: str = ""
    api_secret: str = ""
    log_level: str = "INFO"
    session_end_timeout: float = 300.0
    shutdown_callback_timeout: float = 10.0


@final
@attrs.frozen(kw_only=True)
class InitializeResponse:
    """``error`` empty: ready for a job. Otherwise setup failed (``traceback`` tells where)."""

    error: str = ""
    traceback: str = ""


@final
@attrs.frozen(kw_only=True)
class Ping:
    seq: int
    sent_at: float


@final
@attrs.frozen(kw_only=True)
class Pong:
    """Echoes the ping's ``seq`` and ``sent_at`` so the parent measures the round trip."""

    seq: int
    sent_at: float


@final
@attrs.frozen(kw_only=True)
class StartJob:
    """A ``RunningJobInfo``, flattened: the job as protobuf bytes, accept arguments spelled out."""

    job: bytes
    url: str
    token: str
    worker_id: str
    fake_job: bool
    accept_name: str
    accept_identity: str
    accept_metadata: str
    accept_attributes: Mapping[str, str]
    received_at: float
    accepted_at: float
    assigned_at: float
    launched_at: float

    @classmethod
    def from_info(cls, info: RunningJobInfo) -> StartJob:
        args = info.accept_arguments
        return cls(
            job=info.job.SerializeToString(), url=info.url, token=info.token,
            worker_id=info.worker_id, fake_job=info.fake_job, accept_name=args.name,
            accept_identity=args.identity, accept_metadata=args.metadata,
            accept_attributes=dict(args.attributes), received_at=info.received_at,
            accepted_at=info.accepted_at, assigned_at=info.assigned_at,
            launched_at=info.launched_at,
        )

    def to_info(self) -> RunningJobInfo:
        job = agent.Job()
        job.ParseFromString(self.job)
        return RunningJobInfo(
            accept_arguments=JobAcceptArguments(
                name=self.accept_name, identity=self.accept_identity,
                metadata=self.accept_metadata, attributes=dict(self.accept_attributes),
            ),
            job=job, url=self.url, token=self.token, worker_id=self.worker_id,
            fake_job=self.fake_job, received_at=self.received_at, accepted_at=self.accepted_at,
            assigned_at=self.assigned_at, launched_at=self.launched_at,
        )


@final
@attrs.frozen(kw_only=True)
class JobStarted:
    """The entrypoint is running."""


@final
@attrs.frozen(kw_only=True)
class ShutdownRequest:
    reason: str = ""


@final
@attrs.frozen(kw_only=True)
class LogRecord:
    """A log record of the job process, already formatted (``msg`` has its args applied)."""

    name: str
    level: int
    msg: str
    created: float
    exc_text: str = ""
    pathname: str = ""
    lineno: int = 0
    func_name: str = ""
    fields: Mapping[str, JsonScalar] = attrs.field(factory=dict)
    """``job_id``, ``room``, ``agent_name``, ``log_context_fields`` and JSON-able extras."""


SUCCESS: Final = "success"
FAILED: Final = "failed"


@attrs.frozen(kw_only=True)
class _JobEnd:
    """How the job ended. ``outcome`` is ``"success"`` or ``"failed"``."""

    outcome: str
    error: str = ""
    user_initiated: bool = False
    reason: str = ""


@final
@attrs.frozen(kw_only=True)
class JobFinished(_JobEnd):
    """The job is over; the process exits next."""


@final
@attrs.frozen(kw_only=True)
class JobEnding(_JobEnd):
    """The job is over and about to leave its room: report its status now, then answer
    ``JobEndingAck``. ``JobFinished`` still follows."""


@final
@attrs.frozen(kw_only=True)
class JobEndingAck:
    """The server has handled ``JobEnding`` (its status report is on its way): leave the room."""


Message = Union[
    InitializeRequest, InitializeResponse, Ping, Pong, StartJob, JobStarted, ShutdownRequest,
    LogRecord, JobFinished, JobEnding, JobEndingAck,
]
#: Tag of each message type on the wire. Append only: a tag is never reused.
MESSAGES: Final[tuple[type[Message], ...]] = typing.get_args(Message)
_TAGS: Final = {cls: tag for tag, cls in enumerate(MESSAGES)}
_FIELDS: Final = {
    cls: [(f.name, typing.get_type_hints(cls)[f.name]) for f in attrs.fields(cls)]
    for cls in MESSAGES
}


def encode(msg: Message) -> bytes:
    """One message → payload bytes (frame them with ``encode_frame``)."""
    cls = type(msg)
    out: list[object] = [_TAGS[cls]]
    out.extend(_to_json(getattr(msg, name)) for name, _ in _FIELDS[cls])
    return json.dumps(out, separators=(",", ":"), allow_nan=True).encode()


def decode(payload: bytes) -> Message:
    """Payload bytes → message. Raises ``RemoteProtocolError`` naming what is wrong."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteProtocolError(f"IPC message is not valid JSON: {exc}", reconnect=False) from exc
    if not isinstance(data, list) or not data or type(data[0]) is not int:
        raise RemoteProtocolError("IPC message is not a [tag, fields...] array", reconnect=False)
    tag = data[0]
    if not 0 <= tag < len(MESSAGES):
        raise RemoteProtocolError(f"unknown IPC message tag {tag}", reconnect=False)
    cls = MESSAGES[tag]
    fields = _FIELDS[cls]
    if len(data) != len(fields) + 1:
        raise RemoteProtocolError(
            f"IPC {cls.__name__} has {len(data) - 1} fields, expected {len(fields)}",
            reconnect=False,
        )
    kwargs: dict[str, object] = {}
    for (name, hint), value in zip(fields, data[1:], strict=True):
        try:
            kwargs[name] = _from_json(value, hint)
        except (TypeError, ValueError) as exc:
            raise RemoteProtocolError(
                f"IPC {cls.__name__}.{name}: {exc}", reconnect=False
            ) from exc
    return cls(**kwargs)  # type: ignore[arg-type]


def _to_json(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, FunctionRef):
        return [value.module, value.qualname, value.path]
    if isinstance(value, Mapping):
        return dict(value)
    return value


_SCALARS: Final = (str, int, float, bool, type(None))


def _from_json(value: object, hint: object) -> object:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _from_json(value, option)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError("; ".join(errors))
    if hint is float:
        if type(value) not in (int, float):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)  # type: ignore[arg-type]
    if hint in (str, int, bool):
        if type(value) is not hint:
            raise TypeError(f"expected {hint.__name__}, got {type(value).__name__}")
        return value
    if hint is bytes:
        if not isinstance(value, str):
            raise TypeError(f"expected base64 text, got {type(value).__name__}")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64: {exc}") from exc
    if hint is FunctionRef:
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, str) for v in value)):
            raise TypeError("expected [module, qualname, path]")
        return FunctionRef(*value)
    if origin is Mapping:
        _, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        for v in value.values():
            if value_hint is str and not isinstance(v, str):
                raise TypeError(f"expected string values, got {type(v).__name__}")
            if not isinstance(v, _SCALARS):
                raise TypeError(f"expected scalar values, got {type(v).__name__}")
        return value
    raise TypeError(f"the IPC codec has no rule for {hint!r}")  # a bug here, not in the peer
