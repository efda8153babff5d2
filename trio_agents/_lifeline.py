"""The first code every process trio_agents starts runs: a watch on the server's lifeline.

``python .../trio_agents/_lifeline.py <fd> -m <module> [args]`` (calls ``module.main(argv)``) or ``... <fd> <script.py> [args]``
(see ``_spawn``). Standard library only, and run by path rather than with ``-m``, so nothing of
trio_agents (nor trio, nor the user's code) is imported before the watch is up: the blocking
pre-trio phase of a process (imports, ``setup_fnc``) is covered as well as its event loop.

``fd`` is the read end of a pipe whose only write end the server holds and never writes to.
When the server process ends, however it ends, the kernel closes that write end and the read
end reports end-of-file (``POLLHUP``). A daemon thread blocks in ``poll`` on it and then
SIGKILLs this process's group if the process leads one (a job process, the zygote: each has
its own session), else only this process (the ``dev`` reload child shares the terminal's
group). Unlike ``PR_SET_PDEATHSIG``, nothing here depends on which *thread* of the server
started us: trio starts processes from worker threads that retire after 10 s idle, and the
parent-death signal fires when that thread exits (prctl(2)), not when the server does.

The zygote must fork with one thread, so it stops the watch (``Watch.stop``) once its imports
are done and polls the same fd in its own select loop from then on.
"""

from __future__ import annotations

import importlib
import os
import runpy
import select
import signal
import sys
import threading
import time
from typing import Final, final

#: Name under which the running watch can be found (``current()``), whichever way this file
#: was loaded (as ``__main__`` by the bootstrap, or imported).
_REGISTRY: Final = "trio_agents._lifeline"


def gone(fd: int) -> None:  # pragma: no cover - ends the process
    """The server is gone: kill our process group (if we lead one) and exit."""
    if os.getpgrp() == os.getpid():
        try:
            os.killpg(os.getpid(), signal.SIGKILL)
        except OSError:
            pass
    os._exit(1)


@final
class Watch:
    """A daemon thread waiting for the lifeline's end-of-file; ``stop()`` ends it cleanly."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="trio_agents lifeline",
                                         daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(self._stop_r, select.POLLIN)
        events = dict(poller.poll())
        if self.fd in events:  # the server never writes: any event is its end
            gone(self.fd)

    def stop(self) -> None:
        """Stop watching (the caller watches ``fd`` itself from now on); returns once the
        thread is gone from the OS too, not only from Python (the zygote then forks)."""
        tid = self._thread.native_id
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)
        # join() returns when the thread's Python part ended; the OS thread exits a moment
        # later (Python threads are detached, there is no pthread_join to wait on)
        for _ in range(1000):
            if not os.path.exists(f"/proc/self/task/{tid}"):
                return
            time.sleep(0.001)


_current: Watch | None = None


def current() -> Watch | None:
    """The watch this process runs, if it was started through the bootstrap."""
    return _current


def start(fd: int) -> Watch:
    """Watch ``fd`` (a forked job process calls this; the bootstrap does for the others)."""
    global _current
    os.set_inheritable(fd, False)  # what we spawn must not hold our lifeline
    _current = Watch(fd)
    return _current


def _bootstrap(argv: list[str]) -> None:  # pragma: no cover - runs in every spawned process
    this = sys.modules[__name__]
    sys.modules.setdefault(_REGISTRY, this)  # ``from . import _lifeline`` finds this very module
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # our own folder: trio_agents' modules must not shadow top-level ones
    start(int(argv[1]))
    if argv[2] == "-m":  # one of ours: import it (not as __main__) and call its main(argv)
        sys.argv = [argv[3], *argv[4:]]
        importlib.import_module(argv[3]).main(sys.argv)
    else:  # a script, as ``python script.py`` would run it
        script = argv[2]
        sys.argv = [script, *argv[3:]]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _bootstrap(sys.argv)
