"""``JobExecutorType.THREAD``: the job-process loop of ``_child`` on a thread of the server.

The thread runs ``_child.run`` (its own ``trio.run``) and talks to the supervisor over a
socketpair with the same codec as a job process, so supervision is the same code. What a
thread cannot do, and so this executor cannot:

* be killed: a job that ignores the shutdown request (or blocks its thread) is *abandoned*
  when the escalation would have killed a process; its thread keeps running until it returns;
* be memory-limited: ``job_memory_limit_mb`` is not enforced (the server logs a warning);
* isolate a crash: a segfault in a job takes the whole server down.

Log records of a thread job go straight into the server's logging (it is the same process).
"""

from __future__ import annotations

import math
import os
import signal
import socket
from functools import partial
from typing import final

import trio

from . import _child

#: Threads of job executors do not count against trio's default thread limiter.
_JOB_THREADS = trio.CapacityLimiter(math.inf)


@final
class ThreadRun:
    """Looks like the parts of ``trio.Process`` the supervisor uses; ``kill()`` abandons."""

    def __init__(self, sock: socket.socket, functions: _child.Functions) -> None:
        self.pid = os.getpid()
        self.returncode: int | None = None
        self._sock = sock
        self._functions = functions
        self._done = trio.Event()
        self._scope = trio.CancelScope()
        self._started = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._started = True
        task_status.started()
        try:
            with self._scope:
                self.returncode = await trio.to_thread.run_sync(
                    partial(_child.run, self._sock, functions=self._functions),
                    abandon_on_cancel=True, limiter=_JOB_THREADS,
                )
        finally:
            self._end()

    def _end(self) -> None:
        if self.returncode is None:
            self.returncode = -signal.SIGKILL  # abandoned: reported like a killed process
        self._sock.close()  # an abandoned job thread then sees its channel closed
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self._started:
            self._scope.cancel()
        else:  # never ran (cancelled before its start): nothing to abandon
            self._end()
