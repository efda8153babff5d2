"""The spawn boundary: every process trio_agents starts goes through ``spawn`` (or, for a job
process forked from the zygote, through the zygote, which ``spawn`` started).

Theory of operation
-------------------
How a child learns that the server is gone. Not ``PR_SET_PDEATHSIG`` armed in a process we
start: trio starts processes from a worker thread (``open_process`` runs ``Popen`` there),
trio retires a worker thread after 10 s idle, and the parent-death signal fires when the parent
*thread* exits (prctl(2)), so every such child was SIGKILLed about 10 s after the spawn.

Instead, a *lifeline*: one pipe per server process. The server holds the write end (close-on-
exec, never written, never closed while the process lives); every child gets the read end and
watches it from its first instruction — ``_lifeline.py`` runs by path before anything else is
imported, and polls the fd on a daemon thread. The kernel closes the write end when the server
process ends, whatever the cause (SIGKILL included), so the read end reports EOF exactly then,
and the child kills its process group and exits. Which thread spawned it does not matter.

Parent-death signal kept in one place only: a job process forked by the zygote arms
``PR_SET_PDEATHSIG(SIGKILL)`` right after the fork. Its parent thread is the zygote's main
thread, the zygote's only thread, which lives exactly as long as the zygote process, so the
signal means "the zygote died" and nothing else. (The forked process also watches the lifeline.)

Process tree of one agent server (``python agent.py start``)::

    server process                 lifeline write end; ProcessSupervisor.run's nursery:
    ├── reaper                     python -I _procutil.py: its own stdin pipe (EOF = server
    │                              gone, or supervisor done) → kill every marked process
    ├── zygote                     _lifeline.py <fd> -m trio_agents._zygote: lifeline thread
    │   │                          during imports, then the fd in its select loop
    │   └── forked job process     setsid; PDEATHSIG (zygote) + lifeline thread; its pidfd is
    │       └── grandchildren      sent to the server (SCM_RIGHTS), which signals only by it
    └── cold job process           _lifeline.py <fd> -m trio_agents._child <ipc fd>; own session
        └── grandchildren          same group (killed with it) or same marker (reaper, sweep)

    dev with reload:  watcher process (lifeline) → dev child = _lifeline.py <fd> agent.py dev
                      --no-reload → the tree above, with the dev child as its server

Any ``OSError`` while starting a process (``EMFILE``, ``EAGAIN``, ``ENOMEM``) is a
``SpawnError``, a ``JobProcessError``: it fails one job or one idle slot, never the server.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Final, final

import trio

from . import _lifeline
from ._errors import JobProcessError
from ._procutil import kill_group

#: The bootstrap every lifeline-bound process starts with (run by path: see ``_lifeline``).
BOOTSTRAP: Final = _lifeline.__file__


class SpawnError(JobProcessError):
    """A process could not be started (the OS refused: fds, processes, memory; or a timeout)."""


_lifeline_ends: tuple[int, int, int] | None = None  # (owner pid, read end, write end)


def lifeline() -> int:
    """The read end of this process's lifeline (made on first use; kept for its whole life)."""
    global _lifeline_ends
    if _lifeline_ends is None or _lifeline_ends[0] != os.getpid():  # a forked copy makes its own
        read, write = os.pipe()  # both close-on-exec: a child gets the read end via pass_fds
        _lifeline_ends = (os.getpid(), read, write)
    return _lifeline_ends[1]


def command(target: Sequence[str], *, with_lifeline: bool = True) -> list[str]:
    """The argv that runs ``target`` (``["-m", module, ...]`` or ``[script, ...]``)."""
    if not with_lifeline:
        return [sys.executable, *target]
    return [sys.executable, BOOTSTRAP, str(lifeline()), *target]


async def spawn(target: Sequence[str], *, what: str, pass_fds: Sequence[int] = (),
                env: Mapping[str, str] | None = None, new_session: bool = True,
                with_lifeline: bool = True, stdin: int | None = None) -> Spawned:
    """Start ``target`` bound to our lifeline; ``SpawnError`` (naming ``what``) if the OS refuses.

    The returned process is owned by the caller, who must ``wait`` for it.
    """
    try:
        fds = (lifeline(), *pass_fds) if with_lifeline else tuple(pass_fds)
        process = await trio.lowlevel.open_process(
            command(target, with_lifeline=with_lifeline), pass_fds=fds,
            start_new_session=new_session, env=env, stdin=stdin,
        )
    except OSError as exc:
        raise SpawnError(f"could not start {what}: {exc}") from exc
    return Spawned(process)


@final
class Spawned:
    """A process we are the parent of: ``trio.Process`` plus group signals that are safe.

    ``signal_group`` signals the group only while the leader is unreaped: its pid (= the
    group id) cannot have been reused then, so the signal reaches what we started.
    """

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def stdin(self) -> trio.abc.SendStream | None:
        return self.process.stdin

    async def wait(self) -> int:
        return await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    def send_signal(self, sig: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        if self.process.returncode is None:  # unreaped: the group id is still ours
            kill_group(self.pid, sig)


__all__ = ["BOOTSTRAP", "SpawnError", "Spawned", "command", "lifeline", "spawn"]
