"""Draw benchmarks/latest.png from results/latest.json (run with the peer venv's matplotlib).

    benchmarks/.venv-peer/bin/python benchmarks/chart.py results/latest.json latest.png
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"ours": "tab:blue", "peer": "tab:orange", "floor": "tab:gray"}
LABELS = {"ours": "trio_agents", "peer": "livekit-agents", "floor": "protocol-only worker"}


def ecdf(ax: Any, runs: dict[str, list[dict[str, Any]]], key: str, names: list[str]) -> None:
    for name in names:
        values = sorted(v * 1000 for r in runs.get(name, []) for v in r.get(key, []))
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", color=COLOURS[name], label=LABELS[name])
    ax.set_xscale("log")
    ax.set_ylabel("fraction of jobs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def main(source: str, target: str) -> None:
    with open(source) as f:
        data = json.load(f)
    runs = data["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))

    ax = axes[0][0]
    ecdf(ax, runs, "seq_offer_started", ["ours", "peer", "floor"])
    ax.set_title("sequential: AvailabilityRequest → entrypoint started")
    ax.set_xlabel("ms (log)")

    ax = axes[0][1]
    ecdf(ax, runs, "seq_assign_started", ["ours", "peer"])
    ax.set_title("sequential: JobAssignment → entrypoint started")
    ax.set_xlabel("ms (log)")

    ax = axes[1][0]
    for name in ("ours", "peer"):
        for i, run in enumerate(runs[name]):
            starts = run.get("burst_started", [])
            ax.step(starts, range(1, len(starts) + 1), where="post", color=COLOURS[name],
                    alpha=0.8, label=LABELS[name] if i == 0 else None)
    ax.set_title("burst of 20: jobs started since the dispatches (each repeat)")
    ax.set_xlabel("s")
    ax.set_ylabel("jobs started")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1][1]
    names = ["idle tree after prewarm", "per running job (×10)"]
    for offset, name in ((-0.2, "ours"), (0.2, "peer")):
        summary = data[name]
        values = [summary["idle_tree_pss_mb"], summary["per_job_pss_mb"] * 10]
        bars = ax.bar([x + offset for x in range(len(names))], values, width=0.4,
                      color=COLOURS[name], label=LABELS[name])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("PSS (MiB)")
    ax.set_title("memory (PSS of the whole process tree)")
    ax.legend(fontsize=8)

    fig.suptitle(data["header"], fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
