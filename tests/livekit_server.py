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


def server_binary() -> Path | None:
    """The livekit-server binary to test against, or ``None`` if there is none."""
    path = Path(os.environ.get("LIVEKIT_SERVER_BIN") or DEFAULT_BIN)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
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
async def open_livekit_server(node_ip: str, *, timeout: float = 15.0, config: str = ""
                              ) -> AsyncIterator[LiveKitServer]:
    """``config``: more YAML for its configuration file (e.g. a ``room:`` section)."""
    binary = server_binary()
    if binary is None:
        raise RuntimeError(f"no livekit-server binary at {DEFAULT_BIN} (set LIVEKIT_SERVER_BIN)")
    http, tcp, udp = _free_ports(3)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "livekit.yaml"
        config_file.write_text(f"port: {http}\nrtc:\n  tcp_port: {tcp}\n  udp_port: {udp}\n"
                               + config)
        process = await trio.lowlevel.open_process(
            [str(binary), "--config", str(config_file), "--dev", "--bind", "127.0.0.1",
             "--bind", node_ip, "--node-ip", node_ip],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = CliProcess(process)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(output._read)
                with trio.fail_after(timeout):
                    await output.wait_for("starting LiveKit server")
                yield LiveKitServer(http, output)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(5):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                await process.wait()
                assert process.stdout is not None
                await process.stdout.aclose()
