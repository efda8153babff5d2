"""Fuzzing the IPC decoders: whatever a job process writes, the server gets a well-typed
message or a ``RemoteProtocolError``, never another exception and never a field it trips on.

Valid messages are generated from the messages' own annotations (``Annotated`` limits
included), so a new field is fuzzed without touching this file.
"""

from __future__ import annotations

import json
import logging
import math
import time
import typing
from collections.abc import Mapping
from typing import Annotated, Union

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from livekit.protocol import agent

from trio_agents import _ipc
from trio_agents._errors import RemoteProtocolError
from trio_agents._ipc import FrameDecoder, _codec, encode_frame
from trio_agents._ipc._codec import (
    INT64_MAX,
    INT64_MIN,
    MAX_DEPTH,
    MAX_ENTRIES,
    MAX_KEY_LENGTH,
    Entries,
    Float,
    Int,
    Text,
)
from trio_agents._loading import FunctionRef

from test_ipc import SAMPLES

#: No example database: failures print their reproduction; nothing is written to the tree.
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FIELDS = {cls: [(f.name, typing.get_type_hints(cls, include_extras=True)[f.name])
                for f in attrs.fields(cls)] for cls in _ipc.MESSAGES}


# -- what the server does with a message it received (it must never raise) ---------------------


def consume(msg: _ipc.Message) -> None:
    """The operations the server performs on the fields of a child's message (see _proc)."""
    if isinstance(msg, _ipc.LogRecord):
        record = logging.makeLogRecord({"name": msg.name, "levelno": msg.level,
                                        "levelname": logging.getLevelName(msg.level),
                                        "msg": msg.msg, "args": None, "lineno": msg.lineno})
        record.created = msg.created
        record.msecs = (msg.created - int(msg.created)) * 1000
        for key, value in msg.fields.items():
            if key not in record.__dict__:
                setattr(record, key, value)
        logging.Formatter("%(asctime)s %(message)s").format(record)
        time.localtime(msg.created)
        json.dumps(dict(msg.fields), allow_nan=False)
        (msg.msg + msg.exc_text + msg.pathname + msg.func_name).encode("utf-8")
    elif isinstance(msg, (_ipc.Ping, _ipc.Pong)):
        rtt = time.monotonic() - msg.sent_at
        round(rtt * 1000)
    elif isinstance(msg, (_ipc.JobEnding, _ipc.JobFinished)):
        assert msg.outcome in (_ipc.SUCCESS, _ipc.FAILED)
        agent.UpdateJobStatus(job_id="AJ_x", status=agent.JS_FAILED, error=msg.error)
        msg.reason.encode("utf-8")
    elif isinstance(msg, _ipc.InitializeResponse):
        (msg.error + msg.traceback).encode("utf-8")
    elif isinstance(msg, _ipc.StartJob):
        msg.to_info() if _parses(msg.job) else None
    elif isinstance(msg, _ipc.InitializeRequest):
        assert msg.session_end_timeout >= 0 and msg.shutdown_callback_timeout >= 0


def _parses(data: bytes) -> bool:
    try:
        agent.Job().ParseFromString(data)
    except Exception:
        return False
    return True


def decodes_cleanly(payload: bytes) -> _ipc.Message | None:
    """Decode: a message the server can use, or ``RemoteProtocolError`` (→ ``None``)."""
    try:
        msg = _ipc.decode(payload)
    except RemoteProtocolError:
        return None
    consume(msg)
    assert _ipc.decode(_ipc.encode(msg)) == msg  # well typed: it survives its own codec
    return msg


# -- strategies from the annotations ------------------------------------------------------------

valid_text = st.text(st.characters(codec="utf-8"), max_size=40)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(INT64_MIN, INT64_MAX),
    st.floats(allow_nan=False, allow_infinity=False), valid_text,
)


