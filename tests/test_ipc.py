"""The job-process IPC: framing edge cases, a round trip of every message type, the channel."""

from __future__ import annotations

import json
import socket

import attrs
import pytest
import trio
import trio.testing
from livekit.protocol import agent, models

from trio_agents import _ipc
from trio_agents._errors import LocalProtocolError, RemoteProtocolError
from trio_agents._ipc import FrameDecoder, encode_frame
from trio_agents._jobs import JobAcceptArguments, RunningJobInfo
from trio_agents._loading import FunctionRef

# -- framing ----------------------------------------------------------------------------------


def test_frames_split_at_every_byte_boundary() -> None:
    stream = encode_frame(b"hello") + encode_frame(b"") + encode_frame(b"x" * 300)
    for step in (1, 2, 3, 5, 7, len(stream)):
        decoder = FrameDecoder()
        frames = []
        for i in range(0, len(stream), step):
            frames += decoder.feed(stream[i:i + step])
        assert frames == [b"hello", b"", b"x" * 300]
        decoder.eof()  # nothing left over: a clean end


def test_many_frames_in_one_chunk() -> None:
    frames = [bytes([i]) * i for i in range(50)]
    assert FrameDecoder().feed(b"".join(encode_frame(f) for f in frames)) == frames


def test_oversized_frame_is_refused_before_buffering() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    assert decoder.feed(encode_frame(b"0123456789", max_frame_size=10)) == [b"0123456789"]
    with pytest.raises(RemoteProtocolError, match="11 bytes announced, more than the maximum"):
        decoder.feed(b"\x00\x00\x00\x0b")  # header only: refused without waiting for the body
    with pytest.raises(RemoteProtocolError):  # the stream cannot be resynchronised
        decoder.feed(encode_frame(b"ok"))


def test_frames_before_a_bad_header_are_delivered_then_the_error() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    assert decoder.feed(encode_frame(b"a") + encode_frame(b"b") + b"\xff\xff\xff\xff") == [
        b"a", b"b"]
    with pytest.raises(RemoteProtocolError, match="4294967295 bytes announced"):
        decoder.feed(b"")


async def test_channel_delivers_good_messages_before_the_bad_frame() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = _ipc.IpcChannel(b)
    await a.send_all(encode_frame(_ipc.encode(_ipc.JobStarted())) + b"\xff\xff\xff\xff")
    assert await right.receive() == _ipc.JobStarted()
    with pytest.raises(RemoteProtocolError, match="4294967295 bytes announced"):
        await right.receive()  # without waiting for more data


def test_sending_an_oversized_frame_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds the maximum of 4 bytes"):
        encode_frame(b"12345", max_frame_size=4)


@pytest.mark.parametrize(("data", "detail"), [
    (b"\x00\x00", "2 byte(s) of a 4-byte header"),
    (b"\x00\x00\x00\x05abc", "3 of 5 payload bytes"),
])
def test_truncated_frame_at_eof(data: bytes, detail: str) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(data) == []
    with pytest.raises(RemoteProtocolError, match="ended inside a frame") as info:
        decoder.eof()
    assert detail in str(info.value)


# -- messages ---------------------------------------------------------------------------------


def _info() -> RunningJobInfo:
    job = agent.Job(
        id="AJ_1", dispatch_id="AD_1", type=agent.JT_PUBLISHER, metadata='{"k": "v"}',
        agent_name="bob", room=models.Room(name="room é", sid="RM_1"),
        participant=models.ParticipantInfo(identity="alice", sid="PA_1"),
    )
    return RunningJobInfo(
        accept_arguments=JobAcceptArguments(
            name="Agent", identity="agent-AJ_1", metadata="m",
            attributes={"lk.agent.name": "bob", "colour": "blue", "empty": ""},
        ),
        job=job, url="wss://example", token="tok", worker_id="AW_1", fake_job=True,
        received_at=1.5, accepted_at=2.25, assigned_at=3.0, launched_at=1e9 + 0.125,
    )


