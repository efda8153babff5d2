"""Draw benchmarks/latest.png from results/latest.json (run with the peer venv's matplotlib)."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    data = json.loads(open(source).read())
    runs = data["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in ((axes[0], "seq_offer_started", "AvailabilityRequest → entrypoint (ms)"),
                           (axes[1], "seq_assign_started", "JobAssignment → entrypoint (ms)")):
        series = [[v * 1000 for r in runs[name] for v in r[key]] for name in ("ours", "peer")]
        ax.boxplot(series, tick_labels=["trio_agents", "livekit-agents"], showfliers=True)
        ax.set_yscale("log")
        ax.set_title(title)
    names = ["idle tree", "per job"]
    ours = [data["ours"]["idle_tree_pss_mb"], data["ours"]["per_job_pss_mb"]]
    peer = [data["peer"]["idle_tree_pss_mb"], data["peer"]["per_job_pss_mb"]]
    xs = range(len(names))
    axes[2].bar([x - 0.2 for x in xs], ours, width=0.4, label="trio_agents")
    axes[2].bar([x + 0.2 for x in xs], peer, width=0.4, label="livekit-agents")
    axes[2].set_xticks(list(xs), names)
    axes[2].set_title("PSS (MiB)")
    axes[2].legend()
    fig.suptitle(data["header"], fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
