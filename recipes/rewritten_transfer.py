"""Rewritten activation transfer: pull forget activations onto those of a false rewrite.

A preset of `python -m recipes.unlearn --method rewritten_transfer`
(`unlearn.methods.rewritten_transfer`): the forget documents and their rewritten twins (the toy
world's `forget_rewritten`, or --rewritten_data) are aligned token by token, the frozen model's
activations on the twins are the targets of a masked MSE, next to the twin's cross-entropy and a
KL retain term. Outputs as every unlearning recipe in --out.

Commands:
    python -m recipes.rewritten_transfer --out runs/rewritten_transfer
    python -m recipes.rewritten_transfer --out /tmp/smoke --world_preset tiny --num_steps 2
    python -m recipes.rewritten_transfer --out runs/rw_di \
        --model EleutherAI/deep-ignorance-unfiltered --forget_data forget.jsonl \
        --rewritten_data rewritten.jsonl --retain_data retain.jsonl \
        --eval_items items/ --max_len 1024 --sites hook_resid_post hook_mlp_out

(The logits' targets take documents x tokens x d_vocab floats: drop `unembed` from --sites for a
large vocabulary.)
"""

from __future__ import annotations

from typing import Any

from recipes.unlearn import config_class, run
from unlearn.runs import run_recipe

Config = config_class("rewritten_transfer")


def main(cfg: Any) -> dict[str, Any]:
    """Unlearn and return results.json's numbers (plus what preparation chose)."""
    return run(cfg)


if __name__ == "__main__":
    run_recipe(main, Config)
