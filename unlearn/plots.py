"""Matplotlib figures of results (PNG): accuracy over pretraining checkpoints, recovery curves, ...

Every function takes plain data (a report dict, a list of records) and a path, and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPLIT_STYLES = {
    "forget_attack_acc": ("forget (attack split)", "tab:red"),
    "forget_heldout_acc": ("forget (held-out split)", "tab:orange"),
    "retain_acc": ("retain", "tab:blue"),
}
"""Report key -> (legend label, colour)."""


def plot_checkpoint_accuracy(report: dict[str, Any], path: str | Path) -> Path:
    """Accuracy over pretraining checkpoints for the unfiltered model and its filtered twin.

    Args:
        report: A toy-world report with "checkpoints" and "filtered_checkpoints" (step -> record),
            "stage1_steps" and "chance".
        path: Where to write the PNG.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "checkpoints", "unfiltered"),
        (axes[1], "filtered_checkpoints", "filtered twin"),
    ):
        records = {int(step): rec for step, rec in report[key].items()}
        steps = sorted(records)
        for metric, (label, colour) in SPLIT_STYLES.items():
            ax.plot(
                steps, [records[s][metric] for s in steps], marker="o", color=colour, label=label
            )
        ax.axhline(report["chance"], color="grey", linestyle=":", label="chance")
        ax.axvline(
            report["stage1_steps"],
            color="black",
            linestyle="--",
            linewidth=0.8,
            label="forget data enters",
        )
        ax.set_xscale("symlog", linthresh=max(1, min(s for s in steps if s > 0)))
        ax.set_xlabel("pretraining step")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("4-way cloze accuracy (reserved template)")
    axes[1].legend(loc="center left", fontsize=8)
    fig.suptitle("Toy world: what each checkpoint knows")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
