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


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (creating the folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
        ax.set_xlim(0, max(steps) * 1.1)
        ax.set_xlabel("pretraining step")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("4-way cloze accuracy (reserved template)")
    axes[1].legend(loc="center left", fontsize=8)
    fig.suptitle("Toy world: what each checkpoint knows")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss terms (left) and evaluation accuracies (right) over optimizer steps.

    Args:
        history: Records from metrics.jsonl: each has "step" and keys like "loss/<term>" or
            "eval/<metric>".
        path: Where to write the PNG.
        title: Figure title.
    """
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix, ax in (("loss/", loss_ax), ("eval/", eval_ax)):
        keys = sorted({k for record in history for k in record if k.startswith(prefix)})
        for key in keys:
            points = [(r["step"], r[key]) for r in history if key in r]
            ax.plot(
                *zip(*points, strict=True),
                marker="." if prefix == "eval/" else None,
                label=key.removeprefix(prefix),
            )
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    loss_ax.set_title("loss terms (unweighted)")
    eval_ax.set_title("evaluation accuracy")
    eval_ax.axhline(0.25, color="grey", linestyle=":", label="chance")
    eval_ax.set_ylim(0, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lens_comparison(kl: dict[str, list[float]], path: str | Path) -> Path:
    """Per-layer KL(p_final ‖ p_lens) of the logit lens and the tuned lens (log scale).

    Args:
        kl: {"logit": [...], "tuned": [...]}, one value per layer.
        path: Where to write the PNG.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("logit", "o"), ("tuned", "s")):
        ax.plot(range(len(kl[name])), kl[name], marker=marker, label=f"{name} lens")
    ax.set_yscale("log")
    ax.set_xlabel("block output")
    ax.set_ylabel("KL to the final distribution (nats)")
    ax.set_title("Held-out KL per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


CONTROL_STYLES = {
    "unfiltered (attacked)": {"color": "black", "linestyle": "-", "marker": "."},
    "filtered twin (attacked)": {"color": "tab:gray", "linestyle": "--", "marker": "."},
    "benign fine-tune": {"color": "tab:green", "linestyle": ":", "marker": "."},
}
"""Line styles of the control curves in recovery plots (other curves get the colour cycle)."""


def plot_recovery(
    curves: dict[str, list[dict[str, Any]]],
    path: str | Path,
    title: str = "",
    chance: float = 0.25,
    original_level: float | None = None,
) -> Path:
    """Held-out forget accuracy (left) and retain accuracy (right) over tamper-attack steps.

    Args:
        curves: Label -> tamper records ({"step", "forget_acc", "retain_acc", ...}). Labels in
            `CONTROL_STYLES` are drawn as controls.
        path: Where to write the PNG.
        title: Figure title (the attack's hyperparameters).
        chance: Chance accuracy (a dotted line).
        original_level: The unfiltered model's held-out forget accuracy before any attack (a
            dashed line), if known.
    """
    fig, (forget_ax, retain_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for label, records in curves.items():
        style = CONTROL_STYLES.get(label, {"marker": "o", "markersize": 3})
        steps = [r["step"] for r in records]
        forget_ax.plot(steps, [r["forget_acc"] for r in records], label=label, **style)
        retain_ax.plot(steps, [r["retain_acc"] for r in records], label=label, **style)
    for ax in (forget_ax, retain_ax):
        ax.axhline(chance, color="green", linestyle=":", linewidth=1, label=f"chance {chance:.0%}")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("attack step (linear to 10, log after)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if original_level is not None:
        forget_ax.axhline(
            original_level,
            color="red",
            linestyle="--",
            linewidth=1,
            label=f"unfiltered model {original_level:.1%}",
        )
    forget_ax.set_ylabel("held-out forget accuracy")
    retain_ax.set_ylabel("retain accuracy")
    forget_ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_token_masks(
    documents: list[list[tuple[str, bool, bool]]],
    path: str | Path,
    title: str = "",
    width: int = 100,
) -> Path:
    """A few documents token by token: selected tokens shaded, ground-truth tokens underlined.

    Args:
        documents: Per document, its tokens as (text, selected, ground truth).
        path: Where to write the PNG.
        title: Figure title (the selector and its scores).
        width: Characters per line before a document wraps.
    """
    lines: list[list[tuple[int, str, bool, bool]]] = []  # (column, text, selected, truth)
    for tokens in documents:
        lines.append([])
        for text, selected, truth in tokens:
            text = text.replace("\n", " ")
            if lines[-1] and lines[-1][-1][0] + len(lines[-1][-1][1]) + len(text) > width:
                lines.append([])
            column = lines[-1][-1][0] + len(lines[-1][-1][1]) if lines[-1] else 0
            lines[-1].append((column, text, selected, truth))
        lines.append([])  # a blank line between documents
    char = 0.075  # inches per monospace character at font size 9
    fig, ax = plt.subplots(figsize=(width * char + 0.6, 0.26 * len(lines) + 0.9))
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines), -1)
    ax.axis("off")
    for row, line in enumerate(lines):
        for column, text, selected, truth in line:
            ax.text(
                column,
                row,
                text,
                family="monospace",
                fontsize=9,
                va="center",
                bbox={"facecolor": "orange", "alpha": 0.6, "pad": 0.5, "linewidth": 0}
                if selected
                else None,
            )
            if truth:
                ax.plot([column, column + len(text)], [row + 0.35] * 2, color="tab:blue", lw=1.5)
    ax.set_title(f"{title}\nshaded: selected; underlined: ground-truth value token", fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.97, top=1 - 0.7 / fig.get_figheight(), bottom=0.02)
    return save_figure(fig, path)
