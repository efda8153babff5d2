"""The zygote: a pre-imported template process that forks job processes.

Theory of operation
-------------------
Starting a job process from scratch costs a new interpreter: ~250 ms of imports and ~20 MiB
of private memory. The zygote pays that once. The supervisor starts it through ``_spawn`` (so
it watches the server's lifeline from its first instruction); it imports trio_agents' child
code and the user's modules, freezes its heap for copy-on-write sharing, stops its lifeline
thread and then waits, with no event loop and no thread, in ``select`` on three fds: the
control socket, the lifeline (EOF: the server is gone → kill every child's group, exit) and a
SIGCHLD wake-up pipe (reap, report exits).

It forks only while it is the only thread in its process: a lock held by another thread at the
fork stays locked forever in the child. It watches the imports for threads (a Python thread
started while a module was executing is named with that module; a native thread, e.g. a BLAS
pool, with the preloaded module whose import started it) and, if any is left, it says so in
its ``ready`` message and refuses every fork; the supervisor then starts job processes cold.

Each forked child starts its own session, arms ``PR_SET_PDEATHSIG(SIGKILL)`` — its parent
thread is the zygote's only thread, so that signal means "the zygote died" and nothing else —
watches the lifeline, sets the marker for whatever it spawns, and runs the same child code as
a cold job process (``_child.serve``).

The server never signals a pid it does not own: the zygote opens a pidfd for each child before
it can have reaped it and sends it back with the reply; the server signals the process through
that pidfd, and its *group* only through the zygote (``signal`` request), which does it only
while it has not reaped the leader, so the group id cannot have been reused.

Wire: a ``SOCK_SEQPACKET`` socketpair (one JSON object per message, message boundaries kept,
so an fd always travels with its own message). Server → zygote: ``{"id": N, "marker": M}`` +
the job's IPC socket; ``{"signal": PID, "sig": S}``. Zygote → server: ``{"ready": true}`` or
``{"refuse": TEXT}`` once; ``{"id": N, "pid": PID}`` + its pidfd, or ``{"id": N, "error": TEXT}``;
``{"exit": PID, "code": C}``. Replies are matched by id: a fork whose caller was cancelled
leaves no stale waiter; its process is killed when its reply arrives.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Final, final

import trio

from . import _lifeline
from ._errors import JobProcessError
from ._procutil import MARKER_ENV, kill_group, set_parent_death_signal

MAX_MESSAGE: Final = 4096
#: Set to "1" in the zygote's environment unless the user set them: numerical libraries
#: (numpy's OpenBLAS, which the realtime SDK imports) otherwise start a thread pool on import,
#: and the zygote must have no thread when it forks. Job processes inherit the setting.
ZYGOTE_SINGLE_THREADED: Final = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: A fork is answered in milliseconds; past this the zygote is wedged and the fork fails.
FORK_TIMEOUT: Final = 10.0

logger = logging.getLogger("trio_agents.supervisor")


class ZygoteUnavailable(JobProcessError):
    """The zygote cannot fork (gone, restarting, or refusing): start the process cold."""


# -- the zygote process ---------------------------------------------------------------------


def _tasks() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except FileNotFoundError:  # not Linux: only Python threads are seen
        return {t.native_id or 0 for t in threading.enumerate()}


def _thread_name(tid: int) -> str:
    for thread in threading.enumerate():
        if thread.native_id == tid:
            return f"thread {thread.name!r}"
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f"native thread {f.read().strip()!r}"
    except OSError:
        return f"native thread {tid}"


def _importing_module() -> str:
    """The module whose top-level code is running on this thread (innermost), or ``?``."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            return str(frame.f_globals.get("__name__", "?"))
        frame = frame.f_back
    return "?"