SAMPLES: list[_ipc.Message] = [
    _ipc.InitializeRequest(
        entrypoint=FunctionRef("agents.scripted", "entrypoint"),
        setup=FunctionRef("__main__", "setup", "/srv/agent.py"), session_end=None,
        executor_type="process", http_proxy="http://proxy:3128", ws_url="ws://x",
        api_key="k", api_secret="s", log_level="DEBUG", session_end_timeout=2.5,
        shutdown_callback_timeout=1.0,
    ),
    _ipc.InitializeRequest(entrypoint=FunctionRef("m", "f")),
    _ipc.InitializeResponse(),
    _ipc.InitializeResponse(error="RuntimeError: boom", traceback="Traceback ...\n"),
    _ipc.Ping(seq=7, sent_at=123.456),
    _ipc.Pong(seq=7, sent_at=123.456),
    _ipc.StartJob.from_info(_info()),
    _ipc.JobStarted(),
    _ipc.ShutdownRequest(reason="terminated by the LiveKit server"),
    _ipc.LogRecord(name="agents.x", level=20, msg="héllo\nworld", created=1.25,
                   exc_text="Traceback", pathname="/a.py", lineno=3, func_name="f",
                   fields={"job_id": "AJ_1", "n": 3, "ratio": 0.5, "ok": True, "none": None}),
    _ipc.JobFinished(outcome=_ipc.FAILED, error="ValueError: x", user_initiated=True,
                     reason="job crashed"),
    _ipc.JobEnding(outcome=_ipc.SUCCESS, user_initiated=True, reason="done in the room"),
    _ipc.JobEnding(outcome=_ipc.FAILED, error="ValueError: x", reason="job crashed"),
    _ipc.JobEndingAck(),
]


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(_ipc.MESSAGES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: _ipc.Message) -> None:
    assert _ipc.decode(_ipc.encode(msg)) == msg


def test_tags_are_positions_and_only_ever_appended() -> None:
    # A job process and its server may come from different versions during an upgrade.
    assert [cls.__name__ for cls in _ipc.MESSAGES] == [
        "InitializeRequest", "InitializeResponse", "Ping", "Pong", "StartJob", "JobStarted",
        "ShutdownRequest", "LogRecord", "JobFinished", "JobEnding", "JobEndingAck"]
    assert _ipc.encode(_ipc.JobEndingAck()) == b"[10]"
    assert json.loads(_ipc.encode(_ipc.JobEnding(outcome=_ipc.FAILED, error="e"))) == [
        9, "failed", "e", False, ""]


def test_running_job_info_survives_the_trip_with_accept_attributes() -> None:
    info = _info()
    back = _ipc.decode(_ipc.encode(_ipc.StartJob.from_info(info)))
    assert isinstance(back, _ipc.StartJob)
    assert back.to_info() == info  # protobuf equality for the job, attrs for the rest
    assert dict(back.to_info().accept_arguments.attributes) == {
        "lk.agent.name": "bob", "colour": "blue", "empty": ""}


