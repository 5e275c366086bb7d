"""Choosing an early training checkpoint as a teacher: sweep, select, report.

`sweep_checkpoints` scores a model's training checkpoints on forget (and retain) items;
`select_checkpoint` picks the latest one whose forget accuracy is still within `margin` of chance
(the reference chose by hand, ALGORITHMS.md section 3.4); `write_sweep` saves the table and a PNG.
`choose_teacher` is the three together, as checkpoint transfer and probe unlearning use them: a
given revision is used as it is, otherwise the sweep over tuning items (attack split and dev,
never test) picks one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from interventions import Execution
from unlearn.eval import evaluate_mc
from unlearn.models import list_checkpoints, load_model
from unlearn.plots import plt, save_figure


@dataclass(frozen=True)
class CheckpointScore:
    """How much one checkpoint knows."""

    revision: str
    """Checkpoint name or hub revision."""
    forget_acc: float
    """Accuracy on the forget items."""
    retain_acc: float | None = None
    """Accuracy on the retain items, if given."""


def sweep_checkpoints(
    source: str,
    revisions: Sequence[str],
    forget_items: Sequence[dict[str, Any]],
    retain_items: Sequence[dict[str, Any]] | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    remote: Execution = False,
) -> list[CheckpointScore]:
    """Evaluate each checkpoint of `source` (a local model directory or a hub name).

    `remote` runs the evaluation traces elsewhere (see `interventions.Remote`), e.g. on NDIF for
    a hosted model's revisions.

    Raises:
        ValueError: No revisions were given.
    """
    if not revisions:
        raise ValueError("no checkpoints to sweep; pass revisions, e.g. list_checkpoints(dir)")
    scores = []
    for revision in revisions:
        loaded = load_model(source, revision=revision, device=device, dtype=dtype)
        forget = evaluate_mc(loaded.model, loaded.tokenizer, forget_items, remote=remote).acc
        retain = (
            evaluate_mc(loaded.model, loaded.tokenizer, retain_items, remote=remote).acc
            if retain_items is not None
            else None
        )
        scores.append(CheckpointScore(revision, forget, retain))
    return scores


def select_checkpoint(
    scores: Sequence[CheckpointScore], chance: float = 0.25, margin: float = 0.05
) -> CheckpointScore:
    """The latest checkpoint (in the given order) whose forget accuracy is <= chance + margin.

    Raises:
        ValueError: No checkpoint is that close to chance (the message lists the sweep).
    """
    eligible = [s for s in scores if s.forget_acc <= chance + margin]
    if not eligible:
        table = ", ".join(f"{s.revision}: {s.forget_acc:.3f}" for s in scores)
        raise ValueError(
            f"no checkpoint has forget accuracy <= {chance + margin:.3f} (chance {chance} + margin "
            f"{margin}); sweep: {table}. Add earlier checkpoints or raise the margin."
        )
    return eligible[-1]


def write_sweep(
    scores: Sequence[CheckpointScore],
    chosen: CheckpointScore,
    out_dir: str | Path,
    chance: float = 0.25,
) -> Path:
    """Write sweep.json, sweep.md and sweep.png (accuracy per checkpoint, the chosen one marked)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {"chosen": chosen.revision, "chance": chance, "scores": [asdict(s) for s in scores]},
            indent=2,
        )
        + "\n"
    )
    rows = [
        f"| {s.revision} | {s.forget_acc:.3f} | "
        f"{'' if s.retain_acc is None else f'{s.retain_acc:.3f}'} | "
        f"{'chosen' if s == chosen else ''} |"
        for s in scores
    ]
    (out / "sweep.md").write_text(
        "| checkpoint | forget | retain | |\n| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(scores))
    ax.plot(x, [s.forget_acc for s in scores], marker="o", color="tab:red", label="forget")
    if all(s.retain_acc is not None for s in scores):
        ax.plot(x, [s.retain_acc for s in scores], marker="o", color="tab:blue", label="retain")
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.axvline(list(scores).index(chosen), color="black", linestyle="--", label="chosen teacher")
    ax.set_xticks(list(x), [s.revision for s in scores], rotation=45, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out / "sweep.png")


@dataclass(frozen=True)
class TeacherChoice:
    """The teacher a method reads: model, checkpoint, and its sweep score if it was swept."""

    source: str
    """Local model directory or hub name."""
    revision: str | None
    """Checkpoint name or hub revision."""
    score: CheckpointScore | None = None
    """The chosen checkpoint's sweep score (None when the revision was given)."""


def choose_teacher(
    source: str,
    revision: str | None,
    revisions: Sequence[str] | None,
    forget_items: Sequence[dict[str, Any]],
    retain_items: Sequence[dict[str, Any]] | None,
    out_dir: str | Path,
    *,
    chance: float = 0.25,
    margin: float = 0.05,
    device: str = "cpu",
) -> TeacherChoice:
    """The teacher checkpoint: `revision` if given, else the sweep's choice.

    Without `revision`, `revisions` (default: every saved checkpoint of `source` but the last) are
    scored, the latest near chance is selected and the sweep is written to `out_dir`.

    Args:
        source: The teacher model.
        revision: A checkpoint to use without a sweep.
        revisions: Checkpoints to sweep, oldest first.
        forget_items: Items that decide (tuning items only: attack split and dev).
        retain_items: Retain items scored next to them (None: forget only, half the time).
        out_dir: Where sweep.{json,md,png} go.
        chance: Chance accuracy of the forget items.
        margin: The teacher is the latest checkpoint with forget accuracy <= chance + margin.
        device: Device of the checkpoints.

    Raises:
        ValueError: Nothing to sweep, or no checkpoint near chance.
    """
    if revision is not None:
        return TeacherChoice(source, revision)
    revisions = list(revisions or list_checkpoints(source)[:-1])
    scores = sweep_checkpoints(source, revisions, forget_items, retain_items, device=device)
    chosen = select_checkpoint(scores, chance, margin)
    write_sweep(scores, chosen, out_dir, chance=chance)
    return TeacherChoice(source, chosen.revision, chosen)
