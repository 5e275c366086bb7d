"""Tuned-lens unlearning: maximize the entropy of every layer's lens prediction on forget text.

A preset of `python -m recipes.unlearn --method lens_unlearn` (`unlearn.methods.lens_unlearn`):
the lens-entropy forget term plus a retain term. Writes run_info.json, metrics.jsonl,
training.png, model/ and results.json to --out.

Commands:
    python -m recipes.lens_unlearn --out runs/lens_unlearn
    python -m recipes.lens_unlearn --out runs/lens --lens_path runs/tuned_lens/lens
    python -m recipes.lens_unlearn --out /tmp/smoke --world_preset tiny --num_steps 2
    python -m recipes.lens_unlearn --out runs/x --model EleutherAI/pythia-14m \
        --forget_data forget.jsonl --retain_data retain.jsonl --eval_items items/
"""

from __future__ import annotations

from typing import Any

from recipes.unlearn import config_class, run
from unlearn.runs import run_recipe

Config = config_class("lens_unlearn")


def main(cfg: Any) -> dict[str, Any]:
    """Unlearn and return results.json's numbers (plus what preparation chose)."""
    return run(cfg)


if __name__ == "__main__":
    run_recipe(main, Config)
