"""The job process: ``_lifeline.py <lifeline fd> -m trio_agents._child <fd>`` (see ``_spawn``),
or forked from the zygote.

Life of a job process (the same loop runs on a thread for ``JobExecutorType.THREAD``)::

    (already watching the server's lifeline: its end kills this process group at once)
    receive InitializeRequest          (blocking socket: there is no event loop yet)
    load the user's functions, run setup_fnc(proc)
    send InitializeResponse            (error + traceback if loading or setup failed)
    trio.run:
        answer Ping with Pong; EOF from the server = it is gone: exit at once
        receive StartJob → send JobStarted → await entrypoint(ctx)
        the job ends when ctx.shutdown(reason) is called, a ShutdownRequest arrives, or the
        room disconnects (each cancels the entrypoint), or when the entrypoint returns
        without having joined the room (ctx.connect())
        on_session_end(ctx) (≤ session_end_timeout)
        in the room: send JobEnding(outcome, error, user_initiated, reason), wait for
        JobEndingAck (≤ ENDING_ACK_TIMEOUT): the server reports the job's status before the
        agent leaves, as LiveKit fails a job whose agent left first
        leave the room, then every shutdown callback concurrently (each ≤ its timeout; a
        failing one does not stop the others)
        send JobFinished(outcome, error, user_initiated, reason)
    exit 0

The process exits with ``os._exit`` after flushing stdio, so a non-daemon thread left behind
by user code cannot keep it alive. Log records go to the server over the IPC socket (see
``IpcLogHandler``); stdout and stderr stay the user's.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from typing import Final, final

import attrs
import trio

from . import _ipc
from ._context import JobContext, JobProcess, call_shutdown_callback, set_job_context
from ._errors import RemoteProtocolError
from ._loading import UnguardedScript
from ._options import JobExecutorType

logger = logging.getLogger("trio_agents.job")

#: Log records waiting to be written before new ones are dropped (counted, then reported).
LOG_BUFFER: Final = 10_000
#: How long a job in its room waits for the server to acknowledge ``JobEnding`` before it
#: leaves the room anyway.
ENDING_ACK_TIMEOUT: Final = 2.0

_STANDARD_RECORD_KEYS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message", "asctime", "taskName",
}


@final
@attrs.frozen
class Functions:
    """The user's functions, loaded (process) or handed over directly (thread)."""

    entrypoint: Callable[[JobContext], Awaitable[None]]
    setup: Callable[[JobProcess], object] | None = None
    session_end: Callable[[JobContext], Awaitable[None]] | None = None


def _load(req: _ipc.InitializeRequest) -> Functions:
    return Functions(
        entrypoint=req.entrypoint.load(),  # type: ignore[arg-type]
        setup=req.setup.load() if req.setup else None,
        session_end=req.session_end.load() if req.session_end else None,  # type: ignore[arg-type]
    )


# -- outgoing messages ------------------------------------------------------------------------


