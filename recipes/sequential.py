"""Sequential unlearning: unlearn one block at a time, back to front, through the frozen original.

A preset of `python -m recipes.unlearn --method sequential` (`unlearn.methods.sequential`): one
phase per block; the block's output on forget text is routed through the original model's later
blocks and pushed to maximum entropy, with a retain term through the updated model; only that
block trains, for --num_steps steps, and the schedules restart every phase. Writes to --out:

    run_info.json     the full config, git SHA, machine and command line
    layer<L>/         each phase's state and metrics.jsonl (a rerun resumes at the right phase)
    metrics.jsonl     every phase's records on one step axis (with "phase")
    training.png      those curves
    model/            the unlearned model and its tokenizer
    results.json      forget_acc, retain_acc, the same before unlearning, and more

Commands:
    python -m recipes.sequential --out runs/sequential
    python -m recipes.sequential --out runs/seq --forget_loss random_ce --maintain_unlearned true
    python -m recipes.sequential --out /tmp/smoke --world_preset tiny --num_steps 2
"""

from __future__ import annotations

from typing import Any

from recipes.unlearn import config_class, run
from unlearn.runs import run_recipe

Config = config_class("sequential")


def main(cfg: Any) -> dict[str, Any]:
    """Unlearn and return results.json's numbers (plus what preparation chose)."""
    return run(cfg)


if __name__ == "__main__":
    run_recipe(main, Config)
