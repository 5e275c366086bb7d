"""Probe unlearning: fit transformer probes from an early checkpoint, then unlearn through them.

A preset of `python -m recipes.unlearn --method probe_unlearn` (`unlearn.methods.probe_unlearn`):
picks the teacher checkpoint (teacher_sweep/; or --teacher_revision skips the sweep), trains one
causal transformer probe per layer (probes/, with held-out MSE next to the identity map's), and
unlearns by maximizing the entropy of every probe's prediction decoded through the final norm and
unembedding, plus a retain term. Outputs as every unlearning recipe in --out.

Commands:
    python -m recipes.probe_unlearn --out runs/probe_unlearn
    python -m recipes.probe_unlearn --out runs/probe2 --probe_path runs/probe_unlearn/probes
    python -m recipes.probe_unlearn --out /tmp/smoke --world_preset tiny --num_steps 2 \
        --probe_steps 2 --margin 1.0
    python -m recipes.probe_unlearn --out runs/di --model EleutherAI/deep-ignorance-unfiltered \
        --teacher EleutherAI/deep-ignorance-pretraining-stage-unfiltered \
        --teacher_revision global_step38144 --layers 8 12 16 20 24 28 \
        --forget_data forget.jsonl --retain_data retain.jsonl --eval_items items/
"""

from __future__ import annotations

from typing import Any

from recipes.unlearn import config_class, run
from unlearn.runs import run_recipe

Config = config_class("probe_unlearn")


def main(cfg: Any) -> dict[str, Any]:
    """Unlearn and return results.json's numbers (plus what preparation chose)."""
    return run(cfg)


if __name__ == "__main__":
    run_recipe(main, Config)
