"""``trio_agents.api`` and the LiveKit API inside a job, against the real livekit-server.

SIP needs a livekit-server with Redis: without it every SIP call answers ``internal: sip not
connected (redis required)``; with it, an unknown trunk is ``not_found``. Both are checked
(the Redis one when ``redis-server`` is installed: ``apt-get install redis-server``).

The processes are run by a small helper of this module (kept apart from the conformance
suite's ``livekit_server`` fixture): each test starts its own, in the test session's private
network namespace, on free ports, and stops and reaps them at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import pytest
import trio
from livekit.protocol import agent_dispatch, room, sip

from test_job_api import run_api_job
from trio_agents.api import LiveKitAPI, SIPError

BINARY: Final = Path(__file__).resolve().parents[2] / "shared" / "livekit-server" / \
    "livekit-server"
KEY, SECRET = "devkey", "secret"
#: From exec to ready (a fraction of a second idle; generous for a loaded machine).
START_TIMEOUT: Final = 30.0

pytestmark = [
    pytest.mark.realserver,
    pytest.mark.skipif(not BINARY.is_file(), reason=f"no livekit-server binary at {BINARY}"),
]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def running(argv: Sequence[str], ready: bytes) -> AsyncIterator[trio.Process]:
    """Run ``argv`` for the block; return once its output contains ``ready``. Stopped
    (SIGTERM, then SIGKILL) and reaped at the end."""
    process = await trio.lowlevel.open_process(list(argv), stdin=subprocess.DEVNULL,
                                               stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT)
    assert process.stdout is not None
    try:
        async with trio.open_nursery() as nursery:
            seen = b""
            with trio.fail_after(START_TIMEOUT):
                while ready not in seen:
                    chunk = await process.stdout.receive_some(65536)
                    if not chunk:
                        raise RuntimeError(f"{argv[0]} exited at start:\n{seen.decode()}")
                    seen += chunk

            async def drain_output() -> None:  # keep reading, so it never blocks on a pipe
                assert process.stdout is not None
                while await process.stdout.receive_some(65536):
                    pass

            nursery.start_soon(drain_output)
            yield process
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            process.kill()
            await process.wait()
            await process.stdout.aclose()


@asynccontextmanager
async def livekit_server(tmp_path: Path, node_ip: str, *, redis: bool) -> AsyncIterator[str]:
    """``livekit-server --dev`` (with a Redis of its own if ``redis``); its URL."""
    port = free_port()
    config = tmp_path / "livekit.yaml"
    config.write_text(f"port: {port}\nrtc:\n  tcp_port: {free_port()}\n"
                      f"  udp_port: {free_port(socket.SOCK_DGRAM)}\n")
    argv = [str(BINARY), "--config", str(config), "--dev", "--bind", "127.0.0.1",
            "--bind", node_ip, "--node-ip", node_ip]
    async with trio.open_nursery() as nursery:
        if redis:
            redis_port = free_port()
            redis_argv = [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
                          "--port", str(redis_port), "--save", "", "--appendonly", "no"]
            await nursery.start(_hold, redis_argv, b"Ready to accept connections")
            argv += ["--redis-host", f"127.0.0.1:{redis_port}"]
        await nursery.start(_hold, argv, b"starting LiveKit server")
        yield f"ws://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def _hold(argv: Sequence[str], ready: bytes, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with running(argv, ready):
        task_status.started()
        await trio.sleep_forever()


DIAL = sip.CreateSIPParticipantRequest(sip_trunk_id="ST_missing", sip_call_to="+15550100",
                                       room_name="call-room", participant_identity="caller")


async def dial(api: LiveKitAPI) -> tuple[str, str, int | None]:
    """The error of ``DIAL`` (code, message, HTTP status)."""
    with pytest.raises(SIPError) as info:
        await api.sip.create_sip_participant(DIAL)
    return info.value.code, info.value.msg, info.value.status


async def test_sip_without_redis_says_so(tmp_path: Path, rtc_address: str) -> None:
    async with livekit_server(tmp_path, rtc_address, redis=False) as url, \
            LiveKitAPI(url, KEY, SECRET) as api:
        assert await dial(api) == ("internal", "sip not connected (redis required)", 500)


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (apt-get install redis-server)")
async def test_api_and_sip_in_a_job_against_the_real_server(
    tmp_path: Path, rtc_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    async with livekit_server(tmp_path, rtc_address, redis=True) as url, \
            LiveKitAPI(url, KEY, SECRET) as api:
        assert await dial(api) == ("not_found", "requested sip trunk does not exist", 404)
        with pytest.raises(SIPError) as info:
            await api.sip.transfer_sip_participant(sip.TransferSIPParticipantRequest(
                room_name="call-room", transfer_to="tel:+15550101"))
        assert (info.value.code, info.value.msg) == ("invalid_argument",
                                                     "Missing participant identity")

        async def dispatch() -> None:
            await api.room.create_room(room.CreateRoomRequest(name="call-room"))
            await api.agent_dispatch.create_dispatch(agent_dispatch.CreateAgentDispatchRequest(
                room="call-room", agent_name="api"))

        seen, server = await run_api_job(url, KEY, SECRET, dispatch)
    assert seen["environment"] == {"LIVEKIT_URL": url, "LIVEKIT_API_KEY": KEY,
                                   "LIVEKIT_API_SECRET": SECRET}
    assert seen["rooms"] == ["call-room"]
    assert seen["sip"] == [["not_found", "requested sip trunk does not exist"],
                           ["not_found", "participant does not exist"]]
    # the server's metrics saw the offer, the dispatch and the job's success
    assert server.metrics is not None
    metrics = server.metrics.registry
    node = {"nodename": server.metrics.nodename}
    assert metrics.get_sample_value("trio_agents_offers_total",
                                    {**node, "answer": "accepted"}) == 1
    assert metrics.get_sample_value("trio_agents_dispatch_latency_seconds_count", node) == 1
    assert metrics.get_sample_value("trio_agents_jobs_total", {
        **node, "status": "JS_SUCCESS", "cause": "success"}) == 1
    assert metrics.get_sample_value("trio_agents_registrations_total", node) == 1
