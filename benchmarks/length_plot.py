"""A line per measured quantity against the canvas length, as the e2e benchmarks plot their rows."""
from __future__ import annotations

from pathlib import Path


def plot_by_length(rows: list[dict], series: list[tuple[str, str]], path: Path, ylabel: str, title: str,
                   log: bool = False, title_size: float | None = None) -> None:
    """rows[i]["N"] on x (k tokens), one line per (key, label) of `series`; nothing without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ns = [r["N"] // 1024 for r in rows]
    for key, label in series:
        ax.plot(ns, [r[key] for r in rows], marker="o", label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("canvas length (k tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
