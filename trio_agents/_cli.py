"""The command line: ``python agent.py start|dev|connect|download-files`` (through
``cli.run_app``) and the ``trio-agents`` console script (which also has ``devserver``).

Exit codes: 0 the server stopped cleanly (drained, every job finished by itself); 1 it failed
for good (configuration, credentials, LiveKit unreachable); 2 usage error; 3 it was stopped
with jobs still running (a second, different signal, or the drain budget ran out; in ``dev``,
the first signal).

Signals: in ``start`` (and ``connect``) the first SIGTERM or SIGINT drains, the same signal
again changes nothing, the other one stops the running jobs now. In ``dev`` the first one
stops: running jobs go through the shutdown escalation (``shutdown_process_timeout``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
from functools import partial
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio

from ._errors import ConfigError, TrioAgentsError
from ._options import ServerEnvOption, ServerOptions
from ._server import AgentServer
from ._util import unwrap_errors

if TYPE_CHECKING:
    from .devserver import DevServer

logger = logging.getLogger("trio_agents")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_FORCED: Final = 3

DEMO_ROOM: Final = "demo-room"


def _parser(prog: str, *, with_target: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run a trio_agents agent server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(cmd: argparse.ArgumentParser) -> None:
        if with_target:
            cmd.add_argument("target", help="path/to/agent.py[:attr] or package.module[:attr]")
        cmd.add_argument("--url", help="LiveKit URL (default: $LIVEKIT_URL)")
        cmd.add_argument("--api-key", help="LiveKit API key (default: $LIVEKIT_API_KEY)")
        cmd.add_argument("--api-secret", help="LiveKit API secret (default: $LIVEKIT_API_SECRET)")
        cmd.add_argument("--log-level", help="trace, debug, info, warn, error or critical")

    start = commands.add_parser("start", help="production mode: JSON logs, drain on SIGTERM")
    common(start)
    start.add_argument("--drain-timeout", type=float,
                       help="seconds to wait for running jobs on SIGTERM (default 1800)")
    dev = commands.add_parser("dev", help="development mode: coloured logs, hot reload, "
                              "embedded dev server when no LiveKit URL is set")
    common(dev)
    dev.add_argument("--no-reload", dest="reload", action="store_false",
                     help="do not restart the server when the agent's files change")
    connect = commands.add_parser("connect", help="dispatch this agent to one room and run it")
    common(connect)
    connect.add_argument("--room", required=True, help="the room to join")
    dl = commands.add_parser("download-files", help="download the files registered plugins need")
    if with_target:
        dl.add_argument("target")
        dev_server = commands.add_parser("devserver", help="run the local LiveKit dev server")
        dev_server.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def run_app(server: AgentServer | ServerOptions, argv: Sequence[str] | None = None) -> None:
    """Run ``server`` as the command line says (``python agent.py start``); exits the process."""
    from ._loading import refuse_while_importing

    refuse_while_importing("cli.run_app()")  # in a job process: the script has no __main__ guard
    if isinstance(server, ServerOptions):
        server = AgentServer.from_server_options(server)
    args = _parser(Path(sys.argv[0]).name, with_target=False).parse_args(argv)
    _exit(_dispatch(server, args, script=sys.argv[0]))


def main(argv: Sequence[str] | None = None) -> None:
    """The ``trio-agents`` console script and ``python -m trio_agents``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["devserver"]:
        from .devserver.__main__ import main as devserver_main

        devserver_main(arguments[1:])
        return
    args = _parser("trio-agents", with_target=True).parse_args(arguments)
    try:
        server = load_server(args.target)
    except ConfigError as exc:
        print(f"trio-agents: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    _exit(_dispatch(server, args, script=None))


def _exit(code: int) -> NoReturn:
    """``sys.exit(code)`` without the interpreter's last garbage collections.

    Once the server stopped, what is left is finalizing the interpreter, and its collections
    walk every object the server and its libraries made: 0.3 to 0.8 s of a quick exit on a
    busy 2-core machine. ``gc.freeze()`` moves them all to the permanent generation, which
    those collections skip (measured: ~0.05 s). ``atexit`` handlers and buffered output are
    still run and flushed.
    """
    gc.freeze()
    sys.exit(code)


def load_server(target: str) -> AgentServer:
    """Find the ``AgentServer`` named by ``path/to/file.py[:attr]`` or ``module[:attr]``.

    A file is imported as a module named after its stem, with its folder on ``sys.path``, so
    job processes can import it the same way and its ``__main__`` block does not run.
    """
    spec, _, attr = target.partition(":")
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise ConfigError(f"no such file: {spec}")
        sys.path.insert(0, str(path.parent))
        spec = path.stem
    try:
        module = importlib.import_module(spec)
    except ImportError as exc:
        raise ConfigError(f"cannot import {spec!r}: {exc}") from exc
    if attr:
        found = getattr(module, attr, None)
        if isinstance(found, ServerOptions):
            found = AgentServer.from_server_options(found)
        if not isinstance(found, AgentServer):
            raise ConfigError(f"{spec}:{attr} is not an AgentServer or WorkerOptions")
        return found
    candidates = [value for name, value in vars(module).items()
                  if isinstance(value, (AgentServer, ServerOptions)) and not name.startswith("_")]
    preferred = [vars(module)[n] for n in ("server", "app", "agent", "opts")
                 if isinstance(vars(module).get(n), (AgentServer, ServerOptions))]
    choice = (preferred or candidates or [None])[0]
    if choice is None:
        raise ConfigError(f"{spec} defines no AgentServer; name one with {spec}:<attr>")
    return choice if isinstance(choice, AgentServer) else AgentServer.from_server_options(choice)


def _dispatch(server: AgentServer, args: argparse.Namespace, *, script: str | None) -> int:
    from ._log import resolve_log_level, setup_logging

    if args.command == "download-files":
        from ._plugin import Plugin

        setup_logging(logging.INFO, json=False)
        return Plugin.download_all()
    devmode = args.command in ("dev", "connect")
    try:
        level = resolve_log_level(args.log_level, explicit_log_level(server.options, devmode),
                                  os.environ, default=logging.DEBUG if devmode else logging.INFO)
        changes: dict[str, Any] = {}
        for flag, option in (("url", "ws_url"), ("api_key", "api_key"),
                             ("api_secret", "api_secret")):
            if getattr(args, flag, None):
                changes[option] = getattr(args, flag)
        if getattr(args, "drain_timeout", None) is not None:
            changes["drain_timeout"] = args.drain_timeout
        server.update_options(**changes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(level, json=args.command == "start")
    embedded = devmode and not (server.options.ws_url or os.environ.get("LIVEKIT_URL"))
    try:
        with unwrap_errors(TrioAgentsError):
            if args.command == "dev" and args.reload and script is not None:
                from ._reload import run_with_reload

                return trio.run(run_with_reload, server, script, embedded)
            return trio.run(partial(
                _serve, server, devmode, embedded, getattr(args, "room", None),
                stop_on_signal=args.command == "dev"))
    except TrioAgentsError as exc:
        logger.critical("%s", exc)  # one line: the message names the problem and the fix
        return EXIT_FAILED


def explicit_log_level(options: ServerOptions, devmode: bool) -> str | None:
    """The ``log_level`` option, if it was set (its dev/prod default must not hide
    ``LIVEKIT_LOG_LEVEL``); precedence is ``_log.resolve_log_level``'s."""
    option = options.log_level
    if option == ServerOptions().log_level:
        return None
    return option.getvalue(devmode) if isinstance(option, ServerEnvOption) else option


async def _serve(server: AgentServer, devmode: bool, embedded: bool, room: str | None, *,
                 stop_on_signal: bool = False) -> int:
    """Run the server with signal handling (and the embedded dev server) until it stops.

    ``stop_on_signal`` (``dev``): the first SIGINT or SIGTERM stops at once, running jobs
    through the shutdown escalation. Otherwise (``start``) the first drains, and the other
    signal stops the running jobs now.

    Errors leave by propagating; ``_dispatch`` turns the one ``TrioAgentsError`` among them
    into one log line and an exit code.
    """
    forced = False
    async with trio.open_nursery() as nursery:

        async def stop_now() -> None:
            nonlocal forced
            forced = forced or bool(server.active_jobs)
            await server.aclose()
            nursery.cancel_scope.cancel()  # a server signalled before it ran never starts

        async def drain() -> None:
            nonlocal forced
            if not await server.drain():
                forced = True
            nursery.cancel_scope.cancel()

        async def watch_signals(*, task_status: trio.TaskStatus[None]) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                task_status.started()
                first: int | None = None
                async with trio.open_nursery() as inner:
                    async for signum in received:
                        name = signal.Signals(signum).name
                        if first is None and stop_on_signal:
                            first = signum
                            logger.info("%s received: stopping (running jobs are shut down)",
                                        name)
                            inner.start_soon(stop_now)
                        elif first is None:
                            first = signum
                            other = "SIGINT" if signum == signal.SIGTERM else "SIGTERM"
                            logger.info("%s received: draining; send %s to stop the running "
                                        "jobs now", name, other)
                            inner.start_soon(drain)
                        elif stop_on_signal:
                            logger.info("%s received again: already stopping", name)
                        elif signum == first:
                            logger.info("%s received again: already draining", name)
                        else:
                            logger.warning("%s received while draining: stopping the running "
                                           "jobs now", name)
                            inner.start_soon(stop_now)

        await nursery.start(watch_signals)
        if embedded:
            await _serve_embedded(server, devmode, room)
        else:
            await _run_server(server, devmode,
                              (lambda: _dispatch_to_room(server, room)) if room else None)
        nursery.cancel_scope.cancel()
    return EXIT_FORCED if forced else EXIT_OK


async def _run_server(server: AgentServer, devmode: bool,
                      after_registered: Callable[[], Awaitable[None]] | None = None) -> None:
    """``server.run`` until it returns; ``after_registered()`` once it is registered."""
    async with trio.open_nursery() as nursery:
        ready = trio.Event()

        async def run() -> None:
            await server.run(devmode=devmode, task_status=_SetOnStart(ready))
            nursery.cancel_scope.cancel()

        nursery.start_soon(run)
        await ready.wait()
        if after_registered is not None:
            await after_registered()


class _SetOnStart:
    def __init__(self, event: trio.Event) -> None:
        self.event = event

    def started(self, value: object = None) -> None:
        self.event.set()


async def _dispatch_to_room(server: AgentServer, room: str) -> None:
    from livekit.protocol import agent_dispatch

    from .api import LiveKitAPI

    options = server.options
    async with LiveKitAPI(options.ws_url or os.environ.get("LIVEKIT_URL", ""),
                          options.api_key or os.environ.get("LIVEKIT_API_KEY", ""),
                          options.api_secret or os.environ.get("LIVEKIT_API_SECRET", "")) as api:
        dispatch = await api.agent_dispatch.create_dispatch(
            agent_dispatch.CreateAgentDispatchRequest(room=room, agent_name=_agent_name(server)))
    logger.info("dispatched the agent to room %r (dispatch %s)", room, dispatch.id)


def _agent_name(server: AgentServer) -> str:
    return server.options.agent_name or os.environ.get("LIVEKIT_AGENT_NAME", "")


async def dispatch_demo(dev: DevServer, agent_name: str, room: str = DEMO_ROOM, *,
                        reload_hint: bool = True) -> None:
    """Give a newcomer's agent a job at once: a room (automatic dispatch) or a dispatch."""
    if agent_name:
        await dev.create_dispatch(room, agent_name)
    else:
        await dev.create_room(room)
    hint = "save a file to reload, Ctrl-C to stop" if reload_hint else "Ctrl-C to stop"
    logger.info("dispatched a demo job to room %r; %s", room, hint)


async def _serve_embedded(server: AgentServer, devmode: bool, room: str | None) -> None:
    """No LiveKit URL in dev: run the local dev server in this process tree and a demo job
    (with reload, the file watcher runs the dev server and the demo instead: ``_reload``)."""
    from .devserver import open_dev_server

    async with open_dev_server(host="127.0.0.1", port=0) as dev:
        server.update_options(ws_url=dev.url, api_key=dev.api_key, api_secret=dev.api_secret)
        log_embedded(dev)
        await _run_server(server, devmode,
                          lambda: dispatch_demo(dev, _agent_name(server), room or DEMO_ROOM,
                                                reload_hint=False))


def log_embedded(dev: DevServer) -> None:
    logger.info(
        "no LIVEKIT_URL set: using the embedded dev server at %s (API key %s, secret %s: "
        "participants join with tokens signed by them). To use a real LiveKit server or "
        "LiveKit Cloud, set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET (or "
        "--url/--api-key/--api-secret).", dev.url, dev.api_key, dev.api_secret)
