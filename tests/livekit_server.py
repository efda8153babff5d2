"""The real livekit-server (``../shared/livekit-server/livekit-server``) as a test fixture.

``open_livekit_server`` starts it in ``--dev`` mode (key ``devkey``, secret ``secret``) on free
ports, announcing ``node_ip`` for WebRTC (the test session's network-namespace address, see
tests/netns.py), waits until its log says it serves, keeps its log for tests to read (it names
every registration, job, participant and track: a good oracle), and stops it on exit (SIGTERM,
then SIGKILL), reaped. ``LIVEKIT_SERVER_BIN`` points at another binary.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import attrs
import trio

from cli_helpers import CliProcess

#: Where CI and a developer's clone find the binary: beside the repository, in shared/.
DEFAULT_BIN: Final = Path(__file__).resolve().parents[1].parent / "shared" / "livekit-server" / "livekit-server"


def binary_path() -> Path:
    """Where the livekit-server binary to test against should be."""
    return Path(os.environ.get("LIVEKIT_SERVER_BIN") or DEFAULT_BIN)


def server_binary() -> Path | None:
    """The livekit-server binary to test against, or ``None`` if there is none."""
    path = binary_path()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _free_ports(address: str) -> tuple[int, int, int]:
    """An HTTP and an RTC TCP port free on loopback and on ``address``, and a UDP port free
    on ``address`` (livekit-server binds all three there)."""
    socks = [socket.socket(socket.AF_INET, kind) for kind in
             (socket.SOCK_STREAM, socket.SOCK_STREAM, socket.SOCK_DGRAM)]
    try:
        for s in socks:
            s.bind((address, 0))
        ports = [s.getsockname()[1] for s in socks]
        with socket.socket() as loopback:
            loopback.bind(("127.0.0.1", ports[0]))
        return ports[0], ports[1], ports[2]
    finally:
        for s in socks:
            s.close()


@attrs.define
class LiveKitServer:
    port: int
    output: CliProcess
    """Its log, line by line: ``await server.output.wait_for(regex)``."""
    api_key: str = "devkey"
    api_secret: str = "secret"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def open_livekit_server(node_ip: str, *, timeout: float = 15.0
                              ) -> AsyncIterator[LiveKitServer]:
    """Start livekit-server, serving once its log says so; stopped and reaped on exit.

    A port taken between our choice and its bind (by another socket of the test session) makes
    it exit with "address already in use": it is then started again on other ports, twice
    at most.
    """
    binary = server_binary()
    if binary is None:
        raise RuntimeError(f"no livekit-server binary at {binary_path()} (set LIVEKIT_SERVER_BIN)")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "livekit.yaml"
        async with trio.open_nursery() as nursery:
            for attempt in range(3):
                http, tcp, udp = _free_ports(node_ip)
                config.write_text(f"port: {http}\nrtc:\n  tcp_port: {tcp}\n  udp_port: {udp}\n")
                process = await trio.lowlevel.open_process(
                    [str(binary), "--config", str(config), "--dev", "--bind", "127.0.0.1",
                     "--bind", node_ip, "--node-ip", node_ip],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                output = CliProcess(process)
                nursery.start_soon(output._read)
                try:
                    with trio.fail_after(timeout):
                        await output.wait_for("starting LiveKit server")
                except AssertionError:  # it exited before serving
                    await _stop(process, output)
                    if attempt == 2 or not any("address already in use" in line
                                               for line in output.lines):
                        raise
                    continue
                try:
                    yield LiveKitServer(http, output)
                finally:
                    await _stop(process, output)
                break


async def _stop(process: trio.Process, output: CliProcess) -> None:
    """SIGTERM, then SIGKILL after 5 s; reaped, its log read to the end, its pipe closed."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
        await process.wait()
        with trio.move_on_after(5):
            await output.wait_closed()
        assert process.stdout is not None
        await process.stdout.aclose()