@final
class _Outbox:
    """Where outgoing messages go: straight to the blocking socket outside the trio loop, and
    through a memory channel to the one writer task inside it (so any thread can log)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._loop: tuple[trio.lowlevel.TrioToken, trio.MemorySendChannel[_ipc.Message]] | None = None
        self._late: list[_ipc.Message] = []
        self.dropped = 0

    def attach(self, chan: trio.MemorySendChannel[_ipc.Message]) -> None:
        self._loop = (trio.lowlevel.current_trio_token(), chan)

    def detach(self) -> None:
        self._loop = None
        self._sock.setblocking(True)
        late, self._late = self._late, []
        for msg in late:
            self.send_blocking(msg)

    def post(self, msg: _ipc.Message) -> None:
        """From any thread, in or out of the loop; never blocks the caller for long."""
        loop = self._loop
        if loop is not None:
            token, chan = loop
            try:
                token.run_sync_soon(self._put, chan, msg)
                return
            except trio.RunFinishedError:
                pass
        self.send_blocking(msg)

    def _put(self, chan: trio.MemorySendChannel[_ipc.Message], msg: _ipc.Message) -> None:
        try:
            chan.send_nowait(msg)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._late.append(msg)

    def send_blocking(self, msg: _ipc.Message) -> None:
        frame = _ipc.encode_frame(_ipc.encode(msg))
        with self._lock:
            try:
                self._sock.sendall(frame)
            except OSError:
                pass  # the server is gone; we are about to exit anyway


@final
class IpcLogHandler(logging.Handler):
    """Ships every log record of the job process to the server, with the job's fields."""

    def __init__(self, outbox: _Outbox) -> None:
        super().__init__()
        self._outbox = outbox
        self.ctx: JobContext | None = None
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "on", False):
            return  # a log call made while shipping a record: drop it, do not recurse
        self._busy.on = True
        try:
            self._outbox.post(self._convert(record))
        except Exception:
            self.handleError(record)
        finally:
            self._busy.on = False

    def _convert(self, record: logging.LogRecord) -> _ipc.LogRecord:
        fields: dict[str, _ipc._messages.JsonScalar] = {}
        for key, value in record.__dict__.items():
            if key not in _STANDARD_RECORD_KEYS and not key.startswith("_"):
                fields[key] = _scalar(value)
        ctx = self.ctx
        if ctx is not None:
            for key, value in ctx.log_context_fields.items():
                fields.setdefault(key, _scalar(value))
            job = ctx.job
            fields.update(job_id=job.id, room=job.room.name, room_id=job.room.sid,
                          agent_name=job.agent_name)
        exc_text = record.exc_text or ""
        if record.exc_info and not exc_text:
            exc_text = logging.Formatter().formatException(record.exc_info)
        if record.stack_info:
            exc_text = f"{exc_text}\n{record.stack_info}" if exc_text else record.stack_info
        return _ipc.LogRecord(
            name=record.name, level=record.levelno, msg=record.getMessage(),
            created=record.created, exc_text=exc_text, pathname=record.pathname,
            lineno=record.lineno or 0, func_name=record.funcName or "", fields=fields,
        )


def _scalar(value: object) -> _ipc._messages.JsonScalar:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


# -- the job ----------------------------------------------------------------------------------


