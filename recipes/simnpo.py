"""SimNPO: reference-free NPO on each forget sequence's mean log-likelihood.

A preset of `python -m recipes.unlearn --method simnpo`
(`unlearn.methods.simnpo`). Writes run_info.json, metrics.jsonl, training.png, model/ and
results.json to --out.

Commands:
    python -m recipes.simnpo --out runs/simnpo
    python -m recipes.simnpo --out /tmp/smoke --world_preset tiny --num_steps 2
"""

from __future__ import annotations

from typing import Any

from recipes.unlearn import config_class, run
from unlearn.runs import run_recipe

Config = config_class("simnpo")


def main(cfg: Any) -> dict[str, Any]:
    """Unlearn and return results.json's numbers (plus what preparation chose)."""
    return run(cfg)


if __name__ == "__main__":
    run_recipe(main, Config)