@pytest.mark.parametrize(("payload", "match"), [
    (b"\xff", "not UTF-8"),
    (b"[1,", "not valid JSON"),
    (b"{}", r"not a \[tag, fields...\] array"),
    (b"[99]", "unknown IPC message tag 99"),
    (b"[2,1]", "Ping has 1 fields, expected 2"),
    (b'[2,"1",2.0]', "Ping.seq: expected int, got str"),
    (b"[2,true,2.0]", "Ping.seq: expected int, got bool"),
    (b'[6,{"a":1}]', "ShutdownRequest.reason"),
    (json.dumps([4] + [None] * 13).encode(), "StartJob.job"),
])
def test_malformed_messages_name_the_problem(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        _ipc.decode(payload)


def test_attribute_values_must_be_strings() -> None:
    good = _ipc.encode(_ipc.StartJob.from_info(_info()))
    data = json.loads(good)
    data[9] = {"colour": 3}
    with pytest.raises(RemoteProtocolError, match="accept_attributes: expected string values"):
        _ipc.decode(json.dumps(data).encode())


# -- channel ----------------------------------------------------------------------------------


async def test_channel_round_trip_and_clean_eof() -> None:
    a, b = trio.testing.memory_stream_pair()
    left, right = _ipc.IpcChannel(a), _ipc.IpcChannel(b)
    for msg in SAMPLES:
        await left.send(msg)
        assert await right.receive() == msg
    await left.aclose()
    with pytest.raises(trio.EndOfChannel):
        await right.receive()
    with pytest.raises(trio.EndOfChannel):  # and stays ended
        await right.receive()


async def test_channel_truncated_frame_is_a_remote_error() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = _ipc.IpcChannel(b)
    await a.send_all(encode_frame(b'[7]')[:-1])
    await a.aclose()
    with pytest.raises(RemoteProtocolError, match="ended inside a frame"):
        await right.receive()


async def test_channel_oversized_frame_is_a_remote_error() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = _ipc.IpcChannel(b, max_frame_size=100)
    await a.send_all(b"\x00\x01\x00\x00")
    with pytest.raises(RemoteProtocolError, match="65536 bytes announced"):
        await right.receive()


async def test_send_to_a_closed_socket_is_a_remote_error() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    chan = _ipc.IpcChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    with pytest.raises(RemoteProtocolError, match="IPC peer is gone"):
        for _ in range(100):  # the first send may still be buffered
            await chan.send(_ipc.Ping(seq=1, sent_at=0.0))
    await chan.aclose()


def test_messages_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        _ipc.Ping(seq=1, sent_at=0.0).seq = 2  # type: ignore[misc]


async def test_an_urgent_message_is_written_before_the_sender_yields() -> None:
    ours, theirs = socket.socketpair()
    sender = _ipc.IpcChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    receiver = _ipc.IpcChannel(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
    with trio.CancelScope() as scope:
        scope.cancel()  # any checkpoint in send_urgent would raise Cancelled here
        await sender.send_urgent(_ipc.JobStarted())
    with trio.fail_after(5):
        assert await receiver.receive() == _ipc.JobStarted()
    # a send under way holds the lock: the urgent message queues behind it, frames intact
    big = _ipc.LogRecord(name="x", level=20, msg="m" * 500_000, created=0.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, big)
        await trio.testing.wait_all_tasks_blocked()  # the big frame fills the socket buffer
        nursery.start_soon(sender.send_urgent, _ipc.JobStarted())
        assert await receiver.receive() == big
        assert await receiver.receive() == _ipc.JobStarted()
    await sender.aclose()
    await receiver.aclose()


# -- whole frames under cancellation ---------------------------------------------------------

#: Large enough to need dozens of writes through a small socket buffer.
BIG = _ipc.LogRecord(name="x", level=20, msg="m" * 200_000, created=1.0)


def _small_buffer_pair() -> tuple[_ipc.IpcChannel, trio.SocketStream]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sender = _ipc.IpcChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    return sender, trio.SocketStream(trio.socket.from_stdlib_socket(theirs))


def _messages_in(data: bytes) -> list[_ipc.Message]:
    """Every message of a whole stream; raises ``RemoteProtocolError`` on any damage."""
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    decoder.eof()
    return [_ipc.decode(frame) for frame in frames]


async def _send_cancelled_after(steps: int, urgent: bool) -> tuple[list[_ipc.Message], bool]:
    """Send BIG, cancelled once the reader has taken ``steps`` chunks (-1: before it starts),
    then a small message. Returns what the reader decodes of the whole stream, and whether
    the cancellation came too late to interrupt anything."""
    sender, reader = _small_buffer_pair()
    scope = trio.CancelScope()
    received = bytearray()

    async def send_then_more() -> None:
        with scope:
            await (sender.send_urgent if urgent else sender.send)(BIG)
        await sender.send(_ipc.JobStarted())
        await sender.aclose()

    if steps < 0:
        scope.cancel()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_then_more)
        for _ in range(steps):
            await trio.testing.wait_all_tasks_blocked()  # the sender waits for room
            received += await reader.receive_some(4096)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        while data := await reader.receive_some(65536):
            received += data
    await reader.aclose()
    return _messages_in(bytes(received)), not scope.cancelled_caught


@pytest.mark.parametrize("urgent", [False, True], ids=["send", "send_urgent"])
async def test_a_send_cancelled_at_any_checkpoint_leaves_whole_frames(urgent: bool) -> None:
    # Cancelled before its first byte: nothing of the frame. After: all of it (the peer
    # reads on). Never a part, which would turn the next frame into garbage.
    first, too_late = await _send_cancelled_after(-1, urgent)
    # send_urgent writes what the socket takes before it looks at the cancellation
    assert first == ([BIG, _ipc.JobStarted()] if urgent else [_ipc.JobStarted()])
    assert not too_late
    steps = 0
    while not too_late:
        got, too_late = await _send_cancelled_after(steps, urgent)
        assert got == [BIG, _ipc.JobStarted()], f"cancelled after {steps} reads"
        steps += 1
        assert steps < 1000
    assert steps > 10  # the frame did take many writes: each was a cancellation point


async def test_a_frame_the_peer_never_takes_breaks_the_channel_not_the_stream(
        autojump_clock: trio.testing.MockClock) -> None:
    # A hung peer: the rest of a cancelled frame cannot be written within the grace. The
    # channel refuses to send more, and the peer sees a cut frame, never a wrong message.
    sender, reader = _small_buffer_pair()
    with trio.move_on_after(5) as scope:
        await sender.send(BIG)
    assert scope.cancelled_caught
    with pytest.raises(RemoteProtocolError, match="did not take the rest of a frame"):
        with trio.fail_after(60):  # mock clock: not a timing, a guard against hanging
            await sender.send(_ipc.JobStarted())
    received = bytearray()
    while data := await reader.receive_some(65536):  # the write side was shut down: EOF
        received += data
    assert 0 < len(received) < len(encode_frame(_ipc.encode(BIG)))
    with pytest.raises(RemoteProtocolError, match="ended inside a frame"):
        _messages_in(bytes(received))
    await sender.aclose()
    await reader.aclose()


async def test_concurrent_senders_with_cancellations_never_interleave() -> None:
    # 40 senders of frames up to 18 KB share a channel whose socket takes 4 KB; the reader
    # cancels one of them (waiting for its turn, or half-way through its frame) at each read.
    sender, reader = _small_buffer_pair()
    scopes = [trio.CancelScope() for _ in range(40)]
    attempted: list[_ipc.Message] = []
    completed: list[_ipc.Message] = []
    received = bytearray()

    async def one(i: int) -> None:
        msg = _ipc.LogRecord(name=f"s{i}", level=20, msg=str(i) * (3000 * (i % 7)), created=1.0)
        attempted.append(msg)
        with scopes[i]:
            await (sender.send_urgent if i % 2 else sender.send)(msg)
            completed.append(msg)

    async def read() -> None:
        reads = 0
        while data := await reader.receive_some(1000):
            received.extend(data)
            reads += 1
            scopes[reads * 7 % len(scopes)].cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        async with trio.open_nursery() as senders:
            for i in range(len(scopes)):
                senders.start_soon(one, i)
        await sender.aclose()
    got = _messages_in(bytes(received))  # every frame whole
    assert all(m in got for m in completed)  # every completed send arrived
    assert all(m in attempted for m in got)
    assert len(got) == len(set(map(repr, got)))  # and nothing twice
    # (all 40 scopes are cancelled within the first 40 reads, 40 KB of ~360 KB)
    assert len(got) < len(attempted)  # so some sends were cut short, before their first byte
    await reader.aclose()