@final
class _Job:
    """The trio side of a job process: receive loop, job task, writer."""

    def __init__(self, *, req: _ipc.InitializeRequest, functions: Functions, proc: JobProcess,
                 outbox: _Outbox, handler: IpcLogHandler | None, in_thread: bool) -> None:
        self.req = req
        self.functions = functions
        self.proc = proc
        self.outbox = outbox
        self.handler = handler
        self.in_thread = in_thread
        self.entry_scope = trio.CancelScope()
        self.stop_reason: tuple[str, bool] | None = None
        self.started = False
        self.done = trio.Event()
        self.ending_acked = trio.Event()
        self.token: trio.lowlevel.TrioToken | None = None
        self.chan: _ipc.IpcChannel

    def request_stop(self, reason: str, user_initiated: bool) -> None:
        """First reason wins; cancels the entrypoint (trio thread only; see ``shutdown``)."""
        if self.stop_reason is None:
            self.stop_reason = (reason, user_initiated)
        self.entry_scope.cancel()
        if not self.started:
            self.done.set()

    def user_shutdown(self, reason: str) -> None:
        """``ctx.shutdown``: callable from any thread."""
        assert self.token is not None
        try:
            self.token.run_sync_soon(self.request_stop, reason or "user requested", True)
        except trio.RunFinishedError:
            pass

    async def serve(self, sock: socket.socket) -> None:
        self.token = trio.lowlevel.current_trio_token()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        chan = self.chan = _ipc.IpcChannel(stream)
        send, receive = trio.open_memory_channel[_ipc.Message](LOG_BUFFER)
        self.outbox.attach(send)
        try:
            async with trio.open_nursery() as nursery:
                writer_done = trio.Event()
                nursery.start_soon(self._writer, chan, receive, writer_done)
                nursery.start_soon(self._receiver, chan, send, nursery)
                await self.done.wait()
                send.close()  # the writer drains what is queued (JobFinished last), then stops
                await writer_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.outbox.detach()

    async def _writer(self, chan: _ipc.IpcChannel,
                      receive: trio.MemoryReceiveChannel[_ipc.Message], done: trio.Event) -> None:
        try:
            async for msg in receive:
                await chan.send(msg)
        except RemoteProtocolError:
            self._parent_gone()
        finally:
            done.set()

    async def _receiver(self, chan: _ipc.IpcChannel, send: trio.MemorySendChannel[_ipc.Message],
                        nursery: trio.Nursery) -> None:
        while True:
            try:
                msg = await chan.receive()
            except (trio.EndOfChannel, RemoteProtocolError):
                self._parent_gone()
                return
            if isinstance(msg, _ipc.Ping):
                try:
                    await send.send(_ipc.Pong(seq=msg.seq, sent_at=msg.sent_at))
                except trio.ClosedResourceError:
                    pass  # the job is over and its last messages are being written
            elif isinstance(msg, _ipc.StartJob) and not self.started and self.stop_reason is None:
                self.started = True
                # This task becomes the job's and a new one goes on reading: the entrypoint
                # starts now, not after a scheduler pass.
                nursery.start_soon(self._receiver, chan, send, nursery)
                await self._run_job(msg, send)
                return
            elif isinstance(msg, _ipc.ShutdownRequest):
                self.request_stop(msg.reason or "server shutdown", False)
            elif isinstance(msg, _ipc.JobEndingAck):
                self.ending_acked.set()
            else:
                logger.error("unexpected IPC message from the server: %r", msg)

    def _parent_gone(self) -> None:
        if self.in_thread:
            self.request_stop("server closed the job channel", False)
            self.done.set()
            return
        # The server is gone (its lifeline normally told us first): nobody is left to report to.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    async def _run_job(self, start: _ipc.StartJob,
                       send: trio.MemorySendChannel[_ipc.Message]) -> None:
        info = start.to_info()
        # The job's services (the room's asyncio bridge) live in this nursery and end with it.
        async with trio.open_nursery() as services:
            ctx = JobContext(
                proc=self.proc, info=info, on_shutdown=self.user_shutdown,
                api_credentials=(info.url or self.req.ws_url, self.req.api_key,
                                 self.req.api_secret),
                services=services, on_room_closed=self._room_closed,
                # A job process exits right after the job: a connect still settling dies
                # with it. On a thread, the server process lives on, so it is waited for.
                abandon_pending_connects=not self.in_thread,
            )
            if self.handler is not None:
                self.handler.ctx = ctx
            set_job_context(ctx)
            # Written before the entrypoint runs (not queued): an entrypoint that blocks its
            # thread at once must still be seen as started.
            await self.chan.send_urgent(_ipc.JobStarted())
            outcome, error = _ipc.SUCCESS, ""
            with self.entry_scope:
                try:
                    await self.functions.entrypoint(ctx)
                    if ctx.is_connected():
                        # In the room, the job goes on after the entrypoint returns: until
                        # ctx.shutdown(), a termination, or the room disconnecting.
                        await trio.sleep_forever()
                except Exception as exc:
                    outcome, error = _ipc.FAILED, _describe(exc)
                    logger.exception("the entrypoint of job %s raised %s", info.job.id, error)
            if self.stop_reason is not None:
                reason, user_initiated = self.stop_reason
            else:
                reason = "entrypoint returned" if outcome == _ipc.SUCCESS else "job crashed"
                user_initiated = False
            await self._wind_down(ctx, _ipc.JobEnding(
                outcome=outcome, error=error, user_initiated=user_initiated, reason=reason))
            services.cancel_scope.cancel()
        if self.outbox.dropped:
            logger.warning("%d log records of this job were dropped (log buffer full)",
                           self.outbox.dropped)
        await send.send(_ipc.JobFinished(outcome=outcome, error=error,
                                         user_initiated=user_initiated, reason=reason))
        self.done.set()

    def _room_closed(self, reason: str) -> None:
        """The job's room disconnected without us asking: the job is over."""
        self.request_stop(reason, False)

    async def _wind_down(self, ctx: JobContext, ending: _ipc.JobEnding) -> None:
        session_end = self.functions.session_end
        if session_end is not None:
            timeout = self.req.session_end_timeout
            with trio.move_on_after(timeout) as scope:
                try:
                    await session_end(ctx)
                except Exception:
                    logger.exception("on_session_end failed")
            if scope.cancelled_caught:
                logger.warning("on_session_end did not finish within %.1f s; cancelled", timeout)
        if ctx.is_connected():
            await self._announce_end(ending)
        await ctx.close_room()
        callbacks = ctx.shutdown_callbacks
        if callbacks:
            async with trio.open_nursery() as nursery:
                for cb in callbacks:
                    nursery.start_soon(self._callback, cb, ending.reason)

    async def _announce_end(self, ending: _ipc.JobEnding) -> None:
        """Have the server report the job's status while the agent is still in the room.

        LiveKit marks a job ``JS_FAILED`` ("agent worker left the room") when its agent leaves
        before the worker reported the job ended. Written directly, not behind queued log
        records; the wait is bounded so a server that never answers cannot hold the job.
        """
        try:
            await self.chan.send(ending)
        except RemoteProtocolError:
            self._parent_gone()
            return
        with trio.move_on_after(ENDING_ACK_TIMEOUT) as scope:
            await self.ending_acked.wait()
        if scope.cancelled_caught:
            logger.warning("the server did not acknowledge the end of the job within %.1f s; "
                           "leaving the room anyway", ENDING_ACK_TIMEOUT)

    async def _callback(self, cb: Callable[..., Awaitable[None]], reason: str) -> None:
        timeout = self.req.shutdown_callback_timeout
        with trio.move_on_after(timeout) as scope:
            try:
                await call_shutdown_callback(cb, reason)
            except Exception:
                logger.exception("shutdown callback %r failed", cb)
        if scope.cancelled_caught:
            logger.warning("shutdown callback %r did not finish within %.1f s; cancelled",
                           cb, timeout)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- entry points -----------------------------------------------------------------------------


