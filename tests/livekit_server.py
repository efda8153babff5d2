"""The real livekit-server for tests and benchmarks: found, started on free ports, observed
through its log, stopped and reaped.

Where the binary comes from: ``$LIVEKIT_SERVER_BIN`` if set, else
``<repo>/../shared/livekit-server/livekit-server`` (the project's CI layout): ``binary_path``;
``server_binary`` is it if it is there, and ``find_binary`` also says why not.

``open_livekit_server(node_ip)`` runs one ``livekit-server --dev`` (key ``devkey``, secret ``secret``)
for the duration of an ``async with``, on ports of its own, bound to 127.0.0.1 and to the
WebRTC address it announces (``--node-ip``). Its log is JSON (``logging.json``), one record
per line; every record is kept, and ``wait_for``/``wait_until`` wake on each new one: the
log names every worker registration, job assignment, job status and room, which makes it the
oracle of the conformance suite. ``restart()`` stops the process and starts it again on the
same ports (its state, rooms and workers, is lost, as in a real restart).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio

from cli_helpers import terminate

BINARY_ENV: Final = "LIVEKIT_SERVER_BIN"
#: Where CI puts it: beside the repository, in shared/.
DEFAULT_BINARY: Final = (Path(__file__).resolve().parent.parent.parent / "shared"
                         / "livekit-server" / "livekit-server")
API_KEY: Final = "devkey"
API_SECRET: Final = "secret"
#: From exec to "starting LiveKit server" (about 0.1 s idle; generous for a loaded machine).
START_TIMEOUT: Final = 30.0
#: SIGTERM → exit; then SIGKILL.
STOP_TIMEOUT: Final = 10.0


def binary_path() -> Path:
    """Where the livekit-server binary to test against should be."""
    return Path(os.environ.get(BINARY_ENV) or DEFAULT_BINARY)


def server_binary() -> Path | None:
    """The livekit-server binary to test against, or ``None`` if there is none."""
    return find_binary()[0]


def find_binary() -> tuple[Path | None, str]:
    """The livekit-server binary to use and where it comes from, or ``None`` and why not."""
    path = binary_path()
    source = f"${BINARY_ENV}" if os.environ.get(BINARY_ENV) else "the default location"
    if not path.is_file():
        return None, (f"no livekit-server binary at {path} ({source}); put livekit-server "
                      f"1.8.x there, or set {BINARY_ENV} to the path of one")
    if not os.access(path, os.X_OK):
        return None, f"{path} ({source}) is not executable: chmod +x it"
    return path, source


def free_ports(*kinds: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports free on ``host`` right now, one per socket kind (``SOCK_STREAM``,
    ``SOCK_DGRAM``); a stream port is also checked free on loopback, where livekit-server
    binds it too (a port free on ``host`` may be a client's on loopback: then other ports
    are drawn). Another socket may still take one before the server binds it:
    ``open_livekit_server`` then starts again on other ports."""
    for _ in range(100):
        probes = [socket.socket(socket.AF_INET, kind) for kind in kinds]
        try:
            for probe in probes:  # all bound at once, so no two are the same
                probe.bind((host, 0))
            ports = [int(probe.getsockname()[1]) for probe in probes]
            if host == "127.0.0.1" or all(_free_on_loopback(kind, port)
                                          for kind, port in zip(kinds, ports, strict=True)):
                return ports
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"found no {len(kinds)} ports free on both {host} and 127.0.0.1")