def for_hint(hint: object) -> st.SearchStrategy[object]:
    """Values of a field that the codec must accept and carry unchanged."""
    rule = None
    if typing.get_origin(hint) is Annotated:
        hint, rule = typing.get_args(hint)[:2]
    if typing.get_origin(hint) in (Union, typing.get_origin(int | None)):
        return st.one_of(*(st.none() if a is type(None) else for_hint(a)
                           for a in typing.get_args(hint)))
    if hint is str:
        if isinstance(rule, Text) and rule.choices:
            return st.sampled_from(rule.choices)
        size = rule.max_len if isinstance(rule, Text) and rule.max_len is not None else 200
        return st.text(st.characters(codec="utf-8"), max_size=min(size, 200))
    if hint is int:
        ints = rule if isinstance(rule, Int) else Int()
        return st.integers(ints.lo, ints.hi)
    if hint is float:
        bounds = rule if isinstance(rule, Float) else Float()
        finite = st.floats(bounds.lo, bounds.hi, allow_nan=False, allow_infinity=False)
        return st.one_of(finite, st.just(math.inf)) if bounds.allow_inf else finite
    if hint is bool:
        return st.booleans()
    if hint is bytes:
        return st.binary(max_size=200)
    if hint is FunctionRef:
        return st.builds(FunctionRef, valid_text, valid_text, valid_text)
    if typing.get_origin(hint) is Mapping:
        entries = rule if isinstance(rule, Entries) else Entries()
        keys = st.text(st.characters(codec="utf-8"), max_size=20)
        key_rule = entries.key
        if key_rule is not None:
            keys = keys.filter(lambda k: key_rule(k) is None)
        values = valid_text if typing.get_args(hint)[1] is str else json_scalars
        return st.dictionaries(keys, values, max_size=8)
    raise AssertionError(f"no strategy for {hint!r}")


def for_message(cls: type[_ipc.Message]) -> st.SearchStrategy[_ipc.Message]:
    return st.builds(cls, **{name: for_hint(hint) for name, hint in FIELDS[cls]})


messages = st.one_of(*(for_message(cls) for cls in _ipc.MESSAGES))
#: JSON values of every kind, nested a little.
any_json = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=10)


# -- frames -------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_frame_decoder_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame_size=64)
    frames: list[bytes] = []
    pos, i = 0, 0
    try:
        while pos < len(data):
            step = cuts[i % len(cuts)]
            frames += decoder.feed(data[pos:pos + step])
            pos, i = pos + step, i + 1
        frames += decoder.feed(b"")
        decoder.eof()
    except RemoteProtocolError:
        pass
    # What it did return are exactly the leading well-formed frames of the stream.
    rebuilt = b"".join(encode_frame(f, max_frame_size=64) for f in frames)
    assert data.startswith(rebuilt)


@FUZZ
@given(st.lists(st.binary(max_size=100), max_size=10), st.integers(1, 64))
def test_frames_survive_any_chunking(payloads: list[bytes], step: int) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(0, len(stream), step):
        out += decoder.feed(stream[i:i + step])
    decoder.eof()
    assert out == payloads


# -- messages -----------------------------------------------------------------------------------


@FUZZ
@given(messages)
def test_valid_messages_round_trip(msg: _ipc.Message) -> None:
    assert _ipc.decode(_ipc.encode(msg)) == msg


@FUZZ
@given(st.binary(max_size=200))
@example(b"[7," + b"9" * 5000 + b"]")
@example(b"[" * 100_000 + b"]" * 100_000)
@example(b'{"a":' * 50_000 + b"1" + b"}" * 50_000)
def test_arbitrary_bytes(payload: bytes) -> None:
    decodes_cleanly(payload)