def preload(modules: list[str], load_script: Callable[[str], object],
            ignore: set[int]) -> str | None:
    """Import ``modules`` (``file:`` = a script); ``None``, or why this process cannot fork.

    ``ignore``: thread ids that are ours and will be gone before any fork (the lifeline's).
    """
    started: dict[int, str] = {}  # native id of a Python thread → module that started it
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        real_start(thread)
        started[thread.native_id or 0] = _importing_module()

    threading.Thread.start = start  # type: ignore[method-assign,assignment]
    try:
        for module in modules:
            before = _tasks()
            try:
                if module.startswith("file:"):
                    load_script(module[len("file:"):])
                else:
                    importlib.import_module(module)
            except BaseException as exc:  # noqa: BLE001 - anything: say it, fork nothing
                return f"importing {module} failed: {_describe(exc)}"
            new = sorted(_tasks() - before - ignore)
            if new:
                tid = new[0]
                origin = started.get(tid) or module
                return (f"{_thread_name(tid)} (and {len(new) - 1} more) was started while "
                        f"importing {origin}; forking a process with threads is unsafe (a "
                        "lock held by a thread stays locked in the child), so job processes "
                        "start cold. Start threads in setup_fnc or the entrypoint instead, or "
                        "set use_zygote=False")
    finally:
        threading.Thread.start = real_start  # type: ignore[method-assign]
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str]) -> None:  # pragma: no cover - runs in the zygote (tested end to end)
    ctl = socket.socket(fileno=int(argv[1]))
    os.set_inheritable(ctl.fileno(), False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch = _lifeline.current()
    from . import _child  # noqa: F401  (the point: imported once, shared by every fork)
    from ._loading import _load_script

    ignore = {watch._thread.native_id or 0} if watch is not None else set()
    refusal = preload(list(argv[2:]), _load_script, ignore)
    if refusal is None and "livekit.rtc" in sys.modules:  # the agent joins rooms: share it too
        refusal = preload(["trio_agents._room"], _load_script, ignore)
    lifeline = -1
    if watch is not None:
        lifeline = watch.fd
        watch.stop()  # from here on, the lifeline is watched by the select loop below
    threads = _tasks() - {threading.get_native_id()}
    if refusal is None and threads:
        refusal = (f"{_thread_name(min(threads))} runs in the zygote after its imports; "
                   "forking a process with threads is unsafe, so job processes start cold")
    _send(ctl, {"refuse": refusal} if refusal else {"ready": True})
    gc.collect()
    gc.freeze()  # keep refcount-free heap pages shared with the children
    _serve(ctl, lifeline, refusal)


def _send(ctl: socket.socket, message: dict[str, Any], fd: int | None = None) -> None:
    data = json.dumps(message).encode()
    if fd is None:
        ctl.sendall(data)
    else:
        socket.send_fds(ctl, [data], [fd])


def _serve(ctl: socket.socket, lifeline: int,
           refusal: str | None) -> None:  # pragma: no cover - zygote side
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: set[int] = set()  # forked and not reaped: their pids (= group ids) are ours
    watched = [ctl.fileno(), wake_r] + ([lifeline] if lifeline >= 0 else [])
    while True:
        ready, _, _ = select.select(watched, [], [])
        if lifeline in ready:  # the server is gone
            _kill_all(children)
            os._exit(1)
        if wake_r in ready:
            os.read(wake_r, 512)
            _report_exits(ctl, children)
        if ctl.fileno() not in ready:
            continue
        data, fds, _, _ = socket.recv_fds(ctl, MAX_MESSAGE, 1)
        if not data:  # the supervisor closed the socket: it is done with us
            _kill_all(children)
            os._exit(0)
        request = json.loads(data)
        if "signal" in request:
            if request["signal"] in children:
                kill_group(request["signal"], request["sig"])
            continue
        if not fds:
            continue
        threads = len(_tasks())
        if refusal is not None or threads > 1:
            os.close(fds[0])
            _send(ctl, {"id": request["id"],
                        "error": refusal or f"the zygote has {threads - 1} thread(s)"})
            continue
        pid = os.fork()
        if pid == 0:
            _become_job(ctl, (wake_r, wake_w), lifeline, fds[0], request["marker"])
        os.close(fds[0])
        children.add(pid)
        pidfd = os.pidfd_open(pid)  # not reaped yet (only this loop reaps): it is our child
        try:
            _send(ctl, {"id": request["id"], "pid": pid}, pidfd)
        finally:
            os.close(pidfd)


def _kill_all(children: set[int]) -> None:  # pragma: no cover - zygote side
    for pid in children:  # unreaped, so each group id is still theirs
        kill_group(pid, signal.SIGKILL)


def _report_exits(ctl: socket.socket, children: set[int]) -> None:  # pragma: no cover
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(ctl, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _become_job(ctl: socket.socket, pipe: tuple[int, int], lifeline: int, fd: int,
                marker: str) -> None:  # pragma: no cover - runs in the forked child
    zygote = os.getppid()
    set_parent_death_signal(signal.SIGKILL)  # our parent thread is the zygote's only thread
    if os.getppid() != zygote:
        os._exit(1)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctl.close()
    for end in pipe:
        os.close(end)
    os.setsid()
    if lifeline >= 0:
        _lifeline.start(lifeline)
    os.environ[MARKER_ENV] = marker  # what this job spawns carries its job's marker
    from . import _child

    sys.argv = [_child.__file__ or "", str(fd)]  # look like a cold job process
    _child.main(sys.argv)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv)


# -- the server's side ----------------------------------------------------------------------


@final
class ForkedProcess:
    """A job process forked by the zygote; the same face as ``Spawned`` for ``_proc``.

    Holds the pidfd the zygote opened for it: signals to the process go through it.
    """

    def __init__(self, pid: int, pidfd: int, zygote: Zygote) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = pidfd
        self._zygote = zygote
        self._exited = trio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def signal_group(self, sig: int) -> None:
        """The leader through its pidfd; the group through the zygote, which still owns it."""
        self.send_signal(sig)
        if self.returncode is None:
            self._zygote._signal_group(self.pid, sig)

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            self._exited.set()


@final
class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.child: ForkedProcess | None = None
        self.error = ""


@final
class Zygote:
    """Runs one zygote process and asks it for job processes. ``run`` is a nursery component;
    it may be run again after it returned (a restart)."""

    def __init__(self, env: dict[str, str], preload: list[str]) -> None:
        self._env = env
        self._preload = preload
        self._sock: trio.socket.SocketType | None = None
        self._raw: socket.socket | None = None
        self._pending: dict[int, _Pending] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._next_id = 0
        self.pid = 0
        self.alive = False
        self.refused: str | None = None
        """Why the zygote will not fork (threads, a failed import): set once it said so."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the zygote, serve it, and return when it is gone (``SpawnError`` if it cannot
        start). Every pending fork fails at once when it ends."""
        from ._spawn import SpawnError, spawn

        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            raise SpawnError(f"could not start the zygote: {exc}") from exc
        try:
            process = await spawn(["-m", "trio_agents._zygote", str(theirs.fileno()),
                                   *self._preload], what="the zygote",
                                  pass_fds=(theirs.fileno(),), env=self._env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._raw = ours
        self._sock = trio.socket.from_stdlib_socket(ours)
        self.pid = process.pid
        self.alive = True
        self.refused = None
        logger.debug("the zygote is up (pid %d)", process.pid, extra={"pid": process.pid})
        try:
            task_status.started()
            await self._read()
        finally:
            self.alive = False
            self._sock.close()
            self._sock = self._raw = None
            for pending in self._pending.values():
                pending.error = "the zygote exited"
                pending.done.set()
            self._pending.clear()
            for child in self._children.values():  # killed by the zygote, or PDEATHSIG
                child.exited(-signal.SIGKILL)
            self._children.clear()
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()

    async def fork(self, fd: int, marker: str) -> ForkedProcess:
        """A new job process whose IPC socket is ``fd`` (ours to close afterwards).

        ``ZygoteUnavailable`` if the zygote is not running, refuses, exits meanwhile, or does
        not answer within ``FORK_TIMEOUT``. Cancellation at any point leaves nothing behind:
        a child forked for a cancelled call is killed when its reply arrives.
        """
        if self._sock is None or not self.alive or self.refused is not None:
            raise ZygoteUnavailable(f"the zygote is not available ({self.refused or 'not running'})")
        self._next_id += 1
        request_id = self._next_id
        pending = self._pending[request_id] = _Pending()
        try:
            request = json.dumps({"id": request_id, "marker": marker}).encode()
            with trio.move_on_after(FORK_TIMEOUT):
                await self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     fd.to_bytes(4, sys.byteorder, signed=True))])
                await pending.done.wait()
        except OSError as exc:  # the zygote closed its end
            raise ZygoteUnavailable(f"the zygote is gone ({exc})") from exc
        except BaseException:  # cancelled: a child that arrived meanwhile is nobody's
            if pending.child is not None:
                pending.child.kill()
            raise
        finally:
            self._pending.pop(request_id, None)
        if pending.child is not None:
            return pending.child
        raise ZygoteUnavailable(pending.error or
                                f"the zygote did not fork within {FORK_TIMEOUT:g} s")

    def _signal_group(self, pid: int, sig: int) -> None:
        if self._raw is None:
            return
        try:
            self._raw.send(json.dumps({"signal": pid, "sig": int(sig)}).encode(),
                           socket.MSG_DONTWAIT)  # one datagram: whole or not at all
        except OSError:
            pass  # full or gone: the leader got the signal through its pidfd anyway

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, ancdata, _, _ = await self._sock.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(4))
            except OSError:
                return
            fds = [int.from_bytes(cmsg[2][i:i + 4], sys.byteorder)
                   for cmsg in ancdata if cmsg[0] == socket.SOL_SOCKET
                   and cmsg[1] == socket.SCM_RIGHTS for i in range(0, len(cmsg[2]) - 3, 4)]
            if not data:
                return
            self._dispatch(json.loads(data), fds)
            if self.refused is not None:
                return  # it will never fork: stop it (the supervisor starts processes cold)

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        if "ready" in message:
            return
        if "refuse" in message:
            self.refused = str(message["refuse"])
            for waiting in self._pending.values():
                waiting.error = self.refused
                waiting.done.set()
            return
        if "exit" in message:
            child = self._children.pop(int(message["exit"]), None)
            if child is not None:
                child.exited(int(message["code"]))
            return
        pending = self._pending.get(int(message["id"]))
        if "pid" not in message or not fds:
            for fd in fds:
                os.close(fd)
            if pending is not None:
                pending.error = str(message.get("error", "the zygote sent no pidfd"))
                pending.done.set()
            return
        child = ForkedProcess(int(message["pid"]), fds[0], self)
        self._children[child.pid] = child
        if pending is None:  # its caller was cancelled: nobody will use it
            child.kill()
            return
        pending.child = child
        pending.done.set()