def _free_on_loopback(kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as loopback:
        try:
            loopback.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@attrs.frozen
class LogRecord:
    """One line of the server's JSON log: its message and fields, and which run wrote it."""

    run: int
    message: str
    fields: dict[str, Any]

    def matches(self, message: str, **fields: object) -> bool:
        return self.message == message and all(self.fields.get(k) == v
                                                for k, v in fields.items())


@attrs.define(eq=False)
class LiveKitServer:
    """One livekit-server (``--dev``), restartable on its ports. Build it with
    ``open_livekit_server``."""

    binary: Path
    workdir: Path
    node_ip: str
    port: int
    tcp_port: int
    udp_port: int
    extra_args: Sequence[str] = ()
    extra_config: str = ""
    """YAML appended to its config file (e.g. ``room:\n  enable_remote_unmute: true\n``)."""
    api_key: str = API_KEY
    api_secret: str = API_SECRET
    records: list[LogRecord] = attrs.Factory(list)
    """Every log line of every run, in order."""
    run: int = 0
    """How many times the process was started (the current run's number)."""
    _nursery: trio.Nursery | None = attrs.field(default=None, repr=False)
    _process: trio.Process | None = attrs.field(default=None, repr=False)
    _exited: set[int] = attrs.field(factory=set, repr=False)
    _change: trio.Event = attrs.field(factory=trio.Event, repr=False)

    start_timeout: float = START_TIMEOUT
    """From exec to serving."""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"livekit-{self.port}.yaml"

    @property
    def running(self) -> bool:
        return self._process is not None and self.run not in self._exited

    def current(self) -> list[LogRecord]:
        """The records of the current run."""
        return [r for r in self.records if r.run == self.run]

    def find(self, message: str, **fields: object) -> list[LogRecord]:
        """Records of the current run with this message and these field values."""
        return [r for r in self.current() if r.matches(message, **fields)]

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        """Return once ``predicate()`` holds; re-checked on every log line and on exit.
        Bound it with ``trio.fail_after``."""
        while not predicate():
            await self._change.wait()

    async def wait_for(self, message: str, **fields: object) -> LogRecord:
        """The first record of the current run that matches (already there, or coming)."""
        await self.wait_until(lambda: self.find(message, **fields))
        return self.find(message, **fields)[0]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(f"{r.message} {json.dumps(r.fields)[:300]}"
                         for r in self.records[-lines:])

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    # -- the process ------------------------------------------------------------------------

    def _write_config(self) -> None:
        self.config_path.write_text(
            f"port: {self.port}\n"
            f"rtc:\n  tcp_port: {self.tcp_port}\n  udp_port: {self.udp_port}\n"
            "logging:\n  json: true\n" + self.extra_config)

    async def start(self) -> None:
        """Start the process and return once it serves (``GET /`` answers ``OK``)."""
        if self._nursery is None:
            raise RuntimeError("use open_livekit_server() to run a LiveKitServer")
        if self.running:
            raise RuntimeError("livekit-server is already running")
        self._write_config()
        argv = [str(self.binary), "--config", str(self.config_path), "--dev",
                "--bind", "127.0.0.1", "--bind", self.node_ip, "--node-ip", self.node_ip,
                *self.extra_args]
        self.run += 1
        process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT)
        self._process = process
        self._nursery.start_soon(self._read_log, process, self.run)
        run = self.run
        with trio.fail_after(self.start_timeout):
            await self.wait_until(lambda: run in self._exited
                                  or self.find("starting LiveKit server"))
        if run in self._exited:
            await self.stop()
            raise RuntimeError(f"livekit-server exited at start ({' '.join(argv)}):\n"
                               f"{self.tail()}")
        # it listens before it logs "starting LiveKit server": one request must succeed
        async with httpx.AsyncClient(timeout=self.start_timeout) as client:
            answer = await client.get(f"http://127.0.0.1:{self.port}/")
        if answer.text != "OK":
            raise RuntimeError(f"livekit-server answered {answer.status_code} {answer.text!r} "
                               f"on GET /, not OK:\n{self.tail()}")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Stop the process (``sig``, then SIGKILL after ``STOP_TIMEOUT``), reaped; its
        exit code (negative: the signal). Shielded: it runs to the end when cancelled."""
        process, self._process = self._process, None
        if process is None:
            return 0
        code = await terminate(process, STOP_TIMEOUT, sig)
        with trio.CancelScope(shield=True):
            await self.wait_until(lambda: self.run in self._exited)  # the log is read to EOF
        return code

    async def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same ports."""
        await self.stop()
        await self.start()

    async def _read_log(self, process: trio.Process, run: int) -> None:
        assert process.stdout is not None
        buffer = b""
        try:
            async with process.stdout:
                while chunk := await process.stdout.receive_some(65536):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        self._add(run, line)
                        self._changed()
        except trio.ClosedResourceError:
            pass
        finally:
            if buffer:
                self._add(run, buffer)
            self._exited.add(run)
            self._changed()

    def _add(self, run: int, line: bytes) -> None:
        text = line.decode(errors="replace").strip()
        if not text:
            return
        try:
            fields = json.loads(text)
            message = str(fields.pop("msg"))
        except (ValueError, KeyError, TypeError, AttributeError):  # a panic, a stray print
            fields, message = {}, text
        self.records.append(LogRecord(run, message, fields))


