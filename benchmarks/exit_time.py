"""How long an agent server takes to exit after SIGTERM: idle, and after a drain.

    .venv/bin/python benchmarks/exit_time.py [--repeat 5] [--jobs 5] [--sleep 3]

Runs ``benchmarks/ours_agent.py start`` (production mode, 2 idle processes, load threshold
off) against an in-process dev server, and prints, as medians over the repeats:

* idle: SIGTERM → the websocket closed (the dev server saw the worker go) → process gone;
* drain of N jobs sleeping S s: SIGTERM → the last job's final status at the dev server →
  websocket closed → process gone, and "last final status → process gone" (the figure the
  issue bounds at 0.25 s).

Times are ``time.monotonic()`` (system-wide on Linux) taken in this process; the agent's own
log (``--log`` to see it) has its timestamps for finding where a delay goes.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from trio_agents.devserver import DevServer, open_dev_server

HERE = Path(__file__).parent
AGENT = Path(os.environ.get("EXIT_AGENT", HERE / "ours_agent.py"))


async def _agent(dev: DevServer, events: str, log: bool) -> trio.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    env.update(LIVEKIT_URL=dev.url, LIVEKIT_API_KEY=dev.api_key,
               LIVEKIT_API_SECRET=dev.api_secret, BENCH_EVENTS=events, BENCH_NO_LOAD="1",
               PYTHONPATH=str(HERE.parent))
    return await trio.lowlevel.open_process(
        [sys.executable, str(AGENT), "start"], env=env,
        stdout=None if log else -3, stderr=None if log else -3)  # -3 = DEVNULL


async def _one(dev: DevServer, *, jobs: int, sleep: float, log: bool,
               prefix: str) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as events:
        known = set(dev.workers)
        process = await _agent(dev, events.name, log)
        try:
            with trio.fail_after(60):
                await dev.wait_until(lambda: set(dev.workers) - known)
            (worker_id,) = set(dev.workers) - known
            records = []
            for n in range(jobs):
                dispatch_room = f"{prefix}-{n}"
                await dev.create_dispatch(dispatch_room, "bench", metadata=f"sleep:{sleep}")
            if jobs:
                with trio.fail_after(60):
                    await dev.wait_until(lambda: sum(
                        1 for j in dev.jobs.values()
                        if j.room.startswith(prefix) and j.status == 1) == jobs)  # JS_RUNNING
                records = [j for j in dev.jobs.values() if j.room.startswith(prefix)]
            else:
                await trio.sleep(1.0)  # let the idle pool settle: the idle case is the figure
            last_status = 0.0
            ws_closed = 0.0

            async def watch() -> None:
                nonlocal last_status, ws_closed
                await dev.wait_until(lambda: all(j.ended for j in records))
                last_status = time.monotonic()
                await dev.wait_until(lambda: worker_id not in dev.workers)
                ws_closed = time.monotonic()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                t0 = time.monotonic()
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(120):
                    await process.wait()
                t_exit = time.monotonic()
                with trio.fail_after(5):
                    await dev.wait_until(lambda: worker_id not in dev.workers)
            result = {"ws_closed": ws_closed - t0, "exit": t_exit - t0,
                      "code": float(process.returncode or 0)}
            if jobs:
                result["last_status"] = last_status - t0
                result["after_last_status"] = t_exit - last_status
            return result
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def main(args: argparse.Namespace) -> None:
    async with open_dev_server(host="127.0.0.1", port=0) as dev:
        for label, jobs in (("idle", 0), (f"drain of {args.jobs} x {args.sleep:g} s", args.jobs)):
            runs: list[dict[str, Any]] = []
            for n in range(args.repeat):
                runs.append(await _one(dev, jobs=jobs, sleep=args.sleep, log=args.log,
                                       prefix=f"exit-{label[:5]}-{n}"))
            keys = runs[0].keys()
            print(f"{label}: " + ", ".join(
                f"{k} {statistics.median(r[k] for r in runs):.3f}" for k in keys)
                + f"  (median of {len(runs)}; all exit: "
                + " ".join(f"{r['exit']:.3f}" for r in runs) + ")")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=3.0)
    parser.add_argument("--log", action="store_true", help="show the agent's log")
    trio.run(main, parser.parse_args())
