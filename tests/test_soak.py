"""The soak benchmark in CI: two minutes of seeded faults against a real agent server.

``benchmarks/soak.py`` does the checking (statuses, orphans, RSS and fds, the zygote,
health) and exits non-zero when a check fails; this test runs it as a subprocess and also
checks that the run exercised what it claims: every job kind and every disruption.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "benchmarks" / "soak.py"
SEED = 1
KINDS = {"normal", "long", "grandchild", "raise", "exit", "segfault", "memory", "hang",
         "hang_sync"}
FAULTS = {"quiet", "drop", "down", "sigstop"}
#: Not a speed target: a soak that hangs must not hang CI (it runs ~2 minutes).
BOUND = 15 * 60


async def interrupt_soak(process: trio.Process) -> None:
    """Cancelled: SIGINT, so the soak kills the agent server and everything of its run."""
    process.send_signal(signal.SIGINT)
    with trio.move_on_after(60):
        await process.wait()
    process.kill()


@pytest.mark.slow
async def test_soak_two_minutes(tmp_path: Path) -> None:
    results = tmp_path / "soak.json"
    with trio.fail_after(BOUND):
        done = await trio.run_process(
            [sys.executable, str(SOAK), "--minutes", "2", "--seed", str(SEED),
             "--json", str(results)],
            cwd=ROOT, capture_stdout=True, stderr=subprocess.STDOUT, check=False,
            deliver_cancel=interrupt_soak)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, f"the soak failed (exit {done.returncode}):\n{output}"
    figures = json.loads(results.read_text())
    assert set(figures["jobs_by_kind"]) == KINDS, output
    assert set(figures["faults"]) == FAULTS, output
    assert figures["statuses_lost"] == figures["wrong_statuses"] == figures["orphans"] == 0
