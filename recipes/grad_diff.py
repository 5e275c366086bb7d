"""Gradient difference: gradient ascent on forget text, descent on retain text.

A preset of `python -m recipes.unlearn --method grad_diff`
(`unlearn.methods.grad_diff`). Writes run_info.json, metrics.jsonl, training.png, model/ and
results.json to --out.

Commands:
    python -m recipes.grad_diff --out runs/grad_diff
    python -m recipes.grad_diff --out /tmp/smoke --world_preset tiny --num_steps 2
"""

from __future__ import annotations

from typing import Any

from recipes.unlearn import config_class, run
from unlearn.runs import run_recipe

Config = config_class("grad_diff")


def main(cfg: Any) -> dict[str, Any]:
    """Unlearn and return results.json's numbers (plus what preparation chose)."""
    return run(cfg)


if __name__ == "__main__":
    run_recipe(main, Config)
