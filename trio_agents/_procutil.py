"""Process-tree tools for job processes, standard library only.

Why an environment marker: a job may start grandchildren, and one may call ``setsid()`` and
leave the job's process group, so ``killpg`` alone misses it; PDEATHSIG is not inherited by
grandchildren; cgroups need privileges we cannot assume. Every job process is started with
``TRIO_AGENTS_TREE=<server token>/<process id>`` in its environment, which every descendant
inherits (unless it deliberately scrubs its environment, which we accept as a limit). At the
end of each job process the supervisor kills its process group and then every process whose
environment carries that job's marker (``kill_marked``), so nothing it started outlives it.

If the server itself is SIGKILLed nobody runs that cleanup, so the supervisor also starts one
tiny *reaper* per server (this file run as a script, so it imports nothing but the standard
library): it blocks reading a pipe from the server and, when the pipe reports EOF (the server
exited, however it died), kills every process carrying the server's marker and exits. Job
processes themselves also die at once: each watches the server's lifeline (see ``_spawn``).
"""

from __future__ import annotations

import os
import signal
import sys

#: Environment variable carrying ``<server token>/<process id>``.
MARKER_ENV = "TRIO_AGENTS_TREE"


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    return bool(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)


def kill_group(pgid: int, sig: int) -> bool:
    """``killpg`` that treats an empty or vanished group as done. True if a signal was sent."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def find_marked(prefix: str) -> list[int]:
    """PIDs (other than ours) whose environment has ``MARKER_ENV`` starting with ``prefix``."""
    needle = f"{MARKER_ENV}={prefix}".encode()
    me = os.getpid()
    found = []
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:  # not Linux: only the process group is killed
        return []
    except OSError:  # EMFILE: nothing can be swept now (the reaper sweeps at the very end)
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone, or another user's
            continue
        for var in environ.split(b"\0"):
            if var.startswith(needle):
                found.append(int(entry))
                break
    return found


def kill_marked(prefix: str, *, rounds: int = 10) -> int:
    """SIGKILL every marked process, rescanning until none is left (a process may fork while
    we scan). Returns how many were killed."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = find_marked(prefix)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
    return len(killed)


def _reaper_main(prefix: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while os.read(0, 4096):  # the server never writes; EOF = the server is gone
        pass
    kill_marked(prefix)


if __name__ == "__main__":
    _reaper_main(sys.argv[1])
