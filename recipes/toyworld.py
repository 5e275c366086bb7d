"""Build the toy world: synthetic forget/retain knowledge, a tokenizer, and two pretrained models.

Builds (or reuses, if already built with the same config) the world in
`$UNLEARN_HOME/toyworld/<preset>-<hash>/` (default `~/.cache/unlearn`): the corpora and cloze items,
a byte-level BPE tokenizer, the unfiltered GPT-NeoX with log-spaced checkpoints, the filtered twin,
an evaluation of every checkpoint, `report.json` and `accuracy.png`. Prints a summary table.

Commands:
    python -m recipes.toyworld                        # the default world (minutes on 2 cores)
    python -m recipes.toyworld --preset tiny          # a tiny world for smoke tests (seconds)
    python -m recipes.toyworld --seed 1 --force true  # another seed; rebuild even if cached
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlearn.runs import run_recipe
from unlearn.toyworld import ITEM_SPLITS, build_world, get_preset
from unlearn.toyworld.config import WorldPreset


@dataclass
class Config:
    """Which toy world to build."""

    preset: WorldPreset = "default"
    """Named world: "default" (the reported world), "mixed" (forget text interleaved through all
    of pretraining) or "tiny" (tests and smoke runs)."""
    seed: int = 0
    """Seed of the world (entities, facts, documents, model init and batch order)."""
    root: str | None = None
    """Directory that holds worlds (default: $UNLEARN_HOME/toyworld)."""
    force: bool = False
    """Rebuild even if a complete world with this config is cached."""


def _row(name: str, record: dict[str, float], suffix: str = "") -> str:
    cells = "".join(f"{100 * record[f'{split}_acc{suffix}']:>16.1f}" for split in ITEM_SPLITS)
    return f"{name:<28}{cells}"


def main(cfg: Config) -> dict[str, float]:
    """Build or reuse the world and print what its models know.

    Returns:
        Final accuracies of both models on the reserved template, keyed `<model>/<split>_acc`,
        plus `build_seconds`.
    """
    world_cfg = get_preset(cfg.preset, seed=cfg.seed)
    root = Path(cfg.root).expanduser() if cfg.root is not None else None
    world = build_world(world_cfg, preset=cfg.preset, root=root, force=cfg.force)
    report = world.report()

    header = f"{'model (template)':<28}" + "".join(f"{split:>16}" for split in ITEM_SPLITS)
    boundary = report["checkpoints"][str(world_cfg.stage1_steps)]
    print(f"\nToy world at {world.root}\n{header}")
    print(_row("unfiltered (reserved)", report["unfiltered"]))
    print(_row("unfiltered (seen)", report["unfiltered"], "_seen"))
    print(_row("filtered (reserved)", report["filtered"]))
    print(_row("filtered (seen)", report["filtered"], "_seen"))
    print(_row(f"step {world_cfg.stage1_steps} (stage boundary)", boundary))
    print(
        f"chance {100 * report['chance']:.0f}%; built in {report['build_seconds']:.0f} s; "
        f"plot: {world.root / 'accuracy.png'}"
    )

    metrics = {
        f"{model}/{split}_acc": report[model][f"{split}_acc"]
        for model in ("unfiltered", "filtered")
        for split in ITEM_SPLITS
    }
    metrics["build_seconds"] = report["build_seconds"]
    return metrics


if __name__ == "__main__":
    run_recipe(main, Config)
