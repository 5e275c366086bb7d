"""Accuracy of every checkpoint of a built toy world's unfiltered model, per tuning item split.

The teacher sweep of `recipes.checkpoint_transfer` and `recipes.probe_unlearn` scores the saved
checkpoints on forget items and picks the latest one near chance. This records, for each checkpoint,
the accuracy and item count of every split that tuning may score (forget_attack, forget_dev,
retain; reserved template), so that teacher selection is tested on the default world's real curve
without building that world (`tests/recipes/test_unlearn_recipes.py`). Only scores a world that is
already built; never builds one.

    python -m benchmarks.checkpoint_curve   # benchmarks/results/checkpoint_curve_default.json
    python -m benchmarks.checkpoint_curve --preset tiny --out /tmp/curve.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from unlearn.eval import evaluate_mc
from unlearn.models import list_checkpoints, load_model
from unlearn.provenance import git_sha, machine, portable_path
from unlearn.toyworld import ToyWorld, get_preset, world_dir
from unlearn.toyworld.config import PRESETS
from unlearn.toyworld.world import TUNING_SPLITS

RESULTS = Path(__file__).resolve().parent / "results"


def checkpoint_curve(world: ToyWorld, template: str = "reserved") -> dict[str, Any]:
    """Accuracy on each tuning split of every checkpoint, oldest first (the final model last)."""
    model_dir = world.model_dir("unfiltered")
    items = {split: world.items(split, template) for split in TUNING_SPLITS}
    curve = []
    for revision in list_checkpoints(model_dir):
        loaded = load_model(model_dir, checkpoint=revision)
        accuracies = {
            f"{split}_acc": evaluate_mc(loaded.model, loaded.tokenizer, split_items).acc
            for split, split_items in items.items()
        }
        curve.append({"revision": revision, **accuracies})
    return {
        "template": template,
        "n_items": {split: len(split_items) for split, split_items in items.items()},
        "checkpoints": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = get_preset(args.preset, seed=args.seed)
    world = ToyWorld(world_dir(cfg, args.preset))
    if not world.is_complete:
        raise SystemExit(f"{world.root} is not built; build it with python -m recipes.toyworld")
    start = time.perf_counter()
    record = {
        "command": shlex.join(["python", "-m", "benchmarks.checkpoint_curve", *sys.argv[1:]]),
        "git_sha": git_sha(),
        "machine": machine(),
        "world": portable_path(world.root),
        "config_hash": cfg.hash(),
        **checkpoint_curve(world),
        "seconds": time.perf_counter() - start,
    }
    out = args.out or RESULTS / f"checkpoint_curve_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