def _receive_blocking(sock: socket.socket) -> _ipc.Message | None:
    decoder = _ipc.FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            decoder.eof()
            return None
        frames = decoder.feed(data)
        if frames:
            # The server sends nothing else before our InitializeResponse.
            return _ipc.decode(frames[0])


def run(sock: socket.socket, *, functions: Functions | None = None) -> int:
    """Serve one job process over ``sock``; returns the exit code.

    ``functions`` given: the thread executor (the functions are already in memory and the
    server's logging is our logging). Otherwise the functions are loaded from the
    ``InitializeRequest`` and log records are shipped to the server.
    """
    in_thread = functions is not None
    outbox = _Outbox(sock)
    try:
        req = _receive_blocking(sock)
    except (OSError, RemoteProtocolError):
        return 1
    if not isinstance(req, _ipc.InitializeRequest):
        return 1
    handler = None
    if not in_thread:
        handler = IpcLogHandler(outbox)
        root = logging.getLogger()
        root.addHandler(handler)
        level = logging.getLevelName(req.log_level.upper())
        root.setLevel(level if isinstance(level, int) else logging.INFO)
    proc = JobProcess(executor_type=JobExecutorType(req.executor_type), http_proxy=req.http_proxy)
    try:
        if functions is None:
            functions = _load(req)
    except UnguardedScript as exc:  # one line says it all: no traceback
        outbox.send_blocking(_ipc.InitializeResponse(error=str(exc)))
        return 1
    except BaseException as exc:  # SystemExit from user code included: report, then exit
        outbox.send_blocking(_ipc.InitializeResponse(
            error=f"loading the agent's functions failed: {_describe(exc)}",
            traceback=traceback.format_exc()))
        return 1
    try:
        if functions.setup is not None:
            functions.setup(proc)
    except BaseException as exc:  # SystemExit from user code included: report, then exit
        outbox.send_blocking(_ipc.InitializeResponse(error=f"setup_fnc failed: {_describe(exc)}",
                                                     traceback=traceback.format_exc()))
        return 1
    outbox.send_blocking(_ipc.InitializeResponse())
    job = _Job(req=req, functions=functions, proc=proc, outbox=outbox, handler=handler,
               in_thread=in_thread)
    trio.run(job.serve, sock)
    return 0


def main(argv: list[str]) -> None:
    fd = int(argv[1])
    os.set_inheritable(fd, False)  # grandchildren must not hold the server's channel open
    sock = socket.socket(fileno=fd)
    code = 1
    try:
        code = run(sock)
    except BaseException:  # a bug here, or KeyboardInterrupt: say so on stderr, exit non-zero
        traceback.print_exc()
        code = 70
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