@FUZZ
@given(messages, st.data())
def test_mutated_valid_payloads(msg: _ipc.Message, data: st.DataObject) -> None:
    payload = bytearray(_ipc.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "splice"]))
        at = data.draw(st.integers(0, len(payload)))
        if kind == "flip" and at < len(payload):
            payload[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            payload[at:at] = data.draw(st.sampled_from(
                [b"[", b"]", b"{", b"}", b",", b'"', b"\\", b"1e400", b"NaN", b"-Infinity",
                 b"9" * 30, b"null", b"true", b'"\\ud800"', b"\xff"]))
        elif kind == "delete":
            del payload[at:at + data.draw(st.integers(1, 5))]
        else:
            payload[at:at] = json.dumps(data.draw(any_json)).encode()
    decodes_cleanly(bytes(payload))


@FUZZ
@given(st.sampled_from(_ipc.MESSAGES).flatmap(
    lambda cls: st.tuples(st.just(cls), for_message(cls), st.data())))
def test_any_json_in_any_field(case: tuple[type[_ipc.Message], _ipc.Message, st.DataObject]
                               ) -> None:
    cls, msg, data = case
    fields = json.loads(_ipc.encode(msg))
    if len(fields) > 1:
        at = data.draw(st.integers(1, len(fields) - 1))
        fields[at] = data.draw(any_json)
    decodes_cleanly(json.dumps(fields).encode())


def _fields_of(kind: type) -> list[tuple[type[_ipc.Message], int, str]]:
    """(class, position in the array, name) of every field whose base type is ``kind``."""
    out = []
    for cls, fields in FIELDS.items():
        for pos, (name, hint) in enumerate(fields, start=1):
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
            if base is kind:
                out.append((cls, pos, name))
    return out


def _sample(cls: type[_ipc.Message]) -> list[object]:
    """A valid message of ``cls`` as its JSON array (from test_ipc's samples)."""
    msg = next(m for m in SAMPLES if type(m) is cls)
    return json.loads(_ipc.encode(msg))  # type: ignore[no-any-return]


@pytest.mark.parametrize(("cls", "pos", "name"), _fields_of(float),
                         ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_floats_are_refused(cls: type[_ipc.Message], pos: int, name: str,
                                       literal: str) -> None:
    fields = [json.dumps(v) for v in _sample(cls)]
    fields[pos] = literal
    with pytest.raises(RemoteProtocolError, match=f"{name}|number|JSON allows"):
        _ipc.decode(("[" + ",".join(fields) + "]").encode())


@pytest.mark.parametrize(("cls", "pos", "name"), _fields_of(int),
                         ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("literal", ["9" * 5000, "-" + "1" * 21, str(2**63), str(-(2**63) - 1),
                                     "1.5", "true", '"7"'])
def test_integers_out_of_range_or_of_another_type(cls: type[_ipc.Message], pos: int, name: str,
                                                  literal: str) -> None:
    fields = [json.dumps(v) for v in _sample(cls)]
    fields[pos] = literal
    with pytest.raises(RemoteProtocolError):
        _ipc.decode(("[" + ",".join(fields) + "]").encode())


@pytest.mark.parametrize(("depth", "match"), [
    (MAX_DEPTH + 1, "nested deeper than 8 levels"),
    (60, "nested deeper than 8 levels"),
    (1000, "1001 arrays or objects and 1001 closing brackets"),
    (1_000_000, "1000001 arrays or objects"),
])
@pytest.mark.parametrize(("open_", "close"), [("[", "]"), ('{"k":', "}")])
def test_deep_nesting_is_refused_without_recursion(depth: int, match: str, open_: str,
                                                   close: str) -> None:
    payload = "[7," + open_ * depth + "1" + close * depth + "]"
    with pytest.raises(RemoteProtocolError, match=match):
        _ipc.decode(payload.encode())


@pytest.mark.parametrize(("payload", "match"), [
    ("[7," + "[]," * 100 + "1]", "101 arrays or objects and 101 closing brackets"),
    ("[7," + "[" * 9 + "]" * 100, "10 arrays or objects and 100 closing brackets"),
    ("[7," + "1," * 2000 + "1]", "2002 array items or object entries"),
    ("[7," + "{" + ",".join(f'"k{i}":1' for i in range(2000)) + "}]", "2001 array items"),
])
def test_many_arrays_brackets_or_items_are_refused(payload: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        _ipc.decode(payload.encode())


def test_commas_inside_strings_are_not_items() -> None:
    msg = _ipc.LogRecord(name="x", level=20, msg="," * 100_000, created=1.0,
                         fields={f"k{i}": "," for i in range(MAX_ENTRIES)})
    assert _ipc.decode(_ipc.encode(msg)) == msg


def test_nesting_up_to_the_limit_is_left_to_the_type_checks() -> None:
    payload = "[7," + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "]"
    with pytest.raises(RemoteProtocolError, match="LogRecord has 1 fields"):
        _ipc.decode(payload.encode())


@FUZZ
@given(st.text(st.sampled_from('"\\,[]{}ab'), max_size=60))
@example('"' + '\\",' * 1000)
@example('"' + '\\",' * 1000 + "\\")
def test_cutting_strings_out_never_rescans(text: str) -> None:
    # From any quote the string pattern matches at once, so re.sub never retries inside a
    # string that failed to match: linear time. (A pattern that can fail there rescanned the
    # rest of the payload from every escaped quote: 40 s for 120 KB.)
    for at in (i for i, c in enumerate(text) if c == '"'):
        match = _codec._STRING.match(text, at)
        assert match is not None
        closed = match.group().endswith('"') and match.end() - at > 1
        assert closed or match.end() == len(text)


def test_brackets_inside_strings_are_not_nesting() -> None:
    msg = _ipc.LogRecord(name="x", level=20, msg="[" * 10_000 + '"\\{' * 100, created=1.0)
    assert _ipc.decode(_ipc.encode(msg)) == msg


@pytest.mark.parametrize(("field", "value", "match"), [
    ("created", 1e300, "created: number 1e\\+300 out of range"),
    ("created", -1.0, "created: number -1 out of range"),
    ("fields", {"__class__": 1}, "'__class__' is a reserved"),
    ("fields", {"getMessage": 1}, "'getMessage' is a reserved"),
    ("fields", {"_x": 1}, "'_x' is a reserved"),
    ("fields", {"k" * (MAX_KEY_LENGTH + 1): 1}, "at most 256"),
    ("fields", {f"k{i}": i for i in range(MAX_ENTRIES + 1)}, "1025 entries"),
    ("fields", {"k": [1]}, "expected a scalar value, got list"),
    ("name", "n" * 1025, "name: text of 1025 characters"),
    ("lineno", -1, "lineno: integer out of range"),
    ("msg", "\ud800", "msg: text with a lone surrogate"),
])
def test_log_record_fields_the_server_would_trip_on(field: str, value: object,
                                                     match: str) -> None:
    good = _ipc.LogRecord(name="x", level=20, msg="m", created=1.0)
    names = [name for name, _ in FIELDS[_ipc.LogRecord]]
    data = json.loads(_ipc.encode(good))
    data[names.index(field) + 1] = value
    payload = json.dumps(data, ensure_ascii=True).encode()
    with pytest.raises(RemoteProtocolError, match=match):
        _ipc.decode(payload)


@pytest.mark.parametrize("outcome", ["", "succes", "FAILED", "ok"])
def test_job_outcome_is_success_or_failed(outcome: str) -> None:
    with pytest.raises(RemoteProtocolError, match="outcome: .* is not one of success, failed"):
        _ipc.decode(json.dumps([8, outcome, "", False, ""]).encode())


def test_text_is_made_valid_on_the_way_out() -> None:
    # A file name decoded with surrogateescape, a surrogate pair written as two code points.
    msg = _ipc.LogRecord(name="x", level=20, msg="f\udcff \ud83d\ude00", created=1.0,
                         fields={"path": "\udce9"})
    back = _ipc.decode(_ipc.encode(msg))
    assert isinstance(back, _ipc.LogRecord)
    assert back.msg == "f\ufffd \U0001f600"
    assert back.fields == {"path": "\ufffd"}


def test_log_records_are_fitted_on_the_way_out() -> None:
    # What user code puts in a log record must never make the job process fail to send it.
    extras: dict[str, _ipc._messages.JsonScalar] = {f"k{i}": i for i in range(MAX_ENTRIES + 5)}
    extras.update({"getMessage": 1, "_private": 2, "k" * (MAX_KEY_LENGTH + 1): 3, "name": 4})
    msg = _ipc.LogRecord(name="n" * 5000, level=20, msg="m", created=1.0, fields=extras)
    back = _ipc.decode(_ipc.encode(msg))
    assert isinstance(back, _ipc.LogRecord)
    assert back.name == "n" * 1024
    assert len(back.fields) == MAX_ENTRIES
    assert "getMessage" not in back.fields and "_private" not in back.fields
    consume(back)


def test_no_limit_durations_travel_as_inf() -> None:
    req = _ipc.InitializeRequest(entrypoint=FunctionRef("m", "f"), session_end_timeout=math.inf)
    assert b'"inf"' in _ipc.encode(req)
    assert _ipc.decode(_ipc.encode(req)) == req
    with pytest.raises(RemoteProtocolError, match="session_end_timeout"):
        _ipc.decode(_ipc.encode(req).replace(b'"inf"', b'"-inf"'))
