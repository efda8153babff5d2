"""The zygote: a pre-imported template process that forks job processes.

Theory of operation
-------------------
Starting a job process from scratch costs a new interpreter: ~250 ms of imports and ~20 MiB
of private memory. The zygote pays that once. It is started by the supervisor, imports
trio_agents' child code and the user's module (the entrypoint's), freezes its heap for
copy-on-write sharing, and then waits, with no event loop and no thread, for fork requests on
a socketpair. Each request carries the new process's IPC socket (SCM_RIGHTS) and its marker;
the forked child starts its own session, sets the marker for whatever it spawns, and runs the
same child main as a spawned job process (``_child.main``), so everything downstream is the
same: IPC, prewarm, watchdog, escalation.

The forked process is the zygote's child, not the server's: the zygote reaps it and reports its
exit status over the same socketpair; the server holds a pidfd to signal it safely. Death
chain: the server dies → the zygote gets PDEATHSIG → every forked process gets PDEATHSIG.

Wire: JSON lines, server → zygote ``{"marker": ...}`` + one fd; zygote → server
``{"pid": N}`` (in request order) and ``{"exit": N, "code": C}``.
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
from collections import deque
from typing import Final, final

import trio

from ._procutil import MARKER_ENV, set_parent_death_signal

MAX_LINE: Final = 4096
#: Set to "1" in the zygote's environment unless the user set them: numerical libraries
#: (numpy's OpenBLAS, which the realtime SDK imports) otherwise start a thread pool on import,
#: and the zygote must have no thread when it forks. Job processes inherit the setting.
ZYGOTE_SINGLE_THREADED: Final = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# -- the zygote process ---------------------------------------------------------------------


def main(argv: list[str]) -> None:  # pragma: no cover - runs in the zygote (tested end to end)
    ctl_fd, server = int(argv[1]), int(argv[2])
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != server:
        os._exit(1)
    ctl = socket.socket(fileno=ctl_fd)
    os.set_inheritable(ctl_fd, False)
    from . import _child  # noqa: F401  (the point: imported once, shared by every fork)

    from ._loading import _load_script

    for module in argv[3:]:  # the user's code: modules, or a script run as __main__
        if module.startswith("file:"):
            _load_script(module[len("file:"):])
        else:
            importlib.import_module(module)
    if "livekit.rtc" in sys.modules:  # the agent joins rooms: share the room code too
        importlib.import_module("trio_agents._room")
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:
        print(f"trio_agents zygote: importing the agent's code started {threads - 1} "
              "thread(s); forking a threaded process is unsafe (a lock held by a thread stays "
              "locked in the child). Start threads in setup_fnc or the entrypoint, or set "
              "use_zygote=False.", file=sys.stderr, flush=True)
    gc.collect()
    gc.freeze()  # keep refcount-free heap pages shared with the children
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    buffer = b""
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 512)
            _report_exits(ctl)
        if ctl.fileno() in ready:
            data, fds, _, _ = socket.recv_fds(ctl, MAX_LINE, 1)
            if not data:
                os._exit(0)  # the server is gone; the children die with us (PDEATHSIG)
            buffer += data
            line, _, buffer = buffer.partition(b"\n")
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _become_job(ctl, (wake_r, wake_w), fds[0], request["marker"])
            os.close(fds[0])
            ctl.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _report_exits(ctl: socket.socket) -> None:  # pragma: no cover - zygote side
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        message = {"exit": pid, "code": os.waitstatus_to_exitcode(status)}
        ctl.sendall(json.dumps(message).encode() + b"\n")


def _become_job(ctl: socket.socket, pipe: tuple[int, int], fd: int,
                marker: str) -> None:  # pragma: no cover - runs in the forked child
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctl.close()
    for end in pipe:
        os.close(end)
    os.setsid()
    os.environ[MARKER_ENV] = marker  # what this job spawns carries its job's marker
    from . import _child

    # look like a spawned job process: python -m trio_agents._child <fd> <parent pid>
    sys.argv = [_child.__file__ or "", str(fd), str(os.getppid())]
    _child.main(sys.argv)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv)


# -- the server's side ----------------------------------------------------------------------


@final
class ForkedProcess:
    """A job process forked by the zygote; the same face as ``trio.Process`` for ``_proc``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = trio.Event()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        if self._pidfd is not None and self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            self._exited.set()


@final
class Zygote:
    """Runs the zygote process and asks it for job processes. ``run`` is a nursery component."""

    def __init__(self, env: dict[str, str], preload: list[str]) -> None:
        self._env = env
        self._preload = preload
        self._sock: trio.socket.SocketType | None = None
        self._waiting: deque[trio.MemorySendChannel[int]] = deque()
        self._children: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._lock = trio.Lock()
        self.alive = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "trio_agents._zygote", str(theirs.fileno()),
                str(os.getpid()), *self._preload]
        try:
            process = await trio.lowlevel.open_process(
                argv, pass_fds=(theirs.fileno(),), start_new_session=True, env=self._env)
        except OSError as exc:
            ours.close()
            logging.getLogger("trio_agents.supervisor").warning(
                "the zygote could not start (%s); job processes start cold", exc)
            task_status.started()
            return
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        self.alive = True
        try:
            task_status.started()
            await self._read()
        finally:
            self.alive = False
            self._sock.close()
            for child in self._children.values():  # gone with the zygote (PDEATHSIG)
                child.exited(-signal.SIGKILL)
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()

    async def fork(self, fd: int, marker: str) -> ForkedProcess:
        """A new job process whose IPC socket is ``fd`` (ours to close afterwards)."""
        if self._sock is None or not self.alive:
            raise OSError("the zygote is not running")
        send, receive = trio.open_memory_channel[int](1)
        async with self._lock:  # replies come in request order
            self._waiting.append(send)
            request = json.dumps({"marker": marker}).encode() + b"\n"
            await self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 fd.to_bytes(4, sys.byteorder, signed=True))])
        pid = await receive.receive()
        child = ForkedProcess(pid)
        if pid in self._early_exits:
            child.exited(self._early_exits.pop(pid))
        else:
            self._children[pid] = child
        return child

    async def _read(self) -> None:
        assert self._sock is not None
        buffer = b""
        while True:
            data = await self._sock.recv(MAX_LINE)
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "pid" in message:
                    self._waiting.popleft().send_nowait(int(message["pid"]))
                else:
                    child = self._children.pop(int(message["exit"]), None)
                    if child is None:
                        self._early_exits[int(message["exit"])] = int(message["code"])
                    else:
                        child.exited(int(message["code"]))
