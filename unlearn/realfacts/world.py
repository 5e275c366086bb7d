"""A built real-facts world on disk, the flags that hand it to the recipes, and a measurement.

Layout of a world directory (`$UNLEARN_HOME/realfacts/<forget domain>-<key>/`, the key a hash of
the resolved config, the data packages' versions and `GENERATOR_VERSION`):

    config.json               the resolved config, the key, the package versions, the git SHA
    facts.jsonl               one row per entity: domain, split, true values (and an attack
                              entity's false values, those of its rewritten twins)
    forget_attack.jsonl       documents the recipes train on (--forget_data, --attack_data)
    forget_rewritten.jsonl    their false twins, line for line (--rewritten_data)
    retain.jsonl              retain documents (--retain_data)
    items/<split>.jsonl       forget_attack, forget_dev, forget_test and retain items
                              (--eval_items items/, read by `unlearn.experiment.read_item_splits`)
    COMPLETE                  written last

The directory is written under a temporary name and renamed into place when whole
(`unlearn.toyworld.atomic`), so a world that exists is complete; a build of a cached world returns
it at once.

Usage:
    >>> world = build_realfacts(RealFactsConfig(seed=0))
    >>> world.unlearn_flags()   # ["--forget_data", ".../forget_attack.jsonl", ...]
    >>> scores = measure_attributes(loaded.model, loaded.tokenizer, world)
    >>> scores["capital"]["forget_dev"].acc
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.eval import MCResult, evaluate_mc, reporting
from unlearn.keys import settings_key
from unlearn.provenance import git_sha
from unlearn.realfacts.domains import package_versions
from unlearn.realfacts.generate import (
    CORPUS_NAMES,
    GENERATOR_VERSION,
    ITEM_SPLITS,
    RealFactsConfig,
    generate_realfacts,
)
from unlearn.toyworld.atomic import writing
from unlearn.toyworld.world import read_jsonl, unlearn_home

TEST = "forget_test"
"""The split scored only inside `unlearn.eval.reporting()`."""


def world_key(cfg: RealFactsConfig) -> str:
    """The key of the world `cfg` builds: its resolved settings, package versions, generator.

    Raises:
        ImportError: A data package is not installed.
    """
    return settings_key(
        {"config": cfg.resolved(), "packages": package_versions(), "generator": GENERATOR_VERSION}
    )


def realfacts_dir(cfg: RealFactsConfig, root: str | Path | None = None) -> Path:
    """The directory of the world `cfg` builds, under `root` (default $UNLEARN_HOME/realfacts)."""
    base = Path(root).expanduser() if root is not None else unlearn_home() / "realfacts"
    return base / f"{cfg.forget_domain}-{world_key(cfg)}"


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    # Sorted keys: equal data gives identical bytes.
    path.write_text(
        "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows),
        encoding="utf-8",
    )


@dataclass(frozen=True)
class RealFactsWorld:
    """Read access to a built real-facts world directory."""

    root: Path
    """The world directory."""

    @property
    def info(self) -> dict[str, Any]:
        """config.json: the resolved config, key, package versions and git SHA of the build."""
        return json.loads((self.root / "config.json").read_text())

    @property
    def forget_data(self) -> Path:
        """Documents about the attack entities (what unlearning and the tamper attack train on)."""
        return self.root / "forget_attack.jsonl"

    @property
    def rewritten_data(self) -> Path:
        """The false twins of `forget_data`, line for line."""
        return self.root / "forget_rewritten.jsonl"

    @property
    def retain_data(self) -> Path:
        """Documents about the retain entities."""
        return self.root / "retain.jsonl"

    @property
    def items_dir(self) -> Path:
        """The directory of <split>.jsonl items (`--eval_items`)."""
        return self.root / "items"

    def corpus(self, name: str) -> list[dict[str, Any]]:
        """The documents of one corpus (forget_attack, forget_rewritten or retain).

        Raises:
            ValueError: Unknown corpus name.
        """
        if name not in CORPUS_NAMES:
            raise ValueError(f"unknown corpus {name!r}; choose one of {CORPUS_NAMES}")
        return list(read_jsonl(self.root / f"{name}.jsonl"))

    def items(self, split: str) -> list[dict[str, Any]]:
        """The items of one split (forget_test ones score only inside `reporting()`).

        Raises:
            ValueError: Unknown split.
        """
        if split not in ITEM_SPLITS:
            raise ValueError(f"unknown item split {split!r}; choose one of {ITEM_SPLITS}")
        return list(read_jsonl(self.items_dir / f"{split}.jsonl"))

    def facts(self) -> list[dict[str, Any]]:
        """One row per entity: name, domain, split, true values (false values: attack entities)."""
        return list(read_jsonl(self.root / "facts.jsonl"))

    def unlearn_flags(self) -> list[str]:
        """The data flags of the unlearning recipes (`python -m recipes.unlearn ...`)."""
        return [
            "--forget_data",
            str(self.forget_data),
            "--retain_data",
            str(self.retain_data),
            "--eval_items",
            str(self.items_dir),
        ]

    def tamper_flags(self) -> list[str]:
        """The data flags of `python -m recipes.tamper`."""
        return [
            "--attack_data",
            str(self.forget_data),
            "--retain_data",
            str(self.retain_data),
            "--eval_items",
            str(self.items_dir),
        ]


def build_realfacts(
    cfg: RealFactsConfig, root: str | Path | None = None, force: bool = False
) -> RealFactsWorld:
    """Build the world `cfg` describes (or return it if built), under `root`.

    Args:
        cfg: What the world contains.
        root: The folder of worlds (default $UNLEARN_HOME/realfacts).
        force: Rebuild even if the world exists.

    Raises:
        ImportError: A data package is not installed (the message says what to install).
        ValueError: Too few entities or values for the config.
    """
    target = realfacts_dir(cfg, root)
    if (target / "COMPLETE").exists() and not force:
        return RealFactsWorld(target)
    world = generate_realfacts(cfg)
    info = {
        "config": cfg.resolved(),
        "key": world_key(cfg),
        "packages": package_versions(),
        "generator": GENERATOR_VERSION,
        "git_sha": git_sha(),
    }
    with writing(target) as tmp:
        (tmp / "items").mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _write_jsonl(tmp / "facts.jsonl", world["facts"])
        for name, docs in world["corpora"].items():
            _write_jsonl(tmp / f"{name}.jsonl", docs)
        for split, rows in world["items"].items():
            _write_jsonl(tmp / "items" / f"{split}.jsonl", rows)
        (tmp / "COMPLETE").write_text("")
    return RealFactsWorld(target)


def measure_attributes(
    model: Any, tokenizer: Any, world: RealFactsWorld, *, batch_size: int = 64
) -> dict[str, dict[str, MCResult]]:
    """The model's accuracy on every split's items, per attribute (built-in scorer).

    Each split is scored once and its per-item credit grouped by attribute; forget_test is scored
    inside `reporting()` (it is for reporting; choose nothing by it).

    Args:
        model: An nnsight-wrapped causal LM or a plain Hugging Face module.
        tokenizer: Its tokenizer.
        world: The world whose items to score.
        batch_size: Sequences per forward pass.

    Returns:
        Attribute -> split -> accuracy (splits where the attribute has items).
    """
    scores: dict[str, dict[str, MCResult]] = defaultdict(dict)
    for split in ITEM_SPLITS:
        rows = world.items(split)
        if split == TEST:
            with reporting():
                result = evaluate_mc(model, tokenizer, rows, batch_size=batch_size)
        else:
            result = evaluate_mc(model, tokenizer, rows, batch_size=batch_size)
        by_attribute: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            by_attribute[row["attribute"]].append(i)
        for attribute, indices in by_attribute.items():
            credit = [result.correct[i] for i in indices]
            credit_norm = [result.correct_norm[i] for i in indices]
            scores[attribute][split] = MCResult(
                acc=sum(credit) / len(credit),
                acc_norm=sum(credit_norm) / len(credit_norm),
                n=len(credit),
                correct=tuple(credit),
                correct_norm=tuple(credit_norm),
            )
    return dict(scores)
