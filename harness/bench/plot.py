"""The bench's plot: throughput against model size, per backend (the PNG beside the Markdown report)."""

from __future__ import annotations

from pathlib import Path

from .workload import BACKENDS


def plot(results: list[dict], png: Path) -> None:
    """Training tokens/s against parameters, one line per backend, log-log."""
    # here, not at the top: matplotlib is heavy and only a written report needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for backend in BACKENDS:
        rows = [r for r in results if r["backend"] == backend]
        if rows:
            ax.plot([r["params"] / 1e6 for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=backend)
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = sorted({r["params"] / 1e6 for r in results})
    ax.set_xticks(xs, [f"{x:.1f}M" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("training tokens / s")
    ax.set_title("training step throughput (higher is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