@asynccontextmanager
async def open_livekit_server(node_ip: str, *, binary: Path | None = None,
                              workdir: Path | None = None, port: int | None = None,
                              extra_args: Sequence[str] = (), config: str = "",
                              timeout: float = START_TIMEOUT) -> AsyncIterator[LiveKitServer]:
    """Run livekit-server for the block, on free ports (``port`` for HTTP if given); it is
    stopped (SIGTERM, then SIGKILL) and reaped when the block ends, however it ends.

    ``node_ip`` is the address it announces for WebRTC and binds besides 127.0.0.1 (WebRTC
    never uses loopback): the test network namespace's veth address. ``binary`` defaults to
    ``server_binary()``; ``workdir`` (for its config file) to a temporary directory.
    ``extra_args`` go on its command line (e.g. ``--redis-host``); ``config`` is YAML added
    to its config file.
    """
    if binary is None:
        binary, why = find_binary()
        if binary is None:
            raise RuntimeError(why)
    with tempfile.TemporaryDirectory(prefix="livekit-") as tmp:
        async with trio.open_nursery() as nursery:
            for attempt in range(3):
                http, tcp, udp = free_ports(socket.SOCK_STREAM, socket.SOCK_STREAM,
                                            socket.SOCK_DGRAM, host=node_ip)
                server = LiveKitServer(
                    binary=binary, workdir=workdir or Path(tmp), node_ip=node_ip,
                    port=port or http, tcp_port=tcp, udp_port=udp, extra_args=extra_args,
                    extra_config=config, start_timeout=timeout, nursery=nursery)
                try:
                    await server.start()
                except RuntimeError:
                    # a port taken between our choice and its bind: again, on other ports
                    if attempt == 2 or port is not None or not any(
                            "address already in use" in r.message for r in server.records):
                        raise
                    continue
                try:
                    yield server
                finally:
                    await server.stop()
                break


#: Where Redis comes from (Debian's ``redis-server``), or ``None``.
REDIS_SERVER: Final = shutil.which("redis-server")


@asynccontextmanager
async def open_redis() -> AsyncIterator[str]:
    """A throwaway ``redis-server`` (no persistence) on a free loopback port for the block;
    its ``host:port``, as livekit-server's ``--redis-host`` takes it. Stopped and reaped at
    the end."""
    if REDIS_SERVER is None:
        raise RuntimeError("redis-server is not installed: apt-get install -y redis-server")
    port, = free_ports(socket.SOCK_STREAM)
    process = await trio.lowlevel.open_process(
        [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    try:
        async with process.stdout, trio.open_nursery() as nursery:
            seen = b""
            with trio.fail_after(START_TIMEOUT):
                while b"Ready to accept connections" not in seen:
                    if not (chunk := await process.stdout.receive_some(65536)):
                        raise RuntimeError(f"redis-server exited at start:\n{seen.decode()}")
                    seen += chunk

            async def drain() -> None:  # read on, so it never blocks on a full pipe
                assert process.stdout is not None
                while await process.stdout.receive_some(65536):
                    pass

            nursery.start_soon(drain)
            yield f"127.0.0.1:{port}"
            nursery.cancel_scope.cancel()
    finally:
        await terminate(process, STOP_TIMEOUT)
