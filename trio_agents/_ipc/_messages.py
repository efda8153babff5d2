"""The messages between the server and a job process, and the one codec for all of them.

Every message is a frozen attrs class registered in ``MESSAGES``. ``encode(msg)`` writes a
JSON array ``[tag, field1, field2, ...]`` (fields in declaration order); ``decode`` checks the
tag, the number of fields and every field against the class's annotations (see ``_codec``:
types, and the limits of ``Annotated`` ones), so a new field is carried without any
hand-written read/write pair, and every message ``decode`` returns is well typed. Supported
field types: ``str``, ``int``, ``float``, ``bool``, ``bytes`` (base64), ``Mapping[str, str]``,
``Mapping[str, JsonScalar]``, ``FunctionRef`` and ``X | None`` of those. The ``agent.Job``
travels as protobuf bytes, times as float64 seconds.

``decode`` raises ``RemoteProtocolError`` and nothing else, whatever the payload: a job
process runs user code, and one bad frame must fail that process, never the server.

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

import json
import typing
from collections.abc import Mapping
from typing import Annotated, Final, Union, final

import attrs
from livekit.protocol import agent

from .._errors import LocalProtocolError, RemoteProtocolError
from .._jobs import JobAcceptArguments, RunningJobInfo
from .._loading import FunctionRef
from ._codec import (
    SECONDS,
    TIMESTAMP,
    DecodeError,
    Entries,
    Int,
    Text,
    from_json,
    load_json,
    log_record_key,
    to_json,
)

from ._codec import JsonScalar as JsonScalar

SUCCESS: Final = "success"
FAILED: Final = "failed"
#: A name (logger, function, level, executor type): short.
_NAME: Final = Text(max_len=1024)
_PATH: Final = Text(max_len=4096)
_COUNT: Final = Int(lo=0)


@final
@attrs.frozen(kw_only=True)
class InitializeRequest:
    """Everything the job process needs before it runs ``setup_fnc``."""

    entrypoint: FunctionRef
    setup: FunctionRef | None = None
    session_end: FunctionRef | None = None
    executor_type: Annotated[str, Text(choices=("process", "thread"))] = "process"
    http_proxy: str | None = None
    ws_url: str = ""
    api_key: str = ""
    api_secret: str = ""
    log_level: Annotated[str, _NAME] = "INFO"
    session_end_timeout: Annotated[float, SECONDS] = 300.0
    shutdown_callback_timeout: Annotated[float, SECONDS] = 10.0


@final
@attrs.frozen(kw_only=True)
class InitializeResponse:
    """``error`` empty: ready for a job. Otherwise setup failed (``traceback`` tells where)."""

    error: str = ""
    traceback: str = ""


@final
@attrs.frozen(kw_only=True)
class Ping:
    seq: Annotated[int, _COUNT]
    sent_at: Annotated[float, TIMESTAMP]


@final
@attrs.frozen(kw_only=True)
class Pong:
    """Echoes the ping's ``seq`` and ``sent_at`` so the parent measures the round trip."""

    seq: Annotated[int, _COUNT]
    sent_at: Annotated[float, TIMESTAMP]


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
    received_at: Annotated[float, TIMESTAMP]
    accepted_at: Annotated[float, TIMESTAMP]
    assigned_at: Annotated[float, TIMESTAMP]
    launched_at: Annotated[float, TIMESTAMP]

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

    name: Annotated[str, _NAME]
    level: int
    msg: str
    created: Annotated[float, TIMESTAMP]
    exc_text: str = ""
    pathname: Annotated[str, _PATH] = ""
    lineno: Annotated[int, _COUNT] = 0
    func_name: Annotated[str, _NAME] = ""
    fields: Annotated[Mapping[str, JsonScalar], Entries(key=log_record_key)] = attrs.field(
        factory=dict)
    """``job_id``, ``room``, ``agent_name``, ``log_context_fields`` and JSON-able extras."""


@attrs.frozen(kw_only=True)
class _JobEnd:
    """How the job ended. ``outcome`` is ``"success"`` or ``"failed"``."""

    outcome: Annotated[str, Text(choices=(SUCCESS, FAILED))]
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
    cls: [(f.name, typing.get_type_hints(cls, include_extras=True)[f.name])
          for f in attrs.fields(cls)]
    for cls in MESSAGES
}


def encode(msg: Message) -> bytes:
    """One message → payload bytes (frame them with ``encode_frame``).

    Raises ``LocalProtocolError`` for a value the peer would refuse (a bug of the sender).
    """
    cls = type(msg)
    out: list[object] = [_TAGS[cls]]
    for name, hint in _FIELDS[cls]:
        try:
            out.append(to_json(getattr(msg, name), hint))
        except DecodeError as exc:
            raise LocalProtocolError(f"cannot send IPC {cls.__name__}.{name}: {exc}") from exc
    return json.dumps(out, separators=(",", ":"), allow_nan=False).encode()


def decode(payload: bytes) -> Message:
    """Payload bytes → a well-typed message. Raises ``RemoteProtocolError``, and only that."""
    data = load_json(payload)
    if type(data) is not list or not data or type(data[0]) is not int:
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
            kwargs[name] = from_json(value, hint)
        except DecodeError as exc:
            raise RemoteProtocolError(
                f"IPC {cls.__name__}.{name}: {exc}", reconnect=False
            ) from exc
    return cls(**kwargs)  # type: ignore[arg-type]
